"""--threads: one setting for torch, onnxruntime and image decoding, recorded in the report, with a
warning when the machine is already busy."""
import logging

import pytest
import torch

from cloakonnx import runtime
from cloakonnx.attacks import AttackConfig
from cloakonnx.config import EvaluateConfig, HardenConfig
from cloakonnx.errors import CloakError
from cloakonnx.evaluate import evaluate
from cloakonnx.harden import harden


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    runtime.limit_threads(None)
    torch.set_num_threads(before)


def test_the_threads_come_from_the_option_then_the_environment_then_torch(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    assert runtime.resolve_threads(3) == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    assert runtime.resolve_threads(None) == 2 and runtime.resolve_threads(1) == 1
    monkeypatch.delenv(runtime.THREADS_ENV)
    torch.set_num_threads(64)
    assert runtime.resolve_threads(None) == min(64, runtime.usable_cores()), "capped at the usable cores"


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_environment_value_is_refused(monkeypatch, value):
    monkeypatch.setenv(runtime.THREADS_ENV, value)
    with pytest.raises(CloakError, match=runtime.THREADS_ENV):
        runtime.resolve_threads(None)


def test_harden_and_evaluate_use_and_record_the_threads(digits_files, tmp_path, monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    fgsm = AttackConfig(name="fgsm", eps=0.1)
    report = harden(digits_files[0], digits_files[1], HardenConfig(score="absdiff", output=tmp_path / "m.onnx", attack=fgsm,
                                                                    adaptive=False, threads=1))
    assert report.threads == 1 and torch.get_num_threads() == 1 and runtime._THREADS == 1
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    report = evaluate(digits_files[0], digits_files[1], EvaluateConfig(attacks=("fgsm",), eps=(0.1,), max_samples=20,
                                                                      sanity=False))
    assert report.threads == 2 and torch.get_num_threads() == 2


def test_a_busy_machine_is_named_with_the_way_out(monkeypatch, caplog):
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    monkeypatch.setattr(runtime, "_WARNED_BUSY", False)
    with caplog.at_level(logging.WARNING, logger="cloakonnx.runtime"):
        runtime.use_threads(1)
        runtime.use_threads(1)  # the demo hardens three times in one process: said once
    assert caplog.text.count("busy") == 1 and "--threads 1" in caplog.text
    caplog.clear()
    monkeypatch.setattr(runtime, "_WARNED_BUSY", False)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    with caplog.at_level(logging.WARNING, logger="cloakonnx.runtime"):
        runtime.use_threads(1)
    assert "busy" not in caplog.text


def test_the_cli_refuses_zero_threads(digits_files):
    from click.testing import CliRunner

    from cloakonnx.cli import main

    result = CliRunner().invoke(main, ["harden", str(digits_files[0]), "--data", str(digits_files[1]),
                                       "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.output
