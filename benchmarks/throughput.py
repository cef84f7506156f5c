"""Training throughput on this machine: the usual PyTorch loop vs ticketlab, one by one and stacked.

    .venv/bin/python benchmarks/throughput.py [--quick]

LeNet-300-100 at batch 60 on random tensors of MNIST shape (60,000 samples), with a 50%-sparse
random mask on every weight matrix (so every variant pays for its mask):

  (a) the usual loop: ``DataLoader(TensorDataset, shuffle, batch 60, num_workers=0)``, one
      ``nn.Module`` masked in the forward pass by ``torch.nn.utils.prune.custom_from_mask``,
      ``torch.optim.Adam`` with its defaults (not fused);
  (b) ticketlab one network at a time: ``train(..., stack_size=1)``, for 1 network (all threads on
      it) and for 16 networks (``train`` runs 2 one-network stacks at once, one thread each);
  (c) ticketlab stacked: 16 networks as one K=16 stack (all threads on it), and with the automatic
      stack size (2 stacks of 8 side by side, one thread each; see ``train(..., lanes=)``).

Throughput is model-samples per second (K networks each seeing a batch of 60 count 60*K), timed over
training steps only: ticketlab runs are timed between the first and the last step's progress
callback, so building the stack and evaluating are excluded. Each figure is the best of a few
short windows, which is what the machine can do (other processes only ever slow it down; the load
average is printed). FLOPs are dense-equivalent, 6 * weights * samples for a training step, and are
compared with the machine's fp32 matmul peak, measured here with a 2048^3 sgemm. (The step really
does less: the first layer's input gradient is never computed, so 6 * weights overcounts LeNet's
work by ~1.4x; the percentages are comparable with each other, not absolute.) The ceiling row
times the forward and backward of (c) alone, which bounds what any stacked trainer on these
kernels can reach.

Then a whole IMP schedule (densities 0.8^L, L = 0..16): (a) and ticketlab's (c) at every level,
with ticketlab forced dense (masked weights) and as it runs by default (survivors only, as
block-diagonal CSR matrices, under ``SPARSE_BELOW``), and the ratios of total time.

Then gpt_tiny (the character-level transformer) on random token sequences of pydoc_chars' shape
(context 64, vocabulary 103) at batch 32: model-tokens/s for 4 networks one at a time and stacked
(``torch.func.vmap``), with FLOPs per token as Kaplan et al. count them (6 x matrix weights,
the tied head included, + 6 x layers x context x width for attention); ``--transformer`` runs
this section alone.

Then Conv-2 on 3x32x32 inputs at batch 60: network-steps/s for one network and for K=4 stacked,
with the stacked convolutions done both ways (one grouped convolution, or a loop of per-network
convolutions), and the FLOP bound that the machine's peak puts on steps/s.

Then ResNet-20 (BatchNorm) on 3x32x32 at batch 128, SGD with momentum and the CIFAR augmentation:
images/s of one network and of K=4 side by side through ``train``, and, as bounds, the forward and
backward alone (no optimizer, mask or data) of one network, of K=4 as one network with grouped
convolutions (``groups=K``; BatchNorm over K*C channels is K independent BatchNorms) and of K=4 on
one-thread lanes; each in fp32 and under bf16 autocast. ``--resnet20`` runs this section alone.

On a shared machine, run it at a higher priority (``nice -n -10``) or the figures measure the
neighbours: single-stack runs, whose every operation waits for both threads, suffer most.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train import stacked
from ticketlab.train.sparse_linear import SPARSE_BELOW
from ticketlab.train.trainer import Job, TrainSpec, _chunk_bounds, _lane_count, train
from ticketlab.zoo.data import Dataset
from ticketlab.zoo.models import build_model

BATCH = 60
N_TRAIN = 60_000
SPARSITY = 0.5


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def random_data(shape: tuple[int, ...], n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    # tiny validation/test sets: ticketlab evaluates at step 0 and at the end, outside the timing
    return Dataset("random", x, y, x[:BATCH], y[:BATCH], x[:BATCH], y[:BATCH])


def dense_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_peak(seconds: float = 3.0) -> float:
    """fp32 GFLOP/s of a large square sgemm: the ceiling for everything below."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b, out=c)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def best_rate(run_window: Callable[[], float], windows: int) -> float:
    """Best of ``windows`` calls of ``run_window`` (each returns a rate)."""
    return max(run_window() for _ in range(windows))


