"""Datasets: the built-in decoy-digits, user manifests, and the prepared-array format.

Every prepared dataset is one `dataset.npz` with:
  images (N,C,H,W) uint8, labels (N,) int64, split (N,) str in {train,val,test,audit},
  relevance (N,H,W) bool   where the evidence is (the digit; a user's mask),
  confounder (N,H,W) bool  the known shortcut (the decoy patch; empty for user data),
  ids (N,) str, classes (K,) str.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xbl.config import DataConfig

SPLITS = ("train", "val", "test")
# Optional held-out images free of the shortcut (decoy-digits: the validation digits with their
# decoys re-drawn at random). Promotion is judged there; training and early stopping never see it.
AUDIT = "audit"


@dataclass
class PreparedData:
    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    relevance: np.ndarray
    confounder: np.ndarray
    ids: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's images as float in [0,1] and its labels."""
        idx = self.indices(split)
        return to_tensor(self.images[idx]), torch.from_numpy(self.labels[idx])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:  # a file handle keeps numpy from appending ".npz"
            np.savez_compressed(fh, **self.__dict__)

    @classmethod
    def load(cls, path: Path) -> PreparedData:
        if not Path(path).is_file():
            raise FileNotFoundError(f"prepared dataset not found: {path} (run the prepare stage)")
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,C,H,W) to float in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


# ---------------------------------------------------------------- decoy-digits
def _stratified_split(labels: np.ndarray, fractions: dict, rng: np.random.Generator) -> np.ndarray:
    split = np.empty(len(labels), dtype="<U5")
    cut_train = fractions["train"]
    cut_val = cut_train + fractions["val"]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        a, b = round(len(idx) * cut_train), round(len(idx) * cut_val)
        split[idx[:a]], split[idx[a:b]], split[idx[b:]] = "train", "val", "test"
    return split


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
    splits = _stratified_split(labels, split, rng)
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


# ---------------------------------------------------------------- user manifests
class ManifestError(ValueError):
    """A manifest with bad rows; the message names every row and its problem."""


def _read_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("L"))


def _resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if array.shape == (size, size):
        return array
    return np.asarray(
        Image.fromarray(array).resize((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    )


def _load_row(row: dict, root: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One manifest row to (image, relevance mask); raises ValueError saying what is wrong."""
    image_path = root / (row.get("image") or "").strip()
    if not row.get("image") or not image_path.is_file():
        raise ValueError(f"image not found: {image_path}")
    try:
        image = _read_gray(image_path)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"unreadable image {image_path}: {exc}") from None
    mask_name = (row.get("mask") or "").strip()
    if not mask_name:
        mask = np.ones_like(image, dtype=bool)  # no mask: the whole image may be evidence
    else:
        mask_path = root / mask_name
        if not mask_path.is_file():
            raise ValueError(f"mask not found: {mask_path}")
        try:
            mask = _read_gray(mask_path) > 0
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"unreadable mask {mask_path}: {exc}") from None
        if mask.shape != image.shape:
            raise ValueError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, "
                f"image is {image.shape[1]}x{image.shape[0]}"
            )
    return _resize(image, image_size, False), _resize(mask.astype(np.uint8), image_size, True) > 0


def read_manifest(path: str | Path, image_size: int) -> PreparedData:
    """Load a CSV manifest (image, label, split[, mask]; paths relative to the manifest; split
    is train, val, test or audit: held-out images without the shortcut, judged for promotion).

    Every row is checked before anything trains; all problems are reported at once.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"{path}: missing column(s) {sorted(missing)}")
        rows = list(reader)
    if not rows:
        raise ManifestError(f"{path}: no rows")
    images, masks, problems = [], [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path.name} line {line} ({row.get('image')})"
        label, split = (row.get("label") or "").strip(), (row.get("split") or "").strip()
        if not label:
            problems.append(f"{where}: empty class label")
            continue
        if split not in (*SPLITS, AUDIT):
            problems.append(f"{where}: unknown split {split!r} (use train, val, test or audit)")
            continue
        try:
            image, mask = _load_row(row, path.parent, image_size)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        images.append(image)
        masks.append(mask)
    label_names = [(r.get("label") or "").strip() for r in rows]
    split_names = [(r.get("split") or "").strip() for r in rows]
    train_classes = {lab for lab, s in zip(label_names, split_names) if s == "train" and lab}
    for lab in sorted(set(label_names) - train_classes - {""}):
        problems.append(f"{path.name}: class {lab!r} has no training images")
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems))
    classes = np.array(sorted(set(label_names)))
    return PreparedData(
        images=np.stack(images)[:, None],
        labels=np.searchsorted(classes, label_names).astype(np.int64),
        split=np.array(split_names),
        relevance=np.stack(masks),
        confounder=np.zeros((len(rows), image_size, image_size), dtype=bool),
        ids=np.array([Path(r["image"]).stem for r in rows]),
        classes=classes,
    )


def radiography_manifest(folder: str | Path, out: str | Path, split: dict, seed: int = 0) -> Path:
    """Write a manifest for the COVID-19 Radiography Database layout.

    `<class>/images/*.png` with the same file names under `<class>/masks/`; the split is
    stratified by class and fixed by the seed.
    """
    folder, out = Path(folder), Path(out)
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if (p / "images").is_dir()):
        for image in sorted((class_dir / "images").glob("*.png")):
            mask = class_dir / "masks" / image.name
            rows.append(
                {
                    "image": image.relative_to(folder).as_posix(),
                    "label": class_dir.name,
                    "mask": mask.relative_to(folder).as_posix() if mask.exists() else "",
                }
            )
    if not rows:
        raise ManifestError(f"{folder}: no <class>/images/*.png found")
    labels = np.array([r["label"] for r in rows])
    splits = _stratified_split(labels, split, np.random.default_rng(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split", "mask"])
        writer.writeheader()
        for row, s in zip(rows, splits):
            writer.writerow({**row, "split": s})
    return out


def build_dataset(cfg: DataConfig, root: Path = Path(".")) -> PreparedData:
    """The dataset named in params' `data` section."""
    if cfg.dataset == "decoy-digits":
        return decoy_digits(cfg.image_size, cfg.digit_size, cfg.decoy_size, cfg.split, cfg.seed)
    source = root / cfg.dataset
    if source.is_dir():
        manifest = radiography_manifest(source, source / "manifest.csv", cfg.split, cfg.seed)
        return read_manifest(manifest, cfg.image_size)
    return read_manifest(source, cfg.image_size)
