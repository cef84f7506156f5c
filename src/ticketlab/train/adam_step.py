"""One fused Adam update without ``torch.optim.Adam.step``'s per-call Python.

Why: a small stack's step (the MNIST-1D MLP, LeNet-300-100's sparse levels) spends about 0.1-0.2
ms of each 1-4 ms step inside ``Adam.step`` *around* its kernel (``benchmarks/step_parts.py``):
re-reading the param group, the state dict of every parameter, grouping the tensors by device and
dtype. The kernel itself,
``torch._fused_adam_``, is what ``Adam(fused=True)`` calls; calling it directly on lists built once
does the same arithmetic on the same tensors, so the weights and the optimizer's state (and its
``state_dict``, hence checkpoints and resume) are the same bits (``tests/test_adam_step.py``).

``torch._fused_adam_`` is not public API. ``direct_adam`` therefore takes the direct path only
when the optimizer is a plain fused Adam (one group, one device and dtype, no amsgrad, maximize,
capturable or differentiable) and the kernel, called on a scratch tensor, does exactly what
``Adam.step`` does; anything else, or a torch whose kernel has moved, gets ``optimizer.step``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

Step = Callable[[], None]


def direct_adam(optimizer: torch.optim.Optimizer) -> Step:
    """A callable doing ``optimizer.step()``; the direct kernel call where it is exact (above).

    The first call is ``optimizer.step()`` itself, which creates the state the later direct calls
    update in place; after ``load_state_dict`` build a new stepper (the state tensors change)."""
    if not _plain_fused_adam(optimizer) or not _kernel_matches_step():
        return optimizer.step
    return _DirectAdam(optimizer)


class _DirectAdam:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params: list[torch.Tensor] = list(self.group["params"])
        self.state: tuple[list[torch.Tensor], ...] | None = None

    def __call__(self) -> None:
        grads = [p.grad for p in self.params]
        if self.state is None or any(g is None for g in grads):
            # torch's own step: creates the state, or skips parameters without a gradient
            self.optimizer.step()
            if all(p in self.optimizer.state for p in self.params):
                states = [self.optimizer.state[p] for p in self.params]
                self.state = tuple(
                    [s[key] for s in states] for key in ("exp_avg", "exp_avg_sq", "step")
                )
            return
        exp_avgs, exp_avg_sqs, steps = self.state
        group = self.group
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            self.params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


def _plain_fused_adam(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    plain = group.get("fused") and not any(
        group.get(flag)
        for flag in ("amsgrad", "maximize", "capturable", "differentiable", "foreach")
    )
    plain = plain and not group.get("decoupled_weight_decay", False)
    params = group["params"]
    kinds = {(p.device, p.dtype) for p in params}
    return bool(
        plain
        and params
        and len(kinds) == 1
        and not isinstance(group["lr"], torch.Tensor)
        and all(isinstance(b, float) for b in group["betas"])
        and hasattr(torch, "_fused_adam_")
    )


@functools.cache
def _kernel_matches_step() -> bool:
    """Whether the direct call reproduces ``Adam(fused=True).step`` on a scratch tensor (three
    steps, weight decay on): a torch that renamed or changed the kernel fails here, not in
    training."""
    try:
        g = torch.Generator().manual_seed(0)
        start = torch.randn(33, generator=g)
        grads = [torch.randn(33, generator=g) for _ in range(3)]
        reference = start.clone().requires_grad_()
        direct = start.clone().requires_grad_()
        options = {"lr": 0.01, "weight_decay": 0.1, "fused": True}
        by_step = torch.optim.Adam([reference], **options)
        stepper = _DirectAdam(torch.optim.Adam([direct], **options))
        for grad in grads:
            reference.grad, direct.grad = grad.clone(), grad.clone()
            by_step.step()
            stepper()
        state = stepper.optimizer.state[direct]
        return torch.equal(reference, direct) and all(
            torch.equal(by_step.state[reference][key], state[key])
            for key in ("exp_avg", "exp_avg_sq", "step")
        )
    except (AttributeError, RuntimeError, TypeError):
        return False
