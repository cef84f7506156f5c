"""K networks of any architecture run as one module, each network's batch a block of rows.

Why rows: K networks' activations laid out network-major along the batch dimension (``[K*B, ...]``)
pass unchanged through whatever a forward does to each sample on its own: residual adds,
activations, pooling, channel concatenation and padding, ``flatten``, ``view(x.size(0), -1)``. So
the user's own ``forward`` runs as written, on a copy of the module in which only the layers that
hold weights, statistics or random draws are swapped for units that know about K:

* ``nn.Linear``: one batched matmul over ``[K, rows, in]`` (``baddbmm``), or the block-sparse
  product once its masks are sparse (``sparse_linear``);
* ``nn.Conv1d/2d/3d``: K convolutions over the blocks of rows (``conv_mode = "loop"``) or one
  grouped convolution with ``groups=K`` over the networks' channels side by side (``"grouped"``);
* ``nn.BatchNorm1d/2d/3d``: K batch norms, one per block, each over its own network's batch and
  with its own running statistics, which are exactly what the network computes alone;
* any other module holding parameters or buffers (LayerNorm, Embedding, a module with raw
  ``nn.Parameter``s) and random layers (``nn.Dropout``, ``nn.RReLU``): called once per network on
  its block through ``functional_call``; each network draws from its own random stream, seeded and
  checkpointed per network, so what it draws does not depend on the stack it is in.

A forward that is not per-sample (a mean over the batch, a ``view`` assuming one network, random
numbers drawn outside a module) gives wrong numbers here, silently: ``stacked.plan_stack`` compares
a stack against the networks run alone before using it. ``whole=True`` makes the whole module one
unit: K networks one after another inside each step, which works for anything ``functional_call``
can run (the fallback, with the trainer's other savings: one fused optimizer step, one batch
gather, side-by-side lanes).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .layout import LinearLayout, NotStackable, State, buffer_names, stack_states
from .sparse_linear import sparse_linear

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RANDOM = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _blocks(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The K networks' blocks of rows of ``x`` (network-major)."""
    if x.dim() == 0 or x.shape[0] % k:
        raise NotStackable(f"a tensor of shape {tuple(x.shape)} does not split into {k} networks")
    return x.split(x.shape[0] // k)


def _plain(module: nn.Module, bases: Sequence[type]) -> bool:
    """One of ``bases`` with torch's own forward (a subclass with its own forward is not)."""
    return any(isinstance(module, b) and type(module).forward is b.forward for b in bases)


class _Unit(nn.Module):
    """A layer of the stacked module: reads its tensors from the stack by canonical name."""

    def __init__(self, owner: RowStack, names: dict[str, str]):
        super().__init__()
        self.owner = owner  # not an nn.Module: a plain attribute, not a submodule
        self.names = names  # the layer's own name of each tensor -> the stack's (canonical) name

    def tensor(self, local: str) -> torch.Tensor | None:
        name = self.names.get(local)
        if name is None:
            return None
        return self.owner.params[name] if name in self.owner.params else self.owner.buffers[name]


class _LinearUnit(_Unit):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.owner.size
        w, b = self.tensor("weight"), self.tensor("bias")
        h = x.reshape(k, -1, x.shape[-1])
        pattern = self.owner._patterns.get(self.names["weight"])
        if pattern is not None:
            y = sparse_linear(h.transpose(1, 2), w, b, pattern).transpose(1, 2)
        else:
            y = torch.bmm(h, w) if b is None else torch.baddbmm(b, h, w)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class _ConvUnit(_Unit):
    def __init__(self, owner: RowStack, names: dict[str, str], conv: nn.Module):
        super().__init__(owner, names)
        self.fn = next(fn for base, fn in _CONV.items() if isinstance(conv, base))
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self.pad = conv._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.owner.size
        w, b = self.tensor("weight"), self.tensor("bias")
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.pad, mode=self.padding_mode), 0
        if self.owner.conv_mode == "grouped":
            rows = x.shape[0] // k
            h = x.reshape(k, rows, *x.shape[1:]).transpose(0, 1).reshape(rows, -1, *x.shape[2:])
            y = self.fn(
                h,
                w.reshape(-1, *w.shape[2:]),
                None if b is None else b.reshape(-1),
                self.stride,
                padding,
                self.dilation,
                self.groups * k,
            )
            y = y.reshape(rows, k, -1, *y.shape[2:]).transpose(0, 1)
            return y.reshape(k * rows, *y.shape[2:])
        ws, bs = w.unbind(0), (None,) * k if b is None else b.unbind(0)
        return torch.cat(
            [
                self.fn(xj, ws[j], bs[j], self.stride, padding, self.dilation, self.groups)
                for j, xj in enumerate(_blocks(x, k))
            ]
        )


