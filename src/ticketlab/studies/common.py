"""Pieces every study shares (not a study itself, so studies may import it)."""

from __future__ import annotations

from ..io.config import Config
from ..train.trainer import TrainSpec


def train_spec(c: Config) -> TrainSpec:
    """The trainer's hyperparameters out of a config."""
    return TrainSpec(
        steps=c.steps,
        batch_size=c.batch_size,
        optimizer=c.optimizer,
        lr=c.lr,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        eval_every=c.eval_every,
        milestones=tuple(c.milestones),
        gamma=c.gamma,
        warmup_steps=c.warmup_steps,
        dtype=c.dtype,
        augment=c.augment,
    )
