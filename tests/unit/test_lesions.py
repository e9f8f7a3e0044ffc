"""decoy-lesions: procedural lesions on skin with an ISIC-style sticker or ruler as shortcut."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from xbl.config import DataConfig
from xbl.data.build import build_dataset
from xbl.data.lesions import decoy_lesions
from xbl.data.prepared import AUDIT
from xbl.errors import ConfigError

SECONDS = {}  # CPU seconds the default dataset took to generate


@pytest.fixture(scope="module")
def lesions():
    start = time.process_time()  # CPU time: the shared machine's load does not count
    data = decoy_lesions(seed=0)
    SECONDS["default"] = time.process_time() - start
    return data


def confounder_codes(data):
    """Which mark each image carries, read from its pixels: 0 blue patch, 1 ruler, 2 yellow."""
    codes = np.empty(len(data), dtype=np.int64)
    for i in range(len(data)):
        r, g, b = data.images[i][:, data.confounder[i]].astype(float).mean(axis=1)
        codes[i] = 0 if b - r > 40 else 2 if (r + g) / 2 - b > 60 else 1
    return codes


def test_shapes_dtypes_and_at_least_4000_images(lesions):
    n = len(lesions)
    assert lesions.images.shape == (n, 3, 64, 64) and lesions.images.dtype == np.uint8
    assert lesions.relevance.shape == lesions.confounder.shape == (n, 64, 64)
    assert lesions.relevance.dtype == lesions.confounder.dtype == bool
    assert lesions.labels.dtype == np.int64 and lesions.ids.shape == (n,)
    assert len(set(lesions.ids)) == n and lesions.ids[0] == "lesion-0000"
    assert list(lesions.classes) == ["nevus-like", "irregular", "halo"]
    assert np.isin(lesions.split, ("train", "val", "test")).sum() >= 4000


def test_classes_are_balanced_in_every_split(lesions):
    for split in ("train", "val", "test", AUDIT):
        counts = np.bincount(lesions.labels[lesions.indices(split)], minlength=3)
        assert counts.min() > 0 and counts.max() - counts.min() <= 1, (split, counts)


def test_split_follows_the_configured_fractions():
    data = decoy_lesions(n_per_class=100, split={"train": 0.5, "val": 0.3, "test": 0.2})
    assert [len(data.indices(s)) for s in ("train", "val", "test", AUDIT)] == [150, 90, 60, 90]


def test_every_image_has_a_lesion_and_a_confounder_that_never_touch(lesions):
    assert lesions.relevance.any(axis=(1, 2)).all()
    assert lesions.confounder.any(axis=(1, 2)).all()
    assert not (lesions.relevance & lesions.confounder).any()


def test_confounder_codes_the_label_in_train_and_val(lesions):
    codes = confounder_codes(lesions)
    for split in ("train", "val"):
        idx = lesions.indices(split)
        assert (codes[idx] == lesions.labels[idx]).all()


@pytest.mark.parametrize("split", ["test", AUDIT])
def test_confounder_is_random_in_test_and_audit(lesions, split):
    idx = lesions.indices(split)
    codes = confounder_codes(lesions)[idx]
    assert abs((codes == lesions.labels[idx]).mean() - 1 / 3) < 0.07
    assert set(codes) == {0, 1, 2}


def test_uncorrelated_marks_carry_no_label_in_any_split():
    data = decoy_lesions(n_per_class=150, correlated=False, seed=2)
    agree = confounder_codes(data) == data.labels
    assert data.confounder.any(axis=(1, 2)).all() and abs(agree.mean() - 1 / 3) < 0.06
    same = decoy_lesions(n_per_class=150, seed=2)
    assert np.array_equal(data.relevance, same.relevance)  # the same lesions, other marks


def test_the_audit_split_is_the_validation_lesions_with_confounders_redrawn(lesions):
    val, audit = lesions.indices("val"), lesions.indices(AUDIT)
    assert list(lesions.ids[audit]) == [f"{i}-audit" for i in lesions.ids[val]]
    assert np.array_equal(lesions.labels[audit], lesions.labels[val])
    assert np.array_equal(lesions.relevance[audit], lesions.relevance[val])
    untouched = ~(lesions.confounder[audit] | lesions.confounder[val])[:, None]
    assert np.array_equal(lesions.images[audit] * untouched, lesions.images[val] * untouched)
    assert (lesions.confounder[audit] != lesions.confounder[val]).any(axis=(1, 2)).mean() > 0.95


def test_confounders_sit_off_any_grid_and_away_from_the_corners(lesions):
    rows = lesions.confounder.any(axis=2)
    cols = lesions.confounder.any(axis=1)
    top, left = rows.argmax(axis=1), cols.argmax(axis=1)
    bottom = 63 - rows[:, ::-1].argmax(axis=1)
    right = 63 - cols[:, ::-1].argmax(axis=1)
    assert len(set(top % 4)) == 4 and len(set(left % 4)) == 4
    assert len(set(top % 8)) == 8 and len(set(left % 8)) == 8
    off_border = (top > 0) & (left > 0) & (bottom < 63) & (right < 63)
    assert off_border.mean() > 0.5  # not only corners and edges
    assert len(set(bottom - top)) > 5  # random scale


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data():
    a, b = decoy_lesions(n_per_class=40, seed=3), decoy_lesions(n_per_class=40, seed=3)
    for field in ("images", "labels", "split", "relevance", "confounder", "ids"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    c = decoy_lesions(n_per_class=40, seed=4)
    assert not np.array_equal(a.split, c.split)
    assert not np.array_equal(a.relevance, c.relevance)
    assert not np.array_equal(a.confounder, c.confounder)


def test_without_decoys_there_is_no_confounder():
    data = decoy_lesions(n_per_class=20, decoys=False)
    assert not data.confounder.any()
    assert data.relevance.any(axis=(1, 2)).all()


def test_two_classes_and_128_pixels():
    data = decoy_lesions(image_size=128, n_per_class=30, classes=2, seed=1)
    assert data.images.shape[1:] == (3, 128, 128) and list(data.classes) == [
        "nevus-like",
        "irregular",
    ]
    assert set(data.labels) == {0, 1}
    assert data.relevance.any(axis=(1, 2)).all() and data.confounder.any(axis=(1, 2)).all()
    assert not (data.relevance & data.confounder).any()
    idx = data.indices("train")
    assert (confounder_codes(data)[idx] == data.labels[idx]).all()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="2 or 3 classes"):
        decoy_lesions(n_per_class=5, classes=4)
    with pytest.raises(ValueError, match="image_size"):
        decoy_lesions(image_size=28, n_per_class=5)


def test_generation_is_fast(lesions):
    assert SECONDS["default"] < 60  # a sanity bound: about 8 s


def test_build_dataset_dispatches_decoy_lesions():
    split = {"train": 0.5, "val": 0.25, "test": 0.25}
    cfg = DataConfig(dataset="decoy-lesions", image_size=32, split=split, seed=2, channels=1)
    data = build_dataset(cfg)  # channels 1: the RGB lesions as luma
    assert data.images.shape[1:] == (1, 32, 32) and len(data.classes) == 3
    assert [len(data.indices(s)) for s in ("train", "val", "test")] == [2100, 1050, 1050]


def test_a_linear_model_learns_the_lesions_without_a_confounder():
    """Cheap learnability check: logistic regression on the Fourier magnitudes of 32-px grey
    copies (blind to where the lesion is) beats chance (1/3) clearly; about 0.86 here."""
    data = decoy_lesions(n_per_class=300, decoys=False, seed=5)
    grey = data.images.astype(float).mean(axis=1)
    grey = grey.reshape(len(grey), 32, 2, 32, 2).mean(axis=(2, 4))
    spectrum = np.abs(np.fft.rfft2(grey - grey.mean(axis=(1, 2), keepdims=True)))
    features = np.log1p(spectrum.reshape(len(grey), -1))
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    train, test = data.indices("train"), data.indices("test")
    model = LogisticRegression(C=0.05, max_iter=300).fit(features[train], data.labels[train])
    assert model.score(features[test], data.labels[test]) > 0.7


def test_the_config_refuses_lesions_too_small_to_draw():
    with pytest.raises(ConfigError, match="data.image_size is 28; decoy-lesions needs"):
        DataConfig(dataset="decoy-lesions")
