"""Invariants of pruning: exact counts, masks only shrink, controls of equal sparsity."""

import pytest
import torch

from ticketlab.core.criteria import large_final
from ticketlab.core.mask import Mask, layer_kinds, prunable_names
from ticketlab.core.pruning import prune, prune_global, prune_layerwise, random_mask_like
from ticketlab.zoo.models import build_model


def _scores(mask: Mask, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(mask[n].shape, generator=g) for n in mask.names()}


def _lenet_mask() -> Mask:
    model = build_model("lenet_300_100", (1, 28, 28), 10, seed=0)
    params = dict(model.named_parameters())
    return Mask.ones_like({n: params[n] for n in prunable_names(model)})


def test_layerwise_prunes_exact_fraction_of_remaining_per_layer():
    mask = _lenet_mask()
    rates = {"1.weight": 0.2, "3.weight": 0.2, "5.weight": 0.1}
    for round_ in range(6):
        before = {n: int(mask[n].sum()) for n in mask.names()}
        new = prune_layerwise(mask, _scores(mask, round_), rates)
        for n in mask.names():
            assert int(new[n].sum()) == before[n] - round(rates[n] * before[n])
        assert new.is_subset_of(mask)
        mask = new


def test_layerwise_matches_paper_formula_for_lenet():
    """Pm = (265200*0.8^k + 1000*0.9^k) / 266200 up to rounding (REFERENCE.md)."""
    mask = _lenet_mask()
    rates = {"1.weight": 0.2, "3.weight": 0.2, "5.weight": 0.1}
    for k in range(1, 8):
        mask = prune_layerwise(mask, _scores(mask, k), rates)
        expected = (265200 * 0.8**k + 1000 * 0.9**k) / 266200
        assert abs(mask.density() - expected) < 2e-4


def test_layerwise_keeps_the_highest_scores():
    mask = Mask({"w": torch.ones(10, dtype=torch.bool)})
    scores = {"w": torch.arange(10.0)}
    new = prune_layerwise(mask, scores, {"w": 0.3})
    assert new["w"].tolist() == [False] * 3 + [True] * 7


def test_pruned_weights_never_come_back_even_with_high_scores():
    mask = Mask({"w": torch.tensor([False, True, True, True])})
    scores = {"w": torch.tensor([100.0, 1.0, 2.0, 3.0])}
    new = prune_layerwise(mask, scores, {"w": 0.34})
    assert new["w"].tolist() == [False, False, True, True]


def test_global_prunes_exact_total_and_ranks_across_layers():
    mask = Mask({"a": torch.ones(4, dtype=torch.bool), "b": torch.ones(6, dtype=torch.bool)})
    scores = {"a": torch.tensor([0.0, 1, 2, 3]), "b": torch.tensor([10.0, 11, 12, 13, 14, 15])}
    new = prune_global(mask, scores, 0.4)
    assert new.alive() == 6
    assert new["a"].sum() == 0 and new["b"].all()
    assert new.is_subset_of(mask)


def test_global_on_a_real_network_is_exact_and_shrinks():
    mask = _lenet_mask()
    for k in range(4):
        alive = mask.alive()
        new = prune(mask, _scores(mask, k), {n: 0.2 for n in mask.names()}, scope="global")
        assert new.alive() == alive - round(0.2 * alive)
        assert new.is_subset_of(mask)
        mask = new


def test_random_mask_has_equal_per_layer_sparsity_and_differs():
    mask = _lenet_mask()
    rates = {n: 0.5 for n in mask.names()}
    mask = prune_layerwise(
        mask, {n: large_final(None, torch.randn(mask[n].shape), None) for n in mask.names()}, rates
    )
    rand = random_mask_like(mask, torch.Generator().manual_seed(1))
    for n in mask.names():
        assert int(rand[n].sum()) == int(mask[n].sum())
        assert not torch.equal(rand[n], mask[n])


def test_batchnorm_and_biases_are_not_prunable_by_default():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    assert prunable_names(model) == ["0.weight", "3.weight"]
    assert prunable_names(model, prune_biases=True) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert prunable_names(model, exclude=["0"]) == ["3.weight"]
    assert layer_kinds(model)["0.weight"] == "conv"
    assert layer_kinds(model)["3.weight"] == "output"


def test_mask_loads_into_torch_prune():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    keep = torch.tensor([[True, False, True, False]] * 3)
    Mask({"0.weight": keep}).to_torch_prune(model)
    assert torch.equal(model[0].weight == 0, ~keep | (model[0].weight_orig == 0))


def _keep_top_by_sort(scores: torch.Tensor, alive: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The definition: a stable descending sort of the alive scores (NaN last), first n_keep."""
    alive_at = torch.nonzero(alive.flatten()).flatten()
    ranked = scores.flatten()[alive_at].double()
    ranked = torch.where(ranked.isnan(), -float("inf"), ranked)
    order = torch.sort(ranked, descending=True, stable=True).indices[: max(0, n_keep)]
    keep = torch.zeros_like(alive.flatten())
    keep[alive_at[order]] = True
    return keep.view_as(alive)


@pytest.mark.parametrize("seed", range(12))
def test_linear_time_selection_keeps_what_a_stable_sort_keeps(seed):
    from ticketlab.core.pruning import _keep_top

    g = torch.Generator().manual_seed(seed)
    shape = (37, 23)
    # few distinct values, so ties straddle the threshold; some NaN and infinities too
    scores = torch.randint(0, 5, shape, generator=g).double()
    scores[torch.rand(shape, generator=g) < 0.05] = float("nan")
    scores[torch.rand(shape, generator=g) < 0.03] = -float("inf")
    scores[torch.rand(shape, generator=g) < 0.03] = float("inf")
    alive = torch.rand(shape, generator=g) < 0.7
    n_alive = int(alive.sum())
    for n_keep in (0, 1, n_alive // 3, n_alive // 2, n_alive - 1, n_alive, n_alive + 5):
        got = _keep_top(scores, alive, n_keep)
        assert torch.equal(got, _keep_top_by_sort(scores, alive, n_keep)), n_keep
        assert int(got.sum()) == min(n_keep, n_alive)
        assert not (got & ~alive).any()
