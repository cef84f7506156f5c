"""CPU inference of an exported LeNet-300-100 ticket: dense vs sparse (CSR) Linear layers, and the
packed file's size, at 50, 20, 10, 5 and 2% of the weights.

Masks follow IMP's per-layer rates (hidden layers lose 20% per level, the output layer 10%), so the
output layer stays denser than the hidden ones, as in a real ticket; weights are the model's init
kept by magnitude (speed and size do not depend on training). Dense and sparse calls alternate, one
pair after another; the speed-up is the ratio of the best-of-N times (the least disturbed calls of
each), and the median of the per-pair ratios is printed beside it: on a shared machine both are
needed to tell load from speed. Target at <= 5%: >= 3x at batch 256, >= 1.5x at batch 1, file
<= 10% of the dense file.

    .venv/bin/python benchmarks/export_speed.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ticketlab.core.mask import Mask, layer_kinds, prunable_names
from ticketlab.io.export import sparse_inference, write_ticket
from ticketlab.zoo.models import build_model

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02)
INPUT = (1, 28, 28)


def imp_mask(state: dict[str, torch.Tensor], kinds: dict[str, str], density: float) -> Mask:
    """Magnitude masks with IMP's per-layer densities (hidden 0.8^L, output 0.9^L) for the L at
    which the whole network keeps ``density`` of its prunable weights."""
    sizes = {n: kinds[n] for n in kinds}
    total = sum(state[n].numel() for n in sizes)

    def overall(levels: float) -> float:
        keep = {n: (0.9 if kinds[n] == "output" else 0.8) ** levels for n in sizes}
        return sum(keep[n] * state[n].numel() for n in sizes) / total

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if overall(mid) > density else (lo, mid)
    tensors = {}
    for name in sizes:
        w = state[name]
        keep = (0.9 if kinds[name] == "output" else 0.8) ** lo
        k = max(1, round(keep * w.numel()))
        threshold = w.abs().flatten().kthvalue(w.numel() - k + 1).values
        tensors[name] = w.abs() >= threshold
    return Mask(tensors)


@torch.no_grad()
def paired(dense, sparse, x: torch.Tensor, pairs: int) -> tuple[float, float, float]:
    """Best-of-``pairs`` ms of each (the least disturbed call: the machine is shared) and the
    median of per-pair dense/sparse ratios (both calls of a pair see about the same load)."""
    for _ in range(3):
        dense(x), sparse(x)
    times_d, times_s, ratios = [], [], []
    for _ in range(pairs):
        a = time.perf_counter()
        dense(x)
        b = time.perf_counter()
        sparse(x)
        c = time.perf_counter()
        times_d.append(b - a)
        times_s.append(c - b)
        ratios.append((b - a) / max(c - b, 1e-9))
    return 1000 * min(times_d), 1000 * min(times_s), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="dense/sparse pairs per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("lenet_300_100", INPUT, 10, seed=0).eval()
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    names = prunable_names(model)
    kinds = {n: k for n, k in layer_kinds(model).items() if n in names}
    dense_file = len(st_save({n: t.contiguous() for n, t in state.items()}))
    rows = []
    print(
        f"LeNet-300-100, CPU, torch {torch.__version__}, {args.threads} thread(s); "
        f"dense file {dense_file / 1e6:.3f} MB"
    )
    print(
        "| weights | batch | dense ms | sparse ms | speed-up | paired median | file | file/dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for density in DENSITIES:
            mask = imp_mask(state, kinds, density)
            masked = {n: t * mask[n] if n in mask.tensors else t for n, t in state.items()}
            model.load_state_dict(masked)
            sparse = sparse_inference(model, names)
            path = Path(tmp) / f"t{density}.safetensors"
            write_ticket(path, masked, mask, {"model": "lenet_300_100"})
            size = path.stat().st_size
            for batch in (1, 256):
                x = torch.randn(batch, *INPUT)
                pairs = args.pairs if batch == 1 else max(20, args.pairs // 4)
                d_ms, s_ms, ratio = paired(model, sparse, x, pairs)
                row = {
                    "weights_remaining": mask.density(),
                    "batch": batch,
                    "dense_ms": d_ms,
                    "sparse_ms": s_ms,
                    "speedup": d_ms / s_ms,
                    "paired_median_speedup": ratio,
                    "file_bytes": size,
                    "file_fraction": size / dense_file,
                }
                rows.append(row)
                print(
                    f"| {100 * row['weights_remaining']:.1f}% | {batch} | {d_ms:.3f} | "
                    f"{s_ms:.3f} | {d_ms / s_ms:.2f}x | {ratio:.2f}x | {size / 1e3:.0f} kB | "
                    f"{100 * row['file_fraction']:.1f}% |"
                )
    targets = [r for r in rows if r["weights_remaining"] <= 0.05 + 1e-9]
    ok = all(
        r["speedup"] >= (3.0 if r["batch"] == 256 else 1.5) and r["file_fraction"] <= 0.10
        for r in targets
    )
    print(f"targets at <= 5% (>=3x at 256, >=1.5x at 1, file <= 10%): {'met' if ok else 'NOT met'}")
    if args.out:
        args.out.write_text(json.dumps({"dense_file_bytes": dense_file, "rows": rows}, indent=1))
    assert math.isfinite(sum(r["speedup"] for r in rows))


if __name__ == "__main__":
    main()
