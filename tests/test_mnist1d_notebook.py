"""``benchmarks/mnist1d_table.py`` against the MNIST-1D notebook's own loop, rewritten here.

The reference is the notebook's code in plain PyTorch (its ``SparseLinear``, which masks a layer's
weights and bias as one vector at every forward; its ``train_model``, which steps for
``total_steps + 1`` loop steps, evaluates every ``eval_every`` and deep-copies the model every
``checkpoint_every``; its ``find_lottery_ticket``, which ranks ``checkpoints[-1]`` and drops
``int(sparsity * n)`` per layer). The benchmark claims to train the same network, report the same
final accuracy and prune from the same weights; this checks each claim in float64, at a scale
where the notebook's 1501 steps / 1000 / 100 become 21 / 15 / 10.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.core.mask import Mask, layer_groups, prunable_names
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import Dataset
from ticketlab.zoo.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mnist1d_table import notebook_checkpoint, prune_round, schedule, table_row  # noqa: E402

TOTAL_STEPS, EVAL_EVERY, CHECKPOINT_EVERY, BATCH = 21, 10, 15, 100


class NotebookLinear(nn.Module):
    """The notebook's ``SparseLinear``: the mask multiplies [weight, bias] at every forward."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.linear, self.mask = linear, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vec = self.mask * torch.cat([p.flatten() for p in self.linear.parameters()])
        at = 0
        for p in self.linear.parameters():
            p.data = vec[at : at + p.numel()].reshape(p.shape).data
            at += p.numel()
        return self.linear(x)

    def vec(self) -> torch.Tensor:
        return self.mask * torch.cat([p.flatten() for p in self.linear.parameters()])


class NotebookMLP(nn.Module):
    def __init__(self, state: dict[str, torch.Tensor], masks: list[torch.Tensor]):
        super().__init__()
        linears = []
        for i, mask in enumerate(masks, start=1):
            w, b = state[f"linear{i}.weight"], state[f"linear{i}.bias"]
            lin = nn.Linear(w.shape[1], w.shape[0]).double()
            lin.weight.data, lin.bias.data = w.clone(), b.clone()
            linears.append(NotebookLinear(lin, mask))
        self.layers = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.layers[0](x))
        h = h + torch.relu(self.layers[1](h))
        return self.layers[2](h)


def notebook_train(model: NotebookMLP, data: Dataset) -> tuple[NotebookMLP, float]:
    """The notebook's ``train_model``: (``checkpoints[-1]``, the last test accuracy logged)."""
    opt = torch.optim.Adam(model.parameters(), 2e-2)
    x, y = data.x_train, data.y_train
    checkpoints, test_acc = [], []
    for step in range(TOTAL_STEPS + 1):
        bix = (step * BATCH) % len(x)
        loss = F.cross_entropy(model(x[bix : bix + BATCH]), y[bix : bix + BATCH])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                acc = (model(data.x_test).argmax(-1) == data.y_test).double().mean()
            test_acc.append(100 * float(acc))
        if step % CHECKPOINT_EVERY == 0:
            checkpoints.append(copy.deepcopy(model))
    return checkpoints[-1], test_acc[-1]


def notebook_masks(checkpoint: NotebookMLP, sparsity: float) -> list[torch.Tensor]:
    """``find_lottery_ticket``'s next masks: per layer, drop the ``int(s * n)`` smallest |w|."""
    masks = []
    for layer in checkpoint.layers:
        scores = layer.vec().detach().abs()
        mask = torch.ones_like(scores)
        mask[torch.sort(scores)[1][: int(sparsity * len(scores))]] = 0
        masks.append(mask)
    return masks


@pytest.fixture(scope="module")
def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 40, generator=g, dtype=torch.float64)
    y = (x[:, :10].argmax(1) + (x[:, 10] > 0)) % 10  # learnable in a few steps
    return Dataset("toy", x, y, x[:50], y[:50], x[:200] + 0.3, y[:200])


def flat(state: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    return torch.cat([state[f"linear{layer}.weight"].flatten(), state[f"linear{layer}.bias"]])


def test_the_benchmark_trains_reports_and_prunes_as_the_notebook(data):
    template = build_model("mnist1d_resmlp", (40,), 10, seed=0).double()
    init = {k: v.detach().clone() for k, v in template.state_dict().items()}
    names = prunable_names(template, prune_biases=True)
    groups = layer_groups(names)
    mask = Mask.ones_like({n: init[n] for n in names})
    updates = notebook_checkpoint(TOTAL_STEPS, every=CHECKPOINT_EVERY)
    assert updates == 16  # the copy at loop step 15, taken after that step's update
    spec = TrainSpec(
        steps=TOTAL_STEPS, batch_size=BATCH, lr=2e-2, eval_every=TOTAL_STEPS,
        data_order="cyclic", dtype="float64",
    )  # fmt: skip

    for sparsity in (0.0, 0.5):  # a dense round, then a pruned one
        (ours,) = train(template, [Job(init, mask, data_seed=0, snapshot_step=updates)], data, spec)
        masks = [flat(mask.tensors, i).double() for i in (1, 2, 3)]
        checkpoint, last_acc = notebook_train(NotebookMLP(init, masks), data)
        assert 100 * ours.final_test_acc == pytest.approx(last_acc, abs=1e-9)
        for i, layer in enumerate(checkpoint.layers, start=1):
            torch.testing.assert_close(flat(ours.snapshot, i), layer.vec().detach())
            assert bool((flat(ours.snapshot, i)[masks[i - 1] == 0] == 0).all())

        following = 0.7 if sparsity else 0.5
        (mask,) = prune_round([mask], [init], [ours.snapshot], groups, following)
        for i, expected in enumerate(notebook_masks(checkpoint, following), start=1):
            kept = flat(mask.tensors, i).bool()
            # the notebook drops int(s * n); ticketlab keeps round((1 - s) * n): one weight apart
            assert abs(int(kept.sum()) - int(expected.sum())) <= 1
            smaller, larger = sorted([kept, expected.bool()], key=lambda m: int(m.sum()))
            assert bool((smaller <= larger).all())  # the same ranking


def test_the_schedules_and_rows_are_the_notebooks():
    faithful = schedule(True)
    assert faithful == [i / 99 for i in range(99)]  # np.linspace(0, 1, 100) without its last
    rows = {i: table_row(s) for i, s in enumerate(faithful) if table_row(s) is not None}
    assert rows == {0: 0.0, 45: 0.45, 79: 0.8, 89: 0.9, 91: 0.92, 94: 0.95, 96: 0.97, 97: 0.98,
                    98: 0.99}  # fmt: skip
    assert schedule(False) == [faithful[i] for i in rows]
    assert notebook_checkpoint(1501) == 1001  # checkpoint_every=1000: the copy at loop step 1000
    assert notebook_checkpoint(900) == 1
