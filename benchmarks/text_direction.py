"""A second real model end to end: PaddleOCR's text-line direction classifier, hardened and evaluated through the CLI.

The model is ``ch_ppocr_mobile_v2.0_cls_infer.onnx``, the PaddleOCR 2.0 mobile direction classifier (a MobileNetV3
Paddle export, opset 11) that the PyPI package rapidocr-onnxruntime 1.3.24 ships in its wheel: 2 classes (a text
line upright, "0", or turned 180 degrees, "180": config.yaml's label_list), input x, N x 3 x 48 x 192 (height and
width dynamic in the graph), a MatMul+Add head, then Softmax: its output is probabilities, not logits. It is
fetched with ``real_model.fetch_model`` (``pip download --no-deps``, never ``pip install``: the package's
dependencies would bring OpenCV and the CPU onnxruntime) into the same cache folder ($CLOAKONNX_CACHE, else
~/.cache/cloakonnx), checked against its sha256.

The data is rendered here (``text_lines.py``): single lines of English text, upright (label 0) or turned 180 degrees
(label 1); a calibration set for ``harden`` and a held-out test set with other text and seeds, stored as [0, 1]
pixels after the package's own resize and right padding (0.5), with its (x - 0.5) / 0.5 passed to cloakonnx
(--mean/--std), so eps is in pixel units. Both sets are first classified with plain onnxruntime; below 95% the
script stops.

Then, each through the real CLI, as real_model.py does: ``inspect``, ``check``, ``harden`` at each --eps
(--harden default|paper|finetune|mask), ``evaluate`` of the original at every eps, and of each hardened model at its
eps with --reference the original (adaptive and transfer). A table of clean and robust accuracy and the timings
ends the output; --json prints the result as JSON instead (the CLI's output then goes to stderr).

    python benchmarks/text_direction.py                                       # defaults: see --help
    OMP_NUM_THREADS=1 python benchmarks/text_direction.py --calibration 64 --test 32 --harden paper \\
        --harden-steps 3 --eval-steps 3 --threads 1                           # a smoke run

Measured on a shared 2-core machine at one thread: rendering took 7.5 s for the 1000 calibration lines and 1.3 s
for the 200 test lines (seed 0), which onnxruntime classified 96.8% and 97.5% right (class 0: 98.4% and 100%,
class 1: 95.2% and 95.0%; with the classes swapped it would be about 3%). ``check`` passes with --input-shapes
x:[2,3,48,192] (max abs diff 5e-7); without it, it refuses the graph's dynamic height and width, whereas harden
and evaluate take the shape from the data. The smoke run above took 30 s: APGD-CE with 3 steps at 2/255 left
15.6% of 32 test lines right. The defaults (1000 calibration lines, half of them validating) have not been timed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, real_model.py and text_lines.py

import real_model  # noqa: E402
import text_lines  # noqa: E402
from common import cpus, log_to_stderr, run_main  # noqa: E402
from real_model import (FetchError, cli, evaluate_runs, expect, outcome_lines, parse_eps,  # noqa: E402,F401
                        pct)  # (FetchError: for callers)

from cloakonnx.errors import CloakError  # noqa: E402

log = logging.getLogger("text_direction")

PACKAGE, VERSION = "rapidocr-onnxruntime", "1.3.24"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"  # inside the wheel
# the wheel's RECORD: ...ch_ppocr_mobile_v2.0_cls_infer.onnx,sha256=5HrO32YyMPiGP_GrDmTdLYK4OPzrWVcUbasYWonWIVw,585532
MODEL_SHA256 = "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"
FILENAME = f"rapidocr_onnxruntime-{VERSION}-ch_ppocr_mobile_v2.0_cls_infer.onnx"  # in the cache
INPUT = "x"
MIN_ORT_ACCURACY = 0.95
HARDEN_METHODS = {**real_model.HARDEN_METHODS, "mask": ["--method", "mask"]}


def fetch_model(cache: Path | None = None, timeout: float = 300.0) -> Path:
    """The model's path in the cache, fetched on first use (``real_model.fetch_model``); FetchError when that fails."""
    return real_model.fetch_model(cache, timeout, package=PACKAGE, version=VERSION, member=MEMBER,
                                  sha256=MODEL_SHA256, filename=FILENAME)


# --- the data -------------------------------------------------------------------------------------------------


