"""Load and save ONNX files faithfully: clear errors on bad files, atomic writes, external data kept."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx

from ..errors import CloakError

log = logging.getLogger(__name__)

TWO_GB = 2**31


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX file, turning every failure into a CloakError that says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise CloakError(f"model file not found: {p}")
    if p.is_dir():
        raise CloakError(f"expected an .onnx file, got a directory: {p}")
    if p.stat().st_size == 0:
        raise CloakError(f"model file is empty: {p}")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise CloakError(f"{p} is not a readable ONNX model (truncated or not ONNX?): {exc}") from exc
    if len(model.graph.node) == 0:
        raise CloakError(f"{p} is not an ONNX model with a graph (no nodes found)")
    try:
        onnx.checker.check_model(model if model.ByteSize() < TWO_GB else str(p))
    except Exception as exc:
        raise CloakError(f"{p} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    return model


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` keeps its weights in external data files (checked without loading them)."""
    try:
        return _uses_external_data(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - load_model reports unreadable files
        return False


def check_writable_dir(folder: Path) -> None:
    """Fail with a clear message before anything is written to ``folder``."""
    if not folder.is_dir():
        raise CloakError(f"output directory does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise CloakError(f"output directory is not writable: {folder}")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool = False) -> None:
    """Write atomically: a temporary file in the target directory, checked, then renamed.

    Models over 2 GB, or whose original used external data, keep their weights in a
    ``<name>.data`` file next to the output.
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    check_writable_dir(folder)
    external = external or _uses_external_data(model) or model.ByteSize() >= TWO_GB
    remove_stale_temporaries(folder, out.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, _created_mode())  # mkstemp makes 0600: a serving container running as another user could not read it
    data_name = out.name + ".data"
    tmp_data = folder / (Path(tmp).name + ".data")
    try:
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            onnx.checker.check_model(tmp)
            # the .onnx refers to its data file by name: rewrite it to the final name
            written = onnx.load(tmp, load_external_data=False)
            for t in _external_tensors(written):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as fh:
                fh.write(written.SerializeToString())
            os.replace(tmp_data, folder / data_name)
        else:
            with open(tmp, "wb") as fh:
                fh.write(model.SerializeToString())
                fh.flush()
                os.fsync(fh.fileno())
            onnx.checker.check_model(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise CloakError(f"could not write {out}: {exc.strerror or exc}") from exc
    except onnx.checker.ValidationError as exc:
        raise CloakError(f"refusing to write {out}: the result fails onnx.checker: {exc}") from exc
    finally:
        for leftover in (Path(tmp), tmp_data):
            if leftover.exists():
                leftover.unlink()


def _created_mode() -> int:
    """The mode ``open()`` gives a new file here: 0666 less the umask (read from /proc where it can
    be, since setting the umask to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Delete temporaries that an earlier write of ``name`` left behind when it was killed (SIGKILL
    skips every cleanup). Each carries its writer's PID; only those of dead processes go."""
    import glob

    prefix = f".{name}."
    removed = []
    for path in folder.glob(glob.escape(prefix) + "*.tmp*"):
        pid = path.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue  # another user's live process, or a name we do not understand: leave it
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted earlier run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(True for _ in _external_tensors(model))
