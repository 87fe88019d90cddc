"""onnxruntime sessions and a deliberate choice of execution providers.

Asking onnxruntime-gpu for CUDA on a machine without a GPU prints a long error and then falls
back silently; so the provider is probed once, quietly, and the choice is logged once.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import logging
import os
import sys
from typing import Sequence

import numpy as np

from .errors import CloakError, first_line

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only: no wall of provider warnings
    return ort


def _tiny_model_bytes() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _has_nvidia_device() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.environ.get("CLOAKONNX_ASSUME_GPU") == "1"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence native stderr: onnxruntime prints provider load failures straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@functools.lru_cache(maxsize=None)
def provider_really_loads(provider: str) -> bool:
    """True only when a session on ``provider`` can be created, quietly, and keeps that provider
    (onnxruntime otherwise falls back to CPU silently after printing its errors)."""
    if provider == CPU:
        return True
    ort = _ort()
    if provider not in ort.get_available_providers() or not _has_nvidia_device():
        return False
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        with _quiet_stderr():
            sess = ort.InferenceSession(_tiny_model_bytes(), opts, providers=[provider, CPU])
        return provider in sess.get_providers()
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


_THREADS: int | None = None  # onnxruntime's intra-op threads for new sessions; None: its default


THREADS_ENV = "CLOAKONNX_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(requested: int | None) -> int:
    """The threads a command uses: ``requested`` (--threads), else $CLOAKONNX_THREADS, else torch's
    own setting (OMP_NUM_THREADS, or a caller's ``torch.set_num_threads``) capped at the cores this
    process may run on: in a container limited to 2 of 64 cores, torch would otherwise start 64."""
    if requested is not None:
        return requested
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise CloakError(f"${THREADS_ENV} must be a positive whole number, got {env!r}")
        return int(env)
    import torch

    return max(1, min(torch.get_num_threads(), usable_cores()))


_WARNED_BUSY = False


def use_threads(requested: int | None, warn_if_busy: bool = True) -> int:
    """Set the threads of torch and of the onnxruntime sessions made from now on, and say so when the
    machine is already busy (two jobs at full threads on the same cores run many times slower)."""
    n = resolve_threads(requested)
    limit_threads(n)
    if not warn_if_busy:
        return n
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    global _WARNED_BUSY
    if load > 1.5 * cores and not _WARNED_BUSY:  # once a process: the demo hardens three times
        _WARNED_BUSY = True
        log.warning("this machine is busy (load average %.1f on %d cores): cloakonnx uses %d thread(s); beside "
                    "other jobs, --threads 1 (or %s=1) avoids running many times slower", load, cores, n, THREADS_ENV)
    return n


def limit_threads(n: int | None) -> None:
    """Use ``n`` threads in torch and in onnxruntime sessions made from now on (None: their defaults),
    so that several workers on one machine do not oversubscribe its cores."""
    global _THREADS
    _THREADS = n
    if n:
        import torch

        torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def default_providers() -> tuple[str, ...]:
    """CUDA when it really loads, else CPU. Chosen once per process and logged once."""
    providers = (CUDA, CPU) if provider_really_loads(CUDA) else (CPU,)
    log.info("onnxruntime providers: %s", ", ".join(providers))
    return providers


def resolve_providers(requested: Sequence[str] | None = None) -> tuple[str, ...]:
    """Validate a user's provider list (short names such as ``cuda`` or ``cpu`` are accepted)."""
    if not requested:
        return default_providers()
    ort = _ort()
    available = ort.get_available_providers()
    short = {p.replace("ExecutionProvider", "").lower(): p for p in available}
    out = []
    for name in requested:
        full = short.get(name.lower(), name)
        if full not in available:
            raise CloakError(
                f"onnxruntime provider {name!r} is not available here; available: {', '.join(available)}"
            )
        if full == CUDA and not provider_really_loads(CUDA):
            raise CloakError("the CUDA provider is installed but does not load (no GPU, or CUDA/cuDNN missing)")
        out.append(full)
    return tuple(out)


def make_session(model, providers: Sequence[str] | None = None, fuse: bool = True):
    """An InferenceSession from a ModelProto, bytes or a path, on the chosen providers.

    ``fuse=False`` stops at onnxruntime's basic graph optimizations, which keep every op's ONNX
    semantics; the default also fuses QDQ patterns into integer kernels, whose rounding differs.
    Input dims written as 0 or -1 are cleared first: onnxruntime would read 0 as a fixed size 0.
    """
    ort = _ort()
    import onnx

    from .graph import without_unset_dims

    if isinstance(model, onnx.ModelProto):
        model = without_unset_dims(model).SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # run-time failures become CloakErrors; no raw log lines on stderr
    if not fuse:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if _THREADS:
        opts.intra_op_num_threads = _THREADS
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, opts, providers=list(resolve_providers(providers)))
    except Exception as exc:  # onnxruntime raises its own types for invalid graphs
        raise CloakError(f"onnxruntime could not load the model: {exc}") from exc


def fixed_batch(session) -> int | None:
    """The model's batch size if the first input's batch dimension is fixed, else None."""
    from .graph import fixed_size

    shape = session.get_inputs()[0].shape
    return fixed_size(shape[0]) if shape else None


def run_batch(session, xb: np.ndarray, outputs: Sequence[str] | None = None,
              input_name: str | None = None) -> list[np.ndarray]:
    """Run one batch; a static-batch model gets its last partial batch padded, then trimmed."""
    input_name = input_name or session.get_inputs()[0].name
    fb, n = fixed_batch(session), len(xb)
    if fb and n < fb:
        xb = np.concatenate([xb, np.repeat(xb[-1:], fb - n, axis=0)])
    try:
        results = session.run(outputs, {input_name: xb}, _run_options())
    except Exception as exc:  # onnxruntime's own error types: shapes or values the graph cannot take
        raise CloakError(f"onnxruntime could not run the model on input of shape {tuple(xb.shape)}: "
                         f"{first_line(exc)}") from exc
    return [r[:n] for r in results]


SHRINK_EVERY = 16  # runs between two that hand the CPU arena's free regions back (_run_options)
_RUNS = itertools.count()


def _run_options():
    """Every SHRINK_EVERY-th run, options that hand the CPU arena's extra regions back after it. Without
    them the arena's high-water mark crept up over thousands of batches (87 MiB more at 20,000 samples
    than at 1,000 in benchmarks/data_scale.py), so memory was not flat in N; turning the arena off cost
    28-48%. Shrinking after *every* run cost 55-60% of the CPU time of onnxruntime's runs on a small
    3x32x32 CNN at batch 256 (benchmarks/harden_cost.py --input digits32): the arena was rebuilt each
    time. Every 16th run bounds the creep the same way at a sixteenth of that."""
    return _shrinking_run_options() if next(_RUNS) % SHRINK_EVERY == 0 else None


@functools.lru_cache(maxsize=1)
def _shrinking_run_options():
    ort = _ort()
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def batch_size_for(session, wanted: int) -> int:
    """A static-batch model dictates its batch size; a dynamic one takes ``wanted``."""
    return fixed_batch(session) or wanted
