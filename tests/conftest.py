"""Shared fixtures: a small CNN trained on real digits and exported with torch.onnx, built once per session."""
from __future__ import annotations

import numpy as np
import pytest


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


def with_lrn(path):
    """The model at ``path`` with an LRN after its first Relu: an op onnxruntime runs and the torch
    executor lacks, for the gradient-free fallback."""
    import onnx

    model = onnx.load(str(path))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    lrn_out = relu.output[0] + "_lrn"
    for node in model.graph.node:
        node.input[:] = [lrn_out if i == relu.output[0] else i for i in node.input]
    index = list(model.graph.node).index(relu) + 1
    model.graph.node.insert(index, onnx.helper.make_node("LRN", [relu.output[0]], [lrn_out], size=1, bias=1.0,
                                                         alpha=1e-4, beta=0.75))
    onnx.checker.check_model(model)
    return model
