"""The compiled CSR kernel behind SparseLinear: equal to a dense product written here, on every
path (one row, a few rows, whole and ragged tiles, sizes off the 16-wide blocks), and never worse
than torch's CSR product when it cannot be had."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from ticketlab.io.export import SparseLinear, sparse_inference
from ticketlab.train import sparse_kernel

needs_kernel = pytest.mark.skipif(
    sparse_kernel.load() is None, reason="no C compiler here to build the sparse kernel"
)


def masked_linear(n_in: int, n_out: int, density: float, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(n_out, n_in) < density)
    return layer


def reference(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The product in float64, by hand: no nn.Linear, no sparse code."""
    y = x.double() @ layer.weight.detach().double().T
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    return y


SHAPES = [  # (in, out, density): blocks of 16, ragged ends, empty rows, a dense and an empty one
    (784, 300, 0.05),
    (53, 37, 0.3),
    (16, 32, 1.0),
    (5, 17, 0.5),
    (100, 33, 0.0),
    (1, 1, 1.0),
]


@needs_kernel
@pytest.mark.parametrize("n_in,n_out,density", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_the_dense_product_on_every_path(n_in, n_out, density, bias):
    layer = masked_linear(n_in, n_out, density, bias, seed=n_in + n_out)
    sparse = SparseLinear(layer)
    assert sparse.kernel and "compiled kernel" in repr(sparse)
    with torch.no_grad():
        for batch in (0, 1, 2, 3, 4, 15, 31, 32, 33, 64, 100):
            x = torch.randn(batch, n_in)
            y = sparse(x)
            assert y.shape == (batch, n_out) and y.dtype == torch.float32 and y.is_contiguous()
            torch.testing.assert_close(y.double(), reference(layer, x), rtol=1e-5, atol=1e-5)
            strided = torch.randn(n_in, batch).t()  # rows not contiguous: taken as they are
            torch.testing.assert_close(
                sparse(strided).double(), reference(layer, strided), rtol=1e-5, atol=1e-5
            )
        x3 = torch.randn(2, 3, n_in)  # leading dimensions, as nn.Linear allows
        torch.testing.assert_close(sparse(x3).double(), reference(layer, x3), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_kernel_is_what_runs():
    """Not torch's CSR product under another name: with torch's path broken, answers still come."""
    layer = masked_linear(784, 300, 0.05, True, seed=0)
    sparse = SparseLinear(layer)
    sparse.weight = None  # torch's product would fail on this
    x = torch.randn(64, 784)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_torch_csr_path_when_switched_off_or_not_float32(monkeypatch):
    layer = masked_linear(53, 37, 0.3, True, seed=1)
    monkeypatch.setenv(sparse_kernel.SWITCH_ENV, "0")
    off = SparseLinear(layer)
    assert not off.kernel and "torch CSR" in repr(off)
    monkeypatch.delenv(sparse_kernel.SWITCH_ENV)
    assert not SparseLinear(layer, kernel=False).kernel
    double = SparseLinear(masked_linear(53, 37, 0.3, True, seed=1).double())
    assert not double.kernel
    x = torch.randn(9, 53)
    with torch.no_grad():
        torch.testing.assert_close(off(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(double(x.double()), reference(layer, x))


def test_gradients_through_the_input_take_torchs_path():
    """The kernel has no backward: an input that wants a gradient gets torch's product and its
    gradient, equal to autograd through the dense layer."""
    layer = masked_linear(53, 37, 0.3, True, seed=2)
    sparse = SparseLinear(layer)
    x = torch.randn(6, 53, requires_grad=True)
    sparse(x).sum().backward()
    expected = layer.weight.detach().sum(0).expand(6, 53)
    torch.testing.assert_close(x.grad, expected)


def test_pickles_and_works_after_loading():
    layer = masked_linear(53, 37, 0.3, True, seed=3)
    sparse = SparseLinear(layer)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    again = pickle.loads(pickle.dumps(sparse))
    x = torch.randn(40, 53)
    with torch.no_grad():
        for module in (loaded, again):
            torch.testing.assert_close(
                module(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5
            )


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.warns(UserWarning, match="could not be built with .*false"):
        assert sparse_kernel.load.__wrapped__() is None
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="no C compiler"):
        assert sparse_kernel.load.__wrapped__() is None
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


@needs_kernel
def test_built_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = sparse_kernel.load.__wrapped__()
    assert first is not None and first.path.parent == tmp_path / "ticketlab" / "kernels"
    stamp = first.path.stat().st_mtime_ns
    second = sparse_kernel.load.__wrapped__()
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]


def test_sparse_inference_takes_the_small_layers_only_with_the_kernel():
    model = nn.Sequential(nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape) < 0.05)
    with_kernel = ["SparseLinear", "ReLU", "SparseLinear"]
    without = ["Linear", "ReLU", "Linear"]  # torch's CSR pays only on larger layers
    kinds = [type(m).__name__ for m in sparse_inference(model)]
    assert kinds == (with_kernel if sparse_kernel.load() is not None else without)
    assert [type(m).__name__ for m in sparse_inference(model, kernel=False)] == without


@needs_kernel
@pytest.mark.parametrize("batch", [16, 21, 60, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_training_kernels_match_autograd_through_dense_masked_weights(batch, with_bias):
    """The sparse training path on the compiled kernels (float32): forward, the survivors'
    gradient, the input gradient and the bias gradient, against autograd through dense masked
    weights in float64 (blocks of different densities, an empty and a full one)."""
    from ticketlab.train.sparse_linear import BlockPattern, sparse_linear

    g = torch.Generator().manual_seed(batch)
    densities = (0.3, 0.05, 0.0, 1.0)
    k, inp, out = len(densities), 37, 19
    keep = torch.stack([torch.rand(out, inp, generator=g) < d for d in densities])
    weight = torch.randn(k, out, inp, generator=g) * keep
    pattern = BlockPattern(keep)
    values = pattern.gather(weight).requires_grad_()
    ht = torch.randn(k, inp, batch, generator=g).requires_grad_()
    bias = torch.randn(k, 1, out, generator=g).requires_grad_() if with_bias else None
    upstream = torch.randn(k, out, batch, generator=g)
    y = sparse_linear(ht, values, bias, pattern)
    y.backward(upstream)

    w64 = weight.double().requires_grad_()
    h64 = ht.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    y64 = (w64 * keep) @ h64 + (b64.transpose(1, 2) if with_bias else 0)
    y64.backward(upstream.double())
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.double(), y64.detach(), **close)
    torch.testing.assert_close(values.grad.double(), pattern.gather(w64.grad), **close)
    torch.testing.assert_close(ht.grad.double(), h64.grad, **close)
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), b64.grad, **close)


@needs_kernel
def test_training_kernels_are_used_and_torchs_give_the_same_steps(monkeypatch):
    """A whole training run on the kernels equals one on torch's CSR kernels up to float rounding
    (same masks, same data order), and the kernels are what ran."""
    from ticketlab.core.mask import Mask, prunable_names
    from ticketlab.train.trainer import Job, TrainSpec, train
    from ticketlab.zoo.data import load_dataset
    from ticketlab.zoo.models import build_model

    data = load_dataset("digits", 0.1, 0)
    template = build_model("lenet_300_100", data.input_shape, data.num_classes, seed=0)
    g = torch.Generator().manual_seed(0)
    init = {n: t.detach().clone() for n, t in template.state_dict().items()}
    keep = {n: torch.rand(init[n].shape, generator=g) < 0.05 for n in prunable_names(template)}
    jobs = [Job(init=init, mask=Mask(keep), data_seed=s) for s in (1, 2)]
    spec = TrainSpec(steps=30, batch_size=32, lr=1e-3, eval_every=30)
    calls = []
    original = sparse_kernel.CsrKernel.rows
    monkeypatch.setattr(
        sparse_kernel.CsrKernel,
        "rows",
        lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw),
    )
    ours = train(template, jobs, data, spec, lanes=1)
    assert calls, "the compiled kernels did not run"
    monkeypatch.setenv(sparse_kernel.SWITCH_ENV, "0")
    calls.clear()
    torchs = train(template, jobs, data, spec, lanes=1)
    assert not calls
    for a, b in zip(ours, torchs, strict=True):
        for name in a.final:
            torch.testing.assert_close(a.final[name], b.final[name], rtol=1e-4, atol=1e-5)
            if name in keep:
                assert not a.final[name][~keep[name]].any()  # pruned weights stay exactly zero


def test_a_bad_switch_value_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    from test_fs_refusals import TINY, one_line
    from ticketlab.cli import main
    from ticketlab.errors import TicketlabError

    monkeypatch.setenv(sparse_kernel.SWITCH_ENV, "off")
    with pytest.raises(TicketlabError, match="must be 0 or 1, not 'off'"):
        sparse_kernel.enabled()
    assert main(["find", *TINY, "--out", str(tmp_path / "run")]) == 2
    assert "TICKETLAB_SPARSE_KERNEL must be 0 or 1" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "level_00").exists()  # refused before any training
