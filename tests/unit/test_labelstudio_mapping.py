"""xbl/labelstudio/interface.py: config, payloads, pre-drawn cells and annotations -> masks (no server)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from xbl.explain.cells import cells_to_mask
from xbl.labelstudio.interface import (
    ATTENTION_LABEL,
    BRUSH_NAME,
    IGNORE_LABEL,
    IMAGE_NAME,
    labeling_config,
    validate_labeling_config,
)
from xbl.labelstudio.payloads import cell_predictions, cells_from_prediction, task_payload
from xbl.labelstudio.results import annotation_to_mask, decode_rle, masks_from_annotations


def encode_rle(values, word_size=8, run_sizes=(3, 4, 8, 16)) -> list[int]:
    """Test-side encoder of Label Studio's brush RLE (thi.ng rle-pack), with literal chunks
    (several different values after one header) as well as repeated runs."""
    bits: list[int] = []

    def put(value: int, n: int) -> None:
        bits.extend((value >> (n - 1 - k)) & 1 for k in range(n))

    def put_length(n: int) -> None:  # n = run length - 1
        index = next(i for i, size in enumerate(run_sizes) if n < 1 << size)
        put(index, 2)
        put(n, run_sizes[index])

    def flush(literal: list[int]) -> None:
        if literal:
            put(0, 1)
            put_length(len(literal) - 1)
            for value in literal:
                put(int(value), word_size)
            literal.clear()

    put(len(values), 32)
    put(word_size - 1, 5)
    for size in run_sizes:
        put(size - 1, 4)
    literal: list[int] = []
    i, limit = 0, 1 << run_sizes[-1]
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i] and j - i < limit:
            j += 1
        if j - i > 1:
            flush(literal)
            put(1, 1)
            put_length(j - i - 1)
            put(int(values[i]), word_size)
        else:
            literal.append(values[i])
            if len(literal) == limit:
                flush(literal)
        i = j
    flush(literal)
    bits += [0] * (-len(bits) % 8)
    return [int("".join(map(str, bits[k : k + 8])), 2) for k in range(0, len(bits), 8)]


def rgba_of(mask: np.ndarray) -> np.ndarray:
    """A brush layer as Label Studio stores it: RGBA bytes, alpha 255 where painted."""
    rgba = np.zeros(mask.shape + (4,), dtype=np.uint8)
    rgba[mask] = (214, 39, 40, 255)
    return rgba.ravel()


def brush_region(mask: np.ndarray, rle: list[int], label: str = IGNORE_LABEL) -> dict:
    return {
        "id": "paint",
        "from_name": BRUSH_NAME,
        "to_name": IMAGE_NAME,
        "type": "brushlabels",
        "original_height": mask.shape[0],
        "original_width": mask.shape[1],
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def relabel(result: list[dict], label: str) -> list[dict]:
    return [{**r, "value": {**r["value"], "rectanglelabels": [label]}} for r in result]


QUERY = {
    "image_id": "train-17",
    "image_url": "/data/upload/1/a.png",
    "overlay_url": "/data/upload/1/b.png",
    "true_label": 3,
    "predicted_label": 8,
    "entropy": 1.23456,
    "round": 2,
    "cells": [(0, 0), (6, 6)],
    "cell": 4,
    "height": 28,
    "width": 28,
}


def test_labeling_config_parses_and_has_what_the_annotator_needs():
    root = ET.fromstring(labeling_config())
    images = {tag.get("name"): tag.get("value") for tag in root.iter("Image")}
    assert images == {"image": "$image", "overlay": "$overlay"}
    rect = root.find(".//RectangleLabels")
    assert rect.get("toName") == "image"
    assert {label.get("value") for label in rect.iter("Label")} == {"ignore", "model attention"}
    brush = root.find(".//BrushLabels")  # paint what to ignore, or paint the evidence
    assert {label.get("value") for label in brush.iter("Label")} == {"ignore", "model attention"}
    rating = root.find(".//Choices[@name='explanation_rating']")
    assert {choice.get("value") for choice in rating.iter("Choice")} == {"good", "bad"}
    assert root.find(".//TextArea") is not None
    assert root.find(".//Text").get("value") == "$summary"
    assert validate_labeling_config(labeling_config()) == []
    assert validate_labeling_config("<View><Image name='image' value='$image'/></View>")


def test_label_studio_accepts_the_predictions_for_this_config():
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(labeling_config())
    prediction = cell_predictions(QUERY["cells"], 4, 28, 28, "model-3")
    assert interface.validate_prediction(prediction, return_errors=True) == []
    evidence = np.zeros((28, 28), bool)
    evidence[5:9, 5:9] = True
    painted = brush_region(evidence, encode_rle(rgba_of(evidence).tolist()), ATTENTION_LABEL)
    painted = {**prediction, "result": [painted]}  # the evidence, painted by the annotator
    assert interface.validate_prediction(painted, return_errors=True) == []


def test_task_payload_carries_ids_labels_entropy_and_urls():
    data = task_payload(QUERY)["data"]
    assert data["image_id"] == "train-17" and data["round"] == 2
    assert (data["image"], data["overlay"]) == (QUERY["image_url"], QUERY["overlay_url"])
    assert (data["true_label"], data["predicted_label"]) == ("3", "8")
    assert data["entropy"] == pytest.approx(1.23456)
    assert "true label 3" in data["summary"] and "predicted 8" in data["summary"]
    assert "1.235" in data["summary"]


@pytest.mark.parametrize("size, cell", [(28, 4), (224, 28), (30, 4), (7, 3)])
def test_predicted_cells_round_trip_to_exactly_the_cell_mask(size, cell):
    grid = -(-size // cell)  # edge cells of a size not divisible by cell are clipped
    cells = [(0, 0), (grid - 1, grid - 1), (grid // 2, 0), (1, grid - 1)]
    prediction = cell_predictions(cells, cell, size, size, "m")
    assert prediction["model_version"] == "m"
    for region in prediction["result"]:
        assert region["value"]["rectanglelabels"] == ["model attention"]
        assert (region["original_width"], region["original_height"]) == (size, size)
    left, kept, _, problems = annotation_to_mask(prediction["result"], size, size)
    assert not left.any() and problems == []  # "model attention" = the annotator left it ...
    np.testing.assert_array_equal(kept, cells_to_mask(cells, cell, size, size))  # ... as evidence
    mask, kept, _, problems = annotation_to_mask(
        relabel(prediction["result"], "ignore"), size, size
    )
    assert problems == [] and not kept.any()
    np.testing.assert_array_equal(mask, cells_to_mask(cells, cell, size, size))
    assert cells_from_prediction(prediction["result"], cell, size, size) == cells


def test_percent_coordinates_do_not_depend_on_the_shown_size():
    """Label Studio may report the upscaled image's size; percent coordinates still map exactly."""
    region = cell_predictions([(2, 3)], 4, 28, 28, "m")["result"][0]
    region = {
        **region,
        "original_width": 224,
        "original_height": 224,
        "value": {**region["value"], "rectanglelabels": ["ignore"]},
    }
    mask = annotation_to_mask([region], 28, 28).ignore
    np.testing.assert_array_equal(mask, cells_to_mask([(2, 3)], 4, 28, 28))


