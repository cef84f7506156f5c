"""The answer of a run: per level and branch, mean and spread over replicates; per level, the
ticket against dense and against each control as paired differences with t-intervals over
replicates; and the smallest winning ticket.

The verdict (README, "When is a ticket winning"): Frankle & Carbin call a subnetwork winning when
it reaches the dense network's test accuracy in at most as many iterations. Here a level's ticket
wins when, at the chosen confidence over replicates,

- it is not worse than dense beyond the tolerance: the interval's lower bound of (ticket - dense)
  accuracy at early stop is >= -tolerance_pp;
- it beats each control that was run: the lower bound of (ticket - control) is > 0;
- it stops no later than dense, give or take ``early_stop_tolerance`` evaluations (mean
  early-stop iterations; evaluations come every ``eval_every`` steps, so closer is noise).

Differences are paired by replicate (a replicate's ticket, controls and dense network share its
init and rewind point) and use only replicates where both networks trained without diverging. With
fewer than two pairs there is no interval and the summary says the replicates are too few.

Language-model runs (``task="language_model"``) are judged by test perplexity, exp of the mean
next-token loss, the same way: the paired difference is ``other - ticket`` in mean test loss at
early stop, i.e. the log of the perplexity ratio (x100: about the percent perplexity difference;
positive: the ticket is better), and "not worse than dense beyond the tolerance" means a
perplexity at most ``tolerance_pp`` percent above dense (a log ratio >= -log(1 + tolerance_pp/100)).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rich.table import Table
from rich.text import Text

STATS = ("early_stop_test_acc", "final_test_acc", "early_stop_iter", "untrained_test_acc")
CONTROL_LABELS = {"reinit": "reinit", "random_prune": "random prune"}
LOSS_STATS = ("early_stop_test_loss", "final_test_loss", "untrained_test_loss")
LANGUAGE_MODEL = "language_model"


def _network_stats(net: dict[str, Any]) -> dict[str, Any]:
    """The per-network numbers summarised: the trainer's, plus perplexity = exp(loss)."""
    out = {key: net.get(key) for key in (*STATS, *LOSS_STATS)}
    for key in LOSS_STATS:
        loss = out[key]
        out[key.replace("_loss", "_ppl")] = (
            math.exp(min(loss, 700.0)) if isinstance(loss, int | float) else None
        )
    return out


