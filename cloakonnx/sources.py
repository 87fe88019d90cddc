"""Data read in batches, so memory stays flat in the number of samples.

Every source becomes ``Rows``: an array-like of box-space float32 samples that reads only the rows
asked for. ``.npz`` and ``.npy`` files are read from disk at their offsets (``os.pread``: the pages
read are not mapped into the process, so they do not count against it); image folders are decoded
on demand by a small thread pool (Pillow releases the GIL); sources that can only be iterated once
(a ``--data-loader-script`` function, an onnxruntime ``CalibrationDataReader``) are spooled to a
temporary file as they are read, then read like a ``.npy``. ``prefetched`` reads the next batch in
a background thread while the current one is attacked, and ``DATA_WAIT`` adds up the time spent
blocked on it.
"""
from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import CloakError, first_line

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class WaitClock:
    """Seconds spent blocked waiting for data, over the whole process (read per run as a difference)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds


DATA_WAIT = WaitClock()


# --- rows: the array-like every source becomes -------------------------------------------------------------


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
    """``base`` with ``check(batch, indices)`` run on every batch read (``data.validate``'s box and
    NaN checks), so bad values fail with the same clear error however the data arrives."""

    def __init__(self, base: Rows, check: Callable[[np.ndarray, np.ndarray], None]):
        super().__init__(base.shape)
        self.base, self.check = base, check

    def read(self, idx: np.ndarray) -> np.ndarray:
        out = self.base[idx]
        self.check(out, idx)
        return out


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


def npy_header(fh) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """dtype, shape, Fortran order and the body's offset of the ``.npy`` stream at ``fh``'s position."""
    start = fh.tell()
    version = np.lib.format.read_magic(fh)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        shape, fortran, dtype = np.lib.format._read_array_header(fh, version)  # noqa: SLF001 - version 3.0
    else:
        shape, fortran, dtype = reader(fh)
    return np.dtype(dtype), tuple(shape), bool(fortran), fh.tell() - start


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


# --- reading batches ahead of use --------------------------------------------------------------------------


_PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloakonnx-prefetch")


def prefetched(x, bounds: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
    """``x[s:e]`` for each (s, e) in ``bounds``; for lazy rows the next batch is read in the
    background while the caller works on this one, and time blocked on it goes to ``DATA_WAIT``."""
    bounds = list(bounds)
    if not isinstance(x, Rows):
        for s, e in bounds:
            yield x[s:e]
        return
    pending = _PREFETCH.submit(x.__getitem__, slice(*bounds[0])) if bounds else None
    for i in range(len(bounds)):
        t0 = time.perf_counter()
        batch = pending.result()
        DATA_WAIT.add(time.perf_counter() - t0)
        pending = _PREFETCH.submit(x.__getitem__, slice(*bounds[i + 1])) if i + 1 < len(bounds) else None
        yield batch


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


# --- file sources ------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What a reader returns: the inputs (numpy or Rows, in their stored dtype's values) and labels."""

    x: object
    y: np.ndarray
    source: str


