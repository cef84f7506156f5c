"""Reading a run's masks and weights back from its folder, once for every study, export and API."""

from __future__ import annotations

from ..core.mask import Mask
from ..train.stacked import State
from .config import Config
from .store import RunStore

CONTROL_MASKS = "control_masks.safetensors"  # the random-prune control's masks, per replicate


def level_dir(level: int) -> str:
    return f"levels/level_{level:02d}"


def load_replicates(store: RunStore, rel: str, c: Config) -> list[State]:
    tensors, _ = store.read_tensors(rel)
    states: list[State] = [{} for _ in range(c.replicates)]
    for key, tensor in tensors.items():
        r, _, name = key.partition("/")
        states[int(r[1:])][name] = tensor
    return states


def load_rewind(store: RunStore, c: Config) -> list[State]:
    return load_replicates(store, "rewind.safetensors", c)


def load_masks(store: RunStore, level: int, c: Config) -> list[Mask]:
    return [Mask(s) for s in load_replicates(store, f"{level_dir(level)}/masks.safetensors", c)]


def load_control_masks(store: RunStore, level: int, c: Config) -> list[Mask | None]:
    """The random-prune control's mask of each replicate at ``level`` (None where none was
    trained: the dense level, a run without that control, a replicate stopped by divergence)."""
    if not store.exists(f"{level_dir(level)}/{CONTROL_MASKS}"):
        return [None] * c.replicates
    states = load_replicates(store, f"{level_dir(level)}/{CONTROL_MASKS}", c)
    return [Mask(s) if s else None for s in states]
