"""Train K masked networks of one architecture at once; results equal training them one by one.

Per network: its own init, mask, data order (seeded), optimizer state (Adam and SGD act elementwise,
so one optimizer over stacked tensors is K independent optimizers), early-stopping record. The loss
is the *sum* of the K per-network mean losses, so each network's gradient is exactly its own.

The mask is applied to the weights after every optimizer step instead of in the forward pass: pruned
weights are exactly zero at every step and the forward pass does no extra work.

Speed (see benchmarks/throughput.py, benchmarks/step_parts.py): the step loop does no work that
is not needed every step (batches gathered with one ``index_select`` or slice copy into reused
buffers, all-true masks skipped, losses folded into the curve only at evaluations, fused Adam's
kernel called directly: ``adam_step``); and when there are several stacks, ``train`` runs them
side by side, one core and one intra-op thread each (forked processes on Linux, see
``process_lanes``; threads elsewhere), instead of one after another with every operation split
over the threads.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import Backend
from ..core.mask import Mask
from ..errors import TicketlabError
from ..zoo.data import Dataset
from . import augment as augmentation
from . import sparse_kernel
from .adam_step import direct_adam
from .device import (
    Placement,
    configure_determinism,
    default_lanes,
    denormals_flushed,
    placement,
    to_cpu,
)
from .mlp_step import MlpStep
from .process_lanes import lane_kind, train_in_processes
from .sparse_linear import SPARSE_BELOW
from .stacked import (
    Stack,
    StackPlan,
    State,
    build_stack,
    canonical_state,
    canonical_states,
    max_stack_size,
    plan_stack,
)

EVAL_CHUNK = 2048  # rows per evaluation forward pass for one label per row
EVAL_TOKENS = 8192  # targets per evaluation forward pass for sequences (language models)


@dataclass(frozen=True)
class TrainSpec:
    """Hyperparameters of one training run (the same for every network of a stack)."""

    steps: int
    batch_size: int
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 100
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    dtype: str = "float32"
    cosine: bool = False  # decay to 0 along a half cosine over ``steps`` (edge-popup's schedule)
    # "shuffle": each network its own seeded permutation per epoch; "cyclic": every network takes
    # the training set in order, batch after batch, wrapping around (the MNIST-1D notebook's loop)
    data_order: str = "shuffle"
    augment: str = "none"  # random crops / flips of training images, see ``augment.py``
    device: str = "cpu"  # see device.py: where the stacks train (results always come back on CPU)
    precision: str = "fp32"  # fp32, or bf16/fp16 autocast over float32 master weights

    def placement(self) -> Placement:
        return placement(self.device, self.precision, self.dtype)

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay = 0.5 * (1.0 + math.cos(math.pi * step / self.steps)) if self.cosine else 1.0
        return warm * decay * self.gamma ** sum(step >= m for m in self.milestones)

    def eval_steps(self) -> list[int]:
        return sorted({*range(0, self.steps, self.eval_every), self.steps})


@dataclass(frozen=True)
class Job:
    """One network to train: where it starts, what is alive, how its data is ordered."""

    init: State
    mask: Mask
    data_seed: int
    snapshot_step: int | None = None
    # Late rewinding (Frankle et al. 2020, arXiv 1912.05671): the network trains from this step to
    # ``spec.steps`` with the learning-rate schedule and its data order positioned at this step,
    # exactly as if it had been training since step 0 (a fresh optimizer state, as in OpenLTH).
    start_step: int = 0
    # Called at every evaluation with (step, this network's weights); training of the stack stops
    # at an evaluation once every network's callback has returned True (early-bird tickets).
    on_eval: Callable[[int, State], bool] | None = field(default=None, compare=False)


@dataclass
class Result:
    """What one network's training produced."""

    final: State
    snapshot: State | None
    curve: dict[str, list[float]]
    early_stop_iter: int
    early_stop_test_acc: float
    final_test_acc: float
    diverged: bool
    diverged_at: int | None = None
    early_stop: State | None = None  # the weights at the validation minimum (early_stop_iter)

    def metrics(self) -> dict[str, Any]:
        its = self.curve["iteration"]
        best = next((i for i, it in enumerate(its) if it == self.early_stop_iter), len(its) - 1)
        return {
            "early_stop_iter": self.early_stop_iter,
            "early_stop_test_acc": self.early_stop_test_acc,
            "final_test_acc": self.final_test_acc,
            "untrained_test_acc": self.curve["test_acc"][0],
            "untrained_test_loss": self.curve["test_loss"][0],
            "early_stop_test_loss": self.curve["test_loss"][best],
            "final_test_loss": self.curve["test_loss"][-1],
            "diverged": self.diverged,
            "diverged_at": self.diverged_at,
            "curve": self.curve,
        }


