"""The direct fused-Adam step is `Adam(fused=True).step` to the bit, or is that step; with masks,
it is that step followed by the masks' multiplication, to the bit."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import pytest
import torch

from ticketlab.train import sparse_kernel
from ticketlab.train.adam_step import _masking_kernel_matches, _step_then_mask, direct_adam


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_() for shape in ((7, 5), (5,), (3, 1, 5))]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _step_both(i, ours, theirs, step, reference, without_grad: int | None = None) -> None:
    """Step ``i``: the same gradients on both sides (none for parameter ``without_grad``), then the
    direct step on ``ours`` and torch's on ``theirs``."""
    for j, (p, q, grad) in enumerate(zip(ours, theirs, _grads(i, ours), strict=True)):
        p.grad, q.grad = (None, None) if j == without_grad else (grad.clone(), grad.clone())
    step()
    reference.step()


def _assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)


def _state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s[key] for s in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq", "step")]


def test_direct_steps_equal_torchs_with_lr_changes_and_weight_decay():
    ours, theirs = _params(), _params()
    options = {"lr": 0.01, "weight_decay": 0.05, "betas": (0.8, 0.95), "fused": True}
    mine, reference = torch.optim.Adam(ours, **options), torch.optim.Adam(theirs, **options)
    step = direct_adam(mine)
    assert step != mine.step  # the direct path was taken
    for i in range(25):
        for group in (*mine.param_groups, *reference.param_groups):
            group["lr"] = 0.01 * 0.9 ** (i // 5)  # as the trainer's schedules set it
        _step_both(i, ours, theirs, step, reference)
    _assert_same(ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(_state(mine), _state(reference), strict=True))
    assert str(mine.state_dict()) == str(reference.state_dict())


def test_a_resumed_optimizer_continues_with_the_same_bits():
    """After ``load_state_dict`` (a resume) a new stepper updates the loaded state tensors."""
    ours, theirs = _params(), _params()
    mine = torch.optim.Adam(ours, lr=0.01, fused=True)
    reference = torch.optim.Adam(theirs, lr=0.01, fused=True)
    step = direct_adam(mine)
    for i in range(4):
        _step_both(i, ours, theirs, step, reference)
    resumed = torch.optim.Adam(ours, lr=0.01, fused=True)
    resumed.load_state_dict(mine.state_dict())
    step = direct_adam(resumed)
    for i in range(4, 8):
        _step_both(i, ours, theirs, step, reference)
    _assert_same(ours, theirs)


def test_a_parameter_without_gradient_takes_torchs_step():
    ours, theirs = _params(), _params()
    mine = torch.optim.Adam(ours, lr=0.01, fused=True)
    reference = torch.optim.Adam(theirs, lr=0.01, fused=True)
    step = direct_adam(mine)
    for i in range(6):
        _step_both(i, ours, theirs, step, reference, without_grad=1 if i == 3 else None)
    _assert_same(ours, theirs)


def test_other_optimizers_keep_their_own_step():
    params = _params()
    for optimizer in (
        torch.optim.Adam(params, amsgrad=True, fused=True),
        torch.optim.Adam(params),  # not fused: another arithmetic
        torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
        torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], fused=True),
    ):
        step = direct_adam(optimizer)
        assert isinstance(step, functools.partial) and step.args[0] == optimizer.step


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# one-pass sized: whole 16-float vectors, whole vectors and a tail; too small for it; not masked
MASKED_SHAPES = ((4, 64, 65), (41, 401), (3,), (6, 8))


def _masked_run(steps: int, options: dict, direct: bool) -> tuple[list, torch.optim.Optimizer, Any]:
    """``steps`` steps with masks on the first three parameters (lr changing as a schedule sets
    it, ~5% of the gradients exactly zero, magnitudes from 1e-6 to 10): the direct stepper, or
    torch's ``Adam.step`` then ``mul_``."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g).requires_grad_() for s in MASKED_SHAPES]
    keeps = [(torch.rand(s, generator=g) < 0.3).float() for s in MASKED_SHAPES[:3]]
    with torch.no_grad():
        for p, keep in zip(params, keeps, strict=False):
            p.mul_(keep)
    optimizer = torch.optim.Adam(params, fused=True, **options)
    masks = list(zip(params, keeps, strict=False))
    step = (
        direct_adam(optimizer, masks)
        if direct
        else functools.partial(_step_then_mask, optimizer.step, masks)
    )
    for i in range(steps):
        optimizer.param_groups[0]["lr"] = options["lr"] * 0.9 ** (i // 5)
        for p in params:
            scale = 10.0 ** torch.randint(-6, 2, p.shape, generator=g)
            p.grad = (
                torch.randn(p.shape, generator=g)
                * scale
                * (torch.rand(p.shape, generator=g) > 0.05)
            )
        step()
    return params, optimizer, step


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 0.01},
        {"lr": 0.003, "weight_decay": 0.05, "betas": (0.8, 0.95), "eps": 1e-6},
        {"lr": 0.01, "betas": (0.3, 0.999)},  # lerp's other branch: the kernel must refuse it
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_masked_steps_equal_torchs_step_then_the_masks(options, threads):
    with _threads(threads):
        ours, mine, step = _masked_run(25, options, direct=True)
        theirs, reference, _ = _masked_run(25, options, direct=False)
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p.detach().view(torch.int32), q.detach().view(torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(_state(mine), _state(reference), strict=True))
    taken = threads == 1 and options.get("betas", (0.9,))[0] > 0.5 and sparse_kernel.load()
    assert step.one_pass == ([True, True, False, False] if taken else [False] * 4)
    start = _masked_run(0, options, direct=False)[0]
    for p, p0 in zip(ours[:3], start[:3], strict=True):
        assert bool((p[p0 == 0] == 0).all())  # pruned weights stayed zero
        assert bool((p[p0 != 0] != p0[p0 != 0]).all())  # and the kept ones trained


def test_the_one_pass_kernel_check_refuses_what_it_does_not_reproduce():
    if sparse_kernel.load() is None:
        pytest.skip("no C compiler: the one-pass kernel is never used")
    assert _masking_kernel_matches(0.9, 0.999, 1e-8, 0.0)
    assert not _masking_kernel_matches(0.3, 0.999, 1e-8, 0.0)  # lerp from the other end
