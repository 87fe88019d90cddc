"""Graph surgery: one constant elementwise Mul that zeroes (or scales) masked features before the head.

The rewrite uses onnx-graphsurgeon; the result is put back into a copy of the original ModelProto so
the IR version, opset imports, producer, doc string and metadata stay exactly as they were
(graphsurgeon's exporter would otherwise reset the IR version to the installed onnx default).
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import CloakError
from .record import MASK_NODE_PREFIX, check_mask_values, set_metadata
from .tensors import tensor_elem_type


def mask_shape(width: int, rank: int) -> tuple[int, ...]:
    """[1, F] for a head input; [1, C, 1, 1] (one entry per channel) for a 4-D tensor."""
    return (1, width) + (1,) * max(rank - 2, 0)


def apply_mask(model: onnx.ModelProto, feature: str, mask: np.ndarray, rank: int = 2,
               metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` where every consumer of ``feature`` sees ``feature * mask``.

    If a cloak mask on ``feature`` already exists its values are replaced (no second Mul is stacked):
    callers pass the combined mask.
    """
    import onnx_graphsurgeon as gs

    mask = check_mask_values(mask)
    elem = tensor_elem_type(model, feature)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    if not np.issubdtype(np_dtype, np.floating):
        raise CloakError(
            f"the feature tensor {feature!r} is {np_dtype} (an integer or quantized head); "
            "a float mask cannot be applied there: choose a float tensor with --feature-tensor NAME"
        )
    values = mask.astype(np_dtype).reshape(mask_shape(len(mask), rank))

    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    if feature not in tensors:
        raise CloakError(f"no tensor named {feature!r} in the model")
    src = tensors[feature]
    existing = [n for n in src.outputs if n.op == "Mul" and n.name.startswith(MASK_NODE_PREFIX)]
    if existing:
        const = next(t for t in existing[0].inputs if isinstance(t, gs.Constant))
        if const.values.size != values.size:
            raise CloakError(f"the existing cloak mask has {const.values.size} entries, the new one {values.size}")
        const.values = values.reshape(const.values.shape)
    else:
        consumers = list(src.outputs)
        if not consumers:
            raise CloakError(f"tensor {feature!r} feeds no node; nothing to mask")
        name = _unique_name(tensors.keys() | {n.name for n in graph.nodes}, MASK_NODE_PREFIX)
        masked = gs.Variable(f"{feature}_cloaked", dtype=src.dtype, shape=src.shape)
        const = gs.Constant(f"{name}_values", values)
        _rewire(consumers, src, masked)
        graph.nodes.append(gs.Node("Mul", name=name, inputs=[src, const], outputs=[masked]))
        graph.toposort()
    exported = gs.export_onnx(graph, do_type_check=False)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.CopyFrom(exported.graph)
    set_metadata(out, metadata or {})
    return out


def _rewire(consumers, src, masked) -> None:
    """Make every consumer of ``src`` read ``masked`` instead."""
    for node in consumers:
        for i, t in enumerate(node.inputs):
            if t is src:
                node.inputs[i] = masked


def _unique_name(taken, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``...: masks on several layers keep distinct names."""
    name, k = base, 0
    while name in taken or f"{name}_values" in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def with_mask_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` where each named tensor is multiplied by a new float graph input of the given
    shape (``[1, C]`` or ``[1, C, 1, 1]``), and those inputs' names: the model mask learning runs
    through the torch executor, with gradients to the mask values. It is never served."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    names = []
    for feature, shape in shapes.items():
        if feature not in tensors:
            raise CloakError(f"no tensor named {feature!r} in the model")
        src = tensors[feature]
        consumers = list(src.outputs)
        if not consumers:
            raise CloakError(f"tensor {feature!r} feeds no node; nothing to mask")
        taken = tensors.keys() | {n.name for n in graph.nodes} | set(names)
        name = _unique_name(taken, MASK_NODE_PREFIX + "_learned")
        values = gs.Variable(f"{name}_values", dtype=np.float32, shape=list(shape))
        masked = gs.Variable(f"{feature}_learned", dtype=src.dtype, shape=src.shape)
        _rewire(consumers, src, masked)
        graph.nodes.append(gs.Node("Mul", name=name, inputs=[src, values], outputs=[masked]))
        graph.inputs.append(values)
        names.append(values.name)
        tensors = graph.tensors()
    graph.toposort()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.CopyFrom(gs.export_onnx(graph, do_type_check=False).graph)
    return out, names
