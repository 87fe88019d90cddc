"""Learned masks: train the mask values against an adaptive attacker, with the model's weights frozen.

The paper scores features one at a time by how far adversarial noise moves them; on many models that
buys nothing. Here the mask is relaxed to m = sigmoid(theta) (theta starts at ``init``, so m is about
0.95) and trained: each step crafts a short PGD against the *currently masked* model (the adaptive
attacker) on a batch of calibration samples, then takes a gradient step on theta alone with the loss
CE(masked(x_adv)) + CE(masked(x)) (+ an optional sparsity term). The learned values then order the
features: the lowest are masked first.

Masks can sit on several tensors at once: one value per feature of a 2-D tensor, per channel of a
4-D one. Gradients flow to them through the torch executor, which runs a copy of the graph where each
tensor is multiplied by a new graph input (:func:`cloakonnx.graph.surgery.with_mask_inputs`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from .attacks import PGD, AttackConfig
from .config import MASK, LearnConfig, MaskConfig
from .data import Dataset, Preprocess
from .errors import CloakError
from .graph import select_input
from .graph.surgery import mask_shape, with_mask_inputs
from .pipeline import Prepared
from .search import MaskSearch
from .timing import StageTimer

log = logging.getLogger(__name__)

@dataclass
class LearnedMasks:
    """The learned multipliers per tensor (flat, in (0, 1)), each tensor's rank, and the cost."""

    values: dict[str, np.ndarray]
    ranks: dict[str, int]
    seconds: float
    steps: int
    history: list[float] = field(default_factory=list)  # the training loss every 10 steps


def inner_attack_config(attack: AttackConfig, config: LearnConfig, seed: int) -> AttackConfig:
    """The attacker inside the learning loop: the run's eps and norm, few steps."""
    if config.inner_attack == "fgsm":  # FGSM with a random start (Wong et al., 2020)
        return AttackConfig(name="pgd", eps=attack.eps, norm=attack.norm, steps=1, step_size=1.25 * attack.eps,
                            seed=seed)
    return AttackConfig(name="pgd", eps=attack.eps, norm=attack.norm, steps=config.inner_steps, seed=seed)


def learn_masks(model: onnx.ModelProto, tensors: list[str], logits: str, preprocess: Preprocess, data: Dataset,
                attack: AttackConfig, config: LearnConfig, device: str = "cpu", seed: int = 0,
                input_name: str | None = None) -> LearnedMasks:
    """Learn one mask per tensor in ``tensors`` jointly, on ``data`` (the calibration split)."""
    import torch

    from .torch_exec import OnnxTorchModule

    config.validate()
    config = config.with_defaults_for(MASK)
    start = time.perf_counter()
    torch.manual_seed(seed)
    image = select_input(model, input_name).name
    shapes = tensor_widths(model, tensors, preprocess, data.x[:1], image)
    masked, value_inputs = with_mask_inputs(model, {t: mask_shape(w, r) for t, (w, r) in shapes.items()})
    module = OnnxTorchModule(masked, outputs=[logits]).to(device).eval()
    masked_net = masked_model(module, image, dict(zip(value_inputs, tensors)), shapes, config.init).to(device)
    net = preprocess.torch_wrap(masked_net, data.x.ndim)  # box-space inputs, as the attacks expect
    sparsity = (lambda: config.sparsity * torch.cat(masked_net.masks()).mean()) if config.sparsity else None
    desc = "learning the mask" if len(tensors) == 1 else "learning the masks"
    history = adversarial_training(net, masked_net.thetas.parameters(), data, attack, config, config.lr_for(MASK),
                                   preprocess.bounds, device, seed, desc, sparsity).history
    values = {t: m.detach().cpu().numpy().reshape(-1).astype(np.float64) for t, m in zip(tensors, masked_net.masks())}
    seconds = time.perf_counter() - start
    log.info("learned masks on %s in %.1f s (%d steps): %s", ", ".join(map(repr, tensors)), seconds, config.steps,
             "; ".join(f"{int((v < 0.5).sum())} of {v.size} below 0.5" for v in values.values()))
    return LearnedMasks(values, {t: r for t, (_, r) in shapes.items()}, seconds, config.steps, history)


RISE_CHECK_STEP = 20  # when check_rise compares the probe's loss with where it started


