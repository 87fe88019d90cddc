"""evaluate's attack plans as data: AutoAttack's fixed presets, and the plan built from ``--attack``.

A preset is a fixed, documented list of attacks with fixed settings, run AutoAttack's way
(cumulative): each attack only on the points still robust after the ones before it, so each row is
the robust accuracy so far. The settings are the reference implementation's (fra31/auto-attack,
100 iterations; torchattacks' AutoAttack class keeps its attacks' default of 10).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .attacks import ATTACKS, AttackConfig
from .config import EvaluateConfig
from .errors import CloakError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    attacks: tuple[tuple[str, dict], ...]  # (attack name, its fixed settings), in the order they run


PRESETS = {p.name: p for p in (
    Preset("standard", "AutoAttack's standard version (Croce & Hein 2020): APGD-CE, APGD-T (9 targets), FAB-T "
           "(9 targets), Square with 5,000 queries",
           (("apgd-ce", dict(steps=100, restarts=1)), ("apgd-t", dict(steps=100, restarts=1)),
            ("fab-t", dict(steps=100, restarts=1)), ("square", dict(queries=5000)))),
    Preset("plus", "AutoAttack's plus version: APGD-CE, APGD-DLR and untargeted FAB with 5 restarts, Square, "
           "then APGD-T and FAB-T",
           (("apgd-ce", dict(steps=100, restarts=5)), ("apgd-dlr", dict(steps=100, restarts=5)),
            ("fab", dict(steps=100, restarts=5)), ("square", dict(queries=5000)),
            ("apgd-t", dict(steps=100, restarts=1)), ("fab-t", dict(steps=100, restarts=1)))),
    Preset("fast", "for quick iterations: APGD-CE and APGD-T",
           (("apgd-ce", dict(steps=100, restarts=1)), ("apgd-t", dict(steps=100, restarts=1)))),
)}

# In a cumulative (preset) run, every white-box attack first, then transfer, then gradient-free,
# as AutoAttack orders them.
THREAT_ORDER = ("adaptive", "transfer", "gradient-free")
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 3}  # DLR losses compare the top three logits


def attack_plan(config: EvaluateConfig) -> list[AttackConfig]:
    """The attacks evaluate runs, at the first eps: the preset's fixed settings (only the norm, the
    seed and the batch come from the user), or ``--attack``'s list with the run's settings."""
    if config.preset is not None and config.preset not in PRESETS:
        raise CloakError(f"unknown --preset {config.preset!r}; choose from {', '.join(PRESETS)}")
    plan = PRESETS[config.preset].attacks if config.preset else tuple((a, {}) for a in config.attacks)
    out = []
    for name, settings in plan:
        if name not in ATTACKS:
            raise CloakError(f"unknown attack {name!r}; choose from {', '.join(sorted(ATTACKS))}")
        if config.preset:
            cfg = AttackConfig(name=name, eps=config.eps[0], norm=config.attack.norm, seed=config.seed,
                               batch_size=config.attack.batch_size, **settings)
        else:
            cfg = replace(config.attack, name=name, eps=config.eps[0], seed=config.seed)
        out.append(cfg)
    return out
