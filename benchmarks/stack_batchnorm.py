"""BatchNorm networks side by side: K=4 in one stack against the same 4 trained one at a time.

    .venv/bin/python benchmarks/stack_batchnorm.py [--steps 40] [--repeats 3] [--threads 1]

A small conv net with BatchNorm and a residual add (conv16-BN-ReLU-pool, conv32-BN + 1x1-conv
shortcut, ReLU-pool, fc), on mnist5k (1x28x28), batch 64, float32, Adam. Before ``RowStack``, such
a module trained one network at a time; now 4 networks are one stack whose BatchNorms keep each
network's own statistics. Each variant trains the same 4 jobs through ``train``, timed with
``time.perf_counter`` around the whole call (stack building and the 2 evaluations included), the
variants interleaved and repeated so that a neighbour's load falls on all of them alike; the
figure per variant is its best repeat. Printed: network-steps per second and the ratio to one at a
time, for the stacked convolutions run as K convolutions ("loop") and as one grouped convolution
("grouped", ``groups=K``), and with the automatic stack size, which spreads stacks over one lane
per thread (with ``--threads 2``: 2 stacks of 2, side by side; BatchNorm modules used to be held to
one lane).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train.row_stack import RowStack
from ticketlab.train.stacked import plan_stack
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import load_dataset


class SmallResidualBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.shortcut = nn.Conv2d(16, 32, 1, bias=False)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h)) + self.shortcut(h)), 2)
        return self.fc(h.flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist5k", 0.1, 0)
    torch.manual_seed(0)
    template = SmallResidualBN()
    print(f"plan: {plan_stack(template, data.x_train).impl}")
    jobs = []
    for i in range(4):
        torch.manual_seed(i)
        net = SmallResidualBN()
        mask = Mask({n: torch.ones_like(dict(net.named_parameters())[n], dtype=torch.bool)
                     for n in prunable_names(net)})  # fmt: skip
        jobs.append(Job({k: v.detach().clone() for k, v in net.state_dict().items()}, mask, i))
    spec = TrainSpec(steps=args.steps, batch_size=64, eval_every=args.steps)
    variants = {
        "one at a time (stack_size=1)": (1, "loop"),
        "K=4 side by side, loop convs": (4, "loop"),
        "K=4 side by side, grouped convs": (4, "grouped"),
        "automatic (stacks over all lanes)": (None, "loop"),
    }
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name, (size, mode) in variants.items():
            RowStack.conv_mode = mode
            start = time.perf_counter()
            lanes = None if size is None else 1
            train(template, jobs, data, spec, stack_size=size, lanes=lanes)
            best[name] = min(best[name], time.perf_counter() - start)
    RowStack.conv_mode = "loop"
    load = os.getloadavg()[0]
    print(f"{args.steps} steps x 4 networks, batch 64, {args.threads} thread(s), load {load:.1f}")
    base = best["one at a time (stack_size=1)"]
    for name, seconds in best.items():
        rate = 4 * args.steps / seconds
        print(f"  {name:34s} {seconds:6.2f} s  {rate:6.1f} network-steps/s  x{base / seconds:.2f}")


if __name__ == "__main__":
    main()
