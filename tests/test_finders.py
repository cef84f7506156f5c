"""Finders: every score against an independent reference, exact counts, layers never pruned,
early-bird's stopping rule, the trainer's evaluation hook, and the study's compute accounting."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.cli import main
from ticketlab.core.finders import (
    EarlyBird,
    ScoreInput,
    count_flops,
    find_mask,
    grasp,
    grasp_saliency,
    hamming_fraction,
    magnitude_init,
    reinit_kept,
    shuffle_within_layers,
    snip,
    synflow,
)
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.errors import TicketlabError
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()


def batch(seed: int = 1, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (n,), generator=g
    )


def score_input(model: nn.Module, batches=()) -> ScoreInput:
    names = prunable_names(model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    return ScoreInput(model, weights, names, tuple(batches))


def test_snip_is_abs_grad_times_weight_from_autograd():
    model, (x, y) = tiny_mlp(), batch()
    got = snip(score_input(model, [(x, y)]))
    F.cross_entropy(model(x), y).backward()
    for name in ("0.weight", "2.weight"):
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(got[name], (p.grad * p).abs().detach())


def test_grasp_is_minus_theta_hg_with_hessian_from_autograd():
    model, batches = tiny_mlp(), [batch(1), batch(2)]
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    shapes = [w1.shape, w2.shape]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        a, b = flat[: w1.numel()].view(shapes[0]), flat[w1.numel() :].view(shapes[1])
        total = 0
        for x, y in batches:
            logits = F.linear(F.relu(F.linear(x, a, b1)), b, b2) / 200.0
            total = total + F.cross_entropy(logits, y)
        return total

    flat = torch.cat([w1.flatten(), w2.flatten()])
    g = torch.func.grad(loss)(flat)
    hessian = torch.autograd.functional.hessian(loss, flat)
    reference = -flat * (hessian @ g)
    got = grasp_saliency(score_input(model, batches))
    torch.testing.assert_close(
        torch.cat([got["0.weight"].flatten(), got["2.weight"].flatten()]), reference
    )
    # the paper removes the highest saliencies: the keep-score is their negation
    keep = grasp(score_input(model, batches))
    torch.testing.assert_close(keep["0.weight"], -got["0.weight"])
    mask = find_mask(model, "grasp", 0.5, batches=batches)
    kept = torch.cat([got[n][mask[n]] for n in mask.names()])
    dropped = torch.cat([got[n][~mask[n]] for n in mask.names()])
    assert mask.alive() == 9 and float(kept.max()) <= float(dropped.min())


def test_synflow_matches_the_hand_computed_path_norms():
    model = tiny_mlp()
    w1, b1, w2, _ = (p.detach().abs() for p in model.parameters())
    got = synflow(score_input(model))
    # all weights positive, input all ones: R = 1'|W2|(|W1| 1 + |b1|) + 1'|b2|
    hidden = w1.sum(1) + b1
    torch.testing.assert_close(got["0.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(got["2.weight"], w2 * hidden[None, :])


def test_synflow_is_data_free():
    model = tiny_mlp()
    masks = [
        find_mask(model, "synflow", 0.3, batches=[batch(seed)], rounds=10) for seed in (1, 2, 3)
    ]
    masks.append(find_mask(model, "synflow", 0.3, rounds=10))
    for m in masks[1:]:
        assert all(torch.equal(m[n], masks[0][n]) for n in m.names())


def test_magnitude_init_and_exact_counts_global_and_per_layer():
    model = build_model("lenet_300_100", (1, 8, 8), 10, seed=0)
    names = prunable_names(model)
    sizes = {n: dict(model.named_parameters())[n].numel() for n in names}
    total = sum(sizes.values())
    for finder in ("magnitude_init", "random", "synflow"):
        for density in (0.1, 0.013):
            m = find_mask(model, finder, density, rounds=2)
            assert m.alive() == round(density * total)
            layer = find_mask(model, finder, density, scope="layer", rounds=2)
            assert {n: int(layer[n].sum()) for n in names} == {
                n: round(density * s) for n, s in sizes.items()
            }
    m = find_mask(model, "magnitude_init", 0.2)
    scores = magnitude_init(score_input(model))
    kept = torch.cat([scores[n][m[n]] for n in names])
    dropped = torch.cat([scores[n][~m[n]] for n in names])
    assert float(kept.min()) >= float(dropped.max())
    inverted = find_mask(model, "magnitude_init", 0.2, invert=True)
    kept = torch.cat([scores[n][inverted[n]] for n in names])
    dropped = torch.cat([scores[n][~inverted[n]] for n in names])
    assert float(kept.max()) <= float(dropped.min())


def test_batchnorm_and_excluded_layers_are_never_pruned_and_left_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )
    model[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(20, 1, 8, 8)
    y = torch.arange(20) % 10
    for finder in ("snip", "grasp", "synflow", "magnitude_init", "random"):
        m = find_mask(model, finder, 0.2, batches=[(x, y)], exclude=["4"], rounds=3)
        assert m.names() == ["0.weight"]  # BatchNorm's weight never, the excluded layer never
        assert int(m["0.weight"].sum()) == round(0.2 * 36)
        assert model.training  # restored after scoring in eval mode
        if finder == "synflow":  # data-free: the input shape is enough
            alone = find_mask(model, finder, 0.2, input_shape=(1, 8, 8), exclude=["4"], rounds=3)
            assert torch.equal(alone["0.weight"], m["0.weight"])
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (finder, k)


def test_sanity_checks_shuffle_and_reinit():
    model = tiny_mlp()
    mask = find_mask(model, "magnitude_init", 0.5)
    shuffled = shuffle_within_layers(mask, torch.Generator().manual_seed(0))
    assert {n: int(shuffled[n].sum()) for n in mask.names()} == {
        n: int(mask[n].sum()) for n in mask.names()
    }
    init = {n: p.detach() for n, p in model.named_parameters()}
    fresh = {n: torch.full_like(t, 7.0) for n, t in init.items()}
    out = reinit_kept(fresh, init, mask)
    assert torch.equal(out["0.weight"], 7.0 * mask["0.weight"])
    assert torch.equal(out["0.bias"], init["0.bias"])


def _mask(bits):
    return Mask({"w": torch.tensor(bits, dtype=torch.bool)})


def test_early_bird_draws_exactly_when_the_newest_is_close_to_all_previous():
    # 10 entries: distances are multiples of 0.1; the threshold 0.15 accepts one differing entry
    seq = [
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 1, 0, 0],  # 0.2 away from seq[2], seq[3]
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0],  # the window (seq[4..8]) still holds seq[4]
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0],  # seq[5..9]: all equal -> drawn here
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # drawn is final
    ]
    assert hamming_fraction(_mask(seq[2]), _mask(seq[4])) == pytest.approx(0.2)
    bird = EarlyBird(threshold=0.15, window=5)
    answers = [bird.update(100 * i, _mask(bits)) for i, bits in enumerate(seq)]
    assert answers == [False] * 9 + [True, True]
    assert bird.drawn_at == 900 and torch.equal(bird.drawn["w"], _mask(seq[9])["w"])
    near = EarlyBird(threshold=0.25, window=5)  # 0.2 is within 0.25: drawn as soon as 5 masks
    assert [near.update(i, _mask(b)) for i, b in enumerate(seq[2:7])] == [False] * 4 + [True]
    loose = EarlyBird(threshold=0.65, window=3)  # everything within 0.6: the third mask draws
    assert [loose.update(i, _mask(b)) for i, b in enumerate(seq[:3])] == [False, False, True]


@pytest.fixture
def one_thread():
    """One stack of two networks on one thread (the lanes' setting; fast on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_trainer_stops_when_every_network_asks(one_thread):
    data = load_dataset("digits", 0.1, 0)
    template = build_model("lenet_300_100", data.input_shape, data.num_classes, 0)
    init = {k: v.clone() for k, v in template.state_dict().items()}
    mask = Mask.ones_like({n: init[n] for n in prunable_names(template)})
    seen: dict[int, list[int]] = {0: [], 1: []}

    def stop_at(r: int, at: int):
        def hook(step, weights):
            assert set(weights) == set(init)
            seen[r].append(step)
            return step >= at

        return hook

    spec = TrainSpec(steps=60, batch_size=16, eval_every=10)
    jobs = [Job(init, mask, 1, on_eval=stop_at(0, 20)), Job(init, mask, 2, on_eval=stop_at(1, 40))]
    results = train(template, jobs, data, spec, stack_size=2, lanes=1)
    # network 0 stops asking after 20 (its answer is final), the stack stops at 40
    assert seen == {0: [0, 10, 20], 1: [0, 10, 20, 30, 40]}
    assert [r.curve["iteration"][-1] for r in results] == [40.0, 40.0]
    full = train(template, [Job(init, mask, 1)], data, spec)[0]
    assert full.curve["iteration"][-1] == 60.0
    # training is the same up to the stop
    assert results[0].curve["test_acc"] == full.curve["test_acc"][:5]


def test_count_flops_by_hand():
    lenet = build_model("lenet_300_100", (1, 28, 28), 10, 0)
    assert count_flops(lenet, (1, 28, 28)) == {
        "1.weight": 2 * 784 * 300,
        "3.weight": 2 * 300 * 100,
        "5.weight": 2 * 100 * 10,
    }
    conv = build_model("conv2", (1, 8, 8), 10, 0)
    flops = count_flops(conv, (1, 8, 8))
    assert flops["0.weight"] == 2 * 64 * 1 * 9 * 64  # 64 output positions
    assert flops["2.weight"] == 2 * 64 * 64 * 9 * 64
    assert flops["6.weight"] == 2 * (64 * 4 * 4) * 256


def test_unknown_finder_and_bad_density():
    with pytest.raises(TicketlabError, match="unknown finder"):
        find_mask(tiny_mlp(), "nope", 0.5)
    with pytest.raises(TicketlabError, match="density"):
        find_mask(tiny_mlp(), "random", 1.5)
    with pytest.raises(TicketlabError, match="labelled batches"):
        find_mask(tiny_mlp(), "snip", 0.5)


# --- the study -----------------------------------------------------------------------------

ARGS = [
    "finders",
    "--model",
    "lenet_300_100",
    "--data",
    "digits",
    "--sparsities",
    "0.5,0.8",
    "--finders",
    "snip,grasp,synflow,magnitude_init,random,magnitude,early_bird,imp",
    "--checks",
    "shuffle,reinit,invert",
    "--replicates",
    "2",
    "--steps",
    "20",
    "--eval-every",
    "5",
    "--batch-size",
    "32",
    "--synflow-rounds",
    "10",
    "--eb-threshold",
    "0.3",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("finders") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_study_rows_accuracy_and_figure(study):
    out, res = study
    variants = {r["variant"] for r in res["rows"]}
    assert {"imp", "imp+shuffle", "imp+reinit", "snip+invert", "random+reinit"} <= variants
    assert "random+shuffle" not in variants and "imp+invert" not in variants
    assert len(res["rows"]) == 2 * len(variants)
    for row in res["rows"]:
        assert len(row["accs"]) == 2 and all(0.0 <= a <= 1.0 for a in row["accs"])
        assert row["weights_remaining"] == pytest.approx(1 - row["sparsity"], abs=2e-3)
    assert res["dense"]["acc_mean"] > 0.5
    for name in ("results.md", "finders.png", "finders.svg"):
        assert (out / name).stat().st_size > 1000


def test_study_compute_adds_up(study):
    _, res = study
    s = res["settings"]
    f = res["settings"]["forward_flops_dense"]
    assert f == 2 * (64 * 300 + 300 * 100 + 100 * 10)
    one_training = 3 * f * 20 * 32
    rows = {(r["variant"], r["sparsity"]): r["compute"] for r in res["rows"]}
    # IMP to s: the dense training and every level at fc 20% (output 10%) whose density stays
    # >= 1 - s: 0.8^3 = 0.51 >= 0.5 (4 trainings), 0.8^7 = 0.21 >= 0.2 (8 trainings)
    for sp, levels in ((0.5, 4), (0.8, 8)):
        imp = rows[("imp", sp)]
        assert imp["imp_levels_trained"] == levels
        assert imp["train_steps"] == 20 * levels
        assert imp["flops_dense"] == pytest.approx(levels * one_training)
        assert imp["flops_actual"] < imp["flops_dense"]
    assert rows[("magnitude", 0.8)]["train_steps"] == 20
    assert rows[("magnitude", 0.8)]["flops_dense"] == pytest.approx(one_training)
    for sp in (0.5, 0.8):
        eb = rows[("early_bird", sp)]
        assert all(st <= 20 for st in eb["draw_steps"])
        assert eb["flops_dense"] == pytest.approx(3 * f * 32 * eb["train_steps"])
    assert rows[("snip", 0.5)]["flops_dense"] == pytest.approx(3 * f * 100)  # 10 per class
    assert rows[("grasp", 0.5)]["flops_dense"] == pytest.approx(9 * f * 100)
    assert rows[("synflow", 0.5)]["flops_dense"] == pytest.approx(3 * f * 10)
    assert rows[("synflow", 0.8)]["flops_actual"] < rows[("synflow", 0.8)]["flops_dense"]
    assert rows[("random", 0.8)]["flops_dense"] == 0
    assert s["imp_rates"] == {"conv": 0.1, "fc": 0.2, "output": 0.1}
    # the checks share their finder's cost
    assert rows[("snip+shuffle", 0.8)] == rows[("snip", 0.8)]


def test_study_resumes_without_training(study, monkeypatch):
    out, res = study
    import ticketlab.studies.finders as mod

    def refuse(*args, **kwargs):
        raise AssertionError("trained on resume")

    monkeypatch.setattr(mod, "train", refuse)
    assert main([*ARGS, "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["accs"] for r in again["rows"]] == [r["accs"] for r in res["rows"]]
    # fewer sparsities, finders or checks: the same folder, nothing trained, a smaller table
    fewer = ARGS[:]
    fewer[fewer.index("0.5,0.8")] = "0.8"
    fewer[fewer.index("shuffle,reinit,invert")] = "shuffle"
    assert main([*fewer, "--out", str(out)]) == 0
    small = json.loads((out / "results.json").read_text())
    assert {r["sparsity"] for r in small["rows"]} == {0.8}
    assert not any(r["variant"].endswith(("+reinit", "+invert")) for r in small["rows"])
    before = {(r["variant"], r["sparsity"]): r["accs"] for r in res["rows"]}
    assert all(before[(r["variant"], 0.8)] == r["accs"] for r in small["rows"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--finders", "snip,nope"], "unknown finder 'nope'"),
        (["--checks", "flip"], "unknown check"),
        (["--sparsities", "0.5,1.2"], "sparsity must be in (0, 1)"),
        (["--sparsities", "0.5,x"], "not a number"),
        (["--model", "nope"], "unknown model"),
        (["--scope", "both"], "scope"),
        (["--eb-threshold", "0"], "threshold"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["finders", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_different_run_in_the_folder_is_refused(study, capsys):
    out, _ = study
    assert main([*ARGS, "--seed", "1", "--out", str(out)]) == 2
    assert "different finders run" in capsys.readouterr().err
