import numpy as np
import pytest
import torch

from cloakonnx.attacks import ATTACKS, AttackConfig
from cloakonnx.backend import craft
from cloakonnx.errors import CloakError


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_respect_eps_ball_and_box(digits_net, name, norm):
    net, held = digits_net
    x, y = held.x[:64], held.y[:64]
    eps = 0.1 if norm == "linf" else 1.0
    cfg = AttackConfig(name=name, eps=eps, norm=norm, steps=5, queries=200, seed=0)
    adv = craft(net, cfg, x, y)
    delta = (adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert np.abs(delta).max() <= eps + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    with torch.no_grad():
        clean_acc = (net(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
        adv_acc = (net(torch.from_numpy(adv)).argmax(1).numpy() == y).mean()
    assert adv_acc < clean_acc - 0.1  # the attack really attacks


def test_pgd_is_stronger_than_fgsm_and_repeatable(digits_net):
    net, held = digits_net
    x, y = held.x[:128], held.y[:128]

    def acc(a):
        with torch.no_grad():
            return (net(torch.from_numpy(a)).argmax(1).numpy() == y).mean()

    fgsm = craft(net, AttackConfig(name="fgsm", eps=0.1), x, y)
    pgd = craft(net, AttackConfig(name="pgd", eps=0.1, steps=10, seed=3), x, y)
    pgd2 = craft(net, AttackConfig(name="pgd", eps=0.1, steps=10, seed=3), x, y)
    assert acc(pgd) <= acc(fgsm)
    assert np.array_equal(pgd, pgd2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1), "--eps"), (dict(eps=2.0), "larger than the box"), (dict(norm="l1"), "--norm"),
    (dict(steps=0), "--steps"),
])
def test_bad_attack_options(kwargs, match):
    with pytest.raises(CloakError, match=match):
        AttackConfig(**kwargs).validate((0.0, 1.0))


# --- each attack's own settings ------------------------------------------------------------------------------

OTHER_VALUES = {"steps": 3, "step_size": 0.01, "random_start": False, "restarts": 2, "queries": 7}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_an_attack_ignores_exactly_the_settings_it_does_not_declare(name):
    """A setting outside the attack's ``settings`` changes nothing it crafts, so reports may leave it
    out; changing the declared ones, taken together, changes the result."""
    from dataclasses import replace

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 4))
    x = torch.rand(24, 1, 4, 4)
    y = net(x).argmax(1).detach()
    base = AttackConfig(name=name, eps=0.3, steps=2, queries=30, seed=1)

    def run(cfg):
        attack = ATTACKS[name](net, cfg)
        attack.set_samples(range(len(x)))
        return attack(x, y)

    reference = run(base)
    declared = ATTACKS[name].settings
    ignored = {k: v for k, v in OTHER_VALUES.items() if k not in declared}
    assert torch.equal(run(replace(base, **ignored)), reference), f"{name} reads a setting it does not declare"
    if declared:
        changed = run(replace(base, **{k: OTHER_VALUES[k] for k in declared}))
        assert not torch.equal(changed, reference), f"{name} declares settings it does not read"
    assert set(base.describe()) == {"name", "eps", "norm", "seed", "batch_size", *declared}
