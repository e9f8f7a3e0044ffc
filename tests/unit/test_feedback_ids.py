"""Feedback masks are joined to images by image ID, never by row position: data that grows,
shrinks or is reordered between rounds keeps every mask on its own image, and says which masks
have no image any more."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from xbl.errors import DataError
from xbl.feedback.masks import join_feedback, read_feedback, read_mask_records, write_feedback

SIZE = 6


def prepared(ids: list[str], split: dict[str, str] | None = None):
    """A small prepared dataset whose every image is drawn from its ID (so an image can be told
    from its pixels) and whose label is the ID's first letter."""
    from xbl.data.prepared import PreparedData

    split = split or {}
    images = np.stack([np.full((1, SIZE, SIZE), _shade(i), np.uint8) for i in ids])
    classes = np.array(sorted({i[0] for i in ids}))
    return PreparedData(
        images=images,
        labels=np.searchsorted(classes, [i[0] for i in ids]).astype(np.int64),
        split=np.array([split.get(i, "train") for i in ids]),
        relevance=np.ones((len(ids), SIZE, SIZE), bool),
        confounder=np.zeros((len(ids), SIZE, SIZE), bool),
        ids=np.array(ids),
        classes=classes,
    )


def _shade(image_id: str) -> int:
    return sum(map(ord, image_id)) % 251


def _mask(image_id: str) -> np.ndarray:
    """A mask that differs per image: the image's own answer is recognisable."""
    rng = np.random.default_rng(_shade(image_id))
    return rng.random((SIZE, SIZE)) < 0.4


def answered_round(folder, data, answered: list[str], round_number: int = 1, ratings=None):
    """A round's manifest as the pipeline writes it, on `data` (the version it ran on)."""
    position = {str(i): n for n, i in enumerate(data.ids)}
    queries = {i: {"index": position[i], "round": round_number} for i in answered}
    masks = {i: _mask(i) for i in answered}
    keep = {i: ~_mask(i) & (np.arange(SIZE) % 2 == 0) for i in answered}
    return str(write_feedback(folder, queries, masks, ratings or {}, [], keep))


def assert_on_own_images(joined, data, expected: list[str]) -> None:
    """Each joined mask sits on the row of the image it was drawn for, pixels and label too."""
    assert [str(data.ids[r]) for r in joined.rows] == expected
    for j, image_id in enumerate(expected):
        row = joined.rows[j]
        assert np.array_equal(joined.ignore[j], _mask(image_id)), image_id
        assert (data.images[row] == _shade(image_id)).all()
        assert data.classes[data.labels[row]] == image_id[0]


V1 = ["a/1", "a/2", "b/1", "b/2", "c/1", "c/2"]


def test_reordered_data_keeps_every_mask_on_its_own_image(tmp_path):
    before = prepared(V1)
    manifest = answered_round(tmp_path / "round-1", before, ["a/2", "c/1"], ratings={"c/1": "bad"})
    after = prepared(list(reversed(V1)))  # a new stratified split, a re-sorted folder, ...

    joined = read_feedback([manifest], after)

    assert_on_own_images(joined, after, ["a/2", "c/1"])
    # the recorded indices, 1 and 4, would swap the two masks
    assert joined.rows.tolist() == [4, 1]
    assert joined.ratings == {1: "bad"}
    assert joined.summary()["left_out"] == 0 and joined.notes() == []


def test_added_images_shift_the_rows_and_not_the_masks(tmp_path):
    before = prepared(V1)
    first = answered_round(tmp_path / "round-1", before, ["a/1", "b/2", "c/2"])
    after = prepared(["a/0", "b/0", *V1[:3], "b/9", *V1[3:]])  # inserted before and between
    second = answered_round(tmp_path / "round-2", after, ["b/9"], round_number=2)

    joined = read_feedback([first, second], after)

    assert_on_own_images(joined, after, ["a/1", "b/2", "c/2", "b/9"])
    # what today's positional join would have trained on: other images, other labels
    recorded = [r.index for r in read_mask_records([first])]
    assert [str(after.ids[i]) for i in recorded] != ["a/1", "b/2", "c/2"]


def test_a_removed_image_drops_its_mask_only_and_is_named(tmp_path):
    before = prepared(V1)
    ratings = {"a/1": "bad", "b/1": "good", "c/1": "bad"}
    manifest = answered_round(tmp_path / "round-1", before, ["a/1", "b/1", "c/1"], ratings=ratings)
    after = prepared([i for i in V1 if i != "b/1"])

    joined = read_feedback([manifest], after)

    assert_on_own_images(joined, after, ["a/1", "c/1"])
    assert joined.ratings == {0: "bad", 1: "bad"}  # re-keyed to the masks that train
    assert joined.gone == ["b/1"]
    summary = joined.summary()
    assert (summary["joined"], summary["gone_count"], summary["gone"]) == (2, 1, ["b/1"])
    assert joined.notes() == [
        "1 feedback mask(s) gone (their images are no longer in the data): b/1"
    ]


