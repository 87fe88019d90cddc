"""One model two ways: an onnxruntime session (the truth at serving time) and a torch callable with
gradients (for attacks), both taking box-space inputs; and prediction through onnxruntime.

Where the attacks run (here or on Ray workers) is the backend's business (:mod:`cloakonnx.backend`),
not the Runner's."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import onnx

from .attacks import ATTACKS
from .batching import BatchChoice
from .config import CommonConfig
from .data import Dataset, Preprocess
from .errors import CloakError
from .graph import fixed_size, is_qdq, select_input, with_outputs
from .runtime import batch_size_for, run_batch
from .data import batch_bounds, prefetched

log = logging.getLogger(__name__)


def predict(session, x: np.ndarray, feed: Callable[[np.ndarray], np.ndarray], logits: str | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Predicted classes for box-space inputs ``x``; ``feed`` maps them to the model's input."""
    bs = batch_size_for(session, batch_size)
    outputs = [logits] if logits else [session.get_outputs()[0].name]
    preds = []
    for xb in prefetched(x, batch_bounds(len(x), bs)):
        (out,) = run_batch(session, feed(xb), outputs)
        preds.append(out.reshape(len(out), -1).argmax(1))
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def collect_features(session, feature: str, x: np.ndarray, feed, batch_size: int = 256) -> np.ndarray:
    """The feature tensor for every sample of ``x`` (used for the validation split only)."""
    bs = batch_size_for(session, batch_size)
    parts = [run_batch(session, feed(xb), [feature])[0] for xb in prefetched(x, batch_bounds(len(x), bs))]
    f = np.concatenate(parts)
    return f.reshape(len(f), -1)


class Runner:
    """One model two ways: an onnxruntime session (the truth at serving time) and a torch callable
    with gradients (for attacks), both taking box-space inputs. ``input_shapes`` (--input-shapes) are
    checked against the model here, before any session is built; the input's shape is the given one."""

    def __init__(self, model: onnx.ModelProto, logits: str, extra_outputs: Sequence[str], preprocess: Preprocess,
                 input_name: str | None = None, providers: Sequence[str] | None = None, device: str = "cpu",
                 input_shapes: dict | None = None):
        from .runtime import make_session
        from .torch_exec import OnnxTorchModule, UnsupportedOpsError

        self.model = model
        self._args = dict(logits=logits, extra_outputs=tuple(extra_outputs), preprocess=preprocess,
                          input_name=input_name, providers=providers, device=device, input_shapes=input_shapes)
        declared = select_input(model, input_name)
        self.input = select_input(model, input_name, input_shapes)
        self.preprocess = preprocess
        self.logits = logits
        runnable = with_outputs(model, list(extra_outputs)) if extra_outputs else model
        self.session = make_session(runnable, providers)
        self.input_dtype = np.dtype(self.input.dtype) if self.input.dtype != "unknown" else np.dtype(np.float32)
        self.device = device
        self.unsupported: UnsupportedOpsError | None = None
        self.torch_model = None
        try:
            module = OnnxTorchModule(model, outputs=[logits]).to(device).eval()
            self.torch_model = preprocess.torch_wrap(module, len(self.input.shape))
            self.computes_in_float32 = bool(getattr(module, "computes_in_float32", False))
        except UnsupportedOpsError as exc:
            self.unsupported = exc
            self.computes_in_float32 = False
        self._batch_choices: dict = {}
        self.quantized = is_qdq(model)
        # the model's declared batch: the data sets the batch, whatever batch --input-shapes was written with
        self.fixed_batch = fixed_size(declared.shape[0]) if declared.shape else None

    @classmethod
    def for_config(cls, model: onnx.ModelProto, logits: str, extra_outputs: Sequence[str], config: CommonConfig,
                   device: str) -> "Runner":
        return cls(model, logits, extra_outputs, config.preprocess, config.input_name, config.providers, device,
                   config.input_shapes)

    def rebuild_args(self) -> dict:
        """The arguments that rebuild this Runner from its model elsewhere (a Ray worker)."""
        return dict(self._args)

    def attack_batch(self, requested: int | None, attack_name: str, sample_shape: tuple[int, ...]) -> BatchChoice:
        """The attack batch: the model's fixed batch, the user's ``requested`` size, or for gradient
        attacks one measured to fit the device."""
        from .batching import CPU_CAP, auto_batch

        if self.fixed_batch:
            return BatchChoice(self.fixed_batch, None, None, "the model's fixed batch")
        if requested:
            return BatchChoice(requested, None, None, "--batch-size")
        cls = ATTACKS.get(attack_name)
        if self.torch_model is None or cls is None or not cls.needs_gradients:
            return BatchChoice(CPU_CAP, None, None, "gradient-free: no backward pass to size")
        key = (self.device, tuple(sample_shape))
        if key not in self._batch_choices:
            choice = auto_batch(self.torch_model, tuple(sample_shape), self.device, self.preprocess.bounds)
            log.info("attack batch %d (%s)", choice.size, choice.reason)
            self._batch_choices[key] = choice
        return self._batch_choices[key]

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Box space -> the model's input (normalisation and dtype)."""
        return self.preprocess.to_model(x).astype(self.input_dtype, copy=False)

    def ort_model(self):
        """A torch-callable view of the onnxruntime session (no gradients), for gradient-free attacks."""
        import torch

        def call(x: "torch.Tensor") -> "torch.Tensor":
            xn = x.detach().cpu().numpy()
            bs = batch_size_for(self.session, 256)
            outs = [run_batch(self.session, self.feed(xn[s : s + bs]), [self.logits])[0] for s in range(0, len(xn), bs)]
            out = np.concatenate(outs).reshape(len(xn), -1).astype(np.float32)
            return torch.from_numpy(out).to(x.device)

        return call

    def model_for(self, attack_name: str):
        """The callable an attack needs: the torch graph for gradient attacks, onnxruntime otherwise."""
        cls = ATTACKS.get(attack_name)
        if cls is not None and not cls.needs_gradients:
            return self.ort_model()
        if self.torch_model is None:
            raise CloakError(f"{self.unsupported}; use a gradient-free attack (--attack square)")
        return self.torch_model

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return predict(self.session, x, self.feed, self.logits, batch_size)

    def accuracy(self, ds: Dataset, batch_size: int = 256, x: np.ndarray | None = None) -> float:
        """Accuracy on ``ds`` (or on ``x``, e.g. adversarial versions of ``ds.x``, with ``ds.y``)."""
        if len(ds.y) == 0:
            return float("nan")
        return float((self.predict(ds.x if x is None else x, batch_size) == ds.y).mean())

    def num_classes(self, ds: Dataset) -> int:
        """Width of the logits, read from one real forward pass (works for any head)."""
        (logits,) = run_batch(self.session, self.feed(ds.x[:1]), [self.logits])
        return int(np.prod(logits.shape[1:]))
