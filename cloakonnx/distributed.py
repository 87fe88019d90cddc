"""Running the attacks on a Ray cluster: harden's and sweep's calibration (partial feature sums),
their held-out attacks (adversarial inputs), and evaluate's attacks (one survival bit per sample).

The driver does everything else exactly as in one process. The data is split into shards of
consecutive samples, cut at multiples of the attack batch and of the onnxruntime batch, so every
worker sees the same batches one process would; each sample's random start depends only on the
seed and its index (``Attack.set_samples``); and the partial sums come back one onnxruntime batch
at a time and are added in the same order as one process adds them. So the result is the same to
the byte. Workers are Ray actors holding an onnxruntime session and the torch executor per model;
they read the data themselves (paths, files, image lists travel, not arrays).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os

import numpy as np

from .backend import LocalBackend
from .config import RayConfig
from .errors import CloakError, first_line
from .runner import Runner
from .timing import StageTimer

log = logging.getLogger(__name__)

SHARDS_PER_WORKER = 4  # finer shards balance the load, retry less work and move the progress bar


def import_ray():
    try:
        import ray
    except ImportError:
        raise CloakError("--ray needs Ray, an optional extra: pip install \"cloakonnx[ray]\"") from None
    return ray


def plan_shards(n: int, unit: int, shards: int) -> list[tuple[int, int]]:
    """At most ``shards`` ranges of consecutive positions covering ``n``, each a multiple of ``unit``
    long (but the last), as even as that allows."""
    units = math.ceil(n / unit) if n else 0
    k = max(1, min(shards, units))
    cuts = [round(i * units / k) * unit for i in range(k + 1)]
    return [(min(a, n), min(b, n)) for a, b in zip(cuts, cuts[1:]) if min(a, n) < min(b, n)]


class RayBackend:
    """The attacks on a Ray cluster: one command's Ray connection and its workers. It offers what
    :class:`~cloakonnx.backend.LocalBackend` offers, and each worker runs a ``LocalBackend``."""

    def __init__(self, config: RayConfig, device: str):
        config.validate()
        ray = import_ray()
        self.ray, self.started = ray, False
        if not ray.is_initialized():
            kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
            try:
                if config.address:
                    ray.init(address=config.address, **kwargs)
                else:
                    ray.init(num_cpus=config.workers or os.cpu_count() or 1, **kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray's connection errors vary by version
                raise CloakError(f"could not {'join the Ray cluster at ' + config.address if config.address else 'start Ray'}"
                                 f": {first_line(exc)}") from exc
            self.started = True
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        self.use_gpus = gpus > 0 and device.startswith("cuda")
        self.workers = config.workers or (gpus if self.use_gpus else cpus)
        self.threads = config.threads or max(1, cpus // self.workers)
        self.retries = config.retries
        self.address = ray.get_runtime_context().gcs_address
        options = dict(max_restarts=self.retries, max_task_retries=self.retries,
                       num_cpus=self.threads, num_gpus=1 if self.use_gpus else 0)
        self.actors = [ray.remote(Worker).options(**options).remote(self.threads)
                       for _ in range(self.workers)]
        self.models: dict[str, object] = {}
        self.shards_run = 0
        log.info("Ray at %s: %d worker(s), %d thread(s) each%s", self.address, self.workers, self.threads,
                 ", one GPU each" if self.use_gpus else "")

    def describe(self) -> dict:
        return {"address": self.address, "workers": self.workers, "threads_per_worker": self.threads,
                "gpu_per_worker": self.use_gpus, "shards": self.shards_run}

    def _cancel(self, running: dict) -> None:
        """Stop the other shards' tasks after a failure, quietly: wait for them to end before the
        actors are killed, so Ray does not retry them (and print that it does)."""
        for ref in running:
            try:
                self.ray.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished, or not cancellable: waited for below
                pass
        try:
            self.ray.wait(list(running), num_returns=len(running), timeout=60)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.started:
            self.ray.shutdown()

    # -- the backend's operations ----------------------------------------------------------------------

    def model_ref(self, runner) -> tuple[str, object, dict]:
        """(key, object ref of the serialized model, Runner arguments) for ``runner``, put once."""
        data = runner.model.SerializeToString()
        key = hashlib.sha256(data).hexdigest()
        if key not in self.models:
            self.models[key] = self.ray.put(data)
        return key, self.models[key], runner.rebuild_args()

    def calibrate(self, runner, ds, attack, batch: int, device: str, feature: str, logits: str, head_weight,
                  ort_batch_size: int, desc: str = "", timer: StageTimer | None = None):
        """Calibration statistics of ``ds`` attacked through ``runner``, from every worker, merged in
        order: (FeatureStats, clean accuracy, adversarial accuracy). Attack and statistics both run on
        the workers, so the whole call is the "attack" stage."""
        from .runtime import batch_size_for
        from .stats import FeatureStats

        with (timer or StageTimer())("attack"):
            unit = math.lcm(batch, batch_size_for(runner.session, ort_batch_size))
            model = self.model_ref(runner)
            results = self._map(ds, unit, desc, lambda actor, shard: actor.calibrate.remote(
                model, shard, attack, batch, device, feature, logits, head_weight, ort_batch_size))
            stats = None
            correct_clean = correct_adv = count = 0
            for parts, cc, ca, n in results:
                for part in parts:
                    stats = FeatureStats(part.width, ndim=part.ndim) if stats is None else stats
                    stats.merge(part)
                correct_clean, correct_adv, count = correct_clean + cc, correct_adv + ca, count + n
            n = max(count, 1)
            return stats, correct_clean / n, correct_adv / n

    def craft(self, runner, attack, ds, device: str, desc: str, batch: int) -> np.ndarray:
        """Adversarial versions of ``ds`` crafted through ``runner`` by the workers, in order."""
        model = self.model_ref(runner)
        parts = self._map(ds, batch, desc, lambda actor, shard: actor.craft.remote(model, shard, attack, batch, device))
        return np.concatenate(parts) if parts else np.zeros((0, *ds.x.shape[1:]), np.float32)

    def survivors(self, judge, crafter, attack, ds, device: str, batch: int, ort_batch_size: int,
                  desc: str = "") -> np.ndarray:
        """Which samples of ``ds`` ``judge`` still classifies correctly after ``attack`` crafted on ``crafter``."""
        judged, crafted = self.model_ref(judge), self.model_ref(crafter)
        parts = self._map(ds, batch, desc, lambda actor, shard: actor.survivors.remote(
            judged, crafted, shard, attack, batch, device, ort_batch_size))
        return np.concatenate(parts) if parts else np.zeros(0, bool)

    def _map(self, ds, unit: int, desc: str, submit) -> list:
        """Run ``submit(actor, shard)`` over the shards of ``ds`` on the workers (each worker one shard
        at a time), with one progress bar in samples; results in shard order. A shard that still
        fails after the retries fails the run, naming it."""
        from tqdm.auto import tqdm

        ray = self.ray
        shards = plan_shards(len(ds), unit, self.workers * SHARDS_PER_WORKER)
        self.shards_run += len(shards)
        results: list = [None] * len(shards)
        queue = list(range(len(shards)))
        running: dict = {}
        idle = list(self.actors)
        with tqdm(total=len(ds), desc=f"{desc} (ray, {self.workers} workers)", unit="img", leave=False,
                  disable=None) as bar:
            while queue or running:
                while queue and idle:
                    i, actor = queue.pop(0), idle.pop(0)
                    a, b = shards[i]
                    running[submit(actor, ds.subset(np.arange(a, b)))] = (i, actor)
                done, _ = ray.wait(list(running), num_returns=1)
                i, actor = running.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - RayTaskError, RayActorError, ...
                    self._cancel(running)
                    a, b = shards[i]
                    cause = getattr(exc, "cause", None) or exc
                    if isinstance(cause, CloakError):
                        raise CloakError(f"shard {i + 1} of {len(shards)} (samples {a}..{b - 1}): {cause}") from None
                    raise CloakError(f"shard {i + 1} of {len(shards)} (samples {a}..{b - 1}) failed after "
                                     f"{self.retries} retries: {type(cause).__name__}: {first_line(cause)}") from exc
                idle.append(actor)
                bar.update(shards[i][1] - shards[i][0])
        return results


class Worker:
    """A Ray actor: a Runner per model (onnxruntime session and torch executor), built once, and the
    same :class:`~cloakonnx.backend.LocalBackend` loops as one process runs."""

    def __init__(self, threads: int):
        from .allocator import keep_freed_memory
        from .runtime import limit_threads

        limit_threads(threads)
        keep_freed_memory()
        self.local = LocalBackend()
        self.runners: dict = {}

    def _runner(self, model) -> Runner:
        key, data, args = model
        if key not in self.runners:
            import onnx
            import ray

            data = data if isinstance(data, bytes) else ray.get(data)  # a reference inside a tuple is not resolved
            self.runners[key] = Runner(onnx.load_from_string(data), **args)
        return self.runners[key]

    def calibrate(self, model, ds, attack, batch, device, feature, logits, head_weight, ort_batch_size):
        stream = self.local.calibration_stream(self._runner(model), ds, attack, batch, device, feature, logits,
                                               head_weight, ort_batch_size, keep_batches=True)
        stream.finish()
        return stream.batches, stream.correct_clean, stream.correct_adv, stream.count

    def craft(self, model, ds, attack, batch, device):
        return np.concatenate([adv for _, _, adv in
                               self.local.craft_batches(self._runner(model), attack, ds, device, "", batch)])

    def survivors(self, judge, crafter, ds, attack, batch, device, ort_batch_size):
        return self.local.survivors(self._runner(judge), self._runner(crafter), attack, ds, device, batch,
                                    ort_batch_size)
