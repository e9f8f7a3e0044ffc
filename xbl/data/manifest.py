"""A user's images through a manifest CSV or a folder layout, checked row by row and written in the prepared format."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from xbl.data.images import DiskArray, RowWriter
from xbl.data.prepared import AUDIT, IMAGE_SIZED, INDEX, SPLITS, PreparedData, stratified_split


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
    splits = stratified_split(labels, split, np.random.default_rng(seed))
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
