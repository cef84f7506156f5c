"""One script for a lent GPU: is stacked training still exact there, and how fast is it?

1. Equivalence, float64, on the GPU: K masked networks trained as one stack against the same K
   trained one by one (LeNet-300-100 and Conv-2), and the GPU's stack against the CPU's. Stacking
   only regroups the arithmetic, so the differences are float64 rounding (~1e-12), not 1e-3.
2. Throughput: network-steps per second of one stack, LeNet-300-100 at K = 1/16/64/256, Conv-2
   at K = 1/16 (and ResNet-20 when the zoo registers it), in fp32 and bf16 autocast; timed as the
   difference of a long and a short run, so start-up and evaluation are not counted.

Without CUDA it says so in one line and exits 0. About 2-4 minutes on an H200.

    python benchmarks/gpu_check.py                       # on a machine with CUDA
    python benchmarks/gpu_check.py --device cpu --quick  # the same code path on a CPU, tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train.trainer import Job, TrainSpec, train_stack
from ticketlab.zoo.data import Dataset, load_dataset
from ticketlab.zoo.models import MODELS, build_model


def jobs_for(template: torch.nn.Module, k: int, density: float) -> list[Job]:
    names = prunable_names(template)
    jobs = []
    for i in range(k):
        g = torch.Generator().manual_seed(1000 + i)
        model = build_model_like(template, seed=i)
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        keep = {n: torch.rand(state[n].shape, generator=g) < density for n in names}
        jobs.append(Job(state, Mask(keep), data_seed=i))
    return jobs


def build_model_like(template: torch.nn.Module, seed: int) -> torch.nn.Module:
    model = copy.deepcopy(template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def max_diff(a, b) -> float:
    return max(
        float((x.final[n].double() - y.final[n].double()).abs().max())
        for x, y in zip(a, b, strict=True)
        for n in x.final
    )


def equivalence(device: str, data: Dataset, steps: int) -> list[dict]:
    rows = []
    for name in ("lenet_300_100", "conv2"):
        template = build_model(name, data.input_shape, data.num_classes, seed=0)
        jobs = jobs_for(template, 4, 0.5)
        spec = TrainSpec(steps=steps, batch_size=32, eval_every=steps, dtype="float64")
        on = replace(spec, device=device)
        stacked = train_stack(template, jobs, data, on)
        one_by_one = [r for j in jobs for r in train_stack(template, [j], data, on)]
        cpu = train_stack(template, jobs, data, spec)
        masked_zero = all(
            bool(torch.all(r.final[n][~j.mask[n]] == 0))
            for r, j in zip(stacked, jobs, strict=True)
            for n in j.mask.names()
        )
        row = {
            "model": name,
            "stacked_vs_one_by_one": max_diff(stacked, one_by_one),
            "device_vs_cpu": max_diff(stacked, cpu),
            "pruned_exact_zero": masked_zero,
        }
        row["ok"] = row["stacked_vs_one_by_one"] < 1e-9 and masked_zero
        rows.append(row)
    return rows


def synthetic(shape: tuple[int, ...], classes: int, n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset("synthetic", x, y, x[:256], y[:256], x[:256], y[:256])


def rate(name: str, shape, k: int, precision: str, device: str, steps: int) -> float:
    data = synthetic(shape, 10, 4096)
    template = build_model(name, shape, 10, seed=0)
    jobs = jobs_for(template, k, 1.0)
    spec = TrainSpec(steps=steps, batch_size=60, eval_every=10**9, device=device)
    spec = replace(spec, precision=precision)
    times = []
    for n in (2, steps):
        _sync(device)
        started = time.perf_counter()
        train_stack(template, jobs, data, replace(spec, steps=n))
        _sync(device)
        times.append(time.perf_counter() - started)
    if times[1] > times[0]:
        return k * (steps - 2) / (times[1] - times[0])
    return k * steps / times[1]  # too few steps to tell start-up apart (--quick, a loaded CPU)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="default: cuda when present")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check")
            return 0
        args.device = "cuda"
    device = args.device
    if device.startswith("cuda"):
        print(f"device: {device} = {torch.cuda.get_device_name(torch.device(device))}, ", end="")
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device: {device}, torch {torch.__version__}")
    started = time.perf_counter()
    digits = load_dataset("digits", 0.1, 0)
    eq = equivalence(device, digits, 6 if args.quick else 60)
    print("| float64 equivalence | stacked vs one-by-one | device vs CPU | pruned == 0 | ok |")
    print("|---|---|---|---|---|")
    for row in eq:
        print(
            f"| {row['model']} | {row['stacked_vs_one_by_one']:.2e} | {row['device_vs_cpu']:.2e} "
            f"| {row['pruned_exact_zero']} | {row['ok']} |"
        )
    cases = [("lenet_300_100", (1, 28, 28), k) for k in (1, 16, 64, 256)]
    cases += [("conv2", (1, 28, 28), k) for k in (1, 16)]
    if "resnet20" in MODELS:
        cases += [("resnet20", (3, 32, 32), k) for k in (1, 8)]
    if args.quick:
        cases = [("lenet_300_100", (1, 28, 28), 1), ("lenet_300_100", (1, 28, 28), 4)]
    steps = 4 if args.quick else 50
    print("| model | K | fp32 net-steps/s | bf16 net-steps/s | bf16/fp32 |")
    print("|---|---|---|---|---|")
    table = []
    for name, shape, k in cases:
        try:
            fp32 = rate(name, shape, k, "fp32", device, steps)
            bf16 = rate(name, shape, k, "bf16", device, steps)
        except Exception as exc:  # e.g. a model this trainer cannot stack K-at-a-time yet
            print(f"| {name} | {k} | not run: {type(exc).__name__}: {exc} | | |", flush=True)
            continue
        table.append({"model": name, "k": k, "fp32": fp32, "bf16": bf16})
        print(f"| {name} | {k} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f} |", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"equivalence": eq, "throughput": table}, indent=1))
    return 0 if all(r["ok"] for r in eq) else 1


if __name__ == "__main__":
    sys.exit(main())
