"""Batch sizes that fit the device, and a retry at half the size when they do not.

An attack keeps every activation autograd saves for the backward pass, so its memory grows with
the batch. The cost of one sample is measured, not guessed: a forward pass at batch 1 and at
batch 2 under ``torch.autograd.graph.saved_tensors_hooks`` counts the bytes saved for backward,
and the difference is one sample's share (weights saved once drop out). The batch is then what
fits in a fixed share of the device's free memory, capped where bigger batches stop paying off,
and rounded down to a power of two so that small changes in free memory do not change it.
If the device still runs out of memory, ``craft`` halves the batch and carries on.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .errors import first_line

log = logging.getLogger(__name__)

CPU_CAP = 128  # beyond this CPU throughput stops improving and progress gets coarse
CUDA_CAP = 1024
CPU_SHARE = 0.25  # of MemAvailable: leave room for the data, onnxruntime and the rest of the machine
# ... and at most this on CPU: bigger batches do not run faster there. On mobilenet_v3_small at 224x224,
# harden on 20,000 JPEGs took 353 s at batch 32 (this budget) against 407 s at batch 128 (a quarter of a
# 24 GB machine), and peaked at 2.7 GiB of RSS against 5.2 GiB (benchmarks/data_scale.py).
CPU_MAX_BUDGET = 1 << 30
CUDA_SHARE = 0.5  # of free GPU memory: the CUDA execution provider may share the GPU
BACKWARD_FACTOR = 3  # saved activations + their gradients + the allocator's slack


@dataclass(frozen=True)
class BatchChoice:
    """The batch an attack will use and why, for the log and the report."""

    size: int
    per_sample_bytes: int | None  # bytes saved for backward per sample; None when not measured
    budget_bytes: int | None
    reason: str

    def to_dict(self) -> dict:
        return {"size": self.size, "per_sample_bytes": self.per_sample_bytes, "budget_bytes": self.budget_bytes,
                "reason": self.reason}


def saved_bytes_per_sample(model, sample_shape: tuple[int, ...], device: str = "cpu",
                           bounds: tuple[float, float] = (0.0, 1.0)) -> int:
    """Bytes autograd keeps for backward per input sample of ``model`` (a box-space torch callable)."""
    import torch

    def saved(batch: int) -> int:
        seen: dict[tuple, int] = {}

        def pack(t):
            if t.device.type != "meta":
                key = (t.untyped_storage().data_ptr(), t.device.type)
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            return t

        lo, hi = bounds
        x = torch.full((batch, *sample_shape), (lo + hi) / 2, device=device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        del out
        return sum(seen.values()) + x.numel() * x.element_size()

    return max(saved(2) - saved(1), 1)


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` now: the GPU's free memory, or the host's MemAvailable; None if unknown."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - a broken CUDA setup simply means "unknown"
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fit_batch(per_sample_bytes: int, free_bytes: int | None, device: str) -> BatchChoice:
    """The largest power of two up to the device's cap whose backward pass fits the memory share."""
    cuda = device.startswith("cuda")
    cap = CUDA_CAP if cuda else CPU_CAP
    if free_bytes is None:
        return BatchChoice(cap, per_sample_bytes, None, f"free memory unknown on {device}: the {cap} cap")
    budget = int(free_bytes * CUDA_SHARE) if cuda else min(int(free_bytes * CPU_SHARE), CPU_MAX_BUDGET)
    fits = budget // max(per_sample_bytes * BACKWARD_FACTOR, 1)
    size = 1
    while size * 2 <= min(fits, cap):
        size *= 2
    reason = (f"{per_sample_bytes / 2**20:.2f} MiB saved for backward per sample, "
              f"{budget / 2**30:.1f} GiB usable on {device}")
    if fits >= cap:
        reason += f": the {cap} cap"
    return BatchChoice(size, per_sample_bytes, budget, reason)


def auto_batch(model, sample_shape: tuple[int, ...], device: str, bounds: tuple[float, float]) -> BatchChoice:
    """Measure ``model``'s memory per sample and size the attack batch to ``device``."""
    try:
        per_sample = saved_bytes_per_sample(model, sample_shape, device, bounds)
    except Exception as exc:  # noqa: BLE001 - sizing is advisory; the attack reports real failures itself
        cap = CUDA_CAP if device.startswith("cuda") else CPU_CAP
        return BatchChoice(cap, None, None, f"could not measure memory per sample ({first_line(exc)}): the {cap} cap")
    return fit_batch(per_sample, free_memory(device), device)


def is_out_of_memory(exc: BaseException | None) -> bool:
    """True for torch's CUDA OOM and the allocation failures torch and onnxruntime raise on CPU
    (also when wrapped in a CloakError)."""
    import torch

    while exc is not None:
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(exc).lower()
        if any(m in text for m in ("out of memory", "can't allocate memory", "failed to allocate memory")):
            return True
        exc = exc.__cause__
    return False
