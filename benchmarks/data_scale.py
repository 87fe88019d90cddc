#!/usr/bin/env python
"""Data at any scale: does the peak memory of ``harden`` and ``evaluate`` stay flat in the number of samples N,
and does decoding a folder of JPEGs keep up with the attacks?

Every run below is the real command line (``cloakonnx -q harden ...`` / ``evaluate ...``) in a fresh subprocess,
one at a time, with OMP_NUM_THREADS set to ``--threads``. The subprocess is this script in a child mode that
calls ``cloakonnx.cli.main`` and, as it exits, records its own peak RSS (VmHWM from /proc/self/status, the
counter ru_maxrss reports) and its peak anonymous RSS (RssAnon, sampled every 5 ms by a thread:
``common.AnonPeak``). ru_maxrss of the child as ``os.wait4`` returns it is kept in the JSON for reference only:
on Linux a child inherits there the high-water mark of the process that forked it (a child of a 330 MiB
parent reports 335 MiB before doing anything), and this script holds the data it writes.

Part "npz". A small CNN (two convolutions, global average pool, Linear(64, 10); random weights after
``torch.manual_seed(0)``; torch.onnx, opset 17, dynamic batch) on 3x32x32 inputs in [0, 1]: scikit-learn's
bundled digits resized to 32x32, the channel repeated 3 times, tiled and jittered (+-0.05, clipped) up to N.
The labels are the model's own onnxruntime predictions, so clean accuracy is 100%. For each N of ``--sizes``
(default 1000 and 20000) the data is written as an uncompressed ``data.npz`` (x float32, y int64) and as a
folder holding ``x.npy`` and ``y.npy``, and each source runs

    cloakonnx harden MODEL --data SRC --attack fgsm --eps 8/255 --seed 0 -o OUT.onnx --json
    cloakonnx evaluate MODEL --data SRC --attack fgsm --eps 8/255 --json

Reported: peak RSS at each N; growth = peak(largest N) - peak(smallest N); and the ratio growth / the data's
size at the largest N (20000 x 3 x 32 x 32 x 4 bytes = 234 MiB). Target: at most 0.10 (a command that loads
its data scores about 1; one that streams it, about 0). The same ratio on the peak anonymous RSS is shown
beside it: it leaves out file-backed pages (shared libraries, and the pages of a memory-mapped input that
were read, which count in RSS however little the process keeps).

Part "jpeg". ``--jpeg-n`` (default 20000) JPEGs in 10 class folders ``c0..c9`` (label = folder), cut from the
two photos scikit-learn ships (``load_sample_images``: china.jpg, flower.jpg): random crops of random size
and aspect, resized to 320x256 or 256x320, flipped at random, saved by Pillow at quality 90. The folder is
cached (``--cache-dir``, keyed by the count) so a rerun does not decode-encode 20k images again. The model is
torchvision's mobilenet_v3_small with random weights and 10 classes (``--jpeg-model resnet18``: common's
``export_resnet18``) exported at 224x224, and the run is

    cloakonnx harden MODEL --data FOLDER --resize 256 --crop 224 --attack fgsm --seed 0 --json -o OUT.onnx

Reported: its peak RSS (target: under 3 GiB, where the decoded 20k images alone would be 12 GiB), its wall
time, and the report's ``stages["data wait"]`` (seconds blocked waiting for decoded data) as a share of
harden's own ``seconds`` (the process's wall time less start-up and imports). Target: at most 10%.

A command that fails (an option or a source that this cloakonnx does not have yet, say) is reported with its
exit status and the last line of its stderr, and the rest still runs; every child's stdout and stderr stay in
the work folder (``--workdir`` keeps it).

    python benchmarks/data_scale.py                                   # both parts, full size: long on a CPU
    python benchmarks/data_scale.py --skip-jpeg --json --out data_scale.json
    python benchmarks/data_scale.py --sizes 100,400 --jpeg-n 200 --threads 1   # a smoke run, a few minutes
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, AnonPeak, add_output_options, cpus, log_to_stderr, parse_sizes, proc_status, run_main

log = logging.getLogger("data_scale")

SHAPE = (3, 32, 32)
RATIO_TARGET = 0.10  # RSS growth from the smallest to the largest N / data size at the largest N
JPEG_RSS_TARGET = 3 * 2**30
DATA_WAIT_TARGET = 0.10  # share of harden's seconds
CLASSES = 10
JPEG_SIZES = ((320, 256), (256, 320))  # width, height; most landscape
JPEG_CACHE_VERSION = 1  # bump when the generator changes, so an old cache is not reused
MiB = 2**20


# --- the child: the CLI, with its own peak memory ---------------------------------------------------------


def child(argv: list[str]) -> int:
    """``--_child MEMORY.json ARGS...``: run ``cloakonnx ARGS...`` here, then write this process's peak RSS
    (VmHWM), sampled peak RssAnon and final RssFile to MEMORY.json. Returns the CLI's exit status."""
    out, args = Path(argv[0]), argv[1:]
    code: object = 0
    with AnonPeak(interval=0.005) as anon:
        from cloakonnx.cli import main as cli

        try:
            cli(args=args, prog_name="cloakonnx")
        except SystemExit as exc:
            code = exc.code
    status = proc_status()
    out.write_text(json.dumps({"peak_rss": status["VmHWM"], "peak_rss_anon": anon.peak, "rss_file": status["RssFile"]}))
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def run_cli(args: argparse.Namespace, name: str, cli_args: list[str]) -> dict:
    """``cloakonnx -q CLI_ARGS`` in a fresh child (stdout, stderr and memory record in the work folder as
    NAME.*); its exit status, wall time, peak memory and, when it printed one, its JSON report."""
    folder = args.workdir
    files = {k: folder / f"{name}.{k}" for k in ("stdout", "stderr", "memory.json")}
    files["memory.json"].unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = ["-q", *cli_args]
    log.info("  cloakonnx %s", " ".join(cli_args))
    with open(files["stdout"], "wb") as out, open(files["stderr"], "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--_child", str(files["memory.json"]), *command],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"command": "cloakonnx " + " ".join(command), "rc": proc.returncode, "wall_s": round(wall, 3),
           "ru_maxrss_inherited": usage.ru_maxrss * 1024, "stdout": str(files["stdout"]),
           "stderr": str(files["stderr"])}
    if files["memory.json"].is_file():
        row.update(json.loads(files["memory.json"].read_text()))
    try:
        row["report"] = json.loads(files["stdout"].read_text())
    except ValueError:
        row["report"] = None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in files["stderr"].read_text(errors="replace").splitlines() if ln.strip()]
        row["error"] = lines[-1] if lines else f"exit status {proc.returncode}, nothing on stderr"
        row["stderr_tail"] = lines[-15:]
        log.info("  -> FAILED (exit %d): %s", proc.returncode, row["error"])
    else:
        log.info("  -> %.1f s, peak RSS %.0f MiB", wall, row.get("peak_rss", 0) / MiB)
    return row


