"""Which weights of a network are alive: one boolean tensor per prunable parameter.

Only parameters listed in the mask are pruned; everything else (biases by default, BatchNorm always)
is left dense. Saved as safetensors, keyed by parameter name, so a mask loads into
``torch.nn.utils.prune.custom_from_mask`` or any other tool without our code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Mask:
    """Boolean keep-tensor per prunable parameter name (True = weight survives)."""

    tensors: dict[str, torch.Tensor]

    @classmethod
    def ones_like(cls, params: Mapping[str, torch.Tensor]) -> Mask:
        return cls({name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def alive(self) -> int:
        return int(sum(int(t.sum()) for t in self.tensors.values()))

    def size(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def density(self) -> float:
        """Fraction of prunable weights remaining."""
        return self.alive() / max(1, self.size())

    def layer_density(self) -> dict[str, float]:
        return {name: float(t.float().mean()) for name, t in self.tensors.items()}

    def is_subset_of(self, other: Mask) -> bool:
        """True when every weight alive here is alive in ``other`` (masks only ever shrink)."""
        return all(not bool((t & ~other[name]).any()) for name, t in self.tensors.items())

    def apply_(self, params: Mapping[str, torch.Tensor]) -> None:
        """Zero the pruned entries of ``params`` in place."""
        with torch.no_grad():
            for name, keep in self.tensors.items():
                params[name].mul_(keep.to(params[name].dtype))

    def to_torch_prune(self, model: nn.Module) -> None:
        """Attach via ``torch.nn.utils.prune.custom_from_mask`` (the API people know)."""
        from torch.nn.utils import prune

        modules = dict(model.named_modules())
        for name, keep in self.tensors.items():
            module_name, _, param_name = name.rpartition(".")
            prune.custom_from_mask(modules[module_name], param_name, keep)


def prunable_names(
    model: nn.Module,
    prune_biases: bool = False,
    exclude: Iterable[str] = (),
    embeddings: bool = False,
) -> list[str]:
    """Names of parameters that pruning may touch: weights (and optionally biases) of Linear/Conv,
    and with ``embeddings`` the tables of ``nn.Embedding`` layers.

    Decided by layer type, never by matching 'weight' in a name, so BatchNorm and LayerNorm are
    never pruned, nor (by default) a transformer's token and position embeddings. A weight tied
    between layers is one tensor, named once (by its first name, as ``named_parameters`` does).
    """
    excluded = set(exclude)
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if embeddings:
        layer_types += (nn.Embedding,)
    names = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, layer_types):
            continue
        if module_name in excluded:
            continue
        with_bias = prune_biases and not isinstance(module, nn.Embedding)
        for param_name in ("weight", "bias") if with_bias else ("weight",):
            full = f"{module_name}.{param_name}" if module_name else param_name
            tensor = getattr(module, param_name, None)
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if full not in excluded:
                names.append(full)
    return names


PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module) -> list[str]:
    """Module names of every Linear/Conv layer (what ``--exclude`` and ``--output-layer`` name)."""
    return [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def find_output_layer(model: nn.Module, sample: torch.Tensor) -> str | None:
    """The Linear/Conv layer whose output *is* the model's output, found by running ``sample``
    through the model with forward hooks (registration order says nothing: a module may define
    ``self.head`` before ``self.body``). When no layer's output is returned as it is (a residual
    or a scaling after the last layer), the last Linear/Conv layer to run. None: no such layer."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, out)))
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    ]
    training = model.training
    model.eval()  # the probe must not move BatchNorm's running statistics
    try:
        with torch.no_grad():
            output = model(sample)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    for name, out in reversed(seen):
        if out is output:
            return name
    return seen[-1][0] if seen else None


def layer_groups(names: Iterable[str]) -> list[list[str]]:
    """Parameter names grouped by their module: a layer's weight and bias rank together."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def layer_kinds(model: nn.Module, output_layer: str | None = None) -> dict[str, str]:
    """'conv', 'fc', 'output' or 'embedding' per parameter name, for the paper's per-layer-kind
    pruning rates.

    ``output_layer``: the module name of the output layer (see ``find_output_layer``); without
    it, the model's own ``output_layer`` attribute when it has one (None: no output layer, e.g. a
    head tied to the embedding), else the last Linear registered (a guess that a module defining
    its head first gets wrong)."""
    if output_layer is None:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        output_layer = getattr(model, "output_layer", linear_names[-1] if linear_names else None)
    kinds = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            kind = "conv"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        elif isinstance(module, nn.Linear):
            kind = "output" if module_name == output_layer else "fc"
        else:
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            kinds[f"{module_name}.{param_name}" if module_name else param_name] = kind
    return kinds
