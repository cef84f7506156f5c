"""Train K masked networks of one architecture at once; results equal training them one by one.

Per network: its own init, mask, data order (seeded), optimizer state (Adam and SGD act elementwise,
so one optimizer over stacked tensors is K independent optimizers), early-stopping record. The loss
is the *sum* of the K per-network mean losses, so each network's gradient is exactly its own.

The mask is applied to the weights after every optimizer step instead of in the forward pass: pruned
weights are exactly zero at every step and the forward pass does no extra work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .mask import Mask
from .stacked import Stack, State, canonical_states, max_stack_size, stack_networks

EVAL_CHUNK = 2048


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

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return warm * self.gamma ** sum(step >= m for m in self.milestones)

    def eval_steps(self) -> list[int]:
        return sorted({*range(0, self.steps, self.eval_every), self.steps})


@dataclass(frozen=True)
class Job:
    """One network to train: where it starts, what is alive, how its data is ordered."""

    init: State
    mask: Mask
    data_seed: int
    snapshot_step: int | None = None


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

    def metrics(self) -> dict[str, Any]:
        return {
            "early_stop_iter": self.early_stop_iter,
            "early_stop_test_acc": self.early_stop_test_acc,
            "final_test_acc": self.final_test_acc,
            "untrained_test_acc": self.curve["test_acc"][0],
            "diverged": self.diverged,
            "diverged_at": self.diverged_at,
            "curve": self.curve,
        }


class Checkpointer(Protocol):
    """Where a stack's mid-training state goes; the experiment decides the file and its checks."""

    every: int

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


Progress = Callable[[int], None]


@dataclass
class _Run:
    """Mutable state of one stack's training, exactly what a checkpoint must hold."""

    step: int = 0
    curve: dict[str, list[list[float]]] = field(default_factory=dict)
    snapshots: dict[int, State] = field(default_factory=dict)
    diverged_at: list[int | None] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0


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
) -> list[Result]:
    """Train every job; ``stack_size`` networks at a time (default: as many as the architecture
    allows, up to 16). ``stack_size=1`` is the one-by-one path."""
    size = min(stack_size or max_stack_size(template), max_stack_size(template))
    chunks = [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]
    results: list[Result] = []
    for c, chunk in enumerate(chunks):
        checkpointer = checkpointers[c] if checkpointers else None
        results += train_stack(template, chunk, data, spec, progress, checkpointer)
    return results


def chunk_count(template: nn.Module, n_jobs: int, stack_size: int | None) -> int:
    size = min(stack_size or max_stack_size(template), max_stack_size(template))
    return math.ceil(n_jobs / size)


def train_stack(
    template: nn.Module,
    jobs: Sequence[Job],
    data: Dataset,
    spec: TrainSpec,
    progress: Progress | None = None,
    checkpointer: Checkpointer | None = None,
) -> list[Result]:
    dtype = getattr(torch, spec.dtype)
    data = data.to(dtype)
    stack = stack_networks(template, [j.init for j in jobs], dtype, data.x_train)
    k = stack.size
    masks = {
        name: stack.to_working(name, torch.stack([j.mask[name] for j in jobs])).to(dtype)
        for name in jobs[0].mask.names()
    }
    masks = {n: m.contiguous() for n, m in masks.items()}
    _apply_masks(stack, masks)
    optimizer = make_optimizer(list(stack.params.values()), spec)
    run = _Run(diverged_at=[None] * k, loss_sum=torch.zeros(k, dtype=torch.float64))
    run.curve = {key: [[] for _ in range(k)] for key in _CURVE_KEYS}

    saved = checkpointer.load() if checkpointer else None
    if saved is not None:
        _restore(stack, optimizer, run, saved)

    n_train, batch = data.x_train.shape[0], spec.batch_size
    per_epoch = max(1, n_train // batch)
    eval_at = set(spec.eval_steps())
    perms: torch.Tensor | None = None
    for step in range(run.step, spec.steps + 1):
        run.step = step
        # saved before this step's snapshot and evaluation, so a resume at ``step`` redoes both
        if checkpointer and step and step % checkpointer.every == 0 and saved_step(saved) != step:
            checkpointer.save(_checkpoint(stack, optimizer, run))
        for i, job in enumerate(jobs):
            if job.snapshot_step == step:
                run.snapshots[i] = canonical_states(stack)[i]
        if step in eval_at:
            _evaluate(stack, data, run)
        if step == spec.steps:
            break
        epoch, position = divmod(step, per_epoch)
        if perms is None or position == 0:
            perms = torch.stack([epoch_permutation(j.data_seed, epoch, n_train) for j in jobs])
        idx = perms[:, position * batch : (position + 1) * batch]
        x, y = data.x_train[idx], data.y_train[idx]
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * spec.lr_factor(step)
        logits = stack.forward(x)
        per_net = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
        ).view(k, -1)
        per_net_loss = per_net.mean(dim=1)
        optimizer.zero_grad(set_to_none=True)
        per_net_loss.sum().backward()
        optimizer.step()
        _apply_masks(stack, masks)
        loss_values = per_net_loss.detach().double()
        _mark_diverged(run, loss_values, step)
        run.loss_sum += torch.nan_to_num(loss_values, nan=0.0, posinf=0.0, neginf=0.0)
        run.loss_count += 1
        if progress:
            progress(k)
    return _results(stack, jobs, run)


