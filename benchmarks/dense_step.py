"""How far a dense round or level can go: ticketlab's step against the step's irreducible work.

    .venv/bin/python benchmarks/dense_step.py                 # the MNIST-1D MLP, ~3 min
    .venv/bin/python benchmarks/dense_step.py --model lenet   # LeNet-300-100 on mnist5k, ~4 min

Why: issue 18's 3x on the MNIST-1D grid is held down by its dense rounds (sparsity 0, .45, .80),
whose 2-4 networks train as stacks of 1-2, one per core; its 50% of peak on LeNet-300-100's dense
levels (levels 0-7, 2 networks at level 0 and 6 after) by stacks of 1 and 3. This measures, for
such a stack, one thread, best of 5, milliseconds per step:

* the trainer's step (``train`` over 400 steps, evaluation only at the ends);
* the step's matrix products alone: the 3 forward ``baddbmm`` and 5 backward ``bmm`` of the
  40-500-500-10 MLP at batch 100 (LeNet: 784-300-100-10 at batch 60), on the same shapes, nothing
  else (no activations, loss, Adam), on operands that stay in cache from one step to the next;
* fused Adam alone over the stack's parameters (``_fused_adam_`` through ``torch.optim.Adam``),
  which reads and writes every parameter and both moments every step.

and the plain loop's step (one network, both threads, fused Adam: ``benchmarks/e2e.py``'s). A
dense round trains its stacks in two processes side by side, so each of these is also timed as
two processes at once (started together at a barrier): two cores that share caches and memory do
not make two of one. The last lines print a round's ratio to the plain loop, ``2 k x plain step /
side-by-side stack step``, for the trainer's step and for a step that did nothing but its products
and its Adam update: a ceiling, what the dense rounds would reach if a step cost only those. With
``--model lenet`` they are also printed as fractions of the fp32 matmul peak (``throughput.py``'s
sgemm), in the dense-equivalent FLOPs ``e2e.py`` counts (6 x weights x batch per network-step).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import e2e  # benchmarks/e2e.py
from e2e import lenet, mlp, plain_stepper
from mnist1d_table import mnist1d_full_train, state_of  # benchmarks/mnist1d_table.py
from throughput import matmul_peak  # benchmarks/throughput.py
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import Dataset, load_dataset
from ticketlab.zoo.models import build_model

STEPS, REPEATS = 400, 5


@dataclass(frozen=True)
class Setting:
    widths: tuple[int, ...]
    batch: int
    lr: float
    stacks: tuple[int, ...]  # the stack sizes its dense rounds or levels train, one per core

    @property
    def flops_per_step(self) -> float:
        """Dense-equivalent FLOPs of one network-step, as e2e.py counts them."""
        weights = sum(a * b + b for a, b in zip(self.widths, self.widths[1:], strict=False))
        return 6 * weights * self.batch


SETTINGS = {
    "mnist1d": Setting((40, 500, 500, 10), 100, 2e-2, (1, 2)),
    "lenet": Setting((784, 300, 100, 10), e2e.BATCH, e2e.LR, (1, 3)),
}


def load(model: str) -> Dataset:
    return mnist1d_full_train() if model == "mnist1d" else load_dataset(e2e.DATA, 0.1, 0)


def best_ms(run: Callable[[], None], steps: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 1000 * best / steps


def trainer_ms(model: str, k: int) -> float:
    data, setting = load(model), SETTINGS[model]
    if model == "lenet":  # e2e.py's search: its LeNet, shuffled batches
        template = lenet(data.x_train[0].numel(), 0)
        jobs = e2e.random_level_jobs(data, k, 0)
        order = "shuffle"
    else:
        template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
        names = prunable_names(template, prune_biases=True)
        inits = [
            state_of(build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=t))
            for t in range(k)
        ]
        jobs = [
            Job(i, Mask.ones_like({n: i[n] for n in names}), data_seed=t)
            for t, i in enumerate(inits)
        ]
        order = "cyclic"
    spec = TrainSpec(
        steps=STEPS,
        batch_size=setting.batch,
        lr=setting.lr,
        eval_every=STEPS,
        data_order=order,
    )
    warm = dataclasses.replace(spec, steps=20, eval_every=20)
    train(template, jobs, data, warm, lanes=1)
    return best_ms(lambda: train(template, jobs, data, spec, lanes=1), STEPS)


def stack_tensors(
    model: str, k: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    widths, batch = SETTINGS[model].widths, SETTINGS[model].batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, batch, widths[0], generator=g)
    ws = [
        torch.randn(k, a, b, generator=g) * a**-0.5
        for a, b in zip(widths, widths[1:], strict=False)
    ]
    bs = [torch.zeros(k, 1, b) for b in widths[1:]]
    return x, ws, bs


def products_ms(model: str, k: int) -> float:
    """The step's 8 products on its shapes (the input's gradient is never needed)."""
    x, (w1, w2, w3), (b1, b2, b3) = stack_tensors(model, k)

    def run() -> None:
        with torch.no_grad():
            for _ in range(STEPS):
                h1 = torch.baddbmm(b1, x, w1)
                h2 = torch.baddbmm(b2, h1, w2)
                g3 = torch.baddbmm(b3, h2, w3)
                torch.bmm(h2.transpose(1, 2), g3)
                g2 = torch.bmm(g3, w3.transpose(1, 2))
                torch.bmm(h1.transpose(1, 2), g2)
                g1 = torch.bmm(g2, w2.transpose(1, 2))
                torch.bmm(x.transpose(1, 2), g1)

    return best_ms(run, STEPS)


def adam_ms(model: str, k: int) -> float:
    _, ws, bs = stack_tensors(model, k)
    params = [p.requires_grad_() for p in ws + bs]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.Adam(params, lr=SETTINGS[model].lr, fused=True)

    def run() -> None:
        for _ in range(STEPS):
            optimizer.step()

    return best_ms(run, STEPS)


def plain_ms(model: str) -> float:
    data, setting = load(model), SETTINGS[model]
    if model == "lenet":
        net = lenet(data.x_train[0].numel(), 0)
    else:
        net = mlp(data.x_train.shape[1])
        net.load_state_dict(state_of(build_model("mnist1d_mlp", (40,), 10, seed=0)))
    step_on = plain_stepper(net, {}, setting.lr, data.x_train, data.y_train)
    n, batch = data.x_train.shape[0], setting.batch

    def run() -> None:
        for step in range(STEPS):
            step_on(torch.arange(step * batch, (step + 1) * batch) % n)

    return best_ms(run, STEPS)


MEASURES: dict[str, Callable[[str, int], float]] = {
    "trainer": trainer_ms,
    "products": products_ms,
    "adam": adam_ms,
}


def _child(what: str, model: str, k: int, barrier, results) -> None:
    torch.set_num_threads(1)
    if what == "trainer":
        load(model)  # read from disk before the barrier: the children time training only
    barrier.wait()
    results.put(MEASURES[what](model, k))


def side_by_side(what: str, model: str, k: int) -> float:
    """Mean ms/step of two fresh processes timing ``what`` at once, one thread each."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(what, model, k, barrier, results)) for _ in range(2)
    ]
    for child in children:
        child.start()
    times = [results.get() for _ in children]
    for child in children:
        child.join()
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="mnist1d")
    model = parser.parse_args().model
    setting = SETTINGS[model]
    threads = torch.get_num_threads()
    peak = matmul_peak() if model == "lenet" else None
    if peak:
        print(f"fp32 matmul peak (2048^3 sgemm, {threads} threads): {peak:.1f} GFLOP/s")
    plain = plain_ms(model)
    print(f"{model}: plain loop, 1 network, {threads} threads: {plain:.2f} ms/step")
    print("ms/step, 1 thread each     trainer   products   Adam   products+Adam")
    rows = []
    for k in setting.stacks:
        torch.set_num_threads(1)
        alone = [MEASURES[what](model, k) for what in MEASURES]
        torch.set_num_threads(threads)
        together = [side_by_side(what, model, k) for what in MEASURES]
        for label, (t, p, a) in (("alone", alone), ("two at once", together)):
            print(f"  stack of {k}, {label:11} {t:8.2f} {p:10.2f} {a:6.2f} {p + a:15.2f}")
        rows.append((k, together[0], together[1] + together[2]))
    print("the ratio to the plain loop, stacks of k two at once (2k x plain / step):")

    def of_peak(k: int, ms: float) -> str:
        if peak is None:
            return ""
        return f" ({2 * k * setting.flops_per_step / (ms / 1000) / 1e9 / peak:.0%} of peak)"

    for k, t, floor in rows:
        print(
            f"  k = {k}: trainer {2 * k * plain / t:.2f}x{of_peak(k, t)}; "
            f"ceiling (products and Adam only) {2 * k * plain / floor:.2f}x{of_peak(k, floor)}"
        )


if __name__ == "__main__":
    main()
