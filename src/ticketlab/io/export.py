"""Ship a ticket: the surviving weights only, as a compact safetensors file, with its measured size
and inference speed against the dense model.

Prunable tensors are stored as a packed bitmask (1 bit per weight) plus the survivors' values, so a
ticket at density d costs about d + 1/32 of the dense bytes; everything else is stored dense.
The file carries the model name, input shape and class count, so ``load_ticket`` rebuilds a plain
``nn.Module`` without the run folder.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import TicketlabError
from ..zoo.models import build_model
from .config import Config
from .run_files import level_dir, load_masks, load_replicates, load_rewind
from .store import RunStore, read_checked_tensors


@dataclass(frozen=True)
class ExportReport:
    path: Path
    weights_remaining: float
    dense_bytes: int
    file_bytes: int
    dense_ms: float
    sparse_ms: float

    def lines(self) -> list[str]:
        return [
            f"Wrote {self.path}: {100 * self.weights_remaining:.1f}% of prunable weights remain",
            f"size: {self.file_bytes / 1e6:.2f} MB vs {self.dense_bytes / 1e6:.2f} MB dense "
            f"({self.dense_bytes / max(1, self.file_bytes):.1f}x smaller)",
            f"inference (batch 256, CPU): sparse {self.sparse_ms:.2f} ms vs dense "
            f"{self.dense_ms:.2f} ms ({self.dense_ms / max(1e-9, self.sparse_ms):.2f}x)",
        ]


def export_ticket(
    run_dir: Path, config: Config, level: int, out: Path, replicate: int = 0, trained: bool = True
) -> ExportReport:
    """Write the ticket of ``level``: trained weights (default) or its rewind weights to retrain."""
    store = RunStore(run_dir, config.hash())
    if not store.exists(f"{level_dir(level)}/metrics.json"):
        raise TicketlabError(f"{run_dir} has no finished level {level}")
    if not 0 <= replicate < config.replicates:
        raise TicketlabError(f"replicate must be in [0, {config.replicates}), got {replicate}")
    mask = load_masks(store, level, config)[replicate]
    if trained:
        weights = load_replicates(store, f"{level_dir(level)}/ticket_final.safetensors", config)
    else:
        weights = load_rewind(store, config)
    state = {n: t * mask[n] if n in mask.tensors else t for n, t in weights[replicate].items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in mask.tensors:
            flat = mask[name].flatten()
            tensors[f"{name}::bits"] = torch.from_numpy(np.packbits(flat.numpy()))
            tensors[f"{name}::values"] = tensor.flatten()[flat]
        else:
            tensors[name] = tensor
    shapes = {n: list(t.shape) for n, t in state.items()}
    input_shape, num_classes = _io_shape(store)
    meta = {
        "model": config.model,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "shapes": shapes,
        "level": level,
        "weights": "trained" if trained else "rewind",
    }
    RunStore(out.parent, config.hash()).write_tensors(out.name, tensors, meta)
    model = build_model(config.model, input_shape, num_classes, seed=0)
    model.load_state_dict(state)
    dense_ms, sparse_ms = _speed(model, mask.names(), input_shape)
    return ExportReport(
        out,
        mask.density(),
        sum(t.numel() * t.element_size() for t in state.values()),
        out.stat().st_size,
        dense_ms,
        sparse_ms,
    )


def _io_shape(store: RunStore) -> tuple[tuple[int, ...], int]:
    run = store.read_json("run.json")
    if "input_shape" not in run:
        raise TicketlabError(f"{store.path('run.json')} does not record the model's input shape")
    return tuple(run["input_shape"]), int(run["num_classes"])


def load_ticket(path: Path) -> nn.Module:
    """The exported ticket as a dense ``nn.Module`` with pruned weights exactly zero."""
    tensors, meta = read_checked_tensors(path)
    if "shapes" not in meta:
        raise TicketlabError(f"{path}: not a ticketlab ticket export")
    state = {}
    for name, shape in meta["shapes"].items():
        if f"{name}::bits" in tensors:
            values = tensors[f"{name}::values"]
            size = int(np.prod(shape))
            keep = np.unpackbits(tensors[f"{name}::bits"].numpy(), count=size).astype(bool)
            flat = torch.zeros(size, dtype=values.dtype)
            flat[torch.from_numpy(keep)] = values
            state[name] = flat.view(shape)
        else:
            state[name] = tensors[name]
    model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"], seed=0)
    model.load_state_dict(state)
    return model


class _SparseLinear(nn.Module):
    def __init__(self, layer: nn.Linear):
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight @ x.T).T + self.bias


@torch.no_grad()
def _speed(
    model: nn.Module, pruned: list[str], input_shape: tuple[int, ...]
) -> tuple[float, float]:
    """Median ms per batch of 256 for the dense model and one with sparse (CSR) Linear layers
    (an ``nn.Sequential``'s; other modules, such as the ResNets, are timed as they are)."""
    model.eval()  # BatchNorm: inference uses the running statistics
    if not isinstance(model, nn.Sequential):
        x = torch.randn(256, *input_shape)
        dense_ms = _median_ms(model, x)
        return dense_ms, dense_ms
    sparse = nn.Sequential(
        *[
            _SparseLinear(layer)
            if isinstance(layer, nn.Linear) and f"{i}.weight" in pruned
            else layer
            for i, layer in enumerate(model)
        ]
    )
    x = torch.randn(256, *input_shape)
    return _median_ms(model, x), _median_ms(sparse, x)


def _median_ms(model: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]