class StepTooLarge(Exception):
    """After the first steps, the loss on a fixed probe batch, under the same attack, was above what
    it was at the start, or the clean accuracy on the held-out probe had collapsed: the step size is
    too large for this model (a deep pretrained network's weights, say), and the run should start
    again smaller."""

    def __init__(self, first: float, later: float, what: str = "the loss on a fixed probe batch", unit: str = ".3f"):
        super().__init__(f"{what} {'rose' if later > first else 'fell'} from {first:{unit}} to {later:{unit}} "
                         f"in {RISE_CHECK_STEP} steps")
        self.first, self.later = first, later


WATCH_SAMPLES = 128  # the validation probe the early stop attacks: at most this many samples
WATCH_SLACK = 0.01  # the early stop's allowance: this share of the probe, as a 1-point clean budget
# The rise check also gives a step size up when the held-out probe's clean accuracy fell by more than
# this in RISE_CHECK_STEP steps: PP-LCNet at 1e-3 went from 128 of 128 right to 62 at step 25 while the
# training loss fell (from 3.99 to 1.57: the attacked term shrinks when every prediction is unsure), then
# needed more than 100 steps to climb back; at 1e-4 the early stop ended it at step 25, 99.8% on validation.
WRECK_DROP = 0.2


@dataclass
class Training:
    """What the loop did: the loss every 10 steps, how many steps it took (fewer than asked when it
    stopped early) and what stopped it ("loss": the training loss; "validation": the probe)."""

    history: list[float]
    steps: int
    stopped_by: str | None = None


class EarlyStop:
    """The checks that end a learning run before its last step, run after each step.

    ``stop_below``: stop once the mean loss of the last 10 steps is below it (the inner attacker no
    longer finds anything to learn from). ``check_rise``: raise :class:`StepTooLarge` when, after
    ``RISE_CHECK_STEP`` steps, the loss on a fixed probe batch under the same attack is above its
    value at the start, or (with ``watch``) the clean accuracy on the held-out probe fell by more than
    WRECK_DROP. A single training batch is too noisy for that: on the demo, batches of 32 at a step
    size of 1e-5, which barely moves the weights, went from 0.73 at step 1 to 1.48 at step 11.
    ``watch`` (held-out samples, the validation split): every ``config.stop_every`` steps the inner
    attack, with a fixed start, runs on up to WATCH_SAMPLES of them, and learning stops once as many
    of them survive it as the model got right, clean, before learning (less WATCH_SLACK of them): the
    attacker this run trains against has nothing left to find, judged on data the steps never saw
    (early stopping on a held-out robust loss). Counting survivors against the starting clean count,
    not flips among what is right now, keeps a wrecked model (one class for every input: nothing to
    flip) from passing. Both probes draw from their own generators, so a run they do not stop is the
    run it would be without them."""

    def __init__(self, net, data: Dataset, attack: AttackConfig, config: LearnConfig, seed: int, bounds,
                 device: str, batch: int, stop_below: float | None, check_rise: bool, watch: Dataset | None):
        self.steps, self.stop_below = config.steps, stop_below
        self.probe = fixed_attack(net, data, attack, config, seed, bounds, device, batch) if check_rise else None
        self.before = self.probe()[0] if self.probe else None
        self.every = config.stop_every if watch is not None and len(watch) else 0
        self.held_out = fixed_attack(net, watch, attack, config, seed, bounds, device,
                                     min(WATCH_SAMPLES, len(watch)), batch) if self.every else None
        self.right = self.held_out(attacked=False)[2] if self.held_out else None  # before learning
        self.target = self.right - int(WATCH_SLACK * self.held_out.size) if self.held_out else None

    def after(self, done: int, losses: list[float], desc: str) -> str | None:
        """Why to stop after ``done`` steps ("loss", "validation"), or None to go on."""
        if self.probe and done == RISE_CHECK_STEP:
            later = self.probe()[0]
            if later > self.before:
                raise StepTooLarge(self.before, later)
            right = self.held_out(attacked=False)[2] if self.held_out else None
            if right is not None and right < self.right - WRECK_DROP * self.held_out.size:
                raise StepTooLarge(self.right / self.held_out.size, right / self.held_out.size,
                                   f"the clean accuracy on {self.held_out.size} held-out samples", ".1%")
        if self.stop_below is not None and done >= 10 and np.mean(losses[-10:]) < self.stop_below:
            log.info("%s: stopped at step %d of %d: the loss of the last 10 steps, %.4f, is below %g (the inner "
                     "attacker no longer finds anything to learn from)", desc, done, self.steps,
                     np.mean(losses[-10:]), self.stop_below)
            return "loss"
        if self.held_out and done % self.every == 0 and done < self.steps:
            _, flipped, right = self.held_out()
            log.debug("%s: step %d: %d of %d held-out samples survive the inner attack (stop at %d)", desc, done,
                      right - flipped, self.held_out.size, self.target)
            if right - flipped >= max(1, self.target):
                log.info("%s: stopped at step %d of %d: %d of %d held-out samples survive the inner attack, as many "
                         "as were right before learning (less %g%%)", desc, done, self.steps, right - flipped,
                         self.held_out.size, 100 * WATCH_SLACK)
                return "validation"
        return None


