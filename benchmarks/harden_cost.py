#!/usr/bin/env python
"""What does ``harden`` cost beyond the work it cannot avoid, and does its statistics stage stay flat in N?

(a) Time. A small CNN is trained on scikit-learn's real digits (a few epochs), exported with the demo's
torch.onnx exporter, and hardened as the demo does (PGD, eps 0.1, 10 steps, 5% of features, half the
719 held-out digits for validation, adaptive attack on). ``--input digits32`` takes instead the 3x32x32
small CNN of ``benchmarks/data_scale.py`` (no BatchNorm, 64 features; trained here for 40 epochs on one
jittered copy of 60% of the digits, about 75% accuracy on the rest) and hands harden ``--n`` (default
20,000) of data_scale's jittered 3x32x32 digits with their real labels: a size at which the per-sample
work, not harden's fixed costs, makes up the time. Each repeat also runs the *unavoidable work* in the
same process: the same number of native torch forward+backward passes (input gradient only, same batch
sizes) on the nn.Module the ONNX file was exported from, as the attacks make (FGSM 1 or PGD steps x
restarts, x batches x crafted sets: calibration, validation, adaptive), plus the same number of plain
onnxruntime forward passes (same batch sizes, harden's thread count) as the statistics and evaluation
stages make. The passes are counted from the attack settings and checked against an instrumented
warm-up run of ``harden``; the script stops with an error if they differ.
Pipeline and baseline alternate (P B, B P, ...), medians over ``--repeats`` are reported, and the
overhead ratio is pipeline total / baseline total (target: at most 1.20). A second, stricter baseline
runs the same passes on a copy of the module with BatchNorm folded into the convolutions, which is the
arithmetic the exported graph (and so harden's torch executor) actually does.

Clocks: on a shared machine with few cores, wall-clock times of identical work were seen to vary 3-5x
between repeats (other tenants steal cores; a multi-threaded torch op stalls whenever one of its threads
is descheduled). So by default torch runs one thread (harden and baseline alike, ``--threads``) and the
stage table and verdict use the CPU time of this process (``--clock cpu``: harden reports each stage in
both clocks, ``HardenReport.stages_cpu`` beside ``stages``); wall-clock totals are shown beside them. On an idle
machine the two agree for a single thread; ``--clock wall --threads 0`` measures what a user waits for.

(b) Memory. ``stats.StatsStream`` runs in a fresh subprocess per N (1k and 20k digits, the 20k repeated
and jittered inside the [0, 1] box), with the clean, adversarial and label arrays memory-mapped from .npy
files (``np.load(mmap_mode="r")``). Measured per run, after a warm-up pass that sizes onnxruntime's arena:

* tracemalloc peak growth: every numpy and Python allocation (numpy registers its buffers with
  tracemalloc); a memory-mapped input is not an allocation, so the input does not count. Primary number.
* peak anonymous RSS growth (RssAnon from /proc/self/status, sampled every millisecond by a thread):
  also covers onnxruntime's native allocations, and still excludes the input, whose mapped pages are
  file-backed (RssFile).
* peak RSS growth (VmHWM, the counter ru_maxrss reports, reset with /proc/self/clear_refs before the
  run): shown for reference only, because the mapped input pages that are read become resident and count
  there. ru_maxrss itself is not used: a process started by fork/exec inherits its parent's high-water
  mark there (a child of a 330 MiB parent reports ru_maxrss 332 MiB before doing anything, VmHWM 11 MiB).

A control run keeps every feature batch in memory (what onnxruntime's own calibrator did): its ratio shows
that the measurement would see growth in N if there were any.

    python benchmarks/harden_cost.py                       # ~6-9 min on 2 busy CPU cores
    python benchmarks/harden_cost.py --repeats 5 --json --out harden_cost.json
    python benchmarks/harden_cost.py --skip-memory --attack fgsm
    python benchmarks/harden_cost.py --input digits32 --n 20000 --attack fgsm --repeats 3 --skip-memory
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import data_scale  # its 3x32x32 small CNN and digits (--input digits32); found beside this script, as common is
import numpy as np
from common import (REPO, AnonPeak, Clock, add_output_options, cpus, log_to_stderr, parse_sizes, proc_status,
                    reset_peak_rss, run_main)

from cloakonnx import __version__

log = logging.getLogger("cloakonnx.benchmarks.harden_cost")

STAGES = ("attack", "statistics", "selection", "surgery", "evaluation", "write")
TARGET_RATIO = 1.20


# --- the model and data ----------------------------------------------------------------------------------


def build_demo(folder: Path, features: int, epochs: int, seed: int):
    """Train the demo's digits CNN briefly, export it, write the held-out digits as .npz."""
    import torch

    from cloakonnx.data import digits_dataset, split
    from cloakonnx.demo import build_digits_cnn, export_onnx, train_classifier

    torch.manual_seed(seed)
    train, held_out = split(digits_dataset(), 0.4, seed)  # as the demo: the model never sees held_out
    t = time.perf_counter()
    net = train_classifier(build_digits_cnn(features), train, epochs, seed)
    train_s = time.perf_counter() - t
    acc = accuracy(net, held_out)
    model_path, data_path = folder / "digits_cnn.onnx", folder / "digits.npz"
    export_onnx(net, torch.from_numpy(held_out.x[:2]), model_path)
    np.savez(data_path, x=held_out.x, y=held_out.y)
    log.info("trained a %d-feature CNN for %d epochs in %.1f s (held-out accuracy %.1f%%)", features, epochs,
             train_s, 100 * acc)
    return frozen(net), held_out, model_path, data_path, {
        "name": "digits CNN, 1x8x8", "features": features, "train_seconds": train_s, "held_out_accuracy": acc}


