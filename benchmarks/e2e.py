"""A whole ticket search, end to end: ticketlab against a well-written plain PyTorch loop.

    .venv/bin/python benchmarks/e2e.py [--levels 16] [--steps 2000] [--replicates 2]

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

Printed: wall times and the ratio, and each side's fraction of this machine's fp32 matmul peak end
to end (dense-equivalent FLOPs: 6 x weights x samples per training step plus 2 x weights x samples
per evaluation), over the whole search and over the dense levels (density >= 20%, where both sides
train dense matrices). Then a breakdown of ticketlab's time by what it was spent on, measured by
wrapping the trainer's pieces (with stacks training side by side, lane-seconds are summed over the
lanes and divided by the lane count).

The machine is shared: run it alone (or at ``nice -n -10``); the ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from throughput import matmul_peak  # the same sgemm peak as the throughput benchmark
from ticketlab.api import run_search
from ticketlab.io.config import resolve
from ticketlab.studies import imp
from ticketlab.train import trainer
from ticketlab.zoo.data import Dataset, load_dataset

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
    net: nn.Module, mask: dict[str, torch.Tensor], data: Dataset, steps: int, seed: int
) -> tuple[dict[str, torch.Tensor], float]:
    """Train one masked network; return its final weights and test accuracy at early stop."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, keep in mask.items():
            params[name].mul_(keep)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
    x, y = data.x_train, data.y_train
    n, per_epoch = x.shape[0], x.shape[0] // BATCH
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    best_val, best_acc = float("inf"), 0.0
    for step in range(steps + 1):
        if step % EVAL_EVERY == 0 or step == steps:
            val_loss, _ = evaluate(net, data.x_val, data.y_val)
            _, test_acc = evaluate(net, data.x_test, data.y_test)
            if val_loss < best_val:
                best_val, best_acc = val_loss, test_acc
        if step == steps:
            break
        position = step % per_epoch
        if position == 0 and step:
            perm = torch.randperm(n, generator=g)
        idx = perm[position * BATCH : (position + 1) * BATCH]
        loss = F.cross_entropy(net(x.index_select(0, idx)), y.index_select(0, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, keep in mask.items():
                params[name].mul_(keep)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, best_acc


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
    """Seconds spent inside wrapped functions, summed over threads (lanes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[label] += time.perf_counter() - t

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
    pieces.wrap(imp.StoreCheckpointer, "save", "checkpoint writes")
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
    return time.perf_counter() - start, level_seconds, dict(pieces.seconds)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--replicates", type=int, default=2)
    args = parser.parse_args()
    one, five, _ = os.getloadavg()
    print(f"{torch.get_num_threads()} threads; load average {one:.2f} / {five:.2f}")
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 sgemm, best of repeats): {peak:.1f} GFLOP/s")
    data = load_dataset(DATA, 0.1, 0)
    work = flops(args.levels, args.replicates, args.steps, data)
    dense_levels = [lv for lv in range(args.levels + 1) if density(lv) >= SPARSE_FROM]
    print(
        f"LeNet-300-100 on {DATA}: levels 0..{args.levels} ({density(args.levels):.1%} of weights "
        f"at the end), {args.replicates} replicates, both controls, {args.steps} steps per network"
    )

    with tempfile.TemporaryDirectory() as tmp:
        t_lab, lab_levels, pieces = ticketlab_search(
            args.levels, args.replicates, args.steps, Path(tmp) / "run"
        )
    plain_levels = plain_search(data, args.levels, args.replicates, args.steps)
    t_plain = sum(plain_levels)

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
    print("  per level (s):  level density ticketlab plain")
    for lv in range(args.levels + 1):
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


if __name__ == "__main__":
    main()
