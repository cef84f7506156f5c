"""The sparse path computes what the dense masked path computes, for every network of a stack.

Float64 throughout where results are compared across paths, so any indexing mistake (a value in
the wrong block, a transposed pattern, a gradient landing on the wrong survivor) shows up far above
the rounding noise.
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_trainer import (
    TOL,
    MemoryCheckpointer,
    assert_close,
    assert_identical,
    digits,  # noqa: F401  (fixture)
    spec,
    state_of,
)
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train import sparse_kernel
from ticketlab.train.sparse_linear import BlockPattern, sparse_linear
from ticketlab.train.stacked import SequentialStack, stack_networks
from ticketlab.train.trainer import Job, train, train_stack
from ticketlab.zoo.models import build_model

SPARSE_SPARSITIES = (0.9, 0.95, 0.99)


def sparse_jobs(data, sparsities=SPARSE_SPARSITIES, model="lenet_300_100"):
    template = build_model(model, data.input_shape, data.num_classes, seed=0)
    jobs = []
    for i, sparsity in enumerate(sparsities):
        net = build_model(model, data.input_shape, data.num_classes, seed=200 + i)
        g = torch.Generator().manual_seed(50 + i)
        params = dict(net.named_parameters())
        keep = {
            n: torch.rand(params[n].shape, generator=g) >= sparsity for n in prunable_names(net)
        }
        jobs.append(Job(init=state_of(net), mask=Mask(keep), data_seed=11 * i + 1))
    return template, jobs


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("densities", [(0.3, 0.05, 0.0), (1.0, 0.5, 0.01)])
def test_block_sparse_linear_matches_dense_masked_linear(densities, with_bias):
    """Values, input gradient and bias gradient, with blocks of different densities, an empty
    block and a full one."""
    g = torch.Generator().manual_seed(0)
    k, batch, inp, out = len(densities), 7, 13, 5
    keep = torch.stack([torch.rand(out, inp, generator=g) < d for d in densities])
    dense_w = torch.randn(k, out, inp, generator=g, dtype=torch.float64) * keep
    pattern = BlockPattern(keep)
    assert pattern.nnz == int(keep.sum())
    assert torch.equal(pattern.scatter(pattern.gather(dense_w)), dense_w)

    values = pattern.gather(dense_w).requires_grad_()
    dense = dense_w.clone().requires_grad_()
    bias = torch.randn(k, 1, out, generator=g, dtype=torch.float64, requires_grad=with_bias)
    x = torch.randn(k, batch, inp, generator=g, dtype=torch.float64, requires_grad=True)
    sparse_bias = bias if with_bias else None
    sparse_out = sparse_linear(x.transpose(1, 2), values, sparse_bias, pattern).transpose(1, 2)
    dense_out = torch.bmm(x, dense.transpose(1, 2))
    dense_out = dense_out + bias if with_bias else dense_out
    torch.testing.assert_close(sparse_out, dense_out, rtol=0, atol=1e-12)

    upstream = torch.randn(k, batch, out, generator=g, dtype=torch.float64)
    inputs = (values, x, bias) if with_bias else (values, x)
    dense_inputs = (dense, x, bias) if with_bias else (dense, x)
    got = torch.autograd.grad(sparse_out, inputs, upstream)
    want = torch.autograd.grad(dense_out, dense_inputs, upstream)
    torch.testing.assert_close(got[0], want[0][keep], rtol=0, atol=1e-12)  # survivors only
    for a, b in zip(got[1:], want[1:], strict=True):  # the input's and the bias's gradients
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("model", "steps"), [("lenet_300_100", 30), ("conv2", 8)])
def test_sparse_training_equals_dense_training(digits, model, steps):  # noqa: F811
    """For Conv-2 the convolutions stay dense and its Linear layers (after Flatten) go sparse."""
    template, jobs = sparse_jobs(digits, model=model)
    s = spec(steps=steps)
    sparse = train(template, jobs, digits, s, stack_size=3, sparse_below=1.0)
    dense = train(template, jobs, digits, s, stack_size=3, sparse_below=0.0)
    for a, b in zip(sparse, dense, strict=True):
        assert_close(a, b)
        assert a.curve["val_loss"][-1] != a.curve["val_loss"][0]


def test_sparse_stack_equals_one_by_one(digits):  # noqa: F811
    template, jobs = sparse_jobs(digits)
    s = spec(steps=30)
    stacked = train(template, jobs, digits, s, stack_size=3)
    alone = train(template, jobs, digits, s, stack_size=1)
    for a, b in zip(stacked, alone, strict=True):
        assert_close(a, b, tol=TOL)


def test_paths_are_chosen_by_every_networks_density(digits):  # noqa: F811
    template, jobs = sparse_jobs(digits, sparsities=(0.95, 0.5))
    for members, expected in (([0], {"1.weight", "3.weight", "5.weight"}), ([0, 1], set())):
        inits = [jobs[i].init for i in members]
        stack = stack_networks(template, inits, torch.float32, digits.x_train)
        keep = {n: torch.stack([jobs[i].mask[n] for i in members]) for n in jobs[0].mask.names()}
        assert isinstance(stack, SequentialStack)
        assert stack.sparsify(keep, below=0.2) == expected
    # a sparse layer's parameter is its survivors; the canonical state puts them back in place
    solo = stack_networks(template, [jobs[0].init], torch.float64, digits.x_train.double())
    solo.sparsify({n: jobs[0].mask[n].unsqueeze(0) for n in jobs[0].mask.names()})
    for name in jobs[0].mask.names():
        assert solo.params[name].shape == (int(jobs[0].mask[name].sum()),)
        expected = jobs[0].init[name].double() * jobs[0].mask[name]
        assert torch.equal(solo.to_canonical(name, solo.params[name])[0], expected)


def test_pruned_weights_stay_exactly_zero_on_the_sparse_path(digits):  # noqa: F811
    template, jobs = sparse_jobs(digits)
    results = train(template, jobs, digits, spec(steps=25, dtype="float32"))
    for job, result in zip(jobs, results, strict=True):
        for name in job.mask.names():
            keep = job.mask[name]
            assert bool((result.final[name][~keep] == 0).all()), name
            moved = result.final[name][keep] != job.init[name][keep]
            assert bool(moved.any()), name


def test_sparse_checkpoint_resume_is_bit_identical(digits):  # noqa: F811
    template, jobs = sparse_jobs(digits)
    s = spec(steps=20, dtype="float32")
    first = MemoryCheckpointer(every=6)
    full = train_stack(template, jobs, digits, s, checkpointer=first)
    assert [state["step"] for state in first.saved] == [6, 12, 18]
    for saved in first.saved:
        again = copy.deepcopy(saved)
        resumed = train_stack(template, jobs, digits, s, checkpointer=MemoryCheckpointer(6, again))
        for a, b in zip(full, resumed, strict=True):
            assert_identical(a, b)


def test_checkpoint_of_the_other_layout_is_retrained_not_misread(digits):  # noqa: F811
    """A dense-layout checkpoint met by a sparse stack (or the reverse) cannot be loaded into it:
    training restarts from the init and reaches the same bits as a run without checkpoint."""
    template, jobs = sparse_jobs(digits)
    s = spec(steps=12, dtype="float32")
    dense = MemoryCheckpointer(every=6)
    train_stack(template, jobs, digits, s, checkpointer=dense, sparse_below=0.0)
    fresh = train_stack(template, jobs, digits, s)
    resumed = train_stack(
        template, jobs, digits, s, checkpointer=MemoryCheckpointer(6, dense.saved[0])
    )
    for a, b in zip(fresh, resumed, strict=True):
        assert_identical(a, b)


def test_a_sweep_is_stacked_by_density_and_returned_in_order(digits):  # noqa: F811
    """Mixed densities, interleaved: the two sparse networks share a stack (so it takes the sparse
    path, bit for bit what they give stacked on their own), and results come back in job order."""
    template, jobs = sparse_jobs(digits, sparsities=(0.5, 0.95, 0.5, 0.95))
    s = spec(steps=12, dtype="float32")
    mixed = train(template, jobs, digits, s, stack_size=2, lanes=1)
    sparse_pair = train(template, [jobs[1], jobs[3]], digits, s, stack_size=2, lanes=1)
    dense_pair = train(template, [jobs[0], jobs[2]], digits, s, stack_size=2, lanes=1)
    expected = [dense_pair[0], sparse_pair[0], dense_pair[1], sparse_pair[1]]
    for got, want in zip(mixed, expected, strict=True):
        assert_identical(got, want)
    alone = train(template, jobs, digits, spec(steps=12), stack_size=1)
    together = train(template, jobs, digits, spec(steps=12), stack_size=2)
    for a, b in zip(together, alone, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize(
    ("dtype", "batch", "kernel"),
    [(torch.float64, 7, "0"), (torch.float32, 37, "1"), (torch.float32, 37, "0")],
)
def test_a_relu_between_sparse_layers_fused_matches_autograd(monkeypatch, dtype, batch, kernel):
    """``relu``/``gate_input`` (torch's CSR path in float64 and float32, the compiled kernels in
    float32 at a batch they take) against plain autograd of relu(x W1^T + b1) W2^T + b2 on the
    dense masked weights: outputs and every gradient."""
    from ticketlab.train import sparse_kernel

    monkeypatch.setenv(sparse_kernel.SWITCH_ENV, kernel)
    g = torch.Generator().manual_seed(3)
    k, sizes = 2, (19, 23, 5)
    keeps = [torch.rand(k, o, i, generator=g) < 0.3 for i, o in zip(sizes, sizes[1:], strict=False)]
    dense = [torch.randn(m.shape, generator=g, dtype=dtype) * m for m in keeps]
    biases = [torch.randn(k, 1, m.shape[1], generator=g, dtype=dtype) for m in keeps]
    patterns = [BlockPattern(m) for m in keeps]
    values = [p.gather(w).requires_grad_() for p, w in zip(patterns, dense, strict=True)]
    sparse_b = [b.clone().requires_grad_() for b in biases]
    x = torch.randn(k, batch, sizes[0], generator=g, dtype=dtype)
    h = sparse_linear(x.transpose(1, 2), values[0], sparse_b[0], patterns[0], relu=True)
    out = sparse_linear(h, values[1], sparse_b[1], patterns[1], gate_input=True).transpose(1, 2)

    ref_w = [w.clone().requires_grad_() for w in dense]
    ref_b = [b.clone().requires_grad_() for b in biases]
    ref_h = torch.relu(torch.baddbmm(ref_b[0], x, ref_w[0].transpose(1, 2)))
    ref = torch.baddbmm(ref_b[1], ref_h, ref_w[1].transpose(1, 2))
    tol = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, ref, **tol)
    upstream = torch.randn(ref.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(out, [*values, *sparse_b], upstream)
    want = torch.autograd.grad(ref, [*ref_w, *ref_b], upstream)
    for i in range(2):
        torch.testing.assert_close(got[i], want[i][keeps[i]], **tol)  # survivors only
        torch.testing.assert_close(got[2 + i], want[2 + i], **tol)


def test_fused_relus_change_no_bit_of_training(digits, monkeypatch):  # noqa: F811
    """LeNet-300-100 at 5%: both ReLUs ride in the sparse products, and a float32 run on the
    compiled kernels gives the same bits as one with the ReLUs run by autograd."""
    template, jobs = sparse_jobs(digits, sparsities=(0.95, 0.95))
    s = spec(steps=30, dtype="float32", batch_size=32)
    stack = SequentialStack(template, [j.init for j in jobs], torch.float32)
    stack.sparsify({n: torch.stack([j.mask[n] for j in jobs]) for n in jobs[0].mask.names()}, 1.0)
    assert stack._folded_relus == {2, 4}  # Flatten, Linear, ReLU, Linear, ReLU, Linear
    fused = train(template, jobs, digits, s, lanes=1)
    original = SequentialStack.sparsify

    def unfused(self, *args, **kwargs):
        chosen = original(self, *args, **kwargs)
        self._folded_relus = frozenset()
        return chosen

    monkeypatch.setattr(SequentialStack, "sparsify", unfused)
    plain = train(template, jobs, digits, s, lanes=1)
    for a, b in zip(fused, plain, strict=True):
        assert_identical(a, b)


def test_a_relu_next_to_a_dense_layer_is_not_fused(digits):  # noqa: F811
    template, jobs = sparse_jobs(digits, sparsities=(0.95,))
    stack = SequentialStack(template, [jobs[0].init], torch.float32)
    keep = {n: jobs[0].mask[n].unsqueeze(0) for n in jobs[0].mask.names()}
    keep["3.weight"] = torch.ones_like(keep["3.weight"])  # the middle layer stays dense
    stack.sparsify(keep, 0.2)
    assert stack._folded_relus == frozenset()


def test_the_fused_relu_treats_nan_and_signed_zeros_as_torchs_relu_does():
    """A diverging network's NaN and infinite activations, zeros of both signs: the fused ReLU is
    torch's ReLU of the unfused product to the bit, and the gate is torch's ReLU backward (which
    passes the gradient where the ReLU's output is NaN)."""
    kernel = sparse_kernel.load()
    if kernel is None:
        pytest.skip("no compiled kernel here")
    n, batch = 4, 16
    identity = torch.eye(n).to_sparse_csr()
    indptr, indices = identity.crow_indices().int(), identity.col_indices().int()
    values = identity.values().contiguous()
    special = torch.tensor([float("nan"), -0.0, 0.0, -1.0, 2.0, float("-inf"), 3.0, -2.0])
    xt = special.repeat(n * batch // len(special)).view(n, batch)
    bias = torch.tensor([0.0, -0.0, 1.0, -1.0])

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int32)

    product = kernel.rows(indptr, indices, values, bias, xt, torch.empty(n, batch))
    relu = kernel.rows(indptr, indices, values, bias, xt, torch.empty(n, batch), relu=True)
    assert torch.equal(bits(relu), bits(torch.relu(product)))
    grad = torch.randn(n, batch)
    unfused = kernel.rows(indptr, indices, values, None, grad, torch.empty(n, batch))
    gated = kernel.rows(indptr, indices, values, None, grad, torch.empty(n, batch), gate=xt)
    assert torch.equal(bits(gated), bits(torch.ops.aten.threshold_backward(unfused, xt, 0)))
    assert bool(gated[xt.isnan()].ne(0).all())  # the gradient passes where the output is NaN


@pytest.mark.parametrize(
    "shape, rows, networks",
    [
        (
            (3, 60, 784),
            slice(None),
            slice(None),
        ),  # LeNet's batch: whole 16x16 blocks and a ragged one
        ((2, 40, 37), slice(3, 24), slice(None)),  # strided rows, sizes not multiples of 16
        ((1, 21, 50), slice(None), [0, 0, 0]),  # one batch shared by three networks (stride 0)
        ((2, 9, 70), slice(None), slice(None)),  # fewer than 16 rows: the plain loop
        ((2, 30, 5), slice(None), slice(None)),  # fewer than 16 features
    ],
)
def test_the_compiled_features_first_copy_moves_every_float_exactly(shape, rows, networks):
    kernel = sparse_kernel.load()
    if kernel is None:
        pytest.skip("no C compiler")
    h = torch.randn(shape)
    h[0, 0, 0], h[-1, -1, -1] = float("nan"), -0.0
    h = h[:, rows]
    if isinstance(networks, list):
        h = h.expand(len(networks), -1, -1)
    got = kernel.features_first(h)
    assert got.is_contiguous() and got.shape == (h.shape[0], h.shape[2], h.shape[1])
    assert torch.equal(got.view(torch.int32), h.transpose(1, 2).contiguous().view(torch.int32))
