"""OnnxTorchModule: an execution plan as a torch module, the one object attacks call.

Holds the plan's constants as buffers (so ``.to(device)`` and ``.double()`` move them) and runs
the steps in ``forward``; everything that reads the model lives in plan.py.
"""
from __future__ import annotations

from typing import Sequence

import onnx
import torch

from ..errors import CloakError
from .plan import build_plan


class OnnxTorchModule(torch.nn.Module):
    """An ONNX graph as a torch module: same outputs as onnxruntime, plus autograd.

    ``outputs`` may name any tensor of the graph (for example a feature tensor before the head);
    only the nodes it depends on run. Floating-point tensors are computed in float32; the flag
    ``computes_in_float32`` is True when the model had float16, bfloat16 or float64 tensors.
    ``fuse=False`` runs the graph node for node as written: no BatchNormalization folded into the
    convolution before it, no decomposed HardSwish/HardSigmoid/GELU turned into one op (fuse.py);
    for comparing against, the default is faster and gives the same outputs and input gradients.
    """

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str] | None = None, fuse: bool = True):
        super().__init__()
        plan = build_plan(model, outputs, fuse=fuse)
        self.computes_in_float32 = plan.computes_in_float32
        self.opset = plan.opset
        self.input_names = plan.input_names
        self._input_is_float = plan.input_is_float
        self.output_names = plan.output_names
        self._input_slots = plan.input_slots
        for bname, tensor in plan.buffers.items():
            self.register_buffer(bname, tensor)
        self._const_slots = plan.const_slots
        self._output_slots = plan.output_slots
        # Float inputs follow the module's float dtype: float32, or float64 after .double().
        self.register_buffer("float_dtype_probe", torch.empty(0), persistent=False)
        self._plan = plan.steps
        self._env_template = plan.env_template

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self._input_slots):
            raise CloakError(f"the model takes {len(self._input_slots)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        env = list(self._env_template)
        buffers = self._buffers
        for s, name in self._const_slots:
            env[s] = buffers[name]
        float_dtype = buffers["float_dtype_probe"].dtype
        for s, x, is_float in zip(self._input_slots, inputs, self._input_is_float):
            if is_float and x.dtype != float_dtype:
                x = x.to(float_dtype)
            env[s] = x
        for step in self._plan:
            try:
                outs = step.fn([env[i] for i in step.ins], step.attrs, step.ctx)
            except CloakError:
                raise
            except Exception as exc:
                ctx = step.ctx
                raise CloakError(f"{ctx.op_type} node {ctx.name!r} (opset {ctx.opset}) failed in the torch executor: {exc}") from exc
            for s, o in zip(step.outs, outs):
                env[s] = o
            for s in step.free:
                env[s] = None
        if len(self._output_slots) == 1:
            return env[self._output_slots[0]]
        return tuple(env[s] for s in self._output_slots)

    def extra_repr(self) -> str:
        return f"opset={self.opset}, steps={len(self._plan)}, inputs={self.input_names}, outputs={self.output_names}"
