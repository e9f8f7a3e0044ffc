"""Several annotators on one task: their agreement and the conflict rule (xbl/labelstudio/agreement.py)."""

from __future__ import annotations

import numpy as np
import pytest

from xbl.explain.cells import cells_to_mask
from xbl.labelstudio.agreement import (
    Answer,
    combine,
    mask_iou,
    read_agreement,
    read_round,
    round_agreement,
    task_agreement,
    write_agreement,
)
from xbl.labelstudio.interface import ATTENTION_LABEL, IGNORE_LABEL
from xbl.labelstudio.payloads import cell_rectangle

SIZE, CELL = 28, 4


def mask(*cells) -> np.ndarray:
    return cells_to_mask(list(cells), CELL, SIZE, SIZE)


def answer(who, ignore, keep=None, rating=None, seconds=1.0) -> Answer:
    keep = np.zeros((SIZE, SIZE), bool) if keep is None else keep
    return Answer(who, ignore, keep, rating, seconds)


def rating(value: str) -> dict:
    return {"type": "choices", "from_name": "explanation_rating", "value": {"choices": [value]}}


def result(ignored=(), kept=(), said=None) -> list[dict]:
    regions = [cell_rectangle(r, c, CELL, SIZE, SIZE, IGNORE_LABEL) for r, c in ignored]
    regions += [cell_rectangle(r, c, CELL, SIZE, SIZE, ATTENTION_LABEL) for r, c in kept]
    return regions + ([rating(said)] if said else [])


def task(image_id, *results, task_id=1) -> dict:
    answers = [
        {"annotation_id": 10 + i, "annotator": str(i), "result": r, "lead_time": 2.0}
        for i, r in enumerate(results)
    ]
    return {
        "image_id": image_id,
        "task_id": task_id,
        "height": SIZE,
        "width": SIZE,
        "answers": answers,
    }


def test_iou_of_masks_and_of_two_empty_masks():
    assert mask_iou(mask((0, 0), (0, 1)), mask((0, 1), (0, 2))) == pytest.approx(1 / 3)
    assert mask_iou(mask((0, 0)), mask((6, 6))) == 0.0
    assert mask_iou(mask(), mask()) == 1.0  # both say "nothing to ignore": full agreement


def test_agreement_over_every_pair_and_on_nothing_to_ignore():
    same = task_agreement("a", 1, [answer("1", mask((0, 0))), answer("2", mask((0, 0)))])
    assert (same.annotators, same.ignore_iou, same.agree_on_nothing) == (2, 1.0, True)
    split = task_agreement(
        "b", 2, [answer("1", mask((0, 0))), answer("2", mask()), answer("3", mask((0, 0)))]
    )
    assert split.ignore_iou == pytest.approx((0 + 1 + 0) / 3)
    assert split.agree_on_nothing is False  # one saw nothing to ignore, two saw something


def test_conflicts_train_the_union_of_ignore_and_ignore_wins_over_keep():
    first = answer("1", mask((0, 0)), keep=mask((3, 3), (6, 6)), rating="good", seconds=4)
    second = answer("2", mask((6, 6)), keep=mask((3, 3)), rating="bad", seconds=6)
    nothing = answer("3", mask(), rating="good", seconds=1)
    combined = combine([first, second, nothing])
    np.testing.assert_array_equal(combined.ignore, mask((0, 0), (6, 6)))
    np.testing.assert_array_equal(combined.keep, mask((3, 3)))  # (6, 6) struck by annotator 2
    assert combined.rating == "bad" and combined.seconds == 11.0
    # "nothing to ignore" holds only when everyone says so
    alone = combine([nothing, answer("4", mask(), rating="good")])
    assert not alone.ignore.any() and alone.rating == "good"


def test_round_agreement_summary_counts_only_shared_tasks():
    tasks = [
        task_agreement("a", 1, [answer("1", mask((0, 0))), answer("2", mask((0, 0), (0, 1)))]),
        task_agreement("b", 2, [answer("1", mask()), answer("2", mask((6, 6)))]),
    ]
    summary = round_agreement(tasks)
    assert summary["tasks_with_several_annotators"] == 2
    assert summary["mean_ignore_iou"] == pytest.approx((0.5 + 0.0) / 2)
    assert (summary["agree_on_nothing"], summary["disagree_on_nothing"]) == (1, 1)
    assert [t["task_id"] for t in summary["per_task"]] == [1, 2]
    assert round_agreement([])["mean_ignore_iou"] is None


def test_read_round_combines_annotators_and_records_their_agreement(tmp_path):
    read = read_round(
        [
            task("two", result([(0, 0)], [(3, 3)], "bad"), result([(6, 6)], said="bad"), task_id=7),
            task("one", result(said="good"), task_id=8),
            task("open", task_id=9),  # no answer yet: nothing for it
        ]
    )
    assert set(read) == {"two", "one"} and read.problems == [] and read.unreadable == []
    np.testing.assert_array_equal(read["two"].ignore, mask((0, 0), (6, 6)))
    assert not read["one"].ignore.any()  # a readable answer that marks nothing
    assert [(t.task_id, t.ignore_iou) for t in read.agreement] == [(7, 0.0)]
    write_agreement(tmp_path, read)
    saved = read_agreement(tmp_path / "manifest.csv")
    assert saved["tasks_with_several_annotators"] == 1 and saved["unreadable"] == []


def test_an_unreadable_answer_is_reported_and_left_out_never_nothing_to_ignore():
    broken = [{**cell_rectangle(0, 0, CELL, SIZE, SIZE, IGNORE_LABEL), "value": {"x": "left"}}]
    read = read_round(
        [
            task("bad", broken, task_id=3),
            task("half", result([(0, 0)]), broken, task_id=4),  # the other annotator still counts
            task("junk", ["not a region", 7], "not a result", task_id=5),
        ]
    )
    assert "bad" not in read and "junk" not in read  # not an empty W: no mask at all
    np.testing.assert_array_equal(read["half"].ignore, mask((0, 0)))
    assert [(u["task_id"], u["annotation_id"]) for u in read.unreadable] == [
        (3, 10),
        (4, 11),
        (5, 10),
        (5, 11),
    ]
    assert all("cannot be read" in p and "task" in p for p in read.problems)
    assert read.agreement == []  # one readable answer: nothing to compare


def test_a_bad_region_beside_good_ones_is_reported_and_the_rest_kept():
    broken = {**cell_rectangle(6, 6, CELL, SIZE, SIZE, IGNORE_LABEL), "value": {"x": "left"}}
    read = read_round([task("img", [*result([(0, 0)]), broken], task_id=5)])
    np.testing.assert_array_equal(read["img"].ignore, mask((0, 0)))
    assert read.unreadable == [] and len(read.problems) == 1 and "task 5" in read.problems[0]
