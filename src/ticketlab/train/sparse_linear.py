"""The Linear layers of K masked networks as one block-diagonal sparse (CSR) matrix.

Why: at the late levels of IMP and the sparse end of a sweep, a dense matmul spends almost all of
its FLOPs multiplying weights that are exactly zero. Storing only the survivors (K networks' blocks
on the diagonal of one ``[K*out, K*in]`` CSR matrix) makes a training step cost what the surviving
weights cost: forward ``A @ X^T``, input gradient ``A^T @ G`` (through a precomputed transposed
pattern), weight gradient sampled at the survivors only (``torch.sparse.sampled_addmm``). The
optimizer then steps only the survivors too, and pruned weights cannot move: they do not exist.

The blocks never mix: each output row of every product belongs to one network, so stacking changes
how the arithmetic is grouped, not what is computed (equal to one-by-one training up to float
rounding, like the dense path). On the CPU in float32 the three products run in ticketlab's
compiled kernels (``sparse_kernel``; batches of 16 or more), because torch's CSR kernels pay a
large fixed cost per call (``benchmarks/sparse_step.py`` with and without
``TICKETLAB_SPARSE_KERNEL=0``); elsewhere (GPUs, float64, no C compiler) torch's kernels run
them. ``benchmarks/throughput.py`` prints both paths over an IMP schedule.
"""

from __future__ import annotations

import warnings

import torch

from . import sparse_kernel

# torch says once per process that CSR support is "beta"; the kernels used here (CSR @ dense,
# sampled_addmm) are tested against the dense path in tests/test_sparse_linear.py.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

#: A Linear layer trains sparse when every network of the stack keeps less than this fraction of
#: its weights (the break-even of the MNIST-1D MLP; LeNet-300-100's is nearer 28%).
SPARSE_BELOW = 0.2


class BlockPattern:
    """Where the survivors of K masks of one Linear weight sit, in CSR form and transposed.

    ``keep`` is ``[K, out, in]`` (the ``nn.Linear`` layout). The values are the surviving weights
    in ``keep``'s row-major order, which is CSR order of ``A`` (row ``k*out + o``, column
    ``k*in + i``).
    """

    def __init__(self, keep: torch.Tensor):
        k, out, inp = keep.shape
        self.keep = keep.bool()
        where = self.keep.nonzero()
        rows = where[:, 0] * out + where[:, 1]
        cols = where[:, 0] * inp + where[:, 2]
        self.shape = (k * out, k * inp)
        self.nnz = int(rows.numel())
        # int32 indices: what MKL's kernels take (int64 ones would be converted at every call)
        self.crow = _compressed(rows, k * out)
        self.col = cols.int()
        self.row = rows.int()  # each survivor's row: the compiled weight gradient walks them
        # A^T in CSR: the same values visited column by column of A
        self.transpose_order = torch.argsort(cols * (k * out) + rows)
        self.crow_t = _compressed(cols, k * inp)
        self.col_t = rows[self.transpose_order].int()
        self._zeros: torch.Tensor | None = None

    def zero_matrix(self, like: torch.Tensor) -> torch.Tensor:
        """The pattern with zero values (``sampled_addmm``'s structure argument), made once: a
        fill of ``nnz`` zeros every step cost as much as a small layer's product."""
        if self._zeros is None or self._zeros.dtype != like.dtype:
            self._zeros = self.matrix(like.new_zeros(self.nnz))
        return self._zeros

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.crow_t,
            self.col_t,
            values[self.transpose_order],
            (self.shape[1], self.shape[0]),
            check_invariants=False,
        )

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """``[K, out, in]`` -> the survivors' values."""
        return dense[self.keep]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The survivors' values -> ``[K, out, in]`` with zeros elsewhere."""
        dense = values.new_zeros(self.keep.shape)
        dense[self.keep] = values
        return dense


