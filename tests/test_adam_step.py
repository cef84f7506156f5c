"""The direct fused-Adam step is `Adam(fused=True).step` to the bit, or is that step."""

from __future__ import annotations

import torch

from ticketlab.train.adam_step import direct_adam


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
        assert direct_adam(optimizer) == optimizer.step