class _BatchNormUnit(_Unit):
    """``nn.BatchNorm*``'s forward, once per network on its own rows and its own statistics."""

    def __init__(self, owner: RowStack, names: dict[str, str], bn: nn.Module):
        super().__init__(owner, names)
        self.momentum, self.eps = bn.momentum, bn.eps
        self.track = bn.track_running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.owner.size
        w, b = self.tensor("weight"), self.tensor("bias")
        mean, var = self.tensor("running_mean"), self.tensor("running_var")
        count = self.tensor("num_batches_tracked")
        if self.training and self.track and count is not None:
            count.add_(1)
        use_stats = mean is not None and (not self.training or self.track)
        outs = []
        for j, xj in enumerate(_blocks(x, k)):
            factor = 0.0 if self.momentum is None else self.momentum
            if self.training and self.track and count is not None and self.momentum is None:
                factor = 1.0 / float(count[j])
            outs.append(
                F.batch_norm(
                    xj,
                    mean[j] if use_stats else None,
                    var[j] if use_stats else None,
                    None if w is None else w[j],
                    None if b is None else b[j],
                    self.training or mean is None,
                    factor,
                    self.eps,
                )
            )
        return torch.cat(outs)


class _LoopUnit(_Unit):
    """Any module, once per network on its rows, with that network's tensors and random stream."""

    def __init__(self, owner: RowStack, names: dict[str, str], inner: nn.Module):
        super().__init__(owner, names)
        object.__setattr__(self, "inner", inner)  # hidden: its own tensors are never used

    def train(self, mode: bool = True) -> _LoopUnit:
        super().train(mode)
        self.inner.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner, k = self.owner, self.owner.size
        per_net = {local: self.tensor(local).unbind(0) for local in self.names}
        split = [_blocks(a, k) if isinstance(a, torch.Tensor) else (a,) * k for a in args]
        kw_split = {
            key: _blocks(v, k) if isinstance(v, torch.Tensor) else (v,) * k
            for key, v in kwargs.items()
        }
        outs = []
        for j in range(k):
            tensors = {local: values[j] for local, values in per_net.items()}
            call_args = tuple(a[j] for a in split)
            call_kwargs = {key: v[j] for key, v in kw_split.items()}
            if owner.rng is None:
                outs.append(functional_call(self.inner, tensors, call_args, call_kwargs))
                continue
            outside = torch.get_rng_state()
            torch.set_rng_state(owner.rng[j])
            try:
                outs.append(functional_call(self.inner, tensors, call_args, call_kwargs))
                owner.rng[j] = torch.get_rng_state()
            finally:
                torch.set_rng_state(outside)
        return _concat(outs)


def _concat(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)
    if isinstance(first, tuple | list):
        return type(first)(_concat(list(parts)) for parts in zip(*outs, strict=True))
    if first is None:
        return None
    raise NotStackable(f"a layer returns {type(first).__name__}, which does not stack")


