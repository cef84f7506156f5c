"""What the trainer's step changes are worth, each against its previous form, side by side.

    .venv/bin/python benchmarks/step_parts.py     # ~7 min

Milliseconds per training step, one thread, best of REPEATS interleaved runs (each variant runs
once per round, so a slow spell of the shared machine hits them alike, and each round starts with
another variant: the machine's speed swings by up to 2x within seconds, and the first of a round
was once the slowest in all five rounds):

* ``shipped``: the trainer as it is;
* ``Adam.step``: ``torch.optim.Adam(fused=True).step`` (then the masks' ``mul_``) instead of the
  direct call of its fused kernel (``ticketlab.train.adam_step``);
* ``mask pass``: a pruned layer trained dense stepped by torch's fused Adam and then multiplied by
  its mask, two passes, instead of the one-pass ``ticketlab_adam`` (dense pruned stacks only);
* ``torch transpose``: the batch copied features-first for the first sparse layer by torch's copy
  of the transposed view instead of ``ticketlab_transpose`` (sparse stacks only);
* ``ReLU unfused``: the ReLUs between sparse layers run by autograd instead of inside the compiled
  products (``BlockSparseLinear``'s ``relu``/``gate_input``; sparse stacks only);
* ``autograd``: a dense MLP's forward, loss and gradients through autograd, which allocates every
  product's output afresh, instead of ``ticketlab.train.mlp_step`` (dense and pruned stacks);
* ``indexed batches``: cyclic batches (MNIST-1D's) gathered through indices built every step
  instead of copied as one slice.

on the stacks a search trains: the MNIST-1D MLP dense (1 network, as at sparsity 0) and 2 networks
at 5% and 1%, LeNet-300-100 dense (3 networks, as at level 0), 3 networks pruned but trained dense
(level 5's densities) and 3 networks at level 15's. Every variant's final weights are compared
with the shipped ones: the changes are meant to change no bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from unittest import mock

import torch

from e2e import lenet, random_level_jobs  # benchmarks/e2e.py
from mnist1d_table import mnist1d_full_train  # benchmarks/mnist1d_table.py
from sparse_step import mnist1d_jobs  # benchmarks/sparse_step.py
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train import adam_step, mlp_step, sparse_kernel, stacked, trainer
from ticketlab.train.trainer import Job, Result, TrainSpec, train
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model

STEPS, REPEATS = 300, 7
# what the variants below replace, for the ones that call the original
_SPARSIFY = stacked.SequentialStack.sparsify
_BATCHES = trainer.Batches.__call__


def _torch_adam_step(optimizer, masks=()):
    return functools.partial(adam_step._step_then_mask, optimizer.step, list(masks))


def _relu_unfused_sparsify(self, *args, **kwargs):
    chosen = _SPARSIFY(self, *args, **kwargs)
    self._folded_relus = frozenset()
    return chosen


def _indexed_batches(self, step: int):
    """The previous cyclic batches: the rows' indices built and gathered every step."""
    if not self.cyclic:
        return _BATCHES(self, step)
    start = step * self.batch
    idx = (torch.arange(start, start + min(self.batch, self.n)) % self.n).repeat(len(self.seeds))
    torch.index_select(self.x, 0, idx, out=self.x_out)
    torch.index_select(self.y, 0, idx, out=self.y_out)
    return self.x_out.view(len(self.seeds), -1, *self.shape), self.y_out


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "shipped": contextlib.nullcontext,
    "Adam.step": lambda: mock.patch.object(trainer, "direct_adam", _torch_adam_step),
    "mask pass": lambda: mock.patch.object(adam_step, "_masking_kernel", lambda group: None),
    "ReLU unfused": lambda: mock.patch.object(
        stacked.SequentialStack, "sparsify", _relu_unfused_sparsify
    ),
    "torch transpose": lambda: mock.patch.object(
        sparse_kernel.CsrKernel, "features_first", lambda self, h: h.transpose(1, 2).contiguous()
    ),
    "indexed batches": lambda: mock.patch.object(trainer.Batches, "__call__", _indexed_batches),
    "autograd": lambda: mock.patch.object(
        mlp_step.MlpStep, "for_stack", classmethod(lambda cls, *args, **kwargs: None)
    ),
}


#: which stacks each variant applies to: dense, pruned but dense, sparse; cyclic data only
APPLIES = {
    "ReLU unfused": ("sparse",),
    "torch transpose": ("sparse",),
    "mask pass": ("pruned",),
    "autograd": ("dense", "pruned"),
}


def compare(label: str, template, jobs: list[Job], data, spec: TrainSpec, kind: str) -> None:
    cyclic = spec.data_order == "cyclic"
    applies = [v for v in VARIANTS if kind in APPLIES.get(v, (kind,))]
    variants = [v for v in applies if cyclic or v != "indexed batches"]
    warm = dataclasses.replace(spec, steps=20, eval_every=20)
    times: dict[str, list[float]] = {v: [] for v in variants}
    finals: dict[str, list[Result]] = {}
    for variant in variants:
        with VARIANTS[variant]():
            train(template, jobs, data, warm, lanes=1)
    for round_ in range(REPEATS):  # each round in another order: none always runs first
        for variant in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
            with VARIANTS[variant]():
                start = time.perf_counter()
                finals[variant] = train(template, jobs, data, spec, lanes=1)
                times[variant].append(1000 * (time.perf_counter() - start) / spec.steps)
    shipped = min(times["shipped"])
    cells = [f"{label:38}", f"shipped {shipped:5.2f}"]
    for variant in variants[1:]:
        same = all(
            torch.equal(a.final[n], b.final[n])
            for a, b in zip(finals[variant], finals["shipped"], strict=True)
            for n in a.final
        )
        best = min(times[variant])
        cells.append(f"{variant} {best:5.2f} ({best / shipped:.2f}x, same bits: {same})")
    print("  ".join(cells), flush=True)


def main() -> None:
    torch.set_num_threads(1)
    print(f"ms per step, 1 thread, {STEPS} steps, best of {REPEATS} interleaved runs")
    data = mnist1d_full_train()
    template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
    spec = TrainSpec(steps=STEPS, batch_size=100, lr=2e-2, eval_every=STEPS, data_order="cyclic")
    names = prunable_names(template, prune_biases=True)
    dense = [
        Job(job.init, Mask.ones_like({n: job.init[n] for n in names}), data_seed=job.data_seed)
        for job in mnist1d_jobs(data, 1.0)[:1]
    ]
    compare("mnist1d_mlp, 1 network dense", template, dense, data, spec, "dense")
    for density in (0.05, 0.01):
        label = f"mnist1d_mlp, 2 networks at {density:.0%}"
        compare(label, template, mnist1d_jobs(data, density), data, spec, "sparse")
    mnist5k = load_dataset("mnist5k", 0.1, 0)
    lenet_spec = TrainSpec(steps=STEPS, batch_size=60, lr=1.2e-3, eval_every=100)
    for level, kind in ((0, "dense"), (5, "pruned"), (15, "sparse")):
        template = lenet(mnist5k.x_train[0].numel(), 0)
        jobs = random_level_jobs(mnist5k, 3, level)
        label = f"lenet_300_100, 3 networks at level {level}"
        compare(label, template, jobs, mnist5k, lenet_spec, kind)


if __name__ == "__main__":
    main()
