"""cloakonnx.runtime: provider choice, sessions, and batch-by-batch runs (static and dynamic batch)."""
from __future__ import annotations

import logging
import os
import platform
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cloakonnx import allocator, runtime
from cloakonnx.errors import CloakError
from cloakonnx.runtime import (CPU, CUDA, batch_size_for, default_providers, fixed_batch, make_session,
                               provider_really_loads, resolve_providers, run_batch)

FIXED = 4  # the static batch of the small exported model
W = np.array([[1.0, 0.0, 2.0, 0.0, -1.0],
              [0.0, 1.0, 0.0, 3.0, 0.0],
              [0.5, 0.5, 0.5, 0.5, 0.5]], np.float32)
B = np.array([0.25, -1.0, 0.0], np.float32)


def affine(x: np.ndarray) -> np.ndarray:
    return x @ W.T + B


@pytest.fixture(scope="module")
def fixed_model(tmp_path_factory):
    """A Linear(5, 3) with known weights, exported with a fixed batch of 4 (no dynamic axes)."""
    import torch

    net = torch.nn.Linear(5, 3)
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(W))
        net.bias.copy_(torch.from_numpy(B))
    path = tmp_path_factory.mktemp("fixed") / "fixed4.onnx"
    torch.onnx.export(net, (torch.zeros(FIXED, 5),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def digits_session(digits_files):
    return make_session(digits_files[0])


@pytest.fixture
def fresh_default():
    """default_providers is cached per process: start and leave each test with an empty cache."""
    default_providers.cache_clear()
    yield
    default_providers.cache_clear()


class Recorder:
    """A session proxy that records the shape of every batch fed to it."""

    def __init__(self, session):
        self.session, self.fed = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feeds, run_options=None):
        (x,) = feeds.values()
        self.fed.append(np.array(x))
        return self.session.run(outputs, feeds, run_options)


def _rows(n: int) -> np.ndarray:
    return np.arange(n * 5, dtype=np.float32).reshape(n, 5) / 10


# --------------------------------------------------------------------------- providers


def test_no_request_gives_the_default():
    assert resolve_providers(None) == default_providers()
    assert resolve_providers([]) == default_providers()
    assert default_providers()[-1] == CPU  # CPU is always the last resort
    if not runtime._has_nvidia_device():
        assert default_providers() == (CPU,)


def test_default_is_cuda_then_cpu_when_cuda_really_loads(monkeypatch, fresh_default):
    monkeypatch.setattr(runtime, "provider_really_loads", lambda p: p in (CPU, CUDA))
    assert default_providers() == (CUDA, CPU)
    assert resolve_providers(None) == (CUDA, CPU)


def test_default_is_chosen_and_logged_once(monkeypatch, fresh_default, caplog):
    calls = []
    monkeypatch.setattr(runtime, "provider_really_loads", lambda p: calls.append(p) or False)
    with caplog.at_level(logging.INFO, logger="cloakonnx.runtime"):
        assert default_providers() == (CPU,)
        assert default_providers() == (CPU,)
    assert calls == [CUDA]
    assert [r.getMessage() for r in caplog.records] == ["onnxruntime providers: CPUExecutionProvider"]


@pytest.mark.parametrize("name", ["cpu", "CPU", "Cpu", "CPUExecutionProvider"])
def test_explicit_cpu_in_any_spelling(name):
    assert resolve_providers([name]) == (CPU,)


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(CloakError) as err:
        resolve_providers(["cpu", "nosuchthing"])
    msg = str(err.value)
    assert "'nosuchthing' is not available here" in msg
    assert "available:" in msg and CPU in msg


def test_cuda_not_installed_is_an_error(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(CloakError, match=r"provider 'cuda' is not available here; available: CPUExecutionProvider$"):
        resolve_providers(["cuda"])


def test_cuda_installed_but_not_loading_is_an_error(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(runtime, "provider_really_loads", lambda p: p == CPU)
    with pytest.raises(CloakError, match="CUDA provider is installed but does not load"):
        resolve_providers(["cuda"])


def test_cuda_that_loads_is_accepted_in_order(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(runtime, "provider_really_loads", lambda p: True)
    assert resolve_providers(["cuda", "cpu"]) == (CUDA, CPU)
    assert resolve_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == (CPU, CUDA)


def test_cuda_on_this_machine():
    """Unpatched: with no NVIDIA device, CUDA is refused with a CloakError (never a silent CPU fallback)."""
    assert provider_really_loads(CPU) is True
    assert provider_really_loads("NoSuchExecutionProvider") is False
    if runtime._has_nvidia_device() and provider_really_loads(CUDA):
        assert resolve_providers(["cuda"]) == (CUDA,)
        return
    assert provider_really_loads(CUDA) is False
    with pytest.raises(CloakError, match="not available here|does not load"):
        resolve_providers(["cuda"])


# --------------------------------------------------------------------------- sessions


def test_make_session_on_the_digits_model(digits_files, digits_session):
    model_path, data_path = digits_files
    s = digits_session
    assert [i.name for i in s.get_inputs()] == ["input"]
    assert [o.name for o in s.get_outputs()] == ["logits"]
    assert s.get_providers()[-1] == CPU
    assert tuple(s.get_providers()) == default_providers()
    x = np.load(data_path)["x"][:3]
    (logits,) = s.run(None, {"input": x})
    assert logits.shape == (3, 10)
    # a ModelProto and raw bytes give the same session as a path
    proto = onnx.load(str(model_path))
    for source in (proto, proto.SerializeToString(), str(model_path)):
        np.testing.assert_allclose(make_session(source, ["cpu"]).run(None, {"input": x})[0], logits, rtol=1e-5,
                                   atol=1e-5)


def test_make_session_optimization_levels(digits_files):
    fused = make_session(digits_files[0], ["cpu"])
    basic = make_session(digits_files[0], ["cpu"], fuse=False)
    assert basic.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert fused.get_session_options().graph_optimization_level != ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert basic.get_providers() == [CPU]


def test_make_session_errors(digits_files, tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"this is not an onnx model")
    with pytest.raises(CloakError, match="^onnxruntime could not load the model: "):
        make_session(bad, ["cpu"])
    with pytest.raises(CloakError, match="'nosuchthing' is not available here"):
        make_session(digits_files[0], ["nosuchthing"])


# --------------------------------------------------------------------------- batches


def test_fixed_batch_and_batch_size(fixed_model, digits_session):
    fixed = make_session(fixed_model, ["cpu"])
    assert fixed.get_inputs()[0].shape == [FIXED, 5]
    assert fixed_batch(fixed) == FIXED
    assert batch_size_for(fixed, 256) == FIXED
    assert batch_size_for(fixed, 1) == FIXED
    assert fixed_batch(digits_session) is None  # the digits model has a dynamic batch
    assert batch_size_for(digits_session, 7) == 7
    assert batch_size_for(digits_session, 256) == 256


def test_fixed_batch_ignores_symbolic_zero_and_scalar_shapes():
    class Fake:
        def __init__(self, shape):
            self.shape = shape

        def get_inputs(self):
            return [type("Arg", (), {"shape": self.shape, "name": "x"})()]

    assert fixed_batch(Fake(["batch", 3])) is None
    assert fixed_batch(Fake([None, 3])) is None
    assert fixed_batch(Fake([0, 3])) is None
    assert fixed_batch(Fake([])) is None
    assert fixed_batch(Fake([8, 3])) == 8


def test_run_batch_pads_a_short_batch_and_trims_the_result(fixed_model):
    rec = Recorder(make_session(fixed_model, ["cpu"]))
    x = _rows(2)
    (y,) = run_batch(rec, x)
    assert y.shape == (2, 3)
    np.testing.assert_allclose(y, affine(x), rtol=1e-5, atol=1e-5)
    (fed,) = rec.fed
    assert fed.shape == (FIXED, 5)
    np.testing.assert_array_equal(fed[:2], x)
    np.testing.assert_array_equal(fed[2:], np.repeat(x[-1:], 2, axis=0))  # padded with the last row


def test_run_batch_does_not_split_an_oversized_batch(fixed_model):
    s = make_session(fixed_model, ["cpu"])
    with pytest.raises(CloakError, match=r"could not run the model on input of shape \(5, 5\)"):
        run_batch(s, _rows(5))


def test_run_batch_on_a_dynamic_model_runs_as_given(digits_files, digits_session):
    x = np.load(digits_files[1])["x"][:5]
    rec = Recorder(digits_session)
    (y,) = run_batch(rec, x, ["logits"], input_name="input")
    assert [f.shape[0] for f in rec.fed] == [5]  # no padding without a static batch
    np.testing.assert_allclose(y, digits_session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(CloakError, match=r"on input of shape \(5, 3\)"):
        run_batch(digits_session, np.zeros((5, 3), np.float32))
    with pytest.raises(CloakError):
        run_batch(digits_session, x, ["no_such_output"])


def test_a_fixed_batch_model_runs_in_its_own_batch(fixed_model):
    rec = Recorder(make_session(fixed_model, ["cpu"]))
    x = _rows(10)
    bs = batch_size_for(rec, 256)
    y = np.concatenate([run_batch(rec, x[s : s + bs])[0] for s in range(0, len(x), bs)])
    assert [f.shape[0] for f in rec.fed] == [FIXED, FIXED, FIXED]  # 4 + 4 + 2 padded to 4
    assert y.shape == (10, 3)
    np.testing.assert_allclose(y, affine(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rec.fed[-1][2:], np.repeat(x[-1:], 2, axis=0))


_HEAP_PROBE = """
import ctypes, sys
from cloakonnx.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(20 << 20)  # an activation's size: glibc's default gives it its own mmap, freed back on free()
lo, hi = next([int(a, 16) for a in line.split()[0].split("-")] for line in open("/proc/self/maps") if "[heap]" in line)
print(applied, lo <= p < hi)
"""


def _probe_heap(mode: str, env: dict | None = None) -> list[str]:
    import subprocess

    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, env=run_env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_activations_stay_in_the_heap_for_reuse():
    # without the setting, a 20 MiB block is mmapped (and its pages faulted in afresh after every free)
    assert _probe_heap("default") == ["False", "False"]
    assert _probe_heap("tune") == ["True", "True"]
    # glibc settings the user gave are theirs: left alone
    assert _probe_heap("tune", {"MALLOC_TRIM_THRESHOLD_": "131072"}) == ["False", "False"]
    assert _probe_heap("tune", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) == ["False", "False"]


def test_the_cli_keeps_freed_memory(monkeypatch):
    from click.testing import CliRunner

    from cloakonnx.cli import main

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert CliRunner().invoke(main, ["inspect", "--help"]).exit_code == 0
    assert calls == [1]
