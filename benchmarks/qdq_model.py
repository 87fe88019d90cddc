"""A QDQ-quantized classifier end to end: quantize, check, harden (Mul and folded), evaluate.

Quantizes the demo model with onnxruntime's own static quantizer (QDQ format, uint8 activations,
int8 per-channel weights, calibrated on 128 images of --data), then:

1. ``check``: the executor against onnxruntime's unfused QDQ semantics, and how far onnxruntime's
   fused integer kernels are from those;
2. ``harden`` in both forms (a Mul, and --fold into the integer weight) with node counts;
3. ``evaluate`` of the float and the quantized model under FGSM, PGD and Square; for the quantized
   one also transfer from the float model (``--reference``).

    python benchmarks/qdq_model.py --demo-dir cloakonnx-demo        # after `cloakonnx demo`
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import add_output_options, demo_paths, run_main


def quantize(model: Path, data: Path, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    import onnx

    x = np.load(data)["x"]
    name = onnx.load(str(model)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: x[i : i + 32]} for i in range(0, 128, 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, required=True)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--max-samples", type=int, default=200)
    add_output_options(ap)
    args = ap.parse_args(argv)
    return run_main(run, args, lambda result: table(result, args.eps))


def evaluated(ev) -> dict:
    """An evaluate report, flat: samples, clean, and '<attack> <threat>' accuracies."""
    return {"samples": ev["samples"], "clean": ev["clean_accuracy"],
            **{f"{r['attack']} {r['threat']}": r["accuracy"] for r in ev["results"]}}


def run(args: argparse.Namespace) -> dict:
    import onnx

    from cloakonnx.attacks import AttackConfig
    from cloakonnx.check import check_model
    from cloakonnx.evaluate import EvaluateConfig, evaluate
    from cloakonnx.harden import HardenConfig, harden

    src, data, test = demo_paths(args.demo_dir)
    with tempfile.TemporaryDirectory() as tmp:
        qdq = quantize(src, data, Path(tmp) / "qdq.onnx")
        chk = check_model(str(qdq), batch=64).to_dict()
        result = {"nodes": {"float": len(onnx.load(str(src)).graph.node), "qdq": len(onnx.load(str(qdq)).graph.node)},
                  "check": {"ok": chk["ok"], "max_abs": chk["outputs"][0]["max_abs"], **chk["quantized"]}}
        attack = AttackConfig(name="pgd", eps=args.eps, steps=10)
        for fold in (False, True):
            out = Path(tmp) / f"hard{int(fold)}.onnx"
            rep = harden(qdq, data, HardenConfig(output=out, attack=attack, fraction=0.05, val_split=0.3, fold=fold))
            result["fold" if fold else "mul"] = {
                "nodes": len(onnx.load(str(out)).graph.node), "masked": rep.masked, "fallback": rep.attack["fallback"],
                "clean": rep.clean_accuracy, "adversarial": rep.adversarial_accuracy}
        ev = evaluate(qdq, test, EvaluateConfig(attacks=("fgsm", "pgd", "square"), eps=(args.eps,), reference=src,
                                                max_samples=args.max_samples, sanity=False)).to_dict()
        result["evaluate_qdq"] = evaluated(ev)
        ev = evaluate(src, test, EvaluateConfig(attacks=("fgsm", "pgd", "square"), eps=(args.eps,), max_samples=args.max_samples,
                                                sanity=False)).to_dict()
        result["evaluate_float"] = evaluated(ev)
    return result


def table(result: dict, eps: float) -> str:
    c = result["check"]
    lines = [f"nodes: float {result['nodes']['float']}, QDQ {result['nodes']['qdq']}",
             f"check: {'OK' if c['ok'] else 'FAILED'}, max |executor - onnxruntime unfused| = {c['max_abs']:.3g}; "
             f"fused integer kernels differ by up to {c['fused_max_abs']:.3g}, top-1 agreement "
             f"{100 * c['fused_top1_agreement']:.1f}%"]
    for form in ("mul", "fold"):
        h = result[form]
        lines.append(f"harden ({form}): {h['nodes']} nodes, masked {h['masked']}, fallback {h['fallback']}; validation "
                     f"clean {100 * h['clean']['original']:.2f} -> {100 * h['clean']['hardened']:.2f}, PGD transfer "
                     f"{100 * h['adversarial']['original']:.2f} -> {100 * h['adversarial']['hardened_transfer']:.2f}")
    for kind in ("float", "qdq"):
        e = result[f"evaluate_{kind}"]
        rows = ", ".join(f"{k} {100 * v:.2f}" for k, v in e.items() if k not in ("samples", "clean"))
        lines.append(f"evaluate {kind:5} model, {e['samples']} test samples, eps {eps:g} (FGSM, PGD-20, "
                     f"Square-1000{'; transfer = crafted on the float model' if kind == 'qdq' else ''}): clean "
                     f"{100 * e['clean']:.2f}, {rows}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
