#!/usr/bin/env python
"""What does the cloak mask cost at inference? Original vs Mul form vs folded form, in onnxruntime.

For every onnxruntime provider that really works here (CPU always; CUDA and TensorRT only when a
session on them actually loads) and every batch size, the three models run interleaved in one
process after a warm-up (original, Mul, folded, original, Mul, folded, ...), so drift in clock speed
or load hits all three alike. Reported: p50/p90/p99 latency, throughput, and the p50 ratio
hardened/original with a 95% bootstrap interval over the paired repeats. Targets: Mul form
p50 ratio <= 1.01; folded form 1.00 within noise (its graph is the original's, only weight values
differ, so its interval is also a measure of the noise floor).

    python benchmarks/latency.py                          # resnet18, random weights, 224x224
    python benchmarks/latency.py --batches 1,8 --repeats 50 --json --out latency.json
    python benchmarks/latency.py --model my_classifier.onnx --threads 4
    python benchmarks/latency.py --model pp_lcnet.onnx --stages --rotate   # harden's every-stage masks

With ``--stages`` the masks are what harden's default puts on a model: a random soft per-channel
mask (values in [0.05, 1], about 5% exact zeros, seeded) on every tensor
``cloakonnx.layers.candidate_tensors`` proposes (the head's input and the last activation output of
each resolution stage). The Mul form has a Mul on each; the folded form folds each feature map into
the layers that read it where that is exact (``fold_into_consumers``), the head's input into the head
(``fold_mask``), and keeps a Mul on the rest (a tensor that also feeds a residual Add, a Concat...).
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when a test loads this file by path

from common import add_output_options, cpus, export_resnet18, log_to_stderr, run_main  # noqa: E402

from cloakonnx import __version__  # noqa: E402
from cloakonnx.errors import CloakError  # noqa: E402

log = logging.getLogger("cloakonnx.benchmarks.latency")

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
VARIANTS = ("original", "mul", "folded")
TARGETS = {"mul": "<= 1.01", "folded": "1.00 within noise"}
SOFT_LOW, SOFT_ZEROS = 0.05, 0.05  # --stages: kept values drawn from [SOFT_LOW, 1], this fraction set to 0


# --- models -----------------------------------------------------------------------------------------------


def build_variants(model, fraction: float, seed: int):
    """(original, Mul form, folded form, mask) with ``fraction`` of the head's features masked at random."""
    from cloakonnx.graph import apply_mask, find_head, fold_mask

    head = find_head(model)
    if head.mask is not None:
        raise CloakError("the model already carries a cloak mask; benchmark the un-hardened model")
    rng = np.random.default_rng(seed)
    mask = np.ones(head.width, np.float32)
    mask[rng.choice(head.width, max(1, round(fraction * head.width)), replace=False)] = 0
    mul = apply_mask(model, head.feature, mask)
    folded = fold_mask(model, mask)
    return {"original": model, "mul": mul, "folded": folded}, mask, head


def soft_mask(width: int, rng) -> np.ndarray:
    """Values uniform in [SOFT_LOW, 1], with round(SOFT_ZEROS * width) of them (at least one) exactly 0."""
    mask = rng.uniform(SOFT_LOW, 1.0, width).astype(np.float32)
    mask[rng.choice(width, max(1, round(SOFT_ZEROS * width)), replace=False)] = 0
    return mask


def stage_tensors(model, head, size: int | None, seed: int) -> dict[str, tuple[int, int]]:
    """(width, rank) of every tensor harden's default masks: the head's input and each stage's last
    activation output, with the shapes from one forward pass of a random batch of 1."""
    from cloakonnx.data import Preprocess
    from cloakonnx.layers import activation_outputs, candidate_tensors
    from cloakonnx.learn import tensor_shapes

    image, sample = input_array(model, 1, size, np.random.default_rng(seed))
    shapes = tensor_shapes(model, activation_outputs(model), Preprocess(), sample, image)
    out = {}
    for t in candidate_tensors(model, head.feature, shapes):
        out[t] = (head.width, 2) if t == head.feature else (int(shapes[t][1]), len(shapes[t]))
    return out


