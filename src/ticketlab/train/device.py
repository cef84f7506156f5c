"""Where networks train and in what arithmetic: ``--device`` and ``--precision`` resolved once.

Why a noun of its own: the trainer, the studies and the CLI all need the same answers (is this
device there, may this precision run on it, which autocast, whether gradients need scaling), and
each error must be one line before anything is trained or written.

Precision is *mixed*: the weights, their gradients and the optimizer's moments stay float32
("master weights"); only the forward and backward arithmetic of matmuls and convolutions runs in
bf16/fp16 under ``torch.autocast``. Masks are re-applied to the float32 weights after every step,
so pruned weights stay exact zeros. fp16 needs a gradient scaler (its range is narrow) and a GPU;
bf16 runs everywhere but pays only where the hardware has fast bf16 (GPUs, AMX CPUs): the default
is fp32, never bf16 picked behind the user's back.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import TicketlabError

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> None:
    """Syntax only (a config may name a GPU that this machine lacks until it is resumed)."""
    if not isinstance(name, str) or not _DEVICE_PATTERN.match(name):
        raise TicketlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def check_precision_name(name: str) -> None:
    if name not in PRECISIONS:
        raise TicketlabError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU (MPS only when asked for:
    its float64 and sparse support are partial)."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TicketlabError(
                f"device {name!r} asked for, but CUDA is not available here "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise TicketlabError(
                f"device {name!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise TicketlabError("device 'mps' asked for, but MPS is not available here")
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision, checked against each other."""

    device: torch.device
    precision: str = "fp32"

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's arithmetic; a no-op context in fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPE[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: its 5-bit exponent underflows small gradients without loss scaling."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)


def placement(device: str = "auto", precision: str = "fp32", dtype: str = "float32") -> Placement:
    """Resolve and cross-check ``device``, ``precision`` and the weights' ``dtype``."""
    check_precision_name(precision)
    where = resolve_device(device)
    if precision == "fp16" and where.type == "cpu":
        raise TicketlabError(
            "precision fp16 needs a GPU (CPU autocast has no fp16 gradient scaling); "
            "use --precision bf16 or fp32 on the CPU"
        )
    if precision != "fp32" and dtype != "float32":
        raise TicketlabError(f"precision {precision} needs float32 weights, got dtype {dtype}")
    if where.type == "mps" and dtype == "float64":
        raise TicketlabError("MPS has no float64; use --dtype float32 or another device")
    return Placement(where, precision)


def configure_determinism(device: torch.device) -> None:
    """On CUDA: deterministic algorithms (cuBLAS workspace, cuDNN without autotuning), so a run
    repeats itself on the same GPU and software. (The CPU kernels used here are deterministic.)

    This sets process-wide torch flags, as any CUDA training script must; ``warn_only`` keeps an
    op without a deterministic kernel from stopping a run (torch warns once instead)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Denormal floats read and written as zero in this thread while it trains; off again after.

    Why: Adam's first moment of a weight whose gradient is zero (a dead unit's, a pruned input's)
    shrinks by 0.9 a step and reaches the denormal range (below 1.2e-38 in float32) after about
    800 steps, where x86 arithmetic runs through microcode assists many times slower; the
    MNIST-1D grid of ``benchmarks/e2e.py`` took 89 s with them and 60 s without. Flushing changes
    only those tiny values (a weight's update by less than 1e-38), never a masked weight's zero.
    The flag is per thread (the CPU's MXCSR register), so it is set in the thread that trains;
    intra-op worker threads keep theirs. torch cannot report the previous setting, so it is left
    off afterwards, as torch starts."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def to_cpu(obj):
    """A copy of a nested structure with every tensor on the CPU: what checkpoints and run files
    hold, so a run started on one device resumes on another."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def default_lanes(device: torch.device) -> int | None:
    """Parallel stacks: the trainer's CPU-thread lanes on the CPU; one stack at a time on an
    accelerator (it is one device; its own parallelism is inside each stack)."""
    return None if device.type == "cpu" else 1
