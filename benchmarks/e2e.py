"""A whole ticket search, end to end: ticketlab against a well-written plain PyTorch loop.

    .venv/bin/python benchmarks/e2e.py [--levels 16] [--steps 2000] [--replicates 2]
    .venv/bin/python benchmarks/e2e.py --only mnist1d      # or --only lenet: one experiment

The experiment: LeNet-300-100 on mnist5k (4,500 training digits, 500 held out for validation,
1,000 test), the paper's hyperparameters (Adam 1.2e-3, batch 60), 2 replicates, IMP at 20% per
layer (output layer 10%) with both controls (random reinit, random prune) at every level,
validation and test evaluated every 100 steps, early stop at the minimum validation loss.
Levels 0..16 take the network from 100% to 2.8% of its weights, so dense levels and the levels
that train on ticketlab's sparse path are both in it.

Both sides do the same work with the same hyperparameters and evaluations, one after the other in
this process:

  ticketlab:  ``run_search`` exactly as ``ticketlab find`` runs it (run folder, checkpoints every
              250 steps, no report), timed from the call to its return;
  plain loop: written here with no ticketlab training code: one ``nn.Sequential`` at a time, data as
              tensors indexed directly (a seeded permutation per epoch), ``Adam(fused=True)``, the
              mask multiplied into the weights after each step, no DataLoader, no
              reparametrization; IMP pruning and controls as above; the same data split.

The second experiment is the MNIST-1D grid of ``benchmarks/mnist1d_table.py``: the notebook's
MLP 40-500-500-10 (default init, Adam 2e-2, batch 100 taken cyclically, 1501 steps), one round per
listed sparsity (0, .45, .80, ... .99) of layer-wise magnitude pruning with weights and biases
ranked together, 2 trials, a random-mask control per trial at each pruned round; final test
accuracy. Each round ranks the final weights (``mnist1d_table.py --prune-final``) at the listed
sparsities themselves (``mnist1d_table.py`` now uses the notebook's i/99 values, .4545 for .45):
the grid is kept as it was timed in earlier releases, since it measures speed, not the table. The
schedule (masks, controls) is the same code on both sides; ticketlab trains each
round's networks with one ``train`` call, as ``mnist1d_table.py`` does, the plain loop one network
at a time.

Printed: wall times and the ratio, and each side's fraction of this machine's fp32 matmul peak end
to end (dense-equivalent FLOPs: 6 x weights x samples per training step plus 2 x weights x samples
per evaluation), over the whole search and over the dense levels (density >= 20%, where both sides
train dense matrices). Then a breakdown of ticketlab's time by what it was spent on, measured by
wrapping the trainer's pieces (with stacks training side by side, lane-seconds are summed over the
lanes and divided by the lane count). ticketlab's lanes are forked processes by default
(``ticketlab.train.process_lanes``); ``TICKETLAB_LANES=threads`` times the thread lanes instead.

``--plain-flush-denormals`` also runs the plain loop a second time with denormals flushed in its
thread, as ticketlab's trainer does (``ticketlab.train.device.denormals_flushed``): the issue's
plain loop does not do it, but a user who knows about denormals would, so both ratios are printed.

The machine is shared: run it alone (or at ``nice -n -10``); the ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist1d_table import (
    PUBLISHED_TICKET,
    SPARSITIES,
    control_jobs,
    mnist1d_full_train,
    prune_round,
)
from throughput import matmul_peak  # the same sgemm peak as the throughput benchmark
from ticketlab.api import run_search
from ticketlab.core.mask import Mask, layer_groups, prunable_names
from ticketlab.io.config import resolve
from ticketlab.studies import imp
from ticketlab.train import trainer
from ticketlab.train.device import denormals_flushed
from ticketlab.train.process_lanes import lane_kind
from ticketlab.train.trainer import Job, TrainSpec
from ticketlab.zoo.data import Dataset, load_dataset
from ticketlab.zoo.models import build_model

MODEL, DATA = "lenet_300_100", "mnist5k"
LR, BATCH, EVAL_EVERY = 1.2e-3, 60, 100
FC_RATE, OUTPUT_RATE = 0.2, 0.1
SPARSE_FROM = 0.2  # ticketlab's sparse path takes over below this density


# ------------------------------------------------------------------------------------------
# the plain loop


def lenet(input_size: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(input_size, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return net


def weight_names(net: nn.Module) -> list[str]:
    return [n for n, p in net.named_parameters() if n.endswith("weight")]


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = net(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def plain_train(
    net: nn.Module,
    mask: dict[str, torch.Tensor],
    data: Dataset,
    steps: int,
    seed: int,
    eval_every: int = EVAL_EVERY,
) -> tuple[dict[str, torch.Tensor], float]:
    """Train one masked network; return its final weights and test accuracy at early stop."""
    x, y = data.x_train, data.y_train
    step_on = plain_stepper(net, mask, LR, x, y)
    n, per_epoch = x.shape[0], x.shape[0] // BATCH
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    best_val, best_acc = float("inf"), 0.0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            val_loss, _ = evaluate(net, data.x_val, data.y_val)
            _, test_acc = evaluate(net, data.x_test, data.y_test)
            if val_loss < best_val:
                best_val, best_acc = val_loss, test_acc
        if step == steps:
            break
        position = step % per_epoch
        if position == 0 and step:
            perm = torch.randperm(n, generator=g)
        step_on(perm[position * BATCH : (position + 1) * BATCH])
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, best_acc


def plain_stepper(
    net: nn.Module, mask: dict[str, torch.Tensor], lr: float, x: torch.Tensor, y: torch.Tensor
) -> Callable[[torch.Tensor], None]:
    """The plain loop's step on the examples ``idx``: forward, backward, fused Adam, then the
    mask multiplied into the weights (applied once here, before the first step)."""
    params = dict(net.named_parameters())
    keep = {name: m.to(params[name].dtype) for name, m in mask.items()}
    with torch.no_grad():
        for name, m in keep.items():
            params[name].mul_(m)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)

    def step(idx: torch.Tensor) -> None:
        loss = F.cross_entropy(net(x.index_select(0, idx)), y.index_select(0, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, m in keep.items():
                params[name].mul_(m)

    return step


def prune_magnitude(mask: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> dict:
    """Remove FC_RATE of each layer's remaining weights (output layer OUTPUT_RATE), smallest |w|."""
    names = list(mask)
    pruned = {}
    for name in names:
        rate = OUTPUT_RATE if name == names[-1] else FC_RATE
        keep = mask[name]
        alive = int(keep.sum())
        drop = round(alive * rate)
        scores = final[name].abs().masked_fill(~keep, float("inf")).flatten()
        new = keep.clone().flatten()
        new[torch.argsort(scores, stable=True)[:drop]] = False
        pruned[name] = new.view_as(keep)
    return pruned


