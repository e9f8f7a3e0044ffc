"""decoy-lesions: procedural skin-lesion-like RGB images with an ISIC-style confounder.

The classes differ in shape, border and texture, drawn from one colour distribution:
  nevus-like  round, smooth soft border, even texture (slightly darker centre),
  irregular   star-like border (high harmonics), sharp edge, mottled texture,
  halo        elongated, smooth border, dark dots inside and a pale ring around it.
Size, position, rotation, colour and the strength of each cue vary within a class, and a few
images of one class borrow a weak cue of another, so the task is learnable but not trivial.

The confounder imitates ISIC's colour-chart stickers and dermoscope rulers: code 0 a blue
patch, 1 a ruler (a row of tick marks), 2 a yellow patch, drawn at a random real-valued
position, scale and angle (antialiased, so it lines up with no pixel grid) and never touching
the lesion. Its code is the label in train and val and random in test and audit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from xbl.data.prepared import AUDIT, PreparedData, stratified_split
from xbl.progress import progress

CLASSES = ("nevus-like", "irregular", "halo")
CONFOUNDERS = ("blue patch", "ruler", "yellow patch")  # the code k draws CONFOUNDERS[k]
_PATCH_RGB = {0: (40, 90, 200), 2: (230, 200, 40)}
_MIN_SIZE = 32


@dataclass
class _Lesion:
    image: np.ndarray  # (H, W, 3) float, skin and lesion, no confounder
    relevance: np.ndarray  # (H, W) bool, every pixel the lesion (or its halo) changed
    keepout: np.ndarray  # (H, W) bool, the relevance grown by a margin: no confounder here


def decoy_lesions(
    image_size: int = 64,
    n_per_class: int | None = None,
    split: dict | None = None,
    seed: int = 0,
    decoys: bool = True,
    classes: int = 3,
    correlated: bool = True,
) -> PreparedData:
    """Lesion-like images on textured skin, with a sticker or ruler coding the label.

    n_per_class None: 4,200 images in all (before the audit copy). The audit split is a copy
    of the validation lesions (ids `<id>-audit`) whose confounders are re-drawn with a random
    code, position and scale. The seed fixes the split, every lesion and every confounder.
    correlated False draws every code at random, train and val too: a reference dataset where
    the marks are present but carry no label (a model that never saw a mark is thrown by one).
    """
    if classes not in (2, 3):
        raise ValueError(f"decoy-lesions has 2 or 3 classes, not {classes}")
    if image_size < _MIN_SIZE:
        raise ValueError(f"decoy-lesions needs image_size >= {_MIN_SIZE}, got {image_size}")
    split = split or {"train": 0.6, "val": 0.2, "test": 0.2}
    n_per_class = n_per_class or 4200 // classes
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes, dtype=np.int64), n_per_class)
    splits = stratified_split(labels, split, rng)
    lesions = [
        _draw_lesion(rng, int(y), image_size)
        for y in progress(labels, f"drawing {len(labels)} lesions")
    ]
    ids = np.array([f"lesion-{i:04d}" for i in range(len(labels))])
    val = np.flatnonzero(splits == "val")
    lesions += [lesions[i] for i in val]
    labels = np.concatenate([labels, labels[val]])
    splits = np.concatenate([splits, np.full(len(val), AUDIT)])
    ids = np.concatenate([ids, np.char.add(ids[val], "-audit")])
    n = len(labels)
    shortcut_free = np.isin(splits, ("test", AUDIT)) | (not correlated)
    code = np.where(shortcut_free, rng.integers(0, classes, n), labels)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    confounder = np.zeros((n, image_size, image_size), dtype=bool)
    for i, lesion in enumerate(lesions):
        image = lesion.image
        if decoys:
            image, confounder[i] = _stamp_confounder(rng, image, lesion.keepout, int(code[i]))
        images[i] = np.clip(image + 0.5, 0, 255)
    return PreparedData(
        images=np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
        labels=labels,
        split=splits,
        relevance=np.stack([lesion.relevance for lesion in lesions]),
        confounder=confounder,
        ids=ids,
        classes=np.array(CLASSES[:classes]),
    )


# ---------------------------------------------------------------- fields over the pixel grid
@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return y, x


@lru_cache(maxsize=32)
def _upsampler(cells: int, size: int) -> np.ndarray:
    """(size, cells+1) weights of linear interpolation from a coarse lattice to the pixels."""
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(pos.astype(int), cells - 1)
    weights = np.zeros((size, cells + 1))
    weights[np.arange(size), lo] = 1 - (pos - lo)
    weights[np.arange(size), lo + 1] = pos - lo
    return weights


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Value noise: a random coarse lattice, bilinearly spread over size x size (about N(0,1))."""
    up = _upsampler(cells, size)
    return up @ rng.standard_normal((cells + 1, cells + 1)) @ up.T


