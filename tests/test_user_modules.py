"""A zoo of modules as users write them, each through ``find_ticket`` -> ``search.ticket()``.

Every one must run without a traceback, start replicate 0 from its weights exactly as passed,
prune only its Linear/Conv weights, and say in one line when its networks cannot train side by side.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from sklearn.datasets import load_digits
from torch import nn

from ticketlab import find_ticket
from ticketlab.api import module_state
from ticketlab.core.mask import prunable_names
from ticketlab.io.export import export_ticket, load_ticket, sparse_inference
from ticketlab.train.stacked import plan_stack


def named_sequential() -> nn.Module:
    return nn.Sequential(
        OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(64, 32), act=nn.ReLU(), out=nn.Linear(32, 10))
    )


def nested_sequential() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(64, 32), nn.ReLU()),
        nn.Sequential(OrderedDict(head=nn.Linear(32, 10))),
    )


def batchnorm_sequential() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            flat=nn.Flatten(),
            fc1=nn.Linear(64, 32),
            bn=nn.BatchNorm1d(32),
            act=nn.ReLU(),
            out=nn.Linear(32, 10),
        )
    )


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.hidden = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.out(h + torch.relu(self.hidden(h)))


class ConvBlock(nn.Module):
    """A ResNet-style block: conv-BN-ReLU-conv-BN, 1x1-conv shortcut, global pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.shortcut = nn.Sequential(nn.Conv2d(1, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(F.dropout(torch.relu(self.fc(x.flatten(1))), 0.1, self.training))


class Randomized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.act = nn.RReLU()
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(self.drop(self.act(self.fc(x.flatten(1)))))


class Scale(nn.Module):
    """A raw parameter with no reset_parameters."""

    def __init__(self, n: int):
        super().__init__()
        self.gain = nn.Parameter(torch.full((n,), 0.98))

    def forward(self, x):
        return x * self.gain


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.scale = Scale(32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.scale(self.fc(x.flatten(1)))))


class Tied(nn.Module):
    """One square weight used by two layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.out(torch.relu(self.b(torch.relu(self.a(h)))))


# (builder, stack implementation the plan must pick, notice expected)
ZOO = {
    "named_sequential": (named_sequential, "sequential", False),
    "nested_sequential": (nested_sequential, "sequential", False),
    "batchnorm_sequential": (batchnorm_sequential, "rows", False),
    "residual": (Residual, "rows", False),
    "conv_batchnorm_block": (ConvBlock, "rows", False),
    "functional_dropout": (FunctionalDropout, "loop", True),
    "rrelu_and_dropout": (Randomized, "rows", False),
    "raw_parameter": (RawParameter, "rows", False),
    "tied_weights": (Tied, "rows", False),
}


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(d.target)
    return (x[:600], y[:600]), (x[1400:1600].numpy(), y[1400:1600].numpy())  # tensors and arrays


@pytest.mark.parametrize("name", list(ZOO))
def test_user_module_finds_a_ticket(tmp_path, digits, name):
    build, impl, notice = ZOO[name]
    torch.manual_seed(3)
    model = build()
    given = module_state(model)
    assert plan_stack(model, digits[0][0][:8]).impl == impl
    log = io.StringIO()
    search = find_ticket(
        model, *digits, out=tmp_path / "run", levels=1, replicates=2, steps=12, batch_size=32,
        eval_every=6, lr=3e-3, console=Console(file=log, width=400),
    )  # fmt: skip
    said = log.getvalue()
    assert ("one after another" in said) == notice, said
    if notice:
        assert "F.dropout" in said and len([s for s in said.splitlines() if "after" in s]) == 1
    mask, weights = search.ticket(1)
    assert set(mask.names()) == set(prunable_names(model))
    assert 0.75 < mask.density() < 0.95  # one level: 20% fc, 10% conv and output layer
    for n in mask.names():
        assert not bool(weights[n][~mask[n]].any())
    # replicate 0 starts from the module exactly as passed; replicate 1 from a fresh draw
    _, start = search.ticket(0, replicate=0)
    for n, t in given.items():
        assert torch.equal(start[n], t), n
    _, other = search.ticket(0, replicate=1)
    first = prunable_names(model)[0]
    assert not torch.equal(other[first], given[first])
    if name != "conv_batchnorm_block":  # 12 steps teach this tiny conv net nothing, alone too
        accuracy = search.summary["rows"][0]["branches"]["ticket"]["early_stop_test_acc"]
        assert accuracy["mean"] > 0.15  # it trained (chance is 0.1)
    # shipped: export the early-stop ticket, load it into a fresh instance, run it sparse
    path = tmp_path / "ticket.safetensors"
    report = export_ticket(search.run_dir, search.config, 1, path, module=build())
    assert report.weights == "early_stop" and path.is_file()
    loaded = load_ticket(path, module=build()).eval()
    state = module_state(loaded)
    for n in mask.names():
        assert not bool(state[n][~mask[n]].any()), n
    x = torch.as_tensor(digits[1][0][:16])
    sparse = sparse_inference(loaded, mask.names(), min_weights=0)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), loaded(x), rtol=1e-4, atol=1e-5)


def test_a_raw_parameter_without_reset_is_named_and_init_draws_it(tmp_path, digits):
    torch.manual_seed(0)
    log = io.StringIO()
    common = {"levels": 0, "replicates": 2, "steps": 2, "batch_size": 32, "eval_every": 2}
    search = find_ticket(
        RawParameter(), *digits, out=tmp_path / "a", console=Console(file=log, width=400), **common
    )
    assert "scale.gain" in log.getvalue() and "init=" in log.getvalue()
    assert torch.equal(search.ticket(0, 1)[1]["scale.gain"], torch.full((32,), 0.98))

    def init(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
            if isinstance(m, Scale):
                nn.init.uniform_(m.gain, 0.5, 1.5)

    log = io.StringIO()
    search = find_ticket(
        RawParameter(), *digits, out=tmp_path / "b", init=init,
        console=Console(file=log, width=400), **common,
    )  # fmt: skip
    assert "warning" not in log.getvalue()
    gain = search.ticket(0, 1)[1]["scale.gain"]
    assert not torch.equal(gain, torch.full((32,), 0.98)) and float(gain.min()) >= 0.5
