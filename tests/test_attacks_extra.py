"""Square (gradient-free) and APGD (CE, DLR) on a small MLP trained on real digits in this module."""
import numpy as np
import pytest
import torch

from cloakonnx.attacks import AttackConfig
from cloakonnx.attacks.apgd import APGD, APGDDLR, APGDT, checkpoints, dlr_loss, dlr_targeted_loss
from cloakonnx.attacks.fab import FAB, FABT, project_l2, project_linf
from cloakonnx.attacks.fgsm import FGSM
from cloakonnx.attacks.square import Square, p_selection
from cloakonnx.errors import CloakError

EXTRA = {"square": Square, "apgd-ce": APGD, "apgd-dlr": APGDDLR, "apgd-t": APGDT, "fab": FAB, "fab-t": FABT}
EPS = {"linf": 0.1, "l2": 1.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches: one intra-op thread is several times faster on a busy 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def digits_mlp(one_thread):
    """A 64-128-10 MLP on sklearn's digits (x/16 in [0, 1], shape [N, 1, 8, 8]); ~97% held out, ~1 s."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)[:, None])
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[train]), y[train]).backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x_t, y_t = x[test], y[test]
    with torch.no_grad():
        keep = net(x_t).argmax(1) == y_t  # attack correctly classified digits, as the papers do
    assert keep.float().mean() > 0.93
    return net, x_t[keep][:128], y_t[keep][:128]


class ForwardOnly:
    """An onnxruntime-like model: asserts every call is a no-grad forward pass; counts calls and samples."""

    def __init__(self, net):
        self.net, self.calls, self.samples = net, 0, 0

    def __call__(self, x):
        assert not torch.is_grad_enabled(), "a gradient-free attack ran the model with autograd on"
        assert not x.requires_grad
        self.calls += 1
        self.samples += len(x)
        return self.net(x).numpy()  # numpy, as an onnxruntime session would give


def accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def run(cls, model, x, y, **cfg):
    cfg.setdefault("steps", 20)
    cfg.setdefault("queries", 300)
    return cls(model, AttackConfig(**cfg))(x, y)


@pytest.mark.parametrize("name", sorted(EXTRA))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_ball_box_and_accuracy_drop(digits_mlp, name, norm):
    net, x, y = digits_mlp
    x, y = x[:64], y[:64]
    eps = EPS[norm]
    model = ForwardOnly(net) if name == "square" else net
    adv = run(EXTRA[name], model, x, y, eps=eps, norm=norm, seed=0)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    delta = (adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert accuracy(net, adv, y) < 0.5  # all 64 start correctly classified


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_other_box(digits_mlp, name):
    """The box is [lo, hi], not always [0, 1]."""
    net, x, y = digits_mlp
    x, y = x[:32], y[:32]
    shifted = lambda z: net(z + 1.0)  # noqa: E731 - the model takes inputs in [-1, 0]
    model = ForwardOnly(shifted) if name == "square" else shifted
    adv = EXTRA[name](model, AttackConfig(eps=0.1, steps=10, queries=100), bounds=(-1.0, 0.0))(x - 1.0, y)
    assert adv.min() >= -1.0 and adv.max() <= 0.0
    assert (adv - (x - 1.0)).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_repeatable_with_the_same_seed(digits_mlp, name):
    net, x, y = digits_mlp
    x, y = x[:32], y[:32]
    a = run(EXTRA[name], net, x, y, eps=0.05, seed=7, queries=100, steps=10)
    b = run(EXTRA[name], net, x, y, eps=0.05, seed=7, queries=100, steps=10)
    c = run(EXTRA[name], net, x, y, eps=0.05, seed=8, queries=100, steps=10)
    assert torch.equal(a, b)
    if name in ("fab", "fab-t"):  # one run (per target) from the clean point: nothing random to seed
        assert torch.equal(a, c)
    else:
        assert not torch.equal(a, c)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_is_forward_only_and_respects_the_query_budget(digits_mlp, norm):
    net, x, y = digits_mlp
    model = ForwardOnly(net)
    budget = 50
    attack = Square(model, AttackConfig(name="square", eps=EPS[norm] / 2, norm=norm, queries=budget, seed=0))
    adv = attack(x, y)
    assert Square.needs_gradients is False
    assert model.calls == attack.model_calls <= budget
    assert attack.queries_used.max().item() <= budget
    assert model.samples == attack.queries_used.sum().item()
    # per-sample early stop: fooled samples stop being queried, so fewer than n * budget forward passes
    fooled = net(adv).argmax(1) != y
    assert fooled.any() and model.samples < len(x) * budget
    assert (attack.queries_used[fooled] < budget).any()
    assert (attack.queries_used[~fooled] == budget).all()  # the unbroken ones used the whole budget


def test_square_leaves_misclassified_samples_alone(digits_mlp):
    net, x, y = digits_mlp
    wrong = (y[:16] + 1) % 10
    model = ForwardOnly(net)
    attack = Square(model, AttackConfig(eps=0.1, queries=100))
    assert torch.equal(attack(x[:16], wrong), x[:16])
    assert model.calls == 1 and attack.queries_used.tolist() == [1] * 16


def test_apgd_is_at_least_as_strong_as_fgsm(digits_mlp):
    net, x, y = digits_mlp
    eps = 0.1
    fgsm = accuracy(net, FGSM(net, AttackConfig(eps=eps))(x, y), y)
    ce = accuracy(net, run(APGD, net, x, y, eps=eps, steps=20), y)
    dlr = accuracy(net, run(APGDDLR, net, x, y, eps=eps, steps=20), y)
    assert ce <= fgsm and dlr <= fgsm


def test_apgd_restarts_keep_the_worst_case(digits_mlp):
    net, x, y = digits_mlp
    one = accuracy(net, run(APGD, net, x, y, eps=0.05, steps=10, restarts=1, seed=1), y)
    three = accuracy(net, run(APGD, net, x, y, eps=0.05, steps=10, restarts=3, seed=1), y)
    assert three <= one


def test_apgd_loss_and_class_checks(digits_mlp):
    net, x, y = digits_mlp
    two = lambda z: net(z)[:, :2]  # noqa: E731 - a binary classifier
    with pytest.raises(CloakError, match="at least 3 classes"):
        APGDDLR(two, AttackConfig(eps=0.1, steps=2))(x[:4], y[:4] % 2)
    with pytest.raises(CloakError, match="loss"):
        APGD(net, AttackConfig(), loss="hinge")
    assert APGD(net, AttackConfig(), loss="dlr").loss == "dlr"
    adv = APGD(two, AttackConfig(eps=0.1, steps=2))(x[:4], y[:4] % 2)  # CE is fine with 2 classes
    assert adv.shape == x[:4].shape


def test_dlr_loss_values():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [1.0, 3.0, 0.0, -1.0]])
    y = torch.tensor([0, 0])
    # correct: -(3 - 1) / (3 - 0); wrong: -(1 - 3) / (3 - 0)
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-2 / 3, 2 / 3]))
    assert torch.allclose(dlr_loss(10 * logits, y), dlr_loss(logits, y))  # scale-invariant


def test_schedules_follow_the_papers():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(5) == [2, 3, 4, 5]
    assert checkpoints(1) == [1]
    # Square: p halves at 10, 50, 200, 500, 1000, ... of 10,000 queries, scaled to the budget
    assert p_selection(0.05, 0, 1000) == 0.05 and p_selection(0.05, 1, 1000) == 0.05
    assert p_selection(0.05, 2, 1000) == 0.025
    assert p_selection(0.05, 100, 1000) == 0.05 / 16
    assert p_selection(0.05, 999, 1000) == 0.05 / 512


@pytest.mark.parametrize("kwargs, match", [(dict(queries=1), "--queries"), (dict(), "image inputs")])
def test_square_errors(digits_mlp, kwargs, match):
    net, x, y = digits_mlp
    with pytest.raises(CloakError, match=match):
        Square(lambda z: net(z.view(-1, 1, 8, 8)), AttackConfig(**kwargs))(x[:4].flatten(1), y[:4])


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_zero_eps_returns_the_input(digits_mlp, name):
    net, x, y = digits_mlp
    assert torch.equal(run(EXTRA[name], net, x[:8], y[:8], eps=0.0), x[:8])


def test_square_searches_on_one_thread_but_queries_the_model_on_the_callers(digits_mlp):
    """The search's tiny tensor ops run on one torch thread (faster on CPU, see
    benchmarks/square_speed.py); the model calls and the caller get their thread count back."""
    net, x, y = digits_mlp
    seen = []

    def model(z):
        seen.append(torch.get_num_threads())
        return net(z)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        search = []

        class Recording(Square):
            def _signs(self, shape, device):
                search.append(torch.get_num_threads())
                return super()._signs(shape, device)

        a = Recording(model, AttackConfig(eps=0.1, queries=20, seed=0))(x[:16], y[:16])
        assert set(search) == {1} and set(seen) == {2} and torch.get_num_threads() == 2
        Square.search_threads = None
        b = Square(net, AttackConfig(eps=0.1, queries=20, seed=0))(x[:16], y[:16])
    finally:
        Square.search_threads = 1
        torch.set_num_threads(before)
    assert torch.equal(a, b)  # the thread count changes speed only


def test_apgd_t_targets_the_runner_up_classes_and_beats_untargeted_dlr(digits_mlp):
    """APGD-T runs the targeted DLR loss towards each of the 9 next classes: at least as strong as
    one untargeted APGD-DLR run with the same steps, and it leaves misclassified samples as they are."""
    net, x, y = digits_mlp
    eps = 0.05
    dlr = accuracy(net, run(APGDDLR, net, x, y, eps=eps, steps=20), y)
    adv = run(APGDT, net, x, y, eps=eps, steps=20)
    assert accuracy(net, adv, y) <= dlr
    with torch.no_grad():
        shifted = y.clone()
        shifted[:8] = (net(x[:8]).argmax(1) + 1) % 10  # labels the model gets wrong already
    adv = run(APGDT, net, x[:32], shifted[:32], eps=eps, steps=5)
    assert torch.equal(adv[:8], x[:8]) and not torch.equal(adv[8:], x[8:32])
    two = lambda z: net(z)[:, :2]  # noqa: E731 - a binary classifier
    with pytest.raises(CloakError, match="APGD-T needs a model with at least 3 classes"):
        APGDT(two, AttackConfig(eps=0.1, steps=2))(x[:4], y[:4] % 2)


def test_dlr_targeted_loss_values():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [1.0, 3.0, 0.0, -1.0]])
    y, target = torch.tensor([0, 0]), torch.tensor([1, 2])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    expected = torch.tensor([-(3.0 - 1.0) / (3.0 - (0.0 - 1.0) / 2), -(1.0 - 0.0) / (3.0 - (0.0 - 1.0) / 2)])
    torch.testing.assert_close(dlr_targeted_loss(logits, y, target), expected)
    three = logits[:, :3]  # three classes: the untargeted denominator z_pi1 - z_pi3
    torch.testing.assert_close(dlr_targeted_loss(three, y, target), torch.tensor([-(2.0) / 3.0, -(1.0) / 3.0]))


def test_apgd_t_agrees_with_torchattacks(digits_mlp):
    """Independent implementation: torchattacks' APGDT (fra31's port) on the same net, samples and budget."""
    torchattacks = pytest.importorskip("torchattacks")
    net, x, y = digits_mlp
    eps, steps = 0.05, 20
    ours = accuracy(net, run(APGDT, net, x, y, eps=eps, steps=steps), y)
    theirs = accuracy(net, torchattacks.APGDT(net, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0,
                                              n_classes=10)(x, y), y)
    assert abs(ours - theirs) <= 0.02, (ours, theirs)


@pytest.mark.parametrize("project, norm", [(project_linf, "linf"), (project_l2, "l2")])
def test_fab_projections_reach_the_plane_inside_the_box_with_the_smallest_step(project, norm):
    g = torch.Generator().manual_seed(0)
    p, w = torch.rand(64, 30, generator=g), torch.randn(64, 30, generator=g)
    b = (w * torch.rand(64, 30, generator=g)).sum(1)  # a plane through a point of the box: reachable
    d = project(p, w, b)
    torch.testing.assert_close((w * (p + d)).sum(1), b, atol=1e-4, rtol=0)
    assert (p + d).min() >= -1e-6 and (p + d).max() <= 1 + 1e-6
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    # no feasible step is smaller: scaled down by 2%, the step falls short of the plane
    short = (w * (p + 0.98 * d)).sum(1) - b
    assert ((short.abs() > 1e-5) | (size < 1e-6)).all()


@pytest.mark.parametrize("attack, multi_targeted", [(FABT, True), (FAB, False)])
def test_fab_agrees_with_torchattacks(digits_mlp, attack, multi_targeted):
    """Independent implementation: torchattacks' FAB (fra31's port) with multi_targeted=True for FAB-T and
    False for untargeted FAB, on the same net, samples and budget, in both norms."""
    torchattacks = pytest.importorskip("torchattacks")
    net, x, y = digits_mlp
    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        ours = accuracy(net, attack(net, AttackConfig(eps=eps, norm=norm, steps=20))(x, y), y)
        theirs = accuracy(net, torchattacks.FAB(net, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=20,
                                                n_restarts=1, multi_targeted=multi_targeted, n_classes=10,
                                                seed=0)(x, y), y)
        assert abs(ours - theirs) <= 0.02, (norm, ours, theirs)


def test_fab_steps_towards_the_nearest_linearised_boundary():
    """On a linear model the closest boundary is known in closed form: FAB must pick that class, not
    the one with the smallest logit gap."""
    # raw logit gaps 0.85, 0.63, 1.9; L-inf distances 0.77, 0.9, 0.63: the largest gap is the nearest
    w = torch.tensor([[1.0, 0.0], [0.0, 0.1], [0.3, 0.0], [0.0, -2.0]])
    net = torch.nn.Linear(2, 4, bias=False)
    net.weight.data = w
    x, y = torch.tensor([[0.9, 0.5]]), torch.tensor([0])
    attack = FAB(net, AttackConfig(eps=1.0, norm="linf"))
    diff, grad, _ = attack._diff_and_grad(x, y, None)
    # boundaries to class k: (w_k - w_0) . x = 0; L-inf distance |f_k - f_0| / ||w_k - w_0||_1
    f = x @ w.T
    dist = [(f[0, 0] - f[0, k]).abs() / (w[k] - w[0]).abs().sum() for k in (1, 2, 3)]
    k = 1 + int(torch.tensor(dist).argmin())
    assert k == 3
    torch.testing.assert_close(diff, f[:, k] - f[:, 0])
    torch.testing.assert_close(grad, (w[k] - w[0])[None])
