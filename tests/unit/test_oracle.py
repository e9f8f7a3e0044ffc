"""xbl/labelstudio/oracle.py: the simulated annotator and reviewer, perfect and imperfect (no server)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from xbl.data.prepared import PreparedData
from xbl.explain.cells import cells_to_mask
from xbl.labelstudio.oracle import (
    Oracle,
    imperfect_marks,
    imperfect_verdict,
    oracle_accepts,
    oracle_annotation,
    oracle_ignore_cells,
    oracle_marks,
    oracle_seconds,
    relevance_lookup,
)
from xbl.labelstudio.payloads import encode_mask
from xbl.labelstudio.results import annotation_to_mask, applies_to, review_verdict

SIZE, CELL = 28, 4
SECONDS = {"task": 8.0, "region": 2.0, "montage": 10.0, "review": 3.0}


def digit() -> np.ndarray:
    """The true evidence: cells (2..4, 2..4), plus a pixel of (0, 0) and a row of (1, 2)."""
    relevance = np.zeros((SIZE, SIZE), bool)
    relevance[8:20, 8:20] = True
    relevance[0, 0] = True  # 1 of 16 pixels of cell (0, 0): below a 0.1 overlap
    relevance[7, 8:12] = True  # 4 of 16 pixels of cell (1, 2): overlap 0.25
    return relevance


def prepared(n: int = 5) -> PreparedData:
    """Each image's relevance mask different (image j: its first j+1 rows), ids out of order."""
    relevance = np.zeros((n, SIZE, SIZE), bool)
    for j in range(n):
        relevance[j, : j + 1] = True
    return PreparedData(
        images=np.zeros((n, 1, SIZE, SIZE), np.uint8),
        labels=np.arange(n) % 2,
        split=np.array(["train"] * n),
        relevance=relevance,
        confounder=~relevance,
        ids=np.array([f"img-{n - j}" for j in range(n)]),
        classes=np.array(["0", "1"]),
    )


