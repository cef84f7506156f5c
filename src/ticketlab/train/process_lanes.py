"""Stacks trained side by side in forked worker processes, one stack and one core each.

Why not threads: a small stack's step (the MNIST-1D MLP at a sparse round, LeNet-300-100's late
levels) is mostly Python and operator dispatch, which hold the GIL, so two thread lanes take turns
instead of running at once. Measured here (``benchmarks/lanes.py``, wall ms per step of two lanes
of two networks): MNIST-1D's MLP at 1% density 3.54 as threads, 2.92 as processes; LeNet-300-100's
level 15, 3 networks a lane, 3.62 and 2.42; dense stacks within 10% (their matmuls release the GIL).

Forking shares what the stacks need (template, data set, jobs, the loaded sparse kernel) without
copying or pickling it. Each child trains its stacks with one intra-op thread, as a thread lane
does, so the results are the same bits; it sends back progress (at most ten messages a second)
and its results. It writes its checkpoints itself when the checkpointer only writes files
(``saves_from_any_process``, the run folder's); any other checkpointer's saves are sent to the
parent, which calls it. A job's ``on_eval`` runs in the parent, which may keep what it sees
(early-bird does): the child sends the weights and waits for the answer. A failure in one
child, or Ctrl-C, stops the others; a child that dies without a word (killed, out of memory) is
an error naming its exit code; a child whose parent is killed dies too.

One hazard, measured: MKL's buffer manager can leave a child forked from a process in which
*threads that used MKL have come and gone* spinning forever (``mm_account_ptr_by_tid`` in gdb).
``benchmarks/lanes.py``, which times thread lanes and then process lanes, hung at its dense stacks,
and a one-off loop alternating the two hung within five rounds.
Process lanes therefore never share a process with thread lanes by default: with lanes as
processes, every parallel stack runs in one, ``on_eval`` jobs included. Forking after the
parent's own intra-op threads used MKL did not hang (12 rounds, ``tests/test_process_lanes.py``).
Starting the process with ``MKL_DISABLE_FAST_MM=1`` in its environment removed the hazard in that
loop (24 rounds of 24, one-off), while setting it from Python, even before importing torch, did not.
Off Linux ``fork`` is not safe with the libraries torch loads, and the trainer keeps threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from ..errors import TicketlabError

#: ``$TICKETLAB_LANES``: "processes" (the default on Linux) or "threads".
LANES_ENV = "TICKETLAB_LANES"
LANE_KINDS = ("processes", "threads")
PROGRESS_INTERVAL_S = 0.1
_PR_SET_PDEATHSIG = 1
_TERMINATE_WAIT_S = 5.0

Progress = Callable[[int], None]
#: (job index within the stack, step, that network's weights) -> its ``on_eval`` answer
Ask = Callable[[int, int, Any], bool]
RunChunk = Callable[[int, Progress, Any, Ask], list[Any]]


def fork_available() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def lane_kind() -> str:
    """What parallel stacks run in: ``$TICKETLAB_LANES`` checked, else processes where ``fork``
    is safe (Linux) and threads elsewhere. A misspelt value is refused, not ignored, and so is
    "processes" where forking is not safe."""
    value = os.environ.get(LANES_ENV, "processes" if fork_available() else "threads").strip()
    if value not in LANE_KINDS:
        raise TicketlabError(f"{LANES_ENV} must be one of {', '.join(LANE_KINDS)}, not {value!r}")
    if value == "processes" and not fork_available():
        raise TicketlabError(f"{LANES_ENV}=processes needs fork, which is safe only on Linux")
    return value


@dataclass
class _RelayedCheckpointer:
    """The child's side of a checkpointer: reads as the real one, sends its saves to the parent."""

    inner: Any
    conn: Connection

    @property
    def every(self) -> int:
        return self.inner.every

    def load(self) -> dict[str, Any] | None:
        return self.inner.load()

    def save(self, state: dict[str, Any]) -> None:
        _send(self.conn, ("checkpoint", state))


class _ThrottledProgress:
    """Adds up progress and sends it at most every ``PROGRESS_INTERVAL_S`` (a pipe message per
    step would cost more than a small step)."""

    def __init__(self, conn: Connection):
        self.conn, self.pending, self.sent_at = conn, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.sent_at >= PROGRESS_INTERVAL_S:
            self.flush()
            self.sent_at = now

    def flush(self) -> None:
        if self.pending:
            _send(self.conn, ("progress", self.pending))
            self.pending = 0


def _send(conn: Connection, message: tuple[str, Any]) -> None:
    # plain pickle copies each tensor's bytes; multiprocessing's own pickler, with torch's
    # reductions, would instead pass every tensor as a shared-memory file descriptor (one each)
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception that cannot travel becomes its message
        return TicketlabError(f"{type(exc).__name__}: {exc}")


