"""Load and save ONNX models faithfully, and find the classification head and its feature tensor.

The head is the final linear layer g of F(x) = g(c(x)): a ``Gemm``, or ``MatMul`` followed by
``Add``, that produces the logits, possibly through Softmax/Identity/Flatten/Reshape. Its input is
the feature tensor c(x) that DeepCloak masks.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import CloakError

log = logging.getLogger(__name__)

MASK_NODE_PREFIX = "cloakonnx_mask"
# Ops that carry logits to the graph output without changing which class wins.
# Ops between the head and the logits that keep the head's meaning (QDQ pairs only re-quantize).
PASS_THROUGH = {"Identity", "Softmax", "LogSoftmax", "Flatten", "Reshape", "Squeeze", "Cast", "Dropout",
                "QuantizeLinear", "DequantizeLinear"}
TWO_GB = 2**31


@dataclass
class TensorInfo:
    name: str
    shape: list[Any]
    dtype: str


@dataclass
class Head:
    """The linear head found in a model. ``weight`` is [features, classes]: logits = f @ weight + bias."""

    kind: str  # "Gemm", "MatMul+Add" or "MatMul"
    nodes: list[str]
    feature: str  # the tensor that is (or would be) masked: the head's input before any cloak mask
    logits: str  # the graph output carrying the logits
    width: int
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)  # an existing cloak mask, flattened
    mask_node: str | None = None
    output: str = ""  # the tensor the head itself produces (before any Softmax etc.); identifies the head

    def apply(self, features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The head's logits for (optionally masked) features, in float64 numpy."""
        f = features.reshape(len(features), -1).astype(np.float64)
        if mask is not None:
            f = f * mask.reshape(1, -1)
        out = f @ self.weight.astype(np.float64)
        return out + self.bias.astype(np.float64) if self.bias is not None else out


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


def tensor_elem_type(model: onnx.ModelProto, name: str) -> int:
    """The ONNX element type of any tensor in the graph (shape inference as a fallback; float if unknown)."""
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        if t.name == name:
            return t.data_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in inferred.graph.value_info:
            if vi.name == name and vi.type.tensor_type.elem_type:
                return vi.type.tensor_type.elem_type
    except Exception:  # noqa: BLE001 - inference is best effort; float is the common case
        pass
    return onnx.TensorProto.FLOAT


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensors whose value is known without running the graph: initializers, Constant nodes, and
    DequantizeLinear of those (the weights of QDQ-quantized models)."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
        elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            value = dequantized_constant(node, out)
            if value is not None:
                out[node.output[0]] = numpy_helper.from_array(value, node.output[0])
    return out


def dequantized_constant(node: onnx.NodeProto, consts: dict) -> np.ndarray | None:
    """``(x - zero_point) * scale`` of a DequantizeLinear whose inputs are all constants, else None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("block_size", 0):
        return None
    arrays = [_const_array(consts, name) if name else None for name in node.input]
    if any(a is None for a, name in zip(arrays, node.input) if name):
        return None
    x, scale = arrays[0], arrays[1]
    zp = arrays[2] if len(arrays) > 2 else None
    if x.dtype.kind not in "iu":
        return None  # float8 and other encodings are not folded here
    axis = attrs.get("axis", 1)
    y = x.astype(np.float32)
    if zp is not None:
        y = y - per_axis(zp.astype(np.float32), x.ndim, axis)
    return (y * per_axis(scale.astype(np.float32), x.ndim, axis)).astype(scale.dtype)


def is_qdq(model: onnx.ModelProto) -> bool:
    """True for QDQ-quantized graphs (QuantizeLinear/DequantizeLinear of the default domain)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx")
               for n in model.graph.node)


def per_axis(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A quantization scale or zero point (one value, or one per index of ``axis``) shaped to
    broadcast against a tensor of rank ``ndim``."""
    if v.size == 1 or ndim == 0:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def tensor_infos(values) -> list[TensorInfo]:
    infos = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        infos.append(TensorInfo(v.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                                if tt.elem_type else "unknown"))
    return infos


def model_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    """Graph inputs that are real inputs, not initializers listed as inputs (old exporters do that)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in tensor_infos(model.graph.input) if i.name not in inits]


def select_input(model: onnx.ModelProto, name: str | None = None) -> TensorInfo:
    inputs = model_inputs(model)
    if name:
        for i in inputs:
            if i.name == name:
                return i
        raise CloakError(f"model has no input named {name!r}; inputs: {', '.join(i.name for i in inputs)}")
    if len(inputs) != 1:
        raise CloakError(
            f"model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "cloakonnx needs one image input: choose it with --input NAME"
        )
    return inputs[0]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _const_array(consts: dict, name: str) -> np.ndarray | None:
    t = consts.get(name)
    return None if t is None else numpy_helper.to_array(t)


