"""Attack batches sized to the device, and the retry at half the size when memory runs out."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cloakonnx.attacks import AttackConfig
from cloakonnx.backend import craft
from cloakonnx.batching import (CPU_CAP, CUDA_CAP, BatchChoice, fit_batch, free_memory, is_out_of_memory,
                                saved_bytes_per_sample)
from cloakonnx.errors import CloakError


def small_cnn(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10)).eval()


def test_per_sample_memory_scales_with_the_image_and_ignores_weights():
    net = small_cnn()
    small = saved_bytes_per_sample(net, (1, 16, 16))
    large = saved_bytes_per_sample(net, (1, 32, 32))
    assert 3.5 < large / small < 4.5  # activations grow with pixels; the weights, saved once, cancel out
    # Two 8-channel float maps of 16x16 are saved at least once each (conv outputs feed ReLUs).
    assert small >= 2 * 8 * 16 * 16 * 4
    wide = saved_bytes_per_sample(small_cnn(width=32), (1, 16, 16))
    assert 3.5 < wide / small < 4.5


def test_per_sample_memory_of_the_onnx_executor_matches_the_native_module(digits_files):
    import onnx

    from cloakonnx.torch_exec import OnnxTorchModule

    module = OnnxTorchModule(onnx.load(str(digits_files[0])))
    measured = saved_bytes_per_sample(module, (1, 8, 8))
    assert measured > 8 * 8 * 4  # at least the input's conv activations


@pytest.mark.parametrize("free, device, expected", [
    (None, "cpu", CPU_CAP),                       # unknown memory: the cap
    (10**12, "cpu", CPU_CAP),                     # plenty: the cap
    (10**12, "cuda", CUDA_CAP),
    (4 * 3 * 1000 * 10, "cpu", 8),                # a quarter of 120,000 B fits 10 samples of 3 x 1,000 B -> 8
    (0, "cpu", 1),                                # nothing free: still one at a time
])
def test_fit_batch(free, device, expected):
    choice = fit_batch(1000, free, device)
    assert choice.size == expected
    assert choice.size & (choice.size - 1) == 0  # a power of two: stable under small changes of free memory


def test_free_memory_on_cpu_is_plausible():
    free = free_memory("cpu")
    assert free is None or 10**7 < free < 10**14


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    wrapped = CloakError("onnxruntime could not run the model")
    wrapped.__cause__ = RuntimeError("Failed to allocate memory for requested buffer of size 123")
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("bad"))


class RunsOutAbove:
    """A model that fails like a full GPU on batches larger than ``limit``."""

    def __init__(self, net, limit: int):
        self.net, self.limit, self.batches = net, limit, []

    def __call__(self, x):
        self.batches.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} MiB")
        return self.net(x)


def _data(n=40):
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, n)


def test_craft_halves_the_batch_when_memory_runs_out(caplog):
    x, y = _data()
    model = RunsOutAbove(small_cnn(), limit=10)
    cfg = AttackConfig(name="fgsm", eps=0.1)
    with caplog.at_level(logging.WARNING, logger="cloakonnx"):
        adv = craft(model, cfg, x, y, batch_size=32)
    assert adv.shape == x.shape and np.all(np.abs(adv - x) <= 0.1 + 1e-6)
    assert not np.array_equal(adv, x)
    assert max(b for b in model.batches if b <= 10) == 8 and 32 in model.batches and 16 in model.batches
    assert "halved to 16" in caplog.text and "halved to 8" in caplog.text
    # The same inputs crafted at the batch that fits give the same answer (FGSM has no randomness).
    np.testing.assert_allclose(adv, craft(small_cnn(), cfg, x, y, batch_size=8), atol=1e-6)


def test_out_of_memory_at_batch_one_is_a_clear_error():
    x, y = _data(4)
    with pytest.raises(CloakError, match="ran out of memory attacking a batch of 1"):
        craft(RunsOutAbove(small_cnn(), limit=0), AttackConfig(name="fgsm", eps=0.1), x, y, batch_size=4)


def test_a_fixed_batch_model_is_not_retried_smaller():
    x, y = _data(8)
    model = RunsOutAbove(small_cnn(), limit=2)
    with pytest.raises(CloakError, match="batch of 4"):
        craft(model, AttackConfig(name="fgsm", eps=0.1), x, y, batch_size=4, fixed_batch=True)
    assert model.batches == [4]


def test_other_errors_are_not_swallowed():
    def broken(x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    x, y = _data(4)
    with pytest.raises(RuntimeError, match="mat1"):
        craft(broken, AttackConfig(name="fgsm", eps=0.1), x, y, batch_size=4)


def test_harden_sizes_the_attack_batch_and_records_it(digits_files, tmp_path, monkeypatch):
    """With little free memory the measured per-sample cost shrinks the batch; the report says which."""
    from cloakonnx import batching
    from cloakonnx.harden import HardenConfig, harden

    per_sample = {}
    real = batching.saved_bytes_per_sample

    def spy(*args, **kwargs):
        per_sample["bytes"] = real(*args, **kwargs)
        return per_sample["bytes"]

    monkeypatch.setattr(batching, "saved_bytes_per_sample", spy)
    monkeypatch.setattr(batching, "free_memory", lambda device: 4 * 3 * 40 * per_sample["bytes"])  # fits 40 -> 32
    cfg = HardenConfig(output=tmp_path / "h.onnx", attack=AttackConfig(name="fgsm", eps=0.1), fraction=0.05,
                       providers=["CPUExecutionProvider"], device="cpu", adaptive=False)
    report = harden(digits_files[0], digits_files[1], cfg)
    assert report.attack["batch_size"] == 32
    explicit = harden(digits_files[0], digits_files[1],
                      HardenConfig(output=tmp_path / "e.onnx", attack=AttackConfig(name="fgsm", eps=0.1, batch_size=5),
                                   fraction=0.05, providers=["CPUExecutionProvider"], device="cpu", adaptive=False))
    assert explicit.attack["batch_size"] == 5
    from cloakonnx.graph import find_mask, load_model

    # FGSM has no randomness: the batch size does not change which features get masked.
    masks = [find_mask(load_model(p), report.feature_tensor)[1] for p in (tmp_path / "h.onnx", tmp_path / "e.onnx")]
    np.testing.assert_array_equal(*masks)


def test_batch_choice_to_dict():
    assert BatchChoice(4, 10, 100, "why").to_dict() == {"size": 4, "per_sample_bytes": 10, "budget_bytes": 100,
                                                         "reason": "why"}


def test_a_model_that_cannot_be_measured_gets_the_cap():
    from cloakonnx.batching import auto_batch

    def only_batch_one(x):
        if len(x) != 1:
            raise RuntimeError("shape '[1, 64]' is invalid for input of size 128")
        return x.flatten(1) @ torch.ones(64, 10)

    choice = auto_batch(only_batch_one, (1, 8, 8), "cpu", (0.0, 1.0))
    assert choice.size == CPU_CAP and choice.per_sample_bytes is None and "could not measure" in choice.reason


def test_cpu_budget_is_capped_where_bigger_batches_stop_paying():
    """A 224x224 model's 10.6 MiB per sample: a quarter of a 24 GB machine would allow 128, the cap gives 32."""
    from cloakonnx.batching import CPU_MAX_BUDGET

    per_sample = int(10.6 * 2**20)
    assert fit_batch(per_sample, 24 * 2**30, "cpu").size == 32
    assert fit_batch(per_sample, 24 * 2**30, "cpu").budget_bytes == CPU_MAX_BUDGET
    assert fit_batch(per_sample, 24 * 2**30, "cuda").size == 256  # the GPU keeps half its free memory
