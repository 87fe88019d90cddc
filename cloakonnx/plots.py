"""The plots behind --plot: evaluate's accuracy against eps, sweep's and harden's trade-off curves, and
the strength curve of fine-tuned weights. matplotlib is imported on first use."""
from __future__ import annotations

from pathlib import Path

from .errors import CloakError


def plot_evaluate(report: dict, path: str | Path) -> None:
    """Accuracy against eps, one line per attack and threat model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    eps = report["eps"]
    series: dict[tuple[str, str], dict] = {}
    for r in report["results"]:
        series.setdefault((r["attack"], r["threat"]), {})[r["eps"]] = r["accuracy"]
    for (attack, threat), accs in series.items():
        xs = sorted(accs)
        ax.plot(xs, [100 * accs[x] for x in xs], marker="o", label=f"{attack} ({threat})")
    ax.plot(eps, [100 * report["robust_accuracy"][repr(e)] for e in eps], "k--", marker="s", label="robust (worst case)")
    ax.axhline(100 * report["clean_accuracy"], color="grey", lw=0.8, ls=":", label="clean")
    ax.set_xlabel(f"eps ({report['norm']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(Path(report["model"]).name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CloakError("plots need matplotlib: pip install 'cloakonnx[plot]'") from None
    return plt


def _save_figure(fig, path) -> None:
    p = Path(path)
    if not p.parent.is_dir():
        raise CloakError(f"plot directory does not exist: {p.parent}")
    fig.savefig(p, dpi=120)
    _pyplot().close(fig)


def plot_sweep(report: dict, path: str | Path) -> None:
    """Left: clean and adversarial accuracy against the share of features masked, per score, with the
    chosen point marked. Right: the distribution of feature scores, with the masking threshold."""
    import numpy as np

    if report.get("strength"):
        return plot_strength(report, path)
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 5.2), gridspec_kw={"width_ratios": [1.6, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (score, points) in enumerate(report["curves"].items()):
        if not points:
            continue
        c = colors[i % len(colors)]
        xs = [100 * p["fraction"] for p in points]
        ax.plot(xs, [100 * p["adversarial_accuracy"] for p in points], "-o", color=c, ms=3, label=f"adversarial ({score})")
        ax.plot(xs, [100 * p["clean_accuracy"] for p in points], "--", color=c, lw=1, label=f"clean ({score})")
        chosen = report.get("chosen", {}).get(score)
        if chosen:
            ax.plot([100 * chosen["fraction"]], [100 * chosen["adversarial_accuracy"]], "*", color=c, ms=14,
                    markeredgecolor="k", label=f"chosen ({score}): {chosen['masked']} masked")
    ax.set_xlabel("features masked (%)")
    ax.set_ylabel("accuracy on validation (%)")
    lowest = min((p["adversarial_accuracy"] for pts in report["curves"].values() if pts for p in pts), default=0)
    ax.set_ylim(max(0, 100 * lowest - 10), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    ax.set_title(Path(report["model"]).name)
    best = report.get("best", {}).get("score") or next(iter(report["scores"]))
    values = np.asarray(report["scores"][best])
    hist.hist(values, bins=40, color="grey")
    chosen = report.get("chosen", {}).get(best)
    if chosen and chosen["masked"]:
        threshold = np.sort(values)[::-1][chosen["masked"] - 1]
        hist.axvline(threshold, color="red", lw=1, label=f"top {chosen['masked']} masked")
        hist.legend(fontsize=8)
    hist.set_xlabel(f"feature score ({best})")
    hist.set_ylabel("features")
    hist.set_yscale("log")
    hist.set_title("distribution of feature scores")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_strength(report: dict, path: str | Path) -> None:
    """sweep --method finetune: clean and adaptive accuracy on validation against alpha, the choice marked."""
    plt = _pyplot()
    s = report["strength"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [p["alpha"] for p in s["curve"]]
    ax.plot(xs, [100 * p["adversarial_accuracy"] for p in s["curve"]], "-o", ms=4, label="adversarial (adaptive)")
    ax.plot(xs, [100 * p["clean_accuracy"] for p in s["curve"]], "--", lw=1, label="clean")
    chosen = next((p for p in s["curve"] if s["chosen"] is not None and p["alpha"] == s["chosen"]), None)
    if chosen:
        ax.plot([chosen["alpha"]], [100 * chosen["adversarial_accuracy"]], "*", ms=14, markeredgecolor="k",
                label=f"chosen: alpha {chosen['alpha']:g}")
    ax.set_xlabel("alpha (0: the original weights, 1: the fine-tuned ones)")
    ax.set_ylabel("accuracy on validation (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(Path(report["model"]).name)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_harden(report: dict, path: str | Path) -> None:
    """harden's own trade-off curve (its first round) and feature scores, drawn as sweep draws one score."""
    if not report.get("curve") or not report.get("scores"):
        raise CloakError("this harden report has no curve to plot (run harden with --plot)")
    score = report["score"]
    chosen = {"masked": report["masked"], "fraction": report["fraction"],
              "clean_accuracy": report["clean_accuracy"]["hardened"],
              "adversarial_accuracy": report["adversarial_accuracy"]["hardened_transfer"]}
    plot_sweep({"model": report["model"], "curves": {score: report["curve"]}, "scores": {score: report["scores"]},
                "chosen": {score: chosen}, "best": {"score": score}}, path)
