"""Where the stacks of networks train: in this process (the default) or as tasks on a Ray cluster.

A backend only decides *where* ``train_stack`` runs; what it computes, and what the run folder
holds, do not depend on it, so a run started on one backend can be resumed on the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import TicketlabError

BACKENDS = ("local", "ray")


class Backend(Protocol):
    """Runs ``fn(jobs=chunk, progress=..., checkpointer=..., **shared)`` once per chunk, each with
    ``threads`` intra-op threads, and returns the results in chunk order."""

    def run_stacks(
        self,
        fn: Callable[..., list[Any]],
        shared: dict[str, Any],
        chunks: Sequence[Sequence[Any]],
        checkpointers: Sequence[Any | None],
        progress: Callable[[int], None] | None,
        threads: int,
    ) -> list[list[Any]]: ...


def get_backend(name: str, address: str = "") -> Backend | None:
    """``None`` means the trainer's own in-process path (threads, one stack per lane)."""
    if name == "local":
        return None
    if name == "ray":
        from .ray import RayBackend

        return RayBackend(address)
    raise TicketlabError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
