"""The stacked trainer computes exactly what training the networks one by one computes.

Everything runs in float64 on scikit-learn's 8x8 digits, so a stack of K networks can be compared to
K separate runs with a tolerance far below anything training noise could hide behind.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train import stacked, trainer
from ticketlab.train.stacked import (
    LoopStack,
    NotStackable,
    RowStack,
    SequentialStack,
    VmapStack,
    canonical_states,
    max_stack_size,
    stack_networks,
)
from ticketlab.train.trainer import Job, Result, TrainSpec, chunk_count, train, train_stack
from ticketlab.zoo.data import Dataset, load_dataset
from ticketlab.zoo.models import build_model

TOL = 1e-10
# enough steps to cross epoch boundaries (every 8 steps), few enough for float64 convolutions
STEPS = {"lenet_300_100": 30, "conv2": 12}
SPARSITIES = (0.0, 0.5, 0.8, 0.95)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """A slice of the digits: 128 training images are 8 steps per epoch at batch 16, so short runs
    cross epoch boundaries (a new data order per network)."""
    d = load_dataset("digits")
    return Dataset(
        d.name, d.x_train[:128], d.y_train[:128], d.x_val[:96], d.y_val[:96], d.x_test, d.y_test
    )


def spec(steps: int = 20, **kw) -> TrainSpec:
    base = {"batch_size": 16, "lr": 3e-3, "eval_every": 10, "dtype": "float64"}
    return TrainSpec(steps=steps, **{**base, **kw})


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def random_mask(model: nn.Module, sparsity: float, seed: int) -> Mask:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return Mask(
        {n: torch.rand(params[n].shape, generator=g) >= sparsity for n in prunable_names(model)}
    )


def make_jobs(model_name: str, data: Dataset, n: int = 4, **job_kw) -> tuple[nn.Module, list[Job]]:
    template = build_model(model_name, data.input_shape, data.num_classes, seed=0)
    jobs = []
    for i in range(n):
        net = build_model(model_name, data.input_shape, data.num_classes, seed=100 + i)
        mask = random_mask(net, SPARSITIES[i % len(SPARSITIES)], seed=i)
        jobs.append(Job(init=state_of(net), mask=mask, data_seed=7 * i + 3, **job_kw))
    return template, jobs


def assert_close(a: Result, b: Result, tol: float = TOL) -> None:
    assert a.final.keys() == b.final.keys()
    for name in a.final:
        torch.testing.assert_close(a.final[name], b.final[name], rtol=0, atol=tol)
    assert a.curve.keys() == b.curve.keys()
    for key in a.curve:
        for u, v in zip(a.curve[key], b.curve[key], strict=True):
            assert (u is None and v is None) or math.isclose(u, v, rel_tol=0, abs_tol=tol), key
    assert a.early_stop_iter == b.early_stop_iter
    assert a.diverged == b.diverged


def assert_identical(a: Result, b: Result) -> None:
    assert a.final.keys() == b.final.keys()
    for name in a.final:
        assert torch.equal(a.final[name], b.final[name]), name
    assert a.curve == b.curve
    assert (a.early_stop_iter, a.early_stop_test_acc, a.final_test_acc) == (
        b.early_stop_iter,
        b.early_stop_test_acc,
        b.final_test_acc,
    )
    assert (a.diverged, a.diverged_at) == (b.diverged, b.diverged_at)
    assert (a.early_stop is None) == (b.early_stop is None)
    for name in a.early_stop or {}:
        assert torch.equal(a.early_stop[name], b.early_stop[name]), name


@pytest.mark.parametrize("model_name", ["lenet_300_100", "conv2"])
def test_stack_equals_one_by_one(digits, model_name):
    template, jobs = make_jobs(model_name, digits)
    s = spec(steps=STEPS[model_name])
    stacked = train(template, jobs, digits, s, stack_size=len(jobs))
    alone = train(template, jobs, digits, s, stack_size=1)
    assert len(stacked) == len(alone) == len(jobs)
    for i, (a, b) in enumerate(zip(stacked, alone, strict=True)):
        assert_close(a, b)
        if SPARSITIES[i] == 0.0:
            assert a.curve["val_loss"][-1] < 0.9 * a.curve["val_loss"][0]  # it did learn
    # different masks, inits and data orders really give different networks
    first = prunable_names(template)[0]
    assert not torch.equal(stacked[0].final[first], stacked[1].final[first])


@pytest.mark.parametrize("model_name", ["lenet_300_100", "conv2"])
def test_pruned_weights_stay_exactly_zero(digits, model_name):
    template, jobs = make_jobs(model_name, digits)
    for job, result in zip(jobs, train(template, jobs, digits, spec(dtype="float32")), strict=True):
        for name in job.mask:
            keep = job.mask[name]
            assert bool((result.final[name][~keep] == 0).all()), name
            assert bool((result.final[name][keep] != 0).any()), name


def test_same_seeds_give_bit_identical_results(digits):
    template, jobs = make_jobs("conv2", digits, n=3)
    s = spec(steps=20, dtype="float32")
    for a, b in zip(
        train(template, jobs, digits, s), train(template, jobs, digits, s), strict=True
    ):
        assert_identical(a, b)


def test_float32_stack_close_to_one_by_one(digits):
    template, jobs = make_jobs("lenet_300_100", digits, n=3)
    s = spec(steps=20, dtype="float32")
    stacked = train(template, jobs, digits, s)
    alone = train(template, jobs, digits, s, stack_size=1)
    for a, b in zip(stacked, alone, strict=True):
        assert_close(a, b, tol=1e-4)


class ResidualMLP(nn.Module):
    """Not an nn.Sequential: goes through the generic vmap path."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        h = h + torch.tanh(self.mid(h))
        return self.out(h)