def check_labels(y: np.ndarray, where: str) -> np.ndarray:
    """1-D integer labels (whole-valued floats accepted), or a clear error naming ``where``."""
    y = np.asarray(y)
    if y.ndim == 0:
        raise CloakError(f"{where}: labels must be an array with one entry per sample, got a scalar")
    if y.ndim != 1:
        y = y.reshape(-1) if y.size == len(y) else y
    if y.ndim != 1:
        raise CloakError(f"{where}: 'y' must be a 1-D array of integer labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            return y.astype(np.int64)
        raise CloakError(f"{where}: labels 'y' must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def check_inputs_dtype(dtype: np.dtype, where: str) -> None:
    if not np.issubdtype(dtype, np.number) or dtype == np.bool_ or np.issubdtype(dtype, np.complexfloating):
        raise CloakError(f"{where}: 'x' must be numeric, got dtype {dtype}")


def npy_rows(path: Path, where: str) -> RowFile | np.ndarray:
    """The inputs of a ``.npy`` file: read from disk by rows (C order), or loaded (Fortran order)."""
    try:
        with open(path, "rb") as fh:
            dtype, shape, fortran, offset = npy_header(fh)
    except (ValueError, OSError) as exc:
        raise CloakError(f"{where} is not a readable .npy file: {first_line(exc)}") from exc
    check_inputs_dtype(dtype, where)
    if not shape:
        raise CloakError(f"{where}: 'x' must be an array with one entry per sample, got a scalar")
    if fortran or dtype.hasobject:
        return np.load(path, allow_pickle=False).astype(np.float32)
    return RowFile(path, offset, dtype, shape)


def zip_member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the zip file."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    if local[:4] != b"PK\x03\x04":
        raise CloakError(f"{path} has a damaged zip header for {info.filename}")
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def npz_inputs(path: Path) -> tuple[RowFile | np.ndarray, np.ndarray]:
    """``x`` and ``y`` of an ``.npz``: ``x`` read by rows in place when stored uncompressed
    (``np.savez``), else decompressed once to a spool (``np.savez_compressed``); ``y`` loaded."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
            missing = {"x", "y"} - set(names)
            if missing:
                raise CloakError(
                    f"{path} must hold arrays 'x' (inputs) and 'y' (integer labels); "
                    f"missing {', '.join(sorted(missing))}, found {', '.join(sorted(names)) or 'nothing'}")
            with zf.open(names["y"]) as fh:
                y = np.lib.format.read_array(fh, allow_pickle=False)
            info = zf.getinfo(names["x"])
            if info.compress_type == zipfile.ZIP_STORED:
                start = zip_member_offset(path, info)
                with open(path, "rb") as fh:
                    fh.seek(start)
                    dtype, shape, fortran, header = npy_header(fh)
                if not fortran and not dtype.hasobject and shape:
                    check_inputs_dtype(dtype, str(path))
                    return RowFile(path, start + header, dtype, shape), y
            with zf.open(names["x"]) as fh:  # compressed: decompress once, in pieces, to a spool
                dtype, shape, fortran, _ = npy_header(fh)
                check_inputs_dtype(dtype, str(path))
                if not shape:
                    raise CloakError(f"{path}: 'x' and 'y' must be arrays with one entry per sample, got scalars")
                if fortran or dtype.hasobject:
                    raise CloakError(f"{path}: 'x' is stored in Fortran order; save it with np.savez")
                target = tempfile.NamedTemporaryFile(prefix="npz-", suffix=".raw", dir=spool_dir(), delete=False)
                with target:
                    shutil.copyfileobj(fh, target, 1 << 22)
                return RowFile(target.name, 0, dtype, shape, owned=True), y
    except CloakError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip / format errors
        raise CloakError(f"{path} is not a readable .npz file: {first_line(exc)}") from exc


# --- image folders -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTransform:
    """How images become samples. ``size`` (H, W) resizes straight to it; ``resize`` S then
    ``crop`` C follow torchvision: the short side to S (bilinear, antialiased), then a centred C x C."""

    size: tuple[int, int] | None = None
    resize: int | None = None
    crop: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (self.resize is not None or self.crop is not None):
            raise CloakError("give --size H,W, or --resize S with --crop C, not both")
        for name, v in (("--resize", self.resize), ("--crop", self.crop)):
            if v is not None and v < 1:
                raise CloakError(f"{name} must be a positive number of pixels, got {v}")
        if self.size is not None and min(self.size) < 1:
            raise CloakError(f"--size must be positive, got {self.size}")

    def out_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of an image of ``width`` x ``height`` after the transform."""
        if self.size is not None:
            return self.size
        if self.resize is not None:
            width, height = self.resized(width, height)
        if self.crop is not None:
            return self.crop, self.crop
        return height, width

    def resized(self, width: int, height: int) -> tuple[int, int]:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if width <= height else (new_long, self.resize)

    def apply(self, im):
        from PIL import Image

        if self.size is not None:
            return im.resize((self.size[1], self.size[0]), Image.BILINEAR)
        if self.resize is not None:
            im = im.resize(self.resized(*im.size), Image.BILINEAR)
        if self.crop is not None:
            w, h = im.size
            if self.crop > w or self.crop > h:
                raise CloakError(f"--crop {self.crop} is larger than an image of {w}x{h} (after --resize)")
            top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
            im = im.crop((left, top, left + self.crop, top + self.crop))
        return im


class ImageRows(Rows):
    """Images decoded on demand by a thread pool: only the batch asked for is in memory."""

    def __init__(self, files: list[Path], mode: str, transform: ImageTransform, shape: tuple[int, ...],
                 bounds: tuple[float, float], workers: int):
        super().__init__(shape)
        self.files, self.mode, self.transform, self.bounds, self.workers = files, mode, transform, bounds, workers
        self._pool: ThreadPoolExecutor | None = None

    def decode(self, i: int) -> np.ndarray:
        from PIL import Image

        f = self.files[i]
        try:
            with Image.open(f) as im:
                arr = np.asarray(self.transform.apply(im.convert(self.mode)), dtype=np.float32) / 255.0
        except CloakError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file that passed the header check but does not decode
            raise CloakError(f"cannot decode image {f}: {first_line(exc)}") from exc
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arr.shape != self.shape[1:]:
            raise CloakError(f"image {f} gives shape {arr.shape}, the others {self.shape[1:]}; resize them with "
                             "--size H,W or --resize S --crop C")
        lo, hi = self.bounds
        return arr * (hi - lo) + lo

    def read(self, idx: np.ndarray) -> np.ndarray:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cloakonnx-decode")
        return np.stack(list(self._pool.map(self.decode, idx.tolist()))).astype(np.float32, copy=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        return state


def image_folder(root: Path, transform: ImageTransform, channels: int, bounds: tuple[float, float],
                 workers: int | None = None) -> Loaded:
    """A folder of class sub-folders (sorted names are the labels 0..K-1), as torchvision's
    ImageFolder. Only headers are read here (unreadable files are skipped, counted); pixels are
    decoded when a batch is read."""
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise CloakError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise CloakError(f"image folders need a model with 1 or 3 input channels, got {channels}")
    files, labels, sizes, skipped = [], [], set(), 0
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    sizes.add(transform.out_size(*im.size))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, counted
                log.warning("skipping unreadable image %s: %s", f, exc)
                skipped += 1
                continue
            files.append(f)
            labels.append(label)
    if skipped:
        log.warning("skipped %d unreadable image file(s) in %s", skipped, root)
    if not files:
        raise CloakError(f"{root} has no readable images in its class sub-folders")
    if len(sizes) > 1:
        raise CloakError(f"images in {root} have different sizes {sorted(sizes)[:3]}...; resize them with --size H,W "
                         "or --resize S --crop C")
    (h, w), = sizes
    workers = workers or min(4, os.cpu_count() or 1)
    rows = ImageRows(files, mode, transform, (len(files), channels, h, w), bounds, workers)
    return Loaded(rows, np.asarray(labels, np.int64), str(root))


# --- sources that can be iterated once: loader scripts and calibration readers -------------------------------


def spool_batches(batches: Iterable, where: str) -> Loaded:
    """Read ``(x, y)`` batches once, checking each, into a spool; labels stay in memory."""
    spool, labels, n = None, [], 0
    for i, item in enumerate(batches):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise CloakError(f"{where}: batch {i} is a {type(item).__name__}; each batch must be a pair (x, y)")
        x, y = np.asarray(item[0]), check_labels(item[1], f"{where}: batch {i}")
        check_inputs_dtype(x.dtype, f"{where}: batch {i}")
        if x.ndim < 1 or len(x) != len(y):
            raise CloakError(f"{where}: batch {i} has {len(x) if x.ndim else 0} inputs but {len(y)} labels")
        if spool is None:
            spool = Spool(tuple(x.shape[1:]), "loader")
        try:
            spool.append(x)
        except CloakError as exc:
            raise CloakError(f"{where}: batch {i}: {exc}") from None
        labels.append(y)
        n += len(y)
    if spool is None or n == 0:
        raise CloakError(f"{where} gave no samples")
    return Loaded(spool.rows(), np.concatenate(labels), where)


def parse_script(spec: str) -> tuple[Path, str]:
    """``file.py:func`` (Polygraphy's ``--data-loader-script`` syntax; the function defaults to ``load_data``)."""
    path, sep, func = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        path, func = spec, "load_data"
    return Path(path), func or "load_data"


def loader_script(spec: str) -> Loaded:
    """The ``(x, y)`` batches that ``func()`` in ``file.py`` yields, spooled as they come."""
    path, func = parse_script(spec)
    if not path.is_file():
        raise CloakError(f"--data-loader-script: no file {path}")
    name = f"_cloakonnx_loader_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's script failed to import
        raise CloakError(f"--data-loader-script {path} failed to load: {type(exc).__name__}: {first_line(exc)}"
                         ) from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise CloakError(f"--data-loader-script: {path} has no function {func!r}")
    where = f"{path}:{func}"
    try:
        return spool_batches(fn(), where)
    except CloakError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's generator raised
        raise CloakError(f"{where} raised {type(exc).__name__}: {first_line(exc)}") from exc


def calibration_batches(reader, labels=None, label_key: str | None = None,
                        input_name: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(x, y)`` batches from an onnxruntime ``CalibrationDataReader`` (``get_next()`` returns a feed
    dict, then None): labels from ``label_key`` in each dict, or from ``labels``, an iterable of
    per-sample labels or per-batch arrays in the same order."""
    if (labels is None) == (label_key is None):
        raise CloakError("a CalibrationDataReader needs labels: give label_key (a key in its feed dicts) or labels")
    label_iter = iter(labels) if labels is not None else None
    pending: list[int] = []
    while True:
        feed = reader.get_next()
        if feed is None:
            break
        if not isinstance(feed, dict):
            raise CloakError(f"CalibrationDataReader.get_next() returned a {type(feed).__name__}, not a dict")
        feed = dict(feed)
        y = feed.pop(label_key) if label_key is not None and label_key in feed else None
        if label_key is not None and y is None:
            raise CloakError(f"the CalibrationDataReader's feed has no label key {label_key!r} (keys: {', '.join(feed)})")
        if input_name is None and len(feed) != 1:
            raise CloakError(f"the CalibrationDataReader feeds {len(feed)} inputs ({', '.join(feed)}); say which "
                             "is the image with input_name")
        x = np.asarray(feed[input_name] if input_name is not None else next(iter(feed.values())))
        if y is None:
            while len(pending) < len(x):
                try:
                    item = np.asarray(next(label_iter)).reshape(-1)
                except StopIteration:
                    raise CloakError("the labels ran out before the CalibrationDataReader did") from None
                pending.extend(int(v) for v in item)
            y, pending = np.asarray(pending[: len(x)], np.int64), pending[len(x):]
        yield x, y


def calibration_reader(reader, labels=None, label_key: str | None = None, input_name: str | None = None) -> Loaded:
    """An onnxruntime ``CalibrationDataReader`` with labels, spooled once (see ``calibration_batches``)."""
    return spool_batches(calibration_batches(reader, labels, label_key, input_name), "the CalibrationDataReader")
