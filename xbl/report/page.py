"""The round report: one page a reviewer reads at a glance. What the models are, how they
compare, where each looks (before and after, on the round's queries and on a fixed probe set of
held-out images), what the annotations cost, and why the champion is who it is.

The saliency grids put every model's maps side by side on the same images in one picture (the
probe maps also go to MLflow as the image `saliency/probes`, one step per round, for its image
charts across runs). Everything the page shows is computed and drawn here,
from values and local files; reading MLflow and rendering the HTML in a browser are the
task's (tasks/report.py).
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from torch import nn

from xbl.data.images import to_tensor
from xbl.data.prepared import AUDIT, PreparedData
from xbl.explain.saliency import deeplift_blurred
from xbl.train.loop import predict_proba

PROBES = 8  # held-out images shown every round
QUERIES_SHOWN = 8  # the round's first queries shown, as many rows as the probes
PAGE_WIDTH = 1100  # px: the page's max-width, so also the width of its picture
QUERIES_TITLE = "The round's queries: where each model looks"
PROBES_TITLE = "Held-out probes, the same every round"
FIGURE_DPI = 100  # the picture matplotlib draws where no browser renders the page
GRID_TITLE_PX = 44


@dataclass(frozen=True)
class RoundPage:
    """What a round's page shows. `grids` maps a title to a saliency grid PNG; the grids lie
    beside the page, which refers to them by file name."""

    round_number: int
    table: list[dict]
    promotion: dict
    budget: dict
    grids: dict[str, Path]
    runs: dict[str, str]
    # the round's annotators (xbl/labelstudio/agreement.py's record): shown when several
    # answered one task or an answer could not be read
    annotators: dict | None = None


def probe_indices(data: PreparedData, n: int = PROBES) -> np.ndarray:
    """The same held-out images every round (audit, else test), so rounds compare: a fixed
    permutation of the split, the first `n`."""
    split = AUDIT if len(data.indices(AUDIT)) else "test"
    idx = data.indices(split)
    return np.sort(np.random.default_rng(0).permutation(idx)[:n])


def round_grids(
    models: dict[str, nn.Module], data: PreparedData, asked: list[int] | None, folder: Path
) -> dict[str, Path]:
    """The page's grids in `folder`: the round's first queries (`asked`: dataset indices, None
    where the round kept no queries), then the probes. Titles to files."""
    grids = {}
    if asked is not None:
        queries = np.array(asked[:QUERIES_SHOWN])
        grids[QUERIES_TITLE] = saliency_grid(models, data, queries, folder / "queries.png")
    grids[PROBES_TITLE] = saliency_grid(models, data, probe_indices(data), folder / "probes.png")
    return grids


def saliency_grid(
    models: dict[str, nn.Module], data: PreparedData, indices: np.ndarray, path: Path
) -> Path:
    """Rows: images; columns: the image, then each model's DeepLIFT map (|attribution|, the
    blurred-baseline maps annotators see) titled with its prediction; the confounder, where
    known, outlined in white."""
    matplotlib.use("Agg")  # files only: no display, no window
    import matplotlib.pyplot as plt

    x = to_tensor(data.images[indices])
    maps, preds = {}, {}
    for name, model in models.items():
        x_here = x.to(next(model.parameters()).device)
        maps[name] = deeplift_blurred(model, x_here).abs().cpu().numpy()
        preds[name] = predict_proba(model, x_here).argmax(1)
    cols = 1 + len(models)
    fig, axes = plt.subplots(len(indices), cols, figsize=(1.6 * cols, 1.6 * len(indices)))
    axes = np.atleast_2d(axes)
    for row, i in enumerate(indices):
        _show_image(axes[row, 0], data, i)
        for col, name in enumerate(models, start=1):
            ax = axes[row, col]
            ax.imshow(maps[name][row], cmap="inferno", vmin=0, vmax=1)
            if data.confounder[i].any():
                ax.contour(data.confounder[i], levels=[0.5], colors="white", linewidths=0.8)
            label = data.classes[preds[name][row]]
            ax.set_title(f"{name}: {label}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _show_image(ax, data: PreparedData, i: int) -> None:
    image = data.images[i]
    shown = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image[0]
    ax.imshow(shown, cmap=None if image.shape[0] == 3 else "gray")
    ax.set_title(f"{data.ids[i]} ({data.classes[data.labels[i]]})", fontsize=6)
    ax.axis("off")


def report_columns(roles: dict[str, str]) -> dict[str, str]:
    """One column per model: roles that share a run share a column ("baseline = champion")."""
    by_run: dict[str, list[str]] = {}
    for role, run_id in roles.items():
        by_run.setdefault(run_id, []).append(role)
    return {" = ".join(names): run_id for run_id, names in by_run.items()}


def cost_columns(table: list[dict]) -> list[dict]:
    """Beside each feedback model's annotator seconds (every round it learnt from), the audit
    accuracy it gained over the baseline per annotator minute: what an annotation buys. The
    baseline's row names the baseline (alone or with another role)."""
    base = next((r for r in table if r["role"].split(" = ")[0] == "baseline"), None)
    out = []
    for row in table:
        row = dict(row)
        seconds = row.get("annotator_seconds") or 0.0
        if (
            base is not None
            and seconds > 0
            and "audit_accuracy" in row
            and "audit_accuracy" in base
        ):
            gain = row["audit_accuracy"] - base["audit_accuracy"]
            row["audit_gain_per_annotator_minute"] = round(gain / (seconds / 60.0), 4)
        out.append(row)
    return out


