"""Stacks of networks as Ray tasks: one task per stack, the driver keeps the run folder.

Tensors travel through Ray's object store, never through paths, so workers need no shared file
system: the shared inputs (model template, data set, hyperparameters) are put once per ``train``
call; each task gets its chunk of jobs and the checkpoint the driver read for it. Mid-level
checkpoints and progress come back to the driver through a Ray queue and are written there, by the
same checkpointer as a local run. A task whose worker dies is retried by Ray from the checkpoint it
was given; training is a deterministic function of its inputs, so the retry yields the same bits.

Each task uses the intra-op thread count the local backend would have used for that stack (one per
stack when stacks train side by side, else the driver's count) and asks Ray for as many CPUs, so
on one machine a Ray run is bit-identical to a local one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TicketlabError

TASK_RETRIES = 3
_POLL_SECONDS = 0.2


def _import_ray():
    try:
        import ray
        from ray.util.queue import Queue
    except ImportError:
        raise TicketlabError(
            "--backend ray needs Ray, which is not installed: pip install 'ticketlab[ray]'"
        ) from None
    return ray, Queue


@dataclass
class _RelayCheckpointer:
    """The worker's side of a checkpointer: hands back what the driver read, sends saves home."""

    every: int
    saved: dict[str, Any] | None
    queue: Any
    chunk: int

    def load(self) -> dict[str, Any] | None:
        return self.saved

    def save(self, state: dict[str, Any]) -> None:
        self.queue.put(("checkpoint", self.chunk, state))


def _run_stack_task(fn, shared, jobs, chunk, threads, every, saved, queue):
    """The body of one Ray task (a module-level function, so it pickles by reference)."""
    import torch

    torch.set_num_threads(threads)
    queue.put(("started", chunk, os.getpid()))
    checkpointer = _RelayCheckpointer(every, saved, queue, chunk) if every else None

    def progress(n: int) -> None:
        queue.put(("progress", chunk, n))

    return fn(jobs=jobs, progress=progress, checkpointer=checkpointer, **shared)


class RayBackend:
    """Connects to ``address`` (``""``: start or join a Ray instance on this machine)."""

    def __init__(self, address: str = ""):
        self.ray, self._queue_class = _import_ray()
        self.address = address
        self._queue = None  # one relay queue (a small actor) for every train() call of this run

    def _connect(self) -> None:
        if self.ray.is_initialized():
            return
        try:
            self.ray.init(
                address=self.address or None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.address or "a local Ray instance"
            raise TicketlabError(f"cannot connect to the Ray cluster at {where}: {exc}") from None

    def run_stacks(
        self,
        fn: Callable[..., list[Any]],
        shared: dict[str, Any],
        chunks: Sequence[Sequence[Any]],
        checkpointers: Sequence[Any | None],
        progress: Callable[[int], None] | None,
        threads: int,
    ) -> list[list[Any]]:
        self._connect()
        ray = self.ray
        if self._queue is None:
            self._queue = self._queue_class()
        queue = self._queue
        shared_ref = ray.put(shared)
        remote = ray.remote(_run_stack_task).options(
            num_cpus=threads, max_retries=TASK_RETRIES, retry_exceptions=False
        )
        refs = []
        for c, chunk in enumerate(chunks):
            checkpointer = checkpointers[c] if checkpointers else None
            every = checkpointer.every if checkpointer else 0
            saved = checkpointer.load() if checkpointer else None
            refs.append(remote.remote(fn, shared_ref, list(chunk), c, threads, every, saved, queue))
        relay = _Relay(queue, checkpointers, progress)
        relay.start()
        try:
            results = self._wait(refs, relay)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        finally:
            relay.stop()
        return results

    def _wait(self, refs: list, relay: _Relay) -> list[list[Any]]:
        ray = self.ray
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_SECONDS)
            relay.raise_if_failed()
        relay.drain()  # the last checkpoints and progress of finished tasks
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None


class _Relay:
    """Driver thread that writes the workers' checkpoints and forwards their progress."""

    def __init__(self, queue: Any, checkpointers: Sequence[Any | None], progress):
        self.queue, self.checkpointers, self.progress = queue, checkpointers, progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ticketlab-ray-relay", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._handle_one(timeout=_POLL_SECONDS)

    def _handle_one(self, timeout: float) -> bool:
        from ray.util.queue import Empty

        try:
            kind, chunk, payload = self.queue.get(block=timeout > 0, timeout=timeout or None)
        except Empty:
            return False
        except Exception as exc:  # the queue actor went away with the cluster
            self._error = self._error or exc
            return False
        try:
            if kind == "checkpoint" and self.checkpointers:
                self.checkpointers[chunk].save(payload)
            elif kind == "progress" and self.progress is not None:
                self.progress(payload)
        except BaseException as exc:  # e.g. the disk filled while writing a checkpoint
            self._error = self._error or exc
        return True

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        self._stop.set()
        self._thread.join()
        while self._handle_one(timeout=0):
            pass
        self.raise_if_failed()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