def _compressed(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(sorted_rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()


class BlockSparseLinear(torch.autograd.Function):
    """``A(values) @ ht + bias`` per network for features-first ``ht`` ``[K, in, B]`` and ``bias``
    ``[K*out, 1]`` (or None), with gradients for all three; the result is ``[K, out, B]``.

    The reshapes between ``[K, F, B]`` and ``[K*F, B]`` happen in here, out of autograd's sight:
    the output is a tensor of its own, not a view, so the ReLU after it can run in place without
    autograd rebuilding the base through ``as_strided`` (a zero fill and two copies of the layer's
    output every step, more than the product itself at 1% density). The bias rides in the product
    (``addmm``'s input term), which saves a broadcast pass over the output.

    Between two sparse layers the ReLU rides in the products too: the first layer's output goes
    through it as it is stored (``relu``), and the second layer's input gradient is gated by its
    input as it is stored (``gate_input``: ReLU's backward, since that input *is* the ReLU's
    output). A ``relu`` layer's backward therefore takes its gradient as already gated: its output
    must feed a ``gate_input`` layer and nothing else. Each of the two passes this saves, over
    ``[K, features, B]`` activations, cost about as much as a product at 5% density."""

    @staticmethod
    def forward(
        ctx, values, ht, bias, pattern: BlockPattern, relu: bool = False, gate_input: bool = False
    ):
        k, inp, batch = ht.shape
        compiled = _compiled_kernel(values, ht)
        if compiled is None:
            xt = ht.reshape(k * inp, batch)
        else:
            values = values.contiguous()
            if ht.stride(1) == 1 and not ht.is_contiguous():  # a [K, B, F] batch, seen transposed
                xt = compiled.features_first(ht.transpose(1, 2)).view(k * inp, batch)
            else:
                xt = ht.reshape(k * inp, batch).contiguous()
        ctx.save_for_backward(values, xt)
        ctx.pattern, ctx.input_shape, ctx.compiled = pattern, ht.shape, compiled
        ctx.gate_input = gate_input
        out = xt.new_empty(k, pattern.shape[0] // k, batch)  # returned whole: not a view
        if compiled is not None:
            flat_bias = None if bias is None else bias.reshape(-1).contiguous()
            compiled.rows(pattern.crow, pattern.col, values, flat_bias, xt, out, relu=relu)
            return out
        a = pattern.matrix(values)
        if bias is None:
            torch.mm(a, xt, out=out.view(-1, batch))
        else:
            torch.addmm(bias.expand(pattern.shape[0], batch), a, xt, out=out.view(-1, batch))
        return out.relu_() if relu else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, xt = ctx.saved_tensors
        pattern: BlockPattern = ctx.pattern
        compiled: sparse_kernel.CsrKernel | None = ctx.compiled
        grad = grad.reshape(pattern.shape[0], -1).contiguous()  # no copy when it already is
        grad_values = grad_ht = grad_bias = None
        if ctx.needs_input_grad[0]:
            if compiled is not None:
                grad_values = compiled.sampled_dot(pattern.row, pattern.col, grad, xt)
            else:
                zeros = pattern.zero_matrix(values)
                grad_values = torch.sparse.sampled_addmm(zeros, grad, xt.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            if compiled is not None:
                grad_ht = compiled.rows(
                    pattern.crow_t,
                    pattern.col_t,
                    values.index_select(0, pattern.transpose_order),  # 4x faster than [...]
                    None,
                    grad,
                    xt.new_empty(ctx.input_shape),
                    gate=xt if ctx.gate_input else None,
                )
            else:
                grad_ht = pattern.transposed(values) @ grad
                if ctx.gate_input:
                    grad_ht = torch.ops.aten.threshold_backward(grad_ht, xt, 0)
                grad_ht = grad_ht.view(ctx.input_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(1, keepdim=True)
        return grad_values, grad_ht, grad_bias, None, None, None


def _compiled_kernel(values: torch.Tensor, ht: torch.Tensor) -> sparse_kernel.CsrKernel | None:
    """The compiled kernels where they apply: float32 on the CPU, batches of 16 or more (their
    16-wide chunks), not switched off; else None and torch's CSR kernels."""
    if values.dtype != torch.float32 or ht.dtype != torch.float32 or ht.shape[-1] < 16:
        return None
    if ht.device.type != "cpu" or not sparse_kernel.enabled():
        return None
    return sparse_kernel.load()


def sparse_linear(
    ht: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: BlockPattern,
    relu: bool = False,
    gate_input: bool = False,
) -> torch.Tensor:
    """Features-first activations: ``ht`` ``[K, in, B]`` -> ``[K, out, B]``; ``bias`` is
    ``[K, 1, out]``, the stack's working layout.

    The CSR products want ``X^T``; activations that stay features-first between sparse layers
    are never transposed (a ``[K, B, F]`` <-> ``[K, F, B]`` copy costs about as much as the
    product itself at 1% density), and every elementwise kernel sees operands of one layout
    (given one transposed operand, ReLU's backward runs several times slower). ``relu`` and
    ``gate_input``: a ReLU between two sparse layers, fused as ``BlockSparseLinear`` says.
    """
    flat_bias = None if bias is None else bias.reshape(-1, 1)
    return BlockSparseLinear.apply(values, ht, flat_bias, pattern, relu, gate_input)
