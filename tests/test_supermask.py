"""Supermasks train masks, never weights: the weights come back bit for bit, edge-popup keeps
exactly k per layer, and a learned supermask on untrained weights beats chance on real digits."""

import copy

import pytest
import torch
from torch.func import functional_call

from ticketlab.core.mask import prunable_names
from ticketlab.errors import TicketlabError
from ticketlab.train.supermask import (
    BernoulliST,
    TopKST,
    default_spec,
    edge_popup,
    find_supermasks,
    frozen_weights,
    learned_supermask,
    n_keep,
)
from ticketlab.train.trainer import TrainSpec
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _net(data, seed):
    model = build_model("lenet_300_100", data.input_shape, data.num_classes, seed)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _accuracy(model, state, data):
    with torch.no_grad():
        logits = functional_call(model, state, (data.x_test,))
    return float((logits.argmax(-1) == data.y_test).double().mean())


@pytest.mark.parametrize("method", ["learned", "edge_popup"])
def test_supermask_changes_no_weight(digits, method):
    template, _ = _net(digits, 0)
    inits = [_net(digits, s)[1] for s in (1, 2)]
    before = copy.deepcopy(inits)
    spec = TrainSpec(steps=25, batch_size=64, lr=0.05, eval_every=25)
    results = find_supermasks(
        template, inits, digits, spec, method=method, weights="init", seeds=[1, 2]
    )
    for init, kept, res in zip(inits, before, results, strict=True):
        assert init.keys() == kept.keys() == res.weights.keys()
        for name in init:
            assert torch.equal(init[name], kept[name])  # the caller's tensors untouched
            assert torch.equal(res.weights[name], kept[name])  # returned weights = the init
        # the mask is not trivial: something was selected, something dropped
        assert 0.2 < res.mask.density() < 0.8
        # the reported accuracy is that of plain weights * mask in an ordinary nn.Module
        assert _accuracy(template, res.masked_state(), digits) == pytest.approx(res.test_acc)
    # the training curve starts at the random mask and moves
    assert results[0].curve["iteration"] == [0.0, 25.0]


def test_dynamic_weight_rescaling_is_what_the_accuracy_measures(digits):
    """With ``rescale``, each layer's kept weights are scaled by size / kept: in the reported
    network (``masked_state``), and in what ``test_acc`` evaluated; the weights stay untouched."""
    template, _ = _net(digits, 0)
    inits = [_net(digits, s)[1] for s in (3, 4)]
    spec = TrainSpec(steps=25, batch_size=64, lr=0.05, eval_every=25)
    plain, scaled = (
        find_supermasks(template, inits, digits, spec, seeds=[3, 4], rescale=rescale)
        for rescale in (False, True)
    )
    names = prunable_names(template)
    for init, res in zip(inits, scaled, strict=True):
        assert res.rescaled and res.metrics()["rescaled"]
        state = res.masked_state()
        for name, weight in init.items():
            assert torch.equal(res.weights[name], weight)
            if name in names:
                keep = res.mask[name]
                factor = keep.numel() / int(keep.sum())
                torch.testing.assert_close(state[name], weight * keep * factor)
            else:
                assert torch.equal(state[name], weight)  # biases: never masked nor scaled
        assert _accuracy(template, state, digits) == pytest.approx(res.test_acc)
    # the rescaling changed what the network computes (so, here, what it learned)
    assert [r.test_acc for r in plain] != [r.test_acc for r in scaled]


def test_conv_net_edge_popup(digits):
    """Conv2d layers get scores too (grouped or looped per network by the stack)."""
    template = build_model("conv2", digits.input_shape, digits.num_classes, 0)
    init = {k: v.detach().clone() for k, v in template.state_dict().items()}
    spec = default_spec("edge_popup", steps=4, batch_size=16)
    res = edge_popup(template, init, digits, spec, density=0.4, weights="kaiming_normal")
    assert any(res.mask[n].dim() == 4 for n in res.mask.names())  # conv weights are masked
    for name in prunable_names(template):
        assert int(res.mask[name].sum()) == n_keep(res.mask[name].numel(), 0.4)
    assert _accuracy(template, res.masked_state(), digits) == pytest.approx(res.test_acc)


