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


def keep_top_global(mask: Mask, scores: Mapping[str, torch.Tensor], n_keep: int) -> Mask:
    """Exactly ``min(n_keep, alive)`` weights survive, ranked together across layers."""
    names = mask.names()
    alive = torch.cat([mask[n].flatten() for n in names])
    flat_scores = torch.cat([scores[n].detach().flatten().to(torch.float64) for n in names])
    keep = _keep_top_select(flat_scores, alive, n_keep)
    new, start = {}, 0
    for n in names:
        count = mask[n].numel()
        new[n] = keep[start : start + count].view_as(mask[n])
        start += count
    return Mask(new)


def keep_top_layerwise(
    mask: Mask, scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]
) -> Mask:
    """Exactly ``min(counts[name], alive)`` weights survive in each layer."""
    return Mask(
        {n: _keep_top_select(scores[n], alive, int(counts[n])) for n, alive in mask.tensors.items()}
    )


def _keep_top_select(scores: torch.Tensor, alive: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``_keep_top`` by selection instead of a full sort (finders rescore and prune 100 times):
    the ``n_keep``-th largest alive score is found with ``kthvalue``; everything above it is kept,
    and of the entries equal to it the earliest positions, so ties break as in ``_keep_top``.
    Non-finite alive scores rank as the extreme finite values (NaN lowest)."""
    flat = torch.nan_to_num(scores.detach().flatten().to(torch.float64), nan=-_BIG, neginf=-_BIG)
    flat_alive = alive.flatten()
    n = flat_alive.numel()
    n_keep = max(0, min(n_keep, int(flat_alive.sum())))
    if n_keep == 0:
        return torch.zeros_like(alive)
    ranked = torch.where(flat_alive, flat, torch.full_like(flat, -torch.inf))
    # the n_keep-th largest, through the cheaper side of a partial selection
    if n_keep <= n // 2:
        threshold = torch.topk(ranked, n_keep, sorted=False).values.min()
    else:
        threshold = torch.topk(ranked.neg(), n - n_keep + 1, sorted=False).values.min().neg()
    keep = ranked > threshold
    ties = torch.nonzero(ranked == threshold).flatten()[: n_keep - int(keep.sum())]
    keep[ties] = True
    return keep.view_as(alive)


_BIG = torch.finfo(torch.float64).max
