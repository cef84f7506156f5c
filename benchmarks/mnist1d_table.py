"""Reproduce the MNIST-1D lottery-ticket table (Greydanus, notebooks/lottery_tickets.ipynb).

    .venv/bin/python benchmarks/mnist1d_table.py              # one round per listed sparsity
    .venv/bin/python benchmarks/mnist1d_table.py --faithful   # the notebook's rounds: sparsity i/99
    .venv/bin/python benchmarks/mnist1d_table.py --faithful --state runs/mnist1d_table  # resumable

The notebook's setup, as ticketlab's ``mnist1d_mlp`` and its preset now follow it: MLP
40-500-500-10 with PyTorch's default ``nn.Linear`` init, Adam lr 2e-2, batch 100 taken cyclically in
order from the 4,000 training digits (``data_order="cyclic"``), 1501 steps per round; layer-wise
magnitude pruning (``large_final``) in which a layer's weights *and* bias are ranked together
(``layer_groups``), every layer to the round's target sparsity (``prune_to_density``); survivors
reset to the original init; 2 trials. The control is a random mask with the same number of
survivors per layer, placed uniformly over the layer's weights and bias (``random_mask_like`` with
the layer groups, as the notebook's random pruning ranks the whole layer), trained from the same
init. Test accuracy at the end
of training, as the notebook reports it.

Two quirks of the notebook's loop are followed too. Its pruning ranks the weights of
``results['checkpoints'][-1]``, and with ``checkpoint_every=1000`` (the default of its
``get_model_args``, which the notebook does not override) that is the copy taken at loop step
1000 of 1501, after 1,001 updates: a round is pruned from its weights at update 1,001, not from
its final weights (``--prune-final`` ranks the final weights instead). Its schedule is
``np.linspace(0, 1, 100)``, so round i is at sparsity i/99 and the table's ".95" row is round 94,
at 0.9495 (the notebook's log prints sparsity with ``{:.2f}``).

Schedules: by default round r prunes straight to the table's row r (at the notebook's sparsity
for that row, 0.4545 for ".45", ..., 0.9495 for ".95") from round r-1's mask;
``--faithful`` runs the notebook's schedule (sparsity i/99, i = 0..98; its 100th round, at
sparsity 1, keeps nothing) and reads the table's rows off the rounds whose sparsity prints as the
row's. The random-mask controls do not depend on the chain, so they train only at the table's
sparsities. With ``--state DIR`` every finished round is kept in DIR (checksummed, through
``ticketlab.io.store``), and rerunning the command continues where it stopped.

Data: the 4,000/1,000 MNIST-1D split from ``ticketlab.zoo.data`` (generated offline with the
package's default arguments, the data the notebook downloads). The notebook trains on all 4,000,
so the training set is all of it and the "validation" set is just its first 100 examples (it only
feeds the trainer's curve, which the table does not use).

The notebook's MLP adds a residual connection around the middle layer (``h + relu(linear2(h))``);
``mnist1d_mlp`` is the plain 40-500-500-10 MLP, ``--model mnist1d_resmlp`` the notebook's (same
init, same parameter count; its stacks train through ``RowStack``, whose sparse layers transpose
their activations in and out, so its sparse rounds gain less).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from throughput import matmul_peak  # benchmarks/throughput.py
from ticketlab.core.criteria import large_final
from ticketlab.core.mask import Mask, layer_groups, prunable_names
from ticketlab.core.pruning import prune_to_density, random_mask_like
from ticketlab.io.store import RunStore
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


def prune_round(
    masks: list[Mask],
    inits: list[dict[str, torch.Tensor]],
    finals: list[dict[str, torch.Tensor]],
    groups: list[list[str]],
    sparsity: float,
) -> list[Mask]:
    """Each trial's mask pruned to ``sparsity`` by ``large_final``, a layer's weights and bias
    ranked together (the notebook)."""
    return [
        prune_to_density(
            mask,
            {n: large_final(init[n], final[n], None) for n in mask.names()},
            1.0 - sparsity,
            groups=groups,
        )
        for mask, init, final in zip(masks, inits, finals, strict=True)
    ]


def control_jobs(
    r: int, inits: list[dict[str, torch.Tensor]], masks: list[Mask], groups: list[list[str]]
) -> list[Job]:
    """Round ``r``'s controls: per trial, the same survivors per layer placed at random."""
    g = torch.Generator().manual_seed(1_000 + r)
    return [
        Job(init, random_mask_like(mask, g, groups), data_seed=t)
        for t, (init, mask) in enumerate(zip(inits, masks, strict=True))
    ]


def schedule(faithful: bool) -> list[float]:
    """The rounds' sparsities: the notebook's i/99, all of them or only the table's rows' rounds."""
    rounds = range(99) if faithful else [round(s * 99) for s in SPARSITIES]
    return [i / 99 for i in rounds]


def table_row(sparsity: float) -> float | None:
    """The table's row that ``sparsity`` prints as (``{:.2f}``, as the notebook logs), if any."""
    printed = round(sparsity, 2)
    return printed if any(abs(printed - s) < 1e-9 for s in SPARSITIES) else None