def module_jobs(cls, n: int, **kw) -> tuple[nn.Module, list[Job]]:
    torch.manual_seed(0)
    template = cls(**kw)
    jobs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        net = cls(**kw)
        mask = random_mask(net, SPARSITIES[i % len(SPARSITIES)], seed=i)
        jobs.append(Job(init=state_of(net), mask=mask, data_seed=i))
    return template, jobs


class ScaledMLP(ResidualMLP):
    """Its own forward uses a raw parameter: not row-stackable, goes through vmap."""

    def __init__(self, width: int = 32):
        super().__init__(width)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


@pytest.mark.parametrize("cls, impl", [(ResidualMLP, RowStack), (ScaledMLP, VmapStack)])
def test_module_paths_equal_one_by_one(digits, cls, impl):
    template, jobs = module_jobs(cls, 3)
    stack = stack_networks(template, [j.init for j in jobs], torch.float64, digits.x_train)
    assert isinstance(stack, impl)
    s = spec(steps=30)
    stacked = train(template, jobs, digits, s)
    alone = train(template, jobs, digits, s, stack_size=1)
    for job, a, b in zip(jobs, stacked, alone, strict=True):
        assert_close(a, b)
        for name in job.mask:
            assert bool((a.final[name][~job.mask[name]] == 0).all())


def test_stack_size_shrinks_when_training_state_would_not_fit(digits, monkeypatch):
    template = build_model("lenet_300_100", digits.input_shape, 10, seed=0)
    per_network = 16 * sum(p.numel() for p in template.parameters())  # weight, grad, 2 moments
    assert max_stack_size(template, available_bytes=4 * 3 * per_network) == 3
    assert max_stack_size(template, available_bytes=per_network) == 1  # never below one
    assert max_stack_size(template, available_bytes=10**15) == 16
    assert max_stack_size(template) == 16  # this machine: the paper's models never hit the cap
    monkeypatch.setattr(stacked, "available_memory", lambda: 4 * 3 * per_network)
    assert trainer._chunk_bounds(template, 6, None, 1) == [(0, 3), (3, 6)]  # stacks follow it


def test_sequential_stack_is_used_for_paper_models(digits):
    for name in ("lenet_300_100", "conv2"):
        template, jobs = make_jobs(name, digits, n=2)
        stack = stack_networks(template, [j.init for j in jobs], torch.float64, digits.x_train)
        assert isinstance(stack, SequentialStack)
        # the working layout converts back to the exact canonical state
        for job, state in zip(jobs, canonical_states(stack), strict=True):
            assert state.keys() == job.init.keys()
            for k in state:
                assert torch.equal(state[k], job.init[k].double())


class BatchNormNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.BatchNorm1d(width))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class DropoutNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.fc = nn.Linear(64, width)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.fc(x.flatten(1)))))


class FunctionalDropoutNet(DropoutNet):
    """Random numbers drawn in forward itself, outside any module: networks run one after
    another (their streams stay their own)."""

    def forward(self, x):
        h = F.dropout(torch.relu(self.fc(x.flatten(1))), 0.2, self.training)
        return self.head(h)