DIGITS32_N = 20000  # the N of the 3x32x32 FGSM target
DIGITS32_EPOCHS = 40  # about 75% held-out accuracy, 30 s on one busy core
DIGITS32_LR = 1e-2  # without BatchNorm, data_scale's small CNN is still near chance after 20 epochs at the demo's 3e-3


def build_digits32(folder: Path, n: int, epochs: int, seed: int):
    """data_scale's small CNN on its 3x32x32 digits, trained so that it is a real classifier, exported,
    and ``n`` jittered digits (real labels) written as .npz for harden.

    The model is trained on one jittered copy of 60% of the 1,797 digits and scored on the other 40%;
    it does not depend on ``n``. The ``n`` samples are fresh jittered copies of all 1,797 digits (so
    also of those trained on): they are there to be timed, not to judge robustness."""
    import torch

    from cloakonnx.data import Dataset, digits_dataset, split
    from cloakonnx.demo import train_classifier

    labels = digits_dataset(data_scale.SHAPE[1]).y  # data_scale.digits(n) repeats these: sample i is digit i % 1797
    train, held_out = split(Dataset(data_scale.digits(len(labels), seed), labels), 0.4, seed)
    torch.manual_seed(seed)
    t = time.perf_counter()
    net = train_classifier(data_scale.small_cnn(), train, epochs, seed, lr=DIGITS32_LR)
    train_s = time.perf_counter() - t
    data = Dataset(data_scale.digits(n, seed + 1), labels[np.arange(n) % len(labels)])
    info = {"name": "data_scale's small CNN, 3x32x32", "features": net[-1].in_features, "train_seconds": train_s,
            "held_out_accuracy": accuracy(net, held_out), "data_accuracy": accuracy(net, data)}
    model_path, data_path = folder / "small_cnn.onnx", folder / "digits32.npz"
    data_scale.export(net, data_scale.SHAPE, model_path)
    np.savez(data_path, x=data.x, y=data.y)
    log.info("trained data_scale's small CNN for %d epochs in %.1f s (held-out accuracy %.1f%%, %.1f%% on the %d "
             "samples for harden)", epochs, train_s, 100 * info["held_out_accuracy"], 100 * info["data_accuracy"], n)
    return frozen(net), data, model_path, data_path, info


def accuracy(net, ds, batch: int = 1024) -> float:
    """Top-1 accuracy, a batch at a time: 20k 3x32x32 digits at once would hold every activation."""
    import torch

    with torch.no_grad():
        pred = np.concatenate([net(torch.from_numpy(ds.x[s : s + batch])).argmax(1).numpy()
                               for s in range(0, len(ds), batch)])
    return float((pred == ds.y).mean())


