"""Finders: ways to choose a mask without iterative magnitude pruning, for any ``nn.Module``.

Each finder is a score per prunable weight (the highest scores survive) plus one registry line in
``FINDERS``. Scores are computed with ``torch.func.functional_call`` on the user's own module, at
the weights the caller passes (usually the init), so nothing of the module is modified. Only the
parameters named by ``core.mask.prunable_names`` (Linear/Conv weights, never BatchNorm, never an
excluded layer) are scored or pruned.

- ``snip`` (Lee et al., arXiv 1810.02340): |g ⊙ θ| on a few labelled batches.
- ``grasp`` (Wang et al., arXiv 2002.07376): S = −θ ⊙ Hg with logits divided by T = 200; the
  paper removes the *highest* S, so the keep-score here is −S = θ ⊙ Hg.
- ``synflow`` (Tanaka et al., arXiv 2006.05467): data-free; every parameter and buffer replaced by
  its absolute value, BatchNorm in eval mode, an all-ones input, R = sum of the outputs; score
  |θ ⊙ ∂R/∂θ|, recomputed over ``rounds`` rounds on the exponential schedule d^(k/rounds).
- ``magnitude_init``: |θ| at init; ``magnitude``: |θ| after training (the caller trains);
  ``random``: uniform noise (every layer keeps the same fraction with ``scope='layer'``).

Finders that need training (one-shot magnitude after training, IMP, early-bird) are orchestrated by
the ``finders`` study: this layer never imports the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import TicketlabError
from .mask import Mask, prunable_names
from .pruning import keep_top_global, keep_top_layerwise, random_mask_like

Batch = tuple[torch.Tensor, torch.Tensor]
GRASP_TEMPERATURE = 200.0
SYNFLOW_ROUNDS = 100


@dataclass(frozen=True)
class ScoreInput:
    """What a score may look at: the module (architecture and buffers), the weights to score at,
    which names are prunable, labelled batches, trained weights and a generator."""

    model: nn.Module
    weights: Mapping[str, torch.Tensor]
    names: Sequence[str]
    batches: Sequence[Batch] = ()
    trained: Mapping[str, torch.Tensor] | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    mask: Mask | None = None  # the current mask (SynFlow's rounds score the masked network)
    input_shape: tuple[int, ...] | None = None  # one example's shape (SynFlow's all-ones input)


Score = Callable[[ScoreInput], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Finder:
    """A registry entry: the score, and what it needs from the caller."""

    score: Score
    needs_data: bool = False
    needs_training: bool = False
    rounds: int = 1  # > 1: iterative, the score is recomputed on the masked network each round
    doc: str = ""


# --- the scores -----------------------------------------------------------------------------


def _params_and_buffers(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict:
    """Every tensor functional_call needs: the given weights where named, the module's own else."""
    full = {n: t.detach() for n, t in model.named_parameters()}
    full.update({n: t.detach() for n, t in model.named_buffers()})
    full.update({n: t for n, t in weights.items() if n in full})
    return full


def _masked(s: ScoreInput) -> dict[str, torch.Tensor]:
    """The weights with the current mask applied (pruned entries exactly zero)."""
    out = dict(s.weights)
    if s.mask is not None:
        for n in s.mask.names():
            out[n] = out[n] * s.mask[n].to(out[n].dtype)
    return out


def _need_batches(s: ScoreInput, name: str) -> None:
    if not s.batches:
        raise TicketlabError(f"finder {name!r} needs labelled batches")


def _eval_mode(model: nn.Module):
    """A context that puts ``model`` in eval mode and restores each module's own flag after."""

    class _Ctx:
        def __enter__(self):
            self.flags = [(m, m.training) for m in model.modules()]
            model.eval()

        def __exit__(self, *exc):
            for m, flag in self.flags:
                m.training = flag

    return _Ctx()


def snip(s: ScoreInput) -> dict[str, torch.Tensor]:
    """|∂L/∂θ ⊙ θ| summed over the batches: the loss's sensitivity to removing each connection."""
    _need_batches(s, "snip")
    full = _params_and_buffers(s.model, _masked(s))
    leaves = {n: full[n].detach().clone().requires_grad_(True) for n in s.names}
    grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
    with _eval_mode(s.model):
        for x, y in s.batches:
            loss = F.cross_entropy(functional_call(s.model, {**full, **leaves}, (x,)), y)
            for n, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True):
                grads[n] += g
    return {n: (grads[n] * leaves[n].detach()).abs() for n in s.names}


