"""Adversarial attacks in PyTorch (FGSM, PGD, APGD, Square) and the helper that crafts a whole dataset in batches."""
from __future__ import annotations

import numpy as np

from ..errors import CloakError
from .apgd import APGD, APGDDLR
from .base import Attack, AttackConfig
from .fgsm import FGSM
from .pgd import PGD
from .square import Square

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "apgd-ce": APGD, "apgd-dlr": APGDDLR, "square": Square}


def make_attack(model, config: AttackConfig, bounds=(0.0, 1.0)) -> Attack:
    try:
        cls = ATTACKS[config.name]
    except KeyError:
        raise CloakError(f"unknown attack {config.name!r}; choose one of {', '.join(ATTACKS)}") from None
    return cls(model, config, bounds)


def craft(model, config: AttackConfig, x: np.ndarray, y: np.ndarray, bounds=(0.0, 1.0),
          device: str = "cpu", desc: str = "attack", batch_size: int | None = None) -> np.ndarray:
    """Adversarial versions of ``x`` (numpy, box space), crafted batch by batch with a progress bar.

    ``batch_size`` overrides the config's, e.g. 1 for a static-batch model.
    """
    import torch
    from tqdm.auto import tqdm

    attack = make_attack(model, config, bounds)
    bs = batch_size or config.batch_size
    out = np.empty_like(x)
    torch.manual_seed(config.seed)
    with tqdm(total=len(x), desc=desc, unit="img", leave=False, disable=None) as bar:
        for start in range(0, len(x), bs):
            xb = torch.from_numpy(x[start : start + bs]).to(device)
            yb = torch.from_numpy(y[start : start + bs]).to(device)
            out[start : start + len(xb)] = attack(xb, yb).cpu().numpy()
            bar.update(len(xb))
    return out


__all__ = ["APGD", "APGDDLR", "Attack", "AttackConfig", "ATTACKS", "FGSM", "PGD", "Square", "craft", "make_attack"]
