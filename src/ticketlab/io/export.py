"""Ship a ticket: the surviving weights only, as a compact safetensors file, with its measured size
and inference speed against the dense model.

Prunable tensors are stored as a packed bitmask (1 bit per weight) plus the survivors' values, so a
ticket at density d costs about d + 1/32 of the dense bytes; everything else is stored dense.
The file carries the model name, input shape and class count, so ``load_ticket`` rebuilds a
registered model without the run folder; a ``find_ticket`` run's model (``custom:…``) is the
user's own class, so ``load_ticket(path, module=...)`` loads the weights into an instance of it.

Which weights: ``early_stop`` (default: those at the validation minimum, the ones behind the
table's accuracy), ``final`` (after the last step) or ``rewind`` (the ticket's starting weights, to
retrain).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.mask import Mask
from ..errors import TicketlabError
from ..train import sparse_kernel
from ..train.stacked import State
from ..zoo.models import build_model
from .config import Config
from .run_files import level_dir, load_masks, load_replicates, load_rewind
from .store import RunStore, read_checked_tensors

WEIGHTS = ("early_stop", "final", "rewind")


@dataclass(frozen=True)
class ExportReport:
    path: Path
    weights_remaining: float
    dense_bytes: int
    file_bytes: int
    dense_ms: float | None
    sparse_ms: float | None
    weights: str = "early_stop"

    def lines(self) -> list[str]:
        lines = [
            f"Wrote {self.path} ({self.weights} weights): "
            f"{100 * self.weights_remaining:.1f}% of prunable weights remain",
            f"size: {self.file_bytes / 1e6:.2f} MB vs {self.dense_bytes / 1e6:.2f} MB dense "
            f"({self.dense_bytes / max(1, self.file_bytes):.1f}x smaller)",
        ]
        if self.dense_ms is None or self.sparse_ms is None:
            lines.append(
                "inference: not measured (a find_ticket model: measure it from Python with "
                "ticketlab.io.export.inference_speed(load_ticket(path, module=...)))"
            )
        else:
            lines.append(
                f"inference (batch 256, CPU): sparse {self.sparse_ms:.2f} ms vs dense "
                f"{self.dense_ms:.2f} ms ({self.dense_ms / max(1e-9, self.sparse_ms):.2f}x)"
            )
        return lines


def run_weights(store: RunStore, config: Config, level: int, weights: str) -> list[State]:
    """Every replicate's ticket weights of ``level`` (unmasked), as the run folder holds them."""
    if weights not in WEIGHTS:
        raise TicketlabError(f"unknown weights {weights!r}; known: {', '.join(WEIGHTS)}")
    if weights == "rewind":
        return load_rewind(store, config)
    rel = f"{level_dir(level)}/ticket_{weights}.safetensors"
    if not store.exists(rel):
        raise TicketlabError(
            f"{store.path(rel)} is missing: this run predates saved early-stop weights; "
            "export with --weights final or rewind"
        )
    return load_replicates(store, rel, config)


def export_ticket(
    run_dir: Path,
    config: Config,
    level: int,
    out: Path,
    replicate: int = 0,
    weights: str = "early_stop",
    module: nn.Module | None = None,
) -> ExportReport:
    """Write the ticket of ``level`` with the chosen ``weights``. ``module``: the architecture of a
    ``find_ticket`` run (only to measure its speed; the file is written without it)."""
    store = RunStore(run_dir, config.hash())
    if not store.exists(f"{level_dir(level)}/metrics.json"):
        raise TicketlabError(f"{run_dir} has no finished level {level}")
    if not 0 <= replicate < config.replicates:
        raise TicketlabError(f"replicate must be in [0, {config.replicates}), got {replicate}")
    mask = load_masks(store, level, config)[replicate]
    if not mask.tensors:
        raise TicketlabError(
            f"replicate {replicate} has no ticket at level {level}: its ticket diverged at an "
            "earlier level and its pruning stopped there"
        )
    source = run_weights(store, config, level, weights)[replicate]
    state = {n: t * mask[n] if n in mask.tensors else t for n, t in source.items()}
    input_shape, num_classes = _io_shape(store)
    meta = {
        "model": config.model,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "level": level,
        "replicate": replicate,
        "weights": weights,
    }
    write_ticket(out, state, mask, meta, config.hash())
    model = None
    if module is not None:
        model = load_state(copy.deepcopy(module), state, f"module for {run_dir}")
    elif not config.model.startswith("custom:"):
        model = build_model(config.model, input_shape, num_classes, seed=0)
        model.load_state_dict(state)
    dense_ms = sparse_ms = None
    if model is not None:
        tokens = store.read_json("run.json").get("task") == "language_model"
        vocab = num_classes if tokens else 0
        dense_ms, sparse_ms = inference_speed(model, input_shape, mask.names(), vocab=vocab)
    return ExportReport(
        out,
        mask.density(),
        sum(t.numel() * t.element_size() for t in state.values()),
        out.stat().st_size,
        dense_ms,
        sparse_ms,
        weights,
    )