def test_rotated_rectangle_turns_clockwise_about_its_top_left_corner():
    value = {
        "x": 50.0,
        "y": 25.0,
        "width": 25.0,
        "height": 12.5,
        "rotation": 90,
        "rectanglelabels": ["ignore"],
    }
    region = {
        "id": "r",
        "type": "rectanglelabels",
        "from_name": "cells",
        "to_name": "image",
        "value": value,
    }
    mask, _, _, problems = annotation_to_mask([region], 8, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:4, 3:4] = True  # width 2 px now runs down from (x=4, y=2); height 1 px to the left
    assert problems == []
    np.testing.assert_array_equal(mask, expected)


def test_rle_from_label_studios_own_encoder_decodes_exactly():
    from label_studio_sdk.converter.brush import encode_rle as ls_encode_rle

    rng = np.random.default_rng(0)
    mask = np.zeros((28, 28), bool)
    mask[3:11, 5:20] = True
    mask[rng.random((28, 28)) < 0.05] = True  # single pixels give runs of length 1
    rgba = rgba_of(mask)
    np.testing.assert_array_equal(decode_rle(ls_encode_rle(rgba)), rgba)
    painted, _, _, problems = annotation_to_mask([brush_region(mask, ls_encode_rle(rgba))], 28, 28)
    assert problems == []
    np.testing.assert_array_equal(painted, mask)