@pytest.mark.parametrize(
    "cls, impl",
    [(BatchNormNet, RowStack), (DropoutNet, RowStack), (FunctionalDropoutNet, LoopStack)],
)
def test_stateful_or_random_modules_stack_exactly(digits, cls, impl):
    template, jobs = module_jobs(cls, 2)
    stack = stack_networks(template, [j.init for j in jobs], torch.float64, digits.x_train)
    assert type(stack) is impl
    # SGD: Adam turns the rounding noise of a gradient that is zero in exact arithmetic (a Linear
    # bias before BatchNorm) into steps of lr * noise / eps, ~1e-11 here, drowning the comparison
    s = spec(steps=40, optimizer="sgd", lr=0.05)
    results = train(template, jobs, digits, s, stack_size=8)
    alone = train(template, jobs, digits, s, stack_size=1)
    assert len(results) == 2
    for job, r, a in zip(jobs, results, alone, strict=True):
        assert_close(r, a)  # random draws too: each network has its own stream
        assert not r.diverged
        assert r.curve["val_loss"][-1] < r.curve["val_loss"][0]
        assert r.final_test_acc > 0.2  # chance is 0.1
        for name in job.mask:
            assert bool((r.final[name][~job.mask[name]] == 0).all())
    if cls is BatchNormNet:  # running statistics are part of the result
        assert "body.2.running_mean" in results[0].final or "body.2.weight" in results[0].final


@pytest.mark.parametrize("model_name", ["lenet_300_100", "conv2"])
def test_divergence_is_confined_to_its_network(digits, model_name):
    template, jobs = make_jobs(model_name, digits, n=3)
    poisoned_init = {k: v.clone() for k, v in jobs[1].init.items()}
    poisoned_init["1.weight" if model_name == "lenet_300_100" else "0.weight"].fill_(math.nan)
    poisoned = [jobs[0], Job(poisoned_init, jobs[1].mask, jobs[1].data_seed), jobs[2]]
    s = spec(steps=STEPS[model_name] // 2)
    bad = train(template, poisoned, digits, s)
    healthy = train(template, jobs, digits, s)
    without = train(template, [jobs[0], jobs[2]], digits, s)
    assert [r.diverged for r in bad] == [False, True, False]
    assert bad[1].diverged_at == 0
    assert bad[1].curve["val_loss"][-1] is None
    for i in (0, 2):  # same stack size: bit-identical; smaller stack: same arithmetic
        assert_identical(bad[i], healthy[i])
    assert_close(bad[0], without[0])
    assert_close(bad[2], without[1])


def same_tree(a, b) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tree(u, v) for u, v in zip(a, b, strict=True))
    return a == b


class MemoryCheckpointer:
    """Keeps the state objects it is handed, as they are: the trainer must hand over copies and
    must not alias what it loads (a file-backed checkpointer would hide both mistakes)."""

    def __init__(self, every: int, resume_from: dict | None = None):
        self.every = every
        self.saved: list[dict] = []
        self.resume_from = resume_from

    def load(self):
        return self.resume_from

    def save(self, state):
        self.saved.append(state)


@pytest.mark.parametrize("model_name", ["lenet_300_100", "conv2"])
def test_resume_from_checkpoint_is_bit_identical(digits, model_name):
    template, jobs = make_jobs(model_name, digits, n=3, snapshot_step=5)
    s = spec(steps=20, dtype="float32")  # resumed parts cross epoch boundaries (8, 16)
    first = MemoryCheckpointer(every=6)
    full = train_stack(template, jobs, digits, s, checkpointer=first)
    assert [state["step"] for state in first.saved] == [6, 12, 18]
    pristine = copy.deepcopy(first.saved)
    for saved in [*first.saved, first.saved[1]]:  # resuming twice from one state: it is not aliased
        resumed = train_stack(template, jobs, digits, s, checkpointer=MemoryCheckpointer(6, saved))
        for a, b in zip(full, resumed, strict=True):
            assert_identical(a, b)
            for name in a.snapshot:
                assert torch.equal(a.snapshot[name], b.snapshot[name])
    # checkpoints are copies: neither the rest of training nor a resume changed them
    assert same_tree(first.saved, pristine)


def test_resume_counts_progress_only_for_remaining_steps(digits):
    template, jobs = make_jobs("lenet_300_100", digits, n=2)
    s = spec(steps=30)
    first = MemoryCheckpointer(every=10)
    train_stack(template, jobs, digits, s, checkpointer=first)
    ticks: list[int] = []
    train_stack(template, jobs, digits, s, ticks.append, MemoryCheckpointer(10, first.saved[1]))
    assert sum(ticks) == 10 * len(jobs)  # network-steps