def _io_shape(store: RunStore) -> tuple[tuple[int, ...], int]:
    run = store.read_json("run.json")
    if "input_shape" not in run:
        raise TicketlabError(f"{store.path('run.json')} does not record the model's input shape")
    return tuple(run["input_shape"]), int(run["num_classes"])


def pack(state: State, mask: Mask) -> dict[str, torch.Tensor]:
    """Masked tensors as ``name::bits`` (packed bitmask) + ``name::values`` (survivors)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in mask.tensors:
            flat = mask[name].flatten().cpu()
            tensors[f"{name}::bits"] = torch.from_numpy(np.packbits(flat.numpy()))
            tensors[f"{name}::values"] = tensor.detach().cpu().flatten()[flat]
        else:
            tensors[name] = tensor.detach().cpu()
    return tensors


def write_ticket(
    out: Path, state: State, mask: Mask, meta: dict, config_hash: str = "standalone"
) -> None:
    """The packed ticket file (atomic, checksummed); ``meta`` gains the tensors' shapes."""
    meta = {**meta, "shapes": {n: list(t.shape) for n, t in state.items()}}
    RunStore(out.parent, config_hash).write_tensors(out.name, pack(state, mask), meta)


def read_ticket(path: Path) -> tuple[State, dict]:
    """The dense state (pruned weights exactly zero) and the metadata of a ticket file."""
    tensors, meta = read_checked_tensors(path)
    if "shapes" not in meta:
        raise TicketlabError(f"{path}: not a ticketlab ticket export")
    state = {}
    for name, shape in meta["shapes"].items():
        if f"{name}::bits" in tensors:
            values = tensors[f"{name}::values"]
            size = int(np.prod(shape))
            keep = np.unpackbits(tensors[f"{name}::bits"].numpy(), count=size).astype(bool)
            if int(keep.sum()) != values.numel():
                raise TicketlabError(f"{path}: {name}'s mask and values disagree")
            flat = torch.zeros(size, dtype=values.dtype)
            flat[torch.from_numpy(keep)] = values
            state[name] = flat.view(shape)
        elif name in tensors:
            state[name] = tensors[name]
        else:
            raise TicketlabError(f"{path}: tensor {name!r} is missing")
    return state, meta


def load_ticket(path: Path, module: nn.Module | None = None) -> nn.Module:
    """The exported ticket as a dense ``nn.Module`` with pruned weights exactly zero.

    ``module``: an instance of the architecture the ticket came from (needed for a
    ``find_ticket`` run's model, optional for a registered one); its weights are replaced in place
    and it is returned."""
    state, meta = read_ticket(Path(path))
    if module is not None:
        return load_state(module, state, str(path))
    if str(meta.get("model", "")).startswith("custom:"):
        raise TicketlabError(
            f"{path} holds a ticket of your own model ({meta['model']}); "
            "load it with load_ticket(path, module=YourModel(...))"
        )
    model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"], seed=0)
    model.load_state_dict(state)
    return model