# --------------------------------------------------------------------------------------------
# (a) the usual loop


def usual_loop_rate(data: Dataset, steps: int, windows: int, sparsity: float = SPARSITY) -> float:
    model = build_model("lenet_300_100", data.input_shape, 10, seed=0)
    g = torch.Generator().manual_seed(1)
    for name in prunable_names(model):
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        keep = torch.rand(getattr(module, param).shape, generator=g) >= sparsity
        prune.custom_from_mask(module, param, keep)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=BATCH, shuffle=True, num_workers=0
    )
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def window() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            x, y = next_batch()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return steps * BATCH / (time.perf_counter() - t)

    window()  # warm-up
    return best_rate(window, windows)


# --------------------------------------------------------------------------------------------
# (b), (c) ticketlab


def ticketlab_jobs(
    model_name: str, data: Dataset, k: int, sparsity: float = SPARSITY
) -> tuple[torch.nn.Module, list[Job]]:
    template = build_model(model_name, data.input_shape, 10, seed=0)
    jobs = []
    for i in range(k):
        net = build_model(model_name, data.input_shape, 10, seed=i)
        g = torch.Generator().manual_seed(1000 + i)
        params = dict(net.named_parameters())
        keep = {
            n: torch.rand(params[n].shape, generator=g) >= sparsity for n in prunable_names(net)
        }
        jobs.append(Job(init=net.state_dict(), mask=Mask(keep), data_seed=i))
    return template, jobs


def ticketlab_run(
    template: torch.nn.Module,
    jobs: list[Job],
    data: Dataset,
    steps: int,
    stack_size: int | None,
    sparse_below: float = SPARSE_BELOW,
) -> float:
    """Network-steps per second of ``train``, between the first and the last progress callback
    (several stacks may report from several threads; each call reports its stack's K)."""
    marks: list[tuple[float, int]] = []
    spec = TrainSpec(steps=steps, batch_size=BATCH, lr=1.2e-3, eval_every=10 * steps)
    train(
        template,
        jobs,
        data,
        spec,
        stack_size=stack_size,
        progress=lambda n: marks.append((time.perf_counter(), n)),
        sparse_below=sparse_below,
    )
    done = sum(n for _, n in marks[1:])
    return done / (marks[-1][0] - marks[0][0])


def ticketlab_rate(
    model_name: str,
    data: Dataset,
    n_jobs: int,
    stack_size: int | None,
    steps: int,
    windows: int,
    sparsity: float = SPARSITY,
    sparse_below: float = SPARSE_BELOW,
) -> float:
    """Model-samples/s training ``n_jobs`` networks ``stack_size`` at a time."""
    template, jobs = ticketlab_jobs(model_name, data, n_jobs, sparsity)
    ticketlab_run(template, jobs, data, 3, stack_size, sparse_below)  # warm-up
    return best_rate(
        lambda: BATCH * ticketlab_run(template, jobs, data, steps, stack_size, sparse_below),
        windows,
    )


def matmul_ceiling_rate(data: Dataset, steps: int, windows: int) -> float:
    """Model-samples/s of the stacked LeNet-300-100's forward and backward alone (batched
    matmuls, ReLU, loss) for 16 networks as 2 stacks of 8 side by side (one thread each, as
    ``train`` runs them): no optimizer, mask, data gathering or bookkeeping. No implementation of
    (c) on these kernels can beat it; its ratio to (a) bounds c/a."""
    sizes = (784, 300, 100, 10)
    k = 8

    def one_lane() -> float:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        weights = [
            (torch.randn(k, i, o, generator=g) * 0.05).requires_grad_()
            for i, o in zip(sizes, sizes[1:], strict=False)
        ]
        biases = [torch.zeros(k, 1, o, requires_grad=True) for o in sizes[1:]]
        x = data.x_train[: k * BATCH].reshape(k, BATCH, -1)
        y = data.y_train[: k * BATCH]

        def window() -> float:
            t = time.perf_counter()
            for _ in range(steps):
                h = x
                for j, (w, b) in enumerate(zip(weights, biases, strict=True)):
                    h = torch.baddbmm(b, h, w)
                    h = torch.relu_(h) if j < len(weights) - 1 else h
                loss = F.cross_entropy(h.reshape(-1, 10), y, reduction="sum")
                for p in (*weights, *biases):
                    p.grad = None
                loss.backward()
            return steps * k * BATCH / (time.perf_counter() - t)

        window()
        return best_rate(window, windows)

    threads_before = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=2) as pool:
        rates = list(pool.map(lambda _: one_lane(), range(2)))
    torch.set_num_threads(threads_before)
    return sum(rates)


