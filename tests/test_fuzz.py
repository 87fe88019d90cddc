"""Property-based fuzzing (hypothesis): random small classifiers through ``harden``, malformed data files
through the loaders. The contract under test: every input either succeeds with a correct result or
raises :class:`CloakError`; any other exception is a bug.

Function-scoped ``tmp_path`` is shared by every example of one hypothesis test, so each example makes
its own ``tempfile.TemporaryDirectory``. Examples are kept few and small so the module runs in well
under a minute on two cores.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.data import Dataset, load_data, load_npz, validate
from cloakonnx.errors import CloakError

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=True, phases=[Phase.explicit, Phase.generate, Phase.shrink], report_multiple_bugs=False)


# CLOAKONNX_FUZZ_SCALE=20 runs 20x the examples with fresh randomness (a longer hunt than CI's fixed set).
SCALE = max(1, int(os.environ.get("CLOAKONNX_FUZZ_SCALE", "1")))


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples * SCALE, derandomize=SCALE == 1)


# ---------------------------------------------------------------------------------------------------
# Random small ONNX classifiers
# ---------------------------------------------------------------------------------------------------


class Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def weight(self, shape, fan_in: int) -> str:
        name = self.name("w")
        value = (self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def dense(self, x: str, d_in: int, d_out: int, kind: str, trans_b: int, bias: bool,
              alpha: float = 1.0, beta: float = 1.0) -> str:
        """MatMul, MatMul+Add or Gemm from d_in to d_out features."""
        if kind == "gemm":
            shape = (d_out, d_in) if trans_b else (d_in, d_out)
            inputs = [x, self.weight(shape, d_in)] + ([self.weight((d_out,), 1)] if bias else [])
            attrs = {"transB": trans_b} if trans_b else {}
            if alpha != 1.0:
                attrs["alpha"] = alpha
            if beta != 1.0 and bias:
                attrs["beta"] = beta
            return self.node("Gemm", inputs, **attrs)
        y = self.node("MatMul", [x, self.weight((d_in, d_out), d_in)])
        if kind == "matmul_add":
            y = self.node("Add", [y, self.weight((d_out,), 1)])
        return y


@st.composite
def dense_spec(draw):
    return {
        "kind": draw(st.sampled_from(["matmul", "matmul_add", "gemm"])),
        "width": draw(st.integers(1, 8)),
        "trans_b": draw(st.integers(0, 1)),
        "bias": draw(st.booleans()),
    }


@st.composite
def classifiers(draw, front: str, batch_kind: str, symbolic: bool = False):
    """(ModelProto, description) of a random small float32 classifier, opset 17, IR 8.

    ``front``: "mlp" (1-3 dense+Relu layers) or "conv" (Conv+Relu+GlobalAveragePool+Flatten, then 0-1
    dense+Relu layers); ``batch_kind``: "dynamic", "one" (fixed batch 1) or "fixed" (fixed 2..5);
    ``symbolic``: the input's non-batch dimensions are declared symbolic (as exports with dynamic axes do).
    """
    batch = {"dynamic": "N", "one": 1, "fixed": draw(st.integers(2, 5))}[batch_kind]
    classes = draw(st.integers(1, 5))
    layers = draw(st.lists(dense_spec(), min_size=1 if front == "mlp" else 0, max_size=3 if front == "mlp" else 1))
    head = draw(st.sampled_from(["gemm", "gemm_t", "matmul_add"]))
    head_bias = True if head == "matmul_add" else draw(st.booleans())
    alpha = draw(st.sampled_from([1.0, 0.5, 2.0]))
    beta = draw(st.sampled_from([1.0, 0.5, 2.0]))
    softmax = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    b = Builder(np.random.default_rng(seed))

    if front == "mlp":
        d_in = draw(st.integers(1, 8))
        sample_shape: tuple[int, ...] = (d_in,)
        t, width = "input", d_in
        conv = None
    else:
        cin, h, w = draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(2, 5))
        k = draw(st.integers(1, min(h, w, 3)))
        pad = draw(st.integers(0, k - 1))
        cout = draw(st.integers(1, 8))
        sample_shape = (cin, h, w)
        conv = {"kernel": k, "pad": pad}
        conv_in = ["input", b.weight((cout, cin, k, k), cin * k * k)]
        if draw(st.booleans()):
            conv_in.append(b.weight((cout,), 1))
        t = b.node("Conv", conv_in, kernel_shape=[k, k], pads=[pad] * 4)
        t = b.node("Relu", [t])
        t = b.node("GlobalAveragePool", [t])
        t = b.node("Flatten", [t])
        width = cout
    for spec in layers:
        t = b.dense(t, width, spec["width"], spec["kind"], spec["trans_b"], spec["bias"])
        t = b.node("Relu", [t])
        width = spec["width"]
    feature = t
    if head == "matmul_add":
        t = b.dense(t, width, classes, "matmul_add", 0, True)
    else:
        t = b.dense(t, width, classes, "gemm", int(head == "gemm_t"), head_bias, alpha, beta)
    if softmax:
        t = b.node("Softmax", [t], axis=1)
    b.nodes.append(helper.make_node("Identity", [t], ["output"], name="out"))

    graph = helper.make_graph(
        b.nodes, "fuzz", [helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, [batch, *([f"d{i}" for i in range(len(sample_shape))] if symbolic else sample_shape)])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, classes])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    info = {"front": front, "batch": batch, "classes": classes, "layers": layers, "head": head,
            "head_bias": head_bias, "softmax": softmax, "sample_shape": sample_shape, "feature": feature,
            "conv": conv, "symbolic": symbolic}
    return model, info


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    from cloakonnx.runtime import batch_size_for, make_session, run_batch

    session = make_session(model, ["CPUExecutionProvider"])
    bs = batch_size_for(session, 7)  # uneven batches, unless the model's batch is fixed
    chunks = [run_batch(session, x[s : s + bs], outputs) for s in range(0, len(x), bs)]
    return [np.concatenate(parts) for parts in zip(*chunks)]


def _event(text: str) -> None:
    """hypothesis.event, also callable from the plain regression tests that share the helper below."""
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        event(text)


def harden_and_check(model: onnx.ModelProto, info: dict, x: np.ndarray, y: np.ndarray, fraction: float,
                     ort_batch: int = 256, attack_batch: int = 128) -> bool:
    """Harden with FGSM; on success check the written model, and return True; on CloakError return False.
    Any other exception propagates: that is a bug."""
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.harden import HardenConfig, harden
    from cloakonnx.graph import find_head
    from cloakonnx.graph import with_outputs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path, data_path, out_path = tmp / "m.onnx", tmp / "d.npz", tmp / "m.cloaked.onnx"
        onnx.save(model, model_path)
        np.savez(data_path, x=x, y=y)
        config = HardenConfig(output=out_path, attack=AttackConfig(name="fgsm", eps=0.1, batch_size=attack_batch),
                              fraction=fraction, val_split=0.5, adaptive=False, device="cpu",
                              providers=["CPUExecutionProvider"], ort_batch_size=ort_batch)
        try:
            report = harden(model_path, data_path, config)
        except CloakError as exc:
            _event(f"CloakError: {str(exc)[:40]}")
            assert not out_path.exists(), "a failed harden must not leave an output behind"
            return False
        _event("hardened")
        onnx.checker.check_model(str(out_path), full_check=True)
        hardened = onnx.load(str(out_path))
        head, hard_head = find_head(model), find_head(hardened)
        assert hard_head.feature == head.feature == info["feature"]
        mask = hard_head.mask
        if report.mask_added:
            assert mask is not None and mask.shape == (head.width,)
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert int((mask == 0).sum()) == report.masked == max(1, round(fraction * head.width))
        else:  # fraction 0 (or nothing helps): the original graph is written unchanged
            assert fraction == 0 and mask is None and report.masked == 0
            assert hardened.graph.SerializeToString() == model.graph.SerializeToString()
            mask = np.ones(head.width, np.float32)
        assert report.features == head.width

        (features,) = _run(with_outputs(model, [head.feature]), x, [head.feature])
        expected = head.apply(features, mask)
        if info["softmax"]:
            expected = _softmax(expected)
        (got,) = _run(hardened, x, ["output"])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        # the original model is untouched on disk
        assert onnx.load(str(model_path)).SerializeToString() == model.SerializeToString()
        return True


@pytest.mark.parametrize("batch_kind", ["dynamic", "one", "fixed"])
@pytest.mark.parametrize("front", ["mlp", "conv"])
@fuzz(8)
@given(data=st.data(), n=st.integers(2, 24), fraction=st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9]),
       data_seed=st.integers(0, 2**16), ort_batch=st.integers(1, 9), attack_batch=st.integers(1, 9))
def test_harden_random_classifiers(front, batch_kind, data, n, fraction, data_seed, ort_batch, attack_batch):
    model, info = data.draw(classifiers(front, batch_kind), label="model")
    event(f"head {info['head']}{' + Softmax' if info['softmax'] else ''}")
    rng = np.random.default_rng(data_seed)
    x = rng.random((n, *info["sample_shape"]), dtype=np.float32)
    y = rng.integers(0, info["classes"], n).astype(np.int64)
    assert harden_and_check(model, info, x, y, fraction, ort_batch, attack_batch), "a valid classifier was refused"


def _runnable(info: dict, shape: tuple[int, ...]) -> bool:
    """Whether the graph itself can run samples of ``shape`` (its weights fix some dimensions)."""
    want = info["sample_shape"]
    if info["conv"] is None:
        return shape == want
    k, pad = info["conv"]["kernel"], info["conv"]["pad"]
    return len(shape) == 3 and shape[0] == want[0] and min(shape[1:]) + 2 * pad >= k


@pytest.mark.parametrize("front", ["mlp", "conv"])
@fuzz(10)
@given(data=st.data(), symbolic=st.booleans(), deltas=st.lists(st.sampled_from([0, 0, -1, 1, 3]), min_size=3,
                                                               max_size=3),
       rank=st.sampled_from(["same", "same", "more", "less"]), seed=st.integers(0, 2**16))
def test_harden_data_shape_against_model_input(front, data, symbolic, deltas, rank, seed):
    """Data whose samples do not fit the model's input: refused with a CloakError, or (where the input's
    dimensions are symbolic and the graph can run them) hardened correctly."""
    model, info = data.draw(classifiers(front, "dynamic", symbolic), label="model")
    shape = tuple(max(0, d + e) for d, e in zip(info["sample_shape"], deltas))
    shape = {"same": shape, "more": shape + (2,), "less": shape[:-1]}[rank]
    fits = len(shape) == len(info["sample_shape"]) and (symbolic or shape == info["sample_shape"])
    runs = fits and 0 not in shape and _runnable(info, shape)
    event(f"symbolic={symbolic} fits={fits} runs={runs}")
    rng = np.random.default_rng(seed)
    x = rng.random((6, *shape), dtype=np.float32)
    y = rng.integers(0, info["classes"], 6).astype(np.int64)
    hardened = harden_and_check(model, info, x, y, 0.2)
    assert hardened == runs


@pytest.mark.parametrize("case", ["mlp width 5 for 4", "conv 2 channels for 1"])
def test_harden_symbolic_input_with_data_the_graph_cannot_run(case):
    """Regression (found by the fuzz test above): onnxruntime's InvalidArgument/Fail escaped from harden."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    if case.startswith("mlp"):
        nodes, inputs, x = [helper.make_node("Relu", ["input"], ["f"])], ["N", "D"], np.zeros((6, 5), np.float32)
    else:
        k = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "K")
        nodes = [helper.make_node("Conv", ["input", "K"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
        inputs, x = ["N", "C", "H", "W"], np.zeros((6, 2, 5, 5), np.float32)
    graph = helper.make_graph(nodes + [helper.make_node("Gemm", ["f", "W"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, inputs)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
                              [w] + ([] if case.startswith("mlp") else [k]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    info = {"feature": "f", "softmax": False}
    assert harden_and_check(model, info, x, np.zeros(6, np.int64), 0.2) is False  # a CloakError, nothing written


# ---------------------------------------------------------------------------------------------------
# Malformed data files
# ---------------------------------------------------------------------------------------------------


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # allow_pickle is True when saving: object arrays are written pickled
    return buf.getvalue()


def _good_arrays(rng, n: int) -> dict:
    return {"x": rng.random((n, 1, 3, 3), dtype=np.float32), "y": rng.integers(0, 3, n)}


ODD_DTYPES = [np.float16, np.float64, np.int8, np.uint8, np.int64, np.uint64, np.bool_, np.complex64, "U3",
              "S2", "datetime64[s]", "timedelta64[s]", [("a", "f4"), ("b", "i4")], "V4"]


def _array_of(rng, dtype, shape) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = rng.integers(-3, 300, size=shape)
    if dt.kind == "V":
        return np.zeros(shape, dt)
    if dt.kind in "US":
        return raw.astype(str).astype(dt)
    if dt.kind in "mM":
        return raw.astype(np.int64).astype(dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return raw.astype(dt)


MALFORMED = ["random_bytes", "zip_magic", "truncated", "missing_keys", "x_dtype", "y_dtype", "object", "zero_d",
             "lengths", "nan_labels", "float_labels", "y_shape", "npy_not_npz", "bad_member"]


@st.composite
def malformed_npz(draw, kind: str):
    """(kind, file bytes) of a mostly-broken .npz file of the given kind."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n = draw(st.integers(0, 6))
    if kind == "random_bytes":
        return kind, draw(st.binary(max_size=300))
    if kind == "zip_magic":
        return kind, b"PK\x03\x04" + draw(st.binary(max_size=200))
    if kind == "truncated":
        data = _npz_bytes(**_good_arrays(rng, max(n, 1)))
        return kind, data[: draw(st.integers(0, len(data) - 1))]
    if kind == "missing_keys":
        arrays = _good_arrays(rng, n)
        keys = draw(st.sets(st.sampled_from(["x", "y", "X", "labels"]), max_size=3))
        chosen = {k: arrays.get(k.lower(), arrays["y"]) for k in keys}
        assume(not {"x", "y"} <= set(chosen))
        return kind, _npz_bytes(**chosen)
    if kind in ("x_dtype", "y_dtype"):
        arrays = _good_arrays(rng, n)
        key = kind[0]
        arrays[key] = _array_of(rng, draw(st.sampled_from(ODD_DTYPES)), arrays[key].shape)
        return kind, _npz_bytes(**arrays)
    if kind == "object":
        arrays = _good_arrays(rng, n)
        key = draw(st.sampled_from(["x", "y"]))
        obj = np.empty(max(n, 1), dtype=object)
        for i in range(len(obj)):
            obj[i] = [i] if draw(st.booleans()) else {"a": i}
        arrays[key] = obj
        return kind, _npz_bytes(**arrays)
    if kind == "zero_d":
        arrays = _good_arrays(rng, n)
        for key in draw(st.sets(st.sampled_from(["x", "y"]), min_size=1)):
            arrays[key] = np.asarray(arrays[key].reshape(-1)[:1].sum() if arrays[key].size else 0,
                                     dtype=arrays[key].dtype)
        return kind, _npz_bytes(**arrays)
    if kind == "lengths":
        m = (n + draw(st.integers(1, 6))) % 7  # any length but n
        return kind, _npz_bytes(x=rng.random((n, 4), dtype=np.float32), y=rng.integers(0, 3, m))
    if kind == "nan_labels":
        y = rng.integers(0, 3, max(n, 1)).astype(draw(st.sampled_from([np.float32, np.float64, np.float16])))
        y[draw(st.integers(0, len(y) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.5]))
        return kind, _npz_bytes(x=rng.random((len(y), 4), dtype=np.float32), y=y)
    if kind == "float_labels":
        y = rng.integers(-2, 5, n).astype(np.float64) * draw(st.sampled_from([1.0, 1e300, -1e20, 2.0**63]))
        return kind, _npz_bytes(x=rng.random((n, 4), dtype=np.float32), y=y)
    if kind == "y_shape":
        shape = tuple(draw(st.lists(st.integers(0, 3), min_size=2, max_size=3)))
        return kind, _npz_bytes(x=rng.random((shape[0], 2), dtype=np.float32), y=rng.integers(0, 3, shape))
    if kind == "npy_not_npz":
        buf = io.BytesIO()
        np.save(buf, rng.random((n, 2)))
        return kind, buf.getvalue()
    # a zip whose members are named like arrays but are not .npy data
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", draw(st.binary(max_size=80)))
        zf.writestr("y.npy", b"\x93NUMPY" + draw(st.binary(max_size=40)))
    return kind, buf.getvalue()


@pytest.mark.parametrize("kind", MALFORMED)
@fuzz(15)
@given(data=st.data(), via=st.sampled_from(["load_npz", "load_data"]))
def test_load_malformed_npz_raises_only_cloak_error(kind, data, via):
    kind, data = data.draw(malformed_npz(kind), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # casts of complex/huge values warn; the contract is about exceptions
            try:
                ds = load_npz(path) if via == "load_npz" else load_data(path)
            except CloakError:
                event(f"{kind}: CloakError")
                return
        event(f"{kind}: loaded")
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
        assert ds.y.ndim == 1 and len(ds.x) == len(ds.y)


@pytest.mark.parametrize("which", ["x", "y", "both"])
def test_load_npz_zero_d_arrays(tmp_path, which):
    """Regression (found by fuzzing): 0-d arrays raised TypeError 'len() of unsized object'."""
    x = np.float32(0.5) if which in ("x", "both") else np.zeros((1, 4), np.float32)
    y = np.int64(0) if which in ("y", "both") else np.zeros(1, np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(CloakError):
        load_npz(tmp_path / "d.npz")


@fuzz(30)
@given(name=st.sampled_from(["d.npz", "d.NPZ", "d.npy", "d.txt", "d", "dir.npz", "missing.npz"]),
       data=st.binary(max_size=64))
def test_load_data_odd_paths(name, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        if name == "dir.npz":
            path.mkdir()
        elif name != "missing.npz":
            path.write_bytes(data)
        try:
            load_data(path)
        except CloakError:
            return
        pytest.fail(f"{name} with {data!r} loaded")  # none of these is a valid dataset


# ---------------------------------------------------------------------------------------------------
# validate() on random shapes
# ---------------------------------------------------------------------------------------------------

DIMS = st.one_of(st.integers(-1, 4), st.none(), st.sampled_from(["N", "batch", "H"]))


@fuzz(200)
@given(n=st.integers(0, 4), sample_shape=st.lists(st.integers(0, 4), max_size=3),
       input_shape=st.lists(DIMS, max_size=4), num_classes=st.integers(1, 5),
       lo=st.sampled_from([0.0, -1.0, 0.5]), spread=st.sampled_from([1.0, 2.0, 1e-3]),
       fill=st.sampled_from(["inside", "outside", "nan", "inf"]), label_shift=st.integers(-2, 2),
       seed=st.integers(0, 2**16))
def test_validate_random_shapes(n, sample_shape, input_shape, num_classes, lo, spread, fill, label_shift, seed):
    rng = np.random.default_rng(seed)
    hi = lo + spread
    x = (lo + rng.random((n, *sample_shape)) * spread).astype(np.float32)
    if x.size and fill != "inside":
        x.reshape(-1)[rng.integers(0, x.size)] = {"outside": hi + 1.0, "nan": np.nan, "inf": -np.inf}[fill]
    y = rng.integers(0, num_classes, n) + label_shift
    ds = Dataset(x, y.astype(np.int64), "fuzz")
    try:
        validate(ds, input_shape, (lo, hi), num_classes)
    except CloakError:
        event("CloakError")
        return
    event("valid")
    assert n > 0 and x[0].size > 0
    assert len(input_shape[1:]) == x.ndim - 1  # the batch dimension is not compared
    assert all(not (isinstance(d, int) and d > 0) or d == g for d, g in zip(input_shape[1:], x.shape[1:]))
    assert np.all(np.isfinite(x)) and y.min() >= 0 and y.max() < num_classes


def test_validate_zero_size_features():
    """Regression (found by fuzzing): x.min() on zero-size samples raised ValueError."""
    ds = Dataset(np.zeros((3, 0), np.float32), np.zeros(3, np.int64), "fuzz")
    with pytest.raises(CloakError):
        validate(ds, ["N", "D"], (0.0, 1.0), 2)
