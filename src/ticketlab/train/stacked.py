"""K networks of one architecture held as batched tensors, so they train as one.

Training many masked copies side by side (replicates, controls, sparsities) turns many small matmuls
into a few large batched ones, which is where a CPU's throughput is. Each copy keeps its own
parameters, mask, data order, optimizer state and random stream: stacking changes only how the
arithmetic is grouped, never what is computed.

Four implementations; ``plan_stack`` picks the first that computes, on a probe batch, what the
networks compute alone (outputs, gradients, running statistics, in float64):

* ``SequentialStack`` — a (named, nested) ``nn.Sequential`` of Linear/Conv2d/pooling/activation
  layers: Linear as ``baddbmm`` or, once ``sparsify`` finds its masks sparse enough, as one
  block-diagonal CSR matrix of the survivors (``sparse_linear``); Conv2d as K ordinary
  convolutions over the stack's blocks of rows (``conv_mode = "loop"``, the faster on CPU) or as
  one grouped convolution with ``groups=K`` (``"grouped"``).
* ``RowStack`` (``row_stack``) — any module whose forward treats samples independently, BatchNorm,
  residual graphs, dropout and tied weights included: the user's own forward over the K networks'
  rows, weight layers swapped for K-aware units.
* ``VmapStack`` — any functional module: ``torch.func.vmap`` over ``functional_call``.
* ``LoopStack`` — anything else: the K networks one after another inside each step.

All expose ``params`` (leaf tensors, working layout), ``forward(x)`` for a batch per network,
``forward_shared(x)`` for one batch seen by all networks, and conversion to and from the canonical
per-network ``state_dict`` layout.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .layout import (
    LinearLayout,
    NotStackable,
    State,
    buffer_names,
    parameter_names,
    stack_states,
)
from .row_stack import LoopStack, RowStack
from .sparse_linear import SPARSE_BELOW, sparse_linear

__all__ = [
    "LoopStack",
    "NotStackable",
    "RowStack",
    "SequentialStack",
    "Stack",
    "StackPlan",
    "State",
    "VmapStack",
    "build_stack",
    "plan_stack",
    "stack_networks",
]

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


def _sequential_layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of a plain ``nn.Sequential``, nested ones flattened, names as in its
    ``state_dict`` ("fc1", "features.0"): a Sequential built from an OrderedDict keeps its names."""
    for name, child in module.named_children():
        if type(child).forward is nn.Sequential.forward:
            yield from _sequential_layers(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


class SequentialStack(LinearLayout):
    """Hand-batched ``nn.Sequential``: the fast path for the paper's MLPs and conv nets."""

    uses_rng = False

    #: How K stacked Conv2d layers run: "grouped" (one convolution with ``groups=K``) or "loop"
    #: (K ordinary convolutions). Same arithmetic per network; benchmarks/throughput.py times both.
    conv_mode = "loop"

    def __init__(
        self,
        template: nn.Module,
        states: Sequence[Mapping[str, torch.Tensor]],
        dtype: torch.dtype,
        rng_seeds: Sequence[int] | None = None,
    ):
        layers = self.check_structure(template)
        names = parameter_names(template)
        self.names = [name for name, _ in layers]
        self.layers = [layer for _, layer in layers]
        self.size = len(states)
        kinds = {n: type(m) for n, m in layers}
        self._init_layout(
            {f"{n}.weight" for n, t in kinds.items() if t is nn.Linear},
            {f"{n}.bias" for n, t in kinds.items() if t is nn.Linear},
        )
        originals = dict(template.named_parameters())
        self.params = {
            n: self.to_working(n, stack_states(states, n, dtype, originals[n]))
            .contiguous()
            .requires_grad_()
            for n in names
        }
        self._folded_relus: frozenset[int] = frozenset()

    def sparsify(self, keep: Mapping[str, torch.Tensor], below: float = SPARSE_BELOW) -> set[str]:
        """``LinearLayout.sparsify``; then every ReLU with a sparse Linear on both sides rides in
        their products (``BlockSparseLinear``'s ``relu``/``gate_input``)."""
        chosen = super().sparsify(keep, below)
        sparse = [f"{n}.weight" in self._patterns for n in self.names]
        self._folded_relus = frozenset(
            i
            for i, layer in enumerate(self.layers)
            if isinstance(layer, nn.ReLU)
            and 0 < i < len(self.layers) - 1
            and sparse[i - 1]
            and sparse[i + 1]
        )
        return chosen

    @staticmethod
    def check_structure(template: nn.Module) -> list[tuple[str, nn.Module]]:
        """The layers, if every one has a hand-batched implementation (exact by construction, so
        ``plan_stack`` needs no probe); else ``NotStackable``."""
        if type(template).forward is not nn.Sequential.forward:
            raise NotStackable("not an nn.Sequential")
        layers = list(_sequential_layers(template))
        for _, layer in layers:
            ok = isinstance(layer, _CHANNEL_LOCAL)
            ok |= type(layer) is nn.Linear
            ok |= isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1
            ok |= (
                type(layer) is nn.Conv2d
                and layer.groups == 1
                and layer.padding_mode == "zeros"
                and isinstance(layer.padding, tuple)
            )
            if not ok or any(True for _ in layer.buffers()):
                raise NotStackable(f"layer {layer} has no batched implementation")
        names = parameter_names(template)
        if len(names) != sum(1 for _ in template.named_parameters(remove_duplicate=False)):
            raise NotStackable("tied weights")
        return layers

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
        folded = self._folded_relus
        for i, (name, layer) in enumerate(zip(self.names, self.layers, strict=True)):
            if i in folded:
                continue  # applied by the sparse products on either side
            if isinstance(layer, nn.Conv2d):
                w = self.params[f"{name}.weight"]
                b = self.params.get(f"{name}.bias")
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
                w = self.params[f"{name}.weight"]
                b = self.params.get(f"{name}.bias")
                pattern = self._patterns.get(f"{name}.weight")
                if pattern is not None:
                    if layout != "features_first":
                        h, layout = h.transpose(1, 2), "features_first"
                    h = sparse_linear(
                        h, w, b, pattern, relu=i + 1 in folded, gate_input=i - 1 in folded
                    )
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

    def __init__(
        self,
        template: nn.Module,
        states: Sequence[Mapping[str, torch.Tensor]],
        dtype: torch.dtype,
        rng_seeds: Sequence[int] | None = None,
    ):
        self.template = copy.deepcopy(template).to(dtype)
        self.size = len(states)
        originals = {n: t for n, t in [*template.named_parameters(), *template.named_buffers()]}
        self.params: State = {
            n: stack_states(states, n, dtype, originals[n]).requires_grad_()
            for n in parameter_names(template)
        }
        self.buffers: State = {
            n: stack_states(states, n, dtype, originals[n]) for n in buffer_names(template)
        }

        def call(p: State, b: State, x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, (p, b), (x,))

        self._per_batch = vmap(call, in_dims=(0, 0, 0))
        self._shared = vmap(call, in_dims=(0, 0, None))

    def sparsify(self, keep: Mapping[str, torch.Tensor], below: float = 0.0) -> set[str]:
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


Stack = SequentialStack | RowStack | VmapStack

_IMPLEMENTATIONS: dict[str, type] = {
    "sequential": SequentialStack,
    "rows": RowStack,
    "vmap": VmapStack,
    "loop": LoopStack,
}


@dataclass(frozen=True)
class StackPlan:
    """How a module's networks train together: ``impl`` (a key of the implementations above),
    whether its forward draws random numbers (then each network gets its own stream, and stacks
    do not train in parallel lanes, which would share torch's global generator), and, when the
    networks can only run one after another (``impl == "loop"``), why."""

    impl: str
    random: bool = False
    reason: str = ""

    @property
    def side_by_side(self) -> bool:
        return self.impl != "loop"


def plan_stack(template: nn.Module, example_input: torch.Tensor) -> StackPlan:
    """The fastest implementation that computes exactly what ``template``'s networks compute alone.

    A plain Sequential of hand-batched layers takes ``SequentialStack``. Any other candidate is
    checked, not assumed: two networks (the template's weights and a perturbed
    copy) run through it in float64 on a few rows of ``example_input`` ([B, *input_shape]), in
    training and evaluation mode, and must match the networks run alone — outputs, gradients,
    running statistics, random draws.
    """
    try:
        SequentialStack.check_structure(template)
        return StackPlan("sequential")
    except NotStackable:
        pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few rows: threads would only wait on each other (and neighbours)
    try:
        return _plan_by_probe(template, example_input)
    finally:
        torch.set_num_threads(threads)


def _plan_by_probe(template: nn.Module, example_input: torch.Tensor) -> StackPlan:
    random = draws_random_numbers(template, example_input)
    probe = _Probe(template, example_input, random)
    reason = ""
    for name, impl in _IMPLEMENTATIONS.items():
        if name in ("sequential", "loop") or (random and name != "rows"):
            continue
        try:
            probe.check(impl)
            return StackPlan(name, random)
        except NotStackable as exc:
            if name == "rows":
                reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure means: not this implementation
            if name == "rows":
                reason = f"its forward does not run on stacked rows ({_one_line(exc)})"
    return StackPlan("loop", random, reason)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def build_stack(
    plan: StackPlan,
    template: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    dtype: torch.dtype,
    rng_seeds: Sequence[int] | None = None,
) -> Stack:
    """The stack ``plan`` chose, for these networks; ``rng_seeds`` (one per network) seed each
    network's own random stream when the module draws random numbers."""
    seeds = None
    if plan.random:
        seeds = list(rng_seeds) if rng_seeds is not None else list(range(len(states)))
    return _IMPLEMENTATIONS[plan.impl](template, states, dtype, seeds)


def stack_networks(
    template: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    dtype: torch.dtype,
    example_input: torch.Tensor,
    rng_seeds: Sequence[int] | None = None,
) -> Stack:
    """``build_stack`` with the plan for ``template`` on ``example_input``."""
    return build_stack(plan_stack(template, example_input), template, states, dtype, rng_seeds)


def draws_random_numbers(template: nn.Module, example_input: torch.Tensor) -> bool:
    """Whether a training-mode forward draws from torch's global generator (dropout in a module or
    in the forward itself, RReLU, noise). Known random layers count even when this batch drew
    nothing; a forward that fails here counts as not random (the data checks report it)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd | nn.RReLU) for m in template.modules()):
        return True
    net = copy.deepcopy(template).double().train()
    with torch.random.fork_rng(devices=[]):
        before = torch.get_rng_state()
        try:
            with torch.no_grad():
                net(_probe_rows(example_input)[0])
        except Exception:  # noqa: BLE001
            return False
        return not torch.equal(before, torch.get_rng_state())


def _probe_rows(example_input: torch.Tensor) -> list[torch.Tensor]:
    """Two different batches of 3 rows (in float64) for the two probe networks."""
    x = example_input.double()
    first = x[:3]
    if first.shape[0] < 2:
        first = torch.cat([first, first + 0.5])
    second = x[3:6] if x.shape[0] >= 3 + first.shape[0] else first.flip(0) * 0.75
    return [first, second[: first.shape[0]]]


class _Probe:
    """Two networks run alone: what every stack implementation must reproduce."""

    def __init__(self, template: nn.Module, example_input: torch.Tensor, random: bool):
        self.template = template
        self.random = random
        self.xs = _probe_rows(example_input)
        self.seeds = [11, 12]
        g = torch.Generator().manual_seed(0)
        tensors = {n: t for n, t in [*template.named_parameters(), *template.named_buffers()]}
        base = {
            n: tensors[n].detach().double() if tensors[n].is_floating_point() else tensors[n]
            for n in [*parameter_names(template), *buffer_names(template)]
        }  # one entry per tensor: a tied weight is perturbed once
        other = {}
        for name, t in base.items():
            if not t.is_floating_point():
                other[name] = t.clone()
            elif name.endswith("running_var"):
                other[name] = t * (0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
            else:
                scale = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 0.1
                other[name] = t + 0.5 * scale * torch.randn(t.shape, generator=g, dtype=t.dtype)
        self.states = [base, other]
        runs = zip(self.states, self.xs, self.seeds, strict=True)
        self.alone = [self._alone(state, x, seed) for state, x, seed in runs]

    def _alone(self, state: State, x: torch.Tensor, seed: int) -> dict:
        net = copy.deepcopy(self.template).double().train()
        net.load_state_dict(state, strict=False)
        params = dict(net.named_parameters())
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
            out = net(x)
        self.weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                   dtype=out.dtype)  # fmt: skip
        grads = torch.autograd.grad((out * self.weights).sum(), list(params.values()),
                                    allow_unused=True)  # fmt: skip
        buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
        net.eval()
        with torch.no_grad():
            out_eval = net(self.xs[0])
        return {
            "out": out.detach(),
            "grads": dict(zip(params, grads, strict=True)),
            "buffers": buffers,
            "eval": out_eval,
        }

    def check(self, impl: type) -> None:
        stack = impl(self.template, self.states, torch.float64, self.seeds if self.random else None)
        stack.set_training(True)
        with torch.random.fork_rng(devices=[]):
            before = torch.get_rng_state()
            out = stack.forward(torch.stack(self.xs))
            if not torch.equal(before, torch.get_rng_state()):
                raise NotStackable(
                    "its forward draws random numbers outside nn.Dropout/nn.RReLU modules "
                    "(e.g. F.dropout), which stacked networks cannot draw as they would alone"
                )
        names = list(stack.params)
        grads = torch.autograd.grad((out * self.weights).sum(), [stack.params[n] for n in names],
                                    allow_unused=True)  # fmt: skip
        stack.set_training(False)
        with torch.no_grad():
            out_eval = stack.forward_shared(self.xs[0])
        stack.set_training(True)
        buffers = stack.stacked_buffers()
        for k, alone in enumerate(self.alone):
            _same(out[k], alone["out"], "outputs")
            _same(out_eval[k], alone["eval"], "outputs in evaluation mode")
            for name, grad in zip(names, grads, strict=True):
                expected = alone["grads"].get(name)
                got = None if grad is None else stack.to_canonical(name, grad)[k]
                if expected is None or got is None:
                    if (expected is None) != (got is None or not bool(got.any())):
                        raise NotStackable(f"the gradient of {name} differs")
                    continue
                _same(got, expected, f"the gradient of {name}")
            for name, value in buffers.items():
                _same(value[k], alone["buffers"][name], f"{name}")


def _same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if got.shape != expected.shape:
        raise NotStackable(f"its {what} come out in another shape when stacked")
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    if not torch.allclose(got.double(), expected.double(), rtol=1e-7, atol=1e-9 * scale):
        raise NotStackable(
            f"its {what} differ when networks are stacked: the forward mixes samples of the "
            "batch (an operation across the batch other than BatchNorm, or a view that assumes "
            "one network)"
        )


#: Bytes training holds per parameter and network: the weight, its gradient and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16
MAX_STACK = 16


def max_stack_size(template: nn.Module, available_bytes: int | None = None) -> int:
    """How many copies can share a stack: up to 16, fewer when their training state would not fit
    in a quarter of the available memory (``available_bytes``, default: what the OS reports). A
    quarter, because stacks train two at a time on two cores and activations need room as well.
    The paper's models never hit the cap; a user's large module gets smaller stacks instead of
    running out of memory."""
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
