"""Supermasks: train *which* weights survive while every weight stays at its random init.

Two finders, for any network the batched trainer can stack (an ``nn.Sequential`` of Linear, Conv2d,
ReLU, pooling and Flatten is the fast ``bmm`` path of ``stacked.py``); K masks train side by side as
one batched network, each with its own weights, scores, data order and random draws:

* **learned supermask** (Zhou et al., arXiv 1905.01067 §5): a real score ``s`` per weight; every
  step the mask is sampled ``m ~ Bernoulli(sigmoid(s))`` and the gradient passes straight through
  the sample to ``sigmoid(s)`` (their code's ``bernoulli + p - stop_gradient(p)``). Scores start at
  0 (keep probability 0.5), so the density is *learned*, not fixed. Weights: the init as it is, or
  Zhou's signed constant (``sign(w) * std`` of the layer).
  Evaluation **samples**, as Zhou's code does: the returned ``Mask`` is one Bernoulli draw from the
  final probabilities (seeded by the network's seed) and ``test_acc`` is the accuracy of exactly
  that mask; ``sampled_test_acc`` is the mean over ``samples`` draws (the number Zhou report) and
  ``expected_test_acc`` uses the expected mask (weights times ``sigmoid(s)``: not a binary mask).
  Curves evaluate one fresh draw per evaluation.
* **edge-popup** (Ramanujan et al. 2019, arXiv 1911.13299): a score per weight; the forward pass
  keeps the weights of the ``k`` largest ``|s|`` of each layer (``k = n - round((1 - density) n)``,
  the same exact count as ``pruning.py``) and the gradient passes straight through the selection to
  every score. Weights: Kaiming normal or the signed Kaiming constant, optionally scaled as if each
  layer's fan-in were ``density * fan_in`` (their ``--scale-fan``). Evaluation is deterministic:
  the top-k mask, which is the returned ``Mask``.

**Dynamic weight rescaling** (Zhou et al. §5, ``rescale=True``): every time a mask is applied, each
layer's kept weights are multiplied by ``layer size / weights kept``, so the layer's output keeps
its scale however many weights the mask drops (for the expected mask, by ``layer size / sum of
keep probabilities``). ``SupermaskResult.masked_state`` applies the same factor.

Only the scores are optimised (fused Adam, or SGD as in the edge-popup paper); the weights are plain
tensors outside the optimizer and come back unchanged. Biases stay at their init and are never
masked (like ``prunable_names``: Linear/Conv weights only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.mask import Mask, prunable_names
from ..core.pruning import prune_layerwise
from ..core.seeds import derive_seed
from ..errors import TicketlabError
from ..zoo.data import Dataset
from .stacked import State, max_stack_size, stack_networks
from .trainer import Batches, TrainSpec, loss_and_accuracy, make_optimizer

METHODS = ("learned", "edge_popup")
WEIGHTS = ("init", "signed_constant", "kaiming_normal", "kaiming_constant")

# Scores are not weights: their own Adam learning rates, tuned on MNIST-1D, mnist5k and digits
# (learned: 0.03 and 0.3 do worse; edge-popup: 0.01 and 0.03 do clearly worse, 0.001 about equal).
DEFAULT_LR = {"learned": 0.1, "edge_popup": 0.003}


def default_spec(method: str, steps: int, batch_size: int = 100, eval_every: int = 0) -> TrainSpec:
    """Score-training settings: Adam at ``DEFAULT_LR[method]``, ~10 evaluations by default;
    edge-popup's learning rate decays along a cosine, as in Ramanujan et al. (measured here at
    1,000 steps: equal or better than a constant rate in 7 of 8 runs on mnist5k and MNIST-1D,
    +1.1 to +2.2 points on average with the signed Kaiming constant)."""
    if method not in METHODS:
        raise TicketlabError(f"unknown supermask method {method!r}; known: {', '.join(METHODS)}")
    every = eval_every or max(1, steps // 10)
    return TrainSpec(
        steps=steps,
        batch_size=batch_size,
        lr=DEFAULT_LR[method],
        eval_every=every,
        cosine=method == "edge_popup",
    )


Progress = Callable[[int], None]


class BernoulliST(torch.autograd.Function):
    """``m ~ Bernoulli(p)`` (from uniform noise given by the caller, so draws are seeded per
    network); the gradient goes straight through the sample to ``p``."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (noise < p).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class TopKST(torch.autograd.Function):
    """1 on the ``k`` largest scores of each network's layer (axis 0 is the network), 0 elsewhere;
    the gradient goes straight through to every score."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:
        flat = scores.reshape(scores.shape[0], -1)
        top = flat.topk(k, dim=1, sorted=False).indices
        return torch.zeros_like(flat).scatter_(1, top, 1.0).view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@dataclass
class SupermaskResult:
    """One trained supermask: the binary mask, the (unchanged) weights it selects from, accuracy."""

    method: str
    weights_kind: str
    mask: Mask
    weights: State
    test_acc: float
    density: float
    curve: dict[str, list[float]]
    sampled_test_acc: float | None = None
    expected_test_acc: float | None = None
    rescaled: bool = False

    def masked_state(self) -> State:
        """The network the mask defines: weights times mask, times ``size / kept`` per layer with
        dynamic weight rescaling (what ``test_acc`` evaluates)."""
        state = {}
        for n, t in self.weights.items():
            if n not in self.mask.tensors:
                state[n] = t.clone()
                continue
            keep = self.mask[n].to(t.dtype)
            factor = keep.numel() / max(1.0, float(keep.sum())) if self.rescaled else 1.0
            state[n] = t * keep * factor
        return state

    def metrics(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "weights": self.weights_kind,
            "test_acc": self.test_acc,
            "sampled_test_acc": self.sampled_test_acc,
            "expected_test_acc": self.expected_test_acc,
            "rescaled": self.rescaled,
            "untrained_test_acc": self.curve["test_acc"][0],
            "weights_remaining": self.density,
            "layer_remaining": self.mask.layer_density(),
            "curve": self.curve,
        }


def n_keep(numel: int, density: float) -> int:
    """Weights kept in a layer of ``numel`` at ``density``: the count ``prune_layerwise`` keeps."""
    return numel - int(round((1.0 - density) * numel))


def _fan_in(w: torch.Tensor) -> int:
    return max(1, w[0].numel()) if w.dim() > 1 else max(1, w.numel())


def frozen_weights(init: State, names: Sequence[str], kind: str, fan_scale: float = 1.0) -> State:
    """The weights a supermask selects from, derived from ``init`` without new randomness.

    ``init``: as given. ``signed_constant``: ``sign(w) * std(layer)`` (Zhou). ``kaiming_normal``:
    the layer's values rescaled to std ``sqrt(2 / fan_in)`` (a Gaussian init *is* a Kaiming normal
    draw up to this scale). ``kaiming_constant``: ``sign(w) * sqrt(2 / fan_in)`` (edge-popup's
    signed constant). ``fan_scale`` < 1 scales the Kaiming std as if fan-in were
    ``fan_scale * fan_in``.
    """
    out = {n: t.detach().clone() for n, t in init.items()}
    for name in names:
        w = out[name]
        kaiming = math.sqrt(2.0 / (_fan_in(w) * fan_scale))
        if kind == "init":
            continue
        if kind == "signed_constant":
            out[name] = torch.sign(w) * w.std()
        elif kind == "kaiming_normal":
            out[name] = w / w.std() * kaiming
        elif kind == "kaiming_constant":
            out[name] = torch.sign(w) * kaiming
        else:
            raise TicketlabError(f"unknown supermask weights {kind!r}; known: {', '.join(WEIGHTS)}")
    return out


def _initial_scores(method: str, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if method == "learned":  # Zhou's sigmoid_bias = 0: every weight kept with probability 1/2
        return torch.zeros_like(w)
    # edge-popup: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(_fan_in(w))
    return (torch.rand(w.shape, generator=g, dtype=torch.float64) * 2 - 1).to(w.dtype) * bound


def _validate(method: str, weights: str, density: float, inits, seeds, spec: TrainSpec) -> None:
    if method not in METHODS:
        raise TicketlabError(f"unknown supermask method {method!r}; known: {', '.join(METHODS)}")
    if weights not in WEIGHTS:
        raise TicketlabError(f"unknown supermask weights {weights!r}; known: {', '.join(WEIGHTS)}")
    if not 0.0 < density < 1.0:
        raise TicketlabError(f"supermask density must be in (0, 1), got {density}")
    if not inits:
        raise TicketlabError("no network to train a supermask for")
    if len(seeds) != len(inits):
        raise TicketlabError(f"{len(inits)} inits but {len(seeds)} seeds")
    if spec.steps < 1:
        raise TicketlabError(f"supermask steps must be >= 1, got {spec.steps}")


def find_supermasks(
    template: nn.Module,
    inits: Sequence[State],
    data: Dataset,
    spec: TrainSpec,
    *,
    method: str = "learned",
    weights: str = "init",
    density: float = 0.5,
    scale_fan: bool = False,
    rescale: bool = False,
    seeds: Sequence[int] | None = None,
    samples: int = 10,
    stack_size: int | None = None,
    progress: Progress | None = None,
) -> list[SupermaskResult]:
    """Train one supermask per init (``method``: 'learned' or 'edge_popup'), up to 16 at a time.

    ``spec`` holds the *score* optimiser's settings (steps, batch size, adam/sgd, lr, schedule);
    ``density`` is edge-popup's kept fraction per layer (the learned supermask learns its own).
    """
    seeds = list(range(len(inits))) if seeds is None else list(seeds)
    _validate(method, weights, density, inits, seeds, spec)
    choice = _Choice(method, weights, density, scale_fan, rescale, samples)
    size = min(stack_size or max_stack_size(template), max_stack_size(template))
    results: list[SupermaskResult] = []
    for start in range(0, len(inits), size):
        chunk = slice(start, start + size)
        results += _train_chunk(template, inits[chunk], data, spec, choice, seeds[chunk], progress)
    return results


@dataclass(frozen=True)
class _Choice:
    """How the masks of one ``find_supermasks`` call are found (see its arguments)."""

    method: str
    weights: str
    density: float
    scale_fan: bool
    rescale: bool
    samples: int


def learned_supermask(
    template: nn.Module,
    init: State,
    data: Dataset,
    spec: TrainSpec,
    *,
    weights: str = "init",
    seed: int = 0,
    samples: int = 10,
    rescale: bool = False,
) -> SupermaskResult:
    """Zhou et al.'s learned supermask of one network (see the module docstring)."""
    options = {"method": "learned", "weights": weights, "samples": samples, "rescale": rescale}
    return find_supermasks(template, [init], data, spec, seeds=[seed], **options)[0]


