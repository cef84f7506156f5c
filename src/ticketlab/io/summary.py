"""The answer of a run: per level and branch, mean and spread over replicates, and the smallest
winning ticket (the sparsest level whose ticket matches the dense network).

Classification runs are judged by test accuracy (matching: within ``tolerance_pp`` percentage
points of dense); language-model runs (``task="language_model"``) by test perplexity, exp of the
mean next-token loss (matching: at most ``tolerance_pp`` percent above dense).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rich.table import Table

STATS = ("early_stop_test_acc", "final_test_acc", "early_stop_iter", "untrained_test_acc")
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


def summarize(
    level_metrics: list[dict[str, Any]], tolerance_pp: float, task: str = "classification"
) -> dict[str, Any]:
    """Rows of the table plus the winning ticket; diverged networks are counted, not averaged."""
    rows = []
    for level in level_metrics:
        per_branch: dict[str, dict[str, Any]] = {}
        for branch in dict.fromkeys(n["branch"] for n in level["networks"]):
            nets = [n for n in level["networks"] if n["branch"] == branch]
            healthy = [_network_stats(n) for n in nets if not n["diverged"]]
            keys = healthy[0] if healthy else STATS
            stats = {key: spread([n[key] for n in healthy if n[key] is not None]) for key in keys}
            per_branch[branch] = {**stats, "diverged": len(nets) - len(healthy)}
        rows.append(
            {
                "level": level["level"],
                "weights_remaining": level["weights_remaining"],
                "branches": per_branch,
            }
        )
    return {
        "rows": rows,
        "winning_ticket": winning_ticket(rows, tolerance_pp, task),
        "tolerance_pp": tolerance_pp,
        "task": task,
    }


def winning_ticket(
    rows: list[dict[str, Any]], tolerance_pp: float, task: str = "classification"
) -> dict[str, Any] | None:
    """Sparsest level whose ticket's mean early-stop accuracy is within ``tolerance_pp`` of dense
    (perplexity: at most ``tolerance_pp`` percent above dense) and whose mean early-stop
    iteration is no later than dense."""
    if not rows:
        return None
    key, _ = headline(task)
    dense = rows[0]["branches"]["ticket"]
    if not dense.get(key, {}).get("n"):
        return None
    best = None
    for row in rows[1:]:
        ticket = row["branches"]["ticket"]
        if not ticket.get(key, {}).get("n"):
            continue
        if task == LANGUAGE_MODEL:
            acc_ok = ticket[key]["mean"] <= dense[key]["mean"] * (1 + tolerance_pp / 100)
        else:
            acc_ok = ticket[key]["mean"] >= dense[key]["mean"] - tolerance_pp / 100
        iter_ok = ticket["early_stop_iter"]["mean"] <= dense["early_stop_iter"]["mean"]
        if (
            acc_ok
            and iter_ok
            and (best is None or row["weights_remaining"] < best["weights_remaining"])
        ):
            best = {"level": row["level"], "weights_remaining": row["weights_remaining"]}
    return best


def _pct(stat: dict[str, float | None]) -> str:
    if not stat["n"]:
        return "-"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _ppl(stat: dict[str, float | None]) -> str:
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def table(summary: dict[str, Any]) -> Table:
    """Level, % remaining, early-stop accuracy (or perplexity) per branch (mean ± std), and the
    early-stop iteration."""
    branch_names = list(dict.fromkeys(b for row in summary["rows"] for b in row["branches"]))
    task = summary.get("task", "classification")
    key, name = headline(task)
    cell_of = _ppl if task == LANGUAGE_MODEL else _pct
    title = "Test perplexity" if task == LANGUAGE_MODEL else "Test accuracy (%)"
    out = Table(title=f"{title} at early stop, mean ± std over replicates")
    out.add_column("level", justify="right")
    out.add_column("% weights", justify="right")
    for name in branch_names:
        out.add_column(name.replace("_", " "), justify="right")
    out.add_column("ticket ES iter", justify="right")
    for row in summary["rows"]:
        cells = [str(row["level"]), f"{100 * row['weights_remaining']:.1f}"]
        for name in branch_names:
            branch = row["branches"].get(name)
            empty = {"n": 0}
            cell = cell_of(branch.get(key, empty)) if branch else ""
            if branch and branch["diverged"]:
                cell += f" ({branch['diverged']} diverged)"
            cells.append(cell)
        es = row["branches"]["ticket"]["early_stop_iter"]
        cells.append(f"{es['mean']:.0f}" if es["n"] else "-")
        out.add_row(*cells)
    return out


def answer_line(summary: dict[str, Any]) -> str:
    win = summary["winning_ticket"]
    tol = summary["tolerance_pp"]
    if summary.get("task") == LANGUAGE_MODEL:
        if win is None:
            return (
                f"No winning ticket: no pruned level matched the dense network's test perplexity "
                f"(within {tol}%)."
            )
        return (
            f"Smallest winning ticket: {100 * win['weights_remaining']:.1f}% of weights remaining "
            f"(level {win['level']}), test perplexity within {tol}% of dense and training no "
            "slower."
        )
    if win is None:
        return f"No winning ticket: no pruned level matched the dense network (within {tol} pp)."
    return (
        f"Smallest winning ticket: {100 * win['weights_remaining']:.1f}% of weights remaining "
        f"(level {win['level']}), matching dense accuracy within {tol} pp and training no slower."
    )
