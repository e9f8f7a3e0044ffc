"""Prepared data stays on disk: rows read on demand give what loading everything gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xbl.config import TrainConfig
from xbl.data.digits import decoy_digits
from xbl.data.images import DiskArray
from xbl.data.prepared import PreparedData
from xbl.errors import DataError
from xbl.train.loop import predict_proba, training_loop
from xbl.train.models import SmallCNN


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A small decoy-digits set (every sixth image) saved and loaded back from disk."""
    full = decoy_digits(seed=3)
    data = full.take(np.arange(0, len(full), 6))
    folder = tmp_path_factory.mktemp("prepared") / "prepared"
    data.save(folder)
    return data, PreparedData.load(folder)


def test_loaded_arrays_stay_on_disk_and_read_back_exactly(stored):
    memory, disk = stored
    assert all(
        isinstance(getattr(disk, n), DiskArray) for n in ("images", "relevance", "confounder")
    )
    rows = np.array([5, 0, 17, 5])
    mask = memory.split == "val"
    for name in ("images", "relevance", "confounder"):
        a, b = getattr(memory, name), getattr(disk, name)
        assert b.shape == a.shape and b.dtype == a.dtype
        assert np.array_equal(b[rows], a[rows])
        assert np.array_equal(b[3], a[3])
        assert np.array_equal(b[2:9], a[2:9])
        assert np.array_equal(b[mask], a[mask])
        assert np.array_equal(b[-1], a[-1]) and np.array_equal(b[[-2, 1]], a[[-2, 1]])
        assert np.array_equal(b[::7], a[::7]) and np.array_equal(b[9:2:-3], a[9:2:-3])
        assert b[np.array([], dtype=int)].shape == a[np.array([], dtype=int)].shape
        for bad in ([len(a)], [-len(a) - 1], mask[:-1]):
            with pytest.raises(IndexError):
                b[bad]
    for name in ("labels", "split", "ids", "classes"):
        assert np.array_equal(getattr(disk, name), getattr(memory, name))


def test_streamed_predictions_equal_those_on_tensors_with_and_without_workers(stored):
    memory, disk = stored
    torch.manual_seed(0)
    model = SmallCNN()
    x, _ = memory.tensors("val")
    expected = predict_proba(model, x)
    assert np.allclose(predict_proba(model, disk.split_images("val")), expected, atol=1e-6)
    streamed = predict_proba(model, disk.split_images("val"), batch_size=16, workers=2)
    assert np.allclose(streamed, expected, atol=1e-6)


def test_training_from_disk_learns_the_same_weights_as_from_memory(stored):
    memory, disk = stored
    cfg = TrainConfig(epochs=2, batch_size=32, patience=0, seed=4)
    weights = []
    for train, val in (
        (memory.tensors("train"), memory.tensors("val")),
        (disk.split_images("train"), disk.split_images("val")),
    ):
        torch.manual_seed(1)
        model = SmallCNN()
        history = training_loop(model, train, val, cfg).history
        weights.append((model.state_dict(), history))
    (a, ha), (b, hb) = weights
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["val_loss"] for r in ha] == pytest.approx([r["val_loss"] for r in hb])


def test_a_truncated_array_file_is_refused_when_loaded_not_rows_into_an_epoch(stored, tmp_path):
    memory, _ = stored
    memory.save(tmp_path / "prepared")
    images = tmp_path / "prepared" / "images.npy"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images.npy is truncated: .*prepare the data again"):
        PreparedData.load(tmp_path / "prepared")


def test_an_array_file_cut_short_after_it_was_opened_names_the_row(stored, tmp_path):
    memory, _ = stored
    memory.save(tmp_path / "prepared")
    data = PreparedData.load(tmp_path / "prepared")
    images = tmp_path / "prepared" / "images.npy"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    data.images[0]  # the first rows are intact
    with pytest.raises(DataError, match=f"row {len(data) - 1} is truncated"):
        data.images[len(data) - 1]


@pytest.mark.parametrize("content", [b"", b"not numpy at all", b"\x93NUMPY\x01\x00\x10\x00{'de"])
def test_a_file_that_is_no_numpy_array_is_a_clear_error(tmp_path, content):
    (tmp_path / "images.npy").write_bytes(content)
    with pytest.raises(DataError, match="images.npy is not a numpy array file"):
        DiskArray(tmp_path / "images.npy")


def test_a_folder_without_an_index_names_the_prepare_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        PreparedData.load(tmp_path)
