"""The verdict: paired differences with t-intervals over replicates, checked against intervals
computed by hand; the winning ticket must beat both controls and not lose to dense beyond the
tolerance; early stop within a tolerance in evaluations; too few replicates said so."""

import math
import statistics

import pytest

from ticketlab.io.summary import answer_line, difference, summarize, table

# Student's t 0.975 quantiles (printed tables): dof 1, 2, 3
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}


def net(branch, r, acc, it=100, diverged=False):
    return {
        "branch": branch,
        "replicate": r,
        "weights_remaining": 1.0,
        "early_stop_test_acc": acc,
        "final_test_acc": acc,
        "early_stop_iter": it,
        "untrained_test_acc": 0.1,
        "diverged": diverged,
    }


def level(n, remaining, nets):
    return {"level": n, "weights_remaining": remaining, "networks": nets}


def run(dense, ticket, reinit, rand, ticket_iter=100, dense_iter=100):
    """Two levels: dense, then one pruned level; accuracies per replicate."""
    return [
        level(0, 1.0, [net("ticket", r, a, dense_iter) for r, a in enumerate(dense)]),
        level(
            1,
            0.5,
            [net("ticket", r, a, ticket_iter) for r, a in enumerate(ticket)]
            + [net("reinit", r, a) for r, a in enumerate(reinit)]
            + [net("random_prune", r, a) for r, a in enumerate(rand)],
        ),
    ]


def test_difference_matches_hand_computed_t_interval():
    pairs = [(0.70, 0.65), (0.72, 0.69), (0.69, 0.68)]
    d = difference(pairs, 0.95)
    diffs = [0.05, 0.03, 0.01]
    half = T975[2] * statistics.stdev(diffs) / math.sqrt(3)
    assert d["mean"] == pytest.approx(0.03)
    assert d["low"] == pytest.approx(0.03 - half, abs=1e-9)
    assert d["high"] == pytest.approx(0.03 + half, abs=1e-9)
    assert d["n"] == 3
    one = difference([(0.7, 0.6)], 0.95)
    assert one["mean"] == pytest.approx(0.1) and one["low"] is None and one["n"] == 1


def test_winning_needs_both_controls_beaten_with_confidence():
    dense = [0.650, 0.655, 0.660]
    ticket = [0.700, 0.706, 0.712]  # +5 pp over dense, tightly
    clearly_worse = [0.600, 0.602, 0.604]
    s = summarize(run(dense, ticket, clearly_worse, clearly_worse), 0.5, eval_every=20)
    assert s["winning_ticket"] == {"level": 1, "weights_remaining": 0.5}
    assert s["rows"][1]["verdict"]["winning"]
    # the reinit control matches the ticket: not winning, though the means favour the ticket
    close = [0.699, 0.707, 0.711]
    s = summarize(run(dense, ticket, close, clearly_worse), 0.5, eval_every=20)
    assert s["winning_ticket"] is None
    assert "not clearly better than reinit" in s["rows"][1]["verdict"]["reasons"]
    assert s["by_means"] == {"level": 1, "weights_remaining": 0.5}
    assert "No winning ticket" in answer_line(s) and "By means alone" in answer_line(s)


def test_not_worse_than_dense_is_judged_by_the_interval():
    dense = [0.65, 0.66, 0.67]
    noisy = [0.70, 0.60, 0.66]  # mean equal to dense, but an interval far below -0.5 pp
    worse = [0.50, 0.50, 0.50]
    s = summarize(run(dense, noisy, worse, worse), 0.5, eval_every=20)
    assert "may be worse than dense" in s["rows"][1]["verdict"]["reasons"]
    # a wide enough tolerance accepts it
    s = summarize(run(dense, noisy, worse, worse), 20.0, eval_every=20)
    assert s["rows"][1]["verdict"]["winning"]


