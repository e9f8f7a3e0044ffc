"""A user's images through a manifest CSV or a folder layout, checked row by row and written in the prepared format."""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image

from xbl.data.images import DiskArray, RowWriter
from xbl.data.prepared import AUDIT, IMAGE_SIZED, INDEX, SPLITS, PreparedData, stratified_split
from xbl.errors import DataError
from xbl.paths import FEEDBACK_ROOT, ROUNDS_ROOT


# ---------------------------------------------------------------- user manifests
class ManifestError(DataError):
    """A manifest with bad rows; the message names every row and its problem."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


_GREY_MODES = ("1", "L", "LA", "I", "F") + tuple(m for m in Image.MODES if m.startswith("I;16"))

# What Pillow's decoders raise on a damaged file: OSError for a truncated or garbled stream
# (UnidentifiedImageError is one), SyntaxError for a broken PNG chunk met while decoding, and
# the rest from a plugin that read a header field past the end of its data.
_UNDECODABLE = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
)


def _too_large(path: Path, kind: str, exc: Exception) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(pixels[1]):,} pixels" if pixels else "more pixels than Pillow allows"
    return (
        f"{kind} {path} has {size}, over Pillow's decompression-bomb limit of "
        f"{Image.MAX_IMAGE_PIXELS:,}; resize it (prepare scales every image down to "
        "data.image_size anyway) and list the smaller file"
    )


def _open_rgb_or_grey(path: Path, kind: str) -> Image.Image:
    """The file as an 8-bit PIL image, mode L (greyscale) or RGB (colour; alpha dropped).

    16-bit greyscale (common for radiographs) is scaled to 8 bits, not clipped as PIL's
    convert("L") would. An RGB file whose three channels are equal everywhere is greyscale.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; either is refused here, before
            # the pixels are decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit PNGs open as I;16 or I
                wide = np.asarray(im, dtype=np.float64).clip(0, 65535)
                return Image.fromarray((wide / 257).round().astype(np.uint8))
            if im.mode in _GREY_MODES:
                return im.convert("L")
            rgb = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(_too_large(path, kind, exc)) from None
    except _UNDECODABLE as exc:
        raise ValueError(f"unreadable {kind} {path}: {type(exc).__name__}: {exc}") from None
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

    def discard(self) -> None:
        for writer in (self.images, *self.masks.values()):
            writer.discard()


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
    path: str | Path,
    image_size: int,
    channels: int | None = None,
    out: Path | None = None,
    project: Path = Path("."),
) -> PreparedData:
    """Load a CSV manifest: image, label, split[, mask][, confounder_mask].

    Paths are relative to the manifest's folder and must stay inside it; an image's ID is that
    path, normalised (POSIX), so `cat/001.png` and `dog/001.png` are two images and the same
    image listed twice is an error. split is train, val, test or audit (held-out images without
    the shortcut, judged for promotion). `mask` marks the evidence (relevance; all of the image
    without one), `confounder_mask` the known shortcut (none without one). `channels` is 1, 3,
    or None: 3 if any image is in colour, else 1. The file is UTF-8 (with or without a BOM) or
    UTF-16 with a BOM, separated by ',' or, when its header says so, by ';', tab or '|'.

    Every row is checked before anything trains; all problems are reported at once. Rows are
    written to the prepared folder `out` as they are read, so memory does not grow with the
    manifest, and the data returned reads from there; `out` stays as it was when a row is bad.
    `out` is replaced whole, so it must hold nothing prepare did not write, and may not be or
    hold the images' folder or the `project`'s folder, data/raw, feedback or rounds.
    Without `out` the data is returned in memory (small sets).
    """
    path = Path(path)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="xbl-manifest-") as tmp:
            return _in_memory(read_manifest(path, image_size, channels, Path(tmp) / "prepared"))
    out = Path(out)
    rows = _manifest_rows(path)
    check_out_folder(out, Path(project), path.parent)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_prepared(path, rows, image_size, channels, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return PreparedData.load(out)


def _write_prepared(
    path: Path, rows: list[tuple[int, dict]], size: int, channels: int | None, folder: Path
) -> None:
    """Every row written to `folder` with the index, or ManifestError naming every bad row."""
    ids, problems = _write_rows(path, rows, size, channels, folder)
    labels = [(r.get("label") or "").strip() for _, r in rows]
    splits = [(r.get("split") or "").strip() for _, r in rows]
    trained = {lab for lab, s in zip(labels, splits) if s == "train" and lab}
    for lab in sorted(set(labels) - trained - {""}):
        problems.append(f"{path.name}: class {lab!r} has no training images")
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems))
    classes = np.array(sorted(set(labels)))
    index = {
        "labels": np.searchsorted(classes, labels).astype(np.int64),
        "split": np.array(splits),
        "ids": np.array(ids),
        "classes": classes,
    }
    np.savez(folder / INDEX, **index)


# What prepare leaves in its folder: the arrays, the index and the stage's summary.json.
PREPARED_FILES = frozenset({*(f"{name}.npy" for name in IMAGE_SIZED), INDEX, "summary.json"})
_OWN_FOLDER = "data.out must be a folder of its own, such as data/prepared"