def random_like(mask: dict[str, torch.Tensor], g: torch.Generator) -> dict:
    out = {}
    for name, keep in mask.items():
        flat = torch.zeros(keep.numel(), dtype=torch.bool)
        flat[torch.randperm(keep.numel(), generator=g)[: int(keep.sum())]] = True
        out[name] = flat.view_as(keep)
    return out


def plain_search(data: Dataset, levels: int, replicates: int, steps: int) -> list[float]:
    """IMP with both controls, one network at a time. Returns the seconds of each level."""
    size = data.x_train[0].numel()
    inits = [lenet(size, 1000 + r).state_dict() for r in range(replicates)]
    names = weight_names(lenet(size, 0))
    masks = [
        {n: torch.ones_like(inits[r][n], dtype=torch.bool) for n in names}
        for r in range(replicates)
    ]
    g = torch.Generator().manual_seed(7)
    seconds = []
    for level in range(levels + 1):
        start = time.perf_counter()
        finals = []
        for r in range(replicates):
            net = lenet(size, 0)
            net.load_state_dict(inits[r])
            final, _ = plain_train(net, masks[r], data, steps, seed=10 * level + r)
            finals.append(final)
            if level:
                reinit = lenet(size, 2000 + 100 * level + r)
                plain_train(reinit, masks[r], data, steps, seed=10 * level + r + 5)
                shuffled = lenet(size, 0)
                shuffled.load_state_dict(inits[r])
                plain_train(shuffled, random_like(masks[r], g), data, steps, 10 * level + r + 7)
        masks = [prune_magnitude(masks[r], finals[r]) for r in range(replicates)]
        seconds.append(time.perf_counter() - start)
    return seconds