# --- part npz ----------------------------------------------------------------------------------------------


def small_cnn():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES),
    )


def export(net, shape: tuple[int, ...], path: Path) -> Path:
    """torch.onnx export of ``net`` (eval mode) as the demo exports: opset 17, input ``input``, output
    ``logits``, dynamic batch."""
    import torch

    from cloakonnx.demo import export_onnx

    export_onnx(net.eval(), torch.zeros(1, *shape), path)
    return path


def digits(n: int, seed: int):
    """``n`` 3x32x32 digits in [0, 1]: the 1,797 real ones repeated, each copy jittered by +-0.05."""
    import numpy as np

    from cloakonnx.data import digits_dataset

    base = np.repeat(np.asarray(digits_dataset(SHAPE[1]).x, dtype=np.float32), SHAPE[0], axis=1)
    rng = np.random.default_rng(seed)
    x = np.empty((n, *SHAPE), np.float32)
    for s in range(0, n, 4096):  # in chunks: no float64 noise the size of the whole set
        idx = np.arange(s, min(n, s + 4096)) % len(base)
        noise = rng.random((len(idx), *SHAPE), dtype=np.float32) * np.float32(0.1) - np.float32(0.05)
        x[s : s + len(idx)] = np.clip(base[idx] + noise, 0, 1)
    return x


def predict(model: Path, x, threads: int, batch: int = 1024):
    """onnxruntime argmax of ``model`` on ``x``, a batch at a time."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[s : s + batch]})[0].argmax(1)
                           for s in range(0, len(x), batch)]).astype(np.int64)


def write_sources(folder: Path, x, y) -> dict[str, Path]:
    """The same data as an uncompressed ``data.npz`` and as a folder holding ``x.npy`` and ``y.npy``."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "data.npz", x=x, y=y)
    (folder / "npy").mkdir(exist_ok=True)
    np.save(folder / "npy" / "x.npy", x)
    np.save(folder / "npy" / "y.npy", y)
    return {"npz": folder / "data.npz", "npy": folder / "npy"}


