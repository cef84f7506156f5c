"""Reproduce the MNIST-1D lottery-ticket table (Greydanus, notebooks/lottery_tickets.ipynb).

    .venv/bin/python benchmarks/mnist1d_table.py [--steps 1501] [--trials 2]

Setting, as in the notebook: MLP 40-500-500-10 (``mnist1d_mlp``), Adam lr 2e-2, batch 100, 1501
steps per round; layer-wise magnitude pruning (``large_final``) of weights *and* biases; survivors
reset to the original init; 2 trials; the control is a random mask with the same number of
survivors per layer (``random_mask_like``). Test accuracy at the end of training, as the notebook
reports it.

The ticket's rounds are sequential: round r prunes the weights round r-1 trained, at per-layer rate
``1 - (1 - s_r) / (1 - s_{r-1})``, so the mask reaches sparsity s_r exactly (up to rounding per
layer). Each round trains both trials together with the two random-mask controls of that sparsity
(their masks need only the ticket's per-layer counts): 4 networks, as 2 stacks side by side, one
CPU thread each. From .90 on every mask is under ``SPARSE_BELOW`` and the stacks train as
block-diagonal sparse matrices of their survivors (``ticketlab.train.sparse_linear``). At sparsity 0
the random mask is the full mask, so the control *is* the dense network and its row repeats the
ticket's.

Training the 16 controls apart from the chain, all at once, was measured slower here (62 s vs 52
s): the dense rounds then train 2 networks at a time instead of 4, and the sparse kernels' cost
grows with the number of networks, so larger sparse stacks buy nothing.

Data: the 4,000/1,000 MNIST-1D split from ``ticketlab.zoo.data`` (generated offline with the
package's default arguments, the data the notebook downloads). ``load_dataset`` would hold 10% of
the training set out for validation; the notebook trains on all 4,000, so here the training set is
all of it and the "validation" set is just its first 100 examples (it only feeds the trainer's
curve, which the table does not use).

Differences from the notebook that remain: its MLP has a residual connection around the middle
layer (``h + relu(linear2(h))``); ``mnist1d_mlp`` is the plain 40-500-500-10 MLP. Its schedule has
100 rounds (sparsity 0, 0.01, ... 0.99); this one prunes straight between the table's sparsities.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from throughput import matmul_peak  # benchmarks/throughput.py
from ticketlab.core.criteria import large_final
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.core.pruning import prune_layerwise, random_mask_like
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import DATASETS, Dataset
from ticketlab.zoo.models import build_model

SPARSITIES = (0.0, 0.45, 0.80, 0.90, 0.92, 0.95, 0.97, 0.98, 0.99)
PUBLISHED_TICKET = (65.6, 66.5, 72.5, 74.2, 75.0, 69.8, 67.7, 63.4, 41.7)
PUBLISHED_RANDOM = (61.0, 64.7, 67.4, 63.1, 61.2, 55.2, 42.5, 30.9, 16.1)


def mnist1d_full_train() -> Dataset:
    x, y, x_test, y_test = DATASETS["mnist1d"]()
    fx = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    fy = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return Dataset("mnist1d", fx(x), fy(y), fx(x[:100]), fy(y[:100]), fx(x_test), fy(y_test))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1501, help="training steps per round")
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()

    started = time.perf_counter()
    data = mnist1d_full_train()
    data_seconds = time.perf_counter() - started
    template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
    names = prunable_names(template, prune_biases=True)
    spec = TrainSpec(steps=args.steps, batch_size=100, lr=2e-2, eval_every=args.steps)
    trials = range(args.trials)
    inits = [
        state_of(build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=t))
        for t in trials
    ]
    masks = [Mask.ones_like({n: inits[t][n] for n in names}) for t in trials]
    ticket_acc: list[list[float]] = []
    random_acc: list[list[float]] = []
    finals: list[dict[str, torch.Tensor]] = []
    network_trainings = 0
    survivors = 0.0  # weights alive, summed over every network trained
    for r, sparsity in enumerate(SPARSITIES):
        if r:
            rate = 1.0 - (1.0 - sparsity) / (1.0 - SPARSITIES[r - 1])
            masks = [
                prune_layerwise(
                    masks[t],
                    {n: large_final(inits[t][n], finals[t][n], None) for n in names},
                    dict.fromkeys(names, rate),
                )
                for t in trials
            ]
        jobs = [Job(inits[t], masks[t], data_seed=t) for t in trials]
        if r:  # the control: same survivors per layer, placed at random
            g = torch.Generator().manual_seed(1_000 + r)
            jobs += [Job(inits[t], random_mask_like(masks[t], g), data_seed=t) for t in trials]
        results = train(template, jobs, data, spec)
        network_trainings += len(jobs)
        survivors += sum(job.mask.density() for job in jobs) * weight_count(template)
        finals = [results[t].final for t in trials]
        accs = [100 * res.final_test_acc for res in results]
        ticket_acc.append(accs[: args.trials])
        random_acc.append(accs[args.trials :] if r else accs[: args.trials])
        ticket, control = mean(ticket_acc[-1]), mean(random_acc[-1])
        print(
            f"  round {r}: sparsity {sparsity:.2f} (measured {1 - masks[0].density():.4f}), "
            f"ticket {ticket:5.1f}  random {control:5.1f}  "
            f"[{time.perf_counter() - started:5.1f} s]",
            flush=True,
        )
    wall = time.perf_counter() - started

    per_weight = 6 * spec.batch_size * spec.steps / 1e12  # TFLOP per weight over one training
    tflop = weight_count(template) * network_trainings * per_weight
    print()
    print("MNIST-1D lottery tickets: final test accuracy (%), mean of", args.trials, "trials")
    print(f"{'sparsity':>9} | {'ticket':>7} {'published':>9} | {'random':>7} {'published':>9}")
    for i, sparsity in enumerate(SPARSITIES):
        t, rnd = mean(ticket_acc[i]), mean(random_acc[i])
        print(
            f"{sparsity:9.2f} | {t:7.1f} {PUBLISHED_TICKET[i]:9.1f} | "
            f"{rnd:7.1f} {PUBLISHED_RANDOM[i]:9.1f}"
        )
    print(
        f"\nwall time {wall:.1f} s ({data_seconds:.1f} s generating the data); "
        f"{network_trainings} network trainings x {spec.steps} steps; "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    peak = matmul_peak(1.0)
    print(
        f"work: {tflop:.2f} TFLOP dense-equivalent, {survivors * per_weight:.2f} TFLOP on "
        f"surviving "
        f"weights; at this CPU's fp32 matmul peak ({peak:.0f} GFLOP/s, 2048^3 sgemm) the dense-"
        f"equivalent work alone would take {tflop * 1e3 / peak:.0f} s"
    )


def weight_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