def fold_stages(model, head, masks: dict[str, np.ndarray],
                ranks: dict[str, int]) -> tuple[object, list[str], list[str]]:
    """(folded form, tensors folded, tensors that keep a Mul): feature maps folded into the layers
    that read them where exact, then the head's input into the head, then a Mul on the rest."""
    from cloakonnx.graph import apply_mask, fold_mask
    from cloakonnx.graph.fold_next import fold_into_consumers

    folded_names = []
    for tensor, mask in masks.items():
        if tensor == head.feature:
            continue
        result = fold_into_consumers(model, tensor, mask)
        if result is not None:
            model, _ = result
            folded_names.append(tensor)
    if head.feature in masks:
        model = fold_mask(model, masks[head.feature])
        folded_names.append(head.feature)
    kept = [t for t in masks if t not in folded_names]
    for tensor in kept:
        model = apply_mask(model, tensor, masks[tensor], ranks[tensor])
    return model, [t for t in masks if t in folded_names], kept


def build_stage_variants(model, size: int | None, seed: int) -> tuple[dict, dict, object]:
    """(original, Mul form, folded form), what was masked where, and the head, for ``--stages``."""
    from cloakonnx.graph import apply_mask, find_head

    head = find_head(model)
    if head.mask is not None:
        raise CloakError("the model already carries a cloak mask; benchmark the un-hardened model")
    tensors = stage_tensors(model, head, size, seed)
    rng = np.random.default_rng(seed)
    masks = {t: soft_mask(width, rng) for t, (width, _) in tensors.items()}
    ranks = {t: rank for t, (_, rank) in tensors.items()}
    mul = model
    for tensor, mask in masks.items():
        mul = apply_mask(mul, tensor, mask, ranks[tensor])
    folded, folded_names, kept = fold_stages(model, head, masks, ranks)
    stages = {"tensors": [{"tensor": t, "rank": ranks[t], "channels": int(m.size), "zeros": int((m == 0).sum()),
                           "mean": float(m.mean()), "folded": t in folded_names} for t, m in masks.items()],
              "folded": folded_names, "kept_mul": kept, "values": [SOFT_LOW, 1.0], "zero_fraction": SOFT_ZEROS}
    return {"original": model, "mul": mul, "folded": folded}, stages, head


# --- providers and sessions -------------------------------------------------------------------------------


def _really_loads(provider: str) -> bool:
    """A tiny session on ``provider`` is created, quietly, and keeps it (no silent CPU fallback)."""
    from cloakonnx.runtime import provider_really_loads

    return provider_really_loads(provider)


def working_providers(requested: list[str] | None) -> list[str]:
    from cloakonnx import runtime

    available = runtime._ort().get_available_providers()
    short = {p.replace("ExecutionProvider", "").lower(): p for p in available}
    wanted = [short.get(p.lower(), p) for p in requested] if requested else [p for p in (TRT, CUDA, CPU)
                                                                             if p in available]
    out = []
    for p in wanted:
        if _really_loads(p):
            out.append(p)
        elif requested:
            raise CloakError(f"onnxruntime provider {p} does not load here (available: {', '.join(available)})")
        else:
            log.info("skipping %s: listed by onnxruntime but does not load here", p)
    return out


def make_session(model_bytes: bytes, provider: str, threads: int):
    from cloakonnx import runtime

    ort = runtime._ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = [provider] + ([CUDA] if provider == TRT else []) + ([CPU] if provider != CPU else [])
    sess = ort.InferenceSession(model_bytes, opts, providers=providers)
    if sess.get_providers()[0] != provider:
        raise CloakError(f"{provider} fell back to {sess.get_providers()[0]}")
    return sess


# --- timing -----------------------------------------------------------------------------------------------


def input_array(model, batch: int, size: int | None, rng) -> tuple[str, np.ndarray]:
    from cloakonnx.graph import select_input

    info = select_input(model)
    dims = list(info.shape)
    if not dims:
        raise CloakError(f"input {info.name!r} has no shape")
    if isinstance(dims[0], int) and dims[0] > 0 and dims[0] != batch:
        raise CloakError(f"input {info.name!r} has a fixed batch of {dims[0]}; run with --batches {dims[0]}")
    shape = [batch]
    for d in dims[1:]:
        if isinstance(d, int) and d > 0:
            shape.append(d)
        elif size:
            shape.append(size)
        else:
            raise CloakError(f"input {info.name!r} has a symbolic dimension {d!r}; give its size with --size")
    dtype = np.dtype(info.dtype) if info.dtype != "unknown" else np.dtype(np.float32)
    return info.name, rng.random(shape, dtype=np.float32).astype(dtype)