class CountingRows:
    """A relevance array that counts the rows read."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.read = rows, []

    def __getitem__(self, i):
        self.read.append(i)
        return self.rows[i]


# --- what it knows ----------------------------------------------------------------------------


def test_the_relevance_lookup_gives_each_image_its_own_mask():
    data = prepared()
    lookup = relevance_lookup(data)
    assert sorted(lookup) == sorted(str(i) for i in data.ids)
    for position, image_id in enumerate(data.ids):
        np.testing.assert_array_equal(lookup[str(image_id)], data.relevance[position])


def test_the_relevance_lookup_holds_only_the_asked_images_the_data_has():
    lookup = relevance_lookup(prepared(), ["img-2", "img-9", "img-4"])
    assert set(lookup) == {"img-2", "img-4"} and len(lookup) == 2
    assert "img-9" not in lookup and "img-1" not in lookup
    np.testing.assert_array_equal(lookup["img-2"], prepared().relevance[3])


def test_the_relevance_lookup_reads_a_mask_only_when_looked_at():
    data = prepared()
    data.relevance = CountingRows(data.relevance)
    lookup = relevance_lookup(data)
    assert "img-3" in lookup and data.relevance.read == []
    lookup["img-3"]
    assert data.relevance.read == [2]


def test_the_relevance_lookup_reads_prepared_data_from_disk(tmp_path):
    data = prepared()
    data.save(tmp_path / "prepared")
    lookup = relevance_lookup(PreparedData.load(tmp_path / "prepared"), ["img-5"])
    np.testing.assert_array_equal(lookup["img-5"], data.relevance[0])


# --- what it marks ----------------------------------------------------------------------------


def test_oracle_ignores_the_shown_cells_off_the_relevance_mask():
    relevance = digit()
    shown = [(0, 0), (3, 3), (6, 6), (1, 2)]  # (1, 2): overlap 0.25
    assert oracle_ignore_cells(shown, CELL, relevance, 0.1) == [(0, 0), (6, 6)]
    assert oracle_ignore_cells(shown, CELL, relevance, 0.3) == [(0, 0), (6, 6), (1, 2)]
    result = oracle_annotation(shown, CELL, SIZE, SIZE, relevance, 0.1)
    labels = {
        r["id"]: r["value"].get("rectanglelabels") for r in result if r["type"] == "rectanglelabels"
    }
    assert labels == {
        "cell-0-0": ["ignore"],
        "cell-3-3": ["model attention"],
        "cell-6-6": ["ignore"],
        "cell-1-2": ["model attention"],
    }
    mask, kept, rating, problems = annotation_to_mask(result, SIZE, SIZE)
    np.testing.assert_array_equal(mask, cells_to_mask([(0, 0), (6, 6)], CELL, SIZE, SIZE))
    np.testing.assert_array_equal(kept, cells_to_mask([(3, 3), (1, 2)], CELL, SIZE, SIZE))
    assert rating == "bad" and problems == []


def test_oracle_rates_an_explanation_on_the_evidence_good():
    relevance = np.ones((SIZE, SIZE), bool)
    mask, kept, rating, _ = annotation_to_mask(
        oracle_annotation([(2, 2)], CELL, SIZE, SIZE, relevance, 0.1), SIZE, SIZE
    )
    assert not mask.any() and rating == "good"
    np.testing.assert_array_equal(kept, cells_to_mask([(2, 2)], CELL, SIZE, SIZE))


def test_a_cell_outside_the_image_is_never_marked():
    nothing_known = np.zeros((SIZE, SIZE), bool)
    assert oracle_ignore_cells([(7, 0), (0, 9)], CELL, nothing_known, 0.1) == []


def test_the_many_image_form_marks_what_the_one_image_form_marks():
    rng = np.random.default_rng(0)
    relevance = rng.random((6, SIZE, SIZE)) < rng.random((6, 1, 1))
    shown = rng.integers(0, 8, (6, 5, 2))  # row or column 7: outside the 28-px image
    marks = oracle_marks(shown, CELL, relevance, 0.3)
    assert marks.shape == (6, 5) and marks.dtype == bool
    for cells, mask, row in zip(shown, relevance, marks):
        ignored = set(oracle_ignore_cells(cells.tolist(), CELL, mask, 0.3))
        assert row.tolist() == [(int(r), int(c)) in ignored for r, c in cells]
    assert marks.any() and not marks.all()
    assert oracle_marks(np.zeros((0, 5, 2), int), CELL, relevance[:0], 0.3).shape == (0, 5)


# --- the imperfect annotator ------------------------------------------------------------------


def test_a_wrong_annotator_only_adds_marks_and_an_incomplete_one_only_drops_them():
    marks = np.random.default_rng(1).random((50, 8)) < 0.4
    wrong = imperfect_marks(marks, "wrong", 0.3, seed=2)
    incomplete = imperfect_marks(marks, "incomplete", 0.3, seed=2)
    assert (wrong >= marks).all() and (wrong > marks).any()
    assert (incomplete <= marks).all() and (incomplete < marks).any()
    np.testing.assert_array_equal(imperfect_marks(marks, "wrong", 0.0, 2), marks)
    assert imperfect_marks(marks, "wrong", 1.0, 2).all()
    assert not imperfect_marks(marks, "incomplete", 1.0, 2).any()


def test_a_higher_rate_spoils_a_superset_and_the_seed_fixes_the_draws():
    marks = np.zeros((40, 8), bool)
    low, high = (imperfect_marks(marks, "wrong", rate, seed=5) for rate in (0.1, 0.5))
    assert (high >= low).all() and high.sum() > low.sum()
    np.testing.assert_array_equal(low, imperfect_marks(marks, "wrong", 0.1, seed=5))
    assert not np.array_equal(low, imperfect_marks(marks, "wrong", 0.1, seed=6))


def test_an_unknown_imperfection_is_refused():
    with pytest.raises(ValueError, match="unknown imperfection 'sloppy'"):
        imperfect_marks(np.zeros((1, 1), bool), "sloppy", 0.1, 0)
    with pytest.raises(ValueError, match="unknown imperfection 'perfect'"):
        imperfect_verdict(True, "perfect", 0.1, np.random.default_rng(0))


# --- the reviewer -----------------------------------------------------------------------------


def test_the_reviewer_accepts_a_mask_at_most_max_overlap_on_the_evidence():
    relevance = np.zeros((10, 10), bool)
    relevance[0, :1] = True  # 1 of the 10 mask pixels below lies on the evidence
    mask = np.zeros((10, 10), bool)
    mask[0] = True
    assert oracle_accepts(mask, relevance, 0.1)  # exactly 0.1: at most, so accepted
    assert not oracle_accepts(mask, relevance, 0.09)
    assert not oracle_accepts(np.zeros((10, 10), bool), relevance, 1.0)  # nothing to accept


def test_an_imperfect_reviewer_errs_in_its_annotators_direction():
    def verdicts(accept, kind, rate):
        rng = np.random.default_rng(3)
        return [imperfect_verdict(accept, kind, rate, rng) for _ in range(200)]

    assert all(verdicts(False, "wrong", 1.0)) and not any(verdicts(False, "wrong", 0.0))
    assert 20 < sum(verdicts(False, "wrong", 0.3)) < 100
    assert all(verdicts(True, "wrong", 1.0))  # it never rejects a good mask
    assert not any(verdicts(True, "incomplete", 1.0)) and all(verdicts(True, "incomplete", 0.0))
    assert not any(verdicts(False, "incomplete", 1.0))  # it never accepts a bad one


def test_an_imperfect_reviewer_draws_only_for_a_verdict_it_could_spoil():
    rng, twin = np.random.default_rng(4), np.random.default_rng(4)
    imperfect_verdict(True, "wrong", 0.5, rng)
    imperfect_verdict(False, "incomplete", 0.5, rng)
    assert rng.random() == twin.random()


def test_the_time_model_counts_the_actions():
    assert oracle_seconds(SECONDS, "image", relabelled=3) == 8 + 3 * 2
    assert oracle_seconds(SECONDS, "cluster", relabelled=1) == 8 + 2 + 10
    assert oracle_seconds(SECONDS, "review") == 3


# --- the annotator of a round, as Label Studio meets it ---------------------------------------


def task(image_id: str, cells, **extra) -> dict:
    return {
        "image_id": image_id,
        "task_id": 7,
        "cell": CELL,
        "height": SIZE,
        "width": SIZE,
        "cells": cells,
        **extra,
    }


def test_an_image_task_gets_the_cells_off_the_evidence_and_the_modelled_seconds():
    oracle = Oracle({"a": digit()}, 0.1, seconds=SECONDS)
    result, lead = oracle.annotate(task("a", [(0, 0), (3, 3), (6, 6)]))
    mask, _, rating, _ = annotation_to_mask(result, SIZE, SIZE)
    np.testing.assert_array_equal(mask, cells_to_mask([(0, 0), (6, 6)], CELL, SIZE, SIZE))
    assert rating == "bad" and applies_to(result) is None
    assert lead == 8 + 2 * 2


def test_a_cluster_task_says_whom_the_answer_applies_to():
    oracle = Oracle({"a": digit()}, 0.1, scope="review", seconds=SECONDS)
    marked, lead = oracle.annotate(task("a", [(0, 0)], members=["a", "b"]))
    assert applies_to(marked) == "review" and lead == 8 + 2 + 10
    on_evidence, _ = oracle.annotate(task("a", [(3, 3)], members=["a", "b"]))
    assert applies_to(on_evidence) == "none"


def test_without_a_time_model_an_answer_takes_no_time():
    assert Oracle({"a": digit()}, 0.1).annotate(task("a", [(0, 0)]))[1] == 0.0


def test_a_task_without_cells_or_with_an_unknown_image_stays_open(caplog):
    oracle = Oracle({"a": digit()}, 0.1)
    assert oracle.annotate(task("a", None)) is None  # no prediction: nothing shown
    with caplog.at_level(logging.WARNING, logger="xbl.labelstudio.oracle"):
        assert oracle.annotate(task("zz", [(0, 0)])) is None
    assert "no relevance mask for image zz (task 7)" in caplog.text


def test_a_review_task_is_accepted_off_the_evidence_and_rejected_on_it():
    reviewer = Oracle({"m": digit()}, 0.1, seconds=SECONDS)
    off = cells_to_mask([(6, 6)], CELL, SIZE, SIZE)
    on = cells_to_mask([(3, 3)], CELL, SIZE, SIZE)
    accepted, lead = reviewer.review(task("m", None, mask=encode_mask(off)))
    assert review_verdict(accepted) is True and lead == 3
    rejected, _ = reviewer.review(task("m", None, mask=encode_mask(on)))
    assert review_verdict(rejected) is False
    assert reviewer.review(task("other", None, mask=encode_mask(off))) is None
