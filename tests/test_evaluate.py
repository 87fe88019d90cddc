"""cloakonnx evaluate: threat models, worst case, sanity checks, and a cross-check against torchattacks."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cloakonnx.attacks import AttackConfig
from cloakonnx.data import Dataset
from cloakonnx.evaluate import EvaluateConfig, evaluate
from cloakonnx.sanity import sanity_checks


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
    # The white-box check is left out: on this masked model at eps 0.15 the adaptive PGD and the transfer
    # one sit at the check's tolerance (one torch thread instead of two moved adaptive PGD-5 from passing
    # to 19.3% against 16.7%, and PGD-10 to 17.3% against 14.0%): the mask's known weakening of gradients,
    # which is what the check reports. The test below makes it fail on purpose.
    assert all(c["ok"] for c in report["checks"] if not c["name"].startswith("white-box")), report["checks"]
    assert len(report["checks"]) == 6  # 3 on the results, 2 on the model (randomness, zero gradients), large eps
    from cloakonnx.plots import plot_evaluate
    from cloakonnx.report import format_evaluate

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
    """Independent implementation: torchattacks' PGD on the native torch module with the same weights.
    Both start at the clean input: two random starts drawn by different generators left 9 of 300 digits
    apart (3 points) on this machine, which says nothing about either implementation."""
    torchattacks = pytest.importorskip("torchattacks")
    net, held = digits_net
    x, y = held.x[:300], held.y[:300]
    eps, steps = 0.1, 10
    alpha = 2.5 * eps / steps
    ours = evaluate(digits_files[0], Dataset(x, y), EvaluateConfig(
        attacks=("pgd",), eps=(eps,), attack=AttackConfig(steps=steps, random_start=False), sanity=False)).to_dict()
    ours_acc = ours["results"][0]["accuracy"]
    atk = torchattacks.PGD(net.eval(), eps=eps, alpha=alpha, steps=steps, random_start=False)
    atk.set_device("cpu") if hasattr(atk, "set_device") else None
    torch.manual_seed(0)
    adv = atk(torch.from_numpy(x), torch.from_numpy(y))
    with torch.no_grad():
        theirs_acc = float((net(adv).argmax(1).numpy() == y).mean())
    assert abs(ours_acc - theirs_acc) <= 0.02 + 1e-9, (ours_acc, theirs_acc)
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


def _two_class_model(path, tmp_path):
    """The digits model cut to its first two logits: a real 2-class classifier (labels 0 and 1)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    out = model.graph.output[0]
    model.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "s0"),
                                    numpy_helper.from_array(np.array([2], np.int64), "s2"),
                                    numpy_helper.from_array(np.array([1], np.int64), "ax")])
    model.graph.node.append(helper.make_node("Slice", [out.name + "_all", "s0", "s2", "ax"], [out.name]))
    for node in model.graph.node[:-1]:
        node.output[:] = [out.name + "_all" if o == out.name else o for o in node.output]
    out.type.tensor_type.shape.dim[1].dim_value = 2
    two = tmp_path / "two.onnx"
    onnx.save(model, str(two))
    return two


def test_two_classes_skip_dlr_attacks_with_a_note_and_keep_the_rest(digits_files, tmp_path):
    """A 2-class model: APGD-DLR and APGD-T cannot run; they are skipped and said so, nothing is lost."""
    two = _two_class_model(digits_files[0], tmp_path)
    d = np.load(digits_files[1])
    keep = d["y"] < 2
    data = Dataset(d["x"][keep][:60], d["y"][keep][:60])
    config = EvaluateConfig(attacks=("apgd-ce", "apgd-dlr", "apgd-t"), eps=(0.1,), attack=AttackConfig(steps=5),
                            sanity=False)
    report = evaluate(two, data, config).to_dict()
    assert [r["attack"] for r in report["results"]] == ["apgd-ce"]
    assert any("apgd-dlr was skipped" in n and "2" in n for n in report["notes"])
    assert any("apgd-t was skipped" in n for n in report["notes"])
    assert report["failures"] == [] and report["robust_accuracy"]["0.1"] <= report["clean_accuracy"]


