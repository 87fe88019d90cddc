"""How far better scores and more rounds go beyond the paper's single-round absdiff, at the same
clean-accuracy budget, measured on a test set that neither training nor hardening saw.

    python benchmarks/mask_choice.py --demo-dir cloakonnx-demo   # after `cloakonnx demo`
    python benchmarks/mask_choice.py --model m.onnx --data harden.npz --test test.npz --eps 0.1

For each (score, rounds) it hardens with ``--max-clean-drop`` (choice made on the validation
split of --data), then evaluates the result on --test with PGD crafted on the original (transfer)
and on the hardened model itself (adaptive). Prints a table, and JSON with --json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from common import add_harden_options, add_model_options, parse_model_args, run_main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    add_harden_options(ap)
    ap.add_argument("--budget-confidence", type=float, default=0.9, help="as harden's; 0: point estimate only")
    ap.add_argument("--scores", default="absdiff,normalised,margin")
    ap.add_argument("--rounds", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    return run_main(run, parse_model_args(ap, argv), table)


def run(args: argparse.Namespace) -> dict:
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.evaluate import EvaluateConfig, evaluate
    from cloakonnx.harden import HardenConfig, harden

    attack = AttackConfig(name="pgd", eps=args.eps, steps=args.steps, seed=args.seed)
    ev = EvaluateConfig(attacks=("pgd",), eps=(args.eps,), attack=AttackConfig(steps=args.steps), seed=args.seed,
                        sanity=False)
    base = evaluate(args.model, args.test, ev).to_dict()
    rows = [{"score": "none (original)", "rounds": 0, "masked": 0, "clean": base["clean_accuracy"],
             "transfer": base["results"][0]["accuracy"], "adaptive": base["results"][0]["accuracy"]}]
    with tempfile.TemporaryDirectory() as tmp:
        for score in args.scores.split(","):
            for rounds in (int(r) for r in args.rounds.split(",")):
                out = Path(tmp) / f"{score}-{rounds}.onnx"
                rep = harden(args.model, args.data, HardenConfig(
                    output=out, attack=attack, score=score, rounds=rounds, max_clean_drop=args.max_clean_drop,
                    budget_confidence=args.budget_confidence,
                    val_split=args.val_split, seed=args.seed, adaptive=False))
                res = evaluate(out, args.test, replace(ev, reference=args.model)).to_dict()
                acc = {r["threat"]: r["accuracy"] for r in res["results"]}
                rows.append({"score": score, "rounds": rounds, "masked": rep.masked, "clean": res["clean_accuracy"],
                             "transfer": acc["transfer"], "adaptive": acc["adaptive"]})
    return {"model": str(args.model), "test": str(args.test), "eps": args.eps, "steps": args.steps,
            "max_clean_drop": args.max_clean_drop, "test_samples": base["samples"], "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['model']}: PGD-{result['steps']} eps={result['eps']:g} on {result['test_samples']} test samples; "
             f"mask chosen with --max-clean-drop {result['max_clean_drop']:g} on the validation split",
             f"{'score':18} {'rounds':>6} {'masked':>6} {'clean':>8} {'transfer':>9} {'adaptive':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['score']:18} {r['rounds']:>6} {r['masked']:>6} {100 * r['clean']:7.2f}% "
                     f"{100 * r['transfer']:8.2f}% {100 * r['adaptive']:8.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
