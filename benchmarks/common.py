"""What the scripts in ``benchmarks/`` share: a torchvision resnet18 export with random weights, the
main() wrapper (run, report errors, print JSON or a table), clocks, memory readers for /proc/self, and
the --demo-dir/--model/--data/--test options.

The scripts import it as ``common``: running ``python benchmarks/x.py`` puts this folder on sys.path
(a script loaded by path, as a test loads latency.py, puts it there itself). Importing it puts the
checkout first on sys.path, so every script runs from a checkout without installing cloakonnx.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


# --- the model: torchvision resnet18 with random weights ------------------------------------------------


class Resnet18(NamedTuple):
    path: Path  # the .onnx file (with the dynamo exporter, its weights may sit beside it in ``path.name + '.data'``)
    net: Any  # the torch module it was exported from: eval mode, parameters frozen


EXPORTERS = ("legacy", "legacy-unfolded", "dynamo")


def export_resnet18(path_or_folder: str | Path, size: int, seed: int = 0, exporter: str = "legacy",
                    num_classes: int = 1000, *, batchnorm_stats: bool = False, example_batch: int = 1,
                    random_example: bool = False) -> Resnet18:
    """Export torchvision resnet18 with random weights to ONNX: input ``input`` (N x 3 x size x size), output
    ``logits`` (N x num_classes), the batch dimension N dynamic. Nothing is downloaded.

    The weights are torchvision's own initialisation after ``torch.manual_seed(seed)``. That initialisation
    leaves every BatchNorm at running mean 0 and variance 1, close to an identity; with ``batchnorm_stats``
    the running statistics are drawn as a trained model would have non-trivial ones (mean ~ 0.1 N(0, 1),
    variance ~ U[0.5, 1.5)) from a separate generator seeded with ``seed``, so the weights stay the same.
    The module is in eval mode with its parameters frozen (an attack needs input gradients only, and
    cloakonnx's executor holds weights as buffers).

    ``exporter``: ``legacy`` (TorchScript, opset 17, constant folding: BatchNorm folded into the convs),
    ``legacy-unfolded`` (the same without constant folding: BatchNormalization nodes stay) or ``dynamo``
    (torch.export, the exporter's default opset). The example input traced is ``example_batch`` images
    (the dynamo exporter needs at least 2 to keep the batch dynamic) of zeros, or with ``random_example``
    drawn with ``torch.rand`` from the global generator, which the caller's later draws then follow.
    The traced values do not change the graph.

    ``path_or_folder``: the .onnx file to write, or a folder to write ``resnet18-<exporter>.onnx`` into.
    Returns the file's path and the torch module. The exporters' warnings are silenced.
    """
    import torch
    import torchvision

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    path = Path(path_or_folder)
    if path.is_dir():
        path = path / f"resnet18-{exporter}.onnx"
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()
    if batchnorm_stats:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    for p in net.parameters():
        p.requires_grad_(False)
    shape = (example_batch, 3, size, size)
    x = torch.rand(*shape) if random_example else torch.zeros(*shape)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(net, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                  verbose=False, **names)
            else:
                torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  do_constant_folding=exporter == "legacy", **names)
    finally:
        logging.disable(logging.NOTSET)
    return Resnet18(path, net)


def resnet18_onnx(size: int, seed: int = 0, **options):
    """``export_resnet18`` into a temporary folder, loaded back as an onnx.ModelProto (the folder is removed)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="cloakonnx-bench-") as tmp:
        return onnx.load(str(export_resnet18(Path(tmp), size, seed, **options).path))


# --- main(): run, report errors, print ---------------------------------------------------------------------


def add_output_options(ap: argparse.ArgumentParser, out: bool = False) -> None:
    """--json, and with ``out`` also --out FILE."""
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    if out:
        ap.add_argument("--out", type=Path, help="also write the JSON result to this file")


def emit(result: dict, args: argparse.Namespace, table: Callable[[dict], str]) -> int:
    """Print ``result`` as indented JSON with --json, else ``table(result)``; write the JSON to --out where the
    script has that option. Returns 0, the exit status."""
    text = json.dumps(result, indent=2)
    if getattr(args, "out", None):
        Path(args.out).write_text(text + "\n")
    print(text if args.json else table(result))
    return 0


def run_main(fn: Callable[[argparse.Namespace], dict], args: argparse.Namespace,
             table: Callable[[dict], str]) -> int:
    """The benchmarks' main(): ``result = fn(args)``, then ``emit``. A CloakError (bad input, a provider that
    does not load) is one line on stderr, ``<script>: error: ...``, and exit status 1, not a traceback."""
    from cloakonnx.errors import CloakError

    try:
        result = fn(args)
    except CloakError as exc:
        print(f"{Path(fn.__code__.co_filename).stem}: error: {exc}", file=sys.stderr)
        return 1
    return emit(result, args, table)


def parse_sizes(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """``--sizes 1000,20000``: at least two positive sample counts, sorted; else the parser's usage error."""
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes takes integers, e.g. 1000,20000")
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error("--sizes needs at least two positive sizes")
    return sizes


def log_to_stderr() -> None:
    """INFO lines, bare, on stderr: a benchmark's progress (stdout keeps the result)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --- clocks ------------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU seconds of this process so far, all threads (``time.process_time``): unlike wall-clock time, not
    inflated when other tenants of a shared machine take the cores."""
    return time.process_time()


class Clock:
    """Wall and CPU seconds of a block: ``with Clock() as c: ...``, then ``c.wall`` and ``c.cpu``."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


# --- memory (Linux /proc) ----------------------------------------------------------------------------------

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status(fields: tuple[str, ...] = STATUS_FIELDS) -> dict[str, int]:
    """Memory counters of this process from /proc/self/status, in bytes: by default VmRSS (resident now),
    VmHWM (peak resident, what ru_maxrss reports), RssAnon (anonymous pages) and RssFile (file-backed)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in fields:
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS, by writing 5 to /proc/self/clear_refs."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


class AnonPeak:
    """Peak RssAnon of a block, sampled from /proc/self/status every ``interval`` seconds by a thread."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _rss_anon(self) -> int:
        return proc_status(("RssAnon",))["RssAnon"]

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss_anon())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._rss_anon()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss_anon())


# --- inputs: the folder `cloakonnx demo` wrote, or explicit paths --------------------------------------------


def demo_paths(folder: Path) -> tuple[Path, Path, Path]:
    """(model, hardening data, held-out test data) in a folder written by ``cloakonnx demo``."""
    return folder / "digits_cnn.onnx", folder / "digits.npz", folder / "test.npz"


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--demo-dir, or --model, --data and --test; resolve them with ``resolve_model_options``."""
    ap.add_argument("--demo-dir", type=Path, help="folder written by `cloakonnx demo` (model, digits.npz, test.npz)")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--data", type=Path, help="data for harden (split into calibration and validation)")
    ap.add_argument("--test", type=Path, help="held-out data neither training nor hardening saw")


def add_harden_options(ap: argparse.ArgumentParser) -> None:
    """The hardening settings the mask benchmarks share: PGD --eps and --steps, --max-clean-drop, --val-split."""
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-clean-drop", type=float, default=1.0)
    ap.add_argument("--val-split", type=float, default=0.3)


def resolve_model_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill --model/--data/--test from --demo-dir where not given; exit with usage if any is missing."""
    if args.demo_dir:
        model, data, test = demo_paths(args.demo_dir)
        args.model, args.data, args.test = args.model or model, args.data or data, args.test or test
    if not (args.model and args.data and args.test):
        ap.error("give --demo-dir, or --model, --data and --test")


def parse_model_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, with --json added and --model/--data/--test resolved (``resolve_model_options``)."""
    add_output_options(ap)
    args = ap.parse_args(argv)
    resolve_model_options(ap, args)
    return args
