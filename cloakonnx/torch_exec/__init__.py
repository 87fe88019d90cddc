"""Run an ONNX graph with torch ops, so attacks get gradients with respect to the input.

onnxruntime has no autograd, and the public ONNX->torch converters fail on current exports
(opset 18+ op versions, shared initializers, BatchNormalization's training_mode).
So this package interprets the graph itself:

* an op table keyed by ``(op_type, since_version)`` (registry.py); a node gets the handler
  registered for exactly the since_version ``onnx.defs`` gives its op at the model's opset, and a
  version nobody registered is refused (an older version's handler never serves a newer one), so
  supporting a new op version is one small function, or one more version on a decorator line, in
  its family's module under ops/;
* a plan built once per model (plan.py): topological node order, the handler resolved per node,
  attributes parsed once, all-constant subgraphs folded, BatchNormalization folded into the
  convolution before it and hard-swish/hard-sigmoid/GELU written out as arithmetic turned back into
  one op (fuse.py; ``fuse=False`` keeps the graph as written), constants registered as buffers (so
  ``.to(device)`` moves them), and for every step the intermediates whose last reader it is, freed
  right after; :class:`OnnxTorchModule` (module.py) runs it;
* an ``If`` whose condition is certain at plan time (constants, and dims the graph itself fixes)
  is inlined; any other becomes one step that picks a branch's sub-plan per call (control.py,
  shapes.py); Loop, Scan and other ops with subgraphs are refused by name;
* float16/bfloat16/float64 tensors are computed in float32 (``computes_in_float32`` says so).

Handlers take ``(inputs, attrs, ctx)``: ``inputs`` is a list of tensors (None for an omitted
optional input), ``attrs`` the node's parsed attributes, ``ctx`` a :class:`NodeContext`; they
return a tuple of outputs. Run-time shapes are int64 tensors and become Python ints via
``.tolist()`` where torch needs them.
"""
from __future__ import annotations

from . import ops  # noqa: F401 - registers every handler before anything reads the table
from .module import OnnxTorchModule
from .plan import DEFAULT_DOMAINS, UnsupportedOpsError, _uses_wide_or_narrow_floats, unsupported_ops
from .registry import _OPS, NodeContext, op, supported_ops
from .tensors import tensor_from_proto

__all__ = ["UnsupportedOpsError", "unsupported_ops", "OnnxTorchModule", "supported_ops", "NodeContext"]
