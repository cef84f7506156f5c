"""Compiled CSR kernels for the CPU (``sparse_kernel.c``): ``SparseLinear``'s inference product
and the sparse training path's three products (forward, input gradient, weight gradient at the
survivors), with the features-first copy of a batch they read; and, in the same library, the
one-pass masked Adam update ``train/adam_step.py`` uses for pruned layers trained dense.

torch's CSR kernels (MKL) run a ticket's layers at a small fraction of the dense matmul's rate and
pay a large fixed cost per call: an exported LeNet-300-100 at 5% of the weights was only ~1.8x its
dense self at batch 256 and ~1.0x at batch 1 (now ~4x and ~1.5x, ``benchmarks/export_speed.py``),
and a sparse training step was mostly that overhead (``benchmarks/sparse_step.py``).

The library is built with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) for
this CPU the first time a process needs it and cached under ``$XDG_CACHE_HOME/ticketlab/kernels``
(default ``~/.cache/ticketlab/kernels``), keyed by the source, compiler, flags and CPU, so later
processes only load it. A build that fails, or that does not reproduce float64 products on a small
check, is reported in one warning and torch's CSR kernels are used instead (and torch's Adam
followed by the mask's multiplication); ``TICKETLAB_SPARSE_KERNEL=0`` chooses that too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TicketlabError

SWITCH_ENV = "TICKETLAB_SPARSE_KERNEL"
SOURCE = Path(__file__).with_name("sparse_kernel.c")
# -fno-math-errno: sqrtf without an errno check, so that the Adam loop vectorizes
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-strict-aliasing", "-fno-math-errno")
#: Tried in order: the host's vector width where the compiler knows the flag, else portable code.
ARCH_FLAGS = (("-march=native",), ("-mcpu=native",), ())


class CsrWeight(ctypes.Structure):
    """``struct ticketlab_csr``: a layer's CSR arrays and sizes, made once per layer. It holds
    raw addresses, not the tensors: its owner keeps them alive and unchanged."""

    _fields_ = [
        ("indptr", ctypes.c_void_p),  # int32, n_out + 1
        ("indices", ctypes.c_void_p),  # int32, one per survivor
        ("values", ctypes.c_void_p),  # float32, one per survivor
        ("bias", ctypes.c_void_p),  # float32, n_out, or NULL
        ("n_in", ctypes.c_int64),
        ("n_out", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class CsrKernel:
    """The loaded shared library's functions, and where it lies."""

    linear_function: ctypes._CFuncPtr
    rows_function: ctypes._CFuncPtr
    dot_function: ctypes._CFuncPtr
    transpose_function: ctypes._CFuncPtr
    adam_function: ctypes._CFuncPtr
    path: Path

    def linear(self, x: torch.Tensor, weight: ctypes._Pointer, n_out: int) -> torch.Tensor:
        """``x W^T + b`` for float32 ``x`` [batch, n_in] on the CPU, W from ``csr_weight``.
        Every call here is paid per layer per batch: at batch 1 it is a third of the layer."""
        strides = x.stride()
        if strides[1] != 1:
            x = x.contiguous()
            strides = x.stride()
        batch = x.shape[0]
        y = torch.empty(batch, n_out)
        if self.linear_function(weight, x.data_ptr(), batch, strides[0], y.data_ptr()) != 0:
            raise MemoryError(f"the sparse kernel could not allocate its buffers (batch {batch})")
        return y

    def rows(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        xt: torch.Tensor,
        out: torch.Tensor,
        relu: bool = False,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out = A @ xt (+ bias per row)`` for features-first ``xt`` [n_cols, batch], batch >=
        16, A in int32 CSR; every tensor contiguous float32 (int32 indices) on the CPU. ``relu``:
        ``out`` goes through a ReLU as it is stored; ``gate`` (``out``'s shape): ``out`` is kept
        where ``gate`` is not <= 0, else 0 (a ReLU's backward, ``gate`` its output)."""
        self.rows_function(
            indptr.data_ptr(),
            indices.data_ptr(),
            values.data_ptr(),
            None if bias is None else bias.data_ptr(),
            indptr.numel() - 1,
            xt.data_ptr(),
            xt.shape[1],
            out.data_ptr(),
            int(relu),
            None if gate is None else gate.data_ptr(),
        )
        return out

    def sampled_dot(
        self, rows: torch.Tensor, indices: torch.Tensor, gt: torch.Tensor, xt: torch.Tensor
    ) -> torch.Tensor:
        """``(gt @ xt^T)`` at the survivors only: one value per (rows[k], indices[k])."""
        out = torch.empty(rows.numel(), dtype=torch.float32)
        self.dot_function(
            rows.data_ptr(),
            indices.data_ptr(),
            rows.numel(),
            gt.data_ptr(),
            xt.data_ptr(),
            xt.shape[1],
            out.data_ptr(),
        )
        return out

    def adam(
        self,
        tensors: tuple[torch.Tensor, ...],
        n: int,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        step: float,
    ) -> None:
        """``ticketlab_adam`` on the first ``n`` elements of contiguous float32 CPU tensors
        ``(param, grad, exp_avg, exp_avg_sq, keep)``, in place; ``step`` counts this update."""
        self.adam_function(*(t.data_ptr() for t in tensors), n, lr, *betas, eps, weight_decay, step)

    def features_first(self, h: torch.Tensor) -> torch.Tensor:
        """A new contiguous ``[K, F, B]`` copy of float32 ``h`` ``[K, B, F]`` on the CPU, whose
        features are contiguous (any stride between rows and networks, 0 for a shared batch)."""
        k, batch, features = h.shape
        if h.stride(2) != 1 or h.dtype != torch.float32 or not h.is_cpu:
            raise ValueError("features_first takes CPU float32 with contiguous features")
        out = torch.empty(k, features, batch)
        self.transpose_function(
            h.data_ptr(), k, batch, features, h.stride(0), h.stride(1), out.data_ptr()
        )
        return out


def csr_weight(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> ctypes._Pointer:
    """A pointer to the layer's ``CsrWeight``, converted once: a conversion per call is a good
    part of a call's cost at batch 1. The caller must keep the tensors alive and unchanged."""
    for tensor, dtype in ((indptr, torch.int32), (indices, torch.int32), (values, torch.float32)):
        if tensor.dtype != dtype or not tensor.is_contiguous() or not tensor.is_cpu:
            raise ValueError(f"the sparse kernel takes contiguous CPU {dtype}, not {tensor.dtype}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError("the sparse kernel takes a contiguous float32 bias")
    return ctypes.pointer(
        CsrWeight(
            indptr.data_ptr(),
            indices.data_ptr(),
            values.data_ptr(),
            None if bias is None else bias.data_ptr(),
            in_features,
            indptr.numel() - 1,
        )
    )


def enabled() -> bool:
    """``$TICKETLAB_SPARSE_KERNEL``: unset or 1 uses the kernels, 0 torch's CSR products; any
    other value is refused (a misspelt "off" must not silently keep them on)."""
    value = os.environ.get(SWITCH_ENV, "1").strip()
    if value not in ("0", "1"):
        raise TicketlabError(f"{SWITCH_ENV} must be 0 or 1, not {value!r}")
    return value == "1"


@functools.cache
def load() -> CsrKernel | None:
    """The kernel, built on first use and checked against a dense product; None (with one
    warning) when it cannot be had. Cached per process: the library is immutable once loaded."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "ticketlab: no C compiler (set $CC) to build the sparse inference kernel; "
            "SparseLinear uses torch's slower CSR product",
            stacklevel=2,
        )
        return None
    errors = []
    for arch in ARCH_FLAGS:
        try:
            kernel = _open(_build(compiler, arch))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(arch) or 'portable'}: {str(exc).strip().splitlines()[-1:]}")
            continue
        if _agrees_with_dense(kernel):
            return kernel
        errors.append(f"{' '.join(arch) or 'portable'}: wrong results on the check")
    warnings.warn(
        f"ticketlab: the sparse inference kernel could not be built with {compiler} "
        f"({'; '.join(errors)}); SparseLinear uses torch's slower CSR product",
        stacklevel=2,
    )
    return None


def _compiler() -> str | None:
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ticketlab" / "kernels"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build(compiler: str, arch: tuple[str, ...]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(FLAGS + arch).encode()])
        + _cpu_identity().encode()
    ).hexdigest()[:20]
    target = _cache_dir() / f"sparse_kernel-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, *arch, str(SOURCE), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: a concurrent process sees the old file or this one
    return target


def _open(path: Path) -> CsrKernel:
    library = ctypes.CDLL(str(path))
    linear = library.ticketlab_csr_linear
    linear.argtypes = [
        ctypes.POINTER(CsrWeight),
        ctypes.c_void_p,  # x
        ctypes.c_int64,  # batch
        ctypes.c_int64,  # row stride of x
        ctypes.c_void_p,  # y
    ]
    linear.restype = ctypes.c_int
    rows = library.ticketlab_csr_rows
    rows.argtypes = [
        ctypes.c_void_p,  # indptr
        ctypes.c_void_p,  # indices
        ctypes.c_void_p,  # values
        ctypes.c_void_p,  # bias or NULL
        ctypes.c_int64,  # rows
        ctypes.c_void_p,  # xt
        ctypes.c_int64,  # batch
        ctypes.c_void_p,  # out
        ctypes.c_int,  # relu on store
        ctypes.c_void_p,  # gate or NULL
    ]
    rows.restype = None
    dot = library.ticketlab_sampled_dot
    dot.argtypes = [
        ctypes.c_void_p,  # rows
        ctypes.c_void_p,  # indices
        ctypes.c_int64,  # nnz
        ctypes.c_void_p,  # gt
        ctypes.c_void_p,  # xt
        ctypes.c_int64,  # batch
        ctypes.c_void_p,  # out
    ]
    dot.restype = None
    transpose = library.ticketlab_transpose
    transpose.argtypes = [
        ctypes.c_void_p,  # src
        ctypes.c_int64,  # networks
        ctypes.c_int64,  # batch
        ctypes.c_int64,  # features
        ctypes.c_int64,  # stride between networks
        ctypes.c_int64,  # stride between rows
        ctypes.c_void_p,  # dst
    ]
    transpose.restype = None
    adam = library.ticketlab_adam
    adam.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_double] * 6
    adam.restype = None
    return CsrKernel(linear, rows, dot, transpose, adam, path)


def _agrees_with_dense(kernel: CsrKernel) -> bool:
    """A miscompiled kernel must not ship wrong answers: check every path (one row, a tile with a
    ragged end; features-first rows with an overlapping last chunk) on a small matrix whose sizes
    are not multiples of 16, against float64 products."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 53, generator=g) * (torch.rand(37, 53, generator=g) < 0.3)
    bias = torch.randn(37, generator=g)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        csr = weight.to_sparse_csr()
    indptr = csr.crow_indices().to(torch.int32)
    indices = csr.col_indices().to(torch.int32)
    values = csr.values().contiguous()
    w64 = weight.double()

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)

    weight_pointer = csr_weight(indptr, indices, values, bias, 53)
    for batch in (1, 45):
        x = torch.randn(batch, 53, generator=g)
        if not close(kernel.linear(x, weight_pointer, 37), x.double() @ w64.T + bias.double()):
            return False
    xt = torch.randn(53, 21, generator=g)
    gt = torch.randn(37, 21, generator=g)
    rows_of = torch.repeat_interleave(torch.arange(37), indptr[1:] - indptr[:-1]).int()
    forward = kernel.rows(indptr, indices, values, bias, xt, torch.empty(37, 21))
    gate = torch.randn(37, 21, generator=g)
    relu = kernel.rows(indptr, indices, values, bias, xt, torch.empty(37, 21), relu=True)
    gated = kernel.rows(indptr, indices, values, None, xt, torch.empty(37, 21), gate=gate)
    sampled = kernel.sampled_dot(rows_of, indices, gt, xt)
    full = gt.double() @ xt.double().T
    product = w64 @ xt.double()
    rows_first = torch.randn(3, 21, 40, generator=g)[:, :, 3:]  # strided rows, ragged sizes
    return (
        all(
            torch.equal(kernel.features_first(h), h.transpose(1, 2))
            for h in (rows_first, rows_first[:, :9], rows_first[:1].expand(2, -1, -1))
        )
        and close(forward, product + bias.double()[:, None])
        and close(relu, (product + bias.double()[:, None]).clamp_min(0))
        and close(gated, product * (gate > 0))
        and close(sampled, full[rows_of.long(), indices.long()])
    )
