"""How fast learned masks (or fine-tuned weights) are learned, and what the speed costs in robustness: the inner
attacker and the step count.

harden's default learns soft masks on every stage against an attacker crafted on the current masks at each step.
This runs that default with several learning settings on the same data, one after the other in this process, and
prints per setting: the learning stage's seconds (harden's own stage timer), the ratio to the first setting, and
what the result buys on harden's validation split: the adaptive accuracy at strength 1 (the learned masks as
learned), the strength harden chose within its clean budget, and that choice's worst case under APGD-CE-20 and
the selection attack (harden's guard), beside the original's.

    python benchmarks/learning_speed.py --demo-dir /tmp/demo                       # PGD-5 (before) vs FGSM-RS (now)
    python benchmarks/learning_speed.py --demo-dir /tmp/demo --settings fgsm:100,fgsm:400
    python benchmarks/learning_speed.py --demo-dir /tmp/demo --method finetune --settings fgsm:300,pgd:300
    python benchmarks/learning_speed.py --model M --data D --test T --eps 2/255 --mean ... --std ... \
        --method auto --settings pgd:300,pgd:224:0     # the default, against a run 4 times longer (no early stop)

A setting is ATTACK:STEPS[:STOP_LOSS[:LR]] (pgd: 5 inner steps; STOP_LOSS: --learn-stop-loss; 0 runs every step,
with the early stop on validation, --learn-stop-every, off as well; LR: --learn-lr, a step size kept as given). The
run 4 times longer than the default gives the step size the default ended with (its row's lr), since without the
held-out probe the rise check cannot see a wrecked model:

    python benchmarks/learning_speed.py --model M ... --method auto --settings pgd:300            # the default
    python benchmarks/learning_speed.py --model M ... --method auto --settings pgd:200:0:1e-4     # 4 x its 50 steps
Run it alone on the machine, or say how many threads each had: other jobs on the same cores skew every row.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_options, cpus, parse_model_args, run_main  # noqa: E402


def parse_settings(text: str) -> list[tuple[str, int, float | None, float | None]]:
    out = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            attack, steps = fields[0], int(fields[1])
            stop = float(fields[2]) if len(fields) >= 3 and fields[2] else None
            lr = float(fields[3]) if len(fields) == 4 else None
            if attack not in ("pgd", "fgsm") or len(fields) > 4 or (lr is not None and not lr > 0):
                raise ValueError
            out.append((attack, steps, stop, lr))
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(f"bad setting {part!r}: use ATTACK:STEPS[:STOP_LOSS[:LR]], ATTACK pgd "
                                             "or fgsm") from None
    return out


def parse_eps(text: str) -> float:
    """0.1 or 2/255."""
    top, _, bottom = text.partition("/")
    return float(top) / float(bottom or 1)


def run(args: argparse.Namespace) -> dict:
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.config import HardenConfig, LearnConfig
    from cloakonnx.data import Preprocess
    from cloakonnx.harden import harden
    from cloakonnx.runtime import use_threads

    use_threads(args.threads)
    model, data = args.model, args.data
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for attack, steps, stop, lr in args.settings:
            learn = LearnConfig(steps=steps, batch_size=args.batch, inner_attack=attack, stop_loss=stop, lr=lr,
                                stop_every=0 if stop == 0 else None)  # :0 turns both early stops off
            name = f"{attack}-{steps}" + ("" if stop is None else f"-{stop:g}") + ("" if lr is None else f"-lr{lr:g}")
            config = HardenConfig(output=Path(tmp) / f"{name}.onnx", learn=learn, seed=args.seed,
                                  method=args.method, preprocess=Preprocess(args.bounds, args.mean, args.std),
                                  attack=AttackConfig(name="pgd", eps=args.eps, steps=10, seed=args.seed),
                                  threads=args.threads)
            rep = harden(model, data, config).to_dict()
            learning = rep["learning"]
            full = next(p for p in rep["curve"] if p["alpha"] == 1.0)
            guard = learning.get("guard") or {}
            rows.append({"setting": f"{attack}:{steps}" + ("" if stop is None else f":{stop:g}")
                         + ("" if lr is None else f":{lr:g}"),
                         "learning_seconds": rep["stages"]["learning"], "steps_run": learning.get("steps"),
                         "stopped_by": learning.get("stopped_by"),
                         "lr": learning.get("lr"), "kept": learning.get("kept", args.method),
                         "harden_seconds": rep["seconds"],
                         "original_adaptive": rep["adversarial_accuracy"]["original"],
                         "strength_1_adaptive": full["adversarial_accuracy"], "strength_1_clean": full["clean_accuracy"],
                         "chosen": learning.get("alpha", learning.get("strength")), "guard_original": guard.get("original"),
                         "guard_hardened": guard.get("hardened"), "validation": rep["samples"]["validation"]})
    first = rows[0]["learning_seconds"]
    for r in rows:
        r["time_ratio"] = round(r["learning_seconds"] / first, 3)
    return {"model": str(model), "method": args.method, "eps": args.eps, "threads": args.threads, "cpus": cpus(), "rows": rows}


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table(result: dict) -> str:
    lines = [f"{result['model']}, method {result['method']}: eps {result['eps']:g}, {result['threads']} thread(s), {result['cpus']} usable cores; "
             f"validation {result['rows'][0]['validation']} samples",
             f"{'setting':12} {'learning':>9} {'ratio':>6} {'steps':>5} {'harden':>8} {'adaptive@1':>10} {'clean@1':>8} "
             f"{'chosen':>6} {'guard: original':>15} {'hardened':>8}"]
    for r in result["rows"]:
        steps = "-" if r["steps_run"] is None else str(r["steps_run"])
        lines.append(f"{r['setting']:12} {r['learning_seconds']:8.1f}s {r['time_ratio']:6.2f} {steps:>5} "
                     f"{r['harden_seconds']:7.0f}s "
                     f"{pct(r['strength_1_adaptive']):>10} {pct(r['strength_1_clean']):>8} "
                     f"{'-' if r['chosen'] is None else format(r['chosen'], 'g'):>6} {pct(r['guard_original']):>15} "
                     f"{pct(r['guard_hardened']):>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--settings", type=parse_settings, default="pgd:300,fgsm:300",
                    help="comma-separated ATTACK:STEPS; the first is the reference of the ratio "
                         "(default: PGD-5 x 300, the default before, then FGSM-RS x 300, the default now)")
    ap.add_argument("--method", choices=["auto", "both", "mask", "finetune"], default="mask",
                    help="harden's --method: auto (its default: the weights, the masks if they gain nothing), both, "
                         "mask (soft masks on every stage) or finetune (the weights)")
    ap.add_argument("--batch", type=int, default=None,
                    help="calibration samples per learning step (default: the method's, 128 for masks, 32 for weights)")
    ap.add_argument("--eps", type=parse_eps, default=0.1, help="0.1 or 2/255")
    ap.add_argument("--bounds", type=lambda t: tuple(map(float, t.split(","))), default=(0.0, 1.0))
    ap.add_argument("--mean", type=lambda t: tuple(map(float, t.split(","))), default=None)
    ap.add_argument("--std", type=lambda t: tuple(map(float, t.split(","))), default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None,
                    help="write each setting's model into this folder (ATTACK-STEPS[-STOP_LOSS].onnx) to evaluate it later; "
                         "default: a temporary folder, removed")
    return run_main(run, parse_model_args(ap, argv), table)


if __name__ == "__main__":
    sys.exit(main())
