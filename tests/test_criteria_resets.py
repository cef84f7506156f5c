"""Each criterion ranks weights as Zhou et al. define it; each reset keeps its mask and property."""

import pytest
import torch

from ticketlab.core.criteria import CRITERIA, get_criterion
from ticketlab.core.mask import Mask
from ticketlab.core.pruning import prune_layerwise
from ticketlab.core.resets import RESETS, get_reset
from ticketlab.errors import TicketlabError

W_INIT = torch.tensor([0.1, -0.9, 0.5, -0.2, 0.8])
W_FINAL = torch.tensor([0.9, -0.1, -0.6, 0.2, 0.85])


def survivors(criterion: str, keep: int) -> list[int]:
    scores = {"w": get_criterion(criterion)(W_INIT, W_FINAL, torch.Generator().manual_seed(0))}
    mask = Mask({"w": torch.ones(5, dtype=torch.bool)})
    new = prune_layerwise(mask, scores, {"w": 1 - keep / 5})
    return sorted(torch.nonzero(new["w"]).flatten().tolist())


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        ("large_final", [0, 4]),  # |wf| = .9 .1 .6 .2 .85
        ("small_final", [1, 3]),
        ("large_init", [1, 4]),  # |wi| = .1 .9 .5 .2 .8
        ("small_init", [0, 3]),
        ("large_init_large_final", [2, 4]),  # min = .1 .1 .5 .2 .8
        ("small_init_small_final", [2, 3]),  # max = .9 .9 .6 .2 .85
        ("magnitude_increase", [0, 2]),  # .8 -.8 .1 0 .05
        ("movement", [0, 2]),  # .8 .8 1.1 .4 .05 -> 2, then tie 0/1 broken by position
        ("large_final_same_sign", [0, 4]),  # same sign at 0 1 4: |wf| .9 .1 .85
    ],
)
def test_criterion_ranks_as_defined(criterion, expected):
    assert survivors(criterion, 2) == expected


def test_same_sign_keeps_every_unflipped_weight_before_any_flipped_one():
    assert survivors("large_final_same_sign", 3) == [0, 1, 4]  # not 2: |wf| .6 but flipped
    assert survivors("large_final_same_sign", 4) == [0, 1, 2, 4]  # then flipped by |wf|


def test_random_criterion_depends_on_generator_only():
    f = get_criterion("random")
    a = f(W_INIT, W_FINAL, torch.Generator().manual_seed(3))
    b = f(W_INIT * 7, W_FINAL * 7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert set(CRITERIA) >= {"large_final", "movement", "magnitude_increase", "random"}


def test_unknown_names_are_user_errors():
    with pytest.raises(TicketlabError):
        get_criterion("nope")
    with pytest.raises(TicketlabError):
        get_reset("nope")


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    rewind = torch.randn(40, 50, generator=g)
    fresh = torch.randn(40, 50, generator=g)
    keep = torch.rand(40, 50, generator=g) < 0.3
    return rewind, fresh, keep


@pytest.mark.parametrize("name", sorted(RESETS))
def test_every_reset_keeps_the_mask(name, layer):
    rewind, fresh, keep = layer
    out = get_reset(name)(rewind, fresh, keep, torch.Generator().manual_seed(1))
    assert out.shape == rewind.shape
    assert (out[~keep] == 0).all()
    assert (out[keep] != 0).all()


def test_rewind_restores_exact_values(layer):
    rewind, fresh, keep = layer
    out = get_reset("rewind")(rewind, fresh, keep, None)
    assert torch.equal(out[keep], rewind[keep])


def test_reinit_uses_fresh_values(layer):
    rewind, fresh, keep = layer
    out = get_reset("reinit")(rewind, fresh, keep, None)
    assert torch.equal(out[keep], fresh[keep])


def test_reshuffle_permutes_survivor_values(layer):
    rewind, fresh, keep = layer
    out = get_reset("reshuffle")(rewind, fresh, keep, torch.Generator().manual_seed(1))
    assert torch.equal(out[keep].sort().values, rewind[keep].sort().values)
    assert not torch.equal(out[keep], rewind[keep])


def test_signed_constant_is_plus_minus_sigma_with_rewind_sign(layer):
    rewind, fresh, keep = layer
    out = get_reset("signed_constant")(rewind, fresh, keep, None)
    sigma = rewind.std()
    assert torch.allclose(out[keep].abs(), sigma.expand(int(keep.sum())))
    assert torch.equal(torch.sign(out[keep]), torch.sign(rewind[keep]))


@pytest.mark.parametrize("name", ["reinit_signed", "reshuffle_signed"])
def test_sign_preserving_resets_keep_signs(name, layer):
    rewind, fresh, keep = layer
    out = get_reset(name)(rewind, fresh, keep, torch.Generator().manual_seed(1))
    assert torch.equal(torch.sign(out[keep]), torch.sign(rewind[keep]))
    assert not torch.equal(out[keep], rewind[keep])


def test_reshuffle_signed_keeps_the_magnitude_distribution(layer):
    rewind, fresh, keep = layer
    out = get_reset("reshuffle_signed")(rewind, fresh, keep, torch.Generator().manual_seed(1))
    assert torch.equal(out[keep].abs().sort().values, rewind[keep].abs().sort().values)
