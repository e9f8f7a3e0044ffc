"""The prepared format every dataset is built into (built-in ones in digits.py and lesions.py,
a user's in manifest.py), its splits, and the stratified split they share.

A prepared dataset is a folder (DVC-tracked as one output):
  images.npy      (N,C,H,W) uint8, C 1 (greyscale) or 3 (RGB)
  relevance.npy   (N,H,W) bool  where the evidence is (the digit; a user's mask, else all ones)
  confounder.npy  (N,H,W) bool  the known shortcut (the decoy; a user's confounder_mask, else
                                empty)
  index.npz       labels (N,) int64, split (N,) str in {train,val,test,audit}, ids (N,) str
                  (unique; for user data the image's path in the dataset folder), classes (K,)
Loaded, the three image-sized arrays stay on disk and are read row by row (xbl.data.images); the
index is small and held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xbl.data.images import ArrayImages, DiskArray, to_tensor

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

    def take(self, rows: np.ndarray) -> PreparedData:
        """The same dataset restricted to `rows` (positions or a boolean mask), every
        per-image array alike; the classes stay."""
        per_image = {k: np.asarray(v)[rows] for k, v in vars(self).items() if k != "classes"}
        return PreparedData(**per_image, classes=self.classes)

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
def stratified_split(labels: np.ndarray, fractions: dict, rng: np.random.Generator) -> np.ndarray:
    split = np.empty(len(labels), dtype="<U5")
    cut_train = fractions["train"]
    cut_val = cut_train + fractions["val"]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        a, b = round(len(idx) * cut_train), round(len(idx) * cut_val)
        split[idx[:a]], split[idx[a:b]], split[idx[b:]] = "train", "val", "test"
    return split