class Checkpointer(Protocol):
    """Where a stack's mid-training state goes; the experiment decides the file and its checks.

    One whose ``save`` only writes a file may say so with a true ``saves_from_any_process``
    attribute: a forked process lane then saves for itself instead of sending the state to its
    parent (``process_lanes``)."""

    every: int

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


Progress = Callable[[int], None]


@dataclass
class _Run:
    """Mutable state of one stack's training, exactly what a checkpoint must hold."""

    step: int = 0
    start: int = 0  # the step training began at (late rewinding), see Job.start_step
    curve: dict[str, list[list[float]]] = field(default_factory=dict)
    snapshots: dict[int, State] = field(default_factory=dict)
    diverged_at: list[int | None] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    # (step, per-network loss) not yet folded into loss_sum/diverged_at; see _flush_losses
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # per network: the lowest finite validation loss so far and the weights that reached it
    best_val: list[float] = field(default_factory=list)
    best: dict[int, State] = field(default_factory=dict)
    scaler: torch.amp.GradScaler | None = None  # fp16 only


def epoch_permutation(data_seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one network in one epoch: a pure function of (seed, epoch), so resume
    needs only the step count."""
    g = torch.Generator().manual_seed((data_seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def make_optimizer(params: list[torch.Tensor], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=True)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, fused=True
        )
    raise ValueError(f"unknown optimizer {spec.optimizer!r}")


def train(
    template: nn.Module,
    jobs: Sequence[Job],
    data: Dataset,
    spec: TrainSpec,
    *,
    stack_size: int | None = None,
    progress: Progress | None = None,
    checkpointers: Sequence[Checkpointer | None] | None = None,
    lanes: int | None = None,
    sparse_below: float = SPARSE_BELOW,
    plan: StackPlan | None = None,
    backend: Backend | None = None,
) -> list[Result]:
    """Train every job; ``stack_size`` networks at a time (default: as many as the architecture
    allows, up to 16, spread over the CPU cores). ``stack_size=1`` is the one-by-one path.
    Linear weights whose masks keep less than ``sparse_below`` train as sparse matrices of their
    survivors (0: always dense; see ``sparse_linear``).

    The jobs, ordered by start step and then by mask density (a stable sort: jobs of equal
    density, like the branches of an IMP level, keep their order), are cut into ``chunk_count``
    stacks of near-equal size, never mixing start steps (``checkpointers[c]`` belongs to stack
    ``c`` of that order); results come back in the order of ``jobs``. Stacking similar densities
    together lets the sparse networks of a sweep train on the sparse path, which a stack takes
    only when all its networks are sparse.

    With several stacks and several CPU threads, the stacks train side by side, one thread each
    (in forked processes where ``process_lanes.lane_kind`` says so, each with its own GIL): on a
    small CPU that beats one stack whose every operation is split over the threads, and it does
    not collapse when another process takes a core. ``lanes``: how many stacks may train at
    once (default: torch's intra-op thread count; 1 = one after another, in this process).

    ``plan``: how the networks of a stack run together (default: ``plan_stack`` on this data).

    ``backend`` (see ``ticketlab.backends``): where the stacks train, e.g. as Ray tasks; each stack
    gets the thread count it would get here, so the results are the same bits.
    """
    where = spec.placement()
    configure_determinism(where.device)
    sparse_kernel.enabled()  # a bad $TICKETLAB_SPARSE_KERNEL is refused before any training
    lanes_as = lane_kind()  # and so is a bad $TICKETLAB_LANES
    data = place_data(data, getattr(torch, spec.dtype), where.device)
    if lanes is None:
        lanes = default_lanes(where.device)
    plan = plan or plan_stack(template, data.x_train.cpu())
    _check_starts(jobs, spec)
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].start_step, jobs[i].mask.density()))
    by_density = [jobs[i] for i in order]
    bounds = _group_bounds(template, [j.start_step for j in by_density], stack_size, lanes)
    chunks = [by_density[a:b] for a, b in bounds]

    def run_chunk(
        c: int,
        chunk_progress: Progress | None,
        checkpointer: Checkpointer | None,
        ask: Callable[[int, int, State], bool] | None = None,
    ) -> list[Result]:
        """``ask``: in a process lane, how a job's ``on_eval`` reaches the parent's callback
        (jobs without one keep None: they never ask)."""
        jobs = chunks[c]
        if ask is not None:
            jobs = [
                dataclasses.replace(j, on_eval=functools.partial(ask, i)) if j.on_eval else j
                for i, j in enumerate(jobs)
            ]
        return train_stack(
            template, jobs, data, spec, chunk_progress, checkpointer, sparse_below, plan
        )

    parallel = _lane_count(template, plan, len(chunks), lanes)
    if backend is not None:
        shared = {
            "template": template,
            "data": data,
            "spec": spec,
            "sparse_below": sparse_below,
            "plan": plan,
        }
        threads = 1 if parallel > 1 else torch.get_num_threads()
        stacks = backend.run_stacks(
            train_stack, shared, chunks, checkpointers or [], progress, threads
        )
        trained = [r for stack in stacks for r in stack]
    elif parallel > 1 and _in_processes(lanes_as, jobs, where, sparse_below):
        watchers = [[j.on_eval for j in chunk] for chunk in chunks]
        trained = train_in_processes(
            run_chunk, len(chunks), parallel, progress, checkpointers, watchers
        )
    elif parallel > 1:
        trained = _train_in_lanes(run_chunk, len(chunks), parallel, progress, checkpointers)
    else:
        trained = [
            r
            for c in range(len(chunks))
            for r in run_chunk(c, progress, checkpointers[c] if checkpointers else None)
        ]
    placed = dict(zip(order, trained, strict=True))
    return [placed[i] for i in range(len(jobs))]


def chunk_count(
    template: nn.Module,
    n_jobs: int,
    stack_size: int | None,
    lanes: int | None = None,
    start_steps: Sequence[int] | None = None,
    device: str = "cpu",
) -> int:
    """How many stacks ``train`` cuts ``n_jobs`` jobs into (one checkpointer each) on ``device``;
    ``start_steps``: the jobs' start steps when they differ (one stack never mixes them)."""
    if lanes is None:
        lanes = default_lanes(torch.device(device))
    starts = sorted(start_steps) if start_steps is not None else [0] * n_jobs
    return len(_group_bounds(template, starts, stack_size, lanes))


def _check_starts(jobs: Sequence[Job], spec: TrainSpec) -> None:
    for job in jobs:
        if not 0 <= job.start_step < spec.steps:
            raise ValueError(f"start_step must be in [0, {spec.steps}), got {job.start_step}")
        if job.snapshot_step is not None and not (
            job.start_step <= job.snapshot_step <= spec.steps
        ):
            raise ValueError(
                f"snapshot_step {job.snapshot_step} is outside [{job.start_step}, {spec.steps}]"
            )


def _group_bounds(
    template: nn.Module, starts: Sequence[int], stack_size: int | None, lanes: int | None
) -> list[tuple[int, int]]:
    """Stacks of jobs sorted by start step: one start step cut as ``_chunk_bounds`` does, several
    cut each on its own (they train different step ranges, so they cannot share a stack)."""
    groups: list[tuple[int, int]] = []
    for i, s in enumerate(starts):
        if groups and starts[groups[-1][0]] == s:
            groups[-1] = (groups[-1][0], i + 1)
        else:
            groups.append((i, i + 1))
    if len(groups) <= 1:
        return _chunk_bounds(template, len(starts), stack_size, lanes)
    return [
        (a + x, a + y)
        for a, b in groups
        for x, y in _chunk_bounds(template, b - a, stack_size, lanes=1)
    ]


def place_data(data: Dataset, dtype: torch.dtype, device: torch.device) -> Dataset:
    """The data set in the weights' dtype on the training device; the same object when it is
    already there, so a study that places its data once pays nothing per ``train`` call."""
    fields = ("x_train", "x_val", "x_test", "y_train", "y_val", "y_test")
    if all(getattr(data, f).device == device for f in fields) and all(
        getattr(data, f).dtype == dtype for f in fields[:3]
    ):
        return data
    moved = {f: getattr(data, f).to(device) for f in fields}
    moved.update({f: moved[f].to(dtype) for f in fields[:3]})
    return dataclasses.replace(data, **moved)


def _lanes_available(lanes: int | None) -> int:
    return max(1, lanes if lanes is not None else torch.get_num_threads())


def _lane_count(template: nn.Module, plan: StackPlan, n_chunks: int, lanes: int | None) -> int:
    # Random modules (dropout) draw from torch's global generator, one network's stream at a time:
    # never concurrently. Nor do modules too large to stack (memory).
    if plan.random or max_stack_size(template) == 1:
        return 1
    return min(n_chunks, _lanes_available(lanes))


def _chunk_bounds(
    template: nn.Module, n_jobs: int, stack_size: int | None, lanes: int | None = None
) -> list[tuple[int, int]]:
    """``[start, end)`` of each stack: ``ceil(n / size)`` stacks of near-equal size; with the
    automatic size, at least as many stacks as lanes (so every core gets one) and a multiple of it.
    """
    cap = max_stack_size(template)
    size = min(stack_size or cap, cap)
    count = math.ceil(n_jobs / size)
    if stack_size is None and cap > 1 and n_jobs:
        parallel = _lanes_available(lanes)
        count = min(n_jobs, math.ceil(count / parallel) * parallel)
    base, extra = divmod(n_jobs, max(count, 1))
    bounds, start = [], 0
    for c in range(count):
        end = start + base + (c < extra)
        bounds.append((start, end))
        start = end
    return bounds


class _Cancelled(Exception):
    """Raised inside a lane when another lane failed or the caller was interrupted."""


def _in_processes(
    lanes_as: str, jobs: Sequence[Job], where: Placement, sparse_below: float
) -> bool:
    """Whether parallel stacks train in forked processes (``process_lanes``) rather than threads:
    on the CPU, unless ``lanes_as`` (``lane_kind()``) says threads. The sparse kernel is loaded
    here first, so the children inherit it instead of each loading (or building) their own."""
    if lanes_as != "processes" or not where.on_cpu:
        return False
    if any(j.mask.density() < sparse_below for j in jobs) and sparse_kernel.enabled():
        sparse_kernel.load()
    return True


def _train_in_lanes(
    run_chunk: Callable[[int, Progress | None, Checkpointer | None], list[Result]],
    n_chunks: int,
    lanes: int,
    progress: Progress | None,
    checkpointers: Sequence[Checkpointer | None] | None = None,
) -> list[Result]:
    """Run the stacks on ``lanes`` threads with one intra-op thread each; results in stack order.

    Every stack is computed by one thread, so a stack's numbers do not depend on what else runs.
    A failure (or Ctrl-C) in one place stops the others at their next step.
    """
    stop = threading.Event()
    lock = threading.Lock()

    def lane_progress(n: int) -> None:
        if stop.is_set():
            raise _Cancelled
        if progress is not None:
            with lock:
                progress(n)

    def work(c: int) -> list[Result]:
        torch.set_num_threads(1)  # this thread's OpenMP/MKL pool; restored below for the caller
        if stop.is_set():
            raise _Cancelled
        return run_chunk(c, lane_progress, checkpointers[c] if checkpointers else None)

    threads_before = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="ticketlab-lane")
    try:
        futures = [pool.submit(work, c) for c in range(n_chunks)]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and f.exception() is not None]
        if failed:
            stop.set()
            wait(futures)
            errors = [f.exception() for f in futures if f.exception() is not None]
            raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        return [r for f in futures for r in f.result()]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads_before)