def time_interleaved(sessions: dict, feed: dict, warmup: int, repeats: int,
                     rotate: bool = False) -> dict[str, np.ndarray]:
    """Seconds per run of each session, interleaved A B C A B C after ``warmup`` rounds.

    With ``rotate`` the order turns each round (A B C, B C A, C A B), so no model always runs first.
    """
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    keys = list(sessions)
    times = {k: np.empty(repeats) for k in keys}
    clock = time.perf_counter
    for r in range(repeats):
        shift = r % len(keys) if rotate else 0
        for k in keys[shift:] + keys[:shift]:
            s = sessions[k]
            t = clock()
            s.run(None, feed)
            times[k][r] = clock() - t
    return times


def ratio_ci(variant: np.ndarray, original: np.ndarray, rng, rounds: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of p50(variant) / p50(original), resampling the paired repeats."""
    idx = rng.integers(0, len(original), size=(rounds, len(original)))
    ratios = np.median(variant[idx], axis=1) / np.median(original[idx], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def verdict(variant: str, ratio: float, lo: float, hi: float) -> str:
    if variant == "mul":
        if ratio <= 1.01:
            return "ok"
        return "noise" if lo <= 1.01 else "MISS"
    if lo <= 1.0 <= hi:
        return "ok"
    return "ok (<1%)" if abs(ratio - 1.0) <= 0.01 else "MISS"


def summarise(times: dict[str, np.ndarray], batch: int, rng) -> dict:
    base = float(np.median(times["original"]))
    out = {}
    for k, t in times.items():
        p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
        row = {"p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "p99_ms": p99 * 1e3, "mean_ms": float(t.mean()) * 1e3,
               "images_per_s": batch * len(t) / float(t.sum())}
        if k != "original":
            lo, hi = ratio_ci(t, times["original"], rng)
            row.update({"p50_ratio": p50 / base, "p50_ratio_ci95": [lo, hi], "target": TARGETS[k],
                        "verdict": verdict(k, p50 / base, lo, hi)})
        out[k] = row
    return out


def check_outputs(sessions: dict, feed: dict) -> dict:
    """Mul and folded forms must agree (and differ from the original only through the mask)."""
    y = {k: s.run(None, feed)[0].astype(np.float64) for k, s in sessions.items()}
    return {"max_abs_diff_mul_vs_folded": float(np.abs(y["mul"] - y["folded"]).max()),
            "top1_agreement_mul_vs_folded": float((y["mul"].argmax(1) == y["folded"].argmax(1)).mean())}


# --- report -----------------------------------------------------------------------------------------------


def table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        (f"model: {cfg['model']}  head: {cfg['head']}  masked: {cfg['masked']}/{cfg['features']} "
         f"{'channels and features' if 'stages' in cfg else 'features'}"),
        *(stage_lines(cfg["stages"]) if "stages" in cfg else []),
        f"onnxruntime {result['environment']['onnxruntime']}  intra-op threads: {cfg['threads']} "
        f"(of {result['environment']['cpus']} CPUs)  inter-op: 1  warm-up: {cfg['warmup']}  "
        f"repeats: {cfg['repeats']} (interleaved original, mul, folded"
        f"{', order rotated each round' if cfg['rotate'] else ''})",
        "targets: mul p50 ratio <= 1.01; folded 1.00 within noise (95% bootstrap interval contains 1.00)",
        "",
    ]
    head = (f"{'provider':<9} {'batch':>5}  {'variant':<8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
            f"{'img/s':>9}  {'p50 ratio':>9}  {'95% CI':<15} {'target':<18} verdict")
    lines += [head, "-" * len(head)]
    for run in result["runs"]:
        prov = run["provider"].replace("ExecutionProvider", "")
        for k in VARIANTS:
            r = run["variants"][k]
            ratio = f"{r['p50_ratio']:.4f}" if "p50_ratio" in r else ""
            ci = "[{:.3f}, {:.3f}]".format(*r["p50_ratio_ci95"]) if "p50_ratio_ci95" in r else ""
            lines.append(f"{prov:<9} {run['batch']:>5}  {k:<8} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                         f"{r['p99_ms']:>9.3f} {r['images_per_s']:>9.1f}  {ratio:>9}  {ci:<15} "
                         f"{r.get('target', ''):<18} {r.get('verdict', '')}")
        lines.append(f"{'':<16}mul vs folded: max |diff| {run['check']['max_abs_diff_mul_vs_folded']:.2e}, "
                     f"top-1 agreement {run['check']['top1_agreement_mul_vs_folded']:.3f}")
    return "\n".join(lines)


def stage_lines(stages: dict) -> list[str]:
    """The ``--stages`` header: which tensors carry a mask, and which of them folded or kept a Mul."""
    n, lo = len(stages["tensors"]), stages["values"][0]
    lines = [(f"--stages: soft masks (values in [{lo:g}, 1], ~{stages['zero_fraction']:.0%} zeros) on {n} tensors; "
              f"folded into weights: {len(stages['folded'])}/{n}, kept a Mul: {len(stages['kept_mul'])}/{n}")]
    for t in stages["tensors"]:
        form = "folded" if t["folded"] else "Mul"
        lines.append(f"  {form:<6} {t['tensor']}  (rank {t['rank']}, {t['zeros']}/{t['channels']} zeros, "
                     f"mean {t['mean']:.3f})")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an ONNX classifier (default: resnet18 with random weights)")
    p.add_argument("--size", type=int, default=224, help="image side for the default model or symbolic dims")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--repeats", type=int, default=100, help="timed runs of each model per batch size")
    p.add_argument("--warmup", type=int, default=10, help="untimed rounds before timing")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all usable CPUs)")
    p.add_argument("--fraction", type=float, default=0.01, help="fraction of features masked (default 0.01)")
    p.add_argument("--providers", help="comma-separated providers (default: every one that really loads)")
    p.add_argument("--rotate", action="store_true",
                   help="turn the order each round (A B C, B C A, C A B) instead of always A B C")
    p.add_argument("--stages", action="store_true",
                   help="soft masks on every tensor harden's default masks (the head's input and each stage's "
                        "last activation), folded where exact, instead of one binary mask on the head's input")
    p.add_argument("--seed", type=int, default=0)
    add_output_options(p, out=True)
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error("--batches takes integers, e.g. 1,8,64")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches takes positive integers")
    if args.repeats < 5 or args.warmup < 0:
        p.error("--repeats must be at least 5 and --warmup at least 0")
    if not 0 < args.fraction < 1:
        p.error("--fraction must be between 0 and 1")
    return args


def masked_variants(model, args) -> tuple[dict, dict, dict | None, object]:
    """(the three models, the config's mask counts, the ``--stages`` record or None, the head)."""
    if args.stages:
        variants, stages, head = build_stage_variants(model, args.size, args.seed)
        masked = {"features": sum(t["channels"] for t in stages["tensors"]),
                  "masked": sum(t["zeros"] for t in stages["tensors"]), "fraction": SOFT_ZEROS}
        return variants, masked, stages, head
    variants, mask, head = build_variants(model, args.fraction, args.seed)
    return variants, {"features": head.width, "masked": int((mask == 0).sum()), "fraction": args.fraction}, None, head


def run(args) -> dict:
    import onnxruntime

    from cloakonnx.graph import load_model

    threads = args.threads or cpus()
    with tempfile.TemporaryDirectory(prefix="cloakonnx-bench-") as tmp:
        if args.model:
            path = args.model
        else:
            log.info("exporting resnet18 (random weights, %dx%d)", args.size, args.size)
            path = export_resnet18(Path(tmp), args.size, args.seed).path
        model = load_model(path)
    variants, masked, stages, head = masked_variants(model, args)
    blobs = {k: m.SerializeToString() for k, m in variants.items()}
    providers = working_providers(args.providers.split(",") if args.providers else None)
    rng = np.random.default_rng(args.seed)
    result = {
        "config": {"model": str(args.model) if args.model else f"torchvision resnet18 (random weights), "
                   f"{args.size}x{args.size}", "head": head.kind, **masked, "batches": args.batches,
                   "repeats": args.repeats, "warmup": args.warmup, "rotate": args.rotate, "threads": threads, "providers": providers,
                   "nodes": {k: len(m.graph.node) for k, m in variants.items()}, "seed": args.seed,
                   **({"stages": stages} if stages else {})},
        "environment": {"cloakonnx": __version__, "onnxruntime": onnxruntime.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "processor": platform.processor() or platform.machine(), "cpus": cpus()},
        "runs": [],
    }
    for provider in providers:
        sessions = {k: make_session(b, provider, threads) for k, b in blobs.items()}
        for batch in args.batches:
            name, x = input_array(model, batch, args.size, rng)
            feed = {name: x}
            log.info("%s batch %d: %d warm-up + %d timed rounds", provider, batch, args.warmup, args.repeats)
            check = check_outputs(sessions, feed)
            times = time_interleaved(sessions, feed, args.warmup, args.repeats, args.rotate)
            result["runs"].append({"provider": provider, "batch": batch, "variants": summarise(times, batch, rng),
                                   "check": check})
    return result


def main(argv=None) -> int:
    log_to_stderr()
    return run_main(run, parse_args(argv), table)


if __name__ == "__main__":
    sys.exit(main())
