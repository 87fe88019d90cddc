"""The ONNX side: reading, analysing and rewriting graphs. Nothing here imports torch, so the
served model is written by code that a deployment image can run without a deep-learning framework.

- :mod:`.io`: load and save faithfully (atomic, external data);
- :mod:`.tensors`: inputs, element types, constants, intermediate tensors exposed as outputs;
- :mod:`.head`: the linear head, its feature tensor and the logits, found in one walk;
- :mod:`.record`: the cloak record (mask node prefix, metadata keys, history, folded mask);
- :mod:`.surgery`: insert the ``Mul`` mask; :mod:`.fold`: fold it into the head's weights;
- :mod:`.weights`: the weights a fine-tuning moves, as graph inputs for the executor, and written back;
- :mod:`.inspect`: ``cloakonnx inspect``.
"""
from .fold import fold_mask
from .head import PASS_THROUGH, Head, Target, find_head, logits_output, resolve_target
from .inspect import ModelInfo, describe_head, inspect_model
from .io import check_writable_dir, load_model, save_model, uses_external_data
from .record import CloakRecord, cloak_metadata, find_mask, folded_mask
from .surgery import apply_mask
from .tensors import (TensorInfo, check_input_shapes, constants, fixed_size, is_qdq, model_inputs, per_axis,
                      select_input, show_shape, tensor_elem_type, with_outputs, without_unset_dims)
from .weights import initializer_values, relative_change, trainable_initializers, with_weight_inputs, with_weights

__all__ = ["CloakRecord", "Head", "ModelInfo", "PASS_THROUGH", "Target", "TensorInfo", "apply_mask",
           "check_input_shapes", "check_writable_dir", "cloak_metadata", "constants", "describe_head", "find_head",
           "find_mask", "fixed_size", "fold_mask", "folded_mask", "initializer_values", "inspect_model", "is_qdq",
           "load_model", "logits_output", "model_inputs", "per_axis", "relative_change", "resolve_target", "save_model", "select_input",
           "show_shape", "tensor_elem_type", "trainable_initializers", "uses_external_data", "with_outputs",
           "with_weight_inputs", "with_weights", "without_unset_dims"]