def edge_popup(
    template: nn.Module,
    init: State,
    data: Dataset,
    spec: TrainSpec,
    *,
    density: float = 0.5,
    weights: str = "kaiming_constant",
    scale_fan: bool = False,
    seed: int = 0,
) -> SupermaskResult:
    """Ramanujan et al.'s edge-popup mask of one network: exactly ``density`` kept per layer."""
    options = {"weights": weights, "density": density, "scale_fan": scale_fan}
    return find_supermasks(
        template, [init], data, spec, method="edge_popup", seeds=[seed], **options
    )[0]


class _Supermasks:
    """K networks' frozen weights and trainable scores in the stack's working layout."""

    def __init__(self, template, states, data, spec, choice: _Choice, seeds):
        self.dtype = getattr(torch, spec.dtype)
        self.method, self.density, self.rescale = choice.method, choice.density, choice.rescale
        self.names = prunable_names(template)
        self.stack = stack_networks(template, states, self.dtype, data.x_train)
        self.k = self.stack.size
        self.frozen = {n: p.detach() for n, p in self.stack.params.items()}
        self.gens = [torch.Generator().manual_seed(derive_seed(s, "supermask")) for s in seeds]
        self.scores = {n: self._initial(n, states) for n in self.names}
        self.counts = {n: n_keep(states[0][n].numel(), self.density) for n in self.names}

    def _initial(self, name: str, states: Sequence[State]) -> torch.Tensor:
        """Each network's initial scores (from its own generator), stacked in working layout."""
        per_net = [
            _initial_scores(self.method, state[name], g)
            for state, g in zip(states, self.gens, strict=True)
        ]
        working = self.stack.to_working(name, torch.stack(per_net)).to(self.dtype)
        return working.contiguous().requires_grad_()

    def _noise(self, name: str) -> torch.Tensor:
        shape = self.scores[name].shape[1:]
        return torch.stack(
            [torch.rand(shape, generator=g, dtype=torch.float64) for g in self.gens]
        ).to(self.dtype)

    def masks(self) -> dict[str, torch.Tensor]:
        """This step's masks (differentiable through the straight-through estimators)."""
        if self.method == "edge_popup":
            return {n: TopKST.apply(self.scores[n].abs(), self.counts[n]) for n in self.names}
        return {
            n: BernoulliST.apply(torch.sigmoid(self.scores[n]), self._noise(n)) for n in self.names
        }

    def use(self, masks: dict[str, torch.Tensor]) -> None:
        """Point the stack's forward pass at ``frozen * mask`` (frozen tensors stay untouched),
        rescaled per network and layer by ``size / kept`` when ``rescale`` is on."""
        self.stack.params = {
            n: self.frozen[n] * self._rescaled(masks[n]) if n in masks else self.frozen[n]
            for n in self.frozen
        }

    def _rescaled(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` ([K, ...], any layout) times each network's ``size / kept``; the factor is a
        constant to the gradient, which reaches the scores through the mask only."""
        if not self.rescale:
            return mask
        kept = mask.detach().flatten(1).sum(1).clamp_min(1.0)
        factor = (mask[0].numel() / kept).view(-1, *([1] * (mask.dim() - 1)))
        return mask * factor

    def canonical(self, name: str, working: torch.Tensor, i: int) -> torch.Tensor:
        return self.stack.to_canonical(name, working.detach())[i].clone()

    def final_masks(self) -> list[Mask]:
        """Edge-popup: the exact top-k of ``|s|`` per layer. Learned: one seeded Bernoulli draw."""
        out = []
        for i, g in enumerate(self.gens):
            if self.method == "edge_popup":
                scores = {n: self.canonical(n, self.scores[n], i).abs() for n in self.names}
                ones = Mask({n: torch.ones_like(t, dtype=torch.bool) for n, t in scores.items()})
                rates = {n: 1.0 - self.density for n in self.names}
                out.append(prune_layerwise(ones, scores, rates))
            else:
                probs = {n: torch.sigmoid(self.canonical(n, self.scores[n], i)) for n in self.names}
                out.append(
                    Mask(
                        {
                            n: torch.rand(p.shape, generator=g, dtype=torch.float64) < p
                            for n, p in probs.items()
                        }
                    )
                )
        return out

    def working_masks(self, masks: Sequence[Mask]) -> dict[str, torch.Tensor]:
        return {
            n: self.stack.to_working(n, torch.stack([m[n] for m in masks])).to(self.dtype)
            for n in self.names
        }


def _train_chunk(
    template, inits, data, spec, choice: _Choice, seeds, progress
) -> list[SupermaskResult]:
    names = prunable_names(template)
    fan_scale = choice.density if choice.scale_fan else 1.0
    states = [frozen_weights(init, names, choice.weights, fan_scale) for init in inits]
    data = data.to(getattr(torch, spec.dtype))
    sm = _Supermasks(template, states, data, spec, choice, seeds)
    optimizer = make_optimizer(list(sm.scores.values()), spec)
    batches = Batches(data, [derive_seed(s, "supermask-data") for s in seeds], spec.batch_size)
    curve: dict[str, list[list[float]]] = {key: [[] for _ in range(sm.k)] for key in _CURVE_KEYS}
    loss_sum, loss_count = torch.zeros(sm.k, dtype=torch.float64), 0
    eval_at = set(spec.eval_steps())
    for step in range(spec.steps + 1):
        if step in eval_at:
            with torch.no_grad():
                sm.use(sm.masks())
                train_loss = loss_sum / loss_count if loss_count else None
                _record(curve, step, sm, data, train_loss)
            loss_sum.zero_()
            loss_count = 0
        if step == spec.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * spec.lr_factor(step)
        x, y = batches(step)
        sm.use(sm.masks())
        logits = sm.stack.forward(x)
        per_net = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="none")
        per_net = per_net.view(sm.k, -1).mean(dim=1)
        optimizer.zero_grad(set_to_none=True)
        per_net.sum().backward()
        optimizer.step()
        loss_sum += per_net.detach().double()
        loss_count += 1
        if progress:
            progress(sm.k)
    return _results(sm, states, data, curve, choice.weights, choice.samples)


_CURVE_KEYS = ("iteration", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")


def _record(curve, step: int, sm: _Supermasks, data: Dataset, train_loss) -> None:
    val_loss, val_acc = loss_and_accuracy(sm.stack, data.x_val, data.y_val)
    test_loss, test_acc = loss_and_accuracy(sm.stack, data.x_test, data.y_test)
    for i in range(sm.k):
        row = {
            "iteration": float(step),
            "train_loss": math.nan if train_loss is None else float(train_loss[i]),
            "val_loss": float(val_loss[i]),
            "val_acc": float(val_acc[i]),
            "test_loss": float(test_loss[i]),
            "test_acc": float(test_acc[i]),
        }
        for key, value in row.items():
            curve[key][i].append(value)


def _results(sm: _Supermasks, states, data, curve, weights, samples) -> list[SupermaskResult]:
    with torch.no_grad():
        masks = sm.final_masks()
        sm.use(sm.working_masks(masks))
        _, test_acc = loss_and_accuracy(sm.stack, data.x_test, data.y_test)
        sampled = expected = None
        if sm.method == "learned":
            draws = []
            for _ in range(max(1, samples)):
                sm.use(sm.masks())
                draws.append(loss_and_accuracy(sm.stack, data.x_test, data.y_test)[1])
            sampled = torch.stack(draws).mean(0)
            sm.use({n: torch.sigmoid(sm.scores[n]) for n in sm.names})
            expected = loss_and_accuracy(sm.stack, data.x_test, data.y_test)[1]
        sm.stack.params = sm.frozen
    results = []
    for i, mask in enumerate(masks):
        results.append(
            SupermaskResult(
                method=sm.method,
                weights_kind=weights,
                mask=mask,
                weights=states[i],
                test_acc=float(test_acc[i]),
                density=mask.density(),
                curve={key: [_finite_or_none(v) for v in curve[key][i]] for key in _CURVE_KEYS},
                sampled_test_acc=None if sampled is None else float(sampled[i]),
                expected_test_acc=None if expected is None else float(expected[i]),
                rescaled=sm.rescale,
            )
        )
    return results


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