def run_npz(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = export(small_cnn(), SHAPE, args.workdir / "small_cnn.onnx")
    x = digits(max(args.sizes), args.seed)
    y = predict(model, x, args.threads)
    log.info("npz part: small CNN %s, labels = its predictions (%d distinct classes)", "x".join(map(str, SHAPE)),
             len(np.unique(y)))
    runs: dict[str, dict] = {}
    for n in args.sizes:
        sources = write_sources(args.workdir / f"n{n}", x[:n], y[:n])
        for kind, src in sources.items():
            if kind not in args.sources:
                continue
            log.info("N=%d, %s source", n, kind)
            commands = {
                "harden": ["harden", str(model), "--data", str(src), "--score", "absdiff", "--attack", "fgsm", "--eps", "8/255", "--seed",
                           "0", "-o", str(args.workdir / f"small_cnn-{kind}-{n}.cloaked.onnx"), "--json"],
                "evaluate": ["evaluate", str(model), "--data", str(src), "--attack", "fgsm", "--eps", "8/255",
                             "--json"]}
            for command, cli_args in commands.items():
                row = run_cli(args, f"{kind}-{command}-{n}", cli_args)
                runs[f"{kind}/{command}/{n}"] = dict(row, source=kind, name=command, n=n)
        shutil.rmtree(args.workdir / f"n{n}")  # the largest is 2 x 234 MiB at N=20000
    lo, hi = min(args.sizes), max(args.sizes)
    data_bytes = {str(n): n * math.prod(SHAPE) * 4 for n in args.sizes}  # str keys, as in JSON
    growth = []
    for kind in args.sources:
        for command in ("harden", "evaluate"):
            a, b = runs[f"{kind}/{command}/{lo}"], runs[f"{kind}/{command}/{hi}"]
            row = {"source": kind, "command": command}
            failed = [r for r in (a, b) if r["rc"] or "peak_rss" not in r]
            if failed:
                row["error"] = failed[0].get("error", "no memory record from the child")
            else:
                for key in ("peak_rss", "peak_rss_anon"):
                    row[f"{key}_growth"] = b[key] - a[key]
                    row[f"{key}_ratio"] = round((b[key] - a[key]) / data_bytes[str(hi)], 4)
                row["verdict"] = "ok" if row["peak_rss_ratio"] <= RATIO_TARGET else "OVER"
            growth.append(row)
    return {"model": "small CNN 3x32x32, random weights", "sizes": args.sizes, "data_bytes": data_bytes,
            "target_ratio": RATIO_TARGET, "runs": runs, "growth": growth}


# --- part jpeg ---------------------------------------------------------------------------------------------


def make_jpegs(folder: Path, n: int, seed: int, workers: int) -> None:
    """``n`` JPEGs in ``folder/c0..c9`` (image i in class i % 10), cut from scikit-learn's two sample photos.
    Written into ``folder.partial`` and renamed when complete, so an interrupted run leaves no half cache."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(CLASSES):
        (tmp / f"c{c}").mkdir(parents=True)

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        photo = photos[i % len(photos)]
        width, height = photo.size
        area = rng.uniform(0.08, 1.0) * width * height
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = min(width, round(math.sqrt(area * aspect))), min(height, round(math.sqrt(area / aspect)))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = photo.crop((left, top, left + w, top + h)).resize(JPEG_SIZES[int(rng.random() < 0.25)],
                                                                   Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(tmp / f"c{i % CLASSES}" / f"{i:06d}.jpg", quality=90)

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(one, range(n)):
            pass
    tmp.rename(folder)


def jpeg_folder(args: argparse.Namespace) -> Path:
    folder = args.cache_dir / f"jpeg-{args.jpeg_n}-seed{args.seed}-v{JPEG_CACHE_VERSION}"
    if folder.is_dir():
        log.info("jpeg part: %d JPEGs cached in %s", args.jpeg_n, folder)
        return folder
    log.info("jpeg part: writing %d JPEGs to %s (%d threads) ...", args.jpeg_n, folder, args.threads)
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    make_jpegs(folder, args.jpeg_n, args.seed, args.threads)
    log.info("  written in %.1f s", time.perf_counter() - start)
    return folder


def jpeg_model(args: argparse.Namespace) -> Path:
    """The jpeg part's model at 224x224, 10 classes, random weights after ``torch.manual_seed(0)``."""
    if args.jpeg_model == "resnet18":
        from common import export_resnet18

        return export_resnet18(args.workdir / "resnet18.onnx", 224, num_classes=CLASSES).path
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES)
    return export(net, (3, 224, 224), args.workdir / "mobilenet_v3_small.onnx")