@pytest.mark.parametrize("model_name", ["lenet_300_100", "conv2"])
def test_snapshot_step_is_the_weights_after_k_steps(digits, model_name):
    template, jobs = make_jobs(model_name, digits, n=2)
    at_7 = train(template, jobs, digits, spec(steps=7, dtype="float32"))
    snap_jobs = [Job(j.init, j.mask, j.data_seed, snapshot_step=7) for j in jobs]
    longer = train(template, snap_jobs, digits, spec(steps=20, dtype="float32"))
    first_layer = prunable_names(template)[0]
    for short, long in zip(at_7, longer, strict=True):
        assert long.snapshot is not None
        for name in short.final:
            assert torch.equal(long.snapshot[name], short.final[name]), name
        assert not torch.equal(long.final[first_layer], short.final[first_layer])
    zero = train(template, [Job(jobs[0].init, jobs[0].mask, 0, snapshot_step=0)], digits, spec(5))
    for name in jobs[0].init:  # step 0 is the masked init
        expected = jobs[0].init[name].double()
        if name in jobs[0].mask:
            expected = expected * jobs[0].mask[name]
        assert torch.equal(zero[0].snapshot[name], expected)


def test_grouped_and_looped_convolutions_agree(digits, monkeypatch):
    template, jobs = make_jobs("conv2", digits, n=2)
    s = spec(steps=4)
    monkeypatch.setattr(SequentialStack, "conv_mode", "grouped")
    grouped = train(template, jobs, digits, s, stack_size=2)
    monkeypatch.setattr(SequentialStack, "conv_mode", "loop")
    looped = train(template, jobs, digits, s, stack_size=2)
    for a, b in zip(grouped, looped, strict=True):
        assert_close(a, b)


LANE_KINDS = ["processes", "threads"]