def adversarial_training(net, params, data: Dataset, attack: AttackConfig, config: LearnConfig, lr: float,
                         bounds: tuple[float, float], device: str, seed: int, desc: str,
                         extra_loss=None, stop_below: float | None = None, check_rise: bool = False,
                         watch: Dataset | None = None) -> Training:
    """The loop masks and fine-tuned weights share: each step draws a calibration batch, crafts the
    inner attack on the *current* ``net`` (the adaptive attacker), and takes an Adam step on
    ``params`` alone with CE(net(x_adv)) + CE(net(x)) (+ ``extra_loss()``). Nothing in it rewards
    smaller logits. ``stop_below``, ``check_rise`` and ``watch`` end it early (:class:`EarlyStop`)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    inner = PGD(net, inner_attack_config(attack, config, seed), bounds)
    optimiser = torch.optim.Adam(params, lr=lr)  # state for the moving parameters only
    rng = np.random.default_rng(seed)
    batch, history, losses = min(config.batch_size, len(data)), [], []
    stops = EarlyStop(net, data, attack, config, seed, bounds, device, batch, stop_below, check_rise, watch)
    bar, every, start = tqdm(range(config.steps), desc=desc, unit="step", leave=False, disable=None), \
        max(1, config.steps // 10), time.perf_counter()
    for step in bar:
        idx = np.sort(rng.choice(len(data), size=batch, replace=False))
        x = torch.from_numpy(data.x[idx]).to(device)
        y = torch.from_numpy(data.y[idx]).to(device)
        x_adv = inner(x, y)
        loss = F.cross_entropy(net(x_adv), y) + F.cross_entropy(net(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 10 == 0:
            history.append(round(losses[-1], 4))
        if bar.disable and ((step + 1) % every == 0 or step == 1):  # no terminal (a log, CI): a line every tenth
            spent = time.perf_counter() - start
            log.info("%s: step %d of %d, loss %.4f, %.0f s, about %.0f s to go", desc, step + 1, config.steps,
                     losses[-1], spent, spent / (step + 1) * (config.steps - step - 1))
        try:
            why = stops.after(step + 1, losses, desc)
        except StepTooLarge:
            bar.close()
            raise
        if why:
            bar.close()
            return Training(history, step + 1, why)
    return Training(history, config.steps)


def fixed_attack(net, data: Dataset, attack: AttackConfig, config: LearnConfig, seed: int, bounds, device: str,
                 size: int, chunk: int | None = None):
    """A function giving, on ``size`` fixed samples of ``data`` attacked each time with the same random
    start (the inner attack), the training loss (CE(x_adv) + CE(x), on the first chunk), how many the
    attack turns from right to wrong, and how many are right: two calls compare the weights, not the
    batches. ``chunk``: samples per forward pass (default: all at once). ``attacked=False``: clean only."""
    import torch
    import torch.nn.functional as F

    idx = np.sort(np.random.default_rng([seed, 1]).choice(len(data), size=size, replace=False))
    x, y = torch.from_numpy(data.x[idx]).to(device), torch.from_numpy(data.y[idx]).to(device)
    cfg, chunk = inner_attack_config(attack, config, seed + 1), chunk or size

    def run(attacked: bool = True) -> tuple[float, int, int]:
        loss, flipped, right = None, 0, 0
        for at in range(0, size, chunk):
            xs, ys = x[at:at + chunk], y[at:at + chunk]
            x_adv = PGD(net, cfg, bounds)(xs, ys) if attacked else xs  # a fresh attacker: the same start each time
            with torch.no_grad():
                clean, adv = net(xs), net(x_adv)
            loss = float(F.cross_entropy(adv, ys) + F.cross_entropy(clean, ys)) if loss is None else loss
            ok = clean.argmax(1) == ys
            right += int(ok.sum())
            flipped += int((ok & (adv.argmax(1) != ys)).sum())
        return loss, flipped, right

    run.size = size
    return run


def learn_on(p: Prepared, config: MaskConfig, model: onnx.ModelProto, tensors: list[str]) -> LearnedMasks:
    """Learn masks for ``tensors`` of ``model`` on the calibration split, with the run's attack budget."""
    return learn_masks(model, tensors, p.target.logits, config.preprocess, p.calib, p.attack, config.learn, p.device,
                       config.seed, config.input_name)