def grasp_saliency(
    s: ScoreInput, temperature: float = GRASP_TEMPERATURE
) -> dict[str, torch.Tensor]:
    """S = −θ ⊙ Hg (g, H: gradient and Hessian of the loss of logits/T, over the prunable weights).

    As in the reference code: g is the gradient summed over all batches (no graph), then Hg is the
    gradient of g·∇L_b summed over the batches.
    """
    _need_batches(s, "grasp")
    full = _params_and_buffers(s.model, _masked(s))
    leaves = {n: full[n].detach().clone().requires_grad_(True) for n in s.names}
    params = list(leaves.values())

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(s.model, {**full, **leaves}, (x,)) / temperature, y)

    with _eval_mode(s.model):
        g = [torch.zeros_like(p) for p in params]
        for x, y in s.batches:
            for acc, gi in zip(g, torch.autograd.grad(loss(x, y), params), strict=True):
                acc += gi
        hg = [torch.zeros_like(p) for p in params]
        for x, y in s.batches:
            grad_f = torch.autograd.grad(loss(x, y), params, create_graph=True)
            z = sum((gi.detach() * gf).sum() for gi, gf in zip(g, grad_f, strict=True))
            for acc, h in zip(hg, torch.autograd.grad(z, params), strict=True):
                acc += h
    return {n: -leaves[n].detach() * h for n, h in zip(leaves, hg, strict=True)}


def grasp(s: ScoreInput) -> dict[str, torch.Tensor]:
    """Keep-score −S: GraSP removes the weights of highest S = −θ ⊙ Hg (to first order, removing
    them reduces the gradient norm least, or raises it), so the lowest S survive."""
    return {n: -v for n, v in grasp_saliency(s).items()}


def synflow(s: ScoreInput) -> dict[str, torch.Tensor]:
    """|θ ⊙ ∂R/∂θ| of the linearised network: |θ| everywhere, all-ones input, R = Σ outputs.

    Float64, BatchNorm in eval mode (running statistics, also taken in absolute value, as the
    reference code does with the whole state dict). Never looks at the data."""
    full = {
        n: t.detach().abs().double() if t.is_floating_point() else t
        for n, t in _params_and_buffers(s.model, _masked(s)).items()
    }
    leaves = {n: full[n].clone().requires_grad_(True) for n in s.names}
    shape = _input_shape(s)
    with _eval_mode(s.model):
        out = functional_call(
            s.model, {**full, **leaves}, (torch.ones((1, *shape), dtype=torch.float64),)
        )
        grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    return {
        n: (g * leaves[n].detach()).abs().to(s.weights[n].dtype)
        for n, g in zip(leaves, grads, strict=True)
    }


