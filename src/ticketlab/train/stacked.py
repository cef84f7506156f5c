"""K networks of one architecture held as batched tensors, so they train as one.

Training many masked copies side by side (replicates, controls, sparsities) turns many small matmuls
into a few large batched ones, which is where a CPU's throughput is. Each copy keeps its own
parameters, mask, data order and optimizer state: stacking changes only how the arithmetic is
grouped, never what is computed.

Three implementations, picked by ``stack_networks``:

* ``SequentialStack`` — an ``nn.Sequential`` of Linear/Conv2d/pooling/activation layers: Linear as
  ``baddbmm`` with weights stored ``[K, in, out]`` (gradients arrive contiguous, are not copied)
  or, once ``sparsify`` finds its masks sparse enough, as one block-diagonal CSR matrix holding
  only the survivors (``sparse_linear``),
  Conv2d as K ordinary convolutions over the stack's blocks of rows (``conv_mode = "loop"``, the
  faster on CPU) or as one grouped convolution with ``groups=K`` (``"grouped"``).
* ``VmapStack`` — any functional ``nn.Module``: ``torch.func.vmap`` over ``functional_call``.
* ``SingleNetwork`` — anything else (BatchNorm in train mode, dropout): one network, no stacking.

All expose ``params`` (leaf tensors, working layout), ``forward(x)`` for a batch per network,
``forward_shared(x)`` for one batch seen by all networks, and conversion to and from the canonical
per-network ``state_dict`` layout.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .sparse_linear import SPARSE_BELOW, BlockPattern, sparse_linear

State = dict[str, torch.Tensor]

_CHANNEL_LOCAL = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
)


class NotStackable(Exception):
    """This architecture cannot be trained K-at-a-time by this implementation."""


def _stack(states: Sequence[Mapping[str, torch.Tensor]], name: str, dtype: torch.dtype):
    return torch.stack([s[name] for s in states]).to(dtype)


class SequentialStack:
    """Hand-batched ``nn.Sequential``: the fast path for the paper's MLPs and conv nets."""

    uses_rng = False

    #: How K stacked Conv2d layers run: "grouped" (one convolution with ``groups=K``) or "loop"
    #: (K ordinary convolutions). Same arithmetic per network; benchmarks/throughput.py times both.
    conv_mode = "loop"

    def __init__(self, template: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], dtype):
        if not isinstance(template, nn.Sequential):
            raise NotStackable("not an nn.Sequential")
        for layer in template:
            ok = isinstance(layer, _CHANNEL_LOCAL)
            ok |= isinstance(layer, nn.Linear)
            ok |= isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1
            ok |= (
                isinstance(layer, nn.Conv2d)
                and layer.groups == 1
                and layer.padding_mode == "zeros"
                and isinstance(layer.padding, tuple)
            )
            if not ok or any(True for _ in layer.buffers()):
                raise NotStackable(f"layer {layer} has no batched implementation")
        self.layers = list(template)
        self.size = len(states)
        self._linear_weights = {
            f"{i}.weight" for i, layer in enumerate(self.layers) if isinstance(layer, nn.Linear)
        }
        self._linear_biases = {
            f"{i}.bias" for i, layer in enumerate(self.layers) if isinstance(layer, nn.Linear)
        }
        self._patterns: dict[str, BlockPattern] = {}
        names = [n for n, _ in template.named_parameters()]
        self.params: State = {
            n: self.to_working(n, _stack(states, n, dtype)).contiguous().requires_grad_()
            for n in names
        }

    def sparsify(self, keep: Mapping[str, torch.Tensor], below: float = SPARSE_BELOW) -> set[str]:
        """Hold the Linear weights whose masks (``keep[name]``: ``[K, out, in]``) each keep less
        than ``below`` of their entries as their survivors only; returns those names.

        Every network must be sparse enough, so a network's path depends on its own mask alone
        (as in an IMP level, where all share one density), and a dense one is never slowed down.
        Call before the optimizer is built: from here on those parameters are the survivors'
        values, and the pruned entries no longer exist (no mask needs re-applying to them).
        """
        chosen = set()
        for name, mask in keep.items():
            densest = float(mask.flatten(1).float().mean(1).max())
            if name in self._linear_weights and densest < below:
                with torch.no_grad():
                    dense = self.to_canonical(name, self.params[name])
                    self._patterns[name] = pattern = BlockPattern(mask)
                    self.params[name] = pattern.gather(dense).contiguous().requires_grad_()
                chosen.add(name)
        return chosen

    def to_working(self, name: str, canonical: torch.Tensor) -> torch.Tensor:
        if name in self._patterns:
            return self._patterns[name].gather(canonical)
        if name in self._linear_weights:
            return canonical.transpose(1, 2)
        if name in self._linear_biases:
            return canonical.unsqueeze(1)
        return canonical

    def to_canonical(self, name: str, working: torch.Tensor) -> torch.Tensor:
        if name in self._patterns:
            return self._patterns[name].scatter(working)
        if name in self._linear_weights:
            return working.transpose(1, 2)
        if name in self._linear_biases:
            return working.squeeze(1)
        return working

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [K, B, *input_shape] -> logits [K, B, classes].

        Between layers ``h`` is ``[K, B, features]`` for dense Linear layers, ``[K, features, B]``
        ("features_first") for sparse ones (see ``sparse_linear``), and for convolutions either
        ``[B, K*C, H, W]`` (grouped: the channels of net k are group k) or ``[K*B, C, H, W]`` (loop:
        the rows of net k are block k); pooling and activations act per channel, so they run on
        either layout unchanged.
        """
        k, batch = x.shape[:2]
        h, layout, fresh = x, "flat", False
        grouped = self.conv_mode == "grouped"
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.Conv2d):
                w = self.params[f"{i}.weight"]
                b = self.params.get(f"{i}.bias")
                if grouped:
                    if layout == "flat":
                        h = h.transpose(0, 1).reshape(batch, k * h.shape[2], *h.shape[3:])
                        layout = "grouped"
                    h = F.conv2d(
                        h,
                        w.reshape(k * w.shape[1], *w.shape[2:]),
                        None if b is None else b.reshape(-1),
                        layer.stride,
                        layer.padding,
                        layer.dilation,
                        groups=k,
                    )
                else:
                    if layout == "flat":
                        h = h.reshape(k * batch, *h.shape[2:])
                        layout = "loop"
                    ws, bs = w.unbind(0), (None,) * k if b is None else b.unbind(0)
                    h = torch.cat(
                        [
                            F.conv2d(hk, ws[j], bs[j], layer.stride, layer.padding, layer.dilation)
                            for j, hk in enumerate(h.split(batch))
                        ]
                    )
                fresh = True
            elif isinstance(layer, nn.Linear):
                w = self.params[f"{i}.weight"]
                b = self.params.get(f"{i}.bias")
                pattern = self._patterns.get(f"{i}.weight")
                if pattern is not None:
                    if layout != "features_first":
                        h, layout = h.transpose(1, 2), "features_first"
                    h = sparse_linear(h, w, b, pattern)
                else:
                    if layout == "features_first":  # a view: bmm reads it transposed, no copy
                        h, layout = h.transpose(1, 2), "flat"
                    h = torch.bmm(h, w) if b is None else torch.baddbmm(b, h, w)
                fresh = True
            elif isinstance(layer, nn.Flatten):
                if layout == "grouped":
                    h = h.reshape(batch, k, -1).transpose(0, 1)
                else:
                    h = h.reshape(k, batch, -1)
                layout, fresh = "flat", False
            elif isinstance(layer, nn.ReLU) and fresh:
                # the output of a Linear/Conv is ours and neither backward needs it: no new tensor
                h = torch.relu_(h)
            else:
                h = layer(h)
                fresh = False
        return h.transpose(1, 2) if layout == "features_first" else h

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x.unsqueeze(0).expand(self.size, *x.shape))

    def set_training(self, mode: bool) -> None:
        """No layer here behaves differently in training and evaluation."""

    def stacked_buffers(self) -> State:
        return {}


class VmapStack:
    """Generic path for any functional module: ``vmap`` over ``functional_call``."""

    uses_rng = False  # vmap refuses random operations

    def __init__(self, template: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], dtype):
        self.template = copy.deepcopy(template).to(dtype)
        self.size = len(states)
        names = [n for n, _ in self.template.named_parameters()]
        self.params: State = {n: _stack(states, n, dtype).requires_grad_() for n in names}
        self.buffers: State = {
            n: _stack(states, n, b.dtype) for n, b in self.template.named_buffers()
        }

        def call(p: State, b: State, x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, (p, b), (x,))

        self._per_batch = vmap(call, in_dims=(0, 0, 0))
        self._shared = vmap(call, in_dims=(0, 0, None))

    def sparsify(self, keep: Mapping[str, torch.Tensor], below: float = SPARSE_BELOW) -> set[str]:
        """No sparse path here: every parameter stays dense (and masked after each step)."""
        return set()

    def to_working(self, name: str, canonical: torch.Tensor) -> torch.Tensor:
        return canonical

    def to_canonical(self, name: str, working: torch.Tensor) -> torch.Tensor:
        return working

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._per_batch(self.params, self.buffers, x)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared(self.params, self.buffers, x)

    def set_training(self, mode: bool) -> None:
        self.template.train(mode)

    def stacked_buffers(self) -> State:
        return self.buffers


class SingleNetwork:
    """No stacking: one network through its own ``forward`` (BatchNorm, dropout, anything)."""

    def __init__(self, template: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], dtype):
        if len(states) != 1:
            raise NotStackable("SingleNetwork holds exactly one network")
        self.module = copy.deepcopy(template).to(dtype)
        self.module.load_state_dict({k: v.to(dtype) for k, v in states[0].items()}, strict=False)
        self.uses_rng = has_randomness(self.module)
        self.size = 1
        self.params: State = {
            n: p.detach().unsqueeze(0).clone().requires_grad_()
            for n, p in self.module.named_parameters()
        }
        self.buffers: State = dict(self.module.named_buffers())

    def sparsify(self, keep: Mapping[str, torch.Tensor], below: float = SPARSE_BELOW) -> set[str]:
        """No sparse path here: every parameter stays dense (and masked after each step)."""
        return set()

    def to_working(self, name: str, canonical: torch.Tensor) -> torch.Tensor:
        return canonical

    def to_canonical(self, name: str, working: torch.Tensor) -> torch.Tensor:
        return working

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {n: p[0] for n, p in self.params.items()}
        return functional_call(self.module, (params, self.buffers), (x[0],)).unsqueeze(0)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x.unsqueeze(0))

    def set_training(self, mode: bool) -> None:
        self.module.train(mode)

    def stacked_buffers(self) -> State:
        """The live buffers (BatchNorm statistics) with a leading network axis of one (views)."""
        return {n: b.unsqueeze(0) for n, b in self.buffers.items()}


Stack = SequentialStack | VmapStack | SingleNetwork


def stack_networks(
    template: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    dtype: torch.dtype,
    example_input: torch.Tensor,
) -> Stack:
    """The fastest implementation that is exact for this architecture.

    ``example_input`` ([B, *input_shape]) is pushed through once so a module that vmap cannot batch
    (in-place buffer updates, random ops) is caught here, not mid-training.
    """
    if len(states) == 1 and _has_state_or_randomness(template):
        return SingleNetwork(template, states, dtype)
    for impl in (SequentialStack, VmapStack):
        try:
            stack = impl(template, states, dtype)
            with torch.no_grad():
                stack.forward_shared(example_input[:2].to(dtype))
            return stack
        except NotStackable:
            continue
        except RuntimeError:  # vmap refusing an op: in-place buffer update, randomness
            continue
    raise NotStackable(f"{type(template).__name__} must be trained one network at a time")


def _has_state_or_randomness(module: nn.Module) -> bool:
    return any(True for _ in module.buffers()) or has_randomness(module)


def has_randomness(module: nn.Module) -> bool:
    """Whether training draws from torch's global random generator (dropout)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())