@pytest.mark.parametrize("method", ["learned", "edge_popup"])
def test_side_by_side_equals_one_by_one(digits, method):
    template, _ = _net(digits, 0)
    inits = [_net(digits, s)[1] for s in (6, 7)]
    spec = default_spec(method, steps=15, batch_size=64)
    kwargs = {"method": method, "seeds": [6, 7], "samples": 2}
    stacked = find_supermasks(template, inits, digits, spec, stack_size=2, **kwargs)
    alone = find_supermasks(template, inits, digits, spec, stack_size=1, **kwargs)
    for a, b in zip(stacked, alone, strict=True):
        assert all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask.names())
        assert a.curve["test_acc"] == b.curve["test_acc"] and a.test_acc == b.test_acc


def test_signed_constant_weights_keep_signs_and_one_magnitude_per_layer(digits):
    template, init = _net(digits, 3)
    names = prunable_names(template)
    for kind in ("signed_constant", "kaiming_constant"):
        w = frozen_weights(init, names, kind)
        for name in names:
            assert torch.equal(torch.sign(w[name]), torch.sign(init[name]))
            assert w[name].abs().unique().numel() == 1
    kaiming = frozen_weights(init, names, "kaiming_normal")
    fan_in = init["1.weight"].shape[1]
    assert float(kaiming["1.weight"].std()) == pytest.approx((2 / fan_in) ** 0.5, rel=1e-5)
    assert torch.equal(frozen_weights(init, names, "init")["1.weight"], init["1.weight"])
    assert torch.equal(kaiming["1.bias"], init["1.bias"])  # biases are never touched


def test_edge_popup_keeps_exactly_k_per_layer(digits):
    template, init = _net(digits, 4)
    spec = default_spec("edge_popup", steps=20, batch_size=64)
    res = edge_popup(template, init, digits, spec, density=0.3, seed=4)
    for name in prunable_names(template):
        keep = res.mask[name]
        assert int(keep.sum()) == n_keep(keep.numel(), 0.3)
    assert res.density == pytest.approx(0.3, abs=1e-3)
    assert res.sampled_test_acc is None and res.expected_test_acc is None


def test_edge_popup_scores_train_on_a_cosine_schedule():
    spec = default_spec("edge_popup", steps=100)
    assert spec.cosine and not default_spec("learned", steps=100).cosine
    assert [spec.lr_factor(step) for step in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    assert spec.lr_factor(25) == pytest.approx((1 + 2**-0.5) / 2)


def test_straight_through_estimators():
    scores = torch.randn(3, 7, 5, requires_grad=True)
    mask = TopKST.apply(scores, 11)
    assert mask.reshape(3, -1).sum(1).tolist() == [11.0, 11.0, 11.0]
    for k in range(3):  # the kept entries are each network's 11 largest
        top = scores[k].flatten().topk(11).indices
        assert bool(mask[k].flatten()[top].all())
    (mask * torch.arange(105.0).view(3, 7, 5)).sum().backward()
    assert torch.equal(scores.grad, torch.arange(105.0).view(3, 7, 5))  # straight through

    p = torch.full((4, 1000), 0.3, requires_grad=True)
    sample = BernoulliST.apply(p, torch.rand(4, 1000, generator=torch.Generator().manual_seed(0)))
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    assert 0.25 < float(sample.detach().mean()) < 0.35
    sample.sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


def test_learned_supermask_beats_chance_on_digits(digits):
    template, init = _net(digits, 5)
    spec = default_spec("learned", steps=150, batch_size=64)
    res = learned_supermask(template, init, digits, spec, weights="signed_constant", seed=5)
    chance = 1 / digits.num_classes
    assert res.curve["test_acc"][0] < 0.3  # a random half of untrained weights: near chance
    assert res.test_acc > 0.6 > 4 * chance
    assert res.sampled_test_acc > 0.6 and res.expected_test_acc > 0.6
    assert 0.3 < res.density < 0.7  # started at keep-probability 1/2, learned from there


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "magic"}, "unknown supermask method"),
        ({"weights": "gold"}, "unknown supermask weights"),
        ({"density": 1.0}, "density must be in (0, 1)"),
        ({"density": 0.0}, "density must be in (0, 1)"),
        ({"seeds": [1, 2, 3]}, "1 inits but 3 seeds"),
    ],
)
def test_bad_input_is_a_user_error(digits, kwargs, message):
    template, init = _net(digits, 0)
    spec = TrainSpec(steps=1, batch_size=8)
    with pytest.raises(TicketlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_supermasks(template, [init], digits, spec, **kwargs)