@pytest.mark.parametrize("kind", LANE_KINDS)
def test_stacks_cut_evenly_and_train_side_by_side(digits, kind, monkeypatch):
    monkeypatch.setenv("TICKETLAB_LANES", kind)
    template, jobs = make_jobs("lenet_300_100", digits, n=5)
    assert trainer._chunk_bounds(template, 5, None, 2) == [(0, 3), (3, 5)]
    assert trainer._chunk_bounds(template, 5, 2, 2) == [(0, 2), (2, 4), (4, 5)]
    assert trainer._chunk_bounds(template, 40, None, 2) == [(i, i + 10) for i in range(0, 40, 10)]
    assert chunk_count(template, 5, 1) == 5
    s = spec(steps=20)
    ticks: list[int] = []
    side_by_side = train(template, jobs, digits, s, stack_size=2, progress=ticks.append, lanes=2)
    assert sum(ticks) == 20 * 5
    one_after_another = train(template, jobs, digits, s, stack_size=2, lanes=1)
    for a, b in zip(side_by_side, one_after_another, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("kind", LANE_KINDS)
def test_side_by_side_stacks_checkpoint_and_resume(digits, kind, monkeypatch):
    """In processes the children's checkpoints reach the parent's checkpointers (which write
    them), and a resume from them is bit-identical."""
    monkeypatch.setenv("TICKETLAB_LANES", kind)
    template, jobs = make_jobs("lenet_300_100", digits, n=4)
    s = spec(steps=30, dtype="float32")
    assert chunk_count(template, len(jobs), None, lanes=2) == 2
    first = [MemoryCheckpointer(every=10) for _ in range(2)]
    full = train(template, jobs, digits, s, checkpointers=first, lanes=2)
    resumed = train(
        template,
        jobs,
        digits,
        s,
        checkpointers=[MemoryCheckpointer(10, c.saved[1]) for c in first],
        lanes=2,
    )
    assert [[st["step"] for st in c.saved] for c in first] == [[10, 20, 30]] * 2
    for a, b in zip(full, resumed, strict=True):
        assert_identical(a, b)


@pytest.mark.parametrize("kind", LANE_KINDS)
def test_a_failing_stack_stops_the_others(digits, kind, monkeypatch):
    monkeypatch.setenv("TICKETLAB_LANES", kind)
    template, jobs = make_jobs("lenet_300_100", digits, n=2)
    broken = Job({k: v[..., :3] for k, v in jobs[1].init.items()}, jobs[1].mask, 1)
    ticks: list[int] = []
    with pytest.raises(NotStackable):  # the broken job's error, not a cancellation
        train(
            template, [jobs[0], broken], digits, spec(steps=20_000), progress=ticks.append, lanes=2
        )
    assert sum(ticks) < 10_000  # the healthy stack stopped long before its 20,000 steps


def test_late_rewinding_positions_schedule_and_data_at_step_k(digits, monkeypatch):
    """A job with ``start_step=k`` trains steps k..T-1: the learning rate of step s is the
    schedule's at s (warmup and milestones are not restarted), the batch of step s is its data
    seed's batch of step s, and it equals a plain PyTorch loop written here."""
    template, jobs = make_jobs("lenet_300_100", digits, n=1)
    job = Job(jobs[0].init, jobs[0].mask, data_seed=11, start_step=13)
    s = spec(steps=30, optimizer="sgd", lr=0.05, warmup_steps=16, milestones=(20, 25), gamma=0.5)
    seen_lr: list[float] = []
    real = trainer.make_optimizer

    def recording(params, spec_):
        opt = real(params, spec_)
        step = opt.step
        opt.step = lambda: (seen_lr.append(opt.param_groups[0]["lr"]), step())[1]
        return opt

    monkeypatch.setattr(trainer, "make_optimizer", recording)
    (res,) = train(template, [job], digits, s)
    # by hand: warmup (s+1)/16 up to step 15, then 1; x0.5 from step 20, x0.25 from step 25
    expected = [0.05 * (st + 1) / 16 for st in range(13, 16)]
    expected += [0.05] * 4 + [0.025] * 5 + [0.0125] * 5
    assert seen_lr == pytest.approx(expected, rel=1e-15, abs=0)
    assert res.curve["iteration"] == [13.0, 20.0, 30.0]

    # the reference: steps 13..29, batch of step st = epoch_permutation(seed, st // 8) slice
    net = copy.deepcopy(template).double()
    net.load_state_dict({n: t.double() for n, t in job.init.items()})
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in job.mask:
                p.mul_(job.mask[n])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = digits.x_train.double(), digits.y_train
    for st in range(13, 30):
        perm = trainer.epoch_permutation(11, st // 8, 128)[(st % 8) * 16 : (st % 8 + 1) * 16]
        for group in opt.param_groups:
            group["lr"] = expected[st - 13]
        opt.zero_grad()
        F.cross_entropy(net(x[perm]), y[perm]).backward()
        opt.step()
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in job.mask:
                    p.mul_(job.mask[n])
    for n, t in net.state_dict().items():
        torch.testing.assert_close(res.final[n], t, rtol=0, atol=TOL)


def test_late_rewinding_resume_is_bit_identical(digits):
    template, jobs = make_jobs("lenet_300_100", digits, n=3, start_step=5)
    s = spec(steps=20, dtype="float32", warmup_steps=8, milestones=(12,))
    first = MemoryCheckpointer(every=6)
    full = train_stack(template, jobs, digits, s, checkpointer=first)
    assert [state["step"] for state in first.saved] == [6, 12, 18]
    for saved in first.saved:
        resumed = train_stack(template, jobs, digits, s, checkpointer=MemoryCheckpointer(6, saved))
        for a, b in zip(full, resumed, strict=True):
            assert_identical(a, b)
    # a checkpoint of another start step is not resumed from: the stack trains from its start
    other = [Job(j.init, j.mask, j.data_seed, start_step=0) for j in jobs]
    fresh = train_stack(
        template, other, digits, s, checkpointer=MemoryCheckpointer(6, first.saved[0])
    )
    plain = train_stack(template, other, digits, s)
    for a, b in zip(fresh, plain, strict=True):
        assert_identical(a, b)


def test_jobs_of_different_start_steps_train_in_separate_stacks(digits):
    template, base = make_jobs("lenet_300_100", digits, n=4)
    jobs = [
        Job(j.init, j.mask, j.data_seed, start_step=k)
        for j, k in zip(base, (0, 9, 0, 9), strict=True)
    ]
    s = spec(steps=20)
    together = train(template, jobs, digits, s, stack_size=4)
    alone = [train(template, [j], digits, s)[0] for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert_close(a, b)
    assert chunk_count(template, 4, 4, start_steps=[0, 9, 0, 9]) == 2
    with pytest.raises(ValueError, match="start_step"):
        train(template, [Job(base[0].init, base[0].mask, 0, start_step=20)], digits, s)