def _input_shape(s: ScoreInput) -> tuple[int, ...]:
    """SynFlow's input shape: as given, else a batch's (shape only), else the first Linear's."""
    if s.input_shape is not None:
        return tuple(s.input_shape)
    if s.batches:
        return tuple(s.batches[0][0].shape[1:])
    first = next(m for m in s.model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise TicketlabError("synflow needs the input shape of one example: pass input_shape=")


def magnitude_init(s: ScoreInput) -> dict[str, torch.Tensor]:
    """|θ| at the weights given (the init)."""
    return {n: s.weights[n].detach().abs() for n in s.names}


def magnitude(s: ScoreInput) -> dict[str, torch.Tensor]:
    """|θ| after training: one-shot magnitude pruning (the caller trains and passes ``trained``)."""
    if s.trained is None:
        raise TicketlabError("finder 'magnitude' needs trained weights")
    return {n: s.trained[n].detach().abs() for n in s.names}


def random(s: ScoreInput) -> dict[str, torch.Tensor]:
    """Uniform noise: random pruning."""
    return {
        n: torch.rand(s.weights[n].shape, generator=s.generator, dtype=torch.float64)
        for n in s.names
    }


FINDERS: dict[str, Finder] = {
    "snip": Finder(snip, needs_data=True, doc="|g ⊙ θ| on a few labelled batches"),
    "grasp": Finder(grasp, needs_data=True, doc="−θ ⊙ Hg, T=200, lowest kept"),
    "synflow": Finder(synflow, rounds=SYNFLOW_ROUNDS, doc="data-free, 100 rounds"),
    "magnitude_init": Finder(magnitude_init, doc="|θ| at init"),
    "magnitude": Finder(magnitude, needs_training=True, doc="|θ| after training, one shot"),
    "random": Finder(random, doc="uniform random"),
}


def get_finder(name: str) -> Finder:
    if name not in FINDERS:
        raise TicketlabError(f"unknown finder {name!r}; known finders: {', '.join(FINDERS)}")
    return FINDERS[name]


# --- from scores to a mask -------------------------------------------------------------------


def keep_count(mask: Mask, density: float) -> int:
    """Weights alive at ``density`` of the prunable weights (exact, rounded half to even)."""
    return int(round(density * mask.size()))


def prune_to_density(
    mask: Mask, scores: Mapping[str, torch.Tensor], density: float, scope: str = "global"
) -> Mask:
    """Keep the top ``density`` of all prunable weights (one ranking), or of each layer."""
    if scope == "global":
        return keep_top_global(mask, scores, keep_count(mask, density))
    if scope == "layer":
        counts = {n: int(round(density * mask[n].numel())) for n in mask.names()}
        return keep_top_layerwise(mask, scores, counts)
    raise TicketlabError(f"scope must be 'global' or 'layer', got {scope!r}")


def find_mask(
    model: nn.Module,
    finder: str,
    density: float,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    batches: Sequence[Batch] = (),
    trained: Mapping[str, torch.Tensor] | None = None,
    scope: str = "global",
    invert: bool = False,
    rounds: int | None = None,
    generator: torch.Generator | None = None,
    prune_biases: bool = False,
    exclude: Sequence[str] = (),
    input_shape: Sequence[int] | None = None,
) -> Mask:
    """The mask ``finder`` keeps at ``density`` (fraction of prunable weights) for ``model``.

    ``weights``: where to score (default: the module's own parameters). ``invert``: keep the
    *lowest* scores (Frankle et al. 2021's sanity check). Iterative finders (SynFlow) prune in
    ``rounds`` rounds to densities d^(k/rounds), rescoring the masked network each round.
    """
    if not 0.0 < density <= 1.0:
        raise TicketlabError(f"density must be in (0, 1], got {density}")
    entry = get_finder(finder)
    names = prunable_names(model, prune_biases, exclude)
    if not names:
        raise TicketlabError("the model has no prunable Linear/Conv weights")
    base = {n: t.detach() for n, t in model.named_parameters()}
    if weights is not None:
        base.update({n: t for n, t in weights.items() if n in base})
    mask = Mask.ones_like({n: base[n] for n in names})
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    sign = -1.0 if invert else 1.0
    n_rounds = max(1, rounds if rounds is not None else entry.rounds)
    for k in range(1, n_rounds + 1):
        shape = tuple(input_shape) if input_shape is not None else None
        s = ScoreInput(model, base, names, tuple(batches), trained, g, mask, shape)
        scores = {n: sign * v for n, v in entry.score(s).items()}
        mask = prune_to_density(mask, scores, density ** (k / n_rounds), scope)
    return mask


def shuffle_within_layers(mask: Mask, generator: torch.Generator) -> Mask:
    """Frankle et al. 2021's check: same count per layer, new random positions."""
    return random_mask_like(mask, generator)


def reinit_kept(
    fresh: Mapping[str, torch.Tensor], init: Mapping[str, torch.Tensor], mask: Mask
) -> dict[str, torch.Tensor]:
    """Frankle et al. 2021's check: kept weights from a fresh init, everything else unchanged."""
    out = dict(init)
    for n in mask.names():
        out[n] = fresh[n] * mask[n].to(fresh[n].dtype)
    return out


def hamming_fraction(a: Mask, b: Mask) -> float:
    """Fraction of prunable entries where two masks differ (early-bird's mask distance)."""
    differ = sum(int((a[n] != b[n]).sum()) for n in a.names())
    return differ / max(1, a.size())


@dataclass
class EarlyBird:
    """You et al.'s stopping rule: keep the last ``window`` masks; the ticket is drawn when the
    newest is within ``threshold`` (fraction of differing entries) of each of the others."""

    threshold: float = 0.1
    window: int = 5
    masks: list[Mask] = field(default_factory=list)
    drawn: Mask | None = None
    drawn_at: int | None = None

    def update(self, step: int, mask: Mask) -> bool:
        """Add the mask of an evaluation; True once the ticket is drawn (sticky)."""
        if self.drawn is not None:
            return True
        self.masks = [*self.masks, mask][-self.window :]
        if len(self.masks) == self.window and all(
            hamming_fraction(mask, old) < self.threshold for old in self.masks[:-1]
        ):
            self.drawn, self.drawn_at = mask, step
            return True
        return False


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-adds x 2 of one forward pass of one example, per Linear/Conv weight name.

    A pruned weight saves its share of its layer's multiply-adds (``actual_flops``); everything
    else (activations, pooling, BatchNorm, biases) is small and left out for every finder alike.
    """
    flops: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(module: nn.Module, inp, out) -> None:
        name = names[module]
        key = f"{name}.weight" if name else "weight"
        positions = (
            out[0].numel() // out.shape[1]
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            else 1
        )
        flops[key] = flops.get(key, 0) + 2 * module.weight.numel() * positions

    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), _eval_mode(model):
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
    return flops


def actual_flops(layer_flops: Mapping[str, int], mask: Mask | None) -> float:
    """Forward FLOPs of one example on the surviving weights (dense layers count in full)."""
    if mask is None:
        return float(sum(layer_flops.values()))
    density = mask.layer_density()
    return float(sum(f * density.get(n, 1.0) for n, f in layer_flops.items()))


def training_flops(forward: float, steps: int, batch_size: int) -> float:
    """Forward + backward ≈ 3 forward passes per example (the usual accounting)."""
    return 3.0 * forward * steps * batch_size