def load_state(module: nn.Module, state: State, what: str) -> nn.Module:
    """``module`` with ``state`` loaded, or one line naming the first mismatch."""
    if not isinstance(module, nn.Module):
        raise TicketlabError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    own = module.state_dict()
    # a tied weight is stored once, under its first name (``module_state``): its other names
    # are filled by loading that one
    aliases = _tied_aliases(module)
    missing = sorted(set(own) - set(state) - set(aliases))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        which = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise TicketlabError(f"{what}: the ticket does not fit this module ({which})")
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise TicketlabError(
                f"{what}: {name} is {tuple(tensor.shape)} in the ticket but "
                f"{tuple(own[name].shape)} in the module"
            )
    full = {n: t.to(own[n].device, own[n].dtype) for n, t in state.items()}
    for alias, first in aliases.items():
        if alias not in full and first in full:
            full[alias] = full[first]
    module.load_state_dict(full)
    return module


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """Every later name of a parameter registered under several names -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


#: Linear layers with fewer weights than this stay dense in ``sparse_inference``: a call of
#: theirs is mostly overhead. With the compiled kernel LeNet-300-100's 300x100 layer pays (4x at
#: batch 256) and its 100x10 layer about breaks even; torch's CSR product has more overhead, so
#: without the kernel both are faster dense (benchmarks/export_speed.py).
KERNEL_MIN_WEIGHTS = 2**9
CSR_MIN_WEIGHTS = 2**17


class SparseLinear(nn.Module):
    """``nn.Linear`` with its weight held as CSR (survivors only); inference only.

    On the CPU in float32 ``y = x W^T + b`` goes through ticketlab's compiled kernel
    (``sparse_kernel``), several times faster than torch's CSR product on a ticket's layers;
    otherwise (no C compiler, another dtype or device, gradients wanted through ``x``) through
    torch's ``(W @ x^T)^T``, MKL's CSR times a dense matrix, one input row through ``addmv``.
    Leading dimensions of ``x`` are flattened around it, as ``nn.Linear`` allows."""

    def __init__(self, layer: nn.Linear, kernel: bool = True):
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach().clone()
        self.bias_column = None if self.bias is None else self.bias.unsqueeze(1)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.kernel = (
            kernel
            and sparse_kernel.enabled()
            and self.weight.dtype == torch.float32
            and self.weight.device.type == "cpu"
            and self.weight.values().numel() < 2**31
        )
        if self.kernel:
            self.indptr = self.weight.crow_indices().to(torch.int32)
            self.indices = self.weight.col_indices().to(torch.int32)
            self.values = self.weight.values().contiguous()
            self._point_kernel_at_tensors()

    def _point_kernel_at_tensors(self) -> None:
        self.csr = sparse_kernel.csr_weight(
            self.indptr, self.indices, self.values, self.bias, self.in_features
        )

    def __getstate__(self) -> dict:
        """Pickled without the kernel's raw addresses, which are rebuilt on load."""
        state = dict(self.__dict__)
        state.pop("csr", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.kernel:
            self._point_kernel_at_tensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            lead = x.shape[:-1]
            return self.forward(x.reshape(-1, self.in_features)).reshape(*lead, -1)
        if (
            self.kernel
            and x.dtype is torch.float32
            and not x.requires_grad  # the kernel has no backward
            and x.is_cpu
            and x.shape[1] == self.in_features  # else torch's product says what does not fit
        ):
            compiled = sparse_kernel.load()
            if compiled is not None:
                return compiled.linear(x, self.csr, self.out_features)
        if x.shape[0] == 1:
            if self.bias is None:
                return (self.weight @ x[0]).unsqueeze(0)
            return torch.addmv(self.bias, self.weight, x[0]).unsqueeze(0)
        if self.bias_column is None:
            return (self.weight @ x.t()).t()
        return torch.addmm(self.bias_column, self.weight, x.t()).t()

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        density = nnz / max(1, self.in_features * self.out_features)
        path = "compiled kernel" if self.kernel and sparse_kernel.load() else "torch CSR"
        return f"in={self.in_features}, out={self.out_features}, density={density:.3f}, {path}"


def sparse_inference(
    model: nn.Module,
    names: list[str] | None = None,
    below: float = 0.5,
    min_weights: int | None = None,
    kernel: bool = True,
) -> nn.Module:
    """A copy of ``model`` (any module graph) for CPU inference in which every ``nn.Linear``
    whose weight is in ``names`` (default: whose weight keeps less than ``below`` of its
    entries) and has at least ``min_weights`` weights (default ``KERNEL_MIN_WEIGHTS`` with the
    compiled kernel, ``CSR_MIN_WEIGHTS`` without) is a ``SparseLinear``; everything else is
    untouched. ``kernel=False`` keeps torch's CSR product."""
    if min_weights is None:
        compiled = kernel and sparse_kernel.enabled() and sparse_kernel.load() is not None
        min_weights = KERNEL_MIN_WEIGHTS if compiled else CSR_MIN_WEIGHTS
    sparse = copy.deepcopy(model).eval()
    chosen = []
    for name, layer in sparse.named_modules():
        if not isinstance(layer, nn.Linear) or layer.weight.device.type != "cpu":
            continue
        if layer.weight.numel() < min_weights:
            continue
        key = f"{name}.weight" if name else "weight"
        if names is not None:
            take = key in names
        else:
            take = float((layer.weight != 0).float().mean()) < below
        if take:
            chosen.append(name)
    for name in chosen:
        _replace(sparse, name, SparseLinear(sparse.get_submodule(name), kernel=kernel))
    return sparse


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise TicketlabError("the model is itself a Linear layer; use SparseLinear(model)")
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def inference_speed(
    model: nn.Module,
    input_shape: tuple[int, ...],
    pruned: list[str] | None = None,
    batch: int = 256,
    repeats: int = 30,
    vocab: int = 0,
) -> tuple[float, float]:
    """Median ms per batch for the dense model and its ``sparse_inference`` copy (CPU); inputs
    are random token ids below ``vocab`` when it is set (a language model), else Gaussian."""
    dense = model.eval()
    sparse = sparse_inference(model, pruned)
    g = torch.Generator().manual_seed(0)
    if vocab:
        x = torch.randint(0, vocab, (batch, *input_shape), generator=g)
    else:
        x = torch.randn(batch, *input_shape, generator=g)
    return _median_ms(dense, x, repeats), _median_ms(sparse, x, repeats)


def _median_ms(model: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]
