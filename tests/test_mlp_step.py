"""The dense MLP step without autograd: the loss and every gradient are autograd's bits, its buffers
carry nothing from one step to the next, only plain MLPs take it, and training through it is the
same bits as training through autograd."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_trainer import assert_identical, make_jobs, spec, state_of
from ticketlab.train.mlp_step import MlpStep
from ticketlab.train.stacked import SequentialStack
from ticketlab.train.trainer import train
from ticketlab.zoo.data import Dataset, load_dataset

K, BATCH = 3, 24


@pytest.fixture(scope="module")
def digits() -> Dataset:
    d = load_dataset("digits")
    return Dataset(
        d.name, d.x_train[:128], d.y_train[:128], d.x_val[:96], d.y_val[:96], d.x_test, d.y_test
    )


#: (template, input shape): images through a Flatten, flat features, no biases, one layer
MLPS = {
    "lenet-like": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 30),
            nn.ReLU(),
            nn.Linear(30, 20),
            nn.ReLU(),
            nn.Linear(20, 10),
        ),
        (1, 8, 8),
    ),
    "flat input": (
        lambda: nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Linear(50, 10)),
        (40,),
    ),
    "no biases": (
        lambda: nn.Sequential(
            nn.Linear(40, 50, bias=False), nn.ReLU(), nn.Linear(50, 10, bias=False)
        ),
        (40,),
    ),
    "one layer": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8)),
}


def stack_of(kind: str, dtype: torch.dtype = torch.float32) -> SequentialStack:
    build, _ = MLPS[kind]
    nets = []
    for i in range(K):
        torch.manual_seed(i)
        nets.append(build())
    return SequentialStack(nets[0], [state_of(n) for n in nets], dtype)


def batch(kind: str, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, BATCH, *MLPS[kind][1], generator=g, dtype=dtype)
    return x, torch.randint(0, 10, (K * BATCH,), generator=g)


def autograd_loss_and_grads(stack: SequentialStack, x, y):
    """What the trainer computes through autograd."""
    for p in stack.params.values():
        p.grad = None
    logits = stack.forward(x)
    per_net = F.cross_entropy(logits.reshape(-1, 10), y, reduction="none").view(K, -1).mean(dim=1)
    per_net.sum().backward()
    grads = {n: p.grad.clone() for n, p in stack.params.items()}
    for p in stack.params.values():
        p.grad = None
    return per_net.detach(), grads


@pytest.mark.parametrize("kind", MLPS)
def test_loss_and_gradients_are_autograds_bits_step_after_step(kind):
    stack = stack_of(kind)
    step = MlpStep.for_stack(stack, torch.zeros(1, dtype=torch.int64), mixed=False)
    assert step is not None
    kept = None
    for seed in range(3):  # the buffers are reused: nothing of one step may leak into the next
        x, y = batch(kind, seed)
        want_loss, want_grads = autograd_loss_and_grads(copy.deepcopy(stack), x, y)
        loss = step(x, y)
        assert torch.equal(loss, want_loss)
        for name, param in stack.params.items():
            assert torch.equal(param.grad, want_grads[name]), (kind, name)
        grads = [p.grad for p in stack.params.values()]
        if kept is not None:  # the same buffers, written over
            assert all(a is b for a, b in zip(grads, kept, strict=True))
        kept = grads
        with torch.no_grad():  # move the weights, as a step would
            for param in stack.params.values():
                param.sub_(0.1 * param.grad)


def test_gradients_are_the_networks_own_in_float64():
    """Independent of the stack: each network alone, as an nn.Module, through autograd."""
    build, _ = MLPS["lenet-like"]
    nets = []
    for i in range(K):
        torch.manual_seed(i)
        nets.append(build().double())
    stack = SequentialStack(nets[0], [state_of(n) for n in nets], torch.float64)
    step = MlpStep.for_stack(stack, torch.zeros(1, dtype=torch.int64), mixed=False)
    x, y = batch("lenet-like", 5, torch.float64)
    loss = step(x, y)
    for i, net in enumerate(nets):
        own = F.cross_entropy(net(x[i]), y[i * BATCH : (i + 1) * BATCH])
        own.backward()
        torch.testing.assert_close(loss[i], own.detach(), rtol=1e-12, atol=0)
        for name, param in net.named_parameters():
            ours = stack.to_canonical(name, stack.params[name].grad)[i]
            torch.testing.assert_close(ours, param.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "template",
    [
        nn.Sequential(nn.Linear(40, 10), nn.ReLU()),  # ends in a ReLU
        nn.Sequential(nn.Linear(40, 20), nn.Tanh(), nn.Linear(20, 10)),
        nn.Sequential(nn.Linear(40, 20), nn.ReLU(), nn.ReLU(), nn.Linear(20, 10)),
        nn.Sequential(nn.Linear(40, 20), nn.Flatten(), nn.Linear(20, 10)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10)),
    ],
)
def test_only_plain_mlps_take_it(template):
    stack = SequentialStack(template, [state_of(template)], torch.float32)
    assert MlpStep.for_stack(stack, torch.zeros(1, dtype=torch.int64), mixed=False) is None


def test_sequences_mixed_precision_and_sparse_layers_keep_autograd():
    stack = stack_of("flat input")
    labels = torch.zeros(1, dtype=torch.int64)
    assert MlpStep.for_stack(stack, torch.zeros(2, 5, dtype=torch.int64), mixed=False) is None
    assert MlpStep.for_stack(stack, torch.zeros(5), mixed=False) is None  # not class indices
    assert MlpStep.for_stack(stack, labels, mixed=True) is None
    weights = [n for n in stack.params if n.endswith("weight")]
    keep = {n: torch.rand(K, *stack.params[n].shape[2:0:-1]) < 0.02 for n in weights}
    assert stack.sparsify(keep, below=0.5)
    assert MlpStep.for_stack(stack, labels, mixed=False) is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_through_it_is_trainings_through_autograd(digits, dtype):
    """A whole run, pruned masks, evaluations and early-stop weights included."""
    template, jobs = make_jobs("lenet_300_100", digits, n=3)
    s = spec(steps=20, dtype=dtype)
    built = []
    real = MlpStep.for_stack

    def spy(*args, **kw):
        built.append(real(*args, **kw))
        return built[-1]

    with mock.patch.object(MlpStep, "for_stack", spy):
        direct = train(template, jobs, digits, s, lanes=1)
    assert built and all(step is not None for step in built)
    with mock.patch.object(MlpStep, "for_stack", classmethod(lambda cls, *a, **kw: None)):
        through_autograd = train(template, jobs, digits, s, lanes=1)
    for a, b in zip(direct, through_autograd, strict=True):
        assert_identical(a, b)