def train_stack(
    template: nn.Module,
    jobs: Sequence[Job],
    data: Dataset,
    spec: TrainSpec,
    progress: Progress | None = None,
    checkpointer: Checkpointer | None = None,
    sparse_below: float = SPARSE_BELOW,
    plan: StackPlan | None = None,
) -> list[Result]:
    """Train one stack, in the calling thread, with denormals flushed (``denormals_flushed``)."""
    with denormals_flushed():
        return _train_stack(template, jobs, data, spec, progress, checkpointer, sparse_below, plan)


def _train_stack(
    template: nn.Module,
    jobs: Sequence[Job],
    data: Dataset,
    spec: TrainSpec,
    progress: Progress | None,
    checkpointer: Checkpointer | None,
    sparse_below: float,
    plan: StackPlan | None,
) -> list[Result]:
    dtype = getattr(torch, spec.dtype)
    where = spec.placement()
    device = where.device
    data = place_data(data, dtype, device)
    plan = plan or plan_stack(template, data.x_train.cpu())
    if not where.on_cpu:  # the stack's copies of the template (buffers, constants) live there too
        template = copy.deepcopy(template).to(device)
    states = [{n: t.to(device) for n, t in j.init.items()} for j in jobs]
    # Anything random inside the network (dropout) draws from each network's own stream, seeded
    # from its job (so a run is reproducible whatever stack it is in) and checkpointed.
    seeds = [_rng_seed(j) for j in jobs]
    stack = build_stack(plan, template, states, dtype, seeds)
    k = stack.size
    start = jobs[0].start_step
    if any(j.start_step != start for j in jobs):
        raise ValueError("the jobs of one stack must share their start step")
    masks = _working_masks(stack, jobs, dtype, device)
    _apply_masks(stack, masks)
    # the CSR path is measured (and exact) on the CPU in fp32 only; elsewhere weights stay dense
    if not where.on_cpu or where.mixed:
        sparse_below = 0.0
    sparse = stack.sparsify(
        {n: torch.stack([j.mask[n] for j in jobs]).to(device) for n in masks}, sparse_below
    )
    masks = {n: m for n, m in masks.items() if n not in sparse}
    optimizer = make_optimizer(list(stack.params.values()), spec)
    run = _Run(
        step=start,
        start=start,
        diverged_at=[None] * k,
        loss_sum=torch.zeros(k, dtype=torch.float64),
    )
    run.curve = {key: [[] for _ in range(k)] for key in _CURVE_KEYS}
    run.best_val = [math.inf] * k
    run.scaler = where.grad_scaler()

    saved = checkpointer.load() if checkpointer else None
    if saved is not None and not _fits(stack, jobs, saved, start):
        saved = None  # written for another layout or other jobs: retrain, same bits
    if saved is not None:
        _restore(stack, optimizer, run, saved)
    _train_loop(
        stack, jobs, data, spec, masks, optimizer, run, progress, checkpointer, saved, where
    )
    return _results(stack, jobs, run)


