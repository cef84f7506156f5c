"""Masks only shrink under every criterion, whatever the weights (NaN, inf, -inf, zeros); a
layer's weight and bias rank together when grouped; target densities are exact."""

import math

import pytest
import torch

from ticketlab.core.criteria import CRITERIA
from ticketlab.core.mask import Mask, layer_groups
from ticketlab.core.pruning import prune, prune_layerwise, prune_to_density

SPECIAL = [math.nan, math.inf, -math.inf, 0.0]


def weird(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    flat = w.view(-1)
    picks = torch.randperm(flat.numel(), generator=g)[: flat.numel() // 3]
    for i, p in enumerate(picks.tolist()):
        flat[p] = SPECIAL[i % len(SPECIAL)]
    return w


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_only_shrink_with_nan_and_inf_weights(criterion, scope):
    shapes = {"a.weight": (12, 10), "b.weight": (5, 12)}
    g = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(s, generator=g) > 0.4 for n, s in shapes.items()})
    for k in range(4):
        init = {n: weird(s, 10 * k) for n, s in shapes.items()}
        final = {n: weird(s, 10 * k + 1) for n, s in shapes.items()}
        scores = {n: CRITERIA[criterion](init[n], final[n], g) for n in shapes}
        new = prune(mask, scores, dict.fromkeys(shapes, 0.3), scope)
        assert new.is_subset_of(mask), f"{criterion}: a pruned weight came back"
        if scope == "layer":
            for n in shapes:
                alive = int(mask[n].sum())
                assert int(new[n].sum()) == alive - round(0.3 * alive)
        else:
            assert new.alive() == mask.alive() - round(0.3 * mask.alive())
        mask = new


def test_nan_scores_are_pruned_first():
    mask = Mask({"w": torch.ones(4, dtype=torch.bool)})
    scores = {"w": torch.tensor([1.0, math.nan, 3.0, 2.0])}
    assert prune_layerwise(mask, scores, {"w": 0.25})["w"].tolist() == [True, False, True, True]


def test_dead_weight_never_outranks_an_alive_minus_inf():
    # the old bug: dead entries at -inf tied with alive -inf ones and the earlier position won
    mask = Mask({"w": torch.tensor([False, True, True])})
    scores = {"w": torch.tensor([5.0, -math.inf, -math.inf])}
    new = prune_layerwise(mask, scores, {"w": 0.5})
    assert new["w"].tolist() == [False, True, False]


def test_weight_and_bias_rank_together_when_grouped():
    names = ["l.weight", "l.bias"]
    mask = Mask(
        {"l.weight": torch.ones(2, 2, dtype=torch.bool), "l.bias": torch.ones(2, dtype=torch.bool)}
    )
    scores = {
        "l.weight": torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
        "l.bias": torch.tensor([9.0, 8.0]),
    }
    groups = layer_groups(names)
    assert groups == [["l.weight", "l.bias"]]
    # one ranking of 6: the two smallest (both weights) go; separately each tensor would lose one
    new = prune_layerwise(mask, scores, dict.fromkeys(names, 1 / 3), groups)
    assert new["l.weight"].tolist() == [[False, False], [True, True]]
    assert new["l.bias"].tolist() == [True, True]
    apart = prune_layerwise(mask, scores, dict.fromkeys(names, 1 / 3))
    assert apart["l.bias"].sum() == 1


def test_prune_to_density_is_exact_and_nested():
    g = torch.Generator().manual_seed(0)
    mask = Mask({"a": torch.ones(100, dtype=torch.bool), "b": torch.ones(7, 3, dtype=torch.bool)})
    for density in (0.55, 0.2, 0.1, 0.01):
        scores = {n: torch.randn(t.shape, generator=g) for n, t in mask.tensors.items()}
        new = prune_to_density(mask, scores, density)
        assert new.is_subset_of(mask)
        assert int(new["a"].sum()) == round(density * 100)
        assert int(new["b"].sum()) == round(density * 21)
        mask = new
    glob = prune_to_density(
        Mask({"a": torch.ones(100, dtype=torch.bool), "b": torch.ones(21, dtype=torch.bool)}),
        {"a": torch.rand(100, generator=g), "b": torch.rand(21, generator=g)},
        0.25,
        scope="global",
    )
    assert glob.alive() == round(0.25 * 121)