#: Bytes training holds per parameter and network: the weight, its gradient and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16
MAX_STACK = 16


def max_stack_size(template: nn.Module, available_bytes: int | None = None) -> int:
    """How many copies can share a stack: 1 for modules with state or randomness; otherwise up
    to 16, fewer when their training state would not fit in a quarter of the available memory
    (``available_bytes``, default: what the OS reports). A quarter, because stacks train two at a
    time on two cores and activations need room as well. The paper's models never hit the cap; a
    user's large module gets smaller stacks instead of running out of memory."""
    if _has_state_or_randomness(template):
        return 1
    available = available_memory() if available_bytes is None else available_bytes
    if available is None:
        return MAX_STACK
    per_network = TRAINING_BYTES_PER_PARAMETER * sum(p.numel() for p in template.parameters())
    return max(1, min(MAX_STACK, available // 4 // max(1, per_network)))


def available_memory() -> int | None:
    """Bytes the kernel reports available (``MemAvailable``, Linux); None where it cannot tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def canonical_states(stack: Stack) -> list[State]:
    """Per-network ``state_dict``-layout copies of the stack's parameters and buffers (detached)."""
    return [canonical_state(stack, k) for k in range(stack.size)]


def canonical_state(stack: Stack, k: int) -> State:
    """Network ``k``'s ``state_dict``-layout copy of its parameters and buffers (detached)."""
    with torch.no_grad():
        state = {n: stack.to_canonical(n, p)[k].detach().clone() for n, p in stack.params.items()}
        state.update({n: b[k].detach().clone() for n, b in stack.stacked_buffers().items()})
        return state