def headline(task: str) -> tuple[str, str]:
    """(statistic, its name) that a run of ``task`` is judged by."""
    if task == LANGUAGE_MODEL:
        return "early_stop_test_ppl", "perplexity"
    return "early_stop_test_acc", "accuracy"


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean, population std, min, max and count; all None for no values (all diverged)."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile, the interval's half-width per standard error. ``scipy.special``'s
    inverse of the t distribution, not ``scipy.stats``: that import alone took ~1 s of every
    ``find``."""
    from scipy.special import stdtrit

    return float(stdtrit(dof, p))


def difference(pairs: list[tuple[float, float]], confidence: float) -> dict[str, Any]:
    """Mean of (a - b) over paired replicates with its two-sided t-interval (None if n < 2)."""
    diffs = [a - b for a, b in pairs]
    n = len(diffs)
    if not n:
        return {"mean": None, "low": None, "high": None, "n": 0, "values": []}
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "values": diffs}
    half = t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "values": diffs}


def _by_replicate(level: dict[str, Any], branch: str, key: str) -> dict[int, float]:
    return {
        n["replicate"]: n[key]
        for n in level["networks"]
        if n["branch"] == branch and not n["diverged"] and n[key] is not None
    }


def _pairs(a: dict[int, float], b: dict[int, float]) -> list[tuple[float, float]]:
    return [(a[r], b[r]) for r in sorted(a) if r in b]


def summarize(
    level_metrics: list[dict[str, Any]],
    tolerance_pp: float,
    task: str = "classification",
    *,
    early_stop_tolerance: int = 1,
    eval_every: int | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Rows of the table, the comparisons and verdict of each level, and the winning ticket;
    diverged networks are counted, not averaged."""
    lm = task == LANGUAGE_MODEL
    rows = []
    dense = level_metrics[0] if level_metrics else None
    # the paired statistic, oriented so that larger is better: accuracy, or minus the loss
    paired_key, sign = ("early_stop_test_loss", -1.0) if lm else ("early_stop_test_acc", 1.0)

    def paired(level: dict[str, Any], branch: str) -> dict[int, float]:
        return {r: sign * v for r, v in _by_replicate(level, branch, paired_key).items()}

    dense_acc = paired(dense, "ticket") if dense else {}
    dense_iter = _by_replicate(dense, "ticket", "early_stop_iter") if dense else {}
    slack = early_stop_tolerance * (eval_every or 0)
    for level in level_metrics:
        per_branch: dict[str, dict[str, Any]] = {}
        for branch in dict.fromkeys(n["branch"] for n in level["networks"]):
            nets = [n for n in level["networks"] if n["branch"] == branch]
            healthy = [_network_stats(n) for n in nets if not n["diverged"]]
            keys = healthy[0] if healthy else STATS
            stats = {key: spread([n[key] for n in healthy if n[key] is not None]) for key in keys}
            per_branch[branch] = {**stats, "diverged": len(nets) - len(healthy)}
        row: dict[str, Any] = {
            "level": level["level"],
            "weights_remaining": level["weights_remaining"],
            "branches": per_branch,
        }
        if level.get("stopped"):
            row["stopped"] = level["stopped"]
        if level["level"]:
            ticket = paired(level, "ticket")
            compare = {"dense": difference(_pairs(ticket, dense_acc), confidence)}
            for control in per_branch:
                if control != "ticket":
                    compare[control] = difference(
                        _pairs(ticket, paired(level, control)), confidence
                    )
            iters = _by_replicate(level, "ticket", "early_stop_iter")
            row["compare"] = compare
            row["early_stop"] = _early_stop(iters, dense_iter, slack)
            tolerance = math.log1p(tolerance_pp / 100) if lm else tolerance_pp / 100
            row["verdict"] = _verdict(compare, row["early_stop"], tolerance)
        rows.append(row)
    return {
        "rows": rows,
        "winning_ticket": _smallest(rows, "winning"),
        "by_means": _smallest(rows, "by_means"),
        "task": task,
        "tolerance_pp": tolerance_pp,
        "early_stop_tolerance": early_stop_tolerance,
        "eval_every": eval_every,
        "confidence": confidence,
        "replicates": max((c["dense"]["n"] for r in rows if (c := r.get("compare"))), default=0),
    }


def _early_stop(iters: dict[int, float], dense: dict[int, float], slack: float) -> dict[str, Any]:
    if not iters or not dense:
        return {"ticket": None, "dense": None, "ok": False}
    ticket_mean = statistics.fmean(iters.values())
    dense_mean = statistics.fmean(dense.values())
    return {"ticket": ticket_mean, "dense": dense_mean, "ok": ticket_mean <= dense_mean + slack}


def _verdict(
    compare: dict[str, dict[str, Any]], early_stop: dict[str, Any], tol: float
) -> dict[str, Any]:
    """'winning' (at the confidence), 'by_means' (means alone would say so), reasons otherwise;
    ``tol``: how far below dense the paired difference may go (a fraction, or a log ratio)."""
    dense, controls = compare["dense"], {k: v for k, v in compare.items() if k != "dense"}
    if dense["n"] == 0:
        return {"winning": False, "by_means": False, "reasons": ["no healthy ticket"]}
    by_means = (
        dense["mean"] >= -tol
        and all(c["mean"] is not None and c["mean"] > 0 for c in controls.values())
        and early_stop["ok"]
    )
    reasons = []
    too_few = dense["n"] < 2 or any(c["n"] < 2 for c in controls.values())
    if too_few:
        reasons.append("too few replicates for an interval")
    else:
        if dense["low"] < -tol:
            reasons.append("may be worse than dense")
        for name, c in controls.items():
            if c["low"] <= 0:
                reasons.append(f"not clearly better than {CONTROL_LABELS.get(name, name)}")
    if not early_stop["ok"]:
        reasons.append("stops later than dense")
    return {"winning": not reasons, "by_means": by_means, "reasons": reasons}


