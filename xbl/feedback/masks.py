"""The feedback masks each round writes: one manifest and one PNG per answered image, under
data/feedback/; read back and joined to a data version's images by image ID."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from xbl.data.prepared import PreparedData
from xbl.errors import DataError

# ---------------------------------------------------------------- manifests, one per round
MANIFEST_FIELDS = [
    "image_id",
    "index",
    "round",
    "mask",
    "ignored_pixels",
    "keep",
    "kept_pixels",
    "rating",
    "annotator_seconds",
    "source",  # answer (the annotator's own) | propagated (a confident carried mask) | reviewed
    "confidence",  # a carried mask's confidence (empty for answers)
]


SOURCES = ("answer", "propagated", "reviewed")


def mask_file_name(image_id: str) -> str:
    """A flat, unique file name for an image's mask: the ID percent-encoded (a user's IDs are
    paths such as `cat/001.png`; decoy-digits' `digit-0001` stays as it is), then `.png`."""
    return f"{quote(image_id, safe='')}.png"


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image) > 0


def write_feedback(
    out: Path,
    queries: dict,
    masks: dict,
    ratings: dict,
    problems: list[str],
    keep: dict,
    seconds: dict | None = None,
    sources: dict | None = None,
    confidence: dict | None = None,
) -> Path:
    """masks/<name> (W, 255 = ignore) and keep/<name> (255 = kept as evidence), named by
    `mask_file_name`, manifest.csv and problems.txt in `out`; images that are not among the
    round's `queries` are skipped. An image missing from `keep` kept nothing; `seconds` is the
    annotator's time per image, kept so a round's cost travels with its masks; `sources` says
    where a mask came from (default: the annotator's answer), `confidence` a carried mask's."""
    seconds, sources, confidence = seconds or {}, sources or {}, confidence or {}
    for folder in ("masks", "keep"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, MANIFEST_FIELDS)
        writer.writeheader()
        for image_id, mask in sorted(masks.items()):
            if image_id not in queries:
                continue
            kept = keep[image_id] if image_id in keep else np.zeros_like(mask, dtype=bool)
            name = mask_file_name(image_id)
            _save_mask(mask, out / "masks" / name)
            _save_mask(kept, out / "keep" / name)
            writer.writerow(
                {
                    "image_id": image_id,
                    "index": queries[image_id]["index"],
                    "round": queries[image_id]["round"],
                    "mask": f"masks/{name}",
                    "ignored_pixels": int(mask.sum()),
                    "keep": f"keep/{name}",
                    "kept_pixels": int(kept.sum()),
                    "rating": ratings.get(image_id) or "",
                    "annotator_seconds": round(float(seconds.get(image_id, 0.0)), 3),
                    "source": sources.get(image_id, SOURCES[0]),
                    "confidence": (
                        round(float(confidence[image_id]), 4) if image_id in confidence else ""
                    ),
                }
            )
    (out / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
    return manifest


# ---------------------------------------------------------------- reading masks back, by image ID
@dataclass(frozen=True)
class MaskRecord:
    """One answered image as its round wrote it."""

    image_id: str  # "" in a row written before rows named their image
    index: int | None  # its row in the data version the round ran on; never used to join
    round: int | None
    where: str  # the manifest and line, for messages
    ignore: np.ndarray
    keep: np.ndarray
    rating: str


def _int_or_none(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def _mask_record(row: dict, root: Path, where: str) -> MaskRecord:
    """A manifest row with its masks; one written before keep masks were collected (no `keep`
    column) reads with an empty keep mask: that image affirmed no evidence."""
    image_id = (row.get("image_id") or "").strip()
    index = _int_or_none(row.get("index"))
    if not image_id and index is None:
        raise ValueError("neither an image_id nor an index: no image to join the mask to")
    mask_png = (row.get("mask") or "").strip()
    if not mask_png:
        raise ValueError("no mask file named")
    ignore = _load_mask(root / mask_png)
    keep_png = row.get("keep")
    keep = _load_mask(root / keep_png) if keep_png else np.zeros_like(ignore)
    rating = row.get("rating") or ""
    return MaskRecord(image_id, index, _int_or_none(row.get("round")), where, ignore, keep, rating)


# What a mask PNG that cannot be read raises: missing (OSError), not a PNG, a corrupt chunk
# (Pillow's SyntaxError), or beyond Pillow's decompression-bomb limit.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_mask_records(manifests: list[str]) -> list[MaskRecord]:
    """Every round's rows as written, oldest round first; every unreadable row is named at once."""
    records, problems = [], []
    for manifest in manifests:
        root = Path(manifest).parent
        with open(manifest, newline="") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
                where = f"{manifest} line {line}"
                try:
                    records.append(_mask_record(row, root, where))
                except _UNREADABLE as exc:
                    problems.append(f"{where}: {exc}")
    if problems:
        raise DataError(
            f"{len(problems)} feedback row(s) cannot be read:\n  " + "\n  ".join(problems)
        )
    return records


@dataclass
class JoinedFeedback:
    """Every round's masks on the images of one data version, and the masks that could not go
    there, each named: by image ID, or by manifest line for a row that has no ID."""

    rows: np.ndarray  # each joined mask's image: its row in this data version
    ignore: np.ndarray  # W (n,H,W), 1 = ignore
    keep: np.ndarray  # (n,H,W), kept as evidence
    ratings: dict[int, str]  # by position in `rows`
    gone: list[str] = field(default_factory=list)  # images this data no longer holds
    # images now in val, test or audit (a folder's split is drawn again when it grows):
    # training on them would leak the images the model is judged on
    outside_train: list[str] = field(default_factory=list)
    # rows with only an index, made on another or an unknown data version: the index may name
    # another image, so they cannot be joined
    unjoinable: list[str] = field(default_factory=list)
    # rows with only an index, joined by it because they were made on this very data version
    by_index: list[str] = field(default_factory=list)

    def left_out(self) -> int:
        return len(self.gone) + len(self.outside_train) + len(self.unjoinable)

    def notes(self) -> list[str]:
        """One line per kind of mask not joined by image ID: how many, why, and which."""
        return [
            f"{len(names)} feedback mask(s) {kind.replace('_', ' ')} ({why}): {', '.join(names)}"
            for kind, why in _WHY.items()
            if (names := getattr(self, kind))
        ]

    def summary(self) -> dict:
        """Counts and names, for a log line and for a round's result."""
        return {
            "joined": len(self.rows),
            "left_out": self.left_out(),
            **{f"{k}_count": len(getattr(self, k)) for k in _WHY},
            **{k: list(getattr(self, k)) for k in _WHY},
        }


_WHY = {
    "gone": "their images are no longer in the data",
    "outside_train": "their images are no longer training images",
    "unjoinable": "no image ID, and made on another or an unknown data version",
    "by_index": "no image ID; joined by index on the data version they were made on",
}


def _join_row(
    record: MaskRecord,
    position: dict[str, int],
    data: PreparedData,
    version: str | None,
    made_on: dict[int, str],
) -> tuple[str, int | None]:
    """Where one mask goes: (outcome, row in `data`); outcome is joined, by_index, gone,
    outside_train or unjoinable."""
    if record.image_id:
        outcome, row = "joined", position.get(record.image_id)
        if row is None:
            return "gone", None
    elif version is not None and made_on.get(record.round) == version:
        outcome, row = "by_index", record.index
        if not 0 <= row < len(data):
            return "unjoinable", None
    else:
        return "unjoinable", None
    if data.split[row] != "train":
        return "outside_train", None
    return outcome, row


def join_feedback(
    records: list[MaskRecord],
    data: PreparedData,
    version: str | None = None,
    made_on: dict[int, str] | None = None,
) -> JoinedFeedback:
    """Each mask on its own image in `data`, found by image ID, never by row position: when
    images are added or removed the rows shift, and a recorded index names another image.

    A row written without an image ID falls back to its index only when its round ran on
    `version` itself (`made_on`: round -> data version); anything else is left out and named."""
    position = {str(image_id): i for i, image_id in enumerate(data.ids)}
    joined = JoinedFeedback(np.zeros(0, dtype=int), *_no_masks(data), {})
    rows, kept_records = [], []
    for record in records:
        outcome, row = _join_row(record, position, data, version, made_on or {})
        name = record.image_id or f"{record.where} (index {record.index})"
        if row is None:
            getattr(joined, outcome).append(name)
            continue
        if outcome == "by_index":
            joined.by_index.append(name)
        rows.append(row)
        kept_records.append(record)
    if kept_records:
        _check_shapes(kept_records, data)
        joined.rows = np.array(rows)
        joined.ignore = np.stack([r.ignore for r in kept_records])
        joined.keep = np.stack([r.keep for r in kept_records])
        joined.ratings = {j: r.rating for j, r in enumerate(kept_records) if r.rating}
    return joined


def _no_masks(data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    empty = np.zeros((0, *data.images.shape[-2:]), dtype=bool)
    return empty, empty.copy()


def _check_shapes(records: list[MaskRecord], data: PreparedData) -> None:
    """Masks drawn at another image size (data.image_size changed) fit no image of this data."""
    size = tuple(data.images.shape[-2:])
    bad = [r for r in records if r.ignore.shape != size or r.keep.shape != size]
    if bad:
        raise DataError(
            f"{len(bad)} feedback mask(s) do not match this data's {size[1]}x{size[0]} images "
            "(was data.image_size changed?):\n  "
            + "\n  ".join(f"{r.where} ({r.image_id}): {r.ignore.shape[::-1]}" for r in bad)
        )


def read_feedback(
    manifests: list[str],
    data: PreparedData,
    version: str | None = None,
    made_on: dict[int, str] | None = None,
) -> JoinedFeedback:
    """All rounds' feedback joined to `data` by image ID (`join_feedback`)."""
    return join_feedback(read_mask_records(manifests), data, version, made_on)
