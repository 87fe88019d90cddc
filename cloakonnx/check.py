"""Conformance check of one model: does the torch executor reproduce onnxruntime, with gradients?

Attacks craft inputs through :class:`~cloakonnx.torch_exec.OnnxTorchModule` while statistics and
evaluation run in onnxruntime; both must compute the same function. ``check_model`` feeds the
same random inputs to both, compares every graph output with a tolerance that scales with the
output's magnitude, and checks that input gradients exist, are finite and are not all zero.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import CloakError
from .graph import fixed_size, is_qdq, model_inputs, show_shape

# Tolerance as a fraction of max(1, max |reference|): float32 graphs agree to about 1e-6 relative
# per op; the margin covers deep graphs. Half-precision graphs are compared with onnxruntime
# running in half precision while the executor runs in float32, hence the looser factor.
RTOL_FLOAT32 = 1e-4
RTOL_HALF = 3e-2

_HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_FLOATS = _HALF | {TensorProto.FLOAT, TensorProto.DOUBLE}


@dataclass
class OutputDiff:
    """How far one graph output of the executor is from onnxruntime's.

    ``max_rel`` is ``max_abs`` divided by the largest |reference| value (a scale-free error that
    does not explode where single reference values are near zero).
    """

    name: str
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool


@dataclass
class CheckResult:
    model: str
    batch: int
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the shapes fed
    unsupported: list[tuple[str, int]] = field(default_factory=list)
    outputs: list[OutputDiff] = field(default_factory=list)
    grad_finite: bool = False
    grad_nonzero: bool = False
    computes_in_float32: bool = False
    # QDQ-quantized models are compared with onnxruntime's unfused QDQ semantics; how far its
    # fused integer kernels (what serving runs) are from that is reported here, for information.
    quantized: dict | None = None
    seconds: float = 0.0
    error: str | None = None  # the executor failed at run time (message names the node)

    @property
    def ok(self) -> bool:
        return (
            not self.unsupported
            and self.error is None
            and bool(self.outputs)
            and all(o.ok for o in self.outputs)
            and self.grad_finite
            and self.grad_nonzero
        )

    def to_dict(self) -> dict:
        """A JSON-able dict (non-finite numbers become None), with ``ok`` included."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        d = dataclasses.asdict(self)
        d["unsupported"] = [[op, int(version)] for op, version in self.unsupported]
        d["ok"] = self.ok
        return clean(d)


def _input_shapes(model: onnx.ModelProto, batch: int, given) -> tuple[dict[str, list[int]], int]:
    """Concrete shapes to feed: the ``given`` ones (checked against the model), fixed dims as
    declared, and the batch: the first dim and dims sharing its name become ``batch``."""
    inputs = model_inputs(model, given)
    given = given or {}
    batch_names = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], str)}
    undeclared = {vi.name for vi in model.graph.input if not vi.type.tensor_type.HasField("shape")}
    shapes: dict[str, list[int]] = {}
    for info in inputs:
        if info.name in given:
            shapes[info.name] = list(info.shape)
            continue
        if info.name in undeclared:
            raise CloakError(f"input {info.name!r} has no declared shape; give it with "
                             f"--input-shapes {info.name}:[D0,D1,...]")
        shape = [fixed_size(d) or (batch if i == 0 or d in batch_names else None) for i, d in enumerate(info.shape)]
        if None in shape:
            i = shape.index(None)
            example = show_shape([s if s is not None else d for s, d in zip(shape, info.shape)])
            raise CloakError(
                f"input {info.name!r} has a dynamic dimension {i} ({info.shape[i] or 'unknown'!r}) besides the batch; "
                f"give its shape with --input-shapes {info.name}:{example} (a number for each dynamic dim), "
                "or re-export the model with a fixed input shape"
            )
        shapes[info.name] = shape
    used_batch = next((s[0] for s in shapes.values() if s), batch)  # a fixed batch dim is the batch (1 means 1)
    return shapes, used_batch


def _random_input(rng: np.random.Generator, elem_type: int, shape: list[int], bounds) -> np.ndarray:
    lo, hi = bounds
    if elem_type in _FLOATS:
        if elem_type == TensorProto.BFLOAT16:
            raise CloakError("bfloat16 graph inputs cannot be fed to onnxruntime from numpy")
        x = rng.uniform(lo, hi, shape).astype(np.float32)
        return x.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    if elem_type == TensorProto.BOOL:
        return rng.integers(0, 2, shape).astype(bool)
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    return rng.integers(int(math.floor(lo)), int(math.floor(hi)) + 1, shape).astype(np_type)


def _has_half_precision(graph: onnx.GraphProto) -> bool:
    types = [vi.type.tensor_type.elem_type for vi in list(graph.input) + list(graph.output)]
    types += [t.data_type for t in graph.initializer]
    return any(t in _HALF for t in types)


def _compare(name: str, got: np.ndarray, ref: np.ndarray, rtol: float) -> OutputDiff:
    if got.shape != ref.shape:
        return OutputDiff(name, math.inf, math.inf, 0.0, False)
    if ref.dtype.kind in "biu":  # labels, masks: exact
        bad = float(np.count_nonzero(got.astype(ref.dtype) != ref))
        return OutputDiff(name, bad, bad / max(ref.size, 1), 0.0, bad == 0)
    ref64 = ref.astype(np.float64)
    got64 = got.astype(np.float64)
    finite = np.isfinite(ref64)
    scale = float(np.abs(ref64[finite]).max(initial=0.0))
    same_nonfinite = np.array_equal(np.isfinite(got64), finite) and np.array_equal(got64[~finite], ref64[~finite], equal_nan=True)
    max_abs = float(np.abs(got64[finite] - ref64[finite]).max(initial=0.0)) if same_nonfinite else math.inf
    tolerance = rtol * max(1.0, scale)
    return OutputDiff(name, max_abs, max_abs / max(scale, 1e-12), tolerance, max_abs <= tolerance)