def notebook_checkpoint(steps: int, every: int = 1000) -> int:
    """Updates done when the notebook copies the model it prunes from: the last multiple of its
    ``checkpoint_every`` among loop steps 0..steps, copied after that step's update."""
    return min(every * (steps // every) + 1, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1501, help="training steps per round")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument(
        "--faithful", action="store_true", help="the notebook's rounds, sparsity i/99"
    )
    parser.add_argument("--state", type=Path, default=None, help="keep rounds here (resumable)")
    parser.add_argument(
        "--prune-final",
        action="store_true",
        help="rank each round's final weights (the notebook ranks its copy at update 1,001)",
    )
    parser.add_argument(
        "--model",
        choices=("mnist1d_mlp", "mnist1d_resmlp"),
        default="mnist1d_mlp",
        help="mnist1d_resmlp: with the notebook's residual connection around the middle layer",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    data = mnist1d_full_train()
    template = build_model(args.model, data.input_shape, data.num_classes, seed=0)
    names = prunable_names(template, prune_biases=True)
    groups = layer_groups(names)
    spec = TrainSpec(
        steps=args.steps, batch_size=100, lr=2e-2, eval_every=args.steps, data_order="cyclic"
    )
    trials = range(args.trials)
    inits = [
        state_of(build_model(args.model, data.input_shape, data.num_classes, seed=t))
        for t in trials
    ]
    prune_from = args.steps if args.prune_final else notebook_checkpoint(args.steps)
    identity = [args.steps, args.trials, args.faithful, "controls ranked per layer", "i/99"]
    identity += [] if args.prune_final else [f"pruned from update {prune_from}"]
    key = json.dumps(identity + ([args.model] if args.model != "mnist1d_mlp" else []))
    store = (
        RunStore(args.state, hashlib.sha256(key.encode()).hexdigest()[:16]) if args.state else None
    )
    rounds = schedule(args.faithful)
    masks = [Mask.ones_like({n: inits[t][n] for n in names}) for t in trials]
    finals: list[dict[str, torch.Tensor]] = []
    ticket_acc: dict[float, list[float]] = {}
    random_acc: dict[float, list[float]] = {}
    trainings = 0
    survivors = 0.0  # weights alive, summed over every network trained
    for r, sparsity in enumerate(rounds):
        if r:
            masks = prune_round(masks, inits, finals, groups, sparsity)
        row = table_row(sparsity)
        rel = f"round_{r:03d}"
        if store is not None and store.exists(f"{rel}.json"):
            done = store.read_json(f"{rel}.json")
            tensors, _ = store.read_tensors(f"{rel}.safetensors")
            finals = [
                {n[len(f"t{t}/") :]: v for n, v in tensors.items() if n.startswith(f"t{t}/")}
                for t in trials
            ]
            accs = done["accs"]
        else:
            jobs = [Job(inits[t], masks[t], data_seed=t, snapshot_step=prune_from) for t in trials]
            if r and row is not None:
                jobs += control_jobs(r, inits, masks, groups)
            results = train(template, jobs, data, spec)
            trainings += len(jobs)
            survivors += sum(job.mask.density() for job in jobs) * weight_count(template)
            finals = [results[t].snapshot for t in trials]  # what the next round ranks
            accs = [100 * res.final_test_acc for res in results]
            if store is not None:
                store.write_tensors(
                    f"{rel}.safetensors",
                    {f"t{t}/{n}": v for t in trials for n, v in finals[t].items()},
                )
                store.write_json(f"{rel}.json", {"accs": accs})
        if row is not None:
            ticket_acc[row] = accs[: args.trials]
            random_acc[row] = accs[args.trials :] if r else accs[: args.trials]
            print(
                f"  round {r}: sparsity {sparsity:.2f} (measured {1 - masks[0].density():.4f}), "
                f"ticket {mean(ticket_acc[row]):5.1f}  random {mean(random_acc[row]):5.1f}  "
                f"[{time.perf_counter() - started:5.1f} s]",
                flush=True,
            )
    wall = time.perf_counter() - started

    label = "99 rounds at sparsity i/99 (--faithful)" if args.faithful else "one round per sparsity"
    print()
    print(
        f"MNIST-1D lottery tickets ({label}, {args.model}): final test accuracy (%), "
        f"mean of {args.trials}"
    )
    print(f"{'sparsity':>9} | {'ticket':>7} {'published':>9} | {'random':>7} {'published':>9}")
    for i, sparsity in enumerate(SPARSITIES):
        t, rnd = mean(ticket_acc[sparsity]), mean(random_acc[sparsity])
        print(
            f"{sparsity:9.2f} | {t:7.1f} {PUBLISHED_TICKET[i]:9.1f} | "
            f"{rnd:7.1f} {PUBLISHED_RANDOM[i]:9.1f}"
        )
    print(
        f"\nwall time {wall:.1f} s for {trainings} network trainings x {spec.steps} steps "
        f"(rounds read back from --state not counted); {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    per_weight = 6 * spec.batch_size * spec.steps / 1e12  # TFLOP per weight over one training
    tflop = weight_count(template) * trainings * per_weight
    peak = matmul_peak(1.0)
    print(
        f"work: {tflop:.2f} TFLOP dense-equivalent, {survivors * per_weight:.2f} TFLOP on "
        f"surviving weights; at this CPU's fp32 matmul peak ({peak:.0f} GFLOP/s, 2048^3 sgemm) "
        f"the dense-equivalent work alone would take {tflop * 1e3 / peak:.0f} s"
    )


def weight_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
