"""``evaluate --resume FILE``: the finished attack rows of an evaluation, saved as they complete, so
an interrupted run continues where it stopped instead of starting over (AutoAttack's ``state_path``).

The file is JSON, rewritten atomically (a temporary file in the same folder, fsync, ``os.replace``)
after every finished (eps, attack, threat) row::

    {"format": "cloakonnx-evaluate-resume", "version": 1,
     "fingerprint": {"model": "sha256:...", "reference": null, "data": "sha256:...", "device": "cpu",
                     "eps": [0.1], "attacks": ["fgsm", "pgd"], "attack.steps": 3, ...},
     "samples": 60,                  # the samples evaluated (after --max-samples)
     "clean": "<base64>",            # np.packbits of the clean correctness, to check the rerun's
     "survived": [{"eps": 0.1, "bits": "<base64>"}],  # per eps, in --eps order: the bits after its rows done
     "done": [[0.1, "fgsm", "adaptive"], ...],  # the rows finished (or failed), in the order they run
     "results": [{"eps", "attack", "threat", "accuracy"}, ...],
     "failures": [{"eps", "attack", "threat", "error"}, ...]}

A rerun continues only with the same fingerprint: the model's and the reference's sha256, the data's
identity (an .npz/.npy file's sha256; a folder's sorted file names, sizes and mtimes; in-memory or
scripted data: a hash of x and y) and every config field that can change a figure. Crafting a row
depends only on the seed and each sample's index (``Attack.set_samples``; ``craft_batches`` reseeds
torch per run), and in cumulative runs on the survival bits saved here, so a row computed after a
resume is the row an uninterrupted run computes.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .data import Dataset, LoaderScript
from .errors import CloakError

log = logging.getLogger(__name__)

FORMAT, VERSION = "cloakonnx-evaluate-resume", 1
# Config fields that cannot change a figure (where and how fast the work runs), and the ones the
# fingerprint replaces (the reference's path by its sha256, the device asked for by the one used).
# attack.name, attack.eps and attack.seed are set per row from the attack list, --eps and seed (kept).
IGNORED = ("resume", "reference", "device", "data_workers", "ort_batch_size", "ray.address", "ray.threads",
           "ray.retries", "attack.name", "attack.eps", "attack.seed")
CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def folder_listing(root: Path) -> str:
    """A folder's identity without reading its files: its sorted relative file names, sizes and mtimes."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        digest.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"listing sha256:{digest.hexdigest()} ({len(files)} files)"


def arrays_sha256(ds: Dataset, batch: int = 1024) -> str:
    """The hash of the samples themselves (float32 x, int64 y, and x's shape), read a batch at a time."""
    digest = hashlib.sha256(repr(tuple(ds.x.shape)).encode())
    for start in range(0, len(ds), batch):
        digest.update(np.ascontiguousarray(ds.x[start : start + batch], np.float32).tobytes())
    digest.update(np.ascontiguousarray(ds.y, np.int64).tobytes())
    return "arrays sha256:" + digest.hexdigest()


def data_identity(data, ds: Dataset) -> str:
    """What the data is: ``data`` as given (a path, a Dataset or a loader script), ``ds`` as loaded."""
    if isinstance(data, (Dataset, LoaderScript)):
        return arrays_sha256(ds)
    text = str(data)
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and all(part.lower().endswith(".npy") for part in parts):
        return " + ".join(file_sha256(part) for part in parts)
    path = Path(data)
    return folder_listing(path) if path.is_dir() else file_sha256(path)


def config_fields(config, prefix: str = "") -> dict:
    """Every field of ``config`` (nested configs as dotted names), but the IGNORED ones."""
    out = {}
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if key in IGNORED:
            continue
        if dataclasses.is_dataclass(value):
            out.update(config_fields(value, key + "."))
        else:
            out[key] = value
    return out


def fingerprint(model_path, data, ds: Dataset, config, device: str) -> dict:
    """What must match for a saved evaluation to be continued (JSON values)."""
    fp = {"model": file_sha256(model_path),
          "reference": file_sha256(config.reference) if config.reference is not None else None,
          "data": data_identity(data, ds), "device": device, **config_fields(config)}
    return json.loads(json.dumps(fp, default=str))


def differences(saved: dict, now: dict) -> list[str]:
    """'KEY differs (SAVED in the file, NOW now)' for each key whose values differ."""
    keys = [*now, *(k for k in saved if k not in now)]
    return [f"{key} differs ({_show(saved.get(key))} in the file, {_show(now.get(key))} now)"
            for key in keys if saved.get(key) != now.get(key)]


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    text = "none" if value is None else str(value)
    return text if len(text) <= 40 else text[:32] + "..."


def pack(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(bits, bool)).tobytes()).decode("ascii")


