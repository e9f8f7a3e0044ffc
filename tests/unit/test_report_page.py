"""The round report's page, drawn with no service running: what it shows (the decision, the
table as the round printed it, the budget, the runs, the grids), the same probes every round,
and a picture as wide as the page."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.toy_models import CornerNet
from xbl.data.prepared import AUDIT, PreparedData
from xbl.report.page import (
    PAGE_WIDTH,
    PROBES,
    PROBES_TITLE,
    QUERIES_SHOWN,
    QUERIES_TITLE,
    RoundPage,
    cost_columns,
    crop_white_bottom,
    page_height,
    probe_indices,
    report_figure,
    report_html,
    round_grids,
)

TABLE = [
    {"role": "baseline = champion", "model": "baseline", "audit_accuracy": 0.75},
    {"role": "candidate", "model": "feedback-round-2", "audit_accuracy": 0.947, "test": 0.9581},
]
PROMOTION = {"promoted": True, "reason": "audit accuracy 0.947 > 0.750 <script>"}
BUDGET = {"answers": 50, "annotator_seconds": 90.0}
RUNS = {"baseline = champion": "a" * 32, "candidate": "<b>"}


def a_page(grids: dict[str, Path] | None = None, **changes) -> RoundPage:
    fields = dict(
        round_number=2, table=TABLE, promotion=PROMOTION, budget=BUDGET, grids={}, runs=RUNS
    )
    return RoundPage(**{**fields, "grids": grids or {}, **changes})


def tiny_data(splits: list[str], size: int = 28) -> PreparedData:
    n = len(splits)
    rng = np.random.default_rng(0)
    confounder = np.zeros((n, size, size), dtype=bool)
    confounder[:, :4, :4] = True
    return PreparedData(
        images=rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8),
        labels=np.arange(n) % 3,
        split=np.array(splits),
        relevance=~confounder,
        confounder=confounder,
        ids=np.array([f"img-{i}" for i in range(n)]),
        classes=np.array(["0", "1", "2"]),
    )


def noise_png(path: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 128, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_the_page_states_the_decision_and_escapes_what_it_quotes():
    page = report_html(a_page())

    assert "<b>Promotion: candidate promoted</b>" in page
    assert html.escape(PROMOTION["reason"]) in page and "<script>" not in page
    assert "<code>&lt;b&gt;</code>" in page  # a run id is text, never markup
    kept = report_html(a_page(promotion={"promoted": False, "reason": "no gain"}))
    assert "Promotion: champion kept" in kept


def test_several_annotators_and_unreadable_answers_are_shown_only_when_there_are_some():
    quiet = report_html(a_page(annotators={"tasks_with_several_annotators": 0, "unreadable": []}))
    assert "Annotators:" not in quiet and "could not be read" not in quiet
    record = {
        "tasks_with_several_annotators": 3,
        "mean_ignore_iou": 0.625,
        "agree_on_nothing": 2,
        "disagree_on_nothing": 1,
        "unreadable": [{"task_id": 17, "image_id": "a.png", "reason": "value is a string"}],
    }
    page = report_html(a_page(annotators=record))
    assert "3 task(s) answered by several; mean IoU of their ignore marks 0.62" in page
    assert "2 agree and 1 disagree on nothing to ignore" in page
    assert "1 annotation(s) could not be read, left out: task 17" in page


def test_the_table_has_the_rounds_own_columns_and_marks_what_a_model_lacks():
    page = report_html(a_page())

    header = re.findall(r"<th>(.*?)</th>", page)
    assert [h.replace("_<wbr>", "_") for h in header] == ["role", "model", "audit_accuracy", "test"]
    cells = re.findall(r"<td>(.*?)</td>", page)
    assert cells[:4] == ["baseline = champion", "baseline", "0.7500", "–"]
    assert cells[4:] == ["candidate", "feedback-round-2", "0.9470", "0.9581"]


def test_the_budget_counts_minutes_and_names_reviews_only_when_there_were_some():
    plain = report_html(a_page())
    reviewed = report_html(a_page(budget={**BUDGET, "reviews": 7}))

    assert "50 answers, 1.5 annotator minutes" in plain and "reviews" not in plain
    assert "50 answers, 7 reviews, 1.5 annotator minutes" in reviewed


def test_the_grids_are_shown_in_order_by_the_name_of_the_file_beside_the_page(tmp_path):
    grids = {"Queries <1>": tmp_path / "queries.png", PROBES_TITLE: tmp_path / "probes.png"}
    page = report_html(a_page(grids))

    shown = re.findall(r"<h2>(.*?)</h2><img src='(.*?)' alt='(.*?)'>", page)
    assert shown == [
        ("Queries &lt;1&gt;", "queries.png", "Queries &lt;1&gt;"),
        (PROBES_TITLE, "probes.png", PROBES_TITLE),
    ]


def test_the_page_is_as_wide_as_its_picture():
    assert f"max-width:{PAGE_WIDTH}px" in report_html(a_page())


def test_an_annotator_minute_buys_the_audit_gain_over_the_baseline():
    table = [
        {"role": "baseline = champion", "audit_accuracy": 0.70, "annotator_seconds": 0.0},
        {"role": "candidate", "audit_accuracy": 0.80, "annotator_seconds": 120.0},
    ]
    rows = cost_columns(table)

    assert "audit_gain_per_annotator_minute" not in rows[0]
    assert rows[1]["audit_gain_per_annotator_minute"] == pytest.approx(0.05)
    assert "audit_gain_per_annotator_minute" not in cost_columns(table[1:])[0]  # no baseline


def test_the_probes_are_the_same_audit_images_every_round():
    data = tiny_data(["train"] * 5 + [AUDIT] * 20 + ["test"] * 5)

    probes = probe_indices(data)

    assert len(probes) == PROBES and set(data.split[probes]) == {AUDIT}
    assert list(probes) == sorted(probes)
    np.testing.assert_array_equal(probes, probe_indices(data))


def test_without_an_audit_split_the_probes_come_from_test():
    data = tiny_data(["train"] * 5 + ["test"] * 3)

    assert set(data.split[probe_indices(data)]) == {"test"}
    assert len(probe_indices(data)) == 3


def test_a_round_shows_its_first_queries_then_the_probes(tmp_path):
    data = tiny_data(["train"] * 12 + [AUDIT] * 10)
    models = {"baseline": CornerNet(), "candidate": CornerNet()}

    grids = round_grids(models, data, list(range(12)), tmp_path)

    assert list(grids) == [QUERIES_TITLE, PROBES_TITLE]
    with Image.open(grids[QUERIES_TITLE]) as queries, Image.open(grids[PROBES_TITLE]) as probes:
        # one row of 1.6 in at 90 dpi per image; columns: the image, then each model
        assert queries.size == (round(1.6 * 3 * 90), round(1.6 * QUERIES_SHOWN * 90))
        assert probes.size == (round(1.6 * 3 * 90), round(1.6 * PROBES * 90))


def test_a_round_without_queries_shows_the_probes_alone(tmp_path):
    data = tiny_data(["train"] * 2 + [AUDIT] * 10)

    grids = round_grids({"baseline": CornerNet()}, data, None, tmp_path)

    assert list(grids) == [PROBES_TITLE] and not (tmp_path / "queries.png").exists()


def test_the_browser_window_is_taller_than_the_grids_it_must_hold(tmp_path):
    one = a_page({"a": noise_png(tmp_path / "a.png", 400, 1200)})
    two = a_page({"a": tmp_path / "a.png", "b": noise_png(tmp_path / "b.png", 2200, 1000)})

    assert page_height(one) > 1200
    # a grid wider than the page is shown at the page's width: 1000 px scaled down
    assert page_height(two) > 1200 + 1000 * (PAGE_WIDTH - 20) / 2200
    assert page_height(two) > page_height(one)


def test_the_picture_is_as_wide_as_the_page_and_skips_a_grid_not_drawn(tmp_path):
    grids = {"drawn": noise_png(tmp_path / "a.png", 400, 600), "lost": tmp_path / "missing.png"}

    png = report_figure(a_page(grids), tmp_path / "report.png")

    with Image.open(png) as img:
        width, height = img.size
    assert width == PAGE_WIDTH and 600 < height < 1200


def test_cropping_keeps_the_content_and_a_margin_below_it(tmp_path):
    png = tmp_path / "page.png"
    img = Image.new("RGB", (100, 500), "white")
    img.paste((0, 0, 0), (10, 10, 90, 200))
    img.save(png)

    crop_white_bottom(png, margin_px=16)

    with Image.open(png) as cropped:
        assert cropped.size == (100, 216)
        assert cropped.getpixel((50, 199)) == (0, 0, 0)
    crop_white_bottom(png, margin_px=16)  # nothing more to cut
    with Image.open(png) as again:
        assert again.size == (100, 216)
