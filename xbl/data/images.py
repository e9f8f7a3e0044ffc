"""How images reach the model: rows of the prepared arrays read from disk on demand, and
labelled image sets that a torch DataLoader reads batch by batch.

A prepared split is never loaded whole, so memory does not grow with the dataset: training,
pool scoring, saliency and evaluation all go through `Images` and `batches`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xbl.errors import DataError

_PREPARE_AGAIN = "prepare the data again (dvc repro prepare, or dvc checkout data/prepared)"


def _npy_header(path: str) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, Fortran order, dtype, offset of the first row) of a `.npy` file."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            return shape, fortran, dtype, fh.tell()
    except (ValueError, EOFError) as exc:  # numpy's words for a file that is no .npy
        raise DataError(f"{path} is not a numpy array file ({exc}); {_PREPARE_AGAIN}") from None


class DiskArray:
    """The rows of a `.npy` file, read on demand (one `pread` per row).

    Through the file rather than a memory map on purpose: every page a map touches counts as
    the process's resident memory until the kernel reclaims it, so scoring a pool of 4N images
    would look (and, under pressure, be) four times as large as one of N.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        shape, fortran, dtype, self._offset = _npy_header(self.path)
        if fortran:
            raise DataError(f"{self.path}: Fortran-ordered arrays cannot be read by row")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        size, promised = os.path.getsize(self.path), self._offset + len(self) * self._row_bytes
        if size < promised:  # found now, not rows into an epoch
            raise DataError(
                f"{self.path} is truncated: {size} bytes, its header promises {promised}; "
                f"{_PREPARE_AGAIN}"
            )
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        """An int, a slice, an index array or a boolean mask, as numpy indexes rows."""
        rows = self._positions(key)
        if rows.ndim == 0:
            return self._row(int(rows))
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for j, r in enumerate(rows):
            out[j] = self._row(int(r))
        return out

    def _positions(self, key) -> np.ndarray:
        # not np.arange(len(self))[key]: that allocates the whole row range for every batch
        n = len(self)
        if isinstance(key, slice):
            return np.arange(*key.indices(n))
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (n,):
                raise IndexError(f"{self.path}: a mask of {key.shape} for {n} rows")
            return np.flatnonzero(key)
        if not np.issubdtype(key.dtype, np.integer):
            raise IndexError(f"{self.path}: rows are indexed by integers, not {key.dtype}")
        if key.size and (key.min() < -n or key.max() >= n):
            raise IndexError(f"{self.path}: a row index out of range for {n} rows")
        return np.where(key < 0, key + n, key)

    def any(self, chunk: int = 1024) -> bool:
        """Whether any element is nonzero, read a chunk of rows at a time."""
        return any(self[s : s + chunk].any() for s in range(0, len(self), chunk))

    def _row(self, r: int) -> np.ndarray:
        buf = os.pread(self._file(), self._row_bytes, self._offset + r * self._row_bytes)
        if len(buf) != self._row_bytes:  # cut short since it was opened
            raise DataError(
                f"{self.path}: row {r} is truncated (the file is shorter than its header); "
                f"{_PREPARE_AGAIN}"
            )
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape[1:])

    def _file(self) -> int:
        # DataLoader workers fork: each process opens its own descriptor
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,C,H,W) to float in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


class Images(Dataset):
    """Labelled images a DataLoader reads in batches: `__getitems__(positions)` gives
    (x float in [0,1] (B,C,H,W), y int64 (B,))."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int):
        x, y = self.__getitems__([position])
        return x[0], y[0]

    def __getitems__(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TensorImages(Images):
    """Images already in memory (tests, benchmarks, the annotated few)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None):
        self.x = x
        self.labels = y if y is not None else torch.zeros(len(x), dtype=torch.long)

    def __getitems__(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(positions, dtype=torch.long)
        return self.x[idx], self.labels[idx]


class ArrayImages(Images):
    """Some rows of a prepared dataset's images (on disk or in memory), read when asked for."""

    def __init__(self, images, labels: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, np.asarray(rows)
        self.labels = torch.from_numpy(np.asarray(labels)[self.rows])

    def __getitems__(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        return to_tensor(self.images[self.rows[positions]]), self.labels[positions]


def as_images(source) -> Images:
    """An Images from an Images, an (x, y) pair of tensors, or unlabelled image tensors."""
    if isinstance(source, Images):
        return source
    if isinstance(source, tuple):
        return TensorImages(*source)
    return TensorImages(source)


class ShuffledBatches:
    """A fresh permutation from `generator` each time it is iterated (once per epoch), cut into
    batches: the order a seeded run draws is the same with or without loader workers."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator)
        for start in range(0, self.n, self.batch_size):
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def in_order(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def _whole_batch(batch):
    return batch  # __getitems__ already stacked it


def batches(
    images: Images, batch_sampler, workers: int = 0, device: torch.device | None = None
) -> DataLoader:
    """A DataLoader over `images` in the given batches; `workers` > 0 reads in that many
    processes (kept across epochs), and batches bound for CUDA come from pinned memory."""
    pin = device is not None and device.type == "cuda"
    return DataLoader(
        images,
        batch_sampler=batch_sampler,
        collate_fn=_whole_batch,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )


class RowWriter:
    """Writes a `.npy` file row by row, so an array larger than memory can be built.

    The header promises `n` rows; `close` checks they were all written."""

    def __init__(self, path: str | Path, n: int, row_shape: tuple[int, ...], dtype):
        self.path, self.n, self.written = Path(path), n, 0
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed by close(), after the last row)
        header = {"descr": self.dtype.str, "fortran_order": False, "shape": (n, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self._fh, header)

    def write(self, row: np.ndarray) -> None:
        row = np.ascontiguousarray(row, dtype=self.dtype)
        if row.shape != self.row_shape:
            raise ValueError(f"{self.path.name}: a row of shape {row.shape}, not {self.row_shape}")
        self._fh.write(row.tobytes())
        self.written += 1

    def close(self) -> None:
        self._fh.close()
        if self.written != self.n:
            raise ValueError(f"{self.path.name}: {self.written} rows written of {self.n}")

    def discard(self) -> None:
        """Close the file unfinished, when a bad row means it will not be used."""
        self._fh.close()