def frozen(net):
    """``net`` in eval mode without parameter gradients: the attacks need input gradients only, as for the
    ONNX graph's constants."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


# --- counting the work harden does ------------------------------------------------------------------------


class Recorder:
    """Instrument one harden run: torch input-gradient passes and onnxruntime runs, with their batch sizes."""

    def __init__(self, feature: str):
        self.feature = feature
        self.grad_passes: list[int] = []  # batch size of each forward+backward
        self.grad_forwards: list[int] = []  # torch forwards with gradients, however called: the same, or work is missed
        self.forward_only: list[int] = []  # torch forwards without gradients (e.g. PGD's final check)
        self.ort_runs: list[tuple[str, int]] = []  # ("statistics" | "evaluation", batch size)

    def __enter__(self):
        import torch
        from onnxruntime.capi import onnxruntime_inference_collection as ort_coll

        from cloakonnx.attacks.base import Attack
        from cloakonnx.torch_exec import OnnxTorchModule

        rec = self
        self._saved = [(Attack, "input_grad", Attack.input_grad), (OnnxTorchModule, "forward", OnnxTorchModule.forward),
                       (ort_coll.Session, "run", ort_coll.Session.run)]
        input_grad, forward, run = (s[2] for s in self._saved)

        def counted_input_grad(self, x_adv, y):
            rec.grad_passes.append(len(x_adv))
            return input_grad(self, x_adv, y)

        def counted_forward(self, *xs):
            (rec.grad_forwards if torch.is_grad_enabled() else rec.forward_only).append(len(xs[0]))
            return forward(self, *xs)

        def counted_run(self, output_names, input_feed, run_options=None):
            batch = len(next(iter(input_feed.values())))
            stage = "statistics" if output_names and rec.feature in output_names else "evaluation"
            rec.ort_runs.append((stage, batch))
            return run(self, output_names, input_feed, run_options)

        Attack.input_grad = counted_input_grad
        OnnxTorchModule.forward = counted_forward
        ort_coll.Session.run = counted_run
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)


def batch_sizes(n: int, bs: int) -> list[int]:
    return [min(bs, n - s) for s in range(0, n, bs)]


def expected_grad_passes(attack, n_calib: int, n_val: int, adaptive: bool) -> dict[str, list[int]]:
    """Forward+backward passes the attacks make, from the settings: per crafted set, steps x restarts per batch."""
    per_batch = 1 if attack.name == "fgsm" else attack.steps * max(1, attack.restarts)
    sets = {"attack": [n_calib], "evaluation": [n_val] + ([n_val] if adaptive else [])}
    return {stage: [b for n in ns for b in batch_sizes(n, attack.batch_size) for _ in range(per_batch)]
            for stage, ns in sets.items()}


def expected_statistics_runs(n_calib: int, ort_batch_size: int) -> list[int]:
    """onnxruntime runs of the statistics stage: StatsStream regroups the attacked batches into batches of
    ``ort_batch_size`` and runs each twice (clean, adversarial)."""
    return [b for b in batch_sizes(n_calib, ort_batch_size) for _ in range(2)]


def check_counts(what: str, expected: list[int], counted: list[int]) -> None:
    """Fail loudly when the passes counted from the settings are not those the instrumented harden run made:
    the baseline would time other work than harden does."""
    if sorted(expected) != sorted(counted):
        raise RuntimeError(f"{what}: {len(expected)} passes ({sum(expected)} samples) counted from the settings, "
                           f"{len(counted)} ({sum(counted)} samples) in the instrumented harden run")


# --- the baseline: the unavoidable work, natively --------------------------------------------------------


def native_grad_passes(net, x: np.ndarray, y: np.ndarray, sizes: list[int]) -> Clock:
    """One native forward+backward (gradient w.r.t. the input only) per entry of ``sizes``."""
    import torch
    import torch.nn.functional as F

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start = 0
    with Clock() as c:
        for b in sizes:
            if start + b > len(xt):
                start = 0
            xb = xt[start : start + b].clone().requires_grad_(True)
            loss = F.cross_entropy(net(xb), yt[start : start + b])
            torch.autograd.grad(loss, xb)
            start += b
    return c


def plain_ort_passes(session, name: str, x: np.ndarray, sizes: list[int]) -> Clock:
    """One plain onnxruntime forward (the model's own outputs) per entry of ``sizes``."""
    start = 0
    with Clock() as c:
        for b in sizes:
            if start + b > len(x):
                start = 0
            session.run(None, {name: x[start : start + b]})
            start += b
    return c


def fold_batchnorm(net):
    """A copy of ``net`` with each BatchNorm folded into the Conv before it, as torch.onnx's export does:
    the same arithmetic the exported graph runs, natively (a stricter baseline)."""
    import copy

    from torch.fx.experimental.optimization import fuse

    return frozen(fuse(copy.deepcopy(net).eval()))


# --- (a) timing -------------------------------------------------------------------------------------------


def harden_config(args, out: Path):
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.harden import HardenConfig

    return HardenConfig(output=out, attack=AttackConfig(name=args.attack, eps=args.eps, steps=args.steps, seed=args.seed,
                                                               batch_size=128),
                        score="absdiff", fraction=args.fraction, val_split=0.5, seed=args.seed, device="cpu",
                        providers=["CPUExecutionProvider"], adaptive=True)


def time_pipeline(args, model_path: Path, data_path: Path, out: Path):
    """(Clock of the whole call, harden's stages in the chosen clock, report)."""
    from cloakonnx.harden import harden

    with Clock() as c:
        report = harden(model_path, data_path, harden_config(args, out))
    return c, dict(report.stages_cpu if args.clock == "cpu" else report.stages), report


def run_timing(args, net, data, model_path: Path, data_path: Path, folder: Path) -> dict:
    import onnxruntime as ort

    from cloakonnx.graph import find_head, load_model

    feature = find_head(load_model(model_path)).feature
    out = folder / f"{model_path.stem}.cloaked.onnx"
    clock = args.clock

    # Warm-up, instrumented: count what harden really does (and let torch/onnxruntime initialise).
    log.info("warm-up harden run (instrumented)")
    with Recorder(feature) as rec:
        _, _, report = time_pipeline(args, model_path, data_path, out)
    cfg = harden_config(args, out)
    n_calib, n_val = report.samples["calibration"], report.samples["validation"]
    adaptive = report.adversarial_accuracy.get("hardened_adaptive") is not None and report.mask_added
    expected = expected_grad_passes(cfg.attack, n_calib, n_val, adaptive)
    ort_sizes = {s: [b for st, b in rec.ort_runs if st == s] for s in ("statistics", "evaluation")}
    check_counts("torch forward+backward (Attack.input_grad)", expected["attack"] + expected["evaluation"],
                 rec.grad_passes)
    check_counts("torch forwards with gradients (OnnxTorchModule)", rec.grad_passes, rec.grad_forwards)
    check_counts("onnxruntime statistics runs", expected_statistics_runs(n_calib, cfg.ort_batch_size),
                 ort_sizes["statistics"])

    # onnxruntime with harden's threads (report.threads), not its default of one per core: more threads,
    # spinning between runs, would add CPU time to the baseline only
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = report.threads, 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name
    x, y = data.x, data.y
    fused = fold_batchnorm(net)

    def baseline() -> dict:
        c = {
            "torch_attack": native_grad_passes(net, x, y, expected["attack"]),
            "torch_evaluation": native_grad_passes(net, x, y, expected["evaluation"]),
            "ort_statistics": plain_ort_passes(session, in_name, x, ort_sizes["statistics"]),
            "ort_evaluation": plain_ort_passes(session, in_name, x, ort_sizes["evaluation"]),
            "torch_attack_bn_folded": native_grad_passes(fused, x, y, expected["attack"]),
            "torch_evaluation_bn_folded": native_grad_passes(fused, x, y, expected["evaluation"]),
        }
        parts = {k: getattr(v, clock) for k, v in c.items()}
        main = ("torch_attack", "torch_evaluation", "ort_statistics", "ort_evaluation")
        return dict(parts, attack=parts["torch_attack"], statistics=parts["ort_statistics"],
                    evaluation=parts["torch_evaluation"] + parts["ort_evaluation"],
                    total=sum(parts[k] for k in main),
                    total_bn_folded=parts["torch_attack_bn_folded"] + parts["torch_evaluation_bn_folded"]
                    + parts["ort_statistics"] + parts["ort_evaluation"],
                    total_wall=sum(c[k].wall for k in main), total_cpu=sum(c[k].cpu for k in main))

    for _ in range(args.warmup):
        baseline()
    runs = []
    for r in range(args.repeats):
        order = ("pipeline", "baseline") if r % 2 == 0 else ("baseline", "pipeline")
        row: dict = {"order": list(order)}
        for which in order:
            if which == "pipeline":
                c, stages, _ = time_pipeline(args, model_path, data_path, out)
                total = getattr(c, clock)
                inside = sum(v for k, v in stages.items() if k != "data wait")  # data wait overlaps the others
                row["pipeline"] = dict(stages, setup=max(total - inside, 0.0), total=total,
                                       total_wall=c.wall, total_cpu=c.cpu)
            else:
                row["baseline"] = baseline()
        for k in ("", "_wall", "_cpu"):
            row["ratio" + k] = row["pipeline"]["total" + k] / row["baseline"]["total" + k]
        row["ratio_bn_folded"] = row["pipeline"]["total"] / row["baseline"]["total_bn_folded"]
        log.info("repeat %d/%d: harden %.2f s wall / %.2f s CPU, baseline %.2f s wall / %.2f s CPU; ratio %.3f wall, "
                 "%.3f CPU", r + 1, args.repeats, row["pipeline"]["total_wall"], row["pipeline"]["total_cpu"],
                 row["baseline"]["total_wall"], row["baseline"]["total_cpu"], row["ratio_wall"], row["ratio_cpu"])
        runs.append(row)

    def med(side: str, key: str) -> float:
        return float(np.median([run[side].get(key, 0.0) for run in runs]))

    rows = {k: {"pipeline_s": med("pipeline", k), "baseline_s": med("baseline", k) if k in runs[0]["baseline"] else 0.0}
            for k in (*STAGES, "setup", "total")}
    for v in rows.values():
        v["ratio"] = v["pipeline_s"] / v["baseline_s"] if v["baseline_s"] > 0 else None
    ratio = rows["total"]["ratio"]
    other = "wall" if clock == "cpu" else "cpu"
    parts = {k: med("baseline", k) for k in runs[0]["baseline"] if k.startswith(("torch_", "ort_"))}
    folded_total = med("baseline", "total_bn_folded")
    per_repeat = {k: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))}
                  for k, v in (("ratio", [run["ratio"] for run in runs]),
                               (f"ratio_{other}", [run[f"ratio_{other}"] for run in runs]))}
    return {
        "clock": clock,
        "torch_threads": args.threads,
        "feature_tensor": feature,
        "samples": {"calibration": n_calib, "validation": n_val},
        "attack": cfg.attack.to_dict(),
        "work": {
            "torch_forward_backward": {s: {"passes": len(v), "images": int(sum(v))} for s, v in expected.items()},
            "torch_forward_only_in_harden_not_in_baseline": {"passes": len(rec.forward_only),
                                                              "images": int(sum(rec.forward_only))},
            "onnxruntime_forward": {s: {"passes": len(v), "images": int(sum(v))} for s, v in ort_sizes.items()},
            "onnxruntime_batch_size": cfg.ort_batch_size,
            "attack_batch_size": cfg.attack.batch_size,
        },
        "stages": rows,
        "ratio_of_medians": ratio,
        f"{other}_totals": {"pipeline_s": med("pipeline", f"total_{other}"), "baseline_s": med("baseline", f"total_{other}"),
                            "ratio": med("pipeline", f"total_{other}") / med("baseline", f"total_{other}")},
        "ratio_per_repeat": per_repeat,
        "baseline_parts": parts,
        "baseline_total_bn_folded": folded_total,
        "ratio_bn_folded": rows["total"]["pipeline_s"] / folded_total,
        "target": TARGET_RATIO,
        "verdict": "ok" if ratio <= TARGET_RATIO else "MISS",
        "hardened": {"masked": report.masked, "features": report.features,
                     "clean_accuracy": report.clean_accuracy, "adversarial_accuracy": report.adversarial_accuracy},
        "repeats": runs,
    }


