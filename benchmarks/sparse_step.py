"""Milliseconds per training step on the sparse path, one thread, best of 3 (no profiler).

    .venv/bin/python benchmarks/sparse_step.py [--profile]
    TICKETLAB_SPARSE_KERNEL=0 .venv/bin/python benchmarks/sparse_step.py   # torch's CSR kernels

Stacks as a search trains them late: the MNIST-1D MLP, 2 networks with random layer-wise masks at
1, 5 and 10% density (weights and biases ranked together), and LeNet-300-100, 3 networks at IMP
levels 11 and 15's per-layer densities. To compare two versions, run it at each (e.g. in a
``git worktree`` with ``PYTHONPATH=<worktree>/src``), one after the other, twice, interleaved.
``--profile`` prints torch.profiler's table for one stack of MNIST-1D's grid at a sparse round (4
networks at 5%), where the time of a step goes besides the products.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from e2e import lenet, random_level_jobs  # benchmarks/e2e.py
from mnist1d_table import mnist1d_full_train, state_of  # benchmarks/mnist1d_table.py
from ticketlab.core.mask import Mask, layer_groups, prunable_names
from ticketlab.core.pruning import prune_to_density
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model

STEPS = 400


def ms_per_step(template: torch.nn.Module, jobs: list[Job], data, spec: TrainSpec) -> float:
    train(template, jobs, data, dataclasses.replace(spec, steps=20, eval_every=20), lanes=1)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        train(template, jobs, data, spec, lanes=1)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / spec.steps


def mnist1d_jobs(data, density: float) -> list[Job]:
    template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
    names = prunable_names(template, prune_biases=True)
    jobs = []
    for t in range(2):
        init = state_of(build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=t))
        g = torch.Generator().manual_seed(t)
        scores = {n: torch.rand(init[n].shape, generator=g) for n in names}
        mask = Mask.ones_like({n: init[n] for n in names})
        mask = prune_to_density(mask, scores, density, groups=layer_groups(names))
        jobs.append(Job(init, mask, data_seed=t))
    return jobs


def profile(template: torch.nn.Module, jobs: list[Job], data, spec: TrainSpec) -> None:
    from torch.profiler import profile as profiler

    train(template, jobs, data, dataclasses.replace(spec, steps=20, eval_every=20), lanes=1)
    with profiler() as prof:
        train(template, jobs, data, spec, lanes=1)
    print(f"{len(jobs)} networks, {spec.steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="profile 4 MNIST-1D networks at 5%%")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = mnist1d_full_train()
    template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
    spec = TrainSpec(steps=STEPS, batch_size=100, lr=2e-2, eval_every=STEPS, data_order="cyclic")
    if args.profile:
        profile(template, mnist1d_jobs(data, 0.05) * 2, data, spec)
        return
    for density in (0.01, 0.05, 0.1):
        ms = ms_per_step(template, mnist1d_jobs(data, density), data, spec)
        print(f"mnist1d_mlp, 2 networks at {density:.0%} density: {ms:.2f} ms/step")
    mnist5k = load_dataset("mnist5k", 0.1, 0)
    spec = TrainSpec(steps=STEPS, batch_size=60, lr=1.2e-3, eval_every=STEPS)
    for level in (11, 15):
        jobs = random_level_jobs(mnist5k, 3, level)
        ms = ms_per_step(lenet(784, 0), jobs, mnist5k, spec)
        print(f"lenet_300_100, 3 networks at IMP level {level}: {ms:.2f} ms/step")


if __name__ == "__main__":
    main()
