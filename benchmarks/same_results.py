"""Do two trees give the same results? Run a fixed set of real CLI commands (demo model and a
torchvision resnet18 export; harden with several option sets, Ray included; sweep; evaluate) and
write the sha256 of every model written and every figure of every JSON report, timings dropped.

A refactor that must change no result runs this on the tree before and after and compares:

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/old/tree python benchmarks/same_results.py --out before.json
    OMP_NUM_THREADS=1 python benchmarks/same_results.py --out after.json --compare before.json

The inputs (the demo's model and data, the resnet18 export) are made once in --work and reused, so
both trees attack the same files. One thread throughout: results may depend on the thread count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

# fields that measure time or name temporary places, not results
TIMING_KEYS = {"seconds", "stages", "stages_cpu", "data_wait_seconds", "learning_seconds", "model", "output",
               "reference", "address", "plot", "report", "time", "elapsed"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def strip(obj):
    """The report without timings and paths (which differ between runs and trees)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS and "second" not in k}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def run(args: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "cloakonnx", "--quiet", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def make_inputs(work: Path, env: dict) -> None:
    """The demo's model and data, and a random-weight resnet18 export with labels of its own."""
    if not (work / "demo" / "digits_cnn.onnx").exists():
        subprocess.run([sys.executable, "-m", "cloakonnx", "--quiet", "demo", "--out", str(work / "demo")],
                       check=True, env=env, capture_output=True)
    if not (work / "r18.onnx").exists():
        code = f"""
import numpy as np, torch, torchvision
from cloakonnx.demo import export_onnx
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10).eval()
x = torch.rand(96, 3, 32, 32)
with torch.no_grad():
    y = net(x).argmax(1).numpy()
export_onnx(net, x[:2], {str(work / 'r18.onnx')!r})
np.savez({str(work / 'r18.npz')!r}, x=x.numpy(), y=y)
"""
        subprocess.run([sys.executable, "-c", code], check=True, env=env)


def commands(work: Path) -> dict[str, list[str]]:
    demo, out = work / "demo", work / "out"
    model, data, test = str(demo / "digits_cnn.onnx"), str(demo / "digits.npz"), str(demo / "test.npz")
    r18, r18d = str(work / "r18.onnx"), str(work / "r18.npz")
    h = ["harden", model, "--data", data, "--eps", "0.1"]
    return {
        "harden-default": [*h, "--score", "absdiff", "-o", str(out / "a.onnx")],  # the paper's (the default then)
        "harden-budget": [*h, "--score", "absdiff", "--max-clean-drop", "2", "--budget-confidence", "0", "--steps", "5",
                          "-o", str(out / "b.onnx")],
        "harden-fold-normalised": [*h, "--score", "normalised", "--fraction", "0.05", "--fold", "--attack", "fgsm",
                                   "-o", str(out / "c.onnx")],
        "harden-learned": [*h, "--score", "learned", "--learn-steps", "8", "--learn-batch", "32", "--steps", "3",
                           "-o", str(out / "d.onnx")],
        "harden-learned-auto-soft": [*h, "--score", "learned", "--feature-tensor", "auto", "--mask-values", "soft",
                                     "--learn-steps", "8", "--learn-batch", "32", "--learn-attack", "fgsm",
                                     "--steps", "3", "--max-clean-drop", "5", "--budget-confidence", "0",
                                     "-o", str(out / "e.onnx")],
        "harden-rounds-margin": [*h, "--score", "margin", "--rounds", "2", "--steps", "3", "-o", str(out / "f.onnx")],
        "harden-ray": [*h, "--steps", "3", "--ray", "--ray-workers", "2", "-o", str(out / "g.onnx")],
        "sweep": ["sweep", model, "--data", data, "--eps", "0.1", "--steps", "3"],
        "evaluate": ["evaluate", str(out / "a.onnx"), "--data", test, "--reference", model, "--eps", "0.05,0.1",
                     "--attack", "fgsm,pgd,square", "--queries", "100", "--max-samples", "120"],
        "evaluate-preset": ["evaluate", model, "--data", test, "--eps", "0.1", "--preset", "fast",
                            "--max-samples", "60"],
        "harden-r18": ["harden", r18, "--data", r18d, "--eps", "2/255", "--steps", "2", "--fraction", "0.02",
                       "--no-adaptive", "-o", str(out / "r18.cloaked.onnx")],
        "evaluate-r18": ["evaluate", str(out / "r18.cloaked.onnx"), "--data", r18d, "--reference", r18,
                         "--eps", "2/255", "--attack", "fgsm,pgd", "--steps", "3", "--max-samples", "32"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cloakonnx-same-results", help="inputs and outputs [%(default)s]")
    ap.add_argument("--out", required=True, help="JSON file of hashes and figures to write")
    ap.add_argument("--compare", help="an earlier --out to compare with (exit 1 on any difference)")
    ap.add_argument("--only", help="comma-separated command names to run")
    args = ap.parse_args()
    work = Path(args.work)
    (work / "out").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    make_inputs(work, env)
    result = {"inputs": {p.name: sha256(p) for p in (work / "demo" / "digits_cnn.onnx", work / "r18.onnx")}}
    wanted = set(args.only.split(",")) if args.only else None
    for name, cmd in commands(work).items():
        if wanted and name not in wanted:
            continue
        report = run(cmd, env)
        outputs = sorted({a for a in cmd if a.endswith(".onnx") and str(work / "out") in a and cmd[0] == "harden"})
        result[name] = {"report": strip(report), "models": {Path(o).name: sha256(Path(o)) for o in outputs
                                                             if Path(o).exists()}}
        print(f"{name}: done", file=sys.stderr)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [k for k in result if k in before and before[k] != result[k]]
        for k in differ:
            print(f"DIFFERENT: {k}")
            a, b = before[k], result[k]
            print("  before:", json.dumps(a)[:600])
            print("  after: ", json.dumps(b)[:600])
        print(f"{len(result) - len(differ)} same, {len(differ)} different")
        raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