def ort_outputs(model: Path, x: np.ndarray, batch: int = 50, threads: int | None = None) -> np.ndarray:
    """The model's output (N x 2) from plain onnxruntime (CPU) on [0, 1] pixels normalised as the package does."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {INPUT: text_lines.normalise(x[i : i + batch])})[0]
                           for i in range(0, len(x), batch)])


def ort_accuracy(model: Path, x: np.ndarray, y: np.ndarray, batch: int = 50, threads: int | None = None) -> float:
    """Top-1 accuracy of plain onnxruntime (CPU)."""
    return float((ort_outputs(model, x, batch, threads).argmax(1) == y).mean())


def build_data(model: Path, folder: Path, sizes: dict[str, int], seed: int, threads: int | None = None) -> dict:
    """Render each split into ``folder/<split>.npz`` (x float32 in [0, 1], y int64) and classify it with
    onnxruntime; a split below MIN_ORT_ACCURACY is an error."""
    out = {}
    for split, n in sizes.items():
        t0 = time.perf_counter()
        x, y = text_lines.make_lines(n, split, seed)
        seconds = time.perf_counter() - t0
        path = folder / f"{split}.npz"
        np.savez(path, x=x, y=y)
        prob = ort_outputs(model, x, threads=threads)
        acc = float((prob.argmax(1) == y).mean())
        log.info("data: %d %s lines rendered in %.1f s, onnxruntime accuracy %.2f%%", n, split, seconds, 100 * acc)
        if acc < MIN_ORT_ACCURACY:
            raise CloakError(f"onnxruntime classifies only {100 * acc:.2f}% of the {split} lines correctly "
                             f"(< {100 * MIN_ORT_ACCURACY:.0f}%): the rendering does not match what the model expects")
        out[split] = {"path": str(path), "samples": n, "classes": np.bincount(y, minlength=2).tolist(),
                      "ort_accuracy": acc, "ort_accuracy_by_class": [
                          float((prob[y == k].argmax(1) == k).mean()) if (y == k).any() else None for k in (0, 1)],
                      "output_row_sum": [float(prob.sum(1).min()), float(prob.sum(1).max())],
                      "render_seconds": round(seconds, 2)}
    return out


# --- the CLI ----------------------------------------------------------------------------------------------------


def _harden_summary(h: dict, seconds: float) -> dict:
    return {"mask_added": h["mask_added"], "masked": h.get("masked"), "features": h.get("features"),
            "validation_samples": h["samples"]["validation"], "calibration_samples": h["samples"]["calibration"],
            "clean": h["clean_accuracy"], "adversarial": h["adversarial_accuracy"], "seconds": round(seconds, 1)}


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    stream = sys.stderr if args.json else sys.stdout  # with --json, stdout carries only the JSON

    def echo(text: str) -> None:
        print(text, file=stream, flush=True)

    model = fetch_model(args.cache)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cloakonnx-textdir-"))
    work.mkdir(parents=True, exist_ok=True)
    log.info("model %s; working folder %s", model, work)
    data = build_data(model, work, {"calibration": args.calibration, "test": args.test}, args.seed, args.threads)
    calib, test = data["calibration"]["path"], data["test"]["path"]
    box = ["--bounds", "0,1", "--mean", ",".join(map(str, text_lines.MEAN)),
           "--std", ",".join(map(str, text_lines.STD))]
    threads = ["--threads", str(args.threads)] if args.threads else []
    common = [*box, "--seed", str(args.seed), *threads] + (["--providers", args.providers] if args.providers else [])
    if args.preset:
        attack, attack_text = ["--preset", args.preset], f"--preset {args.preset}"
    else:
        attack = ["--attack", args.attacks, "--steps", str(args.eval_steps)]
        attack_text = f"--attack {args.attacks} --steps {args.eval_steps}"
    result: dict = {"config": {
        "model": {"package": f"{PACKAGE}=={VERSION}", "member": MEMBER, "path": str(model), "sha256": MODEL_SHA256},
        "calibration": args.calibration, "test": args.test, "seed": args.seed, "eps": [e for e, _ in args.eps],
        "max_clean_drop": None if args.fraction is not None else args.max_clean_drop, "fraction": args.fraction,
        "budget_confidence": args.budget_confidence, "val_split": args.val_split, "harden_steps": args.harden_steps,
        "harden": args.harden, "harden_args": args.harden_args, "harden_adaptive": args.harden_adaptive,
        "evaluate": attack_text, "threads": args.threads, "cpus": cpus(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "work": str(work)}, "data": data}

    rc, _, seconds = cli(["inspect", str(model)], echo)
    expect(rc, (0,), "inspect")
    rc, out, _ = cli(["inspect", str(model), "--json"], lambda text: None)
    head = json.loads(out)["head"]
    result["inspect"] = {"head": head["kind"], "feature_tensor": head["feature_tensor"], "features": head["features"],
                         "classes": head["classes"], "seconds": round(seconds, 1)}
    rc, _, seconds = cli(["check", str(model), "--input-shapes", f"{INPUT}:[2,3,48,192]", *threads], echo)
    result["check"] = {"ok": rc == 0, "seconds": round(seconds, 1)}
    if rc != 0:
        raise CloakError("`cloakonnx check` failed on the model: the torch executor does not reproduce it")

    runs = []
    for i, (eps_text, eps) in enumerate(args.eps):
        hardened, report = work / f"hardened-{i}.onnx", work / f"harden-{i}.json"
        share = (["--fraction", f"{args.fraction:g}"] if args.fraction is not None
                 else ["--max-clean-drop", f"{args.max_clean_drop:g}"])
        confidence = [] if args.budget_confidence is None else ["--budget-confidence", f"{args.budget_confidence:g}"]
        rc, _, seconds = cli(["harden", str(model), "--data", calib, *common, *HARDEN_METHODS[args.harden],
                              *shlex.split(args.harden_args), "--eps", eps_text, "--steps", str(args.harden_steps),
                              *share, "--val-split", f"{args.val_split:g}",
                              *([] if args.harden_adaptive else ["--no-adaptive"]), *confidence,
                              "-o", str(hardened), "--report", str(report)], echo)
        expect(rc, (0,), "harden")
        runs.append({"eps": eps_text, "eps_value": eps, "hardened": str(hardened),
                     "harden": _harden_summary(json.loads(report.read_text()), seconds)})

    evaluate_runs(model, test, common, attack, args.eps, runs, work, echo)
    result["runs"] = runs
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def table(result: dict) -> str:
    c, d, ins = result["config"], result["data"], result["inspect"]
    lines = [
        f"rapidocr-onnxruntime {VERSION} ch_ppocr_mobile_v2.0_cls ({ins['head']} head on {ins['features']} features "
        f"of {ins['feature_tensor']}, {ins['classes']} classes); check {'OK' if result['check']['ok'] else 'FAILED'}",
        f"data: {d['calibration']['samples']} calibration lines (onnxruntime {pct(d['calibration']['ort_accuracy'])}), "
        f"{d['test']['samples']} held-out test lines (onnxruntime {pct(d['test']['ort_accuracy'])})",
        f"harden: {c['harden']}, PGD-{c['harden_steps']} "
        + (f"--fraction {c['fraction']:g}" if c["fraction"] is not None
           else f"--max-clean-drop {c['max_clean_drop']:g}")
        + (f" --budget-confidence {c['budget_confidence']:g}" if c["budget_confidence"] is not None else "")
        + f" --val-split {c['val_split']:g}; evaluate: {c['evaluate']} (adaptive, and transfer from the original "
        "for the hardened model)",
        "",
        f"{'eps':7} {'model':9} {'masked':>9} {'val clean':>9} {'val adv':>8} {'clean':>8} {'robust':>8} "
        f"{'harden s':>8} {'eval s':>7}",
        "-" * 84,
    ]
    for r in result["runs"]:
        h, o, he = r["harden"], r["original"], r["hardened_eval"]
        masked = "-" if h["masked"] is None else f"{h['masked']}/{h['features']}"
        lines.append(f"{r['eps']:7} {'original':9} {'-':>9} {pct(h['clean']['original']):>9} "
                     f"{pct(h['adversarial']['original']):>8} {pct(o['clean']):>8} {pct(o['robust']):>8} "
                     f"{'':>8} {o['seconds']:7.0f}")
        lines.append(f"{'':7} {'hardened':9} {masked:>9} {pct(h['clean']['hardened']):>9} "
                     f"{pct(h['adversarial'].get('hardened_transfer')):>8} {pct(he['clean']):>8} "
                     f"{pct(he['robust']):>8} {h['seconds']:8.0f} {he['seconds']:7.0f}")
    lines += ["", "val clean / val adv: harden's validation split (adv: attacks crafted on the original); clean / "
              "robust: evaluate", "on the held-out test set, robust = worst case per sample over every attack and "
              "threat."]
    lines += outcome_lines(result["runs"])
    lines.append(f"total {result['seconds']:.0f} s on {c['cpus']} CPUs")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--calibration", type=int, default=1000, help="lines for harden (split into calibration and "
                    "validation by --val-split)")
    ap.add_argument("--test", type=int, default=200, help="held-out lines for evaluate")
    ap.add_argument("--eps", type=parse_eps, default="2/255",
                    help="budgets in pixel units ([0, 1] box), comma-separated; fractions allowed")
    ap.add_argument("--max-clean-drop", type=float, default=1.0, help="harden's clean-accuracy budget, points")
    ap.add_argument("--val-split", type=float, default=0.5, help="harden's validation share")
    ap.add_argument("--threads", type=int, help="--threads for the CLI's check, harden and evaluate, and "
                    "onnxruntime's threads here [default: their own choice]")
    real_model.add_run_options(ap, attacks_help="evaluate's --attack when no --preset")
    args = ap.parse_args(argv)
    log_to_stderr()
    return run_main(run, args, table)


if __name__ == "__main__":
    sys.exit(main())
