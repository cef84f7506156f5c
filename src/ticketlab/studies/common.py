"""Pieces every study shares (not a study itself, so studies may import it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..core.seeds import derive_seed
from ..errors import TicketlabError
from ..io.config import Config
from ..io.store import RunStore
from ..train.device import placement
from ..train.trainer import TrainSpec


def init_seed(c: Config, replicate: int) -> int:
    """The seed of a replicate's dense init (the network every level of ``find`` descends from)."""
    return derive_seed(c.seed, "init", replicate)


def data_seed(c: Config, replicate: int, level: int, branch: str) -> int:
    """The data-order seed of one network of an IMP level."""
    return derive_seed(c.seed, "data", replicate, level, branch)


def dense_data_seed(c: Config, replicate: int) -> int:
    """The data order of the dense network of ``find`` (level 0), whose weights at step k are the
    rewind point of every later study."""
    return data_seed(c, replicate, 0, "ticket")


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class StoreCheckpointer:
    """Mid-level training state in the run folder (checksummed, no pickle).

    A checkpoint is a cache: the level's results are a deterministic function of files already
    verified (the rewind point, the previous level), so one that fails verification (corrupted,
    truncated, foreign) is reported in one line, deleted, and the chunk trains from its start to
    the same bits. Completed levels' files are never discarded: a bad one stops the run.
    """

    #: A save only writes a file, so a forked lane saves for itself rather than pickling ~13 MB
    #: (LeNet-300-100, 3 networks) through a pipe for the parent to unpickle and write while both
    #: cores are busy training (``ticketlab.train.process_lanes``).
    saves_from_any_process: ClassVar[bool] = True

    store: RunStore
    rel: str
    every: int
    warn: Callable[[str], None] = _warn_stderr

    def load(self) -> dict | None:
        if not self.store.exists(self.rel):
            return None
        try:
            return self.store.read_state(self.rel)
        except TicketlabError as exc:
            self.warn(f"{exc}; discarding it and retraining its networks from the level's start")
            self.store.remove(self.rel)
            return None

    def save(self, state: dict) -> None:
        self.store.write_state(self.rel, state)


def train_spec(c: Config) -> TrainSpec:
    """The trainer's hyperparameters out of a config, on the device it names (resolved and checked
    against the precision here, so ``auto``, an unavailable GPU or fp16 on a CPU are settled
    before anything trains)."""
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
        device=str(placement(c.device, c.precision, c.dtype).device),
        precision=c.precision,
        augment=c.augment,
        data_order=c.data_order,
    )
