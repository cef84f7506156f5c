"""Remove a fraction of the *remaining* weights, layer by layer or globally.

Counts are exact: a layer with ``a`` weights alive pruned at rate ``r`` keeps ``a - round(r*a)``.
Ties are broken by position so the result is deterministic. Masks only ever shrink.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .mask import Mask


def _keep_top(scores: torch.Tensor, alive: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` highest-scoring alive entries (dead entries never return)."""
    flat_scores = scores.detach().flatten().to(torch.float64)
    flat_alive = alive.flatten()
    masked = torch.where(flat_alive, flat_scores, torch.full_like(flat_scores, -torch.inf))
    # stable descending sort: among equal scores the earlier position wins
    order = torch.sort(masked, descending=True, stable=True).indices[:n_keep]
    keep = torch.zeros_like(flat_alive)
    keep[order] = True
    return keep.view_as(alive)


def prune_layerwise(
    mask: Mask, scores: Mapping[str, torch.Tensor], rates: Mapping[str, float]
) -> Mask:
    """Each layer loses ``rates[name]`` of its remaining weights (the paper's Lenet/Conv way)."""
    new = {}
    for name, alive in mask.tensors.items():
        n_alive = int(alive.sum())
        n_keep = n_alive - int(round(rates.get(name, 0.0) * n_alive))
        new[name] = _keep_top(scores[name], alive, n_keep)
    return Mask(new)


def prune_global(mask: Mask, scores: Mapping[str, torch.Tensor], rate: float) -> Mask:
    """All layers compete in one ranking; ``rate`` of all remaining weights go (VGG/ResNet way)."""
    names = mask.names()
    alive = torch.cat([mask[n].flatten() for n in names])
    flat_scores = torch.cat([scores[n].detach().flatten().to(torch.float64) for n in names])
    n_alive = int(alive.sum())
    keep = _keep_top(flat_scores, alive, n_alive - int(round(rate * n_alive)))
    new, start = {}, 0
    for n in names:
        count = mask[n].numel()
        new[n] = keep[start : start + count].view_as(mask[n])
        start += count
    return Mask(new)


def prune(
    mask: Mask,
    scores: Mapping[str, torch.Tensor],
    rates: Mapping[str, float],
    scope: str = "layer",
) -> Mask:
    """Dispatch on scope; for 'global' every rate must be equal (it is one ranking)."""
    if scope == "layer":
        return prune_layerwise(mask, scores, rates)
    global_rate = max(rates.values()) if rates else 0.0
    return prune_global(mask, scores, global_rate)


def random_mask_like(mask: Mask, generator: torch.Generator) -> Mask:
    """A random mask with exactly the same number alive per layer: the random-prune control."""
    new = {}
    for name, keep in mask.tensors.items():
        noise = torch.rand(keep.shape, generator=generator, dtype=torch.float64)
        new[name] = _keep_top(noise, torch.ones_like(keep), int(keep.sum()))
    return Mask(new)
