"""A dense MLP stack's forward, loss and gradients computed directly, into buffers it keeps.

Why: for the paper's MLPs (LeNet-300-100's dense levels, the MNIST-1D MLP's dense rounds) a step is
a few batched products, and autograd hands each one a freshly allocated output. Measured here with
the optimizer in the loop (a one-off probe, 300 steps, best of 5, one thread): a LeNet stack of 3
took 3.6 ms a step with its gradients and activations written into buffers that live as long as
the stack, against 4.0-4.3 ms through autograd (1.09-1.17x); MNIST-1D's 40-500-500-10 stack of 2
1.11-1.12x. Without the kept buffers the same direct computation was *slower* than autograd (0.87x
on LeNet): the win is where the products write, not autograd's bookkeeping.

Exactness: every operation is the one autograd runs for ``F.cross_entropy(reduction="none")``
averaged per network, summed and back-propagated through ``baddbmm``/``bmm`` and in-place ReLUs
(``derivatives.yaml``: ``nll_loss_backward``, ``_log_softmax_backward_data``,
``threshold_backward``, the bias gradient summed over the batch, ``batch1ᵀ @ grad`` and
``grad @ batch2ᵀ``), on the same operands, so the loss and every gradient are the same bits
(tested against autograd, and a training run against one with this path switched off). Only
stacks that are exactly such an MLP take it: dense ``Linear`` layers with ReLUs between them after
an optional ``Flatten``, class labels, no autocast or gradient scaler; anything else (sparse
layers, convolutions, sequences) goes through autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .stacked import SequentialStack

_ATEN = torch.ops.aten
_REDUCTION_NONE, _IGNORE_INDEX = 0, -100


@dataclass
class _Layer:
    weight: torch.Tensor  # [K, in, out], a leaf of the stack
    bias: torch.Tensor | None  # [K, 1, out]
    relu: bool  # followed by a ReLU


class MlpStep:
    """``step(x, y)``: the per-network mean cross-entropy ``[K]``; the parameters' ``.grad`` hold
    its gradients (of the sum over networks), in buffers reused at every step."""

    def __init__(self, layers: list[_Layer], flatten: bool):
        self.layers, self.flatten = layers, flatten
        self.outputs: list[torch.Tensor] = []
        self.input_grads: list[torch.Tensor] = []
        self.seed = torch.empty(0)  # the loss's gradient per sample, see _buffers

    @classmethod
    def for_stack(cls, stack: object, labels: torch.Tensor, mixed: bool) -> MlpStep | None:
        """The direct step for ``stack`` if it is a dense MLP trained on class ``labels`` in one
        precision; else None (autograd)."""
        if type(stack) is not SequentialStack or mixed:
            return None
        if labels.dim() != 1 or labels.dtype != torch.long:  # class indices, one per sample
            return None
        if stack._patterns or stack._folded_relus:
            return None
        layers: list[_Layer] = []
        flatten = False
        for name, layer in zip(stack.names, stack.layers, strict=True):
            if isinstance(layer, nn.Flatten) and not layers and not flatten:
                flatten = True
            elif type(layer) is nn.Linear:
                weight = stack.params[f"{name}.weight"]
                layers.append(_Layer(weight, stack.params.get(f"{name}.bias"), relu=False))
            elif type(layer) is nn.ReLU and layers and not layers[-1].relu:
                layers[-1].relu = True
            else:
                return None
        if not layers or layers[-1].relu:
            return None
        return cls(layers, flatten)

    def _buffers(self, k: int, batch: int, like: torch.Tensor) -> None:
        if self.outputs and self.outputs[0].shape[:2] == (k, batch):
            return
        widths = [layer.weight.shape[2] for layer in self.layers]
        self.outputs = [like.new_empty(k, batch, w) for w in widths]
        self.input_grads = [like.new_empty(k, batch, w) for w in widths[:-1]]
        # backward of the per-network means' sum: 1/B for every sample, as autograd computes it
        self.seed = (like.new_ones(k).unsqueeze(1).expand(k, batch) / batch).reshape(-1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, batch = x.shape[:2]
        h = x.reshape(k, batch, -1) if self.flatten else x
        self._buffers(k, batch, h)
        inputs = [h]
        for layer, out in zip(self.layers, self.outputs, strict=True):
            if layer.bias is None:
                h = torch.bmm(h, layer.weight, out=out)
            else:
                h = torch.baddbmm(layer.bias, h, layer.weight, out=out)
            if layer.relu:
                h = torch.relu_(h)
            inputs.append(h)
        classes = h.shape[-1]
        log_probs = torch._log_softmax(h.reshape(-1, classes), 1, False)
        losses, total_weight = _ATEN.nll_loss_forward(
            log_probs, y, None, _REDUCTION_NONE, _IGNORE_INDEX
        )
        per_net_loss = losses.view(k, -1).mean(dim=1)
        grad = _ATEN.nll_loss_backward(
            self.seed, log_probs, y, None, _REDUCTION_NONE, _IGNORE_INDEX, total_weight
        )
        grad = _ATEN._log_softmax_backward_data(grad, log_probs, 1, log_probs.dtype)
        grad = grad.view(k, batch, classes)
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if layer.bias is not None:
                torch.sum(grad, 1, keepdim=True, out=_grad_buffer(layer.bias))
            torch.bmm(inputs[i].transpose(1, 2), grad, out=_grad_buffer(layer.weight))
            if i > 0:
                below = self.input_grads[i - 1]
                torch.bmm(grad, layer.weight.transpose(1, 2), out=below)
                if self.layers[i - 1].relu:
                    relu_grad = _ATEN.threshold_backward.grad_input
                    below = relu_grad(below, inputs[i], 0, grad_input=below)
                grad = below
        return per_net_loss


def _grad_buffer(param: torch.Tensor) -> torch.Tensor:
    """``param.grad``, made once and then written over (unless something set it to None)."""
    if param.grad is None:
        param.grad = torch.empty_like(param)
    return param.grad
