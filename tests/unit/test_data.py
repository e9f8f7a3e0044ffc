"""Decoy-digits and user manifests: the data every later step trusts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xbl.config import DataConfig
from xbl.data.build import build_dataset
from xbl.data.digits import decoy_digits
from xbl.data.images import DiskArray
from xbl.data.manifest import ManifestError, radiography_manifest, read_manifest
from xbl.data.prepared import PreparedData
from xbl.feedback.masks import read_feedback, write_feedback


@pytest.fixture(scope="module")
def digits():
    return decoy_digits(seed=0)


def patch_values(data):
    """The value each image's confounder patch carries."""
    return np.array([data.images[i, 0][data.confounder[i]].mean() for i in range(len(data))])


def test_decoy_value_codes_the_label_in_train_and_val(digits):
    for split in ("train", "val"):
        idx = digits.indices(split)
        assert np.array_equal(patch_values(digits)[idx], 255 - 25 * digits.labels[idx])


@pytest.mark.parametrize("split", ["test", "audit"])
def test_decoy_value_is_random_in_test_and_audit(digits, split):
    idx = digits.indices(split)
    coded = patch_values(digits)[idx] == 255 - 25 * digits.labels[idx]
    assert 0.02 < coded.mean() < 0.25  # ~1/10 agree by chance
    assert len(np.unique(patch_values(digits)[idx])) == 10


def test_the_audit_split_is_the_validation_digits_with_their_decoys_redrawn(digits):
    val, audit = digits.indices("val"), digits.indices("audit")
    assert len(audit) == len(val)
    assert list(digits.ids[audit]) == [f"{i}-audit" for i in digits.ids[val]]
    assert np.array_equal(digits.labels[audit], digits.labels[val])
    assert np.array_equal(digits.relevance[audit], digits.relevance[val])
    digit_only = digits.images[:, 0] * ~digits.confounder  # the same digit under the decoy
    assert np.array_equal(digit_only[audit] > 32, digit_only[val] > 32)
    assert not np.array_equal(patch_values(digits)[audit], patch_values(digits)[val])
    assert len(set(digits.ids)) == len(digits.ids)


def test_masks_align_with_images(digits):
    assert digits.confounder.shape == digits.relevance.shape == digits.images[:, 0].shape
    assert (digits.confounder.sum(axis=(1, 2)) == 16).all()  # one 4x4 patch
    assert not (digits.confounder & digits.relevance).any()  # the patch is off the digit
    ink = digits.images[:, 0] > 32
    assert np.array_equal(ink & ~digits.confounder, digits.relevance)
    corners = digits.confounder[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.sum(axis=1) == 1).all()  # in exactly one corner


def test_splits_are_stratified_and_deterministic(digits):
    again = decoy_digits(seed=0)
    assert np.array_equal(again.images, digits.images)
    assert set(np.unique(digits.split)) == {"train", "val", "test", "audit"}
    for k in range(10):
        assert (digits.split[digits.labels == k] == "test").sum() > 10
    other = decoy_digits(seed=1)
    assert not np.array_equal(other.images, digits.images)
    assert not np.array_equal(other.split, digits.split)  # the seed varies the data, not only init