def _rotated(cy: float, cx: float, angle: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel centre in a frame centred at (cy, cx) and turned by `angle`."""
    y, x = _pixel_centres(size)
    dy, dx = y - cy, x - cx
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


# ---------------------------------------------------------------- skin and lesion
def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin tone varying per image, blotchy at low frequency, with fine sensor-like noise."""
    tone = np.array([214.0, 168.0, 140.0]) * rng.uniform(0.82, 1.08) + rng.normal(0, 6, 3)
    blotches = 1 + 0.05 * _smooth_noise(rng, 4, size)
    tint = rng.normal(0, 0.01, 3) * _smooth_noise(rng, 3, size)[..., None]
    noise = rng.normal(0, rng.uniform(3, 8), (size, size, 3))
    return tone * (blotches[..., None] + tint) + noise


def _border(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Harmonics, amplitudes and phases of the outline: radius(phi) = 1 + sum a cos(k phi + p)."""
    if label == 1:  # irregular: a few high harmonics make a star-like, jagged outline
        ks = rng.choice(np.arange(4, 11), size=3, replace=False)
        amps = rng.uniform(0.05, 0.13, 3)
    else:  # smooth: low harmonics only, a gently wobbling oval
        ks, amps = np.array([2, 3]), rng.uniform(0.0, 0.05, 2)
    return ks, amps, rng.uniform(0, 2 * np.pi, len(ks))


def _draw_lesion(rng: np.random.Generator, label: int, size: int) -> _Lesion:
    """One image of class `label`: the shape's cues are drawn first, then the lesion is placed."""
    aspect = rng.uniform(*((1.0, 1.5), (1.0, 1.6), (1.5, 2.4))[label])
    radius = rng.uniform(0.11, 0.18) * size  # geometric mean of the semi-axes, in pixels
    soft = rng.uniform(*((1.0, 2.0), (0.4, 0.9), (0.8, 1.5))[label])  # edge width, pixels
    ring = _ring_strength(rng, label)
    ring_width = rng.uniform(1.2, 1.4) if ring else 1.0
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    angle = rng.uniform(0, np.pi)
    ks, amps, phases = _border(rng, label)
    margin = 0.04 * size + 1  # the confounder stays this far (pixels) from the lesion
    extent = a * (1 + amps.sum()) * ring_width + soft + 1  # the lesion's longest reach
    cy, cx = rng.uniform(extent, size - extent, 2) if extent < size / 2 else (size / 2,) * 2
    u, v = _rotated(cy, cx, angle, size)
    rho, phi = np.hypot(u / a, v / b), np.arctan2(v / b, u / a)
    border = 1 + sum(amp * np.cos(k * phi + p) for k, amp, p in zip(ks, amps, phases))
    inside = np.clip((border - rho) * radius / soft + 0.5, 0, 1)  # antialiased coverage
    skin = _skin(rng, size)
    image = skin * (1 - inside[..., None]) + _pigment(rng, label, rho, size) * inside[..., None]
    changed = inside > 0.02
    if ring:  # a pale, depigmented ring around the lesion (halo nevus)
        halo = np.clip((border * ring_width - rho) * radius / 1.5 + 0.5, 0, 1) * (1 - inside)
        pale = np.array([245.0, 228.0, 215.0])
        image = image * (1 - ring * halo[..., None]) + pale * ring * halo[..., None]
        changed |= halo > 0.02
    # Distance to the outline in pixels, to first order: the gap in rho over rho's gradient.
    gradient = np.hypot(u / a**2, v / b**2) / np.maximum(rho, 1e-6)
    keepout = (rho - border * ring_width) / gradient < soft + margin
    return _Lesion(image, changed, keepout | changed)


def _ring_strength(rng: np.random.Generator, label: int) -> float:
    """Halo lesions have a clear ring; one nevus in six a faint one; irregular ones none."""
    chance, low, high = ((1 / 6, 0.15, 0.35), (0.0, 0.0, 0.0), (1.0, 0.45, 0.9))[label]
    return rng.uniform(low, high) if rng.uniform() < chance else 0.0


def _pigment(rng: np.random.Generator, label: int, rho: np.ndarray, size: int) -> np.ndarray:
    """The lesion's colour (one distribution for all classes) and its class's texture."""
    brown = np.array([118.0, 74.0, 52.0]) * rng.uniform(0.6, 1.15) + rng.normal(0, 6, 3)
    shade = 1 - rng.uniform(0.05, 0.25) * np.clip(1 - rho**2, 0, 1)  # darker towards the centre
    fine = 1 + 0.03 * rng.standard_normal(rho.shape)
    if label == 1:  # mottled: blotches of darker and lighter pigment
        cells = int(rng.integers(5, 10))
        fine = fine + rng.uniform(0.2, 0.4) * _smooth_noise(rng, cells, size)
    dots = 0
    if label == 1:  # a few dark dots, as some irregular lesions have
        dots = int(rng.integers(0, 6))
    elif label == 2:
        dots = int(rng.integers(8, 21))
    return brown * (shade * fine * _dots(rng, dots, rho, size))[..., None]


def _dots(rng: np.random.Generator, count: int, rho: np.ndarray, size: int) -> np.ndarray:
    """Dark globules at random places inside the lesion (1 elsewhere)."""
    texture = np.ones_like(rho)
    inner = np.flatnonzero(rho.ravel() < 0.8)
    if count == 0 or len(inner) == 0:
        return texture
    y, x = _pixel_centres(size)
    picks = rng.choice(inner, size=count)
    centres_y = y.ravel()[picks] + rng.uniform(-0.5, 0.5, count)
    centres_x = x.ravel()[picks] + rng.uniform(-0.5, 0.5, count)
    dot_radius = 0.018 * size + 0.4
    for dy, dx in zip(centres_y, centres_x):
        d = np.hypot(y - dy, x - dx)
        texture *= 1 - 0.5 * np.clip(dot_radius - d + 0.5, 0, 1)
    return texture


# ---------------------------------------------------------------- the confounder
def _stamp_confounder(
    rng: np.random.Generator, image: np.ndarray, keepout: np.ndarray, code: int
) -> tuple[np.ndarray, np.ndarray]:
    """`image` with a sticker or ruler of `code` away from the lesion, and the pixels it covers.

    Positions are retried until the mark misses the lesion's keep-out zone; every tenth try the
    shape (scale, angle) is re-drawn a little smaller, so a big lesion in a small image still
    leaves room.
    """
    size = image.shape[0]
    for attempt in range(400):
        if attempt % 10 == 0:
            shape = _confounder_shape(rng, code, size, scale=1 - attempt / 600)
        reach = shape["reach"]
        cy, cx = rng.uniform(reach, size - reach, 2)
        cover = _coverage(shape, cy, cx, size)
        mask = cover > 0
        if not (mask & keepout).any():
            colour = shape["colour"]
            out = image * (1 - cover[..., None]) + colour * cover[..., None]
            return out, mask
    raise RuntimeError("no room for the confounder beside the lesion")  # pragma: no cover


def _confounder_shape(rng: np.random.Generator, code: int, size: int, scale: float) -> dict:
    """Size (times `scale`), angle and colour of one mark; `reach` bounds it from its centre."""
    if code == 1:  # a ruler: a base line with alternately long and short ticks
        length = rng.uniform(0.22, 0.36) * size * scale
        ticks = int(rng.integers(6, 10))
        tick = rng.uniform(0.05, 0.08) * size * scale
        angle = rng.uniform(-0.35, 0.35) + rng.integers(0, 2) * np.pi / 2
        colour = np.array([32.0, 30.0, 34.0]) + rng.normal(0, 6, 3)
        width = 0.6 + 0.008 * size
        reach = np.hypot(length / 2 + 1, tick + 1)
        return {"kind": "ruler", "length": length, "ticks": ticks, "tick": tick,
                "angle": angle, "width": width, "colour": colour, "reach": reach}  # fmt: skip
    half = rng.uniform(0.045, 0.08) * size * scale
    ratio = rng.uniform(0.75, 1.33)
    colour = np.array(_PATCH_RGB[code], dtype=float) + rng.normal(0, 12, 3)
    return {"kind": "patch", "half": (half * ratio, half / ratio),
            "angle": rng.uniform(0, np.pi / 2), "colour": colour,
            "reach": half * max(ratio, 1 / ratio) * np.sqrt(2) + 1}  # fmt: skip


def _coverage(shape: dict, cy: float, cx: float, size: int) -> np.ndarray:
    """Antialiased coverage (0..1) of the mark centred at the real-valued (cy, cx)."""
    u, v = _rotated(cy, cx, shape["angle"], size)
    if shape["kind"] == "patch":
        hu, hv = shape["half"]
        return np.clip(np.minimum(hu - np.abs(u), hv - np.abs(v)) + 0.5, 0, 1)
    length, ticks, width = shape["length"], shape["ticks"], shape["width"]
    spacing = length / (ticks - 1)
    j = np.clip(np.round((u + length / 2) / spacing), 0, ticks - 1)
    du = u - (j * spacing - length / 2)
    tall = np.where(j % 2 == 0, shape["tick"], shape["tick"] * 0.55)
    tick = np.clip(width / 2 - np.abs(du) + 0.5, 0, 1) * np.clip(
        np.minimum(tall - v, v) + 0.5, 0, 1
    )
    base = np.clip(width / 2 - np.abs(v) + 0.5, 0, 1) * np.clip(
        length / 2 + width / 2 - np.abs(u) + 0.5, 0, 1
    )
    return np.maximum(tick, base)
