"""Adversarial attacks in PyTorch (FGSM, PGD, APGD, APGD-T, FAB, FAB-T, Square): one small class each.

Attacks take a batch and return its adversarial version; reading data in batches, sizing them and
running them here or on a cluster is :mod:`cloakonnx.backend`'s job."""
from __future__ import annotations

from ..errors import CloakError
from .apgd import APGD, APGDDLR, APGDT
from .base import Attack, AttackConfig
from .fab import FAB, FABT
from .fgsm import FGSM
from .pgd import PGD
from .square import Square

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "apgd-ce": APGD, "apgd-dlr": APGDDLR, "apgd-t": APGDT,
                                    "fab": FAB, "fab-t": FABT, "square": Square}


def make_attack(model, config: AttackConfig, bounds=(0.0, 1.0)) -> Attack:
    try:
        cls = ATTACKS[config.name]
    except KeyError:
        raise CloakError(f"unknown attack {config.name!r}; choose one of {', '.join(ATTACKS)}") from None
    return cls(model, config, bounds)


__all__ = ["APGD", "APGDDLR", "APGDT", "FAB", "FABT", "Attack", "AttackConfig", "ATTACKS", "FGSM", "PGD", "Square", "make_attack"]
