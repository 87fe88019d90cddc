"""Does ``--max-clean-drop`` hold on data the choice never saw? Point estimate against confidence bounds.

``harden --max-clean-drop PTS`` picks, among about 20 candidate masks, the one with the best
adversarial accuracy whose clean-accuracy drop on the validation split is within PTS. Picking the
best of many on a small split overfits it: a candidate that happened to lose no validation sample
can lose several on new data. The alternative rule requires a one-sided upper confidence bound on
the drop (the paired per-sample change, as in McNemar's test) to be within PTS.

For each seed (a different calibration/validation split of --data and a different attack start),
this script chooses a mask under every rule, then measures it on --test, which neither training
nor the choice saw: the clean-accuracy drop and the gain under PGD crafted on the original model.
It prints, per rule, how often the test drop broke the budget.

    python benchmarks/budget_holdout.py --demo-dir cloakonnx-demo --seeds 20      # after `cloakonnx demo`
    python benchmarks/budget_holdout.py --model m.onnx --data harden.npz --test test.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from common import add_harden_options, add_model_options, parse_model_args, run_main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    add_harden_options(ap)
    ap.add_argument("--score", default="normalised")
    ap.add_argument("--confidences", default="0.8,0.9,0.95")
    ap.add_argument("--seeds", type=int, default=20)
    return run_main(run, parse_model_args(ap, argv), table)


def run(args: argparse.Namespace) -> dict:
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.backend import craft
    from cloakonnx.data import load_data
    from cloakonnx.curve import choose_point, counts_for, mask_curve
    from cloakonnx.harden import HardenConfig
    from cloakonnx.mask import mask_top, ranking, score_features
    from cloakonnx.pipeline import prepare
    from cloakonnx.runner import collect_features
    from cloakonnx.timing import StageTimer

    budget = args.max_clean_drop
    confidences = [float(c) for c in args.confidences.split(",")]
    rules = ["point estimate"] + [f"bound {c:g}" for c in confidences]
    picks: dict[str, list[dict]] = {r: [] for r in rules}
    test = load_data(args.test, None, 1, (0.0, 1.0))
    f_test = f_test_adv = None
    for seed in range(args.seeds):
        attack = AttackConfig(name="pgd", eps=args.eps, steps=args.steps, seed=seed)
        config = HardenConfig(attack=attack, score=args.score, val_split=args.val_split, seed=seed,
                              max_clean_drop=budget)
        p = prepare(args.model, args.data, config)
        head, runner = p.target.head, p.runner
        if f_test is None:  # the test set's features, clean and under PGD on the original: once
            adv_test = craft(runner.model_for("pgd"), AttackConfig(name="pgd", eps=args.eps, steps=args.steps),
                             test.x, test.y, (0.0, 1.0), p.device, "attack test", p.attack_batch.size)
            f_test = collect_features(runner.session, p.target.feature, test.x, runner.feed)
            f_test_adv = collect_features(runner.session, p.target.feature, adv_test, runner.feed)
            ones = np.ones(head.width, np.float32)
            test_clean0 = float((head.apply(f_test, ones).argmax(1) == test.y).mean())
            test_adv0 = float((head.apply(f_test_adv, ones).argmax(1) == test.y).mean())
        stats, _, _ = p.calibrate(runner, config.ort_batch_size, StageTimer(), f" (seed {seed})")
        adv_val = p.adversarial(runner, p.val, f" validation (seed {seed})")
        f_val = collect_features(runner.session, p.target.feature, p.val.x, runner.feed)
        f_val_adv = collect_features(runner.session, p.target.feature, adv_val, runner.feed)
        order = ranking(score_features(stats, args.score), None)
        counts = counts_for(config.fractions, stats.width)
        val_clean0 = float((head.apply(f_val, np.ones(head.width, np.float32)).argmax(1) == p.val.y).mean())
        for rule in rules:
            confidence = float(rule.split()[-1]) if rule.startswith("bound") else 0.9
            points = mask_curve(head, order, counts, f_val, f_val_adv, p.val.y, None, confidence)
            chosen = choose_point(points, val_clean0, budget, use_bound=rule.startswith("bound"))
            k = 0 if chosen is None else chosen.added
            mask = mask_top(order, k, stats.width)
            clean = float((head.apply(f_test, mask).argmax(1) == test.y).mean())
            adv = float((head.apply(f_test_adv, mask).argmax(1) == test.y).mean())
            picks[rule].append({"seed": seed, "masked": k,
                                "val_drop": 0.0 if chosen is None else 100 * (val_clean0 - chosen.clean_accuracy),
                                "test_drop": 100 * (test_clean0 - clean), "test_gain": 100 * (adv - test_adv0)})

    summary = []
    for rule in rules:
        rows = picks[rule]
        drops = np.array([r["test_drop"] for r in rows])
        gains = np.array([r["test_gain"] for r in rows])
        summary.append({"rule": rule, "seeds": len(rows), "broke_budget": int((drops > budget + 1e-9).sum()),
                        "no_mask": int(sum(r["masked"] == 0 for r in rows)),
                        "mean_test_drop": float(drops.mean()), "max_test_drop": float(drops.max()),
                        "mean_test_gain": float(gains.mean()), "mean_masked": float(np.mean([r["masked"] for r in rows]))})
    return {"model": str(args.model), "validation_samples": len(p.val), "test_samples": len(test),
            "budget_points": budget, "score": args.score, "attack": f"PGD-{args.steps} eps {args.eps:g} (transfer)",
            "test_clean": test_clean0, "test_adversarial": test_adv0, "summary": summary, "picks": picks}


def table(result: dict) -> str:
    lines = [f"{Path(result['model']).name}: budget {result['budget_points']:g} points, score {result['score']}, "
             f"{result['summary'][0]['seeds']} seeds, {result['validation_samples']} validation / "
             f"{result['test_samples']} test samples, {result['attack']}",
             f"test without a mask: clean {100 * result['test_clean']:.2f}%, adversarial "
             f"{100 * result['test_adversarial']:.2f}%",
             f"{'rule':<16} {'broke budget on test':>21} {'no mask':>8} {'mean drop':>10} {'max drop':>9} "
             f"{'mean gain':>10} {'mean masked':>12}"]
    lines += [f"{s['rule']:<16} {s['broke_budget']:>14d} of {s['seeds']:<4d} {s['no_mask']:>8d} "
              f"{s['mean_test_drop']:>10.2f} {s['max_test_drop']:>9.2f} {s['mean_test_gain']:>10.2f} "
              f"{s['mean_masked']:>12.1f}" for s in result["summary"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
