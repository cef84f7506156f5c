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
    model: nn.Module, prune_biases: bool = False, exclude: Iterable[str] = ()
) -> list[str]:
    """Names of parameters that pruning may touch: weights (and optionally biases) of Linear/Conv.

    Decided by layer type, never by matching 'weight' in a name, so BatchNorm is never pruned. A
    weight tied between layers is one tensor, named once (by its first name, as
    ``named_parameters`` does).
    """
    excluded = set(exclude)
    names = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            continue
        if module_name in excluded:
            continue
        for param_name in ("weight", "bias") if prune_biases else ("weight",):
            full = f"{module_name}.{param_name}" if module_name else param_name
            tensor = getattr(module, param_name, None)
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if full not in excluded:
                names.append(full)
    return names


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """'conv', 'fc' or 'output' per parameter name, for the paper's per-layer-kind pruning rates."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kinds = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            kind = "conv"
        elif isinstance(module, nn.Linear):
            kind = "output" if linear_names and module_name == linear_names[-1] else "fc"
        else:
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            kinds[f"{module_name}.{param_name}" if module_name else param_name] = kind
    return kinds
