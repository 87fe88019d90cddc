"""Accuracy of ONNX models through onnxruntime: the numbers that hold at serving time."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .runtime import batch_size_for, run_batch


def predict(session, x: np.ndarray, feed: Callable[[np.ndarray], np.ndarray], logits: str | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Predicted classes for box-space inputs ``x``; ``feed`` maps them to the model's input."""
    bs = batch_size_for(session, batch_size)
    outputs = [logits] if logits else [session.get_outputs()[0].name]
    preds = []
    for s in range(0, len(x), bs):
        (out,) = run_batch(session, feed(x[s : s + bs]), outputs)
        preds.append(out.reshape(len(out), -1).argmax(1))
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def accuracy(session, x: np.ndarray, y: np.ndarray, feed, logits: str | None = None, batch_size: int = 256) -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict(session, x, feed, logits, batch_size) == y).mean())