def test_rle_with_literal_chunks_and_long_runs_decodes_exactly():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.integers(0, 256, 300), np.full(70000, 7), [1, 2, 3], np.zeros(20)])
    np.testing.assert_array_equal(decode_rle(encode_rle(values.tolist())), values)


def test_brush_painted_on_the_upscaled_image_is_resized_to_the_model_input():
    small = np.zeros((28, 28), bool)
    small[4:12, 16:28] = True
    big = np.kron(small, np.ones((4, 4), bool))  # what the annotator painted on the 112 px image
    mask, _, _, problems = annotation_to_mask(
        [brush_region(big, encode_rle(rgba_of(big).tolist()))], 28, 28
    )
    assert problems == []
    np.testing.assert_array_equal(mask, small)


def test_evidence_painted_or_drawn_as_model_attention_is_kept():
    painted = np.zeros((28, 28), bool)
    painted[6:22, 10:16] = True
    drawn = cell_predictions([(1, 5)], 4, 28, 28, "m")["result"][0]  # a box the annotator added
    brush = brush_region(painted, encode_rle(rgba_of(painted).tolist()), ATTENTION_LABEL)
    mask, kept, _, problems = annotation_to_mask([brush, drawn], 28, 28)
    assert problems == [] and not mask.any()
    np.testing.assert_array_equal(kept, painted | cells_to_mask([(1, 5)], 4, 28, 28))


def test_ignore_wins_over_keep_where_they_overlap():
    """A kept cell partly painted "ignore", and a painted evidence stroke with an "ignore" box
    drawn over it: W is what was struck, exactly as without the keep, and keep is the rest."""
    cell = cell_predictions([(3, 3)], 4, 28, 28, "m")["result"]  # left as "model attention"
    painted = np.zeros((28, 28), bool)
    painted[13:15, 0:28] = True  # crosses cell (3, 3) and cell (3, 5)
    strike = brush_region(painted, encode_rle(rgba_of(painted).tolist()))
    evidence = np.zeros((28, 28), bool)
    evidence[20:24, 0:12] = True
    stroke = {
        **brush_region(evidence, encode_rle(rgba_of(evidence).tolist()), ATTENTION_LABEL),
        "id": "evidence",
    }
    box = relabel(cell_predictions([(5, 1)], 4, 28, 28, "m")["result"], "ignore")
    ignored = painted | cells_to_mask([(5, 1)], 4, 28, 28)
    for result in (cell + [strike, stroke] + box, box + [stroke, strike] + cell):  # any order
        mask, kept, _, problems = annotation_to_mask(result, 28, 28)
        assert problems == []
        np.testing.assert_array_equal(mask, ignored)
        expected = (cells_to_mask([(3, 3)], 4, 28, 28) | evidence) & ~ignored
        np.testing.assert_array_equal(kept, expected)
        assert kept[12, 12] and not kept[13, 12] and not kept[20, 4] and kept[20, 0]


def test_masks_from_annotations_give_each_image_its_keep_mask():
    shown = cell_predictions([(2, 2), (4, 4)], 4, 28, 28, "m")["result"]
    annotations = [
        {"image_id": "a", "task_id": 1, "annotation_id": 1, "result": shown},
        {"image_id": "b", "task_id": 2, "annotation_id": 2, "result": relabel(shown, "ignore")},
    ]
    masks, keep, _, problems, _ = masks_from_annotations(annotations, 28, 28)
    assert problems == []
    np.testing.assert_array_equal(keep["a"], cells_to_mask([(2, 2), (4, 4)], 4, 28, 28))
    assert not masks["a"].any() and not keep["b"].any()
    np.testing.assert_array_equal(masks["b"], cells_to_mask([(2, 2), (4, 4)], 4, 28, 28))


