"""Rows: the array-like every source becomes, so the rest of cloakonnx reads any data a batch at a time.

``Rows`` reads only the rows asked for; ``Take`` and ``Checked`` wrap another ``Rows`` (a subset, a
check on every batch); ``RowFile`` reads a raw C-ordered array from a file with ``os.pread`` (the
pages read are not mapped into the process, so they do not count against it). What can be read only
once is written to a ``Spool`` (a temporary file, removed when its rows are dropped, and its folder
at exit) and read back as a ``RowFile``; ``OutputRows`` is where an attack's crafted copy goes.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Callable

import numpy as np

from ..errors import CloakError


class Rows:
    """A read-only [N, *sample] float32 array-like that reads rows on demand.

    Indexing with an int, a slice or an index array returns a numpy array, as numpy would."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def read(self, idx: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Rows ``idx`` (sorted or not) as float32, in the box."""
        raise NotImplementedError

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # rows first, then the rest of the index on what was read
            rows = self[key[0]]
            rest = key[1:]
            return rows[rest] if isinstance(key[0], (int, np.integer)) else rows[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            return self[np.asarray([key])][0]
        if isinstance(key, slice):
            idx = np.arange(len(self))[key]
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = np.where(idx < 0, idx + len(self), idx).astype(np.int64)
        return self.read(idx) if len(idx) else np.zeros((0, *self.shape[1:]), np.float32)

    def __array__(self, dtype=None, copy=None):  # np.asarray(rows): everything, for small data and tests
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class Take(Rows):
    """Rows ``index`` of ``base``: a subset without copying."""

    def __init__(self, base: Rows, index: np.ndarray):
        super().__init__((len(index), *base.shape[1:]))
        self.base, self.index = base, np.asarray(index, np.int64)

    def read(self, idx: np.ndarray) -> np.ndarray:
        return self.base[self.index[idx]]


class Checked(Rows):
    """``base`` with ``check(batch, indices)`` run on every batch read (``validate``'s box and
    NaN checks), so bad values fail with the same clear error however the data arrives."""

    def __init__(self, base: Rows, check: Callable[[np.ndarray, np.ndarray], None]):
        super().__init__(base.shape)
        self.base, self.check = base, check

    def read(self, idx: np.ndarray) -> np.ndarray:
        out = self.base[idx]
        self.check(out, idx)
        return out

    def check_first(self, n: int) -> None:
        """Check rows [0, n) now, so bad data fails before any work starts rather than at the first
        batch an attack reads. The rows are read only to be checked; their values are not kept."""
        if n > 0:
            idx = np.arange(n, dtype=np.int64)
            self.check(self.base[idx], idx)


def take(x, idx: np.ndarray):
    """``x[idx]`` for numpy arrays (a copy, as before); a lazy view for ``Rows``."""
    if isinstance(x, Take):
        return Take(x.base, x.index[idx])
    if isinstance(x, Rows):
        return Take(x, idx)
    return x[idx]


class RowFile(Rows):
    """Rows of a C-ordered array stored raw in a file from ``offset`` (an ``.npy`` body, an ``.npz``
    member stored uncompressed, or a spool), read with ``os.pread`` in contiguous runs."""

    def __init__(self, path: str | os.PathLike, offset: int, dtype, shape: tuple[int, ...], owned: bool = False):
        super().__init__(shape)
        self.path, self.offset, self.stored = str(path), int(offset), np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.stored.itemsize
        self._fd: int | None = None
        self.owned = owned  # a temporary file of ours: removed when these rows are dropped

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Sorted runs of consecutive rows are read straight into the result (float32 files) or into one
        reused buffer: no per-run allocations, which fragmented the heap over thousands of batches."""
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        direct = self.stored == np.float32 and np.array_equal(order, np.arange(len(idx)))
        out = np.empty((len(idx), *self.shape[1:]), np.float32)
        buf = out if direct else np.empty((len(idx), *self.shape[1:]), self.stored)
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        pos = 0
        for run in np.split(sorted_idx, breaks):
            want = len(run) * self.row_bytes
            got = os.preadv(self._file(), [memoryview(buf[pos : pos + len(run)]).cast("B")],
                            self.offset + int(run[0]) * self.row_bytes)
            if got != want:
                raise CloakError(f"{self.path} is shorter than its header says: rows {run[0]}..{run[-1]} are missing")
            pos += len(run)
        if not direct:
            out[order] = buf
        return out

    def __del__(self) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)
            if self.owned:
                os.unlink(self.path)
        except OSError:
            pass

    def __getstate__(self):  # picklable: a worker opens its own descriptor, and never removes the file
        state = dict(self.__dict__)
        state["_fd"], state["owned"] = None, False
        return state


# --- spools: temporary files for what can only be read once --------------------------------------------------


_SPOOL_DIRS: list[str] = []


@atexit.register
def _remove_spools() -> None:
    for d in _SPOOL_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def spool_dir() -> str:
    """A temporary folder for this process's spools, removed at exit (``$CLOAKONNX_SPOOL`` or the
    system's temporary folder holds it)."""
    if not _SPOOL_DIRS:
        _SPOOL_DIRS.append(tempfile.mkdtemp(prefix="cloakonnx-spool-", dir=os.environ.get("CLOAKONNX_SPOOL")))
    return _SPOOL_DIRS[0]


class Spool:
    """Rows written once, in order, to a temporary file, then read back as a ``RowFile``."""

    def __init__(self, sample_shape: tuple[int, ...], name: str = "rows"):
        fd, self.path = tempfile.mkstemp(prefix=f"{name}-", suffix=".f32", dir=spool_dir())
        self.fh = os.fdopen(fd, "wb")
        self.sample_shape = tuple(sample_shape)
        self.count = 0

    def append(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, np.float32)
        if tuple(x.shape[1:]) != self.sample_shape:
            raise CloakError(f"a batch has samples of shape {tuple(x.shape[1:])}, earlier ones were {self.sample_shape}")
        self.fh.write(x.tobytes())
        self.count += len(x)

    def rows(self) -> RowFile:
        self.fh.close()
        return RowFile(self.path, 0, np.float32, (self.count, *self.sample_shape), owned=True)


class OutputRows:
    """Where a crafted copy of ``x`` goes: a numpy array when ``x`` is one (small data, the API),
    a spool on disk when ``x`` is read lazily (memory stays flat)."""

    def __init__(self, x, name: str):
        self.lazy = isinstance(x, Rows)
        self.spool = Spool(tuple(x.shape[1:]), name) if self.lazy else None
        self.array = None if self.lazy else np.empty_like(x)
        self.filled = 0

    def write(self, batch: np.ndarray) -> None:
        if self.lazy:
            self.spool.append(batch)
        else:
            self.array[self.filled : self.filled + len(batch)] = batch
        self.filled += len(batch)

    def result(self):
        return self.spool.rows() if self.lazy else self.array
