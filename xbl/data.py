"""Datasets: the built-in decoy-digits (and decoy-lesions, in xbl/lesions.py), user manifests,
and the prepared format.

A prepared dataset is a folder (DVC-tracked as one output):
  images.npy      (N,C,H,W) uint8, C 1 (greyscale) or 3 (RGB)
  relevance.npy   (N,H,W) bool  where the evidence is (the digit; a user's mask, else all ones)
  confounder.npy  (N,H,W) bool  the known shortcut (the decoy; a user's confounder_mask, else
                                empty)
  index.npz       labels (N,) int64, split (N,) str in {train,val,test,audit}, ids (N,) str
                  (unique; for user data the image's path in the dataset folder), classes (K,)
Loaded, the three image-sized arrays stay on disk and are read row by row (xbl.images); the
index is small and held in memory.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xbl.config import DataConfig
from xbl.images import ArrayImages, DiskArray, RowWriter, to_tensor

__all__ = ["AUDIT", "SPLITS", "ManifestError", "PreparedData", "build_dataset", "to_tensor"]

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
        """The split's images as float in [0,1] and its labels, all in memory (small data)."""
        idx = self.indices(split)
        return to_tensor(self.images[idx]), torch.from_numpy(self.labels[idx])

    def split_images(self, split: str) -> ArrayImages:
        """The split as labelled images read from disk batch by batch."""
        return ArrayImages(self.images, self.labels, self.indices(split))

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in IMAGE_SIZED:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        np.savez(folder / INDEX, **{name: getattr(self, name) for name in INDEXED})

    @classmethod
    def load(cls, folder: Path) -> PreparedData:
        folder = Path(folder)
        if not (folder / INDEX).is_file():
            raise FileNotFoundError(
                f"prepared dataset not found: {folder} has no {INDEX} (run the prepare stage)"
            )
        with np.load(folder / INDEX, allow_pickle=False) as z:
            index = {name: z[name] for name in INDEXED}
        arrays = {name: DiskArray(folder / f"{name}.npy") for name in IMAGE_SIZED}
        data = cls(**index, **arrays)
        if any(len(a) != len(data.labels) for a in arrays.values()):
            raise ValueError(f"{folder}: the arrays and {INDEX} disagree on the number of images")
        return data


IMAGE_SIZED = ("images", "relevance", "confounder")
INDEXED = ("labels", "split", "ids", "classes")
INDEX = "index.npz"


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


class _ImageRows:
    """The manifest's images, masks written to a prepared folder one row at a time.

    Images go in as RGB (a greyscale one on three channels) unless `channels` is 1; with
    `channels` None (auto) the file is narrowed to one channel at the end when no image was in
    colour. A colour image forced to one channel becomes luma."""

    def __init__(self, folder: Path, n: int, size: int, channels: int | None):
        self.folder, self.channels, self.colour = folder, channels, False
        width = 1 if channels == 1 else 3
        self.images = RowWriter(folder / "images.npy", n, (width, size, size), np.uint8)
        self.masks = {
            name: RowWriter(folder / f"{name}.npy", n, (size, size), bool)
            for name in ("relevance", "confounder")
        }

    def write(self, row: _Row) -> None:
        self.colour |= row.image.mode == "RGB"
        mode = "L" if self.channels == 1 else "RGB"
        pixels = np.asarray(row.image if row.image.mode == mode else row.image.convert(mode))
        self.images.write(pixels[None] if mode == "L" else np.moveaxis(pixels, -1, 0))
        self.masks["relevance"].write(row.relevance)
        self.masks["confounder"].write(row.confounder)

    def close(self) -> None:
        for writer in (self.images, *self.masks.values()):
            writer.close()
        if self.channels is None and not self.colour:
            _narrow_to_grey(self.folder / "images.npy")


def _narrow_to_grey(path: Path, chunk: int = 1024) -> None:
    """Rewrite an RGB images.npy whose images are all greyscale with one channel."""
    wide = DiskArray(path)
    narrow = RowWriter(path.with_suffix(".grey"), len(wide), (1, *wide.shape[2:]), np.uint8)
    for start in range(0, len(wide), chunk):
        for image in wide[start : start + chunk]:
            narrow.write(image[:1])
    narrow.close()
    path.with_suffix(".grey").replace(path)


