"""The stacked trainer against a plain PyTorch loop written here (torch.optim, no ticketlab code).

Everything else in the suite compares ticketlab with itself (stacked vs one by one); this file
rebuilds each network's training from its definition — data order, masked init, Adam or SGD steps,
mask re-applied after each step, evaluation with BatchNorm's running statistics — and asks the
trainer's stacks (dense and block-sparse Linear paths, with and without BatchNorm) for the same
numbers in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from ticketlab.core.mask import Mask
from ticketlab.train.row_stack import RowStack
from ticketlab.train.stacked import SequentialStack, plan_stack
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import Dataset

STEPS, BATCH, EVAL_EVERY = 14, 16, 7  # 112 training rows: 7 steps an epoch, so two epochs


@pytest.fixture(scope="module")
def data() -> Dataset:
    d = load_digits()
    x = torch.tensor(d.images / 8.0 - 1.0, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(d.target)
    return Dataset("digits", x[:112], y[:112], x[200:264], y[200:264], x[300:400], y[300:400])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


class BatchNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 48, bias=False)
        self.bn = nn.BatchNorm1d(48)
        self.out = nn.Linear(48, 10)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.fc(x.flatten(1)))))


class BatchNormConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


def reference(model: nn.Module, init: dict, mask: dict, seed: int, data: Dataset, opt: str):
    """One network, the textbook way: returns final state and (val loss, test acc) per eval."""
    net = copy.deepcopy(model).double()
    net.load_state_dict({k: v * mask[k] if k in mask else v for k, v in init.items()})
    params = dict(net.named_parameters())
    if opt == "adam":
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    n = data.x_train.shape[0]
    per_epoch = n // BATCH
    curve = []
    for step in range(STEPS + 1):
        if step % EVAL_EVERY == 0:
            net.eval()
            with torch.no_grad():
                val_loss = F.cross_entropy(net(data.x_val), data.y_val).item()
                test_acc = (net(data.x_test).argmax(1) == data.y_test).double().mean().item()
            curve.append((val_loss, test_acc))
            net.train()
        if step == STEPS:
            break
        epoch, position = divmod(step, per_epoch)
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
        order = torch.randperm(n, generator=g)[position * BATCH : (position + 1) * BATCH]
        loss = F.cross_entropy(net(data.x_train[order]), data.y_train[order])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, keep in mask.items():
                params[name].mul_(keep)
    return {k: v.detach() for k, v in net.state_dict().items()}, curve


def masks_for(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{name}.weight": torch.rand(m.weight.shape, generator=g) < density
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    }


IMPL_NAMES = {SequentialStack: "sequential", RowStack: "rows"}
CASES = {  # name: (builder, stack the plan must pick)
    "mlp": (mlp, SequentialStack),
    "batchnorm_mlp": (BatchNormMLP, RowStack),
    "batchnorm_conv": (BatchNormConv, RowStack),
}


@pytest.mark.parametrize(
    "case, opt, density",
    [(case, "adam", density) for case in CASES for density in (1.0, 0.1)]
    + [("batchnorm_conv", "sgd", 1.0)],
    ids=lambda v: {1.0: "dense", 0.1: "sparse"}.get(v, v) if not isinstance(v, str) else v,
)
def test_stacked_trainer_equals_a_plain_pytorch_loop(data, case, opt, density):
    build, impl = CASES[case]
    torch.manual_seed(0)
    template = build()
    assert plan_stack(template, data.x_train).impl == IMPL_NAMES[impl]
    jobs = []
    for i in range(3):
        torch.manual_seed(10 + i)
        net = build()
        init = {k: v.detach().clone() for k, v in net.state_dict().items()}
        jobs.append(Job(init, Mask(masks_for(net, density, seed=i)), data_seed=5 + i))
    spec = TrainSpec(
        steps=STEPS,
        batch_size=BATCH,
        optimizer=opt,
        lr=3e-3 if opt == "adam" else 0.05,
        momentum=0.9,
        eval_every=EVAL_EVERY,
        dtype="float64",
    )
    results = train(template, jobs, data, spec, stack_size=3, lanes=1)
    for job, result in zip(jobs, results, strict=True):
        final, curve = reference(template, job.init, job.mask.tensors, job.data_seed, data, opt)
        assert result.final.keys() <= final.keys()
        for name, value in result.final.items():
            torch.testing.assert_close(value, final[name], rtol=0, atol=1e-9, msg=name)
        assert len(result.curve["val_loss"]) == len(curve)
        for got_loss, got_acc, (loss, acc) in zip(
            result.curve["val_loss"], result.curve["test_acc"], curve, strict=True
        ):
            assert math.isclose(got_loss, loss, rel_tol=0, abs_tol=1e-9)
            assert got_acc == acc
