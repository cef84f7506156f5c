"""How a stack of K networks holds their parameters: the names, the working layout, the sparse path.

Every stack keeps one tensor per parameter name with the networks along a leading axis ("working
layout"), converts it to and from the per-network ``state_dict`` layout ("canonical":
``[K, *shape]``), and may hold a Linear weight as the survivors of its masks only
(``sparse_linear``). The layout is the same whatever runs the forward pass, so masks, checkpoints
and the optimizer never need to know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .sparse_linear import SPARSE_BELOW, BlockPattern

State = dict[str, torch.Tensor]


class NotStackable(Exception):
    """This architecture cannot be trained K-at-a-time by this implementation."""


def parameter_names(module: nn.Module) -> list[str]:
    """One name per parameter tensor: a tied weight is named once, by its first name."""
    return [n for n, _ in module.named_parameters()]


def buffer_names(module: nn.Module) -> list[str]:
    """The buffers a ``state_dict`` holds (persistent ones), each named once."""
    saved = set(module.state_dict())
    return [n for n, _ in module.named_buffers() if n in saved]


def stack_states(
    states: Sequence[Mapping[str, torch.Tensor]],
    name: str,
    dtype: torch.dtype,
    like: torch.Tensor,
) -> torch.Tensor:
    """``[K, *shape]`` of one tensor across the networks; float tensors cast to ``dtype``.

    Every network's tensor must have the module's shape: one that does not (a state from another
    architecture) is refused here, in one line, not deep inside a matmul.
    """
    for i, state in enumerate(states):
        if name not in state:
            raise NotStackable(f"network {i}'s state has no {name!r}")
        if tuple(state[name].shape) != tuple(like.shape):
            raise NotStackable(
                f"network {i}'s {name} has shape {tuple(state[name].shape)}, "
                f"the module's is {tuple(like.shape)}"
            )
    stacked = torch.stack([s[name] for s in states])
    return stacked.to(dtype) if like.is_floating_point() else stacked.to(like.dtype)


class LinearLayout:
    """Linear weights stored ``[K, in, out]`` (so ``baddbmm`` reads them as they are and their
    gradients arrive contiguous), biases ``[K, 1, out]``, everything else canonical; Linear weights
    whose masks are sparse enough held as their survivors only (``sparse_linear``)."""

    def _init_layout(self, linear_weights: set[str], linear_biases: set[str]) -> None:
        self._linear_weights = linear_weights
        self._linear_biases = linear_biases
        self._patterns: dict[str, BlockPattern] = {}
        self.params: State = {}

    def sparsify(self, keep: Mapping[str, torch.Tensor], below: float = SPARSE_BELOW) -> set[str]:
        """Hold the Linear weights whose masks (``keep[name]``: ``[K, out, in]``) each keep less
        than ``below`` of their entries as their survivors only; returns those names.

        Every network must be sparse enough, so a network's path depends on its own mask alone
        (as in an IMP level, where all share one density), and a dense one is never slowed down.
        Call before the optimizer is built: from here on those parameters are the survivors'
        values, and the pruned entries no longer exist (no mask needs re-applying to them).
        """
        chosen = set()
        for name, mask in keep.items():
            densest = float(mask.flatten(1).float().mean(1).max())
            if name in self._linear_weights and densest < below:
                with torch.no_grad():
                    dense = self.to_canonical(name, self.params[name])
                    self._patterns[name] = pattern = BlockPattern(mask)
                    self.params[name] = pattern.gather(dense).contiguous().requires_grad_()
                chosen.add(name)
        return chosen

    def to_working(self, name: str, canonical: torch.Tensor) -> torch.Tensor:
        if name in self._patterns:
            return self._patterns[name].gather(canonical)
        if name in self._linear_weights:
            return canonical.transpose(1, 2)
        if name in self._linear_biases:
            return canonical.unsqueeze(1)
        return canonical

    def to_canonical(self, name: str, working: torch.Tensor) -> torch.Tensor:
        if name in self._patterns:
            return self._patterns[name].scatter(working)
        if name in self._linear_weights:
            return working.transpose(1, 2)
        if name in self._linear_biases:
            return working.squeeze(1)
        return working
