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


def craft(model, config: AttackConfig, x: np.ndarray, y: np.ndarray, bounds=(0.0, 1.0),
          device: str = "cpu", desc: str = "attack", batch_size: int | None = None,
          fixed_batch: bool = False) -> np.ndarray:
    """Adversarial versions of ``x`` (numpy, box space), crafted batch by batch with a progress bar.

    ``batch_size`` overrides the config's (e.g. the one sized to the device). When the device runs
    out of memory the batch is halved and the failed batch retried, unless the model's batch is
    fixed (``fixed_batch``), where nothing smaller can run.
    """
    import torch
    from tqdm.auto import tqdm

    from ..batching import CPU_CAP, is_out_of_memory

    attack = make_attack(model, config, bounds)
    bs = batch_size or config.batch_size or CPU_CAP
    out = np.empty_like(x)
    torch.manual_seed(config.seed)
    with tqdm(total=len(x), desc=desc, unit="img", leave=False, disable=None) as bar:
        start = 0
        while start < len(x):
            xb = torch.from_numpy(x[start : start + bs]).to(device)
            yb = torch.from_numpy(y[start : start + bs]).to(device)
            try:
                out[start : start + len(xb)] = attack(xb, yb).cpu().numpy()
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
            bar.update(len(xb))
            start += len(xb)
    return out


__all__ = ["APGD", "APGDDLR", "APGDT", "FAB", "FABT", "Attack", "AttackConfig", "ATTACKS", "FGSM", "PGD", "Square", "craft", "make_attack"]