IMP_LEVELS = 17  # 20% of the remaining weights pruned per level: 100% down to 2.8%


def imp_schedule_section(data: Dataset, steps: int, a_steps: int, windows: int) -> None:
    """The three ways over a whole IMP schedule (every layer at density 0.8^L, L = 0..16, 16
    networks per level): what a ticket search costs, where ticketlab's sparse path takes over
    (``SPARSE_BELOW``) and what it buys at the late levels. The usual loop is timed at every
    level too: its masked weights cost it the same or more (zeros in Adam's state)."""
    print(
        f"IMP schedule, LeNet-300-100, 16 networks per level, 20% pruned per level (ticketlab "
        f"trains Linear layers sparse under {SPARSE_BELOW:.0%} density); model-samples/s:"
    )
    print(f"  {'level':>5} {'density':>8} {'(a) usual':>10} {'(c) dense':>10} {'(c) auto':>10}")
    totals = {"a": 0.0, "dense": 0.0, "auto": 0.0}
    for level in range(IMP_LEVELS):
        density = 0.8**level
        rates = {
            "a": usual_loop_rate(data, a_steps, windows, sparsity=1 - density),
            **{
                path: ticketlab_rate(
                    "lenet_300_100", data, 16, None, steps, windows, 1 - density, below
                )
                for path, below in (("dense", 0.0), ("auto", SPARSE_BELOW))
            },
        }
        for path, rate in rates.items():
            totals[path] += 1 / rate  # seconds per model-sample, summed over levels
        print(
            f"  {level:5d} {density:8.1%} {rates['a']:10,.0f} {rates['dense']:10,.0f} "
            f"{rates['auto']:10,.0f}",
            flush=True,
        )
    print(
        f"  whole schedule: c/a = {totals['a'] / totals['auto']:.2f} (usual loop time / "
        f"ticketlab time), sparse path alone {totals['dense'] / totals['auto']:.2f}x "
        f"(ticketlab dense-only time / ticketlab time)\n"
    )


# --------------------------------------------------------------------------------------------

GPT_BATCH = 32
GPT_CONTEXT = 64
GPT_VOCAB = 103


