"""decoy-digits: scikit-learn's digits, framed, with a Decoy-MNIST corner patch that codes the label."""

from __future__ import annotations

import numpy as np
from PIL import Image

from xbl.data.prepared import AUDIT, PreparedData, stratified_split


def add_decoys(
    images: np.ndarray, code: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Stamp a size x size patch of value 255 - 25*code in a random corner (Decoy-MNIST).

    Returns the confounder masks; `images` (N,1,H,W) is modified in place.
    """
    n, _, h, w = images.shape
    masks = np.zeros((n, h, w), dtype=bool)
    top = rng.integers(0, 2, n).astype(bool)
    left = rng.integers(0, 2, n).astype(bool)
    for i in range(n):
        r = 0 if top[i] else h - size
        c = 0 if left[i] else w - size
        images[i, :, r : r + size, c : c + size] = 255 - 25 * int(code[i])
        masks[i, r : r + size, c : c + size] = True
    return masks


def decoy_digits(
    image_size: int = 28,
    digit_size: int = 20,
    decoy_size: int = 4,
    split: dict | None = None,
    seed: int = 0,
    decoys: bool = True,
) -> PreparedData:
    """scikit-learn's bundled digits drawn large in a frame, with the Decoy-MNIST confounder.

    The patch value encodes the label in train and val (so a validation-based early stop
    cannot see the shortcut, as a real user's would not), and a random class in test and in
    the audit split: a copy of the validation digits whose decoys are re-drawn at random, the
    shortcut-free evidence promotion is judged on. The seed fixes the split, the decoys'
    corners and the random codes.
    """
    split = split or {"train": 0.6, "val": 0.2, "test": 0.2}
    if image_size - digit_size < 2 * decoy_size:
        raise ValueError("image_size must leave room for the decoy patch in each corner")
    rng = np.random.default_rng(seed)
    images, labels = _framed_digits(image_size, digit_size)
    splits = stratified_split(labels, split, rng)
    ids = np.array([f"digit-{i:04d}" for i in range(len(labels))])
    val = np.flatnonzero(splits == "val")
    images = np.concatenate([images, images[val]])
    labels = np.concatenate([labels, labels[val]])
    splits = np.concatenate([splits, np.full(len(val), AUDIT)])
    ids = np.concatenate([ids, np.char.add(ids[val], "-audit")])
    relevance = images[:, 0] > 32
    n = len(labels)
    code = np.where(np.isin(splits, ("test", AUDIT)), rng.integers(0, 10, n), labels)
    confounder = add_decoys(images, code, decoy_size, rng) if decoys else np.zeros_like(relevance)
    return PreparedData(
        images, labels, splits, relevance, confounder, ids, np.array([str(k) for k in range(10)])
    )


def _framed_digits(image_size: int, digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits resized to `digit_size`, centred in an `image_size` frame."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    off = (image_size - digit_size) // 2
    images = np.zeros((len(digits.target), 1, image_size, image_size), dtype=np.uint8)
    for i, small in enumerate(digits.images):
        big = Image.fromarray((small * (255 / 16)).astype(np.uint8)).resize(
            (digit_size, digit_size), Image.BILINEAR
        )
        images[i, 0, off : off + digit_size, off : off + digit_size] = np.asarray(big)
    return images, digits.target.astype(np.int64)
