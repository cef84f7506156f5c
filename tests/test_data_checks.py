"""Bad data is refused before training, in one sentence, from Python and from the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ticketlab
from ticketlab import TicketlabError, find_ticket
from ticketlab.cli import main

N = 40


def mlp(inputs: int = 16, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 8), nn.ReLU(), nn.Linear(8, classes))


def pair(n: int = N, features: int = 16, classes: int = 4, seed: int = 0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, features)).astype(np.float32), g.integers(0, classes, n)


def search(tmp_path, model=None, train=None, test=None, **kw):
    return find_ticket(
        model or mlp(), train or pair(), test or pair(seed=1), out=tmp_path / "run",
        levels=0, replicates=1, steps=2, batch_size=8, eval_every=2, **kw,
    )  # fmt: skip


def refused(tmp_path, message: str, **kw) -> str:
    with pytest.raises(TicketlabError) as caught:
        search(tmp_path, **kw)
    text = str(caught.value)
    assert message in text and "\n" not in text, text
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    return text


def test_ticketlab_error_is_exported():
    assert ticketlab.TicketlabError is TicketlabError


def test_numpy_arrays_and_tensors_are_both_accepted(tmp_path):
    x, y = pair()
    result = search(tmp_path, train=(torch.from_numpy(x), torch.from_numpy(y)), test=pair(seed=1))
    assert result.summary["rows"][0]["level"] == 0


def test_inputs_that_do_not_fit_the_module(tmp_path):
    text = refused(tmp_path, "does not accept inputs of shape (12,)", train=pair(features=12))
    assert "mat1 and mat2" in text


def test_labels_outside_the_output_range(tmp_path):
    x, y = pair()
    y[3] = 7
    refused(tmp_path, "labels run from 0 to 7, but the module's output has 4 classes", train=(x, y))
    x, y = pair(seed=1)
    y[0] = -1
    refused(tmp_path, "test labels run from -1", test=(x, y))


def test_inputs_and_labels_of_different_lengths(tmp_path):
    x, y = pair()
    refused(tmp_path, "train has 40 inputs but 39 labels", train=(x, y[:-1]))


def test_non_finite_inputs(tmp_path):
    x, y = pair(seed=1)
    x[2, 5] = np.nan
    x[4, 0] = np.inf
    refused(tmp_path, "test inputs hold 2 NaN or infinite values", test=(x, y))


def test_labels_that_are_not_class_indices(tmp_path):
    x, y = pair()
    refused(tmp_path, "labels must be integer class indices", train=(x, y + 0.5))


def test_a_module_with_nothing_to_prune(tmp_path):
    class OnlyNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x)[:, :4]

    refused(tmp_path, "no Linear or Conv weights left to prune", model=OnlyNorm())
    refused(tmp_path, "no Linear or Conv weights left to prune", exclude=["0", "2"])


def test_the_cli_checks_too(capsys, tmp_path):
    code = main(
        ["find", "--model", "lenet_300_100", "--data", "digits", "--levels", "0",
         "--exclude", "1", "--exclude", "3", "--exclude", "5", "--out", str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "no Linear or Conv weights left to prune" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