def test_early_stop_tolerance_in_evaluations():
    dense, ticket, worse = [0.982, 0.981], [0.990, 0.991], [0.90, 0.91]
    # one evaluation later than dense (180 vs 160): accepted with the default tolerance of one
    s = summarize(run(dense, ticket, worse, worse, 180, 160), 0.5, eval_every=20)
    assert s["rows"][1]["early_stop"]["ok"] and s["winning_ticket"] is not None
    s = summarize(
        run(dense, ticket, worse, worse, 180, 160), 0.5, early_stop_tolerance=0, eval_every=20
    )
    assert s["winning_ticket"] is None
    assert "stops later than dense" in s["rows"][1]["verdict"]["reasons"]
    s = summarize(run(dense, ticket, worse, worse, 220, 160), 0.5, eval_every=20)
    assert s["winning_ticket"] is None


def test_one_replicate_is_too_few_and_says_so():
    s = summarize(run([0.65], [0.70], [0.60], [0.60]), 0.5, eval_every=20)
    assert s["winning_ticket"] is None
    line = answer_line(s)
    assert line.startswith("Too few replicates to tell") and "--replicates 3" in line
    assert "level 1" in line  # what the means alone would say


def test_diverged_replicates_are_left_out_of_the_pairs():
    lv = run([0.65, 0.66, 0.67], [0.70, 0.71, 0.72], [0.6] * 3, [0.6] * 3)
    lv[1]["networks"][2]["diverged"] = True  # ticket of replicate 2
    s = summarize(lv, 0.5, eval_every=20)
    assert s["rows"][1]["compare"]["dense"]["n"] == 2
    assert s["rows"][1]["branches"]["ticket"]["diverged"] == 1


def test_table_shows_differences_and_verdict():
    from rich.console import Console

    s = summarize(
        run([0.650, 0.655, 0.660], [0.700, 0.706, 0.712], [0.6] * 3, [0.6, 0.61, 0.6]),
        0.5,
        eval_every=20,
    )
    console = Console(width=200, record=True)
    console.print(table(s))
    text = console.export_text()
    assert "− dense" in text and "− reinit" in text and "− random prune" in text
    assert "+5.1 [" in text and "winning" in text
    assert "Smallest winning ticket: 50.0%" in answer_line(s)


def lm_net(branch, r, loss, it=100):
    return {
        "branch": branch,
        "replicate": r,
        "weights_remaining": 1.0,
        "early_stop_test_loss": loss,
        "final_test_loss": loss,
        "untrained_test_loss": 4.6,
        "early_stop_iter": it,
        "diverged": False,
    }


def test_language_model_verdict_pairs_log_perplexity_ratios_by_hand():
    """Perplexity: the paired difference is other - ticket in loss (the log perplexity ratio);
    a ticket at most tolerance% above dense in perplexity is not worse."""
    dense = [2.70, 2.75, 2.72]
    ticket = [2.698, 2.751, 2.719]
    reinit = [2.80, 2.86, 2.81]
    rand = [2.78, 2.83, 2.80]
    metrics = [
        level(0, 1.0, [lm_net("ticket", r, v) for r, v in enumerate(dense)]),
        level(
            1,
            0.4,
            [lm_net("ticket", r, v) for r, v in enumerate(ticket)]
            + [lm_net("reinit", r, v) for r, v in enumerate(reinit)]
            + [lm_net("random_prune", r, v) for r, v in enumerate(rand)],
        ),
    ]
    summary = summarize(metrics, 0.5, "language_model", eval_every=10)
    compare = summary["rows"][1]["compare"]
    for name, other in (("dense", dense), ("reinit", reinit), ("random_prune", rand)):
        diffs = [o - t for o, t in zip(other, ticket, strict=True)]
        half = T975[2] * statistics.stdev(diffs) / math.sqrt(3)
        mean = statistics.fmean(diffs)
        assert compare[name]["mean"] == pytest.approx(mean)
        assert compare[name]["low"] == pytest.approx(mean - half)
    # dense - ticket in loss: +0.002, -0.001, +0.001 -> lower bound -0.0031 > -log(1.005) = -0.0050
    assert summary["rows"][1]["verdict"]["winning"]
    assert summary["winning_ticket"] == {"level": 1, "weights_remaining": 0.4}
    assert "% perplexity" in answer_line(summary)
    worse = summarize(metrics, 0.1, "language_model", eval_every=10)  # -log(1.001) = -0.0010
    assert not worse["rows"][1]["verdict"]["winning"]