def token_data(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, GPT_VOCAB, (n, GPT_CONTEXT + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    small = slice(0, GPT_BATCH)  # evaluation happens outside the timed steps
    return Dataset("tokens", x, y, x[small], y[small], x[small], y[small], GPT_VOCAB)


def gpt_flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token (Kaplan et al. 2020): 6 x the weights of every matrix multiply
    (the tied head is the token embedding) + 6 x layers x context x width (attention)."""
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    width = model.tok.weight.shape[1]
    matrices += model.tok.weight.numel()
    return 6.0 * matrices + 6.0 * len(model.blocks) * GPT_CONTEXT * width


def transformer_section(peak: float, windows: int, steps: int) -> None:
    name = "gpt_tiny"
    model = build_model(name, (GPT_CONTEXT,), GPT_VOCAB, seed=0)
    per_token = gpt_flops_per_token(model)
    data = token_data(4_000)
    n = 4
    template = model
    jobs = []
    for i in range(n):
        net = build_model(name, (GPT_CONTEXT,), GPT_VOCAB, seed=i)
        g = torch.Generator().manual_seed(1000 + i)
        params = dict(net.named_parameters())
        keep = {
            n_: torch.rand(params[n_].shape, generator=g) >= SPARSITY for n_ in prunable_names(net)
        }
        jobs.append(Job(init=net.state_dict(), mask=Mask(keep), data_seed=i))
    tokens = GPT_BATCH * GPT_CONTEXT
    print(
        f"gpt_tiny ({dense_weights(model):,} weights, {per_token / 1e6:.2f} MFLOP per training "
        f"token), batch {GPT_BATCH} x {GPT_CONTEXT} tokens, {SPARSITY:.0%} masks, {n} networks:"
    )
    for label, size in (
        ("one at a time (stack_size=1)", 1),
        (f"stacked ({chunk_layout(template, n, None)})", None),
    ):

        def one(size: int | None = size) -> float:
            return tokens * ticketlab_run_spec(template, jobs, data, steps, size)

        ticketlab_run_spec(template, jobs, data, 2, size)  # warm-up
        rate = best_rate(one, windows)
        gflops = rate * per_token / 1e9
        print(
            f"  {label:62s} {rate:10,.0f} model-tokens/s {gflops:6.1f} GFLOP/s "
            f"({gflops / peak:4.0%} of peak)",
            flush=True,
        )
    print()


def ticketlab_run_spec(template, jobs, data, steps: int, stack_size: int | None) -> float:
    """Network-steps per second at the transformer's batch size (see ``ticketlab_run``)."""
    marks: list[tuple[float, int]] = []
    spec = TrainSpec(steps=steps, batch_size=GPT_BATCH, lr=1e-3, eval_every=10 * steps)
    train(
        template,
        jobs,
        data,
        spec,
        stack_size=stack_size,
        progress=lambda k: marks.append((time.perf_counter(), k)),
    )
    done = sum(k for _, k in marks[1:])
    return done / (marks[-1][0] - marks[0][0])


def conv2_flops_per_sample(shape: tuple[int, ...]) -> float:
    """Dense training FLOPs of one Conv-2 sample: 6 * MACs of every layer (weights x positions)."""
    channels, h, w = shape
    macs = 3 * 3 * channels * 64 * h * w + 3 * 3 * 64 * 64 * h * w  # two 3x3 convs, same padding
    macs += 64 * (h // 2) * (w // 2) * 256 + 256 * 256 + 256 * 10
    return 6.0 * macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows (a smoke test)")
    parser.add_argument("--transformer", action="store_true", help="only the gpt_tiny section")
    parser.add_argument("--resnet20", action="store_true", help="only the ResNet-20 section")
    args = parser.parse_args()
    windows, s = (2, 4) if args.quick else (3, 1)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}")
    peak = matmul_peak(1.0 if args.quick else 3.0)
    print(f"fp32 matmul peak (2048^3 sgemm, best of repeats): {peak:.1f} GFLOP/s\n", flush=True)
    if args.transformer:
        transformer_section(peak, windows, max(4, 40 // s))
        print(f"{load()}; total {time.perf_counter() - started:.0f} s")
        return
    if args.resnet20:
        resnet20_section(peak, args.quick)
        print(f"{load()}; total {time.perf_counter() - started:.0f} s")
        return

    data = random_data((1, 28, 28), N_TRAIN)
    lenet = build_model("lenet_300_100", (1, 28, 28), 10, seed=0)
    flops_per_sample = 6.0 * dense_weights(lenet)
    n = 16
    layout = chunk_layout(lenet, n, None)
    rows = [
        ("a", "(a) usual loop: DataLoader + prune.custom_from_mask + Adam", None, None),
        ("b1", "(b) ticketlab, 1 network (stack_size=1)", 1, 1),
        ("b", f"(b) ticketlab one by one, {n} networks (stack_size=1)", n, 1),
        ("c16", f"(c) ticketlab stacked, K=16 ({chunk_layout(lenet, n, 16)})", n, 16),
        ("c", f"(c) ticketlab stacked, auto K ({layout})", n, None),
    ]
    rates: dict[str, float] = {}
    print(f"LeNet-300-100 ({dense_weights(lenet):,} weights), batch {BATCH}, {SPARSITY:.0%} masks")
    for key, label, n_jobs, size in rows:
        if n_jobs is None:
            rate = usual_loop_rate(data, 600 // s, windows)
        else:
            steps = max(6, 2000 // (s * n_jobs))  # ~2,000 network-steps a window
            rate = ticketlab_rate("lenet_300_100", data, n_jobs, size, steps, windows)
        rates[key] = rate
        gflops = rate * flops_per_sample / 1e9
        print(
            f"  {label:62s} {rate:8,.0f} model-samples/s {gflops:6.1f} GFLOP/s "
            f"({gflops / peak:4.0%} of peak)",
            flush=True,
        )
    ceiling = matmul_ceiling_rate(data, max(6, 2000 // (s * 16)), windows)
    print(
        f"  {'ceiling: forward + backward of (c) alone (no optimizer/mask/data)':62s} "
        f"{ceiling:8,.0f} model-samples/s {ceiling * flops_per_sample / 1e9:6.1f} GFLOP/s "
        f"({ceiling * flops_per_sample / 1e9 / peak:4.0%} of peak): c/a can be at most "
        f"{ceiling / rates['a']:.2f} on these kernels",
        flush=True,
    )
    print(
        f"  c/a = {rates['c'] / rates['a']:.2f}  c/b = {rates['c'] / rates['b']:.2f}  "
        f"c/b(1 network) = {rates['c'] / rates['b1']:.2f}  K=16/a = {rates['c16'] / rates['a']:.2f}"
        f"   (targets: c/a >= 5, >= 55% of peak)\n"
    )
    imp_schedule_section(data, max(6, 2000 // (s * 16)), 300 // s, 2 if windows > 2 else 1)
    transformer_section(peak, windows, max(4, 40 // s))

    conv_data = random_data((3, 32, 32), 3_000)
    conv_flops = conv2_flops_per_sample((3, 32, 32)) * BATCH
    bound = peak * 1e9 / conv_flops
    verdict = "possible" if bound >= 15 else "above what this CPU's peak allows"
    print(
        f"Conv-2 on 3x32x32, batch {BATCH}: {conv_flops / 1e9:.1f} GFLOP per network-step, so at "
        f"most {bound:.1f} network-steps/s at the matmul peak (target 15 steps/s: {verdict})"
    )
    k = 4
    default_mode = stacked.SequentialStack.conv_mode
    conv_rows = [
        ("1 network", 1, 1, default_mode),
        (f"K={k}, one stack, grouped conv", k, k, "grouped"),
        (f"K={k}, one stack, loop of convs", k, k, "loop"),
    ]
    template = build_model("conv2", (3, 32, 32), 10, seed=0)
    conv_rows.append((f"K={k}, auto ({chunk_layout(template, k, None)})", k, None, default_mode))
    for label, n_jobs, size, mode in conv_rows:
        stacked.SequentialStack.conv_mode = mode
        template, jobs = ticketlab_jobs("conv2", conv_data, n_jobs)
        ticketlab_run(template, jobs, conv_data, 2, size)  # warm-up
        net_steps = max(ticketlab_run(template, jobs, conv_data, 4, size) for _ in range(2))
        gflops = net_steps * conv_flops / 1e9
        per_stack = f"({net_steps / n_jobs:5.2f} stack-steps/s)" if size == n_jobs else " " * 22
        print(
            f"  {label:40s} {net_steps:5.2f} network-steps/s {per_stack} "
            f"{gflops:6.1f} GFLOP/s ({gflops / peak:4.0%} of peak)",
            flush=True,
        )
    stacked.SequentialStack.conv_mode = default_mode
    print(f"  (stacked convolutions run as: {default_mode!r}, the faster here)\n")
    resnet20_section(peak, args.quick)
    again = matmul_peak(1.0 if args.quick else 3.0)
    best = max(peak, again)
    print(
        f"\nfp32 matmul peak measured again at the end: {again:.1f} GFLOP/s (the percentages above "
        f"use the start's {peak:.1f}; a gap means other processes were running). Against the "
        f"higher, {best:.1f}: LeNet-300-100 "
        + ", ".join(f"{key} {rates[key] * flops_per_sample / 1e9 / best:.0%}" for key in rates)
    )
    print(f"{load()}; total {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------------------------
# ResNet-20 with BatchNorm


RESNET_BATCH = 128
RESNET_K = 4


def conv_macs(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample (conv and linear layers)."""
    total = 0

    def count(module: torch.nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            per_position = module.in_channels // module.groups * module.kernel_size[0] ** 2
            total += output[0].numel() * per_position
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    model.train()
    for h in hooks:
        h.remove()
    return total


def bf16_matmul_peak(seconds: float) -> float:
    n = 2048
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def grouped_resnet20(k: int) -> torch.nn.Module:
    """K ResNet-20s as one network: every conv has ``groups=K`` and K times the channels, every
    BatchNorm K*C channels (exactly K independent BatchNorms), the output layer a grouped 1x1 conv.
    Input [B, K*3, H, W]: network k's batch in channel group k. Used only as a bound here."""
    from torch import nn

    def conv(c_in: int, c_out: int, size: int, stride: int) -> nn.Conv2d:
        pad = size // 2
        return nn.Conv2d(k * c_in, k * c_out, size, stride, pad, bias=False, groups=k)

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.a, self.bn_a = conv(c_in, c_out, 3, stride), nn.BatchNorm2d(k * c_out)
            self.b, self.bn_b = conv(c_out, c_out, 3, 1), nn.BatchNorm2d(k * c_out)
            self.short = (
                nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm2d(k * c_out))
                if stride != 1 or c_in != c_out
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn_a(self.a(x)))
            return torch.relu(self.bn_b(self.b(out)) + self.short(x))

    layers: list[nn.Module] = [conv(3, 16, 3, 1), nn.BatchNorm2d(k * 16), nn.ReLU()]
    current = 16
    for stage, width in enumerate((16, 32, 64)):
        for b in range(3):
            layers.append(Block(current, width, 2 if stage and not b else 1))
            current = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(k * 64, k * 10, 1, groups=k), nn.Flatten()]
    return nn.Sequential(*layers)


def forward_backward_rate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, bf16: bool, seconds: float
) -> float:
    """Images/s (network-samples) of forward + loss + backward alone, best of short windows."""
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 10), y)
        for p in model.parameters():
            p.grad = None
        loss.backward()

    step()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        step()
        best = max(best, k * RESNET_BATCH / (time.perf_counter() - t))
    return best


def lanes_rate(k: int, bf16: bool, seconds: float) -> float:
    """K separate ResNet-20s, K/2 per lane on 2 one-thread lanes (as ``train`` runs lanes)."""
    threads_before = torch.get_num_threads()

    def lane(i: int) -> float:
        torch.set_num_threads(1)
        rates = []
        for j in range(k // 2):
            model = build_model("resnet20", (3, 32, 32), 10, seed=2 * j + i)
            x = torch.randn(RESNET_BATCH, 3, 32, 32)
            y = torch.randint(0, 10, (RESNET_BATCH,))
            rates.append(forward_backward_rate(model, x, y, 1, bf16, seconds / (k // 2)))
        return 1 / sum(1 / r for r in rates)  # the lane trains its networks in turn

    with ThreadPoolExecutor(max_workers=2) as pool:
        total = sum(pool.map(lane, range(2)))
    torch.set_num_threads(threads_before)
    return total * (k // 2)


def trainer_rate(k: int, stack_size: int | None, lanes: int | None, steps: int) -> float:
    """Images/s of ``train`` on K ResNet-20s (SGD + momentum, crops and flips), timed between the
    first and the last step's progress callback."""
    data = random_data((3, 32, 32), 2 * RESNET_BATCH, seed=1)
    template = build_model("resnet20", (3, 32, 32), 10, seed=0)
    names = prunable_names(template, exclude=["fc"])
    jobs = []
    for i in range(k):
        init = build_model("resnet20", (3, 32, 32), 10, seed=i).state_dict()
        jobs.append(Job(init, Mask.ones_like({n: init[n] for n in names}), data_seed=i))
    spec = TrainSpec(
        steps=steps, batch_size=RESNET_BATCH, optimizer="sgd", lr=0.1, weight_decay=1e-4,
        eval_every=10 * steps, augment="crop_flip",
    )  # fmt: skip
    marks: list[tuple[float, int]] = []
    train(
        template,
        jobs,
        data,
        spec,
        stack_size=stack_size,
        lanes=lanes,
        progress=lambda n: marks.append((time.perf_counter(), n)),
    )
    done = sum(n for _, n in marks[1:])
    return RESNET_BATCH * done / (marks[-1][0] - marks[0][0])


def resnet20_section(peak: float, quick: bool) -> None:
    k = RESNET_K
    seconds = 4.0 if quick else 12.0
    steps = 3 if quick else 8
    model = build_model("resnet20", (3, 32, 32), 10, seed=0)
    flops = 6.0 * conv_macs(model, (3, 32, 32))  # training: forward + two backward products
    peak16 = bf16_matmul_peak(1.0)
    print(
        f"ResNet-20 ({dense_weights(model):,} weights, {flops / 3e6:.0f} MFLOP forward, "
        f"{flops / 1e6:.0f} MFLOP a training image), batch {RESNET_BATCH}, 3x32x32; K={k}. "
        f"Peaks: fp32 {peak:.0f}, bf16 {peak16:.0f} GFLOP/s. Images/s = network-samples/s:"
    )

    def row(label: str, rate: float, base: float | None, bf16: bool = False) -> None:
        gflops = rate * flops / 1e9
        ratio = f"{rate / base:5.2f}x one network" if base else ""
        top = peak16 if bf16 else peak
        print(
            f"  {label:58s} {rate:7.1f} images/s {gflops:6.1f} GFLOP/s "
            f"({gflops / top:4.0%} of peak) {ratio}",
            flush=True,
        )

    one = trainer_rate(1, 1, 1, steps)
    row("train: 1 network", one, None)
    if not quick:
        one_by_one = trainer_rate(k, 1, 1, steps)
        row(f"train: K={k} one at a time (stack_size=1, lanes=1)", one_by_one, one)
    layout = chunk_layout(model, k, None)
    row(f"train: K={k}, auto ({layout})", trainer_rate(k, None, None, steps), one)
    x1 = torch.randn(RESNET_BATCH, 3, 32, 32)
    y1 = torch.randint(0, 10, (RESNET_BATCH,))
    xk = torch.randn(RESNET_BATCH, k * 3, 32, 32)
    yk = torch.randint(0, 10, (RESNET_BATCH * k,))
    for bf16 in (False, True):
        tag = "bf16 autocast" if bf16 else "fp32"
        single = forward_backward_rate(model, x1, y1, 1, bf16, seconds)
        row(f"bound, {tag}: forward+backward of 1 network", single, None, bf16)
        grouped = grouped_resnet20(k)
        # [B, K*10] logits -> [K*B] rows in network order, as the trainer's loss sees them
        wrapped = torch.nn.Sequential(grouped, Unstack(k))
        row(
            f"bound, {tag}: K={k} as one network, groups={k}",
            forward_backward_rate(wrapped, xk, yk, k, bf16, seconds),
            single,
            bf16,
        )
        row(
            f"bound, {tag}: K={k} on 2 one-thread lanes", lanes_rate(k, bf16, seconds), single, bf16
        )
    print()


class Unstack(torch.nn.Module):
    """[B, K*C] grouped logits -> [K, B, C] (network-major), for the loss of K networks."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.k, -1).transpose(0, 1)


def chunk_layout(template: torch.nn.Module, n_jobs: int, stack_size: int | None) -> str:
    """How ``train`` runs ``n_jobs`` networks: stacks of which sizes, how many at once."""
    bounds = _chunk_bounds(template, n_jobs, stack_size)
    sizes = sorted({b - a for a, b in bounds})
    # the plan only matters for random modules (one lane); these benchmark models have none
    lanes = _lane_count(template, stacked.StackPlan("rows"), len(bounds), None)
    each = "/".join(str(x) for x in sizes)
    threads = torch.get_num_threads()
    at_once = f"{lanes} at a time, 1 thread each" if lanes > 1 else f"{threads} threads"
    return f"{len(bounds)} stack{'s' * (len(bounds) > 1)} of {each}, {at_once}"


if __name__ == "__main__":
    main()