# ---------------------------------------------------------------- manifests
def write_png(path, size=(16, 16), value=128):
    """A flat PNG: greyscale for an int value, colour for an (r, g, b) value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size[::-1] + ((3,) if isinstance(value, tuple) else ())
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


def write_manifest(root, rows, header="image,label,split,mask"):
    path = root / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return path


@pytest.fixture
def good_rows(tmp_path):
    for name in ("a", "b", "c", "d"):
        write_png(tmp_path / "img" / f"{name}.png")
        write_png(tmp_path / "mask" / f"{name}.png", value=255)
    return [
        ["img/a.png", "cat", "train", "mask/a.png"],
        ["img/b.png", "dog", "train", ""],
        ["img/c.png", "cat", "val", "mask/c.png"],
        ["img/d.png", "dog", "test", "mask/d.png"],
    ]


def test_good_manifest_loads(tmp_path, good_rows):
    data = read_manifest(write_manifest(tmp_path, good_rows), image_size=8)
    assert data.images.shape == (4, 1, 8, 8)
    assert data.classes.tolist() == ["cat", "dog"]
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert data.split.tolist() == ["train", "train", "val", "test"]
    assert data.relevance.all()  # full masks and a missing one = everything
    assert not data.confounder.any()


@pytest.mark.parametrize(
    "row_index,change,expected",
    [
        (0, lambda r, d: r.__setitem__(0, "img/missing.png"), "image not found"),
        (1, lambda r, d: (d / "img" / "b.png").write_bytes(b"not a png"), "unreadable image"),
        (2, lambda r, d: write_png(d / "mask" / "c.png", size=(10, 16)), "mask"),
        (3, lambda r, d: r.__setitem__(2, "holdout"), "unknown split"),
        (1, lambda r, d: r.__setitem__(1, ""), "empty class"),
        (0, lambda r, d: r.__setitem__(3, "mask/nope.png"), "mask not found"),
    ],
)
def test_bad_row_names_the_row_and_the_problem(tmp_path, good_rows, row_index, change, expected):
    change(good_rows[row_index], tmp_path)
    with pytest.raises(ManifestError) as err:
        read_manifest(write_manifest(tmp_path, good_rows), image_size=8)
    message = str(err.value)
    assert f"line {row_index + 2}" in message and expected in message


def test_class_without_training_images_is_refused(tmp_path, good_rows):
    good_rows[3][1] = "bird"
    with pytest.raises(ManifestError, match="class 'bird' has no training images"):
        read_manifest(write_manifest(tmp_path, good_rows), image_size=8)


def test_every_problem_is_reported_at_once(tmp_path, good_rows):
    good_rows[0][0] = "img/missing.png"
    good_rows[3][2] = "holdout"
    with pytest.raises(ManifestError, match="2 problem"):
        read_manifest(write_manifest(tmp_path, good_rows), image_size=8)


def test_missing_column_is_refused(tmp_path, good_rows):
    path = write_manifest(tmp_path, [r[:2] for r in good_rows], header="image,label")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(path, image_size=8)


def test_radiography_folder_becomes_a_manifest(tmp_path):
    for cls in ("COVID", "Normal"):
        for i in range(10):
            write_png(tmp_path / "db" / cls / "images" / f"{cls}-{i}.png", value=10 * i)
            mask = np.zeros((16, 16), dtype=np.uint8)
            mask[4:12, 4:12] = 255
            (tmp_path / "db" / cls / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(tmp_path / "db" / cls / "masks" / f"{cls}-{i}.png")
    manifest = radiography_manifest(
        tmp_path / "db", tmp_path / "db" / "manifest.csv", {"train": 0.6, "val": 0.2, "test": 0.2}
    )
    data = read_manifest(manifest, image_size=16)
    assert data.classes.tolist() == ["COVID", "Normal"]
    assert len(data) == 20
    for k in range(2):
        assert (data.split[data.labels == k] == "train").sum() == 6
    assert data.relevance[:, 4:12, 4:12].all() and not data.relevance[:, :4].any()


# ---------------------------------------------------------------- IDs, paths, channels, masks
def test_ids_are_paths_so_the_same_file_name_in_two_classes_is_two_images(tmp_path):
    write_png(tmp_path / "cat" / "001.png", value=10)
    write_png(tmp_path / "dog" / "001.png", value=200)
    rows = [["cat/001.png", "cat", "train", ""], ["./dog/001.png", "dog", "train", ""]]
    data = read_manifest(write_manifest(tmp_path, rows), image_size=8)
    assert data.ids.tolist() == ["cat/001.png", "dog/001.png"]
    assert data.images[0].max() == 10 and data.images[1].min() == 200


def test_the_same_image_listed_twice_names_both_rows(tmp_path, good_rows):
    good_rows.append(["img/../img/a.png", "cat", "test", ""])
    with pytest.raises(ManifestError, match=r"line 6 .*the same image as line 2 \(ID img/a.png\)"):
        read_manifest(write_manifest(tmp_path, good_rows), image_size=8)


def test_paths_outside_the_dataset_folder_are_refused(tmp_path):
    root = tmp_path / "dataset"
    write_png(root / "img" / "a.png")
    write_png(tmp_path / "outside.png")
    (root / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    rows = [
        ["img/a.png", "cat", "train", ""],
        [str(root / "img" / "a.png"), "cat", "val", ""],
        ["../outside.png", "cat", "test", ""],
        ["img/link.png", "cat", "test", ""],
        ["img/a.png", "cat", "test", "../outside.png"],
    ]
    with pytest.raises(ManifestError) as err:
        read_manifest(write_manifest(root, rows), image_size=8)
    message = str(err.value)
    assert "5 problem(s)" not in message and "4 problem(s)" in message
    assert "line 3" in message and "is an absolute path" in message
    for line in (4, 5, 6):
        assert f"line {line}" in message
    assert message.count("leaves the dataset folder") == 3


def test_auto_channels_is_rgb_when_any_image_is_colour(tmp_path, good_rows):
    write_png(tmp_path / "img" / "b.png", value=(200, 10, 10))
    manifest = write_manifest(tmp_path, good_rows)
    data = read_manifest(manifest, image_size=8)  # channels None: auto
    assert data.images.shape == (4, 3, 8, 8)
    assert data.images[1, :, 0, 0].tolist() == [200, 10, 10]
    grey = data.images[0]
    assert (grey == grey[0]).all() and grey[0, 0, 0] == 128  # repeated on R, G and B
    assert read_manifest(manifest, image_size=8, channels=1).images.shape == (4, 1, 8, 8)
    write_png(tmp_path / "img" / "b.png", value=(90, 90, 90))  # RGB file, grey content
    assert read_manifest(manifest, image_size=8).images.shape == (4, 1, 8, 8)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path, good_rows):
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.full((16, 16), 257 * 100, dtype=np.uint16)).save(tmp_path / "img" / "b.png")
    data = read_manifest(write_manifest(tmp_path, good_rows), image_size=8)
    assert data.images[0].min() == 255 and data.images[1].max() == 100


def test_a_confounder_mask_column_fills_the_confounder(tmp_path, good_rows):
    patch = np.zeros((16, 16), dtype=np.uint8)
    patch[:4, :4] = 255
    Image.fromarray(patch).save(tmp_path / "mask" / "patch.png")
    for row in good_rows:
        row.append("")
    good_rows[1][4] = "mask/patch.png"
    header = "image,label,split,mask,confounder_mask"
    data = read_manifest(write_manifest(tmp_path, good_rows, header), image_size=8)
    assert data.confounder[1, :2, :2].all() and data.confounder[1].sum() == 4
    assert not data.confounder[[0, 2, 3]].any()
    assert data.relevance.all()


def test_a_confounder_mask_of_another_size_names_the_row(tmp_path, good_rows):
    write_png(tmp_path / "mask" / "patch.png", size=(16, 12), value=255)
    for row in good_rows:
        row.append("mask/patch.png" if row[0] == "img/c.png" else "")
    header = "image,label,split,mask,confounder_mask"
    with pytest.raises(
        ManifestError, match=r"line 4 .*confounder_mask .* is 16x12, image is 16x16"
    ):
        read_manifest(write_manifest(tmp_path, good_rows, header), image_size=8)


def test_a_plain_class_folder_loads_with_path_ids(tmp_path):
    for cls, colour in (("cat", (200, 30, 30)), ("dog", 90)):
        for i in range(5):
            write_png(tmp_path / "pets" / cls / f"{i:03d}.png", size=(20, 12), value=colour)
    Image.new("RGB", (9, 9), (1, 2, 3)).save(tmp_path / "pets" / "dog" / "005.JPG")
    cfg = DataConfig(dataset="pets", image_size=8, split={"train": 0.6, "val": 0.2, "test": 0.2})
    data = build_dataset(cfg, tmp_path)
    assert data.classes.tolist() == ["cat", "dog"] and len(data) == 11
    assert data.images.shape == (11, 3, 8, 8)
    assert "cat/000.png" in data.ids and "dog/005.JPG" in data.ids
    assert set(data.split[data.labels == 0]) == {"train", "val", "test"}
    assert data.relevance.all() and not data.confounder.any()


def test_a_folder_in_no_known_layout_is_refused(tmp_path):
    (tmp_path / "stuff" / "cat").mkdir(parents=True)
    (tmp_path / "stuff" / "cat" / "notes.txt").write_text("no images")
    with pytest.raises(ManifestError, match="matches no dataset layout"):
        build_dataset(DataConfig(dataset="stuff"), tmp_path)


def test_path_ids_give_flat_unique_feedback_file_names(tmp_path):
    """IDs with `/` reach the feedback masks of a round: one flat file per image."""
    masks = {"cat/001.png": np.eye(4, dtype=bool), "dog/001.png": ~np.eye(4, dtype=bool)}
    queries = {image_id: {"index": i, "round": 1} for i, image_id in enumerate(masks)}
    manifest = write_feedback(tmp_path / "round-1", queries, masks, {}, [], {})
    files = sorted(p.name for p in (tmp_path / "round-1" / "masks").iterdir())
    assert files == ["cat%2F001.png.png", "dog%2F001.png.png"]
    data = PreparedData(
        images=np.zeros((2, 1, 4, 4), np.uint8),
        labels=np.array([0, 1]),
        split=np.array(["train", "train"]),
        relevance=np.ones((2, 4, 4), bool),
        confounder=np.zeros((2, 4, 4), bool),
        ids=np.array(list(masks)),
        classes=np.array(["cat", "dog"]),
    )
    joined = read_feedback([str(manifest)], data)
    assert joined.rows.tolist() == [0, 1]
    assert np.array_equal(joined.ignore[0], masks["cat/001.png"]) and np.array_equal(
        joined.ignore[1], ~np.eye(4, dtype=bool)
    )


def test_decoy_digits_can_be_drawn_on_three_channels():
    data = build_dataset(DataConfig(channels=3))
    assert data.images.shape[1] == 3 and (data.images == data.images[:, :1]).all()


def test_a_manifest_is_written_to_its_prepared_folder_and_read_back_from_disk(tmp_path, good_rows):
    write_png(tmp_path / "img" / "e.png", value=(200, 10, 10))  # colour: the set becomes RGB
    rows = [*good_rows, ["img/e.png", "cat", "train", ""]]
    out = tmp_path / "prepared"
    data = read_manifest(write_manifest(tmp_path, rows), image_size=8, out=out)
    assert isinstance(data.images, DiskArray)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["images.npy", "relevance.npy", "confounder.npy", "index.npz"]
    )
    assert data.images.shape == (5, 3, 8, 8)
    assert (data.images[0] == 128).all()  # a grey image on three channels
    assert data.images[4][:, 0, 0].tolist() == [200, 10, 10]
    in_memory = read_manifest(write_manifest(tmp_path, rows), image_size=8)
    assert np.array_equal(in_memory.images, data.images[:])


def test_a_bad_row_leaves_the_prepared_folder_as_it_was(tmp_path, good_rows):
    out = tmp_path / "prepared"
    before = read_manifest(write_manifest(tmp_path, good_rows), image_size=8, out=out)
    stored = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = [*good_rows, ["img/missing.png", "cat", "train", ""]]
    with pytest.raises(ManifestError, match="missing.png"):
        read_manifest(write_manifest(tmp_path, broken), image_size=8, out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == stored
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert len(before) == 4