def _smallest(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    best = None
    for row in rows[1:]:
        if row.get("verdict", {}).get(key) and (
            best is None or row["weights_remaining"] < best["weights_remaining"]
        ):
            best = {"level": row["level"], "weights_remaining": row["weights_remaining"]}
    return best


def _pct(stat: dict[str, float | None]) -> str:
    if not stat["n"]:
        return "-"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def diff_cell(d: dict[str, Any] | None) -> str:
    """'+1.2 [-0.3, +2.7]' in percentage points; no interval with one replicate."""
    if not d or d["mean"] is None:
        return "-"
    if d["low"] is None:
        return f"{100 * d['mean']:+.1f} [n=1]"
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def verdict_cell(row: dict[str, Any]) -> str:
    verdict = row.get("verdict")
    if verdict is None:
        return "dense" if row.get("level") == 0 else "-"
    if verdict["winning"]:
        return "winning"
    if "too few replicates for an interval" in verdict["reasons"]:
        return "too few reps" + (" (means: yes)" if verdict["by_means"] else "")
    return "no" + (" (means: yes)" if verdict["by_means"] else "")


def stopped_lines(summary: dict[str, Any]) -> list[str]:
    """One line per replicate whose ticket diverged and stopped being pruned."""
    seen: dict[str, int] = {}
    for row in summary["rows"]:
        for r, at in (row.get("stopped") or {}).items():
            seen.setdefault(str(r), at)
    return [
        f"Replicate {r}: its ticket diverged (NaN/inf loss) at level {at}; pruning of this "
        "replicate stopped there, later levels average the other replicates."
        for r, at in sorted(seen.items(), key=lambda kv: int(kv[0]))
    ]


def _ppl(stat: dict[str, float | None]) -> str:
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def table(summary: dict[str, Any]) -> Table:
    """Level, % remaining, early-stop accuracy (or perplexity) per branch (mean ± std), the
    ticket's paired differences with dense and each control (pp, t-interval), early-stop
    iteration, verdict."""
    branch_names = list(dict.fromkeys(b for row in summary["rows"] for b in row["branches"]))
    controls = [b for b in branch_names if b != "ticket"]
    conf = round(100 * summary.get("confidence", 0.95))
    task = summary.get("task", "classification")
    key, _ = headline(task)
    cell_of = _ppl if task == LANGUAGE_MODEL else _pct
    if task == LANGUAGE_MODEL:
        out = Table(
            title=f"Test perplexity at early stop, mean ± std over replicates; ticket vs other in "
            f"% perplexity (100 x log ratio, + = ticket lower) [{conf}% CI]"
        )
    else:
        out = Table(
            title=f"Test accuracy at early stop (%), mean ± std over replicates; "
            f"ticket − other in pp [{conf}% CI]"
        )
    out.add_column("level", justify="right")
    out.add_column("% weights", justify="right")
    for name in branch_names:
        out.add_column(name.replace("_", " "), justify="right")
    out.add_column("− dense", justify="right")
    for name in controls:
        out.add_column(f"− {CONTROL_LABELS.get(name, name)}", justify="right")
    out.add_column("ES iter", justify="right")
    out.add_column("verdict", justify="left")
    for row in summary["rows"]:
        cells = [str(row["level"]), f"{100 * row['weights_remaining']:.1f}"]
        for name in branch_names:
            branch = row["branches"].get(name)
            empty = {"n": 0}
            cell = cell_of(branch.get(key, empty)) if branch else ""
            if branch and branch["diverged"]:
                cell += f" ({branch['diverged']} diverged)"
            cells.append(cell)
        compare = row.get("compare", {})
        cells.append(diff_cell(compare.get("dense")) if compare else "")
        cells += [diff_cell(compare.get(name)) if compare else "" for name in controls]
        ticket = row["branches"].get("ticket")
        es = ticket["early_stop_iter"] if ticket else {"n": 0}
        cells.append(f"{es['mean']:.0f}" if es["n"] else "-")
        cells.append(verdict_cell(row))
        out.add_row(*(Text(cell) for cell in cells))  # "[n=1]" is text, not rich markup
    return out


def _fmt(value: float) -> str:
    return f"{value:g}"


def definition(summary: dict[str, Any]) -> str:
    tol = summary["tolerance_pp"]
    es_tol = summary.get("early_stop_tolerance", 1)
    conf = round(100 * summary.get("confidence", 0.95))
    evals = "evaluation" if es_tol == 1 else "evaluations"
    if summary.get("task") == LANGUAGE_MODEL:
        return (
            f"test perplexity not above dense by more than {_fmt(tol)}% and below every control "
            f"at {conf}% confidence, stopping within {es_tol} {evals} of dense"
        )
    return (
        f"not worse than dense by more than {_fmt(tol)} pp and better than every control at "
        f"{conf}% confidence, stopping within {es_tol} {evals} of dense"
    )


def answer_line(summary: dict[str, Any]) -> str:
    """The run's answer in one sentence (several when it needs to say why not)."""
    win = summary["winning_ticket"]
    legacy_lm = not any("compare" in row for row in summary.get("rows", [])[1:])
    if summary.get("task") == LANGUAGE_MODEL and legacy_lm:  # written before LM intervals
        tol = summary["tolerance_pp"]
        if win is None:
            return (
                f"No winning ticket: no pruned level matched the dense network's test perplexity "
                f"(within {tol}%)."
            )
        return (
            f"Smallest winning ticket: {100 * win['weights_remaining']:.1f}% of weights remaining "
            f"(level {win['level']}), test perplexity within {tol}% of dense and training no "
            "slower (means over replicates)."
        )
    if "confidence" not in summary:  # a summary written before the verdict had intervals
        tol = summary.get("tolerance_pp", 0.5)
        if win is None:
            return (
                f"No winning ticket: no pruned level matched the dense network (within {tol} pp)."
            )
        return (
            f"Smallest winning ticket: {100 * win['weights_remaining']:.1f}% of weights remaining "
            f"(level {win['level']}), matching dense accuracy within {tol} pp and training no "
            "slower."
        )
    rows = {row["level"]: row for row in summary.get("rows", [])}
    n = summary.get("replicates", 0)
    if win is not None:
        row = rows.get(win["level"], {})
        parts = [f"− dense {diff_cell(row['compare']['dense'])}"] if row.get("compare") else []
        for name, d in row.get("compare", {}).items():
            if name != "dense":
                parts.append(f"− {CONTROL_LABELS.get(name, name)} {diff_cell(d)}")
        unit = "% perplexity" if summary.get("task") == LANGUAGE_MODEL else "pp"
        detail = f" (ticket {', '.join(parts)} {unit} over {n} replicates)" if parts else ""
        return (
            f"Smallest winning ticket: {100 * win['weights_remaining']:.1f}% of weights remaining "
            f"(level {win['level']}){detail}: {definition(summary)}."
        )
    means = summary.get("by_means")
    if n < 2 and "rows" in summary:
        hint = (
            f" By means alone it would be {100 * means['weights_remaining']:.1f}% (level "
            f"{means['level']})."
            if means
            else ""
        )
        return (
            f"Too few replicates to tell: {n} replicate gives no confidence interval; rerun with "
            f"--replicates 3 or more.{hint}"
        )
    hint = (
        f" By means alone the smallest would be {100 * means['weights_remaining']:.1f}% "
        f"(level {means['level']}); more replicates would tell."
        if means
        else ""
    )
    return f"No winning ticket ({definition(summary)}).{hint}"