def _verdict(promotion: dict) -> str:
    return "candidate promoted" if promotion["promoted"] else "champion kept"


def _budget_line(budget: dict) -> str:
    minutes = budget["annotator_seconds"] / 60
    reviews = budget.get("reviews", 0)
    return (
        f"Annotation budget so far: {budget['answers']} answers"
        + (f", {reviews} reviews" if reviews else "")
        + f", {minutes:.1f} annotator minutes (Label Studio's lead time; for the simulated "
        "annotator, its time model)."
    )


def _table_cells(table: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The comparison table as the round printed it: header and formatted rows."""
    columns = list(dict.fromkeys(c for row in table for c in row if c not in ("role", "model")))
    rows = [
        [row["role"], row["model"], *(f"{row[c]:.4f}" if c in row else "–" for c in columns)]
        for row in table
    ]
    return ["role", "model", *columns], rows


def report_html(page: RoundPage) -> str:
    """The page: the comparison table as the round printed it, the decision, the budget,
    then the grids (by file name: they lie beside the page)."""
    columns, cells = _table_cells(page.table)
    # a long metric name may break after an underscore: the table then fits the page
    head = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells
    )
    figures = "".join(
        f"<h2>{html.escape(title)}</h2>"
        f"<img src='{html.escape(Path(grid).name)}' alt='{html.escape(title)}'>"
        for title, grid in page.grids.items()
    )
    run_list = "".join(
        f"<li>{html.escape(role)}: <code>{html.escape(run)}</code></li>"
        for role, run in page.runs.items()
    )
    n = page.round_number
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>xbl round {n}</title>
<style>body{{font-family:sans-serif;max-width:{PAGE_WIDTH}px;margin:1em auto;padding:0 12px;
box-sizing:border-box}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
img{{max-width:100%}}</style></head><body>
<h1>Round {n}</h1>
<p><b>Promotion: {_verdict(page.promotion)}</b> — {html.escape(page.promotion["reason"])}</p>
<table><tr>{head}</tr>{rows}</table>
<p>{html.escape(_budget_line(page.budget))}</p>
{"".join(f"<p>{html.escape(line)}</p>" for line in _annotator_lines(page.annotators))}
<ul>{run_list}</ul>
{figures}
</body></html>
"""


def page_height(page: RoundPage) -> int:
    """A generous height in pixels for the HTML page at PAGE_WIDTH (a browser window must be
    at least as tall as the page; the white below is cropped afterwards)."""
    from PIL import Image

    body = PAGE_WIDTH - 20
    height = 320 + 30 * (len(page.table) + 1) + 24 * len(page.runs)
    for grid in page.grids.values():
        with Image.open(grid) as img:
            height += 70 + img.height * min(1.0, body / img.width)
    return int(height * 1.1) + 100


def crop_white_bottom(path: Path, margin_px: int = 16) -> None:
    """Cut the blank rows below the content of a PNG."""
    from PIL import Image, ImageChops

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).getbbox()
    if box and box[3] + margin_px < rgb.height:
        rgb.crop((0, 0, rgb.width, box[3] + margin_px)).save(path, optimize=True)


