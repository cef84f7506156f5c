"""Retraining after pruning, side by side (Renda, Frankle & Carbin 2020, arXiv 2003.02389).

The same IMP search once per retraining mode — ``rewind`` (weights and schedule back to step k,
train to T), ``lr_rewind`` (keep the final weights, replay the schedule's last t steps) and
``finetune`` (keep the final weights, t steps at the final learning rate) — each in its own run
folder under ``out`` (so each resumes on its own), then one table: test accuracy per sparsity and
mode. The search itself is injected (the CLI passes the API's ``run_search``): a study never
imports another study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import TicketlabError
from ..io.config import RETRAIN, Config, validate
from ..io.store import atomic_write_bytes

Search = Callable[[Config], list[dict[str, Any]]]


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    for mode in modes:
        if mode not in RETRAIN:
            raise TicketlabError(f"unknown retraining mode {mode!r}; known: {', '.join(RETRAIN)}")
    if not modes or len(set(modes)) != len(modes):
        raise TicketlabError(f"--modes must name each mode once, got {text!r}")
    return modes


def mode_configs(base: Config, modes: Sequence[str]) -> list[Config]:
    """One config per mode, ``out/<mode>``; the budget t is shared (``retrain_steps``)."""
    configs = [
        replace(base, retrain=mode, out=str(Path(base.out) / mode), report=False) for mode in modes
    ]
    for c in configs:
        validate(c)
    return configs


def run_retrain(base: Config, modes: Sequence[str], search: Search) -> dict[str, Any]:
    """Run (or resume) every mode's search; the table as a dict, also in ``out/retrain.json``."""
    levels = {c.retrain: search(c) for c in mode_configs(base, modes)}
    table = build_table(base, levels)
    out = Path(base.out)
    import json

    atomic_write_bytes(out / "retrain.json", json.dumps(table, indent=1).encode())
    atomic_write_bytes(out / "retrain.md", markdown(table).encode())
    return table


def build_table(base: Config, levels: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Rows per level: % weights, and per mode the ticket's final and early-stop test accuracy
    (mean ± std over replicates, %) and whether it matches the dense network."""
    modes = list(levels)
    first = levels[modes[0]]
    dense = _stats(first[0], "final_test_acc")[0]
    rows = []
    for i, level in enumerate(first):
        row: dict[str, Any] = {
            "level": level["level"],
            "weights_remaining": level["weights_remaining"],
        }
        for mode in modes:
            if i >= len(levels[mode]):
                continue
            mean, std = _stats(levels[mode][i], "final_test_acc")
            es_mean, es_std = _stats(levels[mode][i], "early_stop_test_acc")
            row[mode] = {
                "final_test_acc": mean,
                "final_test_std": std,
                "early_stop_test_acc": es_mean,
                "early_stop_test_std": es_std,
                "matching": mean >= dense - base.tolerance_pp,
            }
        rows.append(row)
    return {
        "modes": modes,
        "budget_steps": base.retrain_budget(),
        "rewind_step": base.rewind_step,
        "steps": base.steps,
        "tolerance_pp": base.tolerance_pp,
        "dense_final_test_acc": dense,
        "rows": rows,
    }


def _stats(level: dict[str, Any], key: str) -> tuple[float, float]:
    values = [100 * n[key] for n in level["networks"] if n["branch"] == "ticket"]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def markdown(table: dict[str, Any]) -> str:
    modes = table["modes"]
    head = "| level | % weights | " + " | ".join(f"{m} (final test %)" for m in modes) + " |\n"
    head += "|---|---|" + "---|" * len(modes) + "\n"
    lines = []
    for row in table["rows"]:
        cells = []
        for m in modes:
            cell = row.get(m)
            cells.append(
                "—"
                if cell is None
                else f"{cell['final_test_acc']:.2f} ± {cell['final_test_std']:.2f}"
                + (" ✓" if cell["matching"] else "")
            )
        lines.append(
            f"| {row['level']} | {100 * row['weights_remaining']:.1f} | " + " | ".join(cells) + " |"
        )
    note = (
        f"\nT = {table['steps']} steps; rewind to step {table['rewind_step']}; "
        f"lr_rewind / finetune budget t = {table['budget_steps']} steps; "
        f"✓ = within {table['tolerance_pp']} pp of the "
        f"dense network ({table['dense_final_test_acc']:.2f}%).\n"
    )
    return head + "\n".join(lines) + "\n" + note
