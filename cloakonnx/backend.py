"""Where the attacks run. A backend is chosen once per command (``pipeline.open_backend``) and the
commands never ask which one they have:

- :class:`LocalBackend` runs them in this process;
- ``distributed.RayBackend`` runs this same :class:`LocalBackend` inside Ray workers on shards of
  the data and merges what they return, so each loop below is written once.

Every backend offers the same three operations on a :class:`~cloakonnx.runner.Runner`: ``craft``
(adversarial inputs), ``calibrate`` (streamed feature statistics) and ``survivors`` (one bit per
sample: still classified correctly after the attack)."""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from .attacks import AttackConfig, make_attack
from .batching import CPU_CAP, is_out_of_memory
from .data import Dataset
from .errors import CloakError, first_line
from .runner import Runner
from .data import OutputRows, batch_bounds, prefetched
from .stats import StatsStream
from .timing import StageTimer

log = logging.getLogger(__name__)


def craft_batches(model, config: AttackConfig, x, y: np.ndarray, bounds=(0.0, 1.0), device: str = "cpu",
                  desc: str = "attack", batch_size: int | None = None, fixed_batch: bool = False,
                  index=None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, clean batch, adversarial batch)`` over ``x`` in order, attacking the torch
    callable ``model``, with a progress bar; the next batch of ``x`` is read while this one is attacked.

    ``index`` holds each sample's index in its source (default: its position): it seeds the sample's
    random start (``Attack.set_samples``). ``batch_size`` overrides the config's (e.g. the one sized to
    the device). When the device runs out of memory the batch is halved and the failed batch retried,
    unless the model's batch is fixed (``fixed_batch``), where nothing smaller can run.
    """
    import torch
    from tqdm.auto import tqdm

    attack = make_attack(model, config, bounds)
    bs = batch_size or config.batch_size or CPU_CAP
    index = np.arange(len(x)) if index is None else np.asarray(index)
    torch.manual_seed(config.seed)
    chunks = batch_bounds(len(x), bs)
    with tqdm(total=len(x), desc=desc, unit="img", leave=False, disable=None) as bar:
        for (s, e), x_chunk in zip(chunks, prefetched(x, chunks)):
            start = s
            while start < e:
                stop = min(start + bs, e)
                xb = torch.from_numpy(np.ascontiguousarray(x_chunk[start - s : stop - s])).to(device)
                yb = torch.from_numpy(y[start:stop]).to(device)
                attack.set_samples(index[start:stop])
                try:
                    adv = attack(xb, yb).cpu().numpy()
                except Exception as exc:  # noqa: BLE001 - only memory exhaustion is handled here
                    if not is_out_of_memory(exc):
                        raise
                    if fixed_batch or bs == 1:
                        raise CloakError(f"{device} ran out of memory attacking a batch of {bs}: {first_line(exc)}"
                                         ) from exc
                    del xb, yb
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    bs //= 2
                    log.warning("%s ran out of memory: attack batch halved to %d", device, bs)
                    continue
                yield start, xb.cpu().numpy() if device != "cpu" else xb.numpy(), adv
                bar.update(stop - start)
                start = stop


def craft(model, config: AttackConfig, x, y: np.ndarray, bounds=(0.0, 1.0), device: str = "cpu",
          desc: str = "attack", batch_size: int | None = None, fixed_batch: bool = False, index=None):
    """Adversarial versions of ``x`` (box space) crafted on the torch callable ``model``: a numpy
    array when ``x`` is one, else rows spooled to disk, so memory does not grow with the data."""
    out = OutputRows(x, "adversarial")
    for _, _, adv in craft_batches(model, config, x, y, bounds, device, desc, batch_size, fixed_batch, index):
        out.write(adv)
    return out.result()


class LocalBackend:
    """The attacks in this process, a batch at a time."""

    def describe(self) -> dict | None:
        """What the report records about the backend (None: nothing to say)."""
        return None

    def close(self) -> None:
        """Release what the backend holds (nothing here)."""

    def craft_batches(self, runner: Runner, attack: AttackConfig, ds: Dataset, device: str, desc: str,
                      batch: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(start, clean batch, adversarial batch)`` over ``ds``, crafted on ``runner`` (through the graph it runs)."""
        return craft_batches(runner.model_for(attack.name), attack, ds.x, ds.y, runner.preprocess.bounds, device,
                             desc, batch, fixed_batch=bool(runner.fixed_batch), index=ds.index)

    def craft(self, runner: Runner, attack: AttackConfig, ds: Dataset, device: str, desc: str, batch: int):
        """Adversarial versions of ``ds.x`` crafted on ``runner``: numpy for numpy inputs, else a temporary file."""
        out = OutputRows(ds.x, "adversarial")
        for _, _, adv in self.craft_batches(runner, attack, ds, device, desc, batch):
            out.write(adv)
        return out.result()

    def calibration_stream(self, runner: Runner, ds: Dataset, attack: AttackConfig, batch: int, device: str,
                           feature: str, logits: str, head_weight, ort_batch_size: int, desc: str = "",
                           timer: StageTimer | None = None, keep_batches: bool = False) -> StatsStream:
        """Attack ``ds`` through ``runner`` a batch at a time and add each batch's feature statistics
        to a stream (``timer``: the attack and statistics stages), then drop the batch."""
        timer = timer or StageTimer()
        stream = StatsStream(runner.session, feature, logits, runner.feed, ort_batch_size, head_weight,
                             keep_batches=keep_batches)
        batches = self.craft_batches(runner, attack, ds, device, desc, batch)
        while True:
            with timer("attack"):
                item = next(batches, None)
            if item is None:
                return stream
            start, clean, adv = item
            with timer("statistics"):
                stream.add(clean, adv, ds.y[start : start + len(adv)])

    def calibrate(self, runner: Runner, ds: Dataset, attack: AttackConfig, batch: int, device: str, feature: str,
                  logits: str, head_weight, ort_batch_size: int, desc: str = "", timer: StageTimer | None = None):
        """(FeatureStats, clean accuracy, adversarial accuracy) of ``ds`` attacked through ``runner``."""
        timer = timer or StageTimer()
        stream = self.calibration_stream(runner, ds, attack, batch, device, feature, logits, head_weight,
                                         ort_batch_size, desc, timer)
        with timer("statistics"):
            return stream.finish()

    def survivors(self, judge: Runner, crafter: Runner, attack: AttackConfig, ds: Dataset, device: str, batch: int,
                  ort_batch_size: int, desc: str = "") -> np.ndarray:
        """Which samples of ``ds`` ``judge`` still classifies correctly after ``attack`` crafted on
        ``crafter``, a batch at a time: one bit per sample is all that is kept."""
        return np.concatenate([judge.predict(adv, ort_batch_size) == ds.y[start : start + len(adv)]
                               for start, _, adv in self.craft_batches(crafter, attack, ds, device, desc, batch)])