# ------------------------------------------------------------------------------------------
# ticketlab, timed by piece


class Breakdown:
    """Seconds spent inside wrapped functions, summed over lanes, threads or forked processes
    alike: the sums live in shared memory made before any lane starts."""

    def __init__(self, slots: int = 16) -> None:
        self.shared = multiprocessing.get_context("fork").Array("d", slots)
        self.labels: list[str] = []
        self.undo: list[Callable[[], None]] = []

    @property
    def seconds(self) -> dict[str, float]:
        return {label: self.shared[i] for i, label in enumerate(self.labels)}

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        slot = len(self.labels)
        self.labels.append(label)
        shared = self.shared

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with shared.get_lock():
                    shared[slot] += time.perf_counter() - t

        setattr(owner, attr, timed)
        self.undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        for undo in reversed(self.undo):
            undo()


def ticketlab_search(levels: int, replicates: int, steps: int, out: Path):
    config = resolve(
        {
            "model": MODEL,
            "data": DATA,
            "levels": levels,
            "replicates": replicates,
            "steps": steps,
            "eval_every": EVAL_EVERY,
            "out": str(out),
            "report": False,
        }
    )
    pieces = Breakdown()
    pieces.wrap(trainer, "train_stack", "train_stack (lane-s)")
    pieces.wrap(trainer, "_evaluate", "evaluation (lane-s)")
    pieces.wrap(trainer.Batches, "__call__", "batch gathering (lane-s)")
    pieces.wrap(imp.StoreCheckpointer, "save", "checkpoint writes (lane-s)")
    pieces.wrap(imp, "save_level", "level results written")
    pieces.wrap(imp, "train_level", "training levels (wall)")
    level_seconds: list[float] = []
    original_train_level = imp.train_level

    def timed_level(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original_train_level(*args, **kwargs)
        finally:
            level_seconds.append(time.perf_counter() - t)

    imp.train_level = timed_level
    start = time.perf_counter()
    try:
        run_search(config)
    finally:
        imp.train_level = original_train_level
        pieces.restore()
    return time.perf_counter() - start, level_seconds, pieces.seconds


# ------------------------------------------------------------------------------------------


def density(level: int) -> float:
    hidden = (784 * 300 + 300 * 100) * 0.8**level
    return (hidden + 1000 * 0.9**level) / 266_200


def flops(levels: int, replicates: int, steps: int, data: Dataset) -> list[float]:
    """Dense-equivalent FLOPs of each level: training and evaluation."""
    weights = 266_610
    evals = steps // EVAL_EVERY + 1
    eval_samples = data.x_val.shape[0] + data.x_test.shape[0]
    per_network = 6 * weights * BATCH * steps + 2 * weights * eval_samples * evals
    return [per_network * replicates * (1 if level == 0 else 3) for level in range(levels + 1)]


# ------------------------------------------------------------------------------------------
# the MNIST-1D grid

MNIST1D_STEPS, MNIST1D_BATCH, MNIST1D_LR = 1501, 100, 2e-2

# One network trained: (its final weights, final test accuracy %).
Trained = tuple[dict[str, torch.Tensor], float]


def mnist1d_grid(
    data: Dataset, trials: int, steps: int, train_round: Callable[[list[Job]], list[Trained]]
) -> tuple[list[float], dict[float, float]]:
    """The table's schedule, whoever trains: seconds per round and the mean ticket accuracy."""
    template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
    names = prunable_names(template, prune_biases=True)
    groups = layer_groups(names)
    inits = [
        {
            k: v.detach().clone()
            for k, v in build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=t)
            .state_dict()
            .items()
        }
        for t in range(trials)
    ]
    masks = [Mask.ones_like({n: inits[t][n] for n in names}) for t in range(trials)]
    finals: list[dict[str, torch.Tensor]] = []
    seconds, ticket = [], {}
    for r, sparsity in enumerate(SPARSITIES):
        start = time.perf_counter()
        if r:
            masks = prune_round(masks, inits, finals, groups, sparsity)
        jobs = [Job(inits[t], masks[t], data_seed=t) for t in range(trials)]
        if r:
            jobs += control_jobs(r, inits, masks, groups)
        trained = train_round(jobs)
        finals = [trained[t][0] for t in range(trials)]
        ticket[sparsity] = sum(trained[t][1] for t in range(trials)) / trials
        seconds.append(time.perf_counter() - start)
    return seconds, ticket