def _top1_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Share of rows whose argmax agrees, for 2-D float outputs (logits); None otherwise."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape or a.dtype.kind != "f":
        return None
    return float((a.argmax(1) == b.argmax(1)).mean())


def check_model(
    model: onnx.ModelProto | str,
    batch: int = 2,
    bounds: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    providers: Sequence[str] | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    threads: int | None = None,
) -> CheckResult:
    """Compare the torch executor with onnxruntime on random inputs in ``bounds``.

    Dynamic batch dims become ``batch``; a fixed batch dim is used as is. Unsupported ops are
    reported in the result (not raised). ``input_shapes`` (name -> shape, as ``--input-shapes``
    gives them) sets the shapes of inputs with other dynamic dims; each must agree with the dims
    the model fixes. The gradient check backpropagates a fixed random weighting of the first
    float output (a plain sum would be constant for softmax outputs and give zero gradients).
    """
    from .runtime import use_threads
    from .torch_exec import OnnxTorchModule, UnsupportedOpsError, _uses_wide_or_narrow_floats

    if threads is not None:  # the API leaves the caller's threads alone unless asked
        use_threads(threads, warn_if_busy=False)  # a check takes seconds: no warning before its result
    start = time.perf_counter()
    name, model = _read(model)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in inits]
    shapes, used_batch = _input_shapes(model, batch, input_shapes)
    result = CheckResult(model=name, batch=used_batch, input_shapes=shapes,
                         computes_in_float32=_uses_wide_or_narrow_floats(model))

    try:
        module = OnnxTorchModule(model)
    except UnsupportedOpsError as exc:
        result.unsupported = exc.ops
        result.seconds = time.perf_counter() - start
        return result

    rng = np.random.default_rng(seed)
    feeds = {vi.name: _random_input(rng, vi.type.tensor_type.elem_type, shapes[vi.name], bounds) for vi in inputs}
    out_names, refs = _reference_outputs(model, feeds, providers, result)
    result.computes_in_float32 = module.computes_in_float32
    rtol = RTOL_HALF if _has_half_precision(graph) else RTOL_FLOAT32

    args = [_leaf(feeds[vi.name]) for vi in inputs]
    try:
        outs = module(*args)
    except CloakError as exc:
        result.error = str(exc)
        result.seconds = time.perf_counter() - start
        return result
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    by_name = dict(zip(module.output_names, outs))
    for out_name, ref in zip(out_names, refs):
        got = by_name[out_name].detach().cpu().numpy()
        result.outputs.append(_compare(out_name, got, np.asarray(ref), rtol))

    _check_gradients(args, outs, seed, result)
    result.seconds = time.perf_counter() - start
    return result


def _leaf(value: np.ndarray):
    """A torch copy of a feed; float ones require gradients (the gradient check needs them)."""
    import torch

    t = torch.from_numpy(np.array(value, copy=True))
    return t.float().requires_grad_() if t.is_floating_point() else t


def _read(model: onnx.ModelProto | str) -> tuple[str, onnx.ModelProto]:
    """(the name the result shows, the model), reading it from a path if needed."""
    name = model if isinstance(model, str) else (model.graph.name or "<model>")
    if isinstance(model, str):
        try:
            model = onnx.load(model)
        except Exception as exc:  # noqa: BLE001 - unreadable file
            raise CloakError(f"cannot read ONNX model {name!r}: {exc}") from exc
    return name, model


def _reference_outputs(model: onnx.ModelProto, feeds: dict, providers, result: CheckResult):
    """onnxruntime's outputs, the reference: for a QDQ model unfused (the fused kernels round
    differently), and how far the fused ones are from it."""
    from . import runtime

    qdq = is_qdq(model)
    session = runtime.make_session(model, providers, fuse=not qdq)
    out_names = [o.name for o in session.get_outputs()]
    refs = session.run(out_names, feeds)
    if qdq:
        fused = runtime.make_session(model, providers).run(out_names, feeds)
        result.quantized = {"reference": "onnxruntime with basic graph optimizations (unfused QDQ)",
                            "fused_max_abs": max(float(np.abs(np.asarray(f, np.float64) - np.asarray(r, np.float64)).max(initial=0.0))
                                                 for f, r in zip(fused, refs)),
                            "fused_top1_agreement": _top1_agreement(fused[0], refs[0])}
    return out_names, refs


def _check_gradients(args: list, outs: list, seed: int, result: CheckResult) -> None:
    """Backpropagate a fixed random weighting of the first float output to the float inputs: are
    the gradients finite, and not all zero?"""
    import torch

    float_args = [a for a in args if a.requires_grad]
    target = next((o for o in outs if o.is_floating_point() and o.requires_grad), None)
    if float_args and target is not None:
        weights = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(tuple(target.shape)).astype(np.float32))
        grads = torch.autograd.grad((target * weights).sum(), float_args, allow_unused=True)
        grads = [g for g in grads if g is not None]
        result.grad_finite = bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
        result.grad_nonzero = bool(grads) and any(bool((g != 0).any()) for g in grads)
