"""Is this data fit for this module? Checked once, before anything trains or is written.

Why here and not left to training: a mismatch found mid-run surfaces as an ``IndexError`` deep in a
loss, a shape error from a matmul, or worse trains silently (NaN inputs give a flat curve and "no
winning ticket"). Each check below says, in one sentence, which input is wrong and how.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import TicketlabError
from .data import Dataset


def as_arrays(pair: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` from NumPy arrays, tensors or nested lists, as float32 inputs and
    int64 labels; ``what`` ("train", "test") names the pair in errors."""
    if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
        raise TicketlabError(f"{what} must be a pair (inputs, labels)")
    x, y = (_numpy(v, what, part) for v, part in zip(pair, ("inputs", "labels"), strict=True))
    if x.ndim < 2:
        raise TicketlabError(
            f"{what} inputs need a sample axis and at least one feature axis; got shape {x.shape}"
        )
    if y.ndim < 1:
        raise TicketlabError(f"{what} labels need one label per sample; got a scalar")
    if len(x) != len(y):
        raise TicketlabError(f"{what} has {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise TicketlabError(f"{what} is empty")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TicketlabError(f"{what} inputs must be real numbers, got dtype {x.dtype}")
    _finite(x, f"{what} inputs")
    return x.astype(np.float32, copy=False), _labels(y, what)


def _numpy(value: Any, what: str, part: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TicketlabError(f"{what} {part} are not an array ({exc})") from None


def _labels(y: np.ndarray, what: str) -> np.ndarray:
    if np.issubdtype(y.dtype, np.bool_):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64, copy=False)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    raise TicketlabError(f"{what} labels must be integer class indices, got dtype {y.dtype}")


def _finite(x: np.ndarray | torch.Tensor, what: str) -> None:
    bad = int((~np.isfinite(np.asarray(x))).sum())
    if bad:
        raise TicketlabError(f"{what} hold {bad} NaN or infinite values (of {x.size}); clean them")


def check_fit(model: nn.Module, data: Dataset, prunable: list[str], dtype: torch.dtype) -> None:
    """One forward pass on two training inputs, then the labels against the output it gives."""
    if not prunable:
        raise TicketlabError(
            "the module has no Linear or Conv weights left to prune, so there is no ticket to find"
        )
    if data.x_train.shape[0] == 0:
        raise TicketlabError("train has too few samples to hold out a validation split")
    splits = {
        "train": (data.x_train, data.y_train),
        "validation": (data.x_val, data.y_val),
        "test": (data.x_test, data.y_test),
    }
    for what, (x, y) in splits.items():
        if x.shape[0] != y.shape[0]:
            raise TicketlabError(f"{what} has {x.shape[0]} inputs but {y.shape[0]} labels")
        _finite(x.numpy(), f"{what} inputs")
    out = _forward(model, data.x_train[:2].to(dtype), dtype)
    classes = out.shape[-1]
    per_sample = tuple(out.shape[1:-1])
    for what, (_, y) in splits.items():
        if tuple(y.shape[1:]) != per_sample:
            raise TicketlabError(
                f"{what} labels have shape {tuple(y.shape[1:])} per sample, but the module's "
                f"output {tuple(out.shape[1:])} asks for {per_sample} (class scores last)"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise TicketlabError(
                f"{what} labels run from {int(y.min())} to {int(y.max())}, but the module's "
                f"output has {classes} classes (labels must lie in 0..{classes - 1})"
            )


def _forward(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(x.shape[1:])
    net = copy.deepcopy(model).to(dtype).eval()
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, the data does not fit
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TicketlabError(
            f"the module does not accept inputs of shape {shape} (per sample): "
            f"{type(exc).__name__}: {message}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise TicketlabError(
            f"the module must return a tensor of class scores, it returned {type(out).__name__}"
        )
    if out.dim() < 2 or out.shape[0] != x.shape[0]:
        raise TicketlabError(
            f"the module must return [batch, classes] scores; for {x.shape[0]} inputs of shape "
            f"{shape} it returned shape {tuple(out.shape)}"
        )
    return out
