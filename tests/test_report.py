"""cloakonnx.report: percentages, JSON, atomic report files, tables, verdicts, text for every command, plots."""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest

from cloakonnx.errors import CloakError
from cloakonnx.plots import plot_evaluate, plot_sweep
from cloakonnx.report import (format_check, format_evaluate, format_harden, format_inspect, format_sweep, pct, table,
                              to_json, verdict, write_report)

PNG = b"\x89PNG\r\n\x1a\n"


def harden_report(clean=(0.9852, 0.9704), adv=(0.2, 0.55, 0.4), **extra) -> dict:
    """A report shaped like ``harden``'s JSON (HardenReport.to_dict), reduced to what the text uses."""
    r = {
        "model": "models/digits.onnx", "output": "models/digits.cloaked.onnx", "feature_tensor": "flat",
        "features": 64, "masked": 3, "newly_masked": 3, "fraction": 3 / 64, "score": "absdiff",
        "attack": {"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 10, "fallback": None},
        "clean_accuracy": {"original": clean[0], "hardened": clean[1]},
        "adversarial_accuracy": {"original": adv[0], "hardened_transfer": adv[1], "hardened_adaptive": adv[2]},
        "samples": {"calibration": 200, "validation": 400}, "mask_added": True, "max_clean_drop": None,
        "budget_confidence": None,
    }
    r.update(extra)
    return r


# --------------------------------------------------------------------------- pct, to_json, write_report


def test_pct():
    assert pct(0.98523) == " 98.52%"
    assert pct(1) == "100.00%"
    assert pct(0.0) == "  0.00%"
    assert pct(0.05) == "  5.00%"
    assert pct(None) == "n/a"
    assert pct(float("nan")) == "n/a"
    assert pct(np.float64("nan")) == "n/a"  # a float subclass


def test_to_json_numpy_and_nan():
    data = {"f64": np.float64(0.25), "f32": np.float32(0.5), "i64": np.int64(3), "arr": np.arange(3),
            "nan": float("nan"), "inf": float("inf"), "tuple": (1, 2), "none": None, "nested": {"x": [1.5]}}
    text = to_json(data)
    assert text.startswith("{\n  \"f64\": 0.25,")  # indented, in insertion order
    back = json.loads(text)
    assert list(back) == list(data)
    assert back["f64"] == 0.25  # np.float64 is a float: a JSON number
    # other numpy values fall back to str(): strings that still read back as the value
    assert back["f32"] == "0.5" and float(back["f32"]) == 0.5
    assert back["i64"] == "3"
    assert back["arr"] == "[0 1 2]"
    # non-finite floats are written as JavaScript literals (Python's json reads them back)
    assert '"nan": NaN' in text and '"inf": Infinity' in text
    assert math.isnan(back["nan"]) and back["inf"] == math.inf
    assert back["tuple"] == [1, 2] and back["none"] is None and back["nested"] == {"x": [1.5]}


def test_write_report_writes_json_atomically(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    data = {"clean_accuracy": {"original": 0.9852}, "masked": np.int64(3), "eps": [0.1, 0.2]}
    write_report(data, path)
    text = path.read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == {"clean_accuracy": {"original": 0.9852}, "masked": "3", "eps": [0.1, 0.2]}
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temporary file left behind
    write_report({"second": True}, str(path))  # a str path, overwriting
    assert json.loads(path.read_text()) == {"second": True}


def test_write_report_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text('{"old": 1}\n')

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CloakError, match="could not write report .*report.json: Permission denied"):
        write_report({"new": 2}, path)
    assert path.read_text() == '{"old": 1}\n'


def test_write_report_missing_folder_is_a_cloak_error(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(CloakError, match="report directory does not exist: .*no/such/dir"):
        write_report({"a": 1}, missing / "report.json")
    assert not (tmp_path / "no").exists()


def test_write_report_onto_a_folder_is_a_cloak_error(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(CloakError, match="could not write report"):
        write_report({"a": 1}, tmp_path / "taken")
    assert (tmp_path / "taken").is_dir()


# --------------------------------------------------------------------------- table


def test_table_with_header():
    text = table([["a", "bbb"], ["cc", "d"]], ["h1", "h2"])
    assert text.splitlines() == ["h1  h2", "--  ---", "a   bbb", "cc  d"]


def test_table_without_header_and_non_strings():
    assert table([["x", 1], ["long", 22]]) == "x     1\nlong  22"


# --------------------------------------------------------------------------- verdict and harden


def test_verdict_gain():
    text = verdict(harden_report())
    assert text == ("Transfer attacks (crafted on the original): +35.0 points of adversarial accuracy; "
                    "adaptive attacks (crafted on the hardened model): +20.0 points; clean-accuracy cost +1.5 points.")


def test_verdict_gain_without_adaptive():
    text = verdict(harden_report(adv=(0.2, 0.55, None)))
    assert text == ("Transfer attacks (crafted on the original): +35.0 points of adversarial accuracy; "
                    "clean-accuracy cost +1.5 points.")


@pytest.mark.parametrize("transfer", [0.2, 0.1])
def test_verdict_nothing(transfer):
    text = verdict(harden_report(clean=(0.9852, 0.9852), adv=(0.2, transfer, 0.2)))
    assert f"{100 * (transfer - 0.2):+.1f} points of adversarial accuracy" in text
    assert "clean-accuracy cost +0.0 points." in text
    assert text.endswith(" The mask buys nothing against transfer attacks on this model and data.")
    assert "gains it all back" not in text


@pytest.mark.parametrize("adaptive", [0.2, 0.15])
def test_verdict_loss_to_an_adaptive_attacker(adaptive):
    text = verdict(harden_report(adv=(0.2, 0.55, adaptive)))
    assert "+35.0 points of adversarial accuracy" in text
    assert f"adaptive attacks (crafted on the hardened model): {100 * (adaptive - 0.2):+.1f} points" in text
    assert text.endswith(" An attacker who knows the mask gains it all back.")
    assert "buys nothing" not in text


def test_format_harden():
    text = format_harden(harden_report())
    lines = text.splitlines()
    assert lines[0] == "models/digits.onnx -> models/digits.cloaked.onnx"
    assert lines[1] == ("masked 3 of 64 features of 'flat' (score absdiff); attack pgd linf eps=0.1 steps=10; "
                        "400 validation samples")
    assert lines[2].split() == ["accuracy", "on", "validation", "original", "hardened"]
    assert set(lines[3]) == {"-", " "}
    assert lines[4].split() == ["clean", "98.52%", "97.04%"]
    assert lines[5].startswith("adversarial, adaptive (crafted on each model) ")  # the threat that counts, first
    assert lines[5].split()[-2:] == ["20.00%", "40.00%"]
    assert lines[6].startswith("adversarial, transfer (crafted on original) ")
    assert lines[6].split()[-2:] == ["20.00%", "55.00%"]
    assert lines[7] == verdict(harden_report())
    assert len(lines) == 8


def test_format_harden_fgsm_budget_and_no_adaptive():
    r = harden_report(adv=(0.2, 0.55, None), max_clean_drop=1.0, budget_confidence=0.95,
                      attack={"name": "fgsm", "norm": "l2", "eps": 0.5, "steps": 1})
    lines = format_harden(r).splitlines()
    assert lines[1].endswith("attack fgsm l2 eps=0.5; 400 validation samples")  # no steps for fgsm
    assert lines[2] == ("chosen within a clean-accuracy budget of 1 points on validation and for its 95% upper "
                        "bound on new data")
    assert lines[6].split()[-2:] == ["20.00%", "n/a"]


def test_format_harden_no_mask_qualifies():
    r = harden_report(clean=(0.9852, 0.9852), adv=(0.2, 0.2, 0.2), masked=0, max_clean_drop=0.5,
                      budget_confidence=None, mask_added=False)
    text = format_harden(r)
    assert "chosen within a clean-accuracy budget of 0.5 points on validation: no mask qualifies, the model is " \
           "unchanged\n" in text
    assert "upper bound" not in text
    assert "masked 0 of 64 features" in text
    assert text.endswith("The mask buys nothing against transfer attacks on this model and data.")


# --------------------------------------------------------------------------- evaluate


def evaluate_report() -> dict:
    return {
        "model": "m.onnx", "reference": "orig.onnx", "samples": 300, "norm": "linf", "eps": [0.05, 0.1],
        "clean_accuracy": 0.9852,
        "results": [
            {"eps": 0.05, "attack": "pgd", "threat": "adaptive", "accuracy": 0.61},
            {"eps": 0.05, "attack": "pgd", "threat": "transfer", "accuracy": 0.7},
            {"eps": 0.1, "attack": "pgd", "threat": "adaptive", "accuracy": 0.2345},
            {"eps": 0.1, "attack": "pgd", "threat": "transfer", "accuracy": 0.4},
            {"eps": 0.1, "attack": "square", "threat": "gradient-free", "accuracy": 0.5},
        ],
        "robust_accuracy": {"0.05": 0.6, "0.1": 0.2},
        "checks": [{"name": "monotone in eps", "ok": True, "detail": "accuracy falls as eps grows"},
                   {"name": "large eps", "ok": False, "detail": "accuracy 0.31 at eps=1"}],
        "notes": ["the model is fp16: gradients were computed in float32 by the torch executor"],
    }


def test_format_evaluate():
    text = format_evaluate(evaluate_report())
    lines = text.splitlines()
    assert lines[0] == "m.onnx: 300 samples, linf attacks, transfer from orig.onnx"
    assert lines[1].split() == ["accuracy", "threat", "eps=0.05", "eps=0.1"]
    assert lines[3].split() == ["clean", "98.52%", "98.52%"]
    assert lines[4].split() == ["pgd", "adaptive", "61.00%", "23.45%"]
    assert lines[5].split() == ["pgd", "transfer", "70.00%", "40.00%"]
    assert lines[6].split() == ["square", "gradient-free", "n/a", "50.00%"]  # not run at eps=0.05
    assert lines[7].split() == ["robust", "(worst", "case", "per", "sample)", "60.00%", "20.00%"]
    assert lines[8] == "ok    monotone in eps: accuracy falls as eps grows"
    assert lines[9] == "FAIL  large eps: accuracy 0.31 at eps=1"
    assert lines[10] == "note: the model is fp16: gradients were computed in float32 by the torch executor"
    assert len(lines) == 11


def test_format_evaluate_without_reference_checks_or_notes():
    r = evaluate_report()
    r.update(reference=None, checks=[], notes=[])
    r["results"] = r["results"][:1]
    lines = format_evaluate(r).splitlines()
    assert lines[0] == "m.onnx: 300 samples, linf attacks"
    assert lines[4].split() == ["pgd", "adaptive", "61.00%", "n/a"]
    assert len(lines) == 6


# --------------------------------------------------------------------------- sweep


def sweep_report() -> dict:
    def point(masked, clean, adv, bound=None):
        return {"fraction": masked / 64, "masked": masked, "added": masked, "clean_accuracy": clean,
                "adversarial_accuracy": adv, "clean_drop_bound": bound}

    curves = {
        "absdiff": [point(0, 0.9852, 0.2), point(2, 0.9815, 0.45, 0.9), point(4, 0.97, 0.6, 2.1)],
        "margin": [point(0, 0.9852, 0.2), point(4, 0.95, 0.18, 3.0)],
    }
    return {
        "model": "m.onnx", "features": 64, "feature_tensor": "flat",
        "attack": {"name": "pgd", "norm": "linf", "eps": 0.1}, "samples": {"calibration": 200, "validation": 400},
        "clean_accuracy": 0.9852, "adversarial_accuracy": 0.2, "max_clean_drop": 1.0, "budget_confidence": 0.95,
        "curves": curves, "chosen": {"absdiff": curves["absdiff"][1], "margin": None},
        "best": {"score": "absdiff", "point": curves["absdiff"][1]},
        "scores": {"absdiff": list(np.linspace(0, 1, 64)), "margin": list(np.linspace(1, 0, 64))},
    }


def test_format_sweep():
    lines = format_sweep(sweep_report()).splitlines()
    assert lines[0] == ("m.onnx: 64 features of 'flat'; attack pgd eps=0.1; 400 validation samples; "
                        "original clean  98.52%, adversarial  20.00%")
    assert lines[1].split() == ["masked", "n", "clean", "(absdiff)", "adv", "(absdiff)", "clean", "(margin)", "adv",
                                "(margin)"]
    assert lines[3].split() == ["0.0%", "0", "98.52%", "20.00%", "98.52%", "20.00%"]
    assert lines[4].split() == ["3.1%", "2", "98.15%", "45.00%"]  # margin has no point at 2
    assert lines[5].split() == ["6.2%", "4", "97.00%", "60.00%", "95.00%", "18.00%"]
    assert lines[6] == "within a clean-accuracy budget of 1 points (and its 95% upper bound on new data):"
    assert lines[7] == "  absdiff: mask 2 (3.1%): clean  98.15%, adversarial  45.00%, drop bound 0.90 pts"
    assert lines[8] == "  margin: no fraction improves adversarial accuracy"
    assert lines[9] == "best: absdiff"
    assert len(lines) == 10


def test_format_sweep_nothing_helps_without_confidence():
    r = sweep_report()
    r.update(budget_confidence=None, chosen={"absdiff": None, "margin": None}, best={"score": None, "point": None})
    text = format_sweep(r)
    assert "within a clean-accuracy budget of 1 points:\n" in text
    assert "  absdiff: no fraction improves adversarial accuracy" in text
    assert text.endswith("\nbest: none: the mask buys nothing on this model and data")
    r = sweep_report()
    r["budget_confidence"] = None
    assert "  absdiff: mask 2 (3.1%): clean  98.15%, adversarial  45.00%\n" in format_sweep(r)  # no bound shown


# --------------------------------------------------------------------------- inspect and check


def inspect_info() -> dict:
    return {
        "path": "m.onnx", "ir_version": 8, "opset": 17, "nodes": 12, "producer": "pytorch 2.1",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "dynamic_batch": True,
        "head": {"kind": "gemm", "nodes": ["/fc/Gemm"], "feature_tensor": "flat", "features": 64, "classes": 10,
                 "logits": "logits", "mask": {"form": "mul", "node": "cloak_mask", "masked": 5, "fraction": 5 / 64}},
        "head_error": None,
        "metadata": {"cloakonnx.version": "0.1.0", "cloakonnx.history": "[...]", "cloakonnx.attack": "x" * 150,
                     "other": "kept out"},
    }


def test_format_inspect():
    lines = format_inspect(inspect_info()).splitlines()
    assert lines == [
        "m.onnx: IR 8, opset 17, 12 nodes, producer pytorch 2.1",
        "  input  input: float32 [?, 1, 8, 8]",
        "  output logits: float32 [?, 10]",
        "  batch dimension: dynamic",
        "  head: gemm (/fc/Gemm) -> logits, 10 classes",
        "  feature tensor: flat (64 features)",
        "  cloak mask (Mul node cloak_mask): zeroes 5 of 64 features (7.8%)",
        "  cloakonnx.version: 0.1.0",
        "  cloakonnx.attack: " + "x" * 97 + "...",
    ]


def test_format_inspect_folded_none_and_missing_head():
    info = inspect_info()
    info["head"]["mask"] = {"form": "folded", "node": None, "masked": 32, "fraction": 0.5}
    assert "  cloak mask (folded into the head weights): zeroes 32 of 64 features (50.0%)" in \
        format_inspect(info).splitlines()
    info["head"]["mask"] = None
    assert "  cloak mask: none" in format_inspect(info).splitlines()
    info["head"]["nodes"] = ["", ""]  # unnamed nodes: no empty parentheses
    assert "  head: gemm -> logits, 10 classes" in format_inspect(info).splitlines()
    info = inspect_info()
    info.update(head=None, head_error="no Gemm or MatMul head", producer="", dynamic_batch=False, metadata={})
    info["inputs"][0]["shape"] = [4, 1, 8, 8]
    lines = format_inspect(info).splitlines()
    assert lines[0] == "m.onnx: IR 8, opset 17, 12 nodes"
    assert lines[1] == "  input  input: float32 [4, 1, 8, 8]"
    assert lines[3] == "  batch dimension: fixed"
    assert lines[4] == "  head: not found: no Gemm or MatMul head"
    assert len(lines) == 5


def check_result(**extra) -> dict:
    r = {"model": "m.onnx", "batch": 2, "unsupported": [],
         "outputs": [{"name": "logits", "max_abs": 1.234e-6, "max_rel": 2.5e-7, "tolerance": 1e-4, "ok": True},
                     {"name": "probs", "max_abs": 0.5, "max_rel": 0.75, "tolerance": 1e-4, "ok": False}],
         "grad_finite": True, "grad_nonzero": True, "computes_in_float32": False, "quantized": None, "ok": False}
    r.update(extra)
    return r


def test_format_check():
    lines = format_check(check_result()).splitlines()
    assert lines[0] == "m.onnx: batch 2"
    assert lines[1].split() == ["output", "max", "abs", "diff", "max", "rel", "diff", "tolerance"]
    assert lines[3].split() == ["logits", "1.23e-06", "2.5e-07", "0.0001", "ok"]
    assert lines[4].split() == ["probs", "0.5", "0.75", "0.0001", "MISMATCH"]
    assert lines[5] == "  input gradients: finite, non-zero"
    assert lines[6] == "  result: FAILED"
    assert len(lines) == 7


def test_format_check_unsupported_fp16_quantized():
    r = check_result(unsupported=[["Loop", 16], ["NonMaxSuppression", 11]], outputs=[], grad_finite=False,
                     grad_nonzero=False)
    lines = format_check(r).splitlines()
    assert lines[1] == "  unsupported ops: Loop (opset 16), NonMaxSuppression (opset 11)"
    assert lines[2] == "  input gradients: not computed (the executor cannot run this graph)"
    assert lines[3] == "  result: FAILED"
    r = check_result(computes_in_float32=True, ok=True, outputs=[],
                     quantized={"reference": "onnxruntime unfused", "fused_max_abs": 0.0123,
                                "fused_top1_agreement": 0.9875})
    lines = format_check(r).splitlines()
    assert "  note: the model is fp16; the executor computes in float32 for gradients" in lines
    assert ("  note: QDQ-quantized; compared with onnxruntime unfused. onnxruntime's fused integer kernels differ "
            "from it by up to 0.0123 (top-1 agreement 98.8%); gradients pass quantization straight through") in lines
    assert lines[-1] == "  result: OK"
    r["quantized"]["fused_top1_agreement"] = None
    assert "top-1 agreement" not in format_check(r)


# --------------------------------------------------------------------------- plots


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib", reason="plots need matplotlib (the 'plot' extra)")


def test_plot_sweep_writes_a_png(matplotlib, tmp_path):
    path = tmp_path / "sweep.png"
    r = sweep_report()
    before = copy.deepcopy(r)
    plot_sweep(r, path)
    assert path.read_bytes()[:8] == PNG
    assert path.stat().st_size > 1000
    assert r == before  # the report is not modified
    # harden's own call: one score, no chosen mask
    path2 = tmp_path / "harden.png"
    plot_sweep({"model": "m.onnx", "curves": {"absdiff": r["curves"]["absdiff"]}, "scores": {"absdiff": [0.1] * 8},
                "chosen": {"absdiff": None}, "best": {"score": "absdiff"}}, path2)
    assert path2.read_bytes()[:8] == PNG


def test_plot_evaluate_writes_a_png(matplotlib, tmp_path):
    path = tmp_path / "evaluate.png"
    plot_evaluate(evaluate_report(), path)
    assert path.read_bytes()[:8] == PNG
    assert path.stat().st_size > 1000


def test_plot_into_a_missing_folder_is_a_cloak_error(matplotlib, tmp_path):
    with pytest.raises(CloakError, match="plot directory does not exist"):
        plot_evaluate(evaluate_report(), tmp_path / "missing" / "e.png")
    with pytest.raises(CloakError, match="plot directory does not exist"):
        plot_sweep(sweep_report(), tmp_path / "missing" / "s.png")
    assert not (tmp_path / "missing").exists()


def test_plots_without_matplotlib_are_a_cloak_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(CloakError, match=r"plots need matplotlib: pip install 'cloakonnx\[plot\]'"):
        plot_evaluate(evaluate_report(), tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_format_harden_names_fine_tuning_and_the_strength_check():
    learning = {"method": "finetune", "params": "all", "tensors": 8, "seconds": 61.7, "alpha": 0.1,
                "max_clean_drop": 1.0, "guard": {"attack": "apgd-ce-20 and pgd-10, adaptive, worst case",
                                                 "original": 0.4018, "hardened": 0.4554}}
    lines = format_harden(harden_report(learning=learning)).splitlines()
    assert lines[1].startswith("fine-tuned 8 weight tensors (all) at alpha 0.1 (method finetune; learned in 61.7 s)")
    assert lines[2] == ("strength 0.1 chosen on validation against the adaptive attacker, within a clean budget of 1 "
                        "points; apgd-ce-20 and pgd-10, adaptive, worst case: original 40.18%, hardened 45.54%")
    refused = dict(learning, alpha=None, guard=dict(learning["guard"], hardened=0.40))
    lines = format_harden(harden_report(learning=refused, mask_added=False)).splitlines()
    assert "no alpha beat the original: the model is unchanged" in lines[1]
    assert lines[2].startswith("no strength chosen") and lines[2].endswith("(not above the original: nothing written)")
    backed = dict(learning, steps=57, lr=1e-4, lr_given_up=[1e-3])
    assert "learned in 61.7 s, 57 steps at step size 0.0001, after the loss rose at 0.001)" in \
        format_harden(harden_report(learning=backed)).splitlines()[1]

