"""Shared fixtures: a small CNN trained on real digits and exported with torch.onnx, built once per session."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """The busy-machine warning depends on the load of whatever else runs on the machine: tests see
    an idle one (tests/test_threads.py sets the load it needs)."""
    import os

    if hasattr(os, "getloadavg"):
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))


@pytest.fixture(scope="session")
def digits():
    from cloakonnx.data import digits_dataset

    return digits_dataset()


@pytest.fixture(scope="session")
def digits_net(digits):
    """A trained torch CNN (64 features) and the held-out digits it never saw."""
    import torch

    from cloakonnx.data import split
    from cloakonnx.demo import build_digits_cnn, train_classifier

    torch.manual_seed(0)
    train, held_out = split(digits, 0.4, seed=0)
    net = train_classifier(build_digits_cnn(64), train, epochs=8, seed=0)
    return net, held_out


@pytest.fixture(scope="session")
def digits_files(digits_net, tmp_path_factory):
    """(model.onnx, data.npz) exported from ``digits_net``: what a user would bring."""
    import torch

    from cloakonnx.demo import export_onnx

    net, held_out = digits_net
    folder = tmp_path_factory.mktemp("digits")
    model_path, data_path = folder / "digits.onnx", folder / "digits.npz"
    export_onnx(net, torch.from_numpy(held_out.x[:2]), model_path)
    np.savez(data_path, x=held_out.x, y=held_out.y)
    return model_path, data_path


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# An op onnxruntime's CPU provider runs and the torch executor does not, for the tests of the
# gradient-free fallback. A 1x1 LpPool with p=1 is |x|, the identity on a Relu's output, so the model
# still predicts as before. with_unsupported_op checks the executor still refuses it: should LpPool
# ever be supported, pick another op here rather than let those tests pass without a fallback.
UNSUPPORTED_OP = "LpPool"


def with_unsupported_op(path):
    """The model at ``path`` with a 1x1 LpPool (p=1, the identity on non-negative values) after its
    first Relu: an op onnxruntime runs and the torch executor lacks, for the gradient-free fallback."""
    import onnx

    from cloakonnx.torch_exec import OnnxTorchModule, UnsupportedOpsError

    model = onnx.load(str(path))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    new_out = relu.output[0] + "_lppool"
    for node in model.graph.node:
        node.input[:] = [new_out if i == relu.output[0] else i for i in node.input]
    index = list(model.graph.node).index(relu) + 1
    model.graph.node.insert(index, onnx.helper.make_node(UNSUPPORTED_OP, [relu.output[0]], [new_out], kernel_shape=[1, 1], p=1))
    onnx.checker.check_model(model)
    try:
        OnnxTorchModule(model)
    except UnsupportedOpsError as exc:
        assert [op for op, _ in exc.ops] == [UNSUPPORTED_OP], exc.ops
    else:
        raise AssertionError(f"the torch executor now runs {UNSUPPORTED_OP}: the fallback tests need another unsupported op")
    return model
