"""Datasets: the built-in decoy-digits (and decoy-lesions, in xbl/lesions.py), user manifests,
and the prepared-array format.

Every prepared dataset is one `dataset.npz` with:
  images (N,C,H,W) uint8, labels (N,) int64, split (N,) str in {train,val,test,audit},
  relevance (N,H,W) bool   where the evidence is (the digit; a user's mask, else all ones),
  confounder (N,H,W) bool  the known shortcut (the decoy patch; a user's confounder_mask, else
                           empty),
  ids (N,) str             unique; for user data the image's path in the dataset folder,
  classes (K,) str.
C is 1 (greyscale) or 3 (RGB).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA", "I", "F") + tuple(m for m in Image.MODES if m.startswith("I;16"))


def _open_rgb_or_grey(path: Path, kind: str) -> Image.Image:
    """The file as an 8-bit PIL image, mode L (greyscale) or RGB (colour; alpha dropped).

    16-bit greyscale (common for radiographs) is scaled to 8 bits, not clipped as PIL's
    convert("L") would. An RGB file whose three channels are equal everywhere is greyscale.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit PNGs open as I;16 or I
                wide = np.asarray(im, dtype=np.float64).clip(0, 65535)
                return Image.fromarray((wide / 257).round().astype(np.uint8))
            if im.mode in _GREY_MODES:
                return im.convert("L")
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"unreadable {kind} {path}: {exc}") from None
    arr = np.asarray(rgb)
    grey = (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return Image.fromarray(arr[..., 0]) if grey else rgb


def _resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(
        Image.fromarray(array).resize((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    )


def _inside(root: Path, name: str, column: str) -> tuple[Path, str]:
    """`name` from a manifest column as a file under `root` and its ID: the POSIX path relative to
    `root`. Absolute paths, and paths that leave `root` (through `..` or a symlink), are refused:
    an ID must name one image of this dataset and nothing else."""
    if Path(name).is_absolute() or PureWindowsPath(name).is_absolute():
        raise ValueError(f"{column} {name!r} is an absolute path; give it relative to {root}")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{column} {name!r} leaves the dataset folder {root}")
    return path, Path(os.path.normpath(name)).as_posix()


def _read_mask(root: Path, name: str, column: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask PNG as bool (nonzero = marked), checked against its image's (h, w)."""
    path, _ = _inside(root, name, column)
    if not path.is_file():
        raise ValueError(f"{column} not found: {path}")
    mask = np.asarray(_open_rgb_or_grey(path, column))
    mask = mask.any(axis=-1) if mask.ndim == 3 else mask > 0
    if mask.shape != shape:
        raise ValueError(
            f"{column} {path} is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}"
        )
    return mask


@dataclass
class _Row:
    image: Image.Image
    relevance: np.ndarray
    confounder: np.ndarray
    image_id: str


def _load_row(row: dict, root: Path, image_size: int) -> _Row:
    """One manifest row, resized; raises ValueError saying what is wrong with it."""
    name = (row.get("image") or "").strip()
    if not name:
        raise ValueError("empty image path")
    image_path, image_id = _inside(root, name, "image")
    if not image_path.is_file():
        raise ValueError(f"image not found: {image_path}")
    image = _open_rgb_or_grey(image_path, "image")
    shape = (image.height, image.width)
    masks, problems = {}, []
    for column in ("mask", "confounder_mask"):
        mask_name = (row.get(column) or "").strip()
        try:  # no relevance mask: the whole image may be evidence; no confounder mask: none known
            masks[column] = (
                _read_mask(root, mask_name, column, shape)
                if mask_name
                else np.full(shape, column == "mask")
            )
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    image = (
        image.resize((image_size, image_size), Image.BILINEAR)
        if shape != (image_size,) * 2
        else image
    )
    relevance, confounder = (
        _resize(masks[c].astype(np.uint8), image_size, True) > 0
        for c in ("mask", "confounder_mask")
    )
    return _Row(image, relevance, confounder, image_id)


def _stack_channels(images: list[Image.Image], channels: int | None) -> np.ndarray:
    """(N,C,H,W) uint8. channels None (auto): 3 if any image is colour, else 1; a greyscale image
    among colour ones is repeated on three channels, a colour one forced to 1 becomes luma."""
    if channels is None:
        channels = 3 if any(im.mode == "RGB" for im in images) else 1
    mode = "RGB" if channels == 3 else "L"
    arrays = [np.asarray(im if im.mode == mode else im.convert(mode)) for im in images]
    stacked = np.stack(arrays)
    return stacked[:, None] if channels == 1 else np.moveaxis(stacked, -1, 1).copy()


def read_manifest(path: str | Path, image_size: int, channels: int | None = None) -> PreparedData:
    """Load a CSV manifest: image, label, split[, mask][, confounder_mask].

    Paths are relative to the manifest's folder and must stay inside it; an image's ID is that
    path, normalised (POSIX), so `cat/001.png` and `dog/001.png` are two images and the same
    image listed twice is an error. split is train, val, test or audit (held-out images without
    the shortcut, judged for promotion). `mask` marks the evidence (relevance; all of the image
    without one), `confounder_mask` the known shortcut (none without one). `channels` is 1, 3,
    or None: 3 if any image is in colour, else 1.

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
    loaded, problems, first_line = [], [], {}
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
            one = _load_row(row, path.parent, image_size)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if one.image_id in first_line:
            problems.append(
                f"{where}: the same image as line {first_line[one.image_id]} (ID {one.image_id})"
            )
            continue
        first_line[one.image_id] = line
        loaded.append(one)
    label_names = [(r.get("label") or "").strip() for r in rows]
    split_names = [(r.get("split") or "").strip() for r in rows]
    train_classes = {lab for lab, s in zip(label_names, split_names) if s == "train" and lab}
    for lab in sorted(set(label_names) - train_classes - {""}):
        problems.append(f"{path.name}: class {lab!r} has no training images")
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems))
    classes = np.array(sorted(set(label_names)))
    return PreparedData(
        images=_stack_channels([r.image for r in loaded], channels),
        labels=np.searchsorted(classes, label_names).astype(np.int64),
        split=np.array(split_names),
        relevance=np.stack([r.relevance for r in loaded]),
        confounder=np.stack([r.confounder for r in loaded]),
        ids=np.array([r.image_id for r in loaded]),
        classes=classes,
    )


# ---------------------------------------------------------------- folder layouts
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _write_split_manifest(rows: list[dict], out: Path, split: dict, seed: int) -> Path:
    """Rows (image, label, mask) with a split stratified by class and fixed by the seed."""
    labels = np.array([r["label"] for r in rows])
    splits = _stratified_split(labels, split, np.random.default_rng(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split", "mask"])
        writer.writeheader()
        for row, s in zip(rows, splits):
            writer.writerow({**row, "split": s})
    return out


def radiography_manifest(folder: str | Path, out: str | Path, split: dict, seed: int = 0) -> Path:
    """Write a manifest for the COVID-19 Radiography Database layout.

    `<class>/images/*.png` with the same file names under `<class>/masks/`; the split is
    stratified by class and fixed by the seed.
    """
    folder, out = Path(folder), Path(out)
    rows = []
    for class_dir in (p for p in _class_dirs(folder) if (p / "images").is_dir()):
        for image in _image_files(class_dir / "images"):
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
    return _write_split_manifest(rows, out, split, seed)


def class_folder_manifest(folder: str | Path, out: str | Path, split: dict, seed: int = 0) -> Path:
    """Write a manifest for the plain layout `<class>/*.png|jpg|jpeg` (no masks)."""
    folder, out = Path(folder), Path(out)
    rows = [
        {"image": image.relative_to(folder).as_posix(), "label": class_dir.name, "mask": ""}
        for class_dir in _class_dirs(folder)
        for image in _image_files(class_dir)
    ]
    if not rows:
        raise ManifestError(f"{folder}: no <class>/*.png|jpg|jpeg found")
    return _write_split_manifest(rows, out, split, seed)


def folder_manifest(folder: Path, split: dict, seed: int) -> Path:
    """The manifest.csv written into a dataset folder, whichever of the two layouts it has."""
    classes = _class_dirs(folder)
    radiography = [p.name for p in classes if (p / "images").is_dir()]
    plain = [p.name for p in classes if _image_files(p)]
    out = folder / "manifest.csv"
    if radiography and plain:
        raise ManifestError(
            f"{folder} mixes two layouts: <class>/images/ in {radiography}, images directly "
            f"in {plain}; use one"
        )
    if radiography:
        return radiography_manifest(folder, out, split, seed)
    if plain:
        return class_folder_manifest(folder, out, split, seed)
    raise ManifestError(
        f"{folder} matches no dataset layout: expected <class>/*.png|jpg|jpeg, or "
        "<class>/images/*.png with <class>/masks/ (COVID-19 Radiography); or give a manifest CSV"
    )


def build_dataset(cfg: DataConfig, root: Path = Path(".")) -> PreparedData:
    """The dataset named in params' `data` section."""
    if cfg.dataset == "decoy-digits":
        data = decoy_digits(cfg.image_size, cfg.digit_size, cfg.decoy_size, cfg.split, cfg.seed)
        if cfg.channels == 3:  # greyscale digits on R, G and B, e.g. for RGB-pretrained weights
            data.images = np.repeat(data.images, 3, axis=1)
        return data
    if cfg.dataset == "decoy-lesions":
        from xbl.lesions import decoy_lesions  # xbl.lesions imports this module

        data = decoy_lesions(cfg.image_size, split=cfg.split, seed=cfg.seed)
        if cfg.channels == 1:  # PIL's luma, as for a user's colour images
            luma = np.tensordot([0.299, 0.587, 0.114], data.images.astype(float), axes=(0, 1))
            data.images = luma.round().astype(np.uint8)[:, None]
        return data
    source = root / cfg.dataset
    if source.is_dir():
        return read_manifest(
            folder_manifest(source, cfg.split, cfg.seed), cfg.image_size, _channels(cfg)
        )
    return read_manifest(source, cfg.image_size, _channels(cfg))


def _channels(cfg: DataConfig) -> int | None:
    return None if cfg.channels == "auto" else int(cfg.channels)
