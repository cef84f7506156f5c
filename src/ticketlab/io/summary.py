"""The answer of a run: per level and branch, mean and spread over replicates, and the smallest
winning ticket (the sparsest level whose ticket matches the dense network)."""

from __future__ import annotations

import statistics
from typing import Any

from rich.table import Table

STATS = ("early_stop_test_acc", "final_test_acc", "early_stop_iter", "untrained_test_acc")


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


def summarize(level_metrics: list[dict[str, Any]], tolerance_pp: float) -> dict[str, Any]:
    """Rows of the table plus the winning ticket; diverged networks are counted, not averaged."""
    rows = []
    for level in level_metrics:
        per_branch: dict[str, dict[str, Any]] = {}
        for branch in dict.fromkeys(n["branch"] for n in level["networks"]):
            nets = [n for n in level["networks"] if n["branch"] == branch]
            healthy = [n for n in nets if not n["diverged"]]
            stats = {key: spread([n[key] for n in healthy if n[key] is not None]) for key in STATS}
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
        "winning_ticket": winning_ticket(rows, tolerance_pp),
        "tolerance_pp": tolerance_pp,
    }


def winning_ticket(rows: list[dict[str, Any]], tolerance_pp: float) -> dict[str, Any] | None:
    """Sparsest level whose ticket's mean early-stop accuracy is within ``tolerance_pp`` of dense
    and whose mean early-stop iteration is no later than dense."""
    if not rows:
        return None
    dense = rows[0]["branches"]["ticket"]
    if not dense["early_stop_test_acc"]["n"]:
        return None
    best = None
    for row in rows[1:]:
        ticket = row["branches"]["ticket"]
        if not ticket["early_stop_test_acc"]["n"]:
            continue
        acc_ok = ticket["early_stop_test_acc"]["mean"] >= (
            dense["early_stop_test_acc"]["mean"] - tolerance_pp / 100
        )
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


def table(summary: dict[str, Any]) -> Table:
    """Level, % remaining, early-stop accuracy per branch (mean ± std, %), early-stop iteration."""
    branch_names = list(dict.fromkeys(b for row in summary["rows"] for b in row["branches"]))
    out = Table(title="Test accuracy at early stop (%), mean ± std over replicates")
    out.add_column("level", justify="right")
    out.add_column("% weights", justify="right")
    for name in branch_names:
        out.add_column(name.replace("_", " "), justify="right")
    out.add_column("ticket ES iter", justify="right")
    for row in summary["rows"]:
        cells = [str(row["level"]), f"{100 * row['weights_remaining']:.1f}"]
        for name in branch_names:
            branch = row["branches"].get(name)
            cell = _pct(branch["early_stop_test_acc"]) if branch else ""
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
    if win is None:
        return f"No winning ticket: no pruned level matched the dense network (within {tol} pp)."
    return (
        f"Smallest winning ticket: {100 * win['weights_remaining']:.1f}% of weights remaining "
        f"(level {win['level']}), matching dense accuracy within {tol} pp and training no slower."
    )