def ticketlab_round(data: Dataset, steps: int) -> Callable[[list[Job]], list[Trained]]:
    template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
    spec = TrainSpec(
        steps=steps,
        batch_size=MNIST1D_BATCH,
        lr=MNIST1D_LR,
        eval_every=steps,
        data_order="cyclic",
    )

    def train_round(jobs: list[Job]) -> list[Trained]:
        results = trainer.train(template, jobs, data, spec)
        return [(res.final, 100 * res.final_test_acc) for res in results]

    return train_round


def mlp(input_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(input_size, 500),
        nn.ReLU(),
        nn.Linear(500, 500),
        nn.ReLU(),
        nn.Linear(500, 10),
    )


def plain_round(data: Dataset, steps: int) -> Callable[[list[Job]], list[Trained]]:
    """One network at a time: cyclic batches, fused Adam, the mask multiplied in after each step;
    validation at the first and last step and test at the last, as the ticketlab side evaluates."""
    x, y, n = data.x_train, data.y_train, data.x_train.shape[0]

    def train_one(job: Job) -> Trained:
        net = mlp(x.shape[1])
        net.load_state_dict(job.init)
        step_on = plain_stepper(net, job.mask.tensors, MNIST1D_LR, x, y)
        evaluate(net, data.x_val, data.y_val)
        for step in range(steps):
            step_on(torch.arange(step * MNIST1D_BATCH, (step + 1) * MNIST1D_BATCH) % n)
        evaluate(net, data.x_val, data.y_val)
        _, acc = evaluate(net, data.x_test, data.y_test)
        return {k: v.detach().clone() for k, v in net.state_dict().items()}, 100 * acc

    return lambda jobs: [train_one(job) for job in jobs]


def run_mnist1d(peak: float, steps: int, trials: int = 2, flushed_plain: bool = False) -> None:
    data = mnist1d_full_train()
    print(
        f"\nMNIST-1D grid (mnist1d_table.py's schedule): {len(SPARSITIES)} rounds, {trials} "
        "trials, "
        f"a random control per trial at each pruned round, {steps} steps per network"
    )
    lab_rounds, lab_ticket = mnist1d_grid(data, trials, steps, ticketlab_round(data, steps))
    plain_rounds, plain_ticket = mnist1d_grid(data, trials, steps, plain_round(data, steps))
    t_lab, t_plain = sum(lab_rounds), sum(plain_rounds)
    if flushed_plain:
        with denormals_flushed():
            flushed_rounds, _ = mnist1d_grid(data, trials, steps, plain_round(data, steps))
    weights = 40 * 500 + 500 * 500 + 500 * 10
    networks = trials + 2 * trials * (len(SPARSITIES) - 1)
    work = 6 * weights * MNIST1D_BATCH * steps * networks

    def pct(seconds: float) -> str:
        return f"{work / seconds / 1e9 / peak:4.0%}"

    print(f"  ticketlab   {t_lab:8.1f} s   {pct(t_lab)} of peak end to end (dense-equivalent)")
    print(f"  plain loop  {t_plain:8.1f} s   {pct(t_plain)} of peak end to end")
    print(f"  ratio plain / ticketlab: {t_plain / t_lab:.2f}")
    if flushed_plain:
        t_flushed = sum(flushed_rounds)
        print(
            f"  plain loop, denormals flushed {t_flushed:8.1f} s   {pct(t_flushed)} of peak; "
            f"ratio / ticketlab: {t_flushed / t_lab:.2f}"
        )
    print("  per round (s):  sparsity ticketlab plain   ticket acc: ticketlab plain published")
    for i, sparsity in enumerate(SPARSITIES):
        print(
            f"                  {sparsity:8.2f} {lab_rounds[i]:9.1f} {plain_rounds[i]:5.1f}"
            f"               {lab_ticket[sparsity]:9.1f} {plain_ticket[sparsity]:5.1f}"
            f" {PUBLISHED_TICKET[i]:9.1f}"
        )


# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000, help="LeNet steps per network")
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--mnist1d-steps", type=int, default=MNIST1D_STEPS)
    parser.add_argument("--only", choices=("lenet", "mnist1d"), default=None)
    parser.add_argument(
        "--plain-flush-denormals",
        action="store_true",
        help="also time the plain loop with denormals flushed, as ticketlab's trainer runs",
    )
    args = parser.parse_args()
    one, five, _ = os.getloadavg()
    print(
        f"{torch.get_num_threads()} threads; ticketlab's parallel stacks as {lane_kind()} "
        f"($TICKETLAB_LANES); load average {one:.2f} / {five:.2f}"
    )
    # torch.optim's first optimizer imports torch._dynamo (~1.8 s here): a cost of any fresh
    # process that trains, not of either side's loop, so it is paid once before both are timed.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 sgemm, best of repeats): {peak:.1f} GFLOP/s")
    if args.only in (None, "lenet"):
        run_lenet(peak, args.levels, args.replicates, args.steps, args.plain_flush_denormals)
    if args.only in (None, "mnist1d"):
        run_mnist1d(peak, args.mnist1d_steps, flushed_plain=args.plain_flush_denormals)


def run_lenet(
    peak: float, levels: int, replicates: int, steps: int, flushed_plain: bool = False
) -> None:
    data = load_dataset(DATA, 0.1, 0)
    work = flops(levels, replicates, steps, data)
    dense_levels = [lv for lv in range(levels + 1) if density(lv) >= SPARSE_FROM]
    print(
        f"LeNet-300-100 on {DATA}: levels 0..{levels} ({density(levels):.1%} of weights "
        f"at the end), {replicates} replicates, both controls, {steps} steps per network"
    )

    with tempfile.TemporaryDirectory() as tmp:
        t_lab, lab_levels, pieces = ticketlab_search(levels, replicates, steps, Path(tmp) / "run")
    plain_levels = plain_search(data, levels, replicates, steps)
    t_plain = sum(plain_levels)
    if flushed_plain:
        with denormals_flushed():
            flushed_levels = plain_search(data, levels, replicates, steps)

    def pct(total_flops: float, seconds: float) -> str:
        return f"{total_flops / seconds / 1e9 / peak:4.0%}"

    dense_work = sum(work[lv] for lv in dense_levels)
    lab_dense = sum(lab_levels[lv] for lv in dense_levels)
    plain_dense = sum(plain_levels[lv] for lv in dense_levels)
    print(
        f"  ticketlab   {t_lab:8.1f} s   {pct(sum(work), t_lab)} of peak end to end;"
        f" dense levels {lab_dense:7.1f} s, {pct(dense_work, lab_dense)} of peak"
    )
    print(
        f"  plain loop  {t_plain:8.1f} s   {pct(sum(work), t_plain)} of peak end to end;"
        f" dense levels {plain_dense:7.1f} s, {pct(dense_work, plain_dense)} of peak"
    )
    print(
        f"  ratio plain / ticketlab: {t_plain / t_lab:.2f} (whole search), "
        f"{plain_dense / lab_dense:.2f} (dense levels)"
    )
    if flushed_plain:
        t_flushed = sum(flushed_levels)
        flushed_dense = sum(flushed_levels[lv] for lv in dense_levels)
        print(
            f"  plain loop, denormals flushed {t_flushed:8.1f} s; ratio / ticketlab: "
            f"{t_flushed / t_lab:.2f} (whole search), "
            f"{flushed_dense / lab_dense:.2f} (dense levels)"
        )
    print("  per level (s):  level density ticketlab plain")
    for lv in range(levels + 1):
        print(
            f"                  {lv:5d} {density(lv):7.1%} {lab_levels[lv]:9.1f} "
            f"{plain_levels[lv]:5.1f}"
        )
    lanes = max(1, torch.get_num_threads())
    print(f"ticketlab's time by piece (wall {t_lab:.1f} s; lane-seconds / {lanes} lanes):")
    for label, seconds in sorted(pieces.items(), key=lambda kv: -kv[1]):
        shown = seconds / lanes if "lane-s" in label else seconds
        print(f"  {label:32s} {shown:8.1f} s  ({shown / t_lab:4.0%})")
    outside = t_lab - pieces.get("training levels (wall)", 0.0)
    print(f"  {'set-up, data, summary (rest)':32s} {outside:8.1f} s  ({outside / t_lab:4.0%})")
    kernel_bound(data, peak, replicates)


