"""Fine-tuned weights (harden --method finetune): only initializer values change, float16 and QDQ are
handled, alpha = 0 changes nothing, runs repeat under the seed, onnxruntime agrees with the executor,
the clean budget holds, and a torchvision export keeps its BatchNormalization nodes."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.attacks import AttackConfig
from cloakonnx.config import HardenConfig, LearnConfig
from cloakonnx.data import Preprocess, load_npz
from cloakonnx.errors import CloakError
from cloakonnx.finetune import finetune_weights, interpolate
from cloakonnx.graph import (find_head, initializer_values, inspect_model, load_model, trainable_initializers,
                             with_weight_inputs, with_weights)
from cloakonnx.harden import harden
from cloakonnx.runtime import make_session, run_batch

ATTACK = AttackConfig(name="pgd", eps=0.1, steps=3, seed=0)
FAST = LearnConfig(steps=6, batch_size=32, inner_steps=2)


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    (out,) = run_batch(make_session(model, ["CPUExecutionProvider"]), x, [model.graph.output[0].name])
    return out


def _bytes(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


@pytest.fixture(scope="module")
def trained(digits_files):
    """The fixture model, its data, its float weights and a short fine-tuning of all of them."""
    model = load_model(digits_files[0])
    data = load_npz(digits_files[1])
    names = trainable_initializers(model, "all")
    result = finetune_weights(model, names, find_head(model).logits, Preprocess(), data, ATTACK, FAST, seed=1)
    return model, data, names, result


def test_only_initializer_values_change(trained):
    model, _, names, result = trained
    new = with_weights(model, interpolate(result.start, result.values, 1.0))
    onnx.checker.check_model(new)
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert [(t.name, t.data_type, list(t.dims)) for t in new.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]
    assert new.opset_import == model.opset_import and new.metadata_props == model.metadata_props
    assert new.graph.input == model.graph.input and new.graph.output == model.graph.output
    before, after = _bytes(model), _bytes(new)
    assert {n for n in before if before[n] != after[n]} == set(names)


def test_parameter_sets_pick_linear_and_head_weights(trained):
    model, _, names, _ = trained
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert trainable_initializers(model, "head") == [gemm.input[1], gemm.input[2]]
    convs = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert set(convs) <= set(names) and set(trainable_initializers(model, "head")) <= set(names)
    with pytest.raises(CloakError, match="norm"):
        trainable_initializers(model, "norm")  # the export folded its BatchNorms into the convolutions


def _tiny_gemm(dtype: int) -> onnx.ModelProto:
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np_dtype), "W")
    b = numpy_helper.from_array(rng.normal(size=(3,)).astype(np_dtype), "B")
    graph = helper.make_graph([helper.make_node("Gemm", ["X", "W", "B"], ["Y"], name="head")], "tiny",
                              [helper.make_tensor_value_info("X", dtype, ["n", 4])],
                              [helper.make_tensor_value_info("Y", dtype, ["n", 3])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float16_weights_come_back_float16():
    model = _tiny_gemm(TensorProto.FLOAT16)
    names = trainable_initializers(model)
    w0 = initializer_values(model, names)
    assert names == ["W", "B"] and all(v.dtype == np.float32 for v in w0.values())
    new = with_weights(model, {n: v * 2 for n, v in w0.items()})
    onnx.checker.check_model(new)
    assert [t.data_type for t in new.graph.initializer] == [TensorProto.FLOAT16] * 2
    np.testing.assert_array_equal(numpy_helper.to_array(new.graph.initializer[0]), (w0["W"] * 2).astype(np.float16))
    assert _bytes(with_weights(model, w0)) == _bytes(model)  # float16 -> float32 -> float16 is exact
    inputs = with_weight_inputs(model, names)
    onnx.checker.check_model(inputs)
    assert [i.name for i in inputs.graph.input] == ["X", "W", "B"] and not inputs.graph.initializer


def _as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer held by a Constant node instead, as Paddle's exporter writes them."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in out.graph.initializer]
    nodes = consts + list(out.graph.node)
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_weights_in_constant_nodes_are_trained_and_written_back(trained):
    model, data, names, result = trained
    consts = _as_constants(model)
    assert not consts.graph.initializer and trainable_initializers(consts, "all") == names
    again = finetune_weights(consts, names, find_head(model).logits, Preprocess(), data, ATTACK, FAST, seed=1)
    assert all(again.values[n].tobytes() == result.values[n].tobytes() for n in names)
    values = interpolate(result.start, result.values, 1.0)
    new = with_weights(consts, values)
    onnx.checker.check_model(new)
    assert [n.name for n in new.graph.node] == [n.name for n in consts.graph.node] and not new.graph.initializer
    x = np.asarray(data.x[:32])
    np.testing.assert_allclose(_logits(new, x), _logits(with_weights(model, values), x), atol=1e-5)


def test_quantized_and_integer_weights_are_refused_by_name():
    q = numpy_helper.from_array(np.ones((4, 3), np.int8), "W_quantized")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "W_scale")
    nodes = [helper.make_node("DequantizeLinear", ["W_quantized", "W_scale"], ["W"], name="dq"),
             helper.make_node("Gemm", ["X", "W"], ["Y"], name="head")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 3])], [q, scale])
    with pytest.raises(CloakError, match="'W_quantized'.*QDQ"):
        trainable_initializers(helper.make_model(graph))
    nodes = [helper.make_node("MatMulInteger", ["X", "W_int"], ["Y"], name="mm")]
    graph = helper.make_graph(nodes, "int", [helper.make_tensor_value_info("X", TensorProto.UINT8, ["n", 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, ["n", 3])],
                              [numpy_helper.from_array(np.ones((4, 3), np.uint8), "W_int")])
    with pytest.raises(CloakError, match="'W_int'.*quantized"):
        trainable_initializers(helper.make_model(graph))


def test_alpha_zero_gives_the_original_bytes(trained):
    model, _, _, result = trained
    assert not all(np.array_equal(result.start[n], result.values[n]) for n in result.start)
    assert _bytes(with_weights(model, interpolate(result.start, result.values, 0.0))) == _bytes(model)


def test_finetuning_repeats_under_the_seed(trained):
    model, data, names, result = trained
    again = finetune_weights(model, names, find_head(model).logits, Preprocess(), data, ATTACK, FAST, seed=1)
    assert all(again.values[n].tobytes() == result.values[n].tobytes() for n in names)
    assert again.history == result.history


def test_onnxruntime_agrees_with_the_executor_on_new_weights(trained):
    import torch

    from cloakonnx.torch_exec import OnnxTorchModule

    model, data, names, result = trained
    values = interpolate(result.start, result.values, 1.0)
    x = np.asarray(data.x[:64])
    module = OnnxTorchModule(with_weight_inputs(model, names), outputs=[find_head(model).logits]).eval()
    feeds = {"input": torch.from_numpy(x), **{n: torch.from_numpy(v) for n, v in values.items()}}
    with torch.no_grad():
        ours = module(*[feeds[n] for n in module.input_names]).numpy()
    assert np.abs(ours - _logits(with_weights(model, values), x)).max() < 1e-4


def test_harden_finetune_holds_the_budget_and_records_it(digits_files, tmp_path):
    model, data = digits_files
    out = tmp_path / "ft.onnx"
    report = harden(model, data, HardenConfig(output=out, attack=ATTACK, method="finetune", seed=0, max_clean_drop=1.0,
                                              budget_confidence=0, learn=LearnConfig(steps=20, batch_size=64,
                                                                                     inner_steps=2)))
    learning, curve = report.learning, report.curve
    assert learning["method"] == "finetune" and learning["lr"] == 1e-3 and [p["alpha"] for p in curve][0] == 0.0
    assert learning["alpha"] is not None and report.mask_added, curve
    original, written = load_model(model), load_model(out)
    chosen = next(p for p in curve if p["alpha"] == learning["alpha"])
    assert 100 * (report.clean_accuracy["original"] - chosen["clean_accuracy"]) <= 1.0 + 1e-9
    assert chosen["adversarial_accuracy"] > report.adversarial_accuracy["original"]
    assert report.clean_accuracy["hardened"] == chosen["clean_accuracy"]
    meta = {p.key: p.value for p in written.metadata_props}
    record = json.loads(meta["cloakonnx.finetune"])
    assert meta["cloakonnx.method"] == "finetune" and record["alpha"] == learning["alpha"]
    assert record["validation_samples"] == report.samples["validation"] and record["params"] == "all"
    assert set(record["relative_change"]) == set(trainable_initializers(original, "all"))
    assert json.loads(meta["cloakonnx.history"])[-1]["method"] == "finetune"
    assert inspect_model(out).method == "finetune"

    # re-hardening the fine-tuned model with a mask: the mask goes on the new weights, the history keeps both
    masked = tmp_path / "ft-masked.onnx"
    again = harden(out, data, HardenConfig(output=masked, attack=ATTACK, score="absdiff", fraction=0.05, seed=0))
    assert again.mask_added and again.clean_accuracy["original"] == report.clean_accuracy["hardened"]
    history = json.loads({p.key: p.value for p in load_model(masked).metadata_props}["cloakonnx.history"])
    assert [h.get("method", "mask") for h in history] == ["finetune", "mask"]
    assert len(inspect_model(masked).masks) == 1
    after, before = _bytes(load_model(masked)), _bytes(written)
    assert all(after[name] == value for name, value in before.items() if name in after)  # the new weights stay


def test_no_gain_within_the_budget_no_change(digits_files, tmp_path):
    """A zero-point budget with a confidence bound admits no change: the model is written as it was."""
    model, data = digits_files
    out = tmp_path / "same.onnx"
    report = harden(model, data, HardenConfig(output=out, attack=ATTACK, method="finetune", max_clean_drop=0.0,
                                              learn=LearnConfig(steps=4, batch_size=32, inner_steps=1)))
    assert report.learning["alpha"] is None and not report.mask_added
    written, original = load_model(out), load_model(model)
    assert _bytes(written) == _bytes(original) and "cloakonnx.method" not in {p.key for p in written.metadata_props}
    assert report.clean_accuracy["hardened"] == report.clean_accuracy["original"]


def test_mask_only_options_refuse_finetune():
    from cloakonnx.config import MaskConfig

    MaskConfig(method="finetune").validate()  # sweep --method finetune draws the alpha curve
    with pytest.raises(CloakError, match="--method"):
        MaskConfig(method="prune").validate()
    with pytest.raises(CloakError, match="--fold"):
        HardenConfig(method="finetune", fold=True).validate()
    with pytest.raises(CloakError, match="--finetune-params"):
        HardenConfig(method="finetune", finetune_params="bias").validate()
    assert LearnConfig().lr_for("mask") == 0.1 and LearnConfig().lr_for("finetune") == 1e-3


def test_a_torchvision_export_keeps_its_batchnorms(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import warnings

    from cloakonnx.data import Dataset

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(24, 3, 32, 32)
    with torch.no_grad():
        y = net(x).argmax(1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PRESERVE: the exporter keeps eval-mode BatchNorm nodes
        torch.onnx.export(net, (x[:2],), str(tmp_path / "r18.onnx"), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    model = load_model(tmp_path / "r18.onnx")
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bns, "the export should keep BatchNormalization"
    names = trainable_initializers(model, "norm")
    made_by = {o: n for n in model.graph.node for o in n.output}
    stored = {made_by[i].input[0] if i in made_by else i for n in bns for i in n.input[1:3]}  # Identity: shared
    assert set(names) == stored and len(names) < 2 * len(bns)
    result = finetune_weights(model, names, "logits", Preprocess(), Dataset(x.numpy(), y.astype(np.int64)),
                              AttackConfig(name="pgd", eps=2 / 255, steps=1, seed=0),
                              LearnConfig(steps=2, batch_size=8, inner_steps=1, lr=1e-2), seed=0)
    new = with_weights(model, interpolate(result.start, result.values, 1.0))
    onnx.checker.check_model(new)
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in model.graph.node]
    before, after = _bytes(model), _bytes(new)
    assert {n for n in before if before[n] != after[n]} == set(names)
    assert np.isfinite(_logits(new, x.numpy()[:4])).all()


def test_sweep_finetune_shows_every_alpha_and_writes_nothing(digits_files, tmp_path):
    from click.testing import CliRunner

    from cloakonnx.cli import main

    model, data = digits_files
    before = sorted(p.name for p in model.parent.iterdir())
    result = CliRunner().invoke(main, ["-q", "sweep", str(model), "--data", str(data), "--method", "finetune", "--eps",
                                       "0.1", "--steps", "3", "--learn-steps", "6", "--learn-batch", "32", "--json",
                                       "--plot", str(tmp_path / "alpha.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    curve = report["strength"]["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    assert curve[0]["adversarial_accuracy"] == report["adversarial_accuracy"]
    assert curve[0]["clean_accuracy"] == report["clean_accuracy"]
    assert report["strength"]["chosen"] in [None] + [p["alpha"] for p in curve]
    assert (tmp_path / "alpha.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in model.parent.iterdir()) == before  # no model written
    from cloakonnx.report import format_sweep

    text = format_sweep(report)
    assert "fine-tuned weights" in text and "strength (* chosen)" in text and "budget of 1 points" in text


def test_a_step_size_that_makes_the_loss_rise_is_given_up(trained, monkeypatch):
    """At the default step size, a loss that rises over the first 20 steps starts the run again from
    the original weights, 10 times smaller: exactly the run that step size gives when asked for."""
    from cloakonnx.config import DEFAULT_LR, FINETUNE

    model, data, names, _ = trained
    monkeypatch.setitem(DEFAULT_LR, FINETUNE, 30.0)  # wrecks the weights at once
    cfg = LearnConfig(steps=22, batch_size=32, inner_steps=1, stop_loss=0)
    backed = finetune_weights(model, names, find_head(model).logits, Preprocess(), data, ATTACK, cfg, seed=2)
    assert backed.rose and backed.rose[0] == 30.0 and backed.lr == 30.0 / 10 ** len(backed.rose)
    asked = finetune_weights(model, names, find_head(model).logits, Preprocess(), data, ATTACK,
                             LearnConfig(steps=22, batch_size=32, inner_steps=1, stop_loss=0, lr=backed.lr), seed=2)
    assert not asked.rose and asked.history == backed.history
    assert all(asked.values[n].tobytes() == backed.values[n].tobytes() for n in names)


def test_a_given_step_size_is_kept_and_learning_stops_when_nothing_is_left(trained):
    model, data, names, _ = trained
    kept = finetune_weights(model, names, find_head(model).logits, Preprocess(), data, ATTACK,
                            LearnConfig(steps=22, batch_size=32, inner_steps=1, lr=30.0, stop_loss=0), seed=2)
    assert kept.rose == [] and kept.lr == 30.0 and kept.steps == 22
    stopped = finetune_weights(model, names, find_head(model).logits, Preprocess(), data, ATTACK,
                               LearnConfig(steps=40, batch_size=32, inner_steps=1, stop_loss=100.0), seed=2)
    assert stopped.steps == 10 and len(stopped.history) == 1


def test_learning_stops_once_the_inner_attack_turns_no_held_out_sample(trained):
    """The early stop on held-out data: an attack too small to turn anything stops learning at the
    first check; at the run's eps it turns samples, every step runs, and the check's own generator
    leaves that run identical to one without it."""
    model, data, names, _ = trained
    logits, held_out = find_head(model).logits, data.subset(np.arange(len(data) - 100, len(data)))

    def tune(attack, every, lr=None):
        return finetune_weights(model, names, logits, Preprocess(), data, attack,
                                LearnConfig(steps=12, batch_size=32, inner_steps=1, stop_loss=0, stop_every=every,
                                            lr=lr), seed=2, watch=held_out)

    tiny = tune(AttackConfig(name="pgd", eps=1e-5, steps=3, seed=0), 4, lr=1e-6)  # weights barely move
    assert (tiny.steps, tiny.stopped_by) == (4, "validation")
    watched, unwatched = tune(ATTACK, 4), tune(ATTACK, 0)
    assert (watched.steps, watched.stopped_by) == (12, None) == (unwatched.steps, unwatched.stopped_by)
    assert all(watched.values[n].tobytes() == unwatched.values[n].tobytes() for n in names)


def test_a_wrecked_model_does_not_pass_the_early_stop(trained):
    """A step size that wrecks the weights leaves few right and nothing for the attack to flip; the
    stop counts survivors against the clean count before learning, so it runs on."""
    model, data, names, _ = trained
    wrecked = finetune_weights(model, names, find_head(model).logits, Preprocess(), data,
                               AttackConfig(name="pgd", eps=1e-5, steps=3, seed=0),
                               LearnConfig(steps=8, batch_size=32, inner_steps=1, stop_loss=0, stop_every=4, lr=30.0),
                               seed=2, watch=data.subset(np.arange(len(data) - 100, len(data))))
    new = with_weights(model, interpolate(wrecked.start, wrecked.values, 1.0))
    assert (_logits(new, data.x[-100:]).argmax(1) == data.y[-100:]).mean() < 0.5  # wrecked indeed
    assert (wrecked.steps, wrecked.stopped_by) == (8, None)


def test_the_early_stop_is_reported(digits_files, tmp_path):
    out = tmp_path / "ft.onnx"
    report = harden(digits_files[0], digits_files[1], HardenConfig(
        output=out, method="finetune", attack=AttackConfig(name="pgd", eps=1e-5, steps=2, seed=0),
        learn=LearnConfig(steps=30, batch_size=32, inner_steps=1, stop_loss=0, stop_every=5))).to_dict()
    assert report["learning"]["steps"] == 5 and report["learning"]["stopped_by"] == "validation"
    from cloakonnx.report import format_harden

    assert "stopped early: as many held-out samples survive the inner attack as were right before" in format_harden(report)


def test_a_collapse_of_held_out_clean_accuracy_gives_the_step_size_up():
    """PP-LCNet at 1e-3: the probe's loss fell (every prediction unsure) while the held-out clean
    accuracy went from 128 of 128 to 62; the rise check gives such a step size up, not a small dip."""
    from cloakonnx.learn import RISE_CHECK_STEP, EarlyStop, StepTooLarge

    def stop_with(right_now):
        stop = EarlyStop.__new__(EarlyStop)  # the decision alone, with stand-in probes
        held_out = lambda attacked=True: (0.0, 0, right_now)  # noqa: E731
        held_out.size = 128
        stop.steps, stop.stop_below, stop.every, stop.held_out, stop.right, stop.target = 300, None, 25, held_out, 128, 127
        stop.probe, stop.before = (lambda: (1.0, 0, 0)), 4.0  # the probe batch's loss fell from 4.0 to 1.0
        return stop

    with pytest.raises(StepTooLarge, match=r"clean accuracy on 128 held-out samples fell from 100.0% to 48.4%"):
        stop_with(62).after(RISE_CHECK_STEP, [1.0] * RISE_CHECK_STEP, "fine-tuning")
    assert stop_with(110).after(RISE_CHECK_STEP, [1.0] * RISE_CHECK_STEP, "fine-tuning") is None
