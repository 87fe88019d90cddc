"""Find the classification head, its feature tensor and the logits: one walk, used by every command.

The head is the final linear layer g of F(x) = g(c(x)): a ``Gemm``, or ``MatMul`` followed by
``Add``, that produces the logits, possibly through Softmax/Identity/Flatten/Reshape. Its input is
the feature tensor c(x) that DeepCloak masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import CloakError
from .record import find_mask, folded_mask, is_mask_node
from .tensors import const_array, constants
from .tensors import producers as producers_of

# Ops between the head and the logits that keep the head's meaning (QDQ pairs only re-quantize).
PASS_THROUGH = {"Identity", "Softmax", "LogSoftmax", "Flatten", "Reshape", "Squeeze", "Cast", "Dropout",
                "QuantizeLinear", "DequantizeLinear"}


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
        b = const_array(consts, node.input[1])
        if b is None or attrs.get("transA", 0):
            return None
        weight = (b.T if attrs.get("transB", 0) else b) * attrs.get("alpha", 1.0)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = const_array(consts, node.input[2])
            if c is None:
                return None
            bias = np.broadcast_to(c * attrs.get("beta", 1.0), (weight.shape[1],)).copy()
        return _with_mask(model, consts, producers, Head("Gemm", [node.name], node.input[0], logits,
                                                         weight.shape[0], weight, bias, output=node.output[0]))
    bias, add = None, None
    if node.op_type == "Add":
        for i, j in ((0, 1), (1, 0)):
            c = const_array(consts, node.input[j])
            mm = producers.get(node.input[i])
            if c is not None and mm is not None and mm.op_type == "MatMul":
                bias, add, node = c.reshape(-1), node, mm
                break
        else:
            return None
    if node.op_type == "MatMul":
        w = const_array(consts, node.input[1])
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
    if node is not None and is_mask_node(node):
        for i, j in ((0, 1), (1, 0)):
            m = const_array(consts, node.input[j])
            if m is not None:
                head.mask = m.reshape(-1).astype(np.float32)
                head.mask_node = node.name
                head.feature = node.input[i]
                break
    return head


def _outputs(model: onnx.ModelProto, logits: str | None) -> list[str]:
    """The graph outputs to look at: all of them, or just ``logits`` (which must exist)."""
    outputs = [o.name for o in model.graph.output]
    if logits is None:
        return outputs
    if logits not in outputs:
        raise CloakError(f"model has no output named {logits!r} (--logits); outputs: {', '.join(outputs)}")
    return [logits]


def find_head(model: onnx.ModelProto, logits: str | None = None) -> Head:
    """Find the linear head that produces the logits, or explain how to choose a tensor by hand."""
    consts = constants(model)
    producers = producers_of(model)
    outputs = _outputs(model, logits)
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


def logits_output(model: onnx.ModelProto, logits: str | None = None) -> str:
    """The graph output carrying the logits: the head's, else the only output, else ``--logits``."""
    outputs = _outputs(model, logits)
    if logits is not None:
        return logits
    try:
        return find_head(model).logits
    except CloakError:
        if len(outputs) != 1:
            raise CloakError(f"model has {len(outputs)} outputs; choose the logits with --logits NAME") from None
        return outputs[0]


@dataclass
class Target:
    """What gets masked: the feature tensor, the logits the attacks use, and what is known about them."""

    feature: str
    logits: str  # the graph output carrying the logits, or the head's own output when that output is a Softmax's
    head: Head | None
    existing_mask: np.ndarray | None

    @property
    def runner_outputs(self) -> list[str]:
        """The tensors onnxruntime must expose besides the graph outputs: the feature tensor, and the
        logits when they are the head's pre-Softmax output."""
        return [self.feature] + ([self.logits] if self.head is not None and self.logits == self.head.output
                                 and self.logits != self.head.logits else [])


def softmax_between(model: onnx.ModelProto, head: Head) -> bool:
    """Whether the graph output ``head.logits`` is a Softmax of the head's output (probabilities):
    cross-entropy on probabilities gives weak, vanishing gradients, so attacks should use the head's."""
    producers = producers_of(model)
    node = producers.get(head.logits)
    while node is not None and node.op_type in PASS_THROUGH and node.output[0] != head.output:
        if node.op_type == "Softmax":
            return True
        node = producers.get(node.input[0])
    return False


def attack_logits(model: onnx.ModelProto, head: Head) -> str:
    """The tensor the attacks maximise the loss of: the graph's logits output, or the head's own
    output when the graph ends in a Softmax (AutoAttack's "use logits", as evaluate does)."""
    return head.output if head.output and softmax_between(model, head) else head.logits


def resolve_target(model: onnx.ModelProto, feature_tensor: str | None, logits: str | None) -> Target:
    """The head's input by default; any float tensor with ``--feature-tensor``."""
    if feature_tensor is None:
        head = find_head(model, logits)
        return Target(head.feature, attack_logits(model, head), head,
                      head.mask if head.mask is not None else folded_mask(model))
    logits = logits_output(model, logits)
    try:
        head = find_head(model, logits)
        head = head if head.feature == feature_tensor else None
    except CloakError:
        head = None
    if head is not None:
        logits = attack_logits(model, head)
    found = find_mask(model, feature_tensor)
    known = {o for n in model.graph.node for o in n.output}
    if feature_tensor not in known:
        raise CloakError(f"no tensor named {feature_tensor!r} is produced in the model; "
                         "`cloakonnx inspect MODEL` shows the feature tensor")
    return Target(feature_tensor, logits, head, None if found is None else found[1])