def test_a_failing_attack_keeps_the_others_and_exits_3(digits_files, tmp_path, monkeypatch):
    """One attack that fails (here: out of memory the retry cannot cure) is named; the others' results stay."""
    from click.testing import CliRunner

    from cloakonnx.backend import LocalBackend
    from cloakonnx.cli import main
    from cloakonnx.errors import CloakError

    real = LocalBackend.craft_batches

    def craft_batches(self, runner, cfg, ds, device, desc, batch):
        if cfg.name == "pgd":
            raise CloakError("cpu ran out of memory attacking a batch of 1")
        return real(self, runner, cfg, ds, device, desc, batch)

    monkeypatch.setattr(LocalBackend, "craft_batches", craft_batches)
    result = CliRunner().invoke(main, ["-q", "evaluate", str(digits_files[0]), "--data", str(digits_files[1]),
                                       "--attack", "fgsm,pgd", "--eps", "0.1", "--max-samples", "40", "--json"])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert [r["attack"] for r in report["results"]] == ["fgsm"]
    assert report["failures"][0] == {"eps": 0.1, "attack": "pgd", "threat": "adaptive",
                                     "error": "cpu ran out of memory attacking a batch of 1"}
    assert [f["threat"] for f in report["failures"]] == ["adaptive", "sanity: large eps"]
    assert any("upper bound" in n for n in report["notes"])


def test_fast_preset_runs_apgd_ce_and_apgd_t(digits_files):
    report = evaluate(digits_files[0], digits_files[1], EvaluateConfig(preset="fast", eps=(0.1,), max_samples=30,
                                                                      sanity=False)).to_dict()
    assert [r["attack"] for r in report["results"]] == ["apgd-ce", "apgd-t"]
    assert report["attacks"]["apgd-t"]["steps"] == 100
    worst = min(r["accuracy"] for r in report["results"])
    assert report["robust_accuracy"]["0.1"] <= worst


def record_crafted_sizes(monkeypatch) -> list:
    """A list that gets (attack, samples crafted on) for each attack run, as the backend crafts it."""
    from cloakonnx.backend import LocalBackend

    sizes = []
    real = LocalBackend.craft_batches

    def craft_batches(self, runner, cfg, ds, device, desc, batch):
        sizes.append((cfg.name, len(ds)))
        return real(self, runner, cfg, ds, device, desc, batch)

    monkeypatch.setattr(LocalBackend, "craft_batches", craft_batches)
    return sizes