def run_jpeg(args: argparse.Namespace) -> dict:
    folder = jpeg_folder(args)
    model = jpeg_model(args)
    log.info("jpeg part: harden %s on %d JPEGs", model.name, args.jpeg_n)
    row = run_cli(args, "jpeg-harden", [
        "harden", str(model), "--data", str(folder), "--score", "absdiff", "--resize", "256", "--crop", "224", "--attack", "fgsm",
        "--seed", "0", "--json", "-o", str(args.workdir / f"{model.stem}.cloaked.onnx"),
        *(["--batch-size", str(args.jpeg_batch_size)] if args.jpeg_batch_size else [])])
    result = {"model": f"{args.jpeg_model} 3x224x224, random weights, {CLASSES} classes", "images": args.jpeg_n,
              "folder": str(folder), "decoded_bytes": args.jpeg_n * 3 * 224 * 224 * 4,
              "target_peak_rss": JPEG_RSS_TARGET, "target_data_wait_share": DATA_WAIT_TARGET, "run": row}
    report = row.get("report")
    if row["rc"] == 0 and "peak_rss" in row:
        result["rss_verdict"] = "ok" if row["peak_rss"] < JPEG_RSS_TARGET else "OVER"
    if row["rc"] == 0 and report:
        wait, seconds = report.get("stages", {}).get("data wait"), report.get("seconds")
        result["harden_seconds"] = seconds
        if wait is None:
            result["data_wait_error"] = "no 'data wait' entry in the report's stages"
        else:
            result["data_wait_s"] = wait
            result["data_wait_share"] = round(wait / seconds, 4) if seconds else None
            result["data_wait_verdict"] = "ok" if seconds and wait / seconds <= DATA_WAIT_TARGET else "OVER"
    return result


# --- report -------------------------------------------------------------------------------------------------


