"""evaluate --resume: an interrupted evaluation continues where it stopped and reports exactly what an
uninterrupted one does; a file written for another run, or a damaged one, is refused clearly; the
file is replaced atomically."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cloakonnx.attacks import AttackConfig
from cloakonnx.backend import LocalBackend
from cloakonnx.cli import main
from cloakonnx.data import Dataset
from cloakonnx.errors import CloakError
from cloakonnx.evaluate import EvaluateConfig, evaluate
from cloakonnx.resume import data_identity, load

# 2 attacks x 2 eps, adaptive only (no reference): 4 rows; batches of 16 so a row has several
INDEPENDENT = dict(attacks=("fgsm", "pgd"), eps=(0.05, 0.1), attack=AttackConfig(steps=3, batch_size=16),
                   max_samples=60)
CUMULATIVE = dict(preset="fast", eps=(0.1,), max_samples=30, sanity=False)


def figures(report) -> dict:
    """Everything a report says but how long it took."""
    d = report.to_dict()
    d.pop("seconds"), d.pop("data_wait_seconds")
    return d


def count_survivors(monkeypatch, interrupt_at: int | None = None) -> list:
    """Patch the backend to record each row it runs ((attack, eps, samples attacked)), and to raise
    KeyboardInterrupt at row ``interrupt_at`` (1-based), as a Ctrl-C between two attacks would."""
    calls, original = [], LocalBackend.survivors

    def survivors(self, judge, crafter, attack, ds, *args, **kwargs):
        calls.append((attack.name, attack.eps, len(ds)))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(self, judge, crafter, attack, ds, *args, **kwargs)

    monkeypatch.setattr(LocalBackend, "survivors", survivors)
    return calls


def interrupt_crafting(monkeypatch, at: int) -> None:
    """Raise KeyboardInterrupt inside the ``at``-th crafting run, after its first batch."""
    calls, original = [], LocalBackend.craft_batches

    def craft_batches(self, *args, **kwargs):
        calls.append(1)
        batches = original(self, *args, **kwargs)
        if len(calls) != at:
            return batches

        def broken():
            yield next(batches)
            raise KeyboardInterrupt

        return broken()

    monkeypatch.setattr(LocalBackend, "craft_batches", craft_batches)


@pytest.fixture(scope="module")
def uninterrupted(digits_files):
    model, data = digits_files
    return figures(evaluate(model, data, EvaluateConfig(**INDEPENDENT)))


def test_a_run_killed_between_attacks_resumes_without_redoing_them(digits_files, uninterrupted, tmp_path,
                                                                   monkeypatch):
    model, data = digits_files
    state = tmp_path / "state.json"
    config = EvaluateConfig(**INDEPENDENT, resume=state)
    first = count_survivors(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, config)
    assert [c[:2] for c in first] == [("fgsm", 0.05), ("pgd", 0.05)]
    saved = json.loads(state.read_text())
    assert saved["done"] == [[0.05, "fgsm", "adaptive"]] and len(saved["results"]) == 1

    monkeypatch.undo()
    again = count_survivors(monkeypatch)
    assert figures(evaluate(model, data, config)) == uninterrupted
    assert [c[:2] for c in again] == [("pgd", 0.05), ("fgsm", 0.1), ("pgd", 0.1)]  # fgsm at 0.05 was not redone
    assert len(load(state).done) == 4

    monkeypatch.undo()
    done = count_survivors(monkeypatch)
    assert figures(evaluate(model, data, config)) == uninterrupted and done == []  # all done: the report again


def test_a_run_killed_inside_an_attack_resumes_identically(digits_files, uninterrupted, tmp_path, monkeypatch):
    model, data = digits_files
    state = tmp_path / "state.json"
    config = EvaluateConfig(**INDEPENDENT, resume=state)
    interrupt_crafting(monkeypatch, at=3)  # fgsm at 0.1, after its first batch of 16
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, config)
    assert [row[:2] for row in json.loads(state.read_text())["done"]] == [[0.05, "fgsm"], [0.05, "pgd"]]
    monkeypatch.undo()
    again = count_survivors(monkeypatch)
    assert figures(evaluate(model, data, config)) == uninterrupted
    assert [c[:2] for c in again] == [("fgsm", 0.1), ("pgd", 0.1)]


def test_a_cumulative_preset_resumes_identically(digits_files, tmp_path, monkeypatch):
    model, data = digits_files
    whole = count_survivors(monkeypatch)
    expected = figures(evaluate(model, data, EvaluateConfig(**CUMULATIVE)))
    assert expected["cumulative"] and [c[0] for c in whole] == ["apgd-ce", "apgd-t"]
    monkeypatch.undo()

    state = tmp_path / "state.json"
    config = EvaluateConfig(**CUMULATIVE, resume=state)
    count_survivors(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, config)
    monkeypatch.undo()
    again = count_survivors(monkeypatch)
    assert figures(evaluate(model, data, config)) == expected
    # APGD-T ran only on the points APGD-CE left robust, read back from the file: as many as before
    assert again == [whole[1]] and whole[1][2] < whole[0][2]


def test_a_different_run_is_refused_naming_what_differs(digits_files, tmp_path):
    model, data = digits_files
    state = tmp_path / "state.json"
    config = EvaluateConfig(**{**INDEPENDENT, "eps": (0.05,)}, sanity=False, resume=state)
    evaluate(model, data, config)
    before = state.read_text()
    with pytest.raises(CloakError, match=r"written for a different run: eps differs \(0\.05 in the file, "
                                         r"0\.05,0\.1 now\)"):
        evaluate(model, data, EvaluateConfig(**INDEPENDENT, sanity=False, resume=state))
    other = EvaluateConfig(**{**INDEPENDENT, "eps": (0.05,), "attack": AttackConfig(steps=4, batch_size=16)},
                           sanity=False, seed=1, resume=state)
    with pytest.raises(CloakError, match=r"attack\.steps differs \(3 in the file, 4 now\); seed differs"):
        evaluate(model, data, other)

    with np.load(data) as arrays:
        x, y = arrays["x"], arrays["y"].copy()
    y[0] = (y[0] + 1) % 10
    changed = tmp_path / "changed.npz"
    np.savez(changed, x=x, y=y)
    with pytest.raises(CloakError, match=r"data differs \(sha256:"):
        evaluate(model, changed, config)
    assert state.read_text() == before  # a refused run leaves the file alone


def test_a_damaged_file_is_refused(digits_files, tmp_path):
    model, data = digits_files
    state = tmp_path / "state.json"
    config = EvaluateConfig(**{**INDEPENDENT, "eps": (0.05,)}, sanity=False, resume=state)
    evaluate(model, data, config)
    text = state.read_text()
    for damaged in (text[: len(text) // 2], "[]", text.replace('"clean": "', '"clean": "!'),
                    text.replace('"version": 1', '"version": 99')):
        state.write_text(damaged)
        with pytest.raises(CloakError, match=r"--resume .*state\.json is damaged or not a resume file"):
            evaluate(model, data, config)
    # well-formed, but the model no longer predicts as the saved run did: refused, not silently mixed
    saved = json.loads(text)
    saved["clean"] = saved["survived"][0]["bits"]
    state.write_text(json.dumps(saved))
    with pytest.raises(CloakError, match="clean predictions differ from the saved run's"):
        evaluate(model, data, config)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_the_file_is_replaced_atomically(digits_files, tmp_path, monkeypatch, interruption):
    model, data = digits_files
    state = tmp_path / "state.json"
    config = EvaluateConfig(**{**INDEPENDENT, "eps": (0.05,)}, sanity=False, resume=state)
    real_replace, replaced = os.replace, []

    def failing_replace(src, dst):
        replaced.append(dst)
        if len(replaced) == 2:  # the save after the first row: the one at the start went through
            raise interruption("interrupted while saving")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt if interruption is KeyboardInterrupt else CloakError,
                       match="interrupted while saving"):
        evaluate(model, data, config)
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind
    assert load(state).done == [] and json.loads(state.read_text())["results"] == []  # the previous state, whole


def test_missing_file_starts_a_run_and_the_cli_continues_it(digits_files, tmp_path):
    model, data = digits_files
    state = tmp_path / "run.json"
    args = ["-q", "evaluate", str(model), "--data", str(data), "--attack", "fgsm", "--eps", "0.05", "--steps", "3",
            "--max-samples", "60", "--no-large-eps-check", "--json", "--resume", str(state)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert load(state).done == [(0.05, "fgsm", "adaptive")]
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["results"] == b["results"] and a["robust_accuracy"] == b["robust_accuracy"]
    refused = CliRunner().invoke(main, [*args[:-2], "--seed", "1", "--resume", str(state)])
    assert refused.exit_code == 1 and "was written for a different run: seed differs (0 in the file, 1 now)" \
        in refused.output
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{")
    result = CliRunner().invoke(main, [*args[:-2], "--resume", str(damaged)])
    assert result.exit_code == 1 and "is damaged or not a resume file" in result.output
    assert "Traceback" not in result.output


def test_data_identity_follows_the_data(tmp_path):
    x, y = np.zeros((4, 1, 2, 2), np.float32), np.arange(4)
    assert data_identity(Dataset(x, y), Dataset(x, y)) == data_identity(Dataset(x.copy(), y), Dataset(x.copy(), y))
    y2 = y.copy()
    y2[0] = 3
    assert data_identity(Dataset(x, y2), Dataset(x, y2)) != data_identity(Dataset(x, y), Dataset(x, y))
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"1")
    before = data_identity(tmp_path / "images", None)
    os.utime(folder / "a.png", ns=(1, 1))
    assert data_identity(tmp_path / "images", None) != before  # a file touched since: not the same data


def test_a_repeated_eps_runs_twice_as_before(digits_files, tmp_path):
    """Rows are recorded by their place in the run, so an eps given twice is attacked twice, as without --resume."""
    model, data = digits_files
    config = EvaluateConfig(attacks=("fgsm",), eps=(0.05, 0.05), attack=AttackConfig(steps=3), max_samples=30,
                            sanity=False)
    plain = figures(evaluate(model, data, config))
    assert [r["eps"] for r in plain["results"]] == [0.05, 0.05]
    assert figures(evaluate(model, data, EvaluateConfig(**{**config.__dict__, "resume": tmp_path / "s.json"}))) == plain
