"""Adversarial attacks in PyTorch (FGSM, PGD, APGD, APGD-T, FAB, FAB-T, Square) and the helper that crafts a whole dataset in batches."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import CloakError, first_line
from .apgd import APGD, APGDDLR, APGDT
from .base import Attack, AttackConfig
from .fab import FAB, FABT
from .fgsm import FGSM
from .pgd import PGD
from .square import Square

log = logging.getLogger(__name__)

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "apgd-ce": APGD, "apgd-dlr": APGDDLR, "apgd-t": APGDT,
                                    "fab": FAB, "fab-t": FABT, "square": Square}


def make_attack(model, config: AttackConfig, bounds=(0.0, 1.0)) -> Attack:
    try:
        cls = ATTACKS[config.name]
    except KeyError:
        raise CloakError(f"unknown attack {config.name!r}; choose one of {', '.join(ATTACKS)}") from None
    return cls(model, config, bounds)


def craft(model, config: AttackConfig, x, y: np.ndarray, bounds=(0.0, 1.0), device: str = "cpu",
          desc: str = "attack", batch_size: int | None = None, fixed_batch: bool = False, index=None):
    """Adversarial versions of ``x`` (box space): a numpy array when ``x`` is one, else rows spooled
    to disk (``sources.OutputRows``), so memory does not grow with the data."""
    from ..sources import OutputRows

    out = OutputRows(x, "adversarial")
    for _, _, adv in craft_batches(model, config, x, y, bounds, device, desc, batch_size, fixed_batch, index):
        out.write(adv)
    return out.result()


def craft_batches(model, config: AttackConfig, x, y: np.ndarray, bounds=(0.0, 1.0), device: str = "cpu",
                  desc: str = "attack", batch_size: int | None = None, fixed_batch: bool = False, index=None):
    """Yield ``(start, clean batch, adversarial batch)`` over ``x`` in order, with a progress bar; the next batch
    of ``x`` is read while this one is attacked.

    ``index`` holds each sample's index in its source (default: its position): it seeds the sample's
    random start (``Attack.set_samples``). ``batch_size`` overrides the config's (e.g. the one sized to
    the device). When the device runs out of memory the batch is halved and the failed batch retried,
    unless the model's batch is fixed (``fixed_batch``), where nothing smaller can run.
    """
    import torch
    from tqdm.auto import tqdm

    from ..batching import CPU_CAP, is_out_of_memory
    from ..sources import batch_bounds, prefetched

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


__all__ = ["APGD", "APGDDLR", "APGDT", "FAB", "FABT", "Attack", "AttackConfig", "ATTACKS", "FGSM", "PGD", "Square", "craft", "craft_batches", "make_attack"]