def test_empty_result_means_nothing_to_ignore_and_nothing_kept():
    mask, kept, rating, problems = annotation_to_mask([], 28, 28)
    assert mask.shape == kept.shape == (28, 28) and not mask.any() and not kept.any()
    assert rating is None and problems == []


def test_malformed_regions_are_reported_by_name_and_the_rest_is_kept():
    good = relabel(cell_predictions([(1, 1)], 4, 28, 28, "m")["result"], "ignore")
    outside = {
        "id": "far-away",
        "type": "rectanglelabels",
        "from_name": "cells",
        "to_name": "image",
        "value": {
            "x": 150.0,
            "y": 10.0,
            "width": 10.0,
            "height": 10.0,
            "rotation": 0,
            "rectanglelabels": ["ignore"],
        },
    }
    unknown = {
        **good[0],
        "id": "cat-box",
        "value": {**good[0]["value"], "x": 50.0, "rectanglelabels": ["cat"]},
    }
    full = np.ones((28, 28), bool)
    truncated = brush_region(full, encode_rle(rgba_of(full).tolist())[:6])
    rating = {
        "id": "rating",
        "type": "choices",
        "from_name": "explanation_rating",
        "to_name": "image",
        "value": {"choices": ["bad"]},
    }
    mask, kept, got_rating, problems = annotation_to_mask(
        good + [outside, unknown, truncated, rating], 28, 28
    )
    assert not kept.any()  # the unreadable regions add no evidence either
    np.testing.assert_array_equal(mask, cells_to_mask([(1, 1)], 4, 28, 28))
    assert got_rating == "bad"
    assert len(problems) == 3
    assert any("far-away" in p and "outside" in p for p in problems)
    assert any("cat-box" in p and "'cat'" in p for p in problems)
    assert any("paint" in p and "RLE" in p for p in problems)


def test_masks_from_annotations_name_the_task_of_each_problem():
    bad = {
        "id": "r9",
        "type": "rectanglelabels",
        "from_name": "cells",
        "to_name": "image",
        "value": {"x": 0, "y": 0, "width": 10, "height": 10, "rectanglelabels": ["dog"]},
    }
    good = relabel(cell_predictions([(1, 1)], 4, 28, 28, "m")["result"], "ignore")
    annotations = [
        {"image_id": "a", "task_id": 11, "annotation_id": 5, "result": [*good, bad]},
        {"image_id": "b", "task_id": 12, "annotation_id": 6, "result": []},
    ]
    masks, keep, ratings, problems, _ = masks_from_annotations(annotations, 28, 28)
    assert set(masks) == set(keep) == {"a", "b"} and ratings == {"a": None, "b": None}
    np.testing.assert_array_equal(masks["a"], cells_to_mask([(1, 1)], 4, 28, 28))
    assert problems == [
        "task 11 (image a, annotation 5): region r9: unknown label 'dog' "
        "(expected 'ignore' or 'model attention')"
    ]


def test_upload_stems_are_safe_to_serve_and_stay_unique():
    from xbl.labelstudio.payloads import upload_stem

    assert upload_stem("digit-0042") == "digit-0042"  # safe ids are kept
    cat, dog = upload_stem("cat/001.png"), upload_stem("dog/001.png")
    assert cat != dog
    for stem in (cat, dog, upload_stem("a b/%41.png"), upload_stem("../x")):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", stem), stem


def test_annotator_seconds_come_from_label_studios_lead_time():
    read = masks_from_annotations(
        [
            {"image_id": "a", "result": [], "lead_time": 7.25},
            {"image_id": "b", "result": []},  # a simulated answer carries none
        ],
        28,
        28,
    )
    assert read.seconds == {"a": 7.25, "b": 0.0}


def test_report_columns_give_a_model_in_two_roles_one_column():
    from xbl.report.page import report_columns

    roles = {"baseline": "r1", "champion": "r1", "candidate": "r2"}
    assert report_columns(roles) == {"baseline = champion": "r1", "candidate": "r2"}