def check_out_folder(out: Path, project: Path = Path("."), images: Path | None = None) -> None:
    """Refuse, as ManifestError, an `out` that prepare may not replace whole: one holding
    anything prepare did not write, or that is or holds the `images`' folder, the `project`
    folder or its data/raw, feedback or rounds."""
    guarded = {
        "the project folder": project,
        **{p: project / p for p in ("data/raw", FEEDBACK_ROOT, ROUNDS_ROOT)},
        **({"the images' folder": images} if images is not None else {}),
    }
    for name, folder in guarded.items():
        if folder.resolve().is_relative_to(out.resolve()):
            raise ManifestError(f"{out} is or holds {name} ({folder}); {_OWN_FOLDER}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ManifestError(f"{out} is not a folder prepare made; {_OWN_FOLDER}")
    foreign = sorted(
        p.name for p in (out.iterdir() if out.is_dir() else ()) if not _prepared_file(p)
    )
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise ManifestError(
            f"{out} holds {foreign[:10]}{more}, which prepare did not write, and prepare "
            f"replaces the whole folder; {_OWN_FOLDER}"
        )


def _prepared_file(path: Path) -> bool:
    return path.name in PREPARED_FILES and path.is_file() and not path.is_symlink()


_REQUIRED = frozenset({"image", "label", "split"})
_SEPARATORS = (",", ";", "\t", "|")  # ',' first: it wins a tie
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # Excel's "Unicode text" is UTF-16


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """Each row with the line it ends on (a quoted value may span lines; blank lines are
    skipped). Fields past the header's are kept under None, for the row check to report."""
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    text = _manifest_text(path)
    separator = _separator(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    try:
        header = [name.strip() for name in next(reader, [])]
        _check_header(path, header, separator)
        rows = [(reader.line_num, _row(header, fields)) for fields in reader if fields]
    except csv.Error as exc:  # a NUL byte, an unclosed quote at the end, a huge field
        raise ManifestError(f"{path} line {reader.line_num}: {exc}") from None
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def _manifest_text(path: Path) -> str:
    raw = path.read_bytes()
    encoding = "utf-16" if raw.startswith(_UTF16_BOMS) else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        where = _undecodable_lines(raw) if encoding == "utf-8-sig" else f"at byte {exc.start}"
        raise ManifestError(
            f"{path} is not {encoding.removesuffix('-sig').upper()} text: {where}. Save it as "
            'UTF-8 (in Excel: "CSV UTF-8"; or iconv -f cp1252 -t utf-8 OLD > NEW)'
        ) from None


def _undecodable_lines(raw: bytes) -> str:
    """Which lines hold bytes that are not UTF-8, and the first such byte (no UTF-8 sequence
    contains a newline byte, so lines can be split before decoding)."""
    bad, offset = [], 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append((number, offset + exc.start, line[exc.start : exc.start + 1]))
        offset += len(line) + 1
    number, byte, value = bad[0]
    lines = ", ".join(str(n) for n, _, _ in bad)
    return f"line(s) {lines} (the first at byte {byte}: {value!r} on line {number})"


def _separator(text: str) -> str:
    """The separator that splits the header into the most of the required columns."""
    header = text.split("\n", 1)[0].rstrip("\r")

    def required(separator: str) -> int:
        names = next(csv.reader([header], delimiter=separator), [])
        return len(_REQUIRED & {name.strip() for name in names})

    return max(_SEPARATORS, key=required)


def _check_header(path: Path, header: list[str], separator: str) -> None:
    missing = _REQUIRED - set(header)
    if missing:
        read = "" if separator == "," else f", read with {separator!r} as the separator"
        raise ManifestError(
            f"{path}: missing column(s) {sorted(missing)} (the header line gives {header}{read})"
        )


def _row(header: list[str], fields: list[str]) -> dict:
    row: dict = dict(zip(header, fields))
    if len(fields) > len(header):
        row[None] = fields[len(header) :]
    return row


def _write_rows(
    path: Path, rows: list[tuple[int, dict]], image_size: int, channels: int | None, folder: Path
) -> tuple[list[str], list[str]]:
    """Check every row and write each good one while none was bad: (IDs, problems)."""
    writer = _ImageRows(folder, len(rows), image_size, channels)
    try:
        ids, problems = _check_rows(path, rows, image_size, writer)
    except BaseException:
        writer.discard()
        raise
    if problems:
        writer.discard()
    else:
        writer.close()
    return ids, problems


def _check_rows(
    path: Path, rows: list[tuple[int, dict]], image_size: int, writer: _ImageRows
) -> tuple[list[str], list[str]]:
    ids, problems, first_line = [], [], {}
    for line, row in rows:
        where = f"{path.name} line {line} ({row.get('image')})"
        problem = _field_problem(row)
        if problem:
            problems.append(f"{where}: {problem}")
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
    return ids, problems


def _field_problem(row: dict) -> str | None:
    """What is wrong with a row's fields before its files are opened, if anything."""
    if None in row:
        given = len(row) - 1 + len(row[None])
        return (
            f"{given} fields, the header has {len(row) - 1} (quote a value holding the separator)"
        )
    if not (row.get("label") or "").strip():
        return "empty class label"
    split = (row.get("split") or "").strip()
    if split not in (*SPLITS, AUDIT):
        return f"unknown split {split!r} (use train, val, test or audit)"
    return None


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
