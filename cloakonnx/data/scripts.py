"""Sources that can be iterated only once: ``--data-loader-script`` functions and onnxruntime
``CalibrationDataReader``s.

Their ``(x, y)`` batches are checked as they come and spooled to a temporary file (labels stay in
memory), then read back by rows like any ``.npy``, so the rest of cloakonnx can read them as often
and in whatever order it needs.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import CloakError, first_line
from .dataset import Dataset, Loaded
from .rows import Spool
from .validate import check_inputs_dtype, check_labels


@dataclass(frozen=True)
class LoaderScript:
    """Polygraphy's ``--data-loader-script file.py:func``: ``func()`` yields ``(x, y)`` batches."""

    spec: str

    def __str__(self) -> str:
        return self.spec


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


def from_calibration_reader(reader, labels=None, label_key: str | None = None,
                            input_name: str | None = None) -> Dataset:
    """Data from an onnxruntime quantization ``CalibrationDataReader`` (``get_next()`` gives feed
    dicts, then None), with labels from ``label_key`` in its dicts or from ``labels`` (an iterable in
    the same order). Read once, spooled to a temporary file; pass the result as ``data``."""
    loaded = calibration_reader(reader, labels, label_key, input_name)
    return Dataset(loaded.x, loaded.y, loaded.source)


def load_loader_script(script: LoaderScript) -> Dataset:
    """The data a ``--data-loader-script`` yields, spooled once."""
    loaded = loader_script(script.spec)
    return Dataset(loaded.x, loaded.y, loaded.source)