def _die_with(parent: int) -> None:
    """Have the kernel kill this child when the parent dies, however it dies: a parent killed
    with SIGKILL must not leave its stacks training on, holding the run folder's lock."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _child(
    run_chunk: RunChunk, chunk: int, checkpointer: Any, conn: Connection, parent: int
) -> None:
    _die_with(parent)
    # Ctrl-C is the parent's to handle (it ends the children); a handler the parent installed
    # for SIGTERM must not run here when the parent ends this child
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # the parent's stdout/stderr may be a progress display's proxy, whose lock another thread
    # could have held at the fork: write to the real streams
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        torch.set_num_threads(1)
        progress = _ThrottledProgress(conn)
        own = checkpointer is None or getattr(checkpointer, "saves_from_any_process", False)
        relayed = checkpointer if own else _RelayedCheckpointer(checkpointer, conn)

        def ask(job: int, step: int, weights: Any) -> bool:
            progress.flush()
            _send(conn, ("eval", (job, step, weights)))
            return pickle.loads(conn.recv_bytes())

        results = run_chunk(chunk, progress, relayed, ask)
        progress.flush()
        _send(conn, ("done", results))
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        with contextlib.suppress(Exception):  # the parent has gone: nobody to tell
            _send(conn, ("error", _picklable(exc)))
    finally:
        conn.close()


@dataclass
class _Running:
    chunk: int
    process: Any
    conn: Connection


def train_in_processes(
    run_chunk: RunChunk,
    n_chunks: int,
    lanes: int,
    progress: Progress | None,
    checkpointers: Sequence[Any | None] | None,
    watchers: Sequence[Sequence[Callable[[int, Any], bool] | None]],
) -> list[Any]:
    """``run_chunk(c, progress, checkpointer, ask)`` for every stack ``c``, at most ``lanes`` at
    once, each in a forked child; the results flattened in stack order, as ``_train_in_lanes``
    gives. ``watchers[c][i]``: the ``on_eval`` of job ``i`` of stack ``c`` (or None), called here
    when the child's ``ask(i, step, weights)`` asks."""
    context = multiprocessing.get_context("fork")
    _import_before_forking()
    waiting = list(range(n_chunks))
    running: dict[Connection, _Running] = {}
    results: dict[int, list[Any]] = {}

    def start(c: int) -> None:
        ours, theirs = context.Pipe()
        checkpointer = checkpointers[c] if checkpointers else None
        process = context.Process(
            target=_child,
            args=(run_chunk, c, checkpointer, theirs, os.getpid()),
            name=f"ticketlab-lane-{c}",
            daemon=True,
        )
        process.start()
        theirs.close()  # the child's end lives on in the child only: EOF here when it is gone
        running[ours] = _Running(c, process, ours)

    try:
        while waiting or running:
            while waiting and len(running) < lanes:
                start(waiting.pop(0))
            for conn in wait(list(running)):
                lane = running[conn]
                try:
                    kind, payload = pickle.loads(conn.recv_bytes())
                except EOFError:
                    lane.process.join()
                    raise TicketlabError(
                        f"the process training stack {lane.chunk} ended without its results "
                        f"(exit code {lane.process.exitcode}; killed, or out of memory?)"
                    ) from None
                if kind == "progress":
                    if progress is not None:
                        progress(payload)
                elif kind == "checkpoint":
                    checkpointers[lane.chunk].save(payload)  # type: ignore[index]
                elif kind == "eval":
                    job, step, weights = payload
                    answer = bool(watchers[lane.chunk][job](step, weights))  # type: ignore[misc]
                    conn.send_bytes(pickle.dumps(answer))
                elif kind == "error":
                    raise payload
                else:  # "done"
                    results[lane.chunk] = payload
                    del running[conn]
                    conn.close()
                    lane.process.join()
    finally:
        _stop(running.values())
    return [r for c in range(n_chunks) for r in results[c]]


def _import_before_forking() -> None:
    """Import here, once, what every child would otherwise import for itself at every level:
    ``torch.optim`` imports ``torch._dynamo`` when a process makes its first optimizer, 1.2-1.4 s
    of one core here, which each lane of each level of a search paid before its first step."""
    importlib.import_module("torch._dynamo")


def _stop(lanes: Any) -> None:
    """Ends the children still running (a failure elsewhere, or Ctrl-C) and reaps them."""
    lanes = list(lanes)
    for lane in lanes:
        if lane.process.is_alive():
            lane.process.terminate()
    deadline = time.monotonic() + _TERMINATE_WAIT_S
    for lane in lanes:
        lane.process.join(max(0.0, deadline - time.monotonic()))
        if lane.process.is_alive():
            lane.process.kill()
            lane.process.join()
        lane.conn.close()
