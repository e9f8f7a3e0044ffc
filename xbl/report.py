"""The round report: one page a reviewer reads at a glance. What the models are, how they
compare, where each looks (before and after, on the round's queries and on a fixed probe set of
held-out images), what the annotations cost, and why the champion is who it is.

MLflow cannot compare images across runs, so the saliency grids are drawn here, every model's
maps side by side on the same images.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib
import numpy as np
from torch import nn

from xbl.data import AUDIT, PreparedData, to_tensor
from xbl.saliency import deeplift_blurred
from xbl.training_loop import predict_proba

PROBES = 8  # held-out images shown every round


def probe_indices(data: PreparedData, n: int = PROBES) -> np.ndarray:
    """The same held-out images every round (audit, else test), so rounds compare: a fixed
    permutation of the split, the first `n`."""
    split = AUDIT if len(data.indices(AUDIT)) else "test"
    idx = data.indices(split)
    return np.sort(np.random.default_rng(0).permutation(idx)[:n])


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


def report_html(
    round_number: int,
    table: list[dict],
    promotion: dict,
    budget: dict,
    grids: dict[str, str],
    runs: dict[str, str],
) -> str:
    """The page: the comparison table as the round printed it, the decision, the budget,
    then the grids (file names beside the page)."""
    columns = list(dict.fromkeys(c for row in table for c in row if c not in ("role", "model")))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["role", "model", *columns])
    rows = "".join(
        "<tr>"
        + f"<td>{html.escape(row['role'])}</td><td>{html.escape(row['model'])}</td>"
        + "".join(f"<td>{row[c]:.4f}</td>" if c in row else "<td>–</td>" for c in columns)
        + "</tr>"
        for row in table
    )
    verdict = "candidate promoted" if promotion["promoted"] else "champion kept"
    figures = "".join(
        f"<h2>{html.escape(title)}</h2><img src='{html.escape(name)}' alt='{html.escape(title)}'>"
        for title, name in grids.items()
    )
    run_list = "".join(
        f"<li>{html.escape(role)}: <code>{html.escape(run)}</code></li>"
        for role, run in runs.items()
    )
    minutes = budget["annotator_seconds"] / 60
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>xbl round {round_number}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
img{{max-width:100%}}</style></head><body>
<h1>Round {round_number}</h1>
<p><b>Promotion: {verdict}</b> — {html.escape(promotion["reason"])}</p>
<table><tr>{head}</tr>{rows}</table>
<p>Annotation budget so far: {budget["answers"]} answers, {minutes:.1f} annotator minutes
(Label Studio's lead time; 0 for simulated answers).</p>
<ul>{run_list}</ul>
{figures}
</body></html>
"""
