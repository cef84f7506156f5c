"""Mask criteria: a score per weight from its initial and final value; the highest scores survive.

Zhou et al. (arXiv 1905.01067, Fig. 2) define each criterion as a region of the (w_i, w_f) plane;
here each is the score whose top fraction is that region. Adding a criterion is one function and one
line in ``CRITERIA``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import TicketlabError

Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def large_final(w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """|w_f|: the LTH paper's magnitude pruning."""
    return w_final.abs()


def small_final(w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return -w_final.abs()


def large_init(w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return w_init.abs()


def small_init(w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return -w_init.abs()


def large_init_large_final(
    w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """min(|w_i|, |w_f|): a weight survives only if it is large at both ends."""
    return torch.minimum(w_init.abs(), w_final.abs())


def small_init_small_final(
    w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """-max(|w_i|, |w_f|): a weight survives only if it is small at both ends."""
    return -torch.maximum(w_init.abs(), w_final.abs())


def magnitude_increase(
    w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """|w_f| - |w_i|: one of Zhou et al.'s two best criteria."""
    return w_final.abs() - w_init.abs()


def large_final_same_sign(
    w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """|w_f|, with every weight that kept its initial sign ranked above every one that flipped:
    Zhou et al.'s "large final, same sign", the criterion that shows the sign is what a mask
    encodes."""
    same = torch.sign(w_init) == torch.sign(w_final)
    magnitude = w_final.abs()
    below_every_kept = (
        magnitude - (float(magnitude.max()) + 1.0) if magnitude.numel() else magnitude
    )
    return torch.where(same, magnitude, below_every_kept)


def movement(w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """|w_f - w_i|: how far training moved the weight."""
    return (w_final - w_init).abs()


def random(w_init: torch.Tensor, w_final: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Uniform noise: the random-pruning control."""
    return torch.rand(w_final.shape, generator=g, dtype=torch.float64).to(w_final.dtype)


CRITERIA: dict[str, Criterion] = {
    "large_final": large_final,
    "small_final": small_final,
    "large_init": large_init,
    "small_init": small_init,
    "large_init_large_final": large_init_large_final,
    "small_init_small_final": small_init_small_final,
    "magnitude_increase": magnitude_increase,
    "large_final_same_sign": large_final_same_sign,
    "movement": movement,
    "random": random,
}


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise TicketlabError(f"unknown criterion {name!r}; known criteria: {', '.join(CRITERIA)}")
    return CRITERIA[name]
