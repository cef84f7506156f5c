"""Wanda (Sun et al. 2023, arXiv 2306.11695): prune by |W_ij| * ||X_j||_2, per output row.

``X_j`` is input feature ``j`` of the layer over every token of a few calibration batches, so a
small weight on a feature that is always large can outrank a larger weight on a quiet one. Each
output row keeps the same fraction of its weights (the paper's "per output" comparison group).
The norms come from one pass of the dense model (the paper's basic form; its reference code
recomputes each block's inputs after pruning the blocks before it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .mask import Mask


@torch.no_grad()
def input_norms(
    model: nn.Module, names: Sequence[str], batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input feature ``j`` of each Linear whose weight is in ``names``, over
    every row (every token of a sequence) of ``batches``."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module_name = name.rpartition(".")[0]
        layer = model.get_submodule(module_name)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"Wanda scores Linear weights only; {name} is in a {type(layer)}")

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _out, key=name) -> None:
            rows = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (rows * rows).sum(0)

        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return {name: sums[name].sqrt() for name in names}


def wanda_scores(
    weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``|W_ij| * ||X_j||_2`` for each ``[out, in]`` weight matrix."""
    return {n: w.detach().abs().double() * norms[n].double()[None, :] for n, w in weights.items()}


def keep_per_row(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Each row keeps its ``round(density * columns)`` highest scores (ties: earlier column)."""
    n_keep = int(round(density * scores.shape[1]))
    order = torch.sort(scores.double(), dim=1, descending=True, stable=True).indices[:, :n_keep]
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    keep.scatter_(1, order, True)
    return keep


def wanda_mask(scores: dict[str, torch.Tensor], density: float) -> Mask:
    return Mask({name: keep_per_row(s, density) for name, s in scores.items()})