def report_figure(page: RoundPage, png: Path) -> Path:
    """The page's content as one PNG, drawn with matplotlib (where no browser can render the
    HTML): title, decision, comparison table, budget, runs, then each saliency grid."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    images = {title: imread(grid) for title, grid in page.grids.items() if Path(grid).is_file()}
    head, rows = _table_cells(page.table)
    wrapped = [textwrap.fill(line, 150) for line in _figure_lines(page)]
    text_px = 70 + 18 * sum(w.count("\n") + 1 for w in wrapped)
    table_px = 26 * (len(rows) + 1) + 20
    image_px = [min(1.0, PAGE_WIDTH / img.shape[1]) * img.shape[0] for img in images.values()]
    heights = [text_px, table_px, *(h for px in image_px for h in (GRID_TITLE_PX, px))]
    fig = plt.figure(figsize=(PAGE_WIDTH / FIGURE_DPI, sum(heights) / FIGURE_DPI), dpi=FIGURE_DPI)
    spec = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.0)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.995, bottom=0.005)
    _draw_heading(fig.add_subplot(spec[0]), page.round_number, wrapped, text_px)
    _draw_table(fig.add_subplot(spec[1]), head, rows, table_px)
    for k, (title, img) in enumerate(images.items()):
        _draw_grid(fig.add_subplot(spec[2 + 2 * k]), fig.add_subplot(spec[3 + 2 * k]), title, img)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=FIGURE_DPI, facecolor="white")
    plt.close(fig)
    return png


def _figure_lines(page: RoundPage) -> list[str]:
    """The page's text in the picture: the decision, the budget, the runs."""
    return [
        f"Promotion: {_verdict(page.promotion)} — {page.promotion['reason']}",
        _budget_line(page.budget),
        *_annotator_lines(page.annotators),
        *(f"{role}: {run}" for role, run in page.runs.items()),
    ]


def _annotator_lines(record: dict | None) -> list[str]:
    """Several annotators' agreement and the answers left out, when there are any."""
    if not record:
        return []
    lines = []
    shared = record.get("tasks_with_several_annotators", 0)
    if shared:
        iou = record.get("mean_ignore_iou")
        lines.append(
            f"Annotators: {shared} task(s) answered by several; mean IoU of their ignore marks "
            f"{iou:.2f}; {record.get('agree_on_nothing', 0)} agree and "
            f"{record.get('disagree_on_nothing', 0)} disagree on nothing to ignore; the union "
            "of their marks trains"
        )
    unreadable = record.get("unreadable", [])
    if unreadable:
        tasks = ", ".join(str(u["task_id"]) for u in unreadable)
        lines.append(f"{len(unreadable)} annotation(s) could not be read, left out: task {tasks}")
    return lines


def _draw_heading(ax, round_number: int, wrapped: list[str], text_px: int) -> None:
    ax.axis("off")
    ax.text(0, 1, f"Round {round_number}", fontsize=20, weight="bold", va="top")
    ax.text(0, 1 - 45 / text_px, "\n".join(wrapped), fontsize=10, va="top", linespacing=1.5)


def _draw_table(ax, head: list[str], rows: list[list[str]], table_px: int) -> None:
    """The comparison table, each column as wide as its longest cell."""
    ax.axis("off")
    chars = [max(len(str(r[c])) for r in [head, *rows]) + 4 for c in range(len(head))]
    shown = ax.table(
        cellText=rows,
        colLabels=head,
        colWidths=[c / sum(chars) for c in chars],
        cellLoc="left",
        bbox=[0, 20 / table_px, 1, 1 - 20 / table_px],
    )
    shown.auto_set_font_size(False)
    shown.set_fontsize(8)
    for (r, _), cell in shown.get_celld().items():
        cell.set_edgecolor("#cccccc")
        if r == 0:
            cell.set_text_props(weight="bold")


def _draw_grid(title_ax, image_ax, title: str, image: np.ndarray) -> None:
    title_ax.axis("off")
    title_ax.text(0, 0.2, title, fontsize=14, weight="bold", va="bottom")
    image_ax.imshow(image, interpolation="lanczos")
    image_ax.set_anchor("W")
    image_ax.axis("off")