_CURVE_KEYS = ("iteration", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")


def saved_step(saved: dict[str, Any] | None) -> int | None:
    return None if saved is None else int(saved["step"])


def _apply_masks(stack: Stack, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            stack.params[name].mul_(mask)


def _mark_diverged(run: _Run, losses: torch.Tensor, step: int) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        for i in torch.nonzero(bad).flatten().tolist():
            if run.diverged_at[i] is None:
                run.diverged_at[i] = step


@torch.no_grad()
def _loss_and_accuracy(stack: Stack, x: torch.Tensor, y: torch.Tensor):
    losses, correct = [], []
    for start in range(0, x.shape[0], EVAL_CHUNK):
        logits = stack.forward_shared(x[start : start + EVAL_CHUNK])
        target = y[start : start + EVAL_CHUNK].expand(stack.size, -1)
        losses.append(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
            ).view(stack.size, -1)
        )
        correct.append(logits.argmax(-1) == target)
    return torch.cat(losses, 1).double().mean(1), torch.cat(correct, 1).double().mean(1)


def _evaluate(stack: Stack, data: Dataset, run: _Run) -> None:
    val_loss, val_acc = _loss_and_accuracy(stack, data.x_val, data.y_val)
    test_loss, test_acc = _loss_and_accuracy(stack, data.x_test, data.y_test)
    train_loss = run.loss_sum / run.loss_count if run.loss_count else torch.full_like(val_loss, math.nan)
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
    run.loss_sum.zero_()
    run.loss_count = 0


def _results(stack: Stack, jobs: Sequence[Job], run: _Run) -> list[Result]:
    finals = canonical_states(stack)
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
            )
        )
    return results


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _checkpoint(stack: Stack, optimizer: torch.optim.Optimizer, run: _Run) -> dict[str, Any]:
    return {
        "step": run.step,
        "params": {n: p.detach().clone() for n, p in stack.params.items()},
        "optimizer": optimizer.state_dict(),
        "curve": run.curve,
        "snapshots": {str(i): s for i, s in run.snapshots.items()},
        "diverged_at": [-1 if d is None else d for d in run.diverged_at],
        "loss_sum": run.loss_sum.clone(),
        "loss_count": run.loss_count,
    }


def _restore(stack: Stack, optimizer: torch.optim.Optimizer, run: _Run, saved: dict) -> None:
    with torch.no_grad():
        for name, tensor in saved["params"].items():
            stack.params[name].copy_(tensor)
    optimizer.load_state_dict(saved["optimizer"])
    run.step = int(saved["step"])
    run.curve = saved["curve"]
    run.snapshots = {int(i): s for i, s in saved["snapshots"].items()}
    run.diverged_at = [None if d < 0 else int(d) for d in saved["diverged_at"]]
    run.loss_sum = saved["loss_sum"].clone()
    run.loss_count = int(saved["loss_count"])
