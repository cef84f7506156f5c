"""bf16 against fp32 on this machine: accuracy of tickets and training throughput, side by side.

Accuracy: LeNet-300-100 and Conv-2 on mnist5k, dense and one-shot pruned to ~20% of the weights
(``ticketlab find --levels 1 --fc-rate 0.8 --no-controls``, 2 replicates), once per precision with
the same seeds; early-stop test accuracy averaged over the replicates.

Throughput: training steps per second of a stack of 2 networks (the size of these runs' stacks) and
a 2048x2048 matmul in each precision, interleaved repeat by repeat so that load from other
processes hits both alike; the ratios are the result (the machine is shared).

    nice -n 5 .venv/bin/python benchmarks/precision.py    # ~40 min on 2 heavily shared cores
    .venv/bin/python benchmarks/precision.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from ticketlab.api import run_search
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.io.config import resolve
from ticketlab.train.trainer import Job, TrainSpec, train_stack
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model

PRECISIONS = ("fp32", "bf16")


def accuracy(model: str, steps: int, replicates: int, root: Path) -> dict:
    """Early-stop test accuracy (mean over replicates) at both levels, per precision."""
    rows = {}
    for precision in PRECISIONS:
        started = time.perf_counter()
        config = resolve(
            {
                "model": model,
                "data": "mnist5k",
                "levels": 1,
                "fc_rate": 0.8,
                "replicates": replicates,
                "steps": steps,
                "eval_every": max(1, steps // 8),
                "controls": [],
                "precision": precision,
                "device": "cpu",
                "report": False,
                "out": str(root / f"{model}-{precision}"),
            }
        )
        search = run_search(config, console=Console(stderr=True, quiet=True))
        levels = []
        for level in search.levels:
            accs = [n["early_stop_test_acc"] for n in level["networks"]]
            levels.append(
                {
                    "weights_remaining": level["weights_remaining"],
                    "early_stop_test_acc": statistics.fmean(accs),
                    "per_replicate": accs,
                }
            )
        rows[precision] = {"levels": levels, "seconds": round(time.perf_counter() - started, 1)}
    return rows


def step_rate(model: str, precision: str, data, steps: int, k: int = 2) -> float:
    """Network-steps per second of one stack of ``k`` networks (after one warm-up run)."""
    template = build_model(model, data.input_shape, data.num_classes, seed=0)
    names = prunable_names(template)
    state = {n: t.detach().clone() for n, t in template.state_dict().items()}
    mask = Mask.ones_like({n: state[n] for n in names})
    jobs = [Job(state, mask, data_seed=i) for i in range(k)]
    spec = TrainSpec(steps=steps, batch_size=60, eval_every=10**9, precision=precision)
    started = time.perf_counter()
    train_stack(template, jobs, data, spec)
    return k * steps / (time.perf_counter() - started)


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def throughput(data, steps: dict[str, int], rounds: int) -> dict:
    rates: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for precision in PRECISIONS:  # interleaved: both see the same load
            for model, n in steps.items():
                rate = step_rate(model, precision, data, n)
                rates.setdefault(model, {}).setdefault(precision, []).append(rate)
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            rates.setdefault("matmul_2048_gflops", {}).setdefault(precision, []).append(
                matmul_rate(dtype)
            )
    return {
        what: {
            **{p: statistics.median(v) for p, v in by.items()},
            "bf16_over_fp32": statistics.median(
                b / f for b, f in zip(by["bf16"], by["fp32"], strict=True)
            ),
        }
        for what, by in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the script")
    parser.add_argument("--lenet-steps", type=int, default=2000)
    parser.add_argument("--conv2-steps", type=int, default=250)
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved throughput repeats")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--models", default="", help="accuracy of these only (comma-separated; '' = both)"
    )
    args = parser.parse_args()
    if args.quick:
        args.lenet_steps, args.conv2_steps, args.rounds = 20, 10, 1
    console = Console()
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"CPU bf16 (AVX-512 BF16): {torch.backends.mkldnn.is_available()}"
    )
    results: dict = {"steps": {"lenet_300_100": args.lenet_steps, "conv2": args.conv2_steps}}
    if args.models:
        results["steps"] = {m: results["steps"][m] for m in args.models.split(",")}
    with tempfile.TemporaryDirectory(prefix="ticketlab-precision-") as tmp:
        for model, steps in results["steps"].items():
            results[model] = accuracy(model, steps, args.replicates, Path(tmp))
            if args.out:  # kept as it comes: a long run interrupted keeps what it measured
                args.out.write_text(json.dumps(results, indent=1))
    data = load_dataset("mnist5k", 0.1, 0)
    tp_steps = {"lenet_300_100": 20 if args.quick else 200, "conv2": 4 if args.quick else 20}
    results["throughput"] = throughput(data, tp_steps, args.rounds)

    console.print("| model | weights | fp32 acc | bf16 acc | bf16 - fp32 (points) |")
    console.print("|---|---|---|---|---|")
    for model in results["steps"]:
        fp32, bf16 = results[model]["fp32"]["levels"], results[model]["bf16"]["levels"]
        for a, b in zip(fp32, bf16, strict=True):
            console.print(
                f"| {model} | {100 * a['weights_remaining']:.1f}% "
                f"| {100 * a['early_stop_test_acc']:.2f} | {100 * b['early_stop_test_acc']:.2f} "
                f"| {100 * (b['early_stop_test_acc'] - a['early_stop_test_acc']):+.2f} |"
            )
    console.print("| throughput | fp32 | bf16 | bf16 / fp32 |")
    console.print("|---|---|---|---|")
    for what, row in results["throughput"].items():
        ratio = row["bf16_over_fp32"]
        console.print(f"| {what} | {row['fp32']:.1f} | {row['bf16']:.1f} | {ratio:.2f} |")
    for model in results["steps"]:
        times = {p: results[model][p]["seconds"] for p in PRECISIONS}
        console.print(f"{model} wall time per precision (s): {times}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
