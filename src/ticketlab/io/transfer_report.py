"""The table and figure of a transfer (``studies/transfer.py``), in its folder and in the report.

Reads only ``transfer.json``, so ``ticketlab report RUN`` can redraw every transfer of a run from
the files alone. Same conventions as the run's figures: x is the % of weights remaining (the
source ticket's), log-scaled, descending; lines are means over replicates, bands their min-max;
the dense network is a horizontal line with its band.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.table import Table

from .report import BAND_ALPHA, _format_pct, _percent_axis, _write_figure

BRANCHES = ("transfer", "random", "oracle")
COLORS = {"transfer": "tab:blue", "random": "tab:green", "oracle": "tab:purple", "dense": "black"}
LABELS = {
    "transfer": "transferred ticket",
    "random": "random mask, same layer counts",
    "oracle": "target's own ticket (oracle)",
    "dense": "dense",
}
METRIC_TITLES = {
    "early_stop_test_acc": "test accuracy at early stop (%)",
    "final_test_acc": "test accuracy at the end of training (%)",
}


def title(summary: dict[str, Any]) -> str:
    s = summary
    what = f"{s['source_model']} ticket from {s['source_data']} ({s['source_optimizer']})"
    return (
        f"{what} -> {s['to']}, init {s['init']}, {s['optimizer']} lr {s['lr']:g}, "
        f"{s['steps']} steps, output mask {s['output_mask']}"
    )


def branches(summary: dict[str, Any]) -> list[str]:
    rows = summary["rows"]
    return [b for b in BRANCHES if rows and b in rows[0]]


def _cell(stat: dict[str, Any]) -> str:
    if not stat["n"]:
        return "diverged"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def table_cells(summary: dict[str, Any], metric: str) -> tuple[list[str], list[list[str]]]:
    names = branches(summary)
    header = ["level", "% weights", *names, "dense"]
    dense = _cell(summary["dense"][metric])
    rows = []
    for row in summary["rows"]:
        cells = [str(row["level"]), _format_pct(100 * row["weights_remaining"])]
        for b in names:
            cell = _cell(row[b][metric])
            if b == "oracle" and "oracle_level" in row:
                cell += f" (L{row['oracle_level']})"
            cells.append(cell)
        rows.append([*cells, dense])
    return header, rows


def rich_tables(summary: dict[str, Any]) -> list[Table]:
    out = []
    for metric, caption in METRIC_TITLES.items():
        header, rows = table_cells(summary, metric)
        table = Table(*header, title=f"{caption}, mean ± std over replicates")
        for cells in rows:
            table.add_row(*cells)
        out.append(table)
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Transfer: {title(summary)}", ""]
    lines += [f"Source run: `{summary['source']}`"]
    if summary.get("target_run"):
        lines += [f"Target run (oracle): `{summary['target_run']}`"]
    lines += [f"Replicates: {summary['replicates']}, seed {summary['seed']}.", ""]
    for metric, caption in METRIC_TITLES.items():
        header, rows = table_cells(summary, metric)
        lines += [f"## {caption}, mean ± std over replicates", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---:" for _ in header) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        lines.append("")
    lines.append(
        "transfer: the source ticket's mask bit for bit; random: a random mask with the same "
        "number of weights alive per layer, same init; dense: no mask, same init; oracle: the "
        "target run's own ticket at the level of closest sparsity (L = its level)."
    )
    return "\n".join(lines) + "\n"


def figure(summary: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    xs = [100 * row["weights_remaining"] for row in summary["rows"]]
    for ax, (metric, caption) in zip(axes, METRIC_TITLES.items(), strict=True):
        for b in branches(summary):
            pts = [
                (100 * row["weights_remaining"], row[b][metric])
                for row in summary["rows"]
                if row[b][metric]["n"]
            ]
            if not pts:
                continue
            x = [p[0] for p in pts]
            mean = [100 * p[1]["mean"] for p in pts]
            ax.plot(x, mean, "-o", color=COLORS[b], label=LABELS[b], markersize=4)
            lo = [100 * p[1]["min"] for p in pts]
            hi = [100 * p[1]["max"] for p in pts]
            ax.fill_between(x, lo, hi, color=COLORS[b], alpha=BAND_ALPHA, linewidth=0)
        dense = summary["dense"][metric]
        if dense["n"] and xs:
            ax.axhline(100 * dense["mean"], color=COLORS["dense"], ls="--", label=LABELS["dense"])
            ax.axhspan(100 * dense["min"], 100 * dense["max"], color="gray", alpha=BAND_ALPHA)
        _percent_axis(ax, xs or [100.0])
        ax.set_ylabel(caption)
        ax.legend(fontsize=8)
    fig.suptitle(title(summary), fontsize=9)
    return fig


def write_transfer_outputs(folder: Path, summary: dict[str, Any]) -> None:
    """``transfer.md`` and ``transfer.png``/``.svg`` beside ``transfer.json``."""
    from .store import atomic_write_bytes

    atomic_write_bytes(folder / "transfer.md", markdown(summary).encode())
    _write_figure(figure(summary), folder, "transfer")


def report_figures(run_dirs: Sequence[Path], out_dir: Path) -> list[tuple[str, str]]:
    """Every finished transfer of the runs, drawn into the report folder: (stem, caption)."""
    out = []
    for run in run_dirs:
        for path in sorted(Path(run).glob("transfer/*/transfer.json")):
            try:
                summary = json.loads(path.read_text())
                stem = f"transfer_{path.parent.name}"
                _write_figure(figure(summary), out_dir, stem)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged transfer file must not break the run's report
            out.append((stem, f"Transfer: {title(summary)}"))
    return out