def learn_stage(p: Prepared, config: MaskConfig, search: MaskSearch, timer: StageTimer, tensors: list[str]) -> dict:
    """Learn mask values for ``tensors`` against an adaptive attacker on the model hardened so far."""
    with timer("learning"):
        result = learn_on(p, config, search.runner.model, tensors)
    previous = search.learning or {"seconds": 0.0, "steps": 0}
    search.learning = {"tensors": tensors, "seconds": round(previous["seconds"] + result.seconds, 3),
                       "steps": previous["steps"] + result.steps, "loss": result.history}
    search.ranks.update(result.ranks)
    return result.values


def tensor_shapes(model: onnx.ModelProto, tensors: list[str], preprocess: Preprocess, sample: np.ndarray,
                  image: str) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in one forward pass of ``sample`` through the torch executor."""
    import torch

    from .torch_exec import OnnxTorchModule

    module = OnnxTorchModule(model, outputs=list(tensors)).eval()
    if list(module.input_names) != [image]:
        raise CloakError(f"mask learning needs a model with one input, this one takes {module.input_names}")
    with torch.no_grad():
        outs = module(torch.from_numpy(preprocess.to_model(sample)))
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {name: tuple(out.shape) if out.is_floating_point() else () for name, out in zip(tensors, outs)}


def tensor_widths(model: onnx.ModelProto, tensors: list[str], preprocess: Preprocess, sample: np.ndarray,
                  image: str) -> dict[str, tuple[int, int]]:
    """(mask width, rank) per tensor: channels for 4-D, features for 2-D."""
    widths = {}
    for name, shape in tensor_shapes(model, tensors, preprocess, sample, image).items():
        if len(shape) not in (2, 4):
            raise CloakError(f"tensor {name!r} has shape {list(shape) or 'non-float'}; a learned mask needs a "
                             "float tensor of rank 2 (features) or 4 (channels)")
        widths[name] = (int(shape[1]), len(shape))
    return widths


def _masked_model_class():
    import torch

    class MaskedModel(torch.nn.Module):
        """Model input -> logits of the graph with each tensor multiplied by sigmoid(theta)."""

        def __init__(self, module, image: str, tensor_of: dict[str, str], shapes, init: float):
            super().__init__()
            self.module, self.image, self.tensor_of = module, image, tensor_of
            self.shapes = {t: mask_shape(w, r) for t, (w, r) in shapes.items()}
            self.thetas = torch.nn.ParameterDict(
                {str(i): torch.nn.Parameter(torch.full((shapes[t][0],), float(init))) for i, t in
                 enumerate(tensor_of.values())})

        def masks(self):
            return [torch.sigmoid(self.thetas[str(i)]) for i in range(len(self.thetas))]

        def forward(self, x):
            masks = dict(zip(self.tensor_of, self.masks()))
            feeds = {self.image: x}
            for name, tensor in self.tensor_of.items():
                feeds[name] = masks[name].reshape(self.shapes[tensor])
            return self.module(*[feeds[n] for n in self.module.input_names])

    return MaskedModel


def masked_model(module, image: str, tensor_of: dict[str, str], shapes, init: float):
    """A ``MaskedModel`` over ``module`` (the class is built on first use, so torch loads lazily)."""
    return _masked_model_class()(module, image, tensor_of, shapes, init)