def test_standard_preset_is_autoattacks_run_on_the_points_still_robust(digits_files, monkeypatch):
    """APGD-CE, APGD-T, FAB-T, Square-5000 in that order, each crafted only on the points the ones before
    left robust: every row is the robust accuracy so far, and the last one is the worst case."""
    sizes = record_crafted_sizes(monkeypatch)
    report = evaluate(digits_files[0], digits_files[1], EvaluateConfig(preset="standard", eps=(0.1,), max_samples=40,
                                                                      sanity=False)).to_dict()
    rows = [r["accuracy"] for r in report["results"]]
    assert [r["attack"] for r in report["results"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert report["attacks"]["square"]["queries"] == 5000 and report["attacks"]["fab-t"]["steps"] == 100
    assert rows == sorted(rows, reverse=True) and rows[-1] == report["robust_accuracy"]["0.1"] and report["cumulative"]
    n = report["samples"]
    assert sizes[0] == ("apgd-ce", round(report["clean_accuracy"] * n))
    assert [s for _, s in sizes[1:]] == [round(r * n) for r in rows[:-1]], (sizes, rows)


def test_cumulative_attack_list_runs_later_attacks_on_survivors_with_the_same_worst_case(digits_files, monkeypatch):
    """--cumulative: each --attack only on the points still robust after the ones before. The worst case per
    sample is that of the list run on every sample (each sample's randomness is its own, not its batch's),
    and the later attack crafts on fewer samples."""
    sizes = record_crafted_sizes(monkeypatch)
    config = EvaluateConfig(attacks=("fgsm", "pgd"), eps=(0.1,), attack=AttackConfig(steps=5), max_samples=60,
                            sanity=False)
    every = evaluate(digits_files[0], digits_files[1], config).to_dict()
    every_sizes, sizes[:] = list(sizes), []
    survivors = evaluate(digits_files[0], digits_files[1], replace(config, cumulative=True)).to_dict()
    assert not every["cumulative"] and survivors["cumulative"]
    assert survivors["robust_accuracy"] == every["robust_accuracy"], (survivors["results"], every["results"])
    n = every["samples"]
    assert every_sizes == [("fgsm", n), ("pgd", n)]
    fgsm_row = survivors["results"][0]["accuracy"]
    assert fgsm_row == every["results"][0]["accuracy"] < every["clean_accuracy"]
    assert sizes == [("fgsm", round(every["clean_accuracy"] * n)), ("pgd", round(fgsm_row * n))], sizes
    assert survivors["results"][1]["accuracy"] == survivors["robust_accuracy"]["0.1"]


@pytest.mark.slow
def test_plus_preset_is_autoattacks_plus_version(digits_files):
    """AutoAttack's plus version: APGD-CE, APGD-DLR, untargeted FAB (5 restarts each), APGD-T, FAB-T, with
    Square moved after the white-box attacks (the order every preset keeps); no weaker than standard."""
    config = EvaluateConfig(preset="plus", eps=(0.1,), max_samples=24, sanity=False)
    report = evaluate(digits_files[0], digits_files[1], config).to_dict()
    assert [r["attack"] for r in report["results"]] == ["apgd-ce", "apgd-dlr", "fab", "apgd-t", "fab-t", "square"]
    settings = report["attacks"]
    assert [settings[a]["restarts"] for a in ("apgd-ce", "apgd-dlr", "fab", "apgd-t", "fab-t")] == [5, 5, 5, 1, 1]
    assert settings["square"]["queries"] == 5000 and all(settings[a]["steps"] == 100 for a in ("fab", "fab-t"))
    standard = evaluate(digits_files[0], digits_files[1], replace(config, preset="standard")).to_dict()
    assert report["robust_accuracy"]["0.1"] <= standard["robust_accuracy"]["0.1"]


def _with_nodes(path, tmp_path, name, make):
    """A copy of the model whose logits pass through the nodes ``make(logits_in, logits_out)`` returns."""
    import onnx

    model = onnx.load(str(path))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [out + "_raw" if o == out else o for o in node.output]
    model.graph.node.extend(make(out + "_raw", out, model))
    onnx.checker.check_model(model)
    dest = tmp_path / name
    onnx.save(model, str(dest))
    return dest


def test_probability_outputs_are_attacked_on_the_logits(digits_files, tmp_path):
    """A model ending in Softmax is attacked through its pre-Softmax tensor: the same robust accuracy as
    the model without the Softmax, and the report says so."""
    from onnx import helper

    soft = _with_nodes(digits_files[0], tmp_path, "soft.onnx",
                       lambda i, o, m: [helper.make_node("Softmax", [i], [o], axis=1)])
    config = EvaluateConfig(attacks=("pgd",), eps=(0.1,), attack=AttackConfig(steps=5), max_samples=80, sanity=False)
    with_softmax = evaluate(soft, digits_files[1], config).to_dict()
    plain = evaluate(digits_files[0], digits_files[1], config).to_dict()
    assert with_softmax["results"] == plain["results"]
    assert with_softmax["robust_accuracy"] == plain["robust_accuracy"]
    assert with_softmax["robust_accuracy"]["0.1"] < with_softmax["clean_accuracy"]
    assert any("holds probabilities" in n and "pre-Softmax" in n for n in with_softmax["notes"])
    assert not any("probabilities" in n for n in plain["notes"])
    referenced = evaluate(soft, digits_files[1], replace(config, reference=soft)).to_dict()
    assert sum("holds probabilities" in n for n in referenced["notes"]) == 1  # the model and its reference: once


def test_zero_gradients_and_randomness_fail_their_checks(digits_files, tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    def flat(i, o, m):  # logits that do not depend on the input: every input gradient is exactly zero
        m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 10), np.float32), "zero"))
        return [helper.make_node("Mul", [i, "zero"], [o])]

    def noisy(i, o, m):  # a randomised forward pass
        return [helper.make_node("RandomUniformLike", [i], [i + "_noise"], dtype=onnx.TensorProto.FLOAT),
                helper.make_node("Add", [i, i + "_noise"], [o])]

    config = EvaluateConfig(attacks=("fgsm",), eps=(0.1,), max_samples=40, sanity=False)
    checks = {c["name"]: c for c in evaluate(_with_nodes(digits_files[0], tmp_path, "flat.onnx", flat),
                                             digits_files[1], config).checks}
    assert not checks["input gradients are non-zero"]["ok"] and "100.0%" in checks["input gradients are non-zero"]["detail"]
    report = evaluate(_with_nodes(digits_files[0], tmp_path, "noisy.onnx", noisy), digits_files[1], config)
    checks = {c["name"]: c["ok"] for c in report.checks}
    assert checks["the same input gives the same output"] is False and report.summary["unreliable"] is True


def test_the_zero_gradient_check_runs_in_attack_sized_batches(digits_files):
    """200 samples in one backward pass would hold every activation of a large model at once."""
    from cloakonnx.data import load_data
    from cloakonnx.graph import load_model, logits_output
    from cloakonnx.runner import Runner
    from cloakonnx.sanity import model_checks

    model = load_model(digits_files[0])
    runner = Runner.for_config(model, logits_output(model, None), [], EvaluateConfig(), "cpu")
    sizes = []
    inner = runner.torch_model
    runner.torch_model = lambda x: (sizes.append(len(x)), inner(x))[1]
    ds = load_data(digits_files[1])
    checks = {c["name"]: c["ok"] for c in model_checks(runner, ds, batch=64)}
    assert sizes == [64, 64, 64, 8] and checks["input gradients are non-zero"]
