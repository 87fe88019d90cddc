"""OnnxTorchModule: an execution plan as a torch module, the one object attacks call.

Holds the plan's constants as buffers (so ``.to(device)`` and ``.double()`` move them) and runs
the steps in ``forward``; everything that reads the model lives in plan.py.
"""
from __future__ import annotations

from typing import Sequence

import onnx
import torch

from ..errors import CloakError
from .plan import build_plan, iter_steps, run_steps


class OnnxTorchModule(torch.nn.Module):
    """An ONNX graph as a torch module: same outputs as onnxruntime, plus autograd.

    ``outputs`` may name any tensor of the graph (for example a feature tensor before the head);
    only the nodes it depends on run. Floating-point tensors are computed in float32; the flag
    ``computes_in_float32`` is True when the model had float16, bfloat16 or float64 tensors.
    ``fuse=False`` runs the graph node for node as written: no BatchNormalization folded into the
    convolution before it, no decomposed HardSwish/HardSigmoid/GELU turned into one op (fuse.py);
    for comparing against, the default is faster and gives the same outputs and input gradients.

    ``channels_last`` stores 4-D weights and runs 4-D inputs in torch's channels-last layout, where
    oneDNN's CPU convolutions (depthwise and 1x1 above all) are about twice as fast, forward and
    backward. None (the default) uses it on CPU for graphs with convolutions; the layout changes no
    value beyond float rounding, and 4-D outputs come back contiguous.
    """

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str] | None = None, fuse: bool = True,
                 channels_last: bool | None = None):
        super().__init__()
        self.channels_last = channels_last
        self._layout_is_channels_last = False
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
        self._has_conv = any(step.ctx.op_type in ("Conv", "ConvTranspose") for step in iter_steps(plan.steps))
        self._env_template = plan.env_template

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self._input_slots):
            raise CloakError(f"the model takes {len(self._input_slots)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        env = list(self._env_template)
        buffers = self._buffers
        for s, name in self._const_slots:
            env[s] = buffers[name]
        float_dtype = buffers["float_dtype_probe"].dtype
        channels_last = self._use_channels_last(inputs)
        for s, x, is_float in zip(self._input_slots, inputs, self._input_is_float):
            if is_float and x.dtype != float_dtype:
                x = x.to(float_dtype)
            if channels_last and is_float and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            env[s] = x
        run_steps(self._plan, env)
        outs = [env[s] for s in self._output_slots]
        if channels_last:
            outs = [o.contiguous() if isinstance(o, torch.Tensor) and o.dim() == 4 else o for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _use_channels_last(self, inputs) -> bool:
        """Whether this call runs channels-last; moves the 4-D float buffers to that layout when it changes."""
        wanted = self.channels_last
        if wanted is None:
            wanted = (self._has_conv and bool(inputs) and isinstance(inputs[0], torch.Tensor)
                      and inputs[0].device.type == "cpu")
        if wanted != self._layout_is_channels_last:
            layout = torch.channels_last if wanted else torch.contiguous_format
            for name, b in self._buffers.items():
                if b is not None and b.dim() == 4 and b.is_floating_point():
                    self._buffers[name] = b.contiguous(memory_format=layout)
            self._layout_is_channels_last = wanted
        return wanted

    def extra_repr(self) -> str:
        return f"opset={self.opset}, steps={len(self._plan)}, inputs={self.input_names}, outputs={self.output_names}"