class RowStack(LinearLayout):
    """K networks of one architecture as one module over their blocks of rows (see module doc)."""

    #: How K stacked convolutions run: "loop" (K ordinary convolutions, the faster on this CPU) or
    #: "grouped" (one convolution with ``groups=K``); same arithmetic per network.
    conv_mode = "loop"

    def __init__(
        self,
        template: nn.Module,
        states: Sequence[Mapping[str, torch.Tensor]],
        dtype: torch.dtype,
        rng_seeds: Sequence[int] | None = None,
        *,
        whole: bool = False,
    ):
        self.size = len(states)
        module = copy.deepcopy(template).to(dtype)
        canonical = {id(p): n for n, p in module.named_parameters()}
        kept = set(buffer_names(module))
        canonical.update({id(b): n for n, b in module.named_buffers() if n in kept})
        originals = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
        self.rng: list[torch.Tensor] | None = None
        if rng_seeds is not None:
            self.rng = [torch.Generator().manual_seed(int(s)).get_state() for s in rng_seeds]
        linear_weights: set[str] = set()
        linear_biases: set[str] = set()
        kinds: dict[str, str] = {}

        def names_of(unit_module: nn.Module, kind: str) -> dict[str, str]:
            names = {}
            for local, t in [*unit_module.named_parameters(), *unit_module.named_buffers()]:
                if id(t) in canonical:
                    name = canonical[id(t)]
                    if kinds.setdefault(name, kind) != kind:
                        raise NotStackable(f"{name} is shared by layers of different kinds")
                    names[local] = name
            return names

        def convert(mod: nn.Module) -> nn.Module | None:
            if not whole and _plain(mod, [nn.Linear]):
                names = names_of(mod, "linear")
                linear_weights.add(names["weight"])
                if "bias" in names:
                    linear_biases.add(names["bias"])
                return _LinearUnit(self, names)
            if not whole and _plain(mod, list(_CONV)):
                return _ConvUnit(self, names_of(mod, "conv"), mod)
            if not whole and _plain(mod, _BATCH_NORM):
                return _BatchNormUnit(self, names_of(mod, "batch_norm"), mod)
            direct = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
            owns = any(id(t) in canonical for _, t in direct)
            random = self.rng is not None and isinstance(mod, _RANDOM)
            if whole or owns or random:
                return _LoopUnit(self, names_of(mod, f"loop:{id(mod)}"), mod)
            for child_name, child in list(mod.named_children()):
                replacement = convert(child)
                if replacement is not None:
                    mod._modules[child_name] = replacement
            return None

        self.module = convert(module) or module
        if not whole and isinstance(self.module, _LoopUnit):
            raise NotStackable("the module's own forward uses its parameters directly")
        self._init_layout(linear_weights, linear_biases)
        self.params = {
            n: self.to_working(n, stack_states(states, n, dtype, originals[n]))
            .contiguous()
            .requires_grad_()
            for n, _ in template.named_parameters()
        }
        self.buffers: State = {n: stack_states(states, n, dtype, originals[n]) for n in kept}
        self.module.train(template.training)

    @property
    def uses_rng(self) -> bool:
        return self.rng is not None

    def rng_state(self) -> torch.Tensor:
        """Every network's random stream, ``[K, state bytes]`` (for checkpoints)."""
        assert self.rng is not None
        return torch.stack(self.rng)

    def set_rng_state(self, states: torch.Tensor) -> None:
        self.rng = [s.clone() for s in states.unbind(0)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [K, B, *input_shape] -> outputs [K, B, ...]."""
        k, batch = x.shape[:2]
        out = self.module(x.reshape(k * batch, *x.shape[2:]))
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != k * batch:
            raise NotStackable("the module's output does not keep one row per input row")
        return out.reshape(k, batch, *out.shape[1:])

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x.unsqueeze(0).expand(self.size, *x.shape))

    def set_training(self, mode: bool) -> None:
        self.module.train(mode)

    def stacked_buffers(self) -> State:
        return self.buffers


class LoopStack(RowStack):
    """K networks one after another inside each step (``RowStack(whole=True)``): the fallback for
    a module whose forward is not per-sample, exact for anything ``functional_call`` runs."""

    def __init__(
        self,
        template: nn.Module,
        states: Sequence[Mapping[str, torch.Tensor]],
        dtype: torch.dtype,
        rng_seeds: Sequence[int] | None = None,
    ):
        super().__init__(template, states, dtype, rng_seeds, whole=True)