def _head_at(model, consts, producers, tensor: str) -> Head | None:
    """Walk back from a graph output through pass-through ops to a linear layer, if there is one."""
    logits = tensor
    node = producers.get(tensor)
    while node is not None and node.op_type in PASS_THROUGH:
        tensor = node.input[0]
        node = producers.get(tensor)
    if node is None:
        return None
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        b = _const_array(consts, node.input[1])
        if b is None or attrs.get("transA", 0):
            return None
        weight = (b.T if attrs.get("transB", 0) else b) * attrs.get("alpha", 1.0)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = _const_array(consts, node.input[2])
            if c is None:
                return None
            bias = np.broadcast_to(c * attrs.get("beta", 1.0), (weight.shape[1],)).copy()
        return _with_mask(model, consts, producers, Head("Gemm", [node.name], node.input[0], logits,
                                                         weight.shape[0], weight, bias, output=node.output[0]))
    bias, add = None, None
    if node.op_type == "Add":
        for i, j in ((0, 1), (1, 0)):
            c = _const_array(consts, node.input[j])
            mm = producers.get(node.input[i])
            if c is not None and mm is not None and mm.op_type == "MatMul":
                bias, add, node = c.reshape(-1), node, mm
                break
        else:
            return None
    if node.op_type == "MatMul":
        w = _const_array(consts, node.input[1])
        if w is None or w.ndim != 2:
            return None
        kind = "MatMul+Add" if add is not None else "MatMul"
        names = [node.name] + ([add.name] if add is not None else [])
        out = (add if add is not None else node).output[0]
        return _with_mask(model, consts, producers, Head(kind, names, node.input[0], logits, w.shape[0], w, bias,
                                                         output=out))
    return None


def _with_mask(model, consts, producers, head: Head) -> Head:
    """If the head's input is a cloak mask, report the mask and the raw feature tensor behind it."""
    node = producers.get(head.feature)
    if node is not None and node.op_type == "Mul" and node.name.startswith(MASK_NODE_PREFIX):
        for i, j in ((0, 1), (1, 0)):
            m = _const_array(consts, node.input[j])
            if m is not None:
                head.mask = m.reshape(-1).astype(np.float32)
                head.mask_node = node.name
                head.feature = node.input[i]
                break
    return head


def find_mask(model: onnx.ModelProto, feature: str) -> tuple[str, np.ndarray] | None:
    """The cloak mask (node name, flattened values) already applied to ``feature``, if any."""
    consts = constants(model)
    for node in model.graph.node:
        if node.op_type == "Mul" and node.name.startswith(MASK_NODE_PREFIX) and feature in node.input:
            other = node.input[1] if node.input[0] == feature else node.input[0]
            m = _const_array(consts, other)
            if m is not None:
                return node.name, m.reshape(-1).astype(np.float32)
    return None


def find_head(model: onnx.ModelProto, output: str | None = None) -> Head:
    """Find the linear head that produces the logits, or explain how to choose a tensor by hand."""
    consts = constants(model)
    producers = _producers(model)
    outputs = [o.name for o in model.graph.output]
    if output is not None:
        if output not in outputs:
            raise CloakError(f"model has no output named {output!r} (--logits); outputs: {', '.join(outputs)}")
        outputs = [output]
    heads = [h for h in (_head_at(model, consts, producers, o) for o in outputs) if h is not None]
    if not heads:
        raise CloakError(
            "no linear classification head (a final Gemm, or MatMul+Add) produces the model's output; "
            "choose the tensor to mask with --feature-tensor NAME"
        )
    distinct = {h.output for h in heads}
    if len(distinct) > 1:
        raise CloakError(
            f"several outputs end in different linear heads ({', '.join(h.logits for h in heads)}); "
            "choose the one that carries the logits with --logits NAME"
        )
    # Several outputs may share one head (logits and probabilities): prefer the raw logits.
    direct = [h for h in heads if h.logits == h.output]
    return (direct or heads)[0]


def logits_output(model: onnx.ModelProto, output: str | None = None) -> str:
    """The graph output carrying the logits: the head's, else the only output, else ``--logits``."""
    outputs = [o.name for o in model.graph.output]
    if output is not None:
        if output not in outputs:
            raise CloakError(f"model has no output named {output!r} (--logits); outputs: {', '.join(outputs)}")
        return output
    try:
        return find_head(model).logits
    except CloakError:
        if len(outputs) != 1:
            raise CloakError(f"model has {len(outputs)} outputs; choose the logits with --logits NAME") from None
        return outputs[0]


@dataclass
class ModelInfo:
    path: str
    ir_version: int
    opset: int
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dynamic_batch: bool
    nodes: int
    head: dict | None
    head_error: str | None
    metadata: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


def describe_head(head: Head) -> dict:
    masked = None if head.mask is None else int((head.mask == 0).sum())
    return {
        "kind": head.kind,
        "nodes": head.nodes,
        "feature_tensor": head.feature,
        "features": head.width,
        "classes": int(head.weight.shape[1]),
        "logits": head.logits,
        "mask": None if head.mask is None else {"form": "mul", "node": head.mask_node, "masked": masked,
                                                "fraction": masked / head.width},
    }


def inspect_model(path: str | os.PathLike, output: str | None = None) -> ModelInfo:
    """Everything a user needs to know before hardening: signature, opset, head, feature tensor, mask."""
    model = load_model(path)
    inputs = model_inputs(model)
    head, err = None, None
    try:
        found = find_head(model, output)
        head = describe_head(found)
        if found.mask is None:
            from .fold import folded_mask

            folded = folded_mask(model)
            if folded is not None:
                masked = int((folded == 0).sum())
                head["mask"] = {"form": "folded", "node": None, "masked": masked, "fraction": masked / found.width}
    except CloakError as exc:
        err = str(exc)
    dyn = bool(inputs) and bool(inputs[0].shape) and not isinstance(inputs[0].shape[0], int) or (
        bool(inputs) and bool(inputs[0].shape) and inputs[0].shape[0] == 0)
    return ModelInfo(
        path=str(path),
        ir_version=model.ir_version,
        opset=opset_version(model),
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x),
        inputs=inputs,
        outputs=tensor_infos(model.graph.output),
        dynamic_batch=dyn,
        nodes=len(model.graph.node),
        head=head,
        head_error=err,
        metadata={p.key: p.value for p in model.metadata_props},
    )