def _train_loop(
    stack: Stack,
    jobs: Sequence[Job],
    data: Dataset,
    spec: TrainSpec,
    masks: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    run: _Run,
    progress: Progress | None,
    checkpointer: Checkpointer | None,
    saved: dict[str, Any] | None,
    where: Placement | None = None,
) -> None:
    """The hot loop: everything not needed every step is hoisted out of it."""
    where = where or spec.placement()
    autocast, scaler = where.autocast, run.scaler
    k = stack.size
    batches = Batches(
        data, [j.data_seed for j in jobs], spec.batch_size, spec.augment, spec.data_order
    )
    start = jobs[0].start_step
    eval_at = {start, *(s for s in spec.eval_steps() if s > start)}
    snapshot_at: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.snapshot_step is not None:
            snapshot_at.setdefault(job.snapshot_step, []).append(i)
    every = checkpointer.every if checkpointer else 0
    resumed_at = saved_step(saved)
    groups = optimizer.param_groups
    # after any resume (it holds the state tensors); it multiplies the masks in after each step
    step_optimizer = direct_adam(optimizer, [(stack.params[n], keep) for n, keep in masks.items()])
    params = [p for group in groups for p in group["params"]]
    forward = stack.forward
    # a dense MLP's forward, loss and gradients without autograd, into kept buffers (same bits)
    direct = MlpStep.for_stack(stack, data.y_train, where.mixed) if scaler is None else None
    lr_now = None
    stopping = [False] * k
    for step in range(run.step, spec.steps + 1):
        run.step = step
        # saved before this step's snapshot and evaluation, so a resume at ``step`` redoes both
        if every and step > start and step % every == 0 and resumed_at != step:
            checkpointer.save(_checkpoint(stack, jobs, optimizer, run))
        if step in snapshot_at:
            for i in snapshot_at[step]:
                run.snapshots[i] = _cpu_state(stack, i)
        if step in eval_at:
            _evaluate(stack, data, run, where)
            if _stop_requested(stack, jobs, step, stopping):
                break
        if step == spec.steps:
            break
        x, y = batches(step)
        lr = spec.lr * spec.lr_factor(step)
        if lr != lr_now:
            for group in groups:
                group["lr"] = lr
            lr_now = lr
        if direct is not None:
            per_net_loss = direct(x, y)  # forward, loss and gradients
        else:
            with autocast():
                logits = forward(x)  # [K, B, classes], or [K, B, T, vocab] for sequences
            logits = logits.float() if where.mixed else logits  # the loss in float32 (fp32: no-op)
            per_net_loss = (
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="none")
                .view(k, -1)
                .mean(dim=1)
            )
            for param in params:  # optimizer.zero_grad(set_to_none=True) without its overhead
                param.grad = None
            (per_net_loss.sum() if scaler is None else scaler.scale(per_net_loss.sum())).backward()
        if scaler is None:
            step_optimizer()  # masks included
        else:
            scaler.step(optimizer)
            scaler.update()
            _apply_masks(stack, masks)
        run.pending.append((step, per_net_loss.detach()))
        if progress:
            progress(k)
    _flush_losses(run)