def read_manifest(
    path: str | Path, image_size: int, channels: int | None = None, out: Path | None = None
) -> PreparedData:
    """Load a CSV manifest: image, label, split[, mask][, confounder_mask].

    Paths are relative to the manifest's folder and must stay inside it; an image's ID is that
    path, normalised (POSIX), so `cat/001.png` and `dog/001.png` are two images and the same
    image listed twice is an error. split is train, val, test or audit (held-out images without
    the shortcut, judged for promotion). `mask` marks the evidence (relevance; all of the image
    without one), `confounder_mask` the known shortcut (none without one). `channels` is 1, 3,
    or None: 3 if any image is in colour, else 1.

    Every row is checked before anything trains; all problems are reported at once. Rows are
    written to the prepared folder `out` as they are read, so memory does not grow with the
    manifest, and the data returned reads from there; `out` stays as it was when a row is bad.
    Without `out` the data is returned in memory (small sets).
    """
    path = Path(path)
    rows = _manifest_rows(path)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="xbl-manifest-") as tmp:
            return _in_memory(read_manifest(path, image_size, channels, Path(tmp) / "prepared"))
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        ids, problems = _write_rows(path, rows, image_size, channels, staging)
        labels = [(r.get("label") or "").strip() for r in rows]
        splits = [(r.get("split") or "").strip() for r in rows]
        trained = {lab for lab, s in zip(labels, splits) if s == "train" and lab}
        for lab in sorted(set(labels) - trained - {""}):
            problems.append(f"{path.name}: class {lab!r} has no training images")
        if problems:
            raise ManifestError(
                f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems)
            )
        classes = np.array(sorted(set(labels)))
        index = {
            "labels": np.searchsorted(classes, labels).astype(np.int64),
            "split": np.array(splits),
            "ids": np.array(ids),
            "classes": classes,
        }
        np.savez(staging / INDEX, **index)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return PreparedData.load(out)


def _manifest_rows(path: Path) -> list[dict]:
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
    return rows


def _write_rows(
    path: Path, rows: list[dict], image_size: int, channels: int | None, folder: Path
) -> tuple[list[str], list[str]]:
    """Check every row and write each good one while none was bad: (IDs, problems)."""
    writer = _ImageRows(folder, len(rows), image_size, channels)
    ids, problems, first_line = [], [], {}
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
        ids.append(one.image_id)
        if not problems:
            writer.write(one)
    if not problems:
        writer.close()
    return ids, problems


def _in_memory(data: PreparedData) -> PreparedData:
    """The same data with its image-sized arrays read whole from disk."""
    return replace(data, **{name: getattr(data, name)[:] for name in IMAGE_SIZED})


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


def build_dataset(cfg: DataConfig, root: Path = Path("."), out: Path | None = None) -> PreparedData:
    """The dataset named in params' `data` section; with `out`, written there as the prepared
    folder and read back from it (a user's images one at a time, never all in memory)."""
    if cfg.dataset not in ("decoy-digits", "decoy-lesions"):
        source = root / cfg.dataset
        manifest = folder_manifest(source, cfg.split, cfg.seed) if source.is_dir() else source
        return read_manifest(manifest, cfg.image_size, _channels(cfg), out)
    data = _built_in(cfg)
    if out is None:
        return data
    data.save(out)
    return PreparedData.load(out)


def _built_in(cfg: DataConfig) -> PreparedData:
    """The generated datasets: a few thousand small images, made in memory."""
    if cfg.dataset == "decoy-digits":
        data = decoy_digits(cfg.image_size, cfg.digit_size, cfg.decoy_size, cfg.split, cfg.seed)
        if cfg.channels == 3:  # greyscale digits on R, G and B, e.g. for RGB-pretrained weights
            data.images = np.repeat(data.images, 3, axis=1)
        return data
    from xbl.lesions import decoy_lesions  # xbl.lesions imports this module

    data = decoy_lesions(cfg.image_size, split=cfg.split, seed=cfg.seed)
    if cfg.channels == 1:  # PIL's luma, as for a user's colour images
        luma = np.tensordot([0.299, 0.587, 0.114], data.images.astype(float), axes=(0, 1))
        data.images = luma.round().astype(np.uint8)[:, None]
    return data


def _channels(cfg: DataConfig) -> int | None:
    return None if cfg.channels == "auto" else int(cfg.channels)
