"""Reproduce the MNIST-1D lottery-ticket table (Greydanus, notebooks/lottery_tickets.ipynb).

    .venv/bin/python benchmarks/mnist1d_table.py [--steps 1501] [--trials 2]

Setting, as in the notebook: MLP 40-500-500-10 (``mnist1d_mlp``), Adam lr 2e-2, batch 100, 1501
steps per round; layer-wise magnitude pruning (``large_final``) of weights *and* biases; survivors
reset to the original init; 2 trials; the control is a random mask with the same number of
survivors per layer (``random_mask_like``). Test accuracy at the end of training, as the notebook
reports it.

The ticket's rounds are sequential: round r prunes the weights round r-1 trained, at per-layer rate
``1 - (1 - s_r) / (1 - s_{r-1})``, so the mask reaches sparsity s_r exactly (up to rounding per
layer). Each round trains the 2 trials side by side (one CPU thread each).

The random-mask controls depend on nothing the ticket learns: only on how many weights each layer
keeps at each sparsity, which follows from the rates alone. So all 16 (8 sparsities x 2 trials)
are drawn up front and trained together after the chain, as stacks: the dense-ish ones (.45, .80)
in one call, the sparse ones (.90 and up) in another, where every network is under
``SPARSE_BELOW`` and the stack trains as block-diagonal sparse matrices of its survivors. The
ticket's rounds from .90 on train sparse too. At sparsity 0 the random mask is the full mask, so
the control *is* the dense network and its row repeats the ticket's.

Data: the 4,000/1,000 MNIST-1D split from ``ticketlab.data`` (generated offline with the package's
default arguments, the data the notebook downloads). ``load_dataset`` would hold 10% of the training
set out for validation; the notebook trains on all 4,000, so here the training set is all of it and
the "validation" set is just its first 100 examples (it only feeds the trainer's curve, which the
table does not use).

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
from ticketlab.criteria import large_final
from ticketlab.data import DATASETS, Dataset
from ticketlab.mask import Mask, prunable_names
from ticketlab.models import build_model
from ticketlab.pruning import prune_layerwise, random_mask_like
from ticketlab.sparse_linear import SPARSE_BELOW
from ticketlab.trainer import Job, TrainSpec, train

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


def count_chain(template_state: dict[str, torch.Tensor], names: list[str]) -> list[Mask]:
    """Masks with the ticket's per-layer survivor counts at every sparsity (where they sit is
    irrelevant: only the counts are used). Counts depend on the rates only, not on the scores."""
    mask = Mask.ones_like({n: template_state[n] for n in names})
    chain = [mask]
    for r in range(1, len(SPARSITIES)):
        rate = 1.0 - (1.0 - SPARSITIES[r]) / (1.0 - SPARSITIES[r - 1])
        mask = prune_layerwise(
            mask, {n: mask[n].double() for n in names}, dict.fromkeys(names, rate)
        )
        chain.append(mask)
    return chain


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
        results = train(
            template, [Job(inits[t], masks[t], data_seed=t) for t in trials], data, spec
        )
        network_trainings += len(results)
        survivors += sum(m.density() for m in masks) * weight_count(template)
        finals = [res.final for res in results]
        ticket_acc.append([100 * res.final_test_acc for res in results])
        print(
            f"  ticket round {r}: sparsity {sparsity:.2f} (measured {1 - masks[0].density():.4f}), "
            f"{mean(ticket_acc[-1]):5.1f}  [{time.perf_counter() - started:5.1f} s]",
            flush=True,
        )

    # the controls: same survivors per layer as the ticket, placed at random
    counts = count_chain(inits[0], names)
    controls = {
        (r, t): Job(
            inits[t], random_mask_like(counts[r], torch.Generator().manual_seed(1_000 * r + t)), t
        )
        for r in range(1, len(SPARSITIES))
        for t in trials
    }
    random_acc: list[list[float]] = [ticket_acc[0]]
    control_acc: dict[tuple[int, int], float] = {}
    for sparse in (False, True):
        keys = [key for key in controls if (counts[key[0]].density() < SPARSE_BELOW) == sparse]
        keys.sort(key=lambda key: (key[1], key[0]))  # each stack gets a mix of densities
        results = train(template, [controls[key] for key in keys], data, spec)
        network_trainings += len(results)
        survivors += sum(controls[key].mask.density() for key in keys) * weight_count(template)
        control_acc.update(
            {key: 100 * res.final_test_acc for key, res in zip(keys, results, strict=True)}
        )
        print(
            f"  {len(keys)} {'sparse' if sparse else 'dense'} controls  "
            f"[{time.perf_counter() - started:5.1f} s]",
            flush=True,
        )
    random_acc += [[control_acc[(r, t)] for t in trials] for r in range(1, len(SPARSITIES))]
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
