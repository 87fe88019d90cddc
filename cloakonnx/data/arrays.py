"""``.npz`` and ``.npy`` sources, read by rows from disk rather than loaded.

An ``.npy`` body, and an ``.npz`` member stored uncompressed (``np.savez``), are raw C-ordered
arrays at a known offset: their rows are read in place (``RowFile``). A compressed member
(``np.savez_compressed``) is decompressed once, in pieces, to a spool and read from there. Labels
are small and loaded.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CloakError, first_line
from .dataset import Dataset
from .rows import RowFile, spool_dir
from .validate import check_inputs_dtype, check_labels


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


def load_npz(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` with ``x`` and ``y``; ``x`` is read by rows from disk, not loaded (see ``npz_inputs``)."""
    p = Path(path)
    x, y = npz_inputs(p)
    return _checked(x, y, str(p))


def load_npy(x_path: Path, y_path: Path, where: str) -> Dataset:
    """A pair of ``.npy`` files (inputs read by rows from disk, labels loaded)."""
    for f in (x_path, y_path):
        if not f.is_file():
            raise CloakError(f"{where}: no file {f}")
    x = npy_rows(x_path, str(x_path))
    try:
        y = np.load(y_path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - format errors
        raise CloakError(f"{y_path} is not a readable .npy file: {first_line(exc)}") from exc
    return _checked(x, y, where)


def _checked(x, y, where: str) -> Dataset:
    if np.ndim(y) == 0:
        raise CloakError(f"{where}: 'x' and 'y' must be arrays with one entry per sample, got scalars")
    y = check_labels(y, where)
    if len(x) != len(y):
        raise CloakError(f"{where}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return Dataset(x, y, where)
