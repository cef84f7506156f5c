"""Remove a fraction of the *remaining* weights, or prune to a target density, per layer or
globally.

Counts are exact: a layer with ``a`` weights alive pruned at rate ``r`` keeps ``a - round(r*a)``.
Ties are broken by position so the result is deterministic. Masks only ever shrink, whatever the
scores: only alive entries are ranked (a dead weight can never win back its place, even against an
alive weight scored -inf), and a NaN score ranks below every number (a diverged weight goes first).

A *group* is a list of parameter names ranked together as one layer: the MNIST-1D notebook ranks a
layer's weights and bias in one ranking. Without groups every tensor is its own layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .mask import Mask

Groups = Sequence[Sequence[str]]


def _keep_top(scores: torch.Tensor, alive: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` highest-scoring alive entries (dead entries never return).

    The same entries a stable descending sort would keep (among equal scores the earlier position
    wins), found in linear time: the ``n_keep``-th largest score is the threshold, everything above
    it survives, and the ties at it are taken in position order. A full sort of every layer at every
    level was a visible share of a short IMP run."""
    flat_alive = alive.flatten()
    alive_at = torch.nonzero(flat_alive).flatten()
    ranked = scores.detach().flatten()[alive_at].to(torch.float64)
    ranked = torch.where(torch.isnan(ranked), torch.full_like(ranked, -torch.inf), ranked)
    keep = torch.zeros_like(flat_alive)
    n_keep = min(max(0, n_keep), ranked.numel())
    if n_keep == 0:
        return keep.view_as(alive)
    threshold = torch.kthvalue(ranked, ranked.numel() - n_keep + 1).values
    above = ranked > threshold
    ties = torch.nonzero(ranked == threshold).flatten()[: n_keep - int(above.sum())]
    chosen = above.clone()
    chosen[ties] = True
    keep[alive_at[chosen]] = True
    return keep.view_as(alive)


def _groups(mask: Mask, groups: Groups | None) -> list[list[str]]:
    if groups is None:
        return [[n] for n in mask.names()]
    listed = [n for g in groups for n in g]
    missing = [n for n in mask.names() if n not in listed]
    return [
        [n for n in g if n in mask.tensors] for g in groups if any(n in mask.tensors for n in g)
    ] + [[n] for n in missing]


def _prune_group(
    mask: Mask, scores: Mapping[str, torch.Tensor], names: list[str], n_keep_of
) -> dict[str, torch.Tensor]:
    """Rank the group's tensors together; ``n_keep_of(alive, size)`` says how many survive."""
    alive = torch.cat([mask[n].flatten() for n in names])
    flat = torch.cat([scores[n].detach().flatten().to(torch.float64) for n in names])
    n_alive = int(alive.sum())
    keep = _keep_top(flat, alive, min(n_alive, n_keep_of(n_alive, alive.numel())))
    out, start = {}, 0
    for n in names:
        count = mask[n].numel()
        out[n] = keep[start : start + count].view_as(mask[n])
        start += count
    return out


def prune_layerwise(
    mask: Mask,
    scores: Mapping[str, torch.Tensor],
    rates: Mapping[str, float],
    groups: Groups | None = None,
) -> Mask:
    """Each layer loses ``rates[name]`` of its remaining weights (the paper's Lenet/Conv way); a
    group takes the rate of its first member."""
    new: dict[str, torch.Tensor] = {}
    for names in _groups(mask, groups):
        rate = rates.get(names[0], 0.0)
        new.update(_prune_group(mask, scores, names, lambda a, _s, r=rate: a - int(round(r * a))))
    return Mask({n: new[n] for n in mask.names()})


def prune_global(mask: Mask, scores: Mapping[str, torch.Tensor], rate: float) -> Mask:
    """All layers compete in one ranking; ``rate`` of all remaining weights go (VGG/ResNet way)."""
    return Mask(_prune_group(mask, scores, mask.names(), lambda a, _s: a - int(round(rate * a))))


def prune_to_density(
    mask: Mask,
    scores: Mapping[str, torch.Tensor],
    density: float,
    scope: str = "layer",
    groups: Groups | None = None,
) -> Mask:
    """Prune to a target: every layer (``layer``) or the whole network (``global``) keeps
    ``round(density * size)`` weights, or what is alive if that is fewer (a sparsity schedule such
    as the notebook's 0 -> 0.99 over 100 rounds)."""

    def n_keep(_alive: int, size: int) -> int:
        return int(round(density * size))

    if scope == "global":
        return Mask(_prune_group(mask, scores, mask.names(), n_keep))
    new: dict[str, torch.Tensor] = {}
    for names in _groups(mask, groups):
        new.update(_prune_group(mask, scores, names, n_keep))
    return Mask({n: new[n] for n in mask.names()})


def prune(
    mask: Mask,
    scores: Mapping[str, torch.Tensor],
    rates: Mapping[str, float],
    scope: str = "layer",
    groups: Groups | None = None,
) -> Mask:
    """Dispatch on scope; for 'global' there is one rate (the config refuses per-layer rates)."""
    if scope == "layer":
        return prune_layerwise(mask, scores, rates, groups)
    global_rate = max(rates.values()) if rates else 0.0
    return prune_global(mask, scores, global_rate)


def random_mask_like(mask: Mask, generator: torch.Generator, groups: Groups | None = None) -> Mask:
    """A random mask with exactly the same number alive per layer: the random-prune control.

    With ``groups`` a layer is its group (weight and bias ranked together): the group keeps the
    ticket's count, placed uniformly over all its entries, so the control does not inherit which
    of the layer's tensors the ticket kept more of (a ticket that keeps most biases would
    otherwise hand that choice to its control)."""
    new: dict[str, torch.Tensor] = {}
    for names in _groups(mask, groups):
        noise = {
            n: torch.rand(mask[n].shape, generator=generator, dtype=torch.float64) for n in names
        }
        full = Mask({n: torch.ones_like(mask[n]) for n in names})
        count = sum(int(mask[n].sum()) for n in names)
        new.update(_prune_group(full, noise, names, lambda _a, _s, k=count: k))
    return Mask({n: new[n] for n in mask.names()})


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
