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

A pruned layer trained dense is multiplied by its mask after every step; the stepper does that too.
Where it can, it runs the update and the multiplication as one pass (``ticketlab_adam`` in
``sparse_kernel.c``): one of the two passes over the weights saved, which makes a pruned
LeNet-300-100 stack's optimizer step ~1.2x faster and its whole step ~1.03x (the step is
memory-bound). Only on the CPU in float32 with one thread, for parameters of ``ONE_PASS_FROM``
weights or more, on whole 16-float vectors (torch steps the few trailing weights), and only after
it reproduced ``Adam.step`` followed by the multiplication bit for bit, in this process, with the
optimizer's own betas, eps and weight decay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from . import sparse_kernel

Step = Callable[[], None]
#: (parameter, its mask as a multiplier of the same shape): zeroed again after every step
Masks = Sequence[tuple[torch.Tensor, torch.Tensor]]
VECTOR = 16  # torch's widest CPU vector (AVX-512): the kernel covers whole ones only
ONE_PASS_FROM = 1 << 14  # weights in a parameter; smaller ones keep torch's update and mul_


def direct_adam(optimizer: torch.optim.Optimizer, masks: Masks = ()) -> Step:
    """A callable doing ``optimizer.step()`` and then ``param.mul_(keep)`` for each of ``masks``;
    the direct kernel call, and the one-pass masked update, where they are exact (above).

    The first call is ``optimizer.step()`` itself, which creates the state the later direct calls
    update in place; after ``load_state_dict`` build a new stepper (the state tensors change)."""
    masks = list(masks)
    if not _plain_fused_adam(optimizer) or not _kernel_matches_step():
        return functools.partial(_step_then_mask, optimizer.step, masks)
    kernel = _masking_kernel(optimizer.param_groups[0]) if masks else None
    return _DirectAdam(optimizer, masks, kernel)


def _step_then_mask(step: Step, masks: Masks) -> None:
    step()
    with torch.no_grad():
        for param, keep in masks:
            param.mul_(keep)


class _DirectAdam:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        masks: Masks,
        kernel: sparse_kernel.CsrKernel | None,
    ):
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params: list[torch.Tensor] = list(self.group["params"])
        self.masks = masks
        keep_of = {id(param): keep for param, keep in masks}
        self.keeps = [keep_of.get(id(param)) for param in self.params]
        self.one_pass = [
            kernel is not None and _one_pass_fits(param, keep)
            for param, keep in zip(self.params, self.keeps, strict=True)
        ]
        self.kernel = kernel if any(self.one_pass) else None
        self.state: tuple[list[torch.Tensor], ...] | None = None

    def __call__(self) -> None:
        grads = [p.grad for p in self.params]
        if self.state is None or any(g is None for g in grads):
            # torch's own step: creates the state, or skips parameters without a gradient
            _step_then_mask(self.optimizer.step, self.masks)
            if all(p in self.optimizer.state for p in self.params):
                states = [self.optimizer.state[p] for p in self.params]
                self.state = tuple(
                    [s[key] for s in states] for key in ("exp_avg", "exp_avg_sq", "step")
                )
                self.one_pass = [  # a resumed state's moments must be laid out as the weights
                    fits and m.is_contiguous() and v.is_contiguous()
                    for fits, m, v in zip(self.one_pass, *self.state[:2], strict=True)
                ]
                self.kernel = self.kernel if any(self.one_pass) else None
            return
        exp_avgs, exp_avg_sqs, steps = self.state
        torch._foreach_add_(steps, 1)
        if self.kernel is None:
            _fused_adam(self.params, grads, exp_avgs, exp_avg_sqs, steps, self.group)
            then_mask = self.masks
        else:
            then_mask = self._one_pass(grads)
        with torch.no_grad():
            for param, keep in then_mask:
                param.mul_(keep)

    def _one_pass(self, grads: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The masked parameters' whole vectors through the one-pass kernel, everything else
        through torch's; returns what is still to be multiplied by its mask."""
        exp_avgs, exp_avg_sqs, steps = self.state
        group = self.group
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])  # p, grad, m, v, step
        then_mask = []
        for i, param in enumerate(self.params):
            tensors = (param, grads[i], exp_avgs[i], exp_avg_sqs[i])
            keep = self.keeps[i]
            if self.one_pass[i]:
                tensors = (param, grads[i].contiguous(), exp_avgs[i], exp_avg_sqs[i])
                whole = param.numel() // VECTOR * VECTOR
                self.kernel.adam(
                    (*tensors, keep),
                    whole,
                    group["lr"],
                    group["betas"],
                    group["eps"],
                    group["weight_decay"],
                    steps[i].item(),
                )
                if whole == param.numel():
                    continue
                tensors = tuple(t.view(-1)[whole:] for t in tensors)  # the tail: torch's
                keep = keep.view(-1)[whole:]
            for into, tensor in zip(lists, (*tensors, steps[i]), strict=True):
                into.append(tensor)
            if keep is not None:
                then_mask.append((tensors[0], keep))
        if lists[0]:
            _fused_adam(*lists, group)
        return then_mask


