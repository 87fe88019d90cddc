"""cloakonnx evaluate: threat models, worst case, sanity checks, and a cross-check against torchattacks."""
import json

import numpy as np
import pytest
import torch

from cloakonnx.attacks import AttackConfig
from cloakonnx.data import Dataset
from cloakonnx.evaluate import EvaluateConfig, evaluate, sanity_checks


@pytest.fixture(scope="module")
def hardened_model(digits_files, tmp_path_factory):
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.harden import HardenConfig, harden

    out = tmp_path_factory.mktemp("eval") / "h.onnx"
    harden(digits_files[0], digits_files[1], HardenConfig(output=out, attack=AttackConfig(name="fgsm", eps=0.1),
                                                          fraction=0.1, adaptive=False))
    return out


def test_evaluate_threat_models_and_checks(digits_files, hardened_model, tmp_path):
    config = EvaluateConfig(attacks=("fgsm", "pgd", "square"), eps=(0.05, 0.15),
                            attack=AttackConfig(steps=5, queries=100),
                            reference=digits_files[0], max_samples=150)
    report = evaluate(hardened_model, digits_files[1], config).to_dict()
    threats = {(r["attack"], r["threat"]) for r in report["results"]}
    assert threats == {("fgsm", "adaptive"), ("fgsm", "transfer"), ("pgd", "adaptive"), ("pgd", "transfer"),
                       ("square", "gradient-free")}
    assert report["samples"] == 150 and report["clean_accuracy"] > 0.9
    for eps in ("0.05", "0.15"):
        worst = min(r["accuracy"] for r in report["results"] if repr(r["eps"]) == eps)
        assert report["robust_accuracy"][eps] <= worst  # worst case per sample is no better than any attack
    assert report["robust_accuracy"]["0.15"] < report["robust_accuracy"]["0.05"]
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    assert len(report["checks"]) == 4
    from cloakonnx.report import format_evaluate, plot_evaluate

    assert "robust (worst case per sample)" in format_evaluate(report)
    plot_evaluate(report, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 10_000


def test_sanity_checks_flag_suspicious_results():
    results = [{"eps": 0.1, "attack": "pgd", "threat": "adaptive", "accuracy": 0.6},
               {"eps": 0.2, "attack": "pgd", "threat": "adaptive", "accuracy": 0.8},  # rises with eps
               {"eps": 0.1, "attack": "square", "threat": "gradient-free", "accuracy": 0.3}]  # beats white-box
    checks = {c["name"]: c["ok"] for c in sanity_checks(results, {}, 0.99, 1000)}
    assert checks["accuracy falls as eps grows"] is False
    assert checks["white-box is no weaker than transfer or gradient-free"] is False
    assert checks["no attack beats clean accuracy"] is True


def test_pgd_agrees_with_torchattacks(digits_net, digits_files):
    """Independent implementation: torchattacks' PGD on the native torch module with the same weights."""
    torchattacks = pytest.importorskip("torchattacks")
    net, held = digits_net
    x, y = held.x[:300], held.y[:300]
    eps, steps = 0.1, 10
    alpha = 2.5 * eps / steps
    ours = evaluate(digits_files[0], Dataset(x, y), EvaluateConfig(attacks=("pgd",), eps=(eps,), attack=AttackConfig(steps=steps),
                                                                    sanity=False)).to_dict()
    ours_acc = ours["results"][0]["accuracy"]
    atk = torchattacks.PGD(net.eval(), eps=eps, alpha=alpha, steps=steps, random_start=True)
    atk.set_device("cpu") if hasattr(atk, "set_device") else None
    torch.manual_seed(0)
    adv = atk(torch.from_numpy(x), torch.from_numpy(y))
    with torch.no_grad():
        theirs_acc = float((net(adv).argmax(1).numpy() == y).mean())
    assert abs(ours_acc - theirs_acc) <= 0.02, (ours_acc, theirs_acc)
    assert ours_acc < ours["clean_accuracy"] - 0.1  # and the attack is a real one


def test_cli_evaluate_json_and_preset_validation(digits_files, tmp_path):
    from click.testing import CliRunner

    from cloakonnx.cli import main

    r = CliRunner().invoke(main, ["-q", "evaluate", str(digits_files[0]), "--data", str(digits_files[1]),
                                  "--attack", "fgsm", "--eps", "0.02,0.1", "--max-samples", "64", "--json",
                                  "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["eps"] == [0.02, 0.1] and json.loads((tmp_path / "r.json").read_text())["samples"] == 64
    r = CliRunner().invoke(main, ["evaluate", str(digits_files[0]), "--data", str(digits_files[1]), "--attack", "nope"])
    assert r.exit_code == 1 and "unknown attack" in r.output