def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def table(result: dict) -> str:
    env, lines = result["environment"], []
    lines.append(f"cloakonnx {env['cloakonnx']}  python {env['python']}  {env['cpus']} CPUs  children with "
                 f"OMP_NUM_THREADS={result['config']['threads']}  load average at start {env['load_average']}")
    npz = result.get("npz")
    if npz:
        hi = max(npz["sizes"])
        lines += ["", f"npz: {npz['model']}; labels = its own predictions; peak memory of each command, MiB",
                  f"  {'source':<7} {'command':<9} {'N':>6} {'data':>8} {'peak RSS':>9} {'peak anon':>9} "
                  f"{'wall s':>8}  result"]
        for row in npz["runs"].values():
            kind, command, n = row["source"], row["name"], row["n"]
            status = "ok" if row["rc"] == 0 else f"FAILED (exit {row['rc']}): {row.get('error', '')}"
            lines.append(f"  {kind:<7} {command:<9} {n:>6} {_mib(npz['data_bytes'][str(n)]):>8} "
                         f"{_mib(row.get('peak_rss')):>9} {_mib(row.get('peak_rss_anon')):>9} {row['wall_s']:>8.1f}  "
                         f"{status}")
        lines += ["", f"  growth from N={min(npz['sizes'])} to N={hi}, and ratio growth / data at N={hi} "
                      f"({_mib(npz['data_bytes'][str(hi)])} MiB); target: ratio of peak RSS <= {npz['target_ratio']:.2f}",
                  f"  {'source':<7} {'command':<9} {'RSS +MiB':>9} {'ratio':>7} {'anon +MiB':>10} {'ratio':>7}  verdict"]
        for g in npz["growth"]:
            verdict = g.get("verdict") or f"no result: {g['error']}"
            lines.append(f"  {g['source']:<7} {g['command']:<9} {_mib(g.get('peak_rss_growth')):>9} "
                         f"{_ratio(g, 'peak_rss_ratio'):>7} {_mib(g.get('peak_rss_anon_growth')):>10} "
                         f"{_ratio(g, 'peak_rss_anon_ratio'):>7}  {verdict}")
    jpeg = result.get("jpeg")
    if jpeg:
        row = jpeg["run"]
        lines += ["", f"jpeg: {jpeg['images']} JPEGs in {CLASSES} class folders ({jpeg['folder']}), {jpeg['model']}; "
                      f"decoded at 224x224 they would be {_mib(jpeg['decoded_bytes'])} MiB",
                  f"  {row['command']}"]
        if row["rc"] != 0:
            lines.append(f"  FAILED (exit {row['rc']}): {row.get('error', '')}")
        else:
            lines += [
                f"  peak RSS {_mib(row.get('peak_rss'))} MiB (peak anon {_mib(row.get('peak_rss_anon'))} MiB); "
                f"target < {_mib(jpeg['target_peak_rss'])} MiB: {jpeg.get('rss_verdict', '-')}",
                f"  wall {row['wall_s']:.1f} s, harden's own seconds {jpeg.get('harden_seconds')}"]
            if "data_wait_s" in jpeg:
                share = jpeg["data_wait_share"]
                lines.append(f"  data wait {jpeg['data_wait_s']:.2f} s = "
                             f"{'-' if share is None else f'{100 * share:.1f}%'} of harden's seconds; target <= "
                             f"{100 * jpeg['target_data_wait_share']:.0f}%: {jpeg['data_wait_verdict']}")
            else:
                lines.append(f"  data wait: {jpeg.get('data_wait_error', 'no report on stdout')}")
            stages = (row.get("report") or {}).get("stages") or {}
            if stages:
                lines.append("  stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    lines += ["", "peak RSS: the child's VmHWM (what ru_maxrss reports, less what it inherits from this script); "
                  "peak anon: RssAnon sampled every 5 ms", f"logs of every command: {result['workdir']}"
              + ("" if result["config"]["workdir"] else " (removed: pass --workdir to keep them)")]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,20000", help="N for the npz part (default 1000,20000)")
    p.add_argument("--sources", default="npz,npy", help="npz part: which sources, of npz and npy (default both)")
    p.add_argument("--jpeg-n", type=int, default=20000, help="JPEGs for the jpeg part (default 20000)")
    p.add_argument("--jpeg-batch-size", type=int, default=None,
                   help="the JPEG run's attack batch (--batch-size) [default: cloakonnx sizes it to free memory]")
    p.add_argument("--jpeg-model", choices=("mobilenet_v3_small", "resnet18"), default="mobilenet_v3_small")
    p.add_argument("--skip-npz", action="store_true")
    p.add_argument("--skip-jpeg", action="store_true")
    p.add_argument("--threads", type=int, default=cpus(),
                   help="OMP_NUM_THREADS of every command, and threads writing the JPEGs (default: the CPUs, %(default)s)")
    p.add_argument("--workdir", type=Path, help="keep models, data and each command's output here "
                                                "(default: a temporary folder, removed)")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "cloakonnx-bench-cache",
                   help="where the JPEG folder is kept between runs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data generation (the commands run with --seed 0)")
    add_output_options(p, out=True)
    args = p.parse_args(argv)
    args.sizes = parse_sizes(p, args.sizes)
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not args.sources or set(args.sources) - {"npz", "npy"}:
        p.error("--sources takes npz, npy or both")
    if args.jpeg_n < CLASSES or args.threads < 1:
        p.error(f"--jpeg-n must be at least {CLASSES}, --threads at least 1")
    return args


def run(args: argparse.Namespace) -> dict:
    import torch

    from cloakonnx import __version__

    torch.set_num_threads(args.threads)
    keep = args.workdir is not None
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if keep:
        args.workdir.mkdir(parents=True, exist_ok=True)
    else:
        args.workdir = Path(tempfile.mkdtemp(prefix="cloakonnx-data-scale-"))
    result: dict = {
        "environment": {"cloakonnx": __version__, "python": platform.python_version(), "cpus": cpus(),
                        "load_average": [round(v, 2) for v in os.getloadavg()]},
        "config": config, "workdir": str(args.workdir)}
    try:
        if not args.skip_npz:
            result["npz"] = run_npz(args)
        if not args.skip_jpeg:
            result["jpeg"] = run_jpeg(args)
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_child":
        return child(argv[1:])
    log_to_stderr()
    return run_main(run, parse_args(argv), table)


if __name__ == "__main__":
    sys.exit(main())