def test_every_image_gone_leaves_no_mask_and_names_them_all(tmp_path):
    manifest = answered_round(tmp_path / "round-1", prepared(V1), ["a/1", "b/1"])
    joined = read_feedback([manifest], prepared(["z/1", "z/2"]))
    assert joined.rows.shape == (0,) and joined.ignore.shape == (0, SIZE, SIZE)
    assert joined.gone == ["a/1", "b/1"]


def test_an_image_moved_out_of_training_does_not_train(tmp_path):
    """A folder's split is drawn again when it grows: a masked image may land in test, where
    training on it would flatter the model that is judged there."""
    manifest = answered_round(tmp_path / "round-1", prepared(V1), ["a/1", "b/1"])
    after = prepared(V1, split={"b/1": "test"})

    joined = read_feedback([manifest], after)

    assert_on_own_images(joined, after, ["a/1"])
    assert joined.outside_train == ["b/1"] and joined.summary()["left_out"] == 1


def index_only(folder, rows: list[tuple[int, str]], round_number: int = 1) -> str:
    """A round's manifest with an index and no image ID, as an old record might be."""
    (folder / "masks").mkdir(parents=True)
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["index", "round", "mask", "rating"])
        writer.writeheader()
        for index, image_id in rows:
            Image.fromarray(_mask(image_id).astype(np.uint8) * 255).save(
                folder / "masks" / f"{index}.png"
            )
            writer.writerow(
                {"index": index, "round": round_number, "mask": f"masks/{index}.png", "rating": ""}
            )
    return str(folder / "manifest.csv")


def test_a_row_without_an_id_joins_by_index_only_on_the_data_version_it_was_made_on(tmp_path):
    data = prepared(V1)
    manifest = index_only(tmp_path / "round-1", [(2, "b/1"), (5, "c/2")])

    same = read_feedback([manifest], data, version="md5-v1", made_on={1: "md5-v1"})
    assert_on_own_images(same, data, ["b/1", "c/2"])
    assert len(same.by_index) == 2 and "index 2" in same.by_index[0]
    assert not same.keep.any()  # written before keep masks: no evidence affirmed

    for version, made_on in (("md5-v2", {1: "md5-v1"}), ("md5-v1", None), (None, {1: "md5-v1"})):
        other = read_feedback([manifest], data, version=version, made_on=made_on)
        assert other.rows.size == 0 and len(other.unjoinable) == 2
        assert "line 2 (index 2)" in other.unjoinable[0]


def test_joined_masks_train_the_images_they_were_drawn_for(tmp_path):
    """Through the retraining: the annotated images, labels and masks travel together."""
    from xbl.config import FeedbackConfig
    from xbl.feedback.schedule import build_feedback

    before = prepared(V1)
    manifest = answered_round(tmp_path / "round-1", before, ["b/2", "a/1"])
    after = prepared(["c/9", *reversed(V1)])
    joined = read_feedback([manifest], after)

    fb = build_feedback(FeedbackConfig(method="rrr"), after, joined.rows, joined.ignore, 0)
    images = fb.images
    expected = {"a/1": 0, "b/2": 1}  # their labels
    for j, image_id in enumerate(sorted(expected)):  # write_feedback sorts by ID
        assert images.y[j].item() == expected[image_id]
        assert (images.x[j] * 255).round().eq(_shade(image_id)).all()
        assert images.W[j].bool().numpy().tolist() == _mask(image_id).tolist()


def test_unreadable_rows_are_all_named_at_once(tmp_path):
    manifest = answered_round(tmp_path / "round-1", prepared(V1), ["a/1", "b/1", "c/1"])
    folder = tmp_path / "round-1" / "masks"
    (folder / "a%2F1.png").unlink()
    (folder / "c%2F1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    with pytest.raises(DataError) as err:
        read_feedback([manifest], prepared(V1))
    message = str(err.value)
    assert message.startswith("2 feedback row(s) cannot be read")
    assert f"{manifest} line 2" in message and f"{manifest} line 4" in message
    assert "line 3" not in message


def test_masks_of_another_image_size_are_refused_by_name(tmp_path):
    manifest = answered_round(tmp_path / "round-1", prepared(V1), ["a/1"])
    bigger = prepared(V1)
    bigger.images = np.zeros((len(V1), 1, SIZE + 2, SIZE + 2), np.uint8)
    with pytest.raises(DataError, match=r"a/1\): \(6, 6\)"):
        join_feedback(read_mask_records([manifest]), bigger)