def _stop_requested(stack: Stack, jobs: Sequence[Job], step: int, stopping: list[bool]) -> bool:
    """Ask each network's ``on_eval``; a True is final for that network. All True: stop."""
    if any(j.on_eval is None for j in jobs):
        return False
    for i, job in enumerate(jobs):
        if not stopping[i]:
            stopping[i] = bool(job.on_eval(step, canonical_state(stack, i)))
    return all(stopping)


class Batches:
    """Each network's minibatch for a step, gathered with one ``index_select`` into reused buffers.

    Network ``i`` sees ``epoch_permutation(seed_i, epoch)`` in order (``cyclic``: every network
    sees examples ``step*B .. step*B + B - 1`` modulo the set's size, without augmentation);
    ``x`` comes back as ``[K, B, *input_shape]`` and ``y`` flat as ``[K*B]`` (``[K*B*T]`` for
    sequence targets). With ``augment`` (images only), each network's images are cropped and
    flipped as ``augment.draw(seed_i, epoch)`` says, the whole ``[K*B]`` batch in one go.
    """

    def __init__(
        self,
        data: Dataset,
        seeds: list[int],
        batch: int,
        augment: str = "none",
        order: str = "shuffle",
    ):
        self.n = data.x_train.shape[0]
        self.x = data.x_train.reshape(self.n, -1)
        self.y = data.y_train
        self.shape = tuple(data.x_train.shape[1:])
        self.seeds, self.batch = seeds, batch
        self.per_epoch = max(1, self.n // batch)
        self.epoch = -1
        self.perms = torch.empty(0, dtype=torch.int64)
        rows = len(seeds) * min(batch, self.n)
        self.x_out = torch.empty(rows, self.x.shape[1], dtype=self.x.dtype, device=self.x.device)
        self.y_out = torch.empty(rows, *self.y.shape[1:], dtype=self.y.dtype, device=self.y.device)
        self.cyclic = order == "cyclic"
        self.augment = augment if augment != "none" else None
        if self.augment is not None:
            if len(self.shape) != 3:
                raise TicketlabError(
                    f"augment={augment!r} needs images (channels, height, width); "
                    f"{data.name} has inputs of shape {self.shape}"
                )
            self.fill = augmentation.black_level(data.x_train)
            self.draws: list[augmentation.Draw] = []

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cyclic:
            k, rows = len(self.seeds), min(self.batch, self.n)
            start = step * self.batch % self.n
            if start + rows <= self.n:  # one slice, the same for every network: two copies
                self.x_out.view(k, rows, -1).copy_(self.x[start : start + rows].expand(k, -1, -1))
                self.y_out.view(k, rows, *self.y.shape[1:]).copy_(
                    self.y[start : start + rows].expand(k, *self.y[:rows].shape)
                )
            else:
                idx = (torch.arange(start, start + rows) % self.n).repeat(k)
                torch.index_select(self.x, 0, idx, out=self.x_out)
                torch.index_select(self.y, 0, idx, out=self.y_out)
            return self.x_out.view(k, -1, *self.shape), self.y_out
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            perms = torch.stack([epoch_permutation(s, epoch, self.n) for s in self.seeds])
            self.perms = perms.to(self.x.device)  # drawn on the CPU: the same order everywhere
            self.epoch = epoch
            if self.augment is not None:
                self.draws = [augmentation.draw(self.augment, s, epoch, self.n) for s in self.seeds]
        window = slice(position * self.batch, (position + 1) * self.batch)
        idx = self.perms[:, window].reshape(-1)
        if idx.numel() == self.y_out.shape[0]:
            torch.index_select(self.x, 0, idx, out=self.x_out)
            torch.index_select(self.y, 0, idx, out=self.y_out)
            x, y = self.x_out, self.y_out
        else:
            x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        if self.augment is not None:
            x = augmentation.apply(
                x.view(-1, *self.shape),
                torch.cat([d.dy[window] for d in self.draws]),
                torch.cat([d.dx[window] for d in self.draws]),
                torch.cat([d.flip[window] for d in self.draws]),
                self.fill,
            )
        return x.view(len(self.seeds), -1, *self.shape), y.view(-1)


def _rng_seed(job: Job) -> int:
    return (job.data_seed * 1_000_003 + 0x5EED) % (2**63 - 1)


_CURVE_KEYS = ("iteration", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")


def saved_step(saved: dict[str, Any] | None) -> int | None:
    return None if saved is None else int(saved["step"])


def _working_masks(
    stack: Stack, jobs: Sequence[Job], dtype: torch.dtype, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Masks in the parameters' working layout, as multipliers; all-true tensors are left out
    (multiplying by one changes nothing, so a dense network pays nothing for its mask)."""
    masks = {}
    for name in jobs[0].mask.names():
        keep = torch.stack([j.mask[name] for j in jobs]).to(device)
        if not bool(keep.all()):
            masks[name] = stack.to_working(name, keep).to(dtype).contiguous()
    return masks


def _apply_masks(stack: Stack, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            stack.params[name].mul_(mask)


def _flush_losses(run: _Run) -> None:
    """Fold the per-step training losses recorded since the last flush into ``run``: the first
    non-finite step of each network, and the running sum (non-finite counted as zero).

    ``cumsum`` adds row after row, exactly like adding each step's losses as it comes, so where
    the flushes fall (evaluations, checkpoints) never changes a bit of the result.
    """
    if not run.pending:
        return
    steps = [s for s, _ in run.pending]
    losses = torch.stack([v for _, v in run.pending]).cpu().double()
    run.pending.clear()
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        for row, i in torch.nonzero(bad).tolist():
            if run.diverged_at[i] is None:
                run.diverged_at[i] = steps[row]
    finite = torch.nan_to_num(losses, nan=0.0, posinf=0.0, neginf=0.0)
    run.loss_sum = torch.cat([run.loss_sum.unsqueeze(0), finite]).cumsum(0)[-1].clone()
    run.loss_count += len(steps)


def loss_and_accuracy(
    stack: Stack, x: torch.Tensor, y: torch.Tensor, where: Placement | None = None
):
    """Per network: mean loss and accuracy over ``(x, y)``, as float64 CPU tensors."""
    stack.set_training(False)  # BatchNorm uses its running statistics, dropout is off
    try:
        with torch.no_grad():
            return _loss_and_accuracy_eval(stack, x, y, where)
    finally:
        stack.set_training(True)


def _loss_and_accuracy_eval(stack: Stack, x: torch.Tensor, y: torch.Tensor, where):
    """Mean cross-entropy and accuracy over every target: one per row, or one per position of
    a sequence (next-token loss and accuracy), per network."""
    k = stack.size
    chunk = EVAL_CHUNK if y.dim() == 1 else max(1, EVAL_TOKENS // y[0].numel())
    losses, correct = [], []
    mixed = where is not None and where.mixed
    for start in range(0, x.shape[0], chunk):
        with where.autocast() if mixed else contextlib.nullcontext():
            logits = stack.forward_shared(x[start : start + chunk])
        logits = logits.float() if mixed else logits
        rows = y[start : start + chunk]
        target = rows.unsqueeze(0).expand(k, *rows.shape)
        losses.append(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
            ).view(k, -1)
        )
        correct.append((logits.argmax(-1) == target).reshape(k, -1))
    loss = torch.cat(losses, 1).cpu().double().mean(1)
    return loss, torch.cat(correct, 1).cpu().double().mean(1)


def _evaluate(stack: Stack, data: Dataset, run: _Run, where: Placement | None = None) -> None:
    _flush_losses(run)
    val_loss, val_acc = loss_and_accuracy(stack, data.x_val, data.y_val, where)
    test_loss, test_acc = loss_and_accuracy(stack, data.x_test, data.y_test, where)
    train_loss = (
        run.loss_sum / run.loss_count if run.loss_count else torch.full_like(val_loss, math.nan)
    )
    for i in range(stack.size):
        row = {
            "iteration": float(run.step),
            "train_loss": float(train_loss[i]),
            "val_loss": float(val_loss[i]),
            "val_acc": float(val_acc[i]),
            "test_loss": float(test_loss[i]),
            "test_acc": float(test_acc[i]),
        }
        for key, value in row.items():
            run.curve[key][i].append(value)
        # the same choice as _results' early_stop_iter: the first evaluation with the lowest
        # finite validation loss (the first evaluation when none is finite)
        value = row["val_loss"]
        if i not in run.best or (math.isfinite(value) and value < run.best_val[i]):
            run.best[i] = _cpu_state(stack, i)
            run.best_val[i] = value if math.isfinite(value) else math.inf
    run.loss_sum.zero_()
    run.loss_count = 0


def _cpu_state(stack: Stack, k: int) -> State:
    """Network ``k``'s weights in ``state_dict`` layout on the CPU (what run files hold)."""
    return {n: t.cpu() for n, t in canonical_state(stack, k).items()}


def _results(stack: Stack, jobs: Sequence[Job], run: _Run) -> list[Result]:
    _flush_losses(run)
    finals = [{n: t.cpu() for n, t in s.items()} for s in canonical_states(stack)]
    results = []
    for i, _job in enumerate(jobs):
        curve = {key: run.curve[key][i] for key in _CURVE_KEYS}
        finite = [(v, j) for j, v in enumerate(curve["val_loss"]) if math.isfinite(v)]
        best = min(finite)[1] if finite else 0
        results.append(
            Result(
                final=finals[i],
                snapshot=run.snapshots.get(i),
                curve={key: [_finite_or_none(v) for v in values] for key, values in curve.items()},
                early_stop_iter=int(curve["iteration"][best]),
                early_stop_test_acc=curve["test_acc"][best],
                final_test_acc=curve["test_acc"][-1],
                diverged=run.diverged_at[i] is not None,
                diverged_at=run.diverged_at[i],
                early_stop=run.best.get(i),
            )
        )
    return results


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _checkpoint(
    stack: Stack, jobs: Sequence[Job], optimizer: torch.optim.Optimizer, run: _Run
) -> dict[str, Any]:
    """A copy of everything training depends on, on the CPU whatever the device (so a run
    resumes on another device): nothing in it is shared with live state."""
    _flush_losses(run)
    return {
        "step": run.step,
        "start_step": run.start,
        "seeds": [j.data_seed for j in jobs],
        "params": to_cpu({n: p for n, p in stack.params.items()}),
        "buffers": to_cpu(stack.stacked_buffers()),
        "optimizer": to_cpu(optimizer.state_dict()),
        "curve": copy.deepcopy(run.curve),
        "snapshots": {str(i): to_cpu(s) for i, s in run.snapshots.items()},
        "best": {str(i): to_cpu(s) for i, s in run.best.items()},
        "best_val": [v if math.isfinite(v) else -1.0 for v in run.best_val],
        "diverged_at": [-1 if d is None else d for d in run.diverged_at],
        "loss_sum": run.loss_sum.clone(),
        "loss_count": run.loss_count,
        **({"scaler": run.scaler.state_dict()} if run.scaler is not None else {}),
        **({"rng": stack.rng_state()} if stack.uses_rng else {}),
    }


def _fits(stack: Stack, jobs: Sequence[Job], saved: dict[str, Any], start: int) -> bool:
    """Whether ``saved`` was written for these jobs, from this start step, in this layout (a
    checkpoint from before the early-stop weights were kept has no ``best``: its networks
    retrain, to the same bits)."""
    params = saved.get("params", {})
    if stack.uses_rng:  # one stream per network (checkpoints before 0.2 held one for the stack)
        rng = saved.get("rng")
        if rng is None or rng.dim() != 2 or rng.shape[0] != stack.size:
            return False
    return (
        "best" in saved
        and int(saved.get("start_step", 0)) == start
        and saved.get("seeds", [j.data_seed for j in jobs]) == [j.data_seed for j in jobs]
        and set(params) == set(stack.params)
        and all(params[n].shape == p.shape for n, p in stack.params.items())
    )


def _restore(stack: Stack, optimizer: torch.optim.Optimizer, run: _Run, saved: dict) -> None:
    """Load a checkpoint by copy (the caller's object stays untouched and reusable)."""
    with torch.no_grad():
        for name, tensor in saved["params"].items():
            stack.params[name].copy_(tensor)
        live = stack.stacked_buffers()
        for name, tensor in saved.get("buffers", {}).items():
            live[name].copy_(tensor)
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    run.step = int(saved["step"])
    run.curve = copy.deepcopy(saved["curve"])
    run.snapshots = {
        int(i): {n: t.clone() for n, t in s.items()} for i, s in saved["snapshots"].items()
    }
    run.best = {int(i): {n: t.clone() for n, t in s.items()} for i, s in saved["best"].items()}
    run.best_val = [math.inf if v < 0 else float(v) for v in saved["best_val"]]
    run.diverged_at = [None if d < 0 else int(d) for d in saved["diverged_at"]]
    run.loss_sum = saved["loss_sum"].clone()
    run.loss_count = int(saved["loss_count"])
    if run.scaler is not None and "scaler" in saved:
        run.scaler.load_state_dict(saved["scaler"])
    if "rng" in saved:
        stack.set_rng_state(saved["rng"])