def _one_pass_fits(param: torch.Tensor, keep: torch.Tensor | None) -> bool:
    """Large enough for the saved pass to outweigh a second call (measured: ~0.1 ms a step lost
    on MNIST-1D's masked biases), and laid out as the kernel reads it."""
    return (
        keep is not None
        and param.numel() >= ONE_PASS_FROM
        and keep.dtype == param.dtype == torch.float32
        and keep.shape == param.shape
        and param.is_contiguous()
        and keep.is_contiguous()
    )


def _fused_adam(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    beta1, beta2 = group["betas"]
    torch._fused_adam_(
        params,
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
        stepper = _DirectAdam(torch.optim.Adam([direct], **options), [], None)
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


def _masking_kernel(group: dict) -> sparse_kernel.CsrKernel | None:
    """The compiled one-pass update where it applies and is exact for these hyperparameters."""
    params = group["params"]
    if torch.get_num_threads() != 1 or not sparse_kernel.enabled():
        return None  # torch's kernel and mask pass use every thread; this kernel uses one
    if params[0].dtype != torch.float32 or params[0].device.type != "cpu":
        return None
    kernel = sparse_kernel.load()
    if kernel is None:
        return None
    beta1, beta2 = group["betas"]
    exact = _masking_kernel_matches(beta1, beta2, group["eps"], group["weight_decay"])
    return kernel if exact else None


@functools.cache
def _masking_kernel_matches(beta1: float, beta2: float, eps: float, weight_decay: float) -> bool:
    """Whether the one-pass update reproduces ``Adam(fused=True).step`` and the mask's
    multiplication, weights and state, bit for bit: three steps on masked tensors of whole vectors,
    with a tail, and too small for the kernel, gradients from 1e-8 to 10 (some exactly zero)."""
    kernel = sparse_kernel.load()
    if kernel is None:
        return False
    g = torch.Generator().manual_seed(0)
    sizes = (ONE_PASS_FROM + VECTOR, ONE_PASS_FROM + 5, 5)  # whole vectors; a tail; too small
    starts = [torch.randn(n, generator=g) for n in sizes]
    keeps = [(torch.rand(n, generator=g) < 0.5).float() for n in sizes]
    options = {"lr": 0.01, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay}
    reference = [s.clone().requires_grad_() for s in starts]
    direct = [s.clone().requires_grad_() for s in starts]
    by_step = torch.optim.Adam(reference, fused=True, **options)
    optimizer = torch.optim.Adam(direct, fused=True, **options)
    stepper = _DirectAdam(optimizer, list(zip(direct, keeps, strict=True)), kernel)
    if stepper.one_pass != [True, True, False]:
        return False
    for _ in range(3):
        for ref, mine in zip(reference, direct, strict=True):
            scale = 10.0 ** torch.randint(-8, 2, ref.shape, generator=g)
            zeros = torch.rand(ref.shape, generator=g) < 0.1
            grad = torch.randn(ref.shape, generator=g) * scale * ~zeros
            ref.grad, mine.grad = grad.clone(), grad.clone()
        _step_then_mask(by_step.step, list(zip(reference, keeps, strict=True)))
        stepper()
    return all(
        torch.equal(a.view(torch.int32), b.view(torch.int32))
        and all(
            torch.equal(by_step.state[a][key], optimizer.state[b][key])
            for key in ("exp_avg", "exp_avg_sq", "step")
        )
        for a, b in zip(reference, direct, strict=True)
    )