# --- (b) memory of the statistics stage -------------------------------------------------------------------


def stats_child(argv: list[str]) -> int:
    """In a fresh process: StatsStream over memory-mapped inputs; print the memory figures as JSON."""
    import gc
    import tracemalloc

    import onnx

    from cloakonnx.data import Preprocess
    from cloakonnx.graph import find_head, with_outputs
    from cloakonnx.runtime import make_session
    from cloakonnx.stats import StatsStream, per_feature

    model_path, folder, n, batch, mode = argv[0], Path(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    model = onnx.load(model_path)
    head = find_head(model)
    session = make_session(with_outputs(model, [head.feature]), ["CPUExecutionProvider"])
    xc = np.load(folder / f"x_clean_{n}.npy", mmap_mode="r")
    xa = np.load(folder / f"x_adv_{n}.npy", mmap_mode="r")
    y = np.load(folder / f"y_{n}.npy", mmap_mode="r")
    assert isinstance(xc, np.memmap) and isinstance(xa, np.memmap)
    pre = Preprocess()
    in_name = session.get_inputs()[0].name

    def feed(a):  # what Runner.feed does for a float32 model without normalisation
        return pre.to_model(a).astype(np.float32, copy=False)

    def keep_everything(x_clean, x_adv):
        """The control: collect every feature batch, then reduce (onnxruntime's calibrator's way)."""
        cs, advs = [], []
        for s in range(0, len(x_clean), batch):
            cs.append(session.run([head.feature], {in_name: feed(x_clean[s : s + batch])})[0])
            advs.append(session.run([head.feature], {in_name: feed(x_adv[s : s + batch])})[0])
        c, a = per_feature(np.concatenate(cs)), per_feature(np.concatenate(advs))
        return np.abs(a - c).mean(0)

    def work(k):
        if mode == "stream":
            stream = StatsStream(session, head.feature, head.logits, feed, batch, head.weight)
            for s in range(0, k, batch):
                stream.add(xc[s : min(s + batch, k)], xa[s : min(s + batch, k)], y[s : min(s + batch, k)])
            return stream.finish()
        return keep_everything(xc[:k], xa[:k])

    work(min(n, 2 * batch))  # warm-up: onnxruntime's arena, lazy imports, tqdm
    gc.collect()
    reset_peak_rss()  # VmHWM (the counter ru_maxrss reports) back to VmRSS
    before = proc_status()
    tracemalloc.start()
    with Clock() as clock, AnonPeak() as anon:
        result = work(n)
    seconds = clock.wall
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after = proc_status()
    del result
    print(json.dumps({
        "n": n, "mode": mode, "seconds": seconds,
        "tracemalloc_peak": peak, "tracemalloc_retained": current,
        "rss_anon_peak_growth": anon.peak - before["RssAnon"],
        "rss_anon_peak": anon.peak, "rss_anon_before": before["RssAnon"],
        "rss_peak_growth": after["VmHWM"] - before["VmRSS"],
        "rss_file_growth": after["RssFile"] - before["RssFile"],
        "input_bytes": int(xc.nbytes + xa.nbytes + y.nbytes),
    }))
    return 0


def synthesise(data, n: int, eps: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` digits: those of ``data`` (the held-out ones, or digits32's) repeated, jittered by +-0.05 and
    clipped to the box; 'adversarial' copies at +-eps (the statistics stage's cost does not depend on how
    they were crafted)."""
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % len(data)
    x = np.clip(data.x[idx] + rng.uniform(-0.05, 0.05, data.x[idx].shape), 0, 1).astype(np.float32)
    adv = np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape), 0, 1).astype(np.float32)
    return x, adv, data.y[idx].astype(np.int64)


def run_memory(args, data, model_path: Path, folder: Path) -> dict:
    for n in args.sizes:
        x, adv, y = synthesise(data, n, args.eps, args.seed)
        np.save(folder / f"x_clean_{n}.npy", x)
        np.save(folder / f"x_adv_{n}.npy", adv)
        np.save(folder / f"y_{n}.npy", y)
    runs = {}
    for mode in ("stream", "keep_everything"):
        for n in args.sizes:
            log.info("statistics memory: %s, N=%d (fresh subprocess)", mode, n)
            proc = subprocess.run([sys.executable, __file__, "--_stats-child", str(model_path), str(folder), str(n),
                                   str(args.batch_size), mode], capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise RuntimeError(f"statistics subprocess failed (N={n}, {mode}):\n{proc.stderr[-3000:]}")
            runs[f"{mode}_{n}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    lo, hi = min(args.sizes), max(args.sizes)

    def ratio(mode, key):
        a, b = runs[f"{mode}_{lo}"][key], runs[f"{mode}_{hi}"][key]
        return b / a if a > 0 else None

    def growth(mode, key):
        return runs[f"{mode}_{hi}"][key] - runs[f"{mode}_{lo}"][key]

    keys = ("tracemalloc_peak", "rss_anon_peak_growth", "rss_peak_growth", "rss_file_growth")
    modes = ("stream", "keep_everything")
    return {"sizes": list(args.sizes), "batch_size": args.batch_size, "runs": runs,
            "ratios": {m: {k: ratio(m, k) for k in ("tracemalloc_peak", "rss_anon_peak")} for m in modes},
            "growth_bytes": {m: {k: growth(m, k) for k in keys} for m in modes}}


# --- report -----------------------------------------------------------------------------------------------


def _mb(b: float) -> str:
    return f"{b / 2**20:8.2f}"


def table(result: dict) -> str:
    env, lines = result["environment"], []
    lines.append(f"cloakonnx {env['cloakonnx']}  torch {env['torch']} ({env['torch_threads']} threads)  onnxruntime "
                 f"{env['onnxruntime']}  {env['cpus']} CPUs, load average at start {env['load_average']}")
    m = result["model"]
    lines.append(f"model: {m['name']}, {m['features']} features, {m['epochs']} epochs, held-out accuracy "
                 f"{100 * m['held_out_accuracy']:.1f}%"
                 + (f", {100 * m['data_accuracy']:.1f}% on the {m['samples']} samples for harden"
                    if "data_accuracy" in m else ""))
    t = result.get("timing")
    if t:
        w, a = t["work"], t["attack"]
        fb = w["torch_forward_backward"]
        clock = "CPU time of this process, all threads" if t["clock"] == "cpu" else "wall-clock time"
        other = "wall" if t["clock"] == "cpu" else "cpu"
        ot, pr = t[f"{other}_totals"], t["ratio_per_repeat"]
        steps = "" if a["name"] == "fgsm" else f" steps={a['steps']} restarts={a['restarts']}"  # FGSM: one step
        lines += [
            "",
            f"(a) harden, {a['name']} eps={a['eps']:g}{steps}, "
            f"{t['samples']['calibration']} calibration / {t['samples']['validation']} validation samples; "
            f"medians of {len(t['repeats'])} interleaved repeats",
            f"    clock: {clock}; torch threads: {t['torch_threads'] or 'default'}",
            f"    baseline work: native torch forward+backward: attack {fb['attack']['passes']} passes "
            f"({fb['attack']['images']} images), evaluation {fb['evaluation']['passes']} passes "
            f"({fb['evaluation']['images']} images), batch {w['attack_batch_size']}; counted from the settings, "
            "checked against an instrumented harden run",
            f"    plain onnxruntime forward: statistics {w['onnxruntime_forward']['statistics']['passes']} passes "
            f"({w['onnxruntime_forward']['statistics']['images']} images), evaluation "
            f"{w['onnxruntime_forward']['evaluation']['passes']} passes "
            f"({w['onnxruntime_forward']['evaluation']['images']} images)",
            f"    not in the baseline: {w['torch_forward_only_in_harden_not_in_baseline']['passes']} torch forward-only "
            f"passes ({w['torch_forward_only_in_harden_not_in_baseline']['images']} images) that harden also makes",
            "",
            f"    {'stage':<12} {'harden s':>9} {'baseline s':>11} {'ratio':>7}",
            "    " + "-" * 42,
        ]
        for k, v in t["stages"].items():
            if k == "total":
                lines.append("    " + "-" * 42)
            r = f"{v['ratio']:.3f}" if v["ratio"] is not None else "-"
            label = "setup*" if k == "setup" else k
            lines.append(f"    {label:<12} {v['pipeline_s']:>9.3f} {v['baseline_s']:>11.3f} {r:>7}")
        lines += [
            f"    {other + ' total':<12} {ot['pipeline_s']:>9.3f} {ot['baseline_s']:>11.3f} {ot['ratio']:>7.3f}",
            "    * setup: harden's time outside its stages (loading, checks, split, Runner/torch-executor builds, hashing)",
            f"    overhead ratio (median harden total / median baseline total, {t['clock']}): "
            f"{t['ratio_of_medians']:.3f}   target <= {t['target']:.2f}: {t['verdict']}",
            f"    per-repeat ratios: {t['clock']} median {pr['ratio']['median']:.3f} "
            f"(range {pr['ratio']['min']:.3f}-{pr['ratio']['max']:.3f}); {other} median "
            f"{pr['ratio_' + other]['median']:.3f} (range {pr['ratio_' + other]['min']:.3f}-"
            f"{pr['ratio_' + other]['max']:.3f})",
            f"    stricter baseline, BatchNorm folded into the convs as in the exported graph: "
            f"{t['baseline_total_bn_folded']:.3f} s, ratio {t['ratio_bn_folded']:.3f}",
            "    baseline parts (medians, s): " + ", ".join(f"{k} {v:.3f}" for k, v in t["baseline_parts"].items()),
        ]
    mem = result.get("memory")
    if mem:
        lo, hi = min(mem["sizes"]), max(mem["sizes"])
        lines += [
            "",
            f"(b) statistics stage (StatsStream), inputs memory-mapped from .npy, batch {mem['batch_size']}, "
            "one fresh subprocess per row; MiB",
            f"    {'mode':<16} {'N':>6} {'input':>8} {'tracemalloc':>11} {'RssAnon':>8} {'VmHWM':>8} "
            f"{'RssFile':>8} {'seconds':>8}",
            f"    {'':<16} {'':>6} {'(mapped)':>8} {'peak':>11} {'peak+':>8} {'peak+':>8} {'+':>8}",
        ]
        for key, r in mem["runs"].items():
            lines.append(f"    {r['mode']:<16} {r['n']:>6} {_mb(r['input_bytes'])} {_mb(r['tracemalloc_peak']):>11} "
                         f"{_mb(r['rss_anon_peak_growth'])} {_mb(r['rss_peak_growth'])} {_mb(r['rss_file_growth'])} "
                         f"{r['seconds']:>8.2f}")
        lines.append(f"    from N={lo} to N={hi}:")
        for mode in ("stream", "keep_everything"):
            rs, g = mem["ratios"][mode], mem["growth_bytes"][mode]
            fmt = {k: (f"{v:.2f}" if v is not None else "-") for k, v in rs.items()}
            lines.append(f"      {mode:<15} peak ratio: tracemalloc {fmt['tracemalloc_peak']}, process RssAnon "
                         f"{fmt['rss_anon_peak']}"
                         + ("  (expect ~1)" if mode == "stream" else "  (control: grows with N)"))
            lines.append(f"      {'':<15} growth MiB: tracemalloc {g['tracemalloc_peak'] / 2**20:+.2f}, RssAnon "
                         f"{g['rss_anon_peak_growth'] / 2**20:+.2f}, VmHWM {g['rss_peak_growth'] / 2**20:+.2f} "
                         f"(of which mapped input pages, RssFile: {g['rss_file_growth'] / 2**20:+.2f})")
        lines += [
            "    tracemalloc: numpy + Python allocations, the mapped input excluded (primary); RssAnon: all anonymous",
            "    memory incl. onnxruntime's, sampled every 1 ms; VmHWM (what ru_maxrss reports) also counts the mapped",
            "    input pages that were read (RssFile), so it grows with N by about the input size for any implementation",
        ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.rstrip().rsplit("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed pipeline+baseline pairs (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed baseline runs after the warm-up harden (default 1)")
    p.add_argument("--input", choices=("digits", "digits32"), default="digits",
                   help="digits (default): the demo's CNN on the 719 held-out 1x8x8 digits; digits32: "
                        "benchmarks/data_scale.py's small CNN on --n jittered 3x32x32 digits")
    p.add_argument("--n", type=int, help="--input digits32 only: samples handed to harden, half of them for "
                                         f"validation (default {DIGITS32_N}); --input digits rejects it")
    p.add_argument("--epochs", type=int,
                   help=f"training epochs (default 3 for digits, {DIGITS32_EPOCHS} for digits32, whose CNN has no "
                        "BatchNorm and learns slowly)")
    p.add_argument("--features", type=int, default=256,
                   help="width of the digits CNN's feature tensor (default 256; digits32's small CNN has 64)")
    p.add_argument("--attack", choices=("pgd", "fgsm"), default="pgd")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="what the stage table and the verdict use: CPU time of this process (default; robust to other "
                        "tenants of a shared machine) or wall-clock time; the other is shown beside it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for harden and the baseline alike (default 1: on a busy machine, multi-threaded "
                        "ops stall whenever one thread is descheduled); 0 keeps torch's default")
    p.add_argument("--sizes", default="1000,20000", help="N for the memory runs (default 1000,20000)")
    p.add_argument("--batch-size", type=int, default=256, help="onnxruntime batch in the memory runs (harden's default)")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's malloc settings as they are (the CLI, which this script bypasses, tunes them "
                        "with cloakonnx.allocator.keep_freed_memory; so does this script by default)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    add_output_options(p, out=True)
    args = p.parse_args(argv)
    args.sizes = parse_sizes(p, args.sizes)
    if args.input == "digits" and args.n is not None:
        p.error("--n needs --input digits32: --input digits hardens the demo's 719 held-out digits")
    if args.input == "digits32":
        args.n = DIGITS32_N if args.n is None else args.n
        if args.n < 4:
            p.error("--n must be at least 4 (harden splits the samples into calibration and validation)")
    if args.epochs is None:
        args.epochs = 3 if args.input == "digits" else DIGITS32_EPOCHS
    if args.repeats < 1 or args.warmup < 0 or args.epochs < 1 or args.steps < 1 or args.threads < 0:
        p.error("--repeats, --epochs and --steps must be at least 1, --warmup and --threads at least 0")
    return args


def run(args) -> dict:
    import onnxruntime
    import torch

    from cloakonnx.allocator import keep_freed_memory

    tuned = False if args.glibc_malloc else keep_freed_memory()  # harden and the baseline alike, as the CLI does
    result: dict = {
        "environment": {"cloakonnx": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "numpy": np.__version__, "python": platform.python_version(), "cpus": cpus(),
                        "torch_threads": torch.get_num_threads(), "malloc_tuned": tuned,
                        "load_average": [round(v, 2) for v in os.getloadavg()]},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="cloakonnx-harden-cost-") as tmp:
        folder = Path(tmp)
        if args.input == "digits32":
            net, data, model_path, data_path, info = build_digits32(folder, args.n, args.epochs, args.seed)
        else:
            net, data, model_path, data_path, info = build_demo(folder, args.features, args.epochs, args.seed)
        result["model"] = dict(info, input=args.input, epochs=args.epochs, samples=len(data))
        if args.threads:
            torch.set_num_threads(args.threads)  # after training, which runs at torch's default
        result["environment"]["torch_threads"] = torch.get_num_threads()
        if not args.skip_timing:
            result["timing"] = run_timing(args, net, data, model_path, data_path, folder)
        if not args.skip_memory:
            result["memory"] = run_memory(args, data, model_path, folder)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_stats-child":
        return stats_child(argv[1:])
    log_to_stderr()
    logging.getLogger("cloakonnx").setLevel(logging.WARNING)  # harden's own progress lines
    log.setLevel(logging.INFO)
    return run_main(run, parse_args(argv), table)


if __name__ == "__main__":
    sys.exit(main())
