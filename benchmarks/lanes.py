"""Parallel stacks as threads or as forked processes ($TICKETLAB_LANES), side by side in one run.

    .venv/bin/python benchmarks/lanes.py [--steps 1500] [--repeats 2]

Trains stacks as a search does, with ``train``'s default two lanes, once with thread lanes and
once with process lanes, alternating, and prints the wall milliseconds per step (best of
``--repeats``), the ratio, and whether the two gave the same bits: MNIST-1D's grid rounds (4
networks at 1% and 5% density, 2 dense networks; 1501 steps a round in the grid) and LeNet-300-100
levels (6 networks, dense and at IMP level 15). A thread lane holds the GIL for its Python and
dispatch work, which is most of a small stack's step; a process has a GIL of its own. Runs with
``MKL_DISABLE_FAST_MM=1`` (it restarts itself with it): see ``process_lanes``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if "MKL_DISABLE_FAST_MM" not in os.environ:
    # this script alternates thread and process lanes in one process, which MKL's buffer manager
    # does not survive (see process_lanes); MKL reads the variable from the starting environment
    os.execve(
        sys.executable, [sys.executable, *sys.argv], {**os.environ, "MKL_DISABLE_FAST_MM": "1"}
    )

import torch  # noqa: E402

from e2e import lenet, random_level_jobs  # benchmarks/e2e.py
from mnist1d_table import mnist1d_full_train  # benchmarks/mnist1d_table.py
from sparse_step import mnist1d_jobs  # benchmarks/sparse_step.py
from ticketlab.train.trainer import Job, Result, TrainSpec, train
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model

KINDS = ("threads", "processes")


def timed(template: torch.nn.Module, jobs: list[Job], data, spec: TrainSpec, kind: str):
    os.environ["TICKETLAB_LANES"] = kind
    start = time.perf_counter()
    results = train(template, jobs, data, spec)
    return time.perf_counter() - start, results


def same_bits(a: list[Result], b: list[Result]) -> bool:
    return all(
        torch.equal(x.final[n], y.final[n]) and x.curve == y.curve
        for x, y in zip(a, b, strict=True)
        for n in x.final
    )


def compare(label: str, template, jobs, data, spec: TrainSpec, repeats: int) -> None:
    warm = dataclasses.replace(spec, steps=20, eval_every=20)
    for kind in KINDS:
        timed(template, jobs, data, warm, kind)
    best = {kind: float("inf") for kind in KINDS}
    results = {}
    for _ in range(repeats):
        for kind in KINDS:
            seconds, results[kind] = timed(template, jobs, data, spec, kind)
            best[kind] = min(best[kind], seconds)
    ms = {kind: 1000 * best[kind] / spec.steps for kind in KINDS}
    print(
        f"{label:44s} threads {ms['threads']:6.2f}  processes {ms['processes']:6.2f} ms/step  "
        f"ratio {ms['threads'] / ms['processes']:4.2f}  "
        f"same bits: {same_bits(results['threads'], results['processes'])}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = mnist1d_full_train()
    template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
    spec = TrainSpec(
        steps=args.steps, batch_size=100, lr=2e-2, eval_every=args.steps, data_order="cyclic"
    )
    lanes = torch.get_num_threads()
    print(f"wall ms per step, {args.steps} steps, best of {args.repeats}, {lanes} lanes")
    for density in (0.01, 0.05):
        jobs = mnist1d_jobs(data, density) * 2
        label = f"mnist1d_mlp, 4 networks at {density:.0%}"
        compare(label, template, jobs, data, spec, args.repeats)
    dense = mnist1d_jobs(data, 1.0)
    compare("mnist1d_mlp, 2 dense networks", template, dense, data, spec, args.repeats)
    mnist5k = load_dataset("mnist5k", 0.1, 0)
    spec = TrainSpec(steps=args.steps, batch_size=60, lr=1.2e-3, eval_every=args.steps)
    for level in (0, 15):
        jobs = random_level_jobs(mnist5k, 6, level)
        label = f"lenet_300_100, 6 networks at level {level}"
        compare(label, lenet(784, 0), jobs, mnist5k, spec, args.repeats)


if __name__ == "__main__":
    main()
