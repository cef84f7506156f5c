"""Reset variants: the values the surviving weights restart from before the next round.

Each reset sees, for one prunable tensor, the rewind point (weights at step k; k=0 is the original
init), a fresh init of the same architecture, and the keep mask. Zhou et al. (arXiv 1905.01067 §3)
show that keeping the *sign* of the rewind point is what matters; sign-preserving variants test it.
Pruned entries are returned as zero. Adding a reset is one function and one line in ``RESETS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import TicketlabError

Reset = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def _shuffled_survivors(w: torch.Tensor, keep: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The surviving values of ``w`` permuted among the surviving positions of the layer."""
    out = torch.zeros_like(w)
    values = w[keep]
    out[keep] = values[torch.randperm(values.numel(), generator=g)]
    return out


def rewind(w_rewind: torch.Tensor, w_fresh: torch.Tensor, keep: torch.Tensor, g: torch.Generator):
    """The LTH reset: survivors go back to their values at the rewind step."""
    return w_rewind * keep


def reinit(w_rewind: torch.Tensor, w_fresh: torch.Tensor, keep: torch.Tensor, g: torch.Generator):
    """The paper's random-reinit control: same mask, a fresh draw from the init distribution."""
    return w_fresh * keep


def reshuffle(
    w_rewind: torch.Tensor, w_fresh: torch.Tensor, keep: torch.Tensor, g: torch.Generator
):
    """Survivors' rewind values permuted within the layer (same value distribution, new places)."""
    return _shuffled_survivors(w_rewind, keep, g)


def signed_constant(
    w_rewind: torch.Tensor, w_fresh: torch.Tensor, keep: torch.Tensor, g: torch.Generator
):
    """±σ of the layer's rewind values, with each survivor's rewind sign."""
    return torch.sign(w_rewind) * w_rewind.std() * keep


def reinit_signed(
    w_rewind: torch.Tensor, w_fresh: torch.Tensor, keep: torch.Tensor, g: torch.Generator
):
    """Fresh magnitudes, rewind signs."""
    return w_fresh.abs() * torch.sign(w_rewind) * keep


def reshuffle_signed(
    w_rewind: torch.Tensor, w_fresh: torch.Tensor, keep: torch.Tensor, g: torch.Generator
):
    """Reshuffled magnitudes, each survivor keeping its own rewind sign."""
    return _shuffled_survivors(w_rewind.abs(), keep, g) * torch.sign(w_rewind) * keep


RESETS: dict[str, Reset] = {
    "rewind": rewind,
    "reinit": reinit,
    "reshuffle": reshuffle,
    "signed_constant": signed_constant,
    "reinit_signed": reinit_signed,
    "reshuffle_signed": reshuffle_signed,
}


def get_reset(name: str) -> Reset:
    if name not in RESETS:
        raise TicketlabError(f"unknown reset {name!r}; known resets: {', '.join(RESETS)}")
    return RESETS[name]