def unpack(text: str, n: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), np.uint8)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"{len(raw) * 8} bits for {n} samples")
    return np.unpackbits(raw)[:n].astype(bool)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` whole or not at all: a temporary file in the same folder, fsync'ed,
    then ``os.replace``; the temporary file is removed whatever interrupts the write."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable (POSIX; not possible everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Progress:
    """An evaluation's finished rows, per-eps survival bits and failures; with a ``path``, saved
    after every row and read back on a rerun. Without one, it only collects (nothing is written)."""

    def __init__(self, path: Path | None = None, fingerprint: dict | None = None):
        self.path, self.fingerprint = path, fingerprint or {}
        self.results: list[dict] = []
        self.failures: list[dict] = []
        self.survived: list[tuple[float, np.ndarray]] = []  # per eps begun, in order: (eps, bits after its rows done)
        self.done: list[tuple[float, str, str]] = []  # the rows done, in the order they run: a prefix of the run's
        self.clean: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike | None, make_fingerprint: Callable[[], dict]) -> "Progress":
        """Nothing to save (``path`` None); a fresh run (no file yet); or the saved run, when it was
        written for this same run (else a CloakError naming what differs)."""
        if path is None:
            return cls()
        path, now = Path(path), make_fingerprint()
        if not path.exists():
            log.info("--resume %s: no saved run yet; saving this one as it goes", path)
            return cls(path, now)
        progress = load(path)
        diffs = differences(progress.fingerprint, now)
        if diffs:
            raise CloakError(f"--resume {path} was written for a different run: {'; '.join(diffs)}. Rerun with the "
                             "same arguments and data, or give another file (or delete this one to start over)")
        log.info("--resume %s: %d attack run(s) already done, continuing", path, len(progress.done))
        return progress

    def start(self, correct: np.ndarray) -> None:
        """This run's clean correctness: saved on a fresh run, checked against the saved one on a rerun."""
        if self.clean is None:
            self.clean = np.asarray(correct, bool).copy()
            self.save()
        elif len(self.clean) != len(correct) or not np.array_equal(self.clean, correct):
            raise CloakError(f"--resume {self.path}: the model's clean predictions differ from the saved run's "
                             f"({int((self.clean != correct).sum()) if len(self.clean) == len(correct) else 'all'} "
                             "samples): the run cannot continue identically; delete the file to start over")

    def survivors_at(self, i: int, correct: np.ndarray) -> np.ndarray:
        """The survival bits to continue the ``i``-th eps from: the saved ones, or ``correct`` when
        none of its rows ran yet."""
        return self.survived[i][1] if i < len(self.survived) else correct

    def is_done(self, position: int, eps: float, attack: str, threat: str) -> bool:
        """Whether the run's ``position``-th row (0-based) is done; it must then be the one saved there."""
        if position >= len(self.done):
            return False
        if self.done[position] != (float(eps), attack, threat):
            raise CloakError(f"--resume {self.path}: the saved attack runs are not this run's (row {position + 1} "
                             f"is {self.done[position]}, this run's is {(eps, attack, threat)}); delete the file to "
                             "start over")
        return True

    def finished(self, i: int, eps: float, attack: str, threat: str, survived: np.ndarray,
                 accuracy: float | None = None, error: str | None = None) -> None:
        """Record a row of the ``i``-th eps (its accuracy, or the error that stopped it) and the bits
        after it; save."""
        if error is None:
            self.results.append({"eps": eps, "attack": attack, "threat": threat, "accuracy": accuracy})
        else:
            self.failures.append({"eps": eps, "attack": attack, "threat": threat, "error": error})
        bits = (eps, np.asarray(survived, bool).copy())
        self.survived[i:i + 1] = [bits]  # replaces the i-th eps's bits, or begins it
        self.done.append((float(eps), attack, threat))
        self.save()

    def to_json(self) -> dict:
        survived = [{"eps": eps, "bits": pack(bits)} for eps, bits in self.survived]
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "samples": len(self.clean),
                "clean": pack(self.clean), "survived": survived, "done": [list(row) for row in self.done],
                "results": self.results, "failures": self.failures}

    def save(self) -> None:
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps(self.to_json(), indent=1))
        except OSError as exc:
            raise CloakError(f"could not save --resume {self.path}: {exc}") from exc


def load(path: Path) -> Progress:
    """A saved run; a CloakError (not a traceback) when the file is not one cloakonnx wrote whole."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a cloakonnx evaluate resume file")
        if state.get("version") != VERSION:
            raise ValueError(f"format version {state.get('version')!r}, this cloakonnx reads {VERSION}")
        progress = Progress(path, dict(state["fingerprint"]))
        n = int(state["samples"])
        progress.clean = unpack(state["clean"], n)
        progress.survived = [(_number(entry["eps"]), unpack(entry["bits"], n)) for entry in state["survived"]]
        progress.done = [(float(eps), str(attack), str(threat)) for eps, attack, threat in state["done"]]
        progress.results = [_row(r, "accuracy") for r in state["results"]]
        progress.failures = [_row(r, "error") for r in state["failures"]]
    except OSError as exc:
        raise CloakError(f"cannot read --resume {path}: {exc}") from exc
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise CloakError(f"--resume {path} is damaged or not a resume file ({type(exc).__name__}: {exc}); delete it "
                         "to start over") from exc
    return progress


def _row(row: dict, value: str) -> dict:
    """A saved result (``value`` "accuracy") or failure ("error") row, checked."""
    out = {"eps": _number(row["eps"]), "attack": str(row["attack"]), "threat": str(row["threat"])}
    out[value] = float(row[value]) if value == "accuracy" else str(row[value])
    return out


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"an eps is {value!r}")
    return value