def random_level_jobs(data: Dataset, networks: int, level: int) -> list[Job]:
    """``networks`` LeNets with random masks of IMP level ``level``'s per-layer densities."""
    size = data.x_train[0].numel()
    jobs = []
    for i in range(networks):
        init = lenet(size, 3000 + i).state_dict()
        g = torch.Generator().manual_seed(i)
        keep = {}
        for name in weight_names(lenet(size, 0)):
            rate = OUTPUT_RATE if name.startswith("5.") else FC_RATE
            keep[name] = torch.rand(init[name].shape, generator=g) < (1 - rate) ** level
        jobs.append(Job(init, Mask(keep), data_seed=i))
    return jobs


def kernel_rates(data: Dataset, networks: int, level: int, steps: int) -> tuple[float, float]:
    """Network-steps/s of training alone (no evaluation, checkpoint or pruning) at one level's
    densities: ticketlab's ``train`` on ``networks`` jobs, and the plain loop on one of them."""
    template = lenet(data.x_train[0].numel(), 0)
    jobs = random_level_jobs(data, networks, level)
    spec = TrainSpec(steps=steps, batch_size=BATCH, lr=LR, eval_every=steps)
    trainer.train(template, jobs[:2], data, dataclasses.replace(spec, steps=20, eval_every=20))
    start = time.perf_counter()
    trainer.train(template, jobs, data, spec)
    lab = networks * steps / (time.perf_counter() - start)
    net = lenet(data.x_train[0].numel(), 0)
    net.load_state_dict(jobs[0].init)
    keep = {n: jobs[0].mask[n] for n in jobs[0].mask.names()}
    start = time.perf_counter()
    plain_train(net, keep, data, steps, seed=0, eval_every=steps)
    plain = steps / (time.perf_counter() - start)
    return lab, plain


def kernel_bound(data: Dataset, peak: float, replicates: int, steps: int = 500) -> None:
    """The ceiling: training alone, at the e2e run's stack size and at the paper's (5 replicates),
    and the paper's whole LeNet experiment estimated from those rates."""
    per_level = 3 * replicates
    print(
        f"\nBound: training alone ({steps} steps, no evaluation/checkpoints), network-steps/s; "
        f"{per_level} networks per level as above, and 15 (the paper's 5 replicates x 3 branches)"
    )
    print(
        f"  level density  ticketlab K={per_level:<3d}  ticketlab K=15  plain loop  "
        f"ratio K={per_level} / plain"
    )
    paper_levels = range(16)  # levels 0..15: 100% -> 3.5% of the weights
    measured = (0, 1, 3, 7, 11, 15)
    rates15: dict[int, float] = {}
    for level in measured:
        lab, plain = kernel_rates(data, per_level, level, steps)
        lab15, _ = kernel_rates(data, 15, level, steps)
        rates15[level] = lab15
        print(
            f"  {level:5d} {density(level):7.1%}  {lab:14.0f}  {lab15:14.0f}  {plain:10.0f}"
            f"  {lab / plain:8.2f}"
        )
        flops_per_step = 6 * 266_610 * BATCH
        if level == 0:
            print(
                f"        (dense: ticketlab K={per_level} at "
                f"{lab * flops_per_step / 1e9 / peak:.0%} of peak, plain "
                f"{plain * flops_per_step / 1e9 / peak:.0%})"
            )

    def rate(level: int) -> float:  # piecewise linear between measured levels
        below = max(m for m in measured if m <= level)
        above = min(m for m in measured if m >= level)
        if below == above:
            return rates15[below]
        w = (level - below) / (above - below)
        return (1 - w) * rates15[below] + w * rates15[above]

    network_steps = [(5 if lv == 0 else 15) * 50_000 for lv in paper_levels]
    seconds = sum(n / rate(lv) for n, lv in zip(network_steps, paper_levels, strict=True))
    print(
        f"The paper's LeNet-300-100 experiment (5 replicates, levels 0..15, both controls, 50,000 "
        f"steps each: {sum(network_steps) / 1e6:.1f}M network-steps) at these K=15 rates: "
        f"{seconds / 3600:.1f} h of training on this machine, plus evaluation (full MNIST's 15,000 "
        f"validation+test digits every 1,000 steps cost what mnist5k's 1,500 every 100 do)."
    )


if __name__ == "__main__":
    main()
