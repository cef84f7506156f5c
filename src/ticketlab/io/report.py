"""The report of a run, or of several overlaid: the paper's figures, the table, the config.

It reads only the run folder's files (config.toml, run.json, summary.json, levels/*/metrics.json),
so it works on a finished run, on a run still going (no summary.json yet: the table is built from
the finished levels) and on a run folder copied from another machine. The page is self-contained
and offline: inline CSS, no script, figures as PNG files next to it (with SVG versions).

Figures follow Frankle & Carbin (2019): x is the % of weights remaining, log-scaled and descending
from 100 on the left, ticked at the levels' values; lines are means over replicates, the shaded
band their min-max. Diverged networks are left out of every mean and counted in the table.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import TicketlabError
from .store import atomic_write_bytes
from .summary import answer_line, summarize

PAPER_BRANCHES = ("ticket", "reinit", "random_prune")
BRANCH_COLORS = {"ticket": "tab:blue", "reinit": "tab:orange", "random_prune": "tab:green"}
OTHER_COLORS = (
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
)
RUN_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"))
BAND_ALPHA = 0.18


# ---------------------------------------------------------------------------------------------
# reading a run folder


@dataclass
class RunData:
    """One run folder as the report sees it. ``rows`` are summary.json's rows, or when the run
    has not finished, the same rows built from the finished levels."""

    path: Path
    name: str
    config: dict[str, Any]
    config_text: str
    meta: dict[str, Any]
    levels: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    winning_ticket: dict[str, Any] | None
    tolerance_pp: float
    finished: bool

    def branches(self) -> list[str]:
        return _ordered(b for row in self.rows for b in row["branches"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TicketlabError(f"{path}: unreadable or not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TicketlabError(f"{path}: expected a JSON object")
    return {k: v for k, v in obj.items() if not k.startswith("_")}  # the store's checksum keys


def load_run(path: Path, name: str | None = None) -> RunData:
    """Read one run folder (finished or still going)."""
    path = Path(path)
    if not path.is_dir():
        raise TicketlabError(f"{path}: no such run folder")
    try:
        return _load_run(path, name)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise TicketlabError(f"{path}: not a ticketlab run folder, or damaged ({exc!r})") from None


def _load_run(path: Path, name: str | None) -> RunData:
    config_path = path / "config.toml"
    try:
        config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
        config = tomllib.loads(config_text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TicketlabError(f"{config_path}: unreadable or not TOML ({exc})") from None
    meta = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
    levels = sorted(
        (_read_json(p) for p in path.glob("levels/level_*/metrics.json")), key=lambda m: m["level"]
    )
    summary_path = path / "summary.json"
    finished = summary_path.is_file()
    if finished:
        summary = _read_json(summary_path)
    elif levels:
        summary = summarize(levels, float(config.get("tolerance_pp", 0.5)))
    else:
        raise TicketlabError(f"{path}: no finished level yet, nothing to report")
    for row in summary["rows"]:  # fail here, with the folder's name, not while drawing
        float(row["weights_remaining"]), int(row["level"]), dict(row["branches"])
    for metrics in levels:
        float(metrics["weights_remaining"]), list(metrics["networks"])
    return RunData(
        path=path,
        name=name or path.resolve().name,
        config=config,
        config_text=config_text,
        meta=meta,
        levels=levels,
        rows=sorted(summary["rows"], key=lambda r: r["level"]),
        winning_ticket=summary.get("winning_ticket"),
        tolerance_pp=float(summary.get("tolerance_pp", config.get("tolerance_pp", 0.5))),
        finished=finished,
    )


def load_runs(run_dirs: Sequence[Path]) -> list[RunData]:
    """Several runs, named by folder (parent/folder, then #i, when two folders share a name)."""
    paths = [Path(p) for p in run_dirs]
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    return [load_run(p, n) for p, n in zip(paths, names, strict=True)]


# ---------------------------------------------------------------------------------------------
# numbers


def _ordered(names: Iterable[str]) -> list[str]:
    """The paper's branches first, then any others in order of appearance."""
    seen = list(dict.fromkeys(names))
    return [b for b in PAPER_BRANCHES if b in seen] + [b for b in seen if b not in PAPER_BRANCHES]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _stat(row: dict[str, Any], branch: str, key: str) -> dict[str, float] | None:
    """mean/std/min/max/n of one statistic, or None when no healthy network has it."""
    stat = row["branches"].get(branch, {}).get(key)
    if not isinstance(stat, dict) or not stat.get("n") or not math.isfinite(_num(stat.get("mean"))):
        return None
    return {k: _num(stat.get(k)) for k in ("mean", "std", "min", "max", "n")}


def _pct(fraction: float) -> float:
    return 100.0 * fraction


def _format_pct(value: float) -> str:
    """100, 80, 51.2, 3.6, 0.47: one decimal (none when it is 0), two digits below 1%."""
    text = f"{value:.1f}" if value >= 1 else f"{value:.2g}"
    return text[:-2] if text.endswith(".0") else text


def _mean_curve(
    nets: list[dict[str, Any]], key: str = "test_acc"
) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean over the healthy networks of one curve, nulls (non-finite values) ignored."""
    curves = [n["curve"] for n in nets if not n.get("diverged") and n.get("curve")]
    curves = [c for c in curves if c.get(key) and c.get("iteration")]
    if not curves:
        return None
    length = min(len(c["iteration"]) for c in curves)
    values = np.array([[_num(v) for v in c[key][:length]] for c in curves], dtype=float)
    with np.errstate(all="ignore"):
        counts = np.isfinite(values).sum(axis=0)
        mean = np.where(counts > 0, np.nansum(values, axis=0) / np.maximum(counts, 1), np.nan)
    return np.asarray(curves[0]["iteration"][:length], dtype=float), mean


# ---------------------------------------------------------------------------------------------
# figures


def _branch_colors(runs: Sequence[RunData]) -> dict[str, str]:
    colors = dict(BRANCH_COLORS)
    others = [b for b in _ordered(b for run in runs for b in run.branches()) if b not in colors]
    for i, branch in enumerate(others):
        colors[branch] = OTHER_COLORS[i % len(OTHER_COLORS)]
    return colors


def _label(runs: Sequence[RunData], run: RunData, series: str) -> str:
    return series if len(runs) == 1 else f"{run.name}:{series}"


def _thin(values: list[float], max_ticks: int) -> list[float]:
    """At most about ``max_ticks`` ticks, evenly spread on the log axis (always the first and
    the last), so that labels never collide however many levels there are."""
    values = sorted(set(values), reverse=True)
    if len(values) <= 2:
        return values
    gap = (math.log10(values[0]) - math.log10(values[-1])) / max(max_ticks - 1, 1)
    kept = [values[0]]
    for v in values[1:]:
        if math.log10(kept[-1]) - math.log10(v) >= gap * 0.75:
            kept.append(v)
    if kept[-1] != values[-1]:
        if len(kept) > 1 and math.log10(kept[-1]) - math.log10(values[-1]) < gap * 0.75:
            kept.pop()
        kept.append(values[-1])
    return kept


def _percent_axis(ax: Axes, values: Iterable[float], max_ticks: int = 12) -> None:
    """The paper's x axis: % of weights remaining, log scale, 100 on the left."""
    values = [v for v in values if v > 0 and math.isfinite(v)]
    ax.set_xscale("log")
    ax.set_xlabel("% of weights remaining")
    if not values:
        return
    ax.xaxis.set_major_locator(FixedLocator(_thin(values, max_ticks)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _format_pct(v)))
    hi, lo = max(values), min(values)
    pad = 1.08 if hi == lo else (hi / lo) ** 0.04
    ax.set_xlim(hi * pad, lo / pad)  # left > right: descending, as in the paper
    ax.grid(True, which="major", alpha=0.3)


def _all_x(runs: Sequence[RunData]) -> list[float]:
    return [_pct(_num(row["weights_remaining"])) for run in runs for row in run.rows]


def _plot_stat(ax: Axes, runs: Sequence[RunData], key: str, scale: float) -> int:
    """One line per (run, branch): mean of ``key`` over replicates, min-max band. Returns the
    number of lines drawn."""
    colors = _branch_colors(runs)
    drawn = 0
    for r, run in enumerate(runs):
        style, marker = RUN_STYLES[r % len(RUN_STYLES)]
        for branch in run.branches():
            points = [
                (_pct(_num(row["weights_remaining"])), stat)
                for row in run.rows
                if (stat := _stat(row, branch, key)) is not None
            ]
            if not points:
                continue
            x = np.array([p[0] for p in points])
            mean = np.array([p[1]["mean"] for p in points]) * scale
            lo = np.array(
                [p[1]["min"] if math.isfinite(p[1]["min"]) else p[1]["mean"] for p in points]
            )
            hi = np.array(
                [p[1]["max"] if math.isfinite(p[1]["max"]) else p[1]["mean"] for p in points]
            )
            color = colors[branch]
            ax.fill_between(x, lo * scale, hi * scale, color=color, alpha=BAND_ALPHA, linewidth=0)
            ax.plot(
                x,
                mean,
                linestyle=style,
                marker=marker,
                markersize=4,
                color=color,
                label=_label(runs, run, branch),
            )
            drawn += 1
    return drawn


def _mark_winning(ax: Axes, runs: Sequence[RunData], key: str, scale: float) -> None:
    """A star on the ticket line at the smallest winning ticket (a marker, not a line)."""
    for run in runs:
        win = run.winning_ticket
        if not win:
            continue
        row = next((r for r in run.rows if r["level"] == win["level"]), None)
        stat = _stat(row, "ticket", key) if row else None
        if stat is None:
            continue
        ax.scatter(
            [_pct(_num(win["weights_remaining"]))],
            [stat["mean"] * scale],
            marker="*",
            s=220,
            color="gold",
            edgecolors="black",
            linewidths=0.8,
            zorder=5,
            label=_label(runs, run, "winning ticket"),
        )


def _legend(ax: Axes, **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, framealpha=0.85, **kwargs)


def _outside_legend(fig: Figure, ax: Axes) -> None:
    """Right of the plot, so it never hides a line."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)


BAND_NOTE = "lines: mean over replicates; shaded: min-max; diverged networks excluded"


def _title(runs: Sequence[RunData]) -> str:
    return ", ".join(run.name for run in runs)


def accuracy_figure(runs: Sequence[RunData]) -> Figure:
    """Test accuracy at early stop (left) and at the end of training (right) vs % remaining."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in (
        (axes[0], "early_stop_test_acc", "Test accuracy at early stop"),
        (axes[1], "final_test_acc", "Test accuracy at end of training"),
    ):
        _plot_stat(ax, runs, key, 100.0)
        _mark_winning(ax, runs, key, 100.0)
        _percent_axis(ax, _all_x(runs), max_ticks=11)
        ax.set_title(title)
    axes[0].set_ylabel("Test accuracy (%)")
    axes[1].tick_params(labelleft=True)
    _outside_legend(fig, axes[0])
    fig.suptitle(f"Accuracy vs sparsity: {_title(runs)}   ({BAND_NOTE})", fontsize=10)
    return fig


def early_stop_figure(runs: Sequence[RunData]) -> Figure:
    """Early-stop iteration (minimum validation loss) vs % remaining."""
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    _plot_stat(ax, runs, "early_stop_iter", 1.0)
    _mark_winning(ax, runs, "early_stop_iter", 1.0)
    _percent_axis(ax, _all_x(runs))
    ax.set_ylabel("Early-stop iteration (min. validation loss)")
    _titles(fig, ax, f"Early-stop iteration: {_title(runs)}")
    _outside_legend(fig, ax)
    return fig


def _titles(fig: Figure, ax: Axes, title: str, note: str = BAND_NOTE) -> None:
    fig.suptitle(title, fontsize=11)
    ax.set_title(note, fontsize=8, color="0.35")


def untrained_figure(runs: Sequence[RunData]) -> Figure | None:
    """Accuracy of the masked network before training ("supermask accuracy"), or None when no
    run recorded it."""
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    if not _plot_stat(ax, runs, "untrained_test_acc", 100.0):
        return None
    _percent_axis(ax, _all_x(runs))
    ax.set_ylabel("Test accuracy before training (%)")
    _titles(fig, ax, f"Untrained (supermask) accuracy: {_title(runs)}")
    _outside_legend(fig, ax)
    return fig


def selected_levels(run: RunData, count: int = 4) -> list[int]:
    """Levels to show training curves for: dense, evenly spaced ones, the sparsest, and the
    winning ticket when there is one."""
    levels, count = [m["level"] for m in run.levels], max(count, 2)
    if len(levels) <= count:
        return levels
    picks = {levels[round(i * (len(levels) - 1) / (count - 1))] for i in range(count)}
    win = run.winning_ticket["level"] if run.winning_ticket else None
    inner = picks - {levels[0], levels[-1]}
    if win in levels and win not in picks and inner:
        picks.discard(min(inner, key=lambda lv: abs(lv - win)))
        picks.add(win)
    return sorted(picks)


def curves_figure(runs: Sequence[RunData], count: int = 4) -> Figure:
    """Ticket test accuracy vs training iteration for a few levels (mean over replicates)."""
    fig = Figure(figsize=(max(8.0, min(6.5 * len(runs), 19.5)), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(runs), sharey=True, squeeze=False)[0])
    for ax, run in zip(axes, runs, strict=True):
        chosen = selected_levels(run, count)
        for i, metrics in enumerate(m for m in run.levels if m["level"] in chosen):
            nets = [n for n in metrics["networks"] if n["branch"] == "ticket"]
            curve = _mean_curve(nets)
            if curve is None:
                continue
            pct = _format_pct(_pct(_num(metrics["weights_remaining"])))
            win = run.winning_ticket and run.winning_ticket["level"] == metrics["level"]
            ax.plot(
                curve[0],
                curve[1] * 100,
                color=f"C{i}",
                linewidth=1.6,
                label=f"{pct}% (level {metrics['level']}){' winning' if win else ''}",
            )
        ax.set_xlabel("Training iteration")
        if len(runs) > 1:
            ax.set_title(run.name)
        ax.grid(True, alpha=0.3)
        _legend(ax, loc="lower right", title="% weights remaining", title_fontsize=8)
        ax.tick_params(labelleft=True)
    axes[0].set_ylabel("Test accuracy (%)")
    note = "mean over replicates; diverged networks excluded"
    if len(runs) == 1:
        fig.suptitle("Ticket test accuracy during training", fontsize=11)
        axes[0].set_title(note, fontsize=8, color="0.35")
    else:
        fig.suptitle(f"Ticket test accuracy during training ({note})", fontsize=11)
    return fig


def layers_figure(runs: Sequence[RunData]) -> Figure:
    """% of each layer's weights remaining at each level (the ticket's mask)."""
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    for r, run in enumerate(runs):
        style, marker = RUN_STYLES[r % len(RUN_STYLES)]
        x = np.array([_pct(_num(m["weights_remaining"])) for m in run.levels])
        layers = list(
            dict.fromkeys(name for m in run.levels for name in m.get("layer_remaining", {}))
        )
        for i, layer in enumerate(layers):
            y = [_pct(_num(m.get("layer_remaining", {}).get(layer))) for m in run.levels]
            ax.plot(
                x,
                y,
                linestyle=style,
                marker=marker,
                markersize=4,
                color=f"C{i % 10}",
                label=_label(runs, run, layer),
            )
        ax.plot(
            x, x, linestyle=style, color="black", linewidth=1, label=_label(runs, run, "all layers")
        )
    _percent_axis(ax, _all_x(runs))
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    nice = [m * 10.0**e for e in range(-4, 3) for m in (1, 2, 3, 5, 7)]
    ax.yaxis.set_major_locator(FixedLocator(_thin([v for v in nice if low <= v <= high], 8)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _format_pct(v)))
    ax.set_ylabel("% of the layer's weights remaining")
    _titles(fig, ax, f"Per-layer sparsity: {_title(runs)}", "the ticket's mask, replicate 0")
    _outside_legend(fig, ax)
    return fig


# ---------------------------------------------------------------------------------------------
# writing


# SVG text stays text (editable, searchable, smaller) and the file is the same on every run
SVG_RC = {"svg.fonttype": "none", "svg.hashsalt": "ticketlab"}


def _write_figure(fig: Figure, out_dir: Path, stem: str) -> None:
    """``stem``.png and ``stem``.svg, each written atomically."""
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        if fmt == "png":
            fig.savefig(buf, format="png", dpi=110)
        else:
            with rc_context(SVG_RC):
                fig.savefig(buf, format="svg", metadata={"Date": None})
        atomic_write_bytes(out_dir / f"{stem}.{fmt}", buf.getvalue())


FIGURES = (
    ("accuracy", accuracy_figure, "Test accuracy at early stop and at the end of training"),
    ("early_stop", early_stop_figure, "Early-stop iteration (minimum validation loss)"),
    ("curves", curves_figure, "Test accuracy during training, selected levels (ticket)"),
    ("layers", layers_figure, "Per-layer % of weights remaining"),
    ("untrained", untrained_figure, "Accuracy before training (supermask accuracy)"),
)


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Figures (PNG and SVG), summary.md and a self-contained index.html; returns index.html.

    One run: written to ``RUN/report`` unless ``out_dir`` is given. Several: overlaid, written
    to ``out_dir`` or ``./report_compare``.
    """
    if isinstance(run_dirs, str | os.PathLike):
        run_dirs = [Path(run_dirs)]
    if not run_dirs:
        raise TicketlabError("write_report needs at least one run folder")
    runs = load_runs(run_dirs)
    if out_dir is None:
        out_dir = runs[0].path / "report" if len(runs) == 1 else Path.cwd() / "report_compare"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for stem, build, caption in FIGURES:
        fig = build(runs)
        if fig is not None:
            _write_figure(fig, out_dir, stem)
            figures.append((stem, caption))
    atomic_write_bytes(out_dir / "summary.md", summary_markdown(runs).encode())
    index = out_dir / "index.html"
    sections = stability_sections(runs, out_dir)
    atomic_write_bytes(index, report_html(runs, figures, sections).encode())
    return index


def stability_sections(runs: Sequence[RunData], out_dir: Path) -> list[str]:
    """The instability analysis of each run that has one (``ticketlab stability``): its table and
    figures, copied next to the page so the report stays self-contained."""
    e = html.escape
    parts = []
    for i, run in enumerate(runs):
        folder = run.path / "stability"
        if not (folder / "summary.md").is_file():
            continue
        who = f": {run.name}" if len(runs) > 1 else ""
        parts.append(f"<h2>Stability to SGD noise{e(who)}</h2>")
        parts.append(
            "<p>Instability = largest error on the straight line between two copies trained from "
            "step k with different data orders, minus the mean of their errors (pp); stable "
            "below 2 pp (Frankle et al. 2020).</p>"
        )
        parts.append(f"<pre>{e((folder / 'summary.md').read_text())}</pre>")
        for png in sorted(folder.glob("*.png")):
            stem = f"stability_{i}_{png.stem}"
            atomic_write_bytes(out_dir / f"{stem}.png", png.read_bytes())
            parts.append(f'<figure><img src="{e(stem)}.png" alt="{e(png.stem)}"></figure>')
    return parts


# ---------------------------------------------------------------------------------------------
# tables and text


def _acc_cell(stat: dict[str, float] | None) -> str:
    return "-" if stat is None else f"{_pct(stat['mean']):.1f} ± {_pct(stat['std']):.1f}"


def _iter_cell(stat: dict[str, float] | None) -> str:
    return "-" if stat is None else f"{stat['mean']:.0f} ± {stat['std']:.0f}"


def _diverged(row: dict[str, Any], branch: str) -> int:
    count = _num(row["branches"].get(branch, {}).get("diverged"))
    return int(count) if math.isfinite(count) else 0


def winning_sentence(run: RunData, progress: bool = True) -> str:
    """The run's answer (as the CLI prints it), noting when the run has not finished."""
    sentence = answer_line(
        {"winning_ticket": run.winning_ticket, "tolerance_pp": _fmt_tol(run.tolerance_pp)}
    )
    if progress and not run.finished:
        sentence += f" (Run not finished: {len(run.rows)} levels so far, no summary.json yet.)"
    return sentence


def _fmt_tol(tol: float) -> float | int:
    return int(tol) if float(tol).is_integer() else tol


def table_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary table: per branch, accuracy at early stop and the
    early-stop iteration (mean ± std); diverged networks flagged in the accuracy cell."""
    header = ["level", "% weights"]
    for branch in run.branches():
        header += [f"{branch} acc. (%)", f"{branch} ES iter."]
    rows = []
    for row in run.rows:
        win = bool(run.winning_ticket) and run.winning_ticket["level"] == row["level"]
        cells = [
            f"{row['level']}{' ★' if win else ''}",
            _format_pct(_pct(row["weights_remaining"])),
        ]
        for branch in run.branches():
            if branch not in row["branches"]:
                cells += ["", ""]
                continue
            acc = _acc_cell(_stat(row, branch, "early_stop_test_acc"))
            if n := _diverged(row, branch):
                acc += f" ({n} diverged)"
            cells += [acc, _iter_cell(_stat(row, branch, "early_stop_iter"))]
        rows.append(cells)
    return header, rows


def summary_markdown(runs: Sequence[RunData]) -> str:
    out = []
    for run in runs:
        header, rows = table_rows(run)
        out += [f"## {run.name}", "", winning_sentence(run), ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---:" for _ in header) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
        out += [
            "",
            "acc.: test accuracy at early stop; ES iter.: early-stop iteration. Mean ± std over "
            "replicates; diverged networks are excluded and counted.",
            "",
        ]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1280px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}
.answer{font-size:1.1rem;background:#f3f7ff;border-left:4px solid #1f77b4;padding:.5rem .8rem}
.pending{color:#8a5a00}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right;white-space:nowrap}
th{background:#f4f4f4}tr.win td{background:#fff7d6;font-weight:600}
.warn{color:#b00020;font-weight:600}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9rem;color:#555}
pre{background:#f7f7f7;padding:.7rem;overflow:auto;font-size:.85rem}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem}
dl.meta dt{font-weight:600}dl.meta dd{margin:0}
.scroll{overflow-x:auto}footer{margin-top:2rem;font-size:.8rem;color:#777}
"""


def _html_table(run: RunData) -> str:
    e = html.escape
    branches = run.branches()
    head1 = '<th rowspan="2">level</th><th rowspan="2">% weights<br>remaining</th>' + "".join(
        f'<th colspan="2">{e(b)}</th>' for b in branches
    )
    head2 = "".join("<th>acc. (%)</th><th>ES iter.</th>" for _ in branches)
    _, rows = table_rows(run)
    body = []
    for row, cells in zip(run.rows, rows, strict=True):
        win = bool(run.winning_ticket) and run.winning_ticket["level"] == row["level"]
        tds = []
        for cell in cells:
            text = e(cell)
            if "diverged" in cell:
                value, _, flag = cell.partition(" (")
                text = f'{e(value)} <span class="warn">({e(flag)}</span>'
            tds.append(f"<td>{text}</td>")
        opening = '<tr class="win">' if win else "<tr>"
        body.append(f"{opening}{''.join(tds)}</tr>")
    return (
        '<div class="scroll"><table><thead>'
        f"<tr>{head1}</tr><tr>{head2}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _meta_list(run: RunData) -> str:
    e = html.escape
    items = {"run folder": str(run.path), **run.meta}
    rows = "".join(
        f"<dt>{e(str(k))}</dt><dd>{e(v if isinstance(v, str) else json.dumps(v))}</dd>"
        for k, v in items.items()
    )
    return f'<dl class="meta">{rows}</dl>'


def report_html(
    runs: Sequence[RunData], figures: Sequence[tuple[str, str]], sections: Sequence[str] = ()
) -> str:
    """The page: answer, table, figures, config and metadata (all text escaped)."""
    e = html.escape
    multi = len(runs) > 1
    title = f"ticketlab report: {_title(runs)}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request: the page needs nothing else
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>Lottery-ticket report: {e(_title(runs))}</h1>",
    ]
    for run in runs:
        who = f"<b>{e(run.name)}:</b> " if multi else ""
        parts.append(f'<p class="answer">{who}{e(winning_sentence(run, progress=False))}</p>')
        if not run.finished:
            parts.append(
                f'<p class="pending">{who}this run has not finished (no summary.json yet); the '
                f"table and figures show the {len(run.rows)} levels done so far.</p>"
            )
    parts.append("<h2>Summary</h2>")
    for run in runs:
        if multi:
            parts.append(f"<h3>{e(run.name)}</h3>")
        parts.append(_html_table(run))
    parts.append(
        "<p>acc.: test accuracy at early stop (the iteration of minimum validation loss); "
        "ES iter.: that iteration. Mean ± std over replicates; networks that diverged are "
        "excluded from the means and counted. ★ marks the smallest winning ticket. "
        'Also as <a href="summary.md">summary.md</a>.</p><h2>Figures</h2>'
    )
    for stem, caption in figures:
        parts.append(
            f'<figure><img src="{e(stem)}.png" alt="{e(caption)}">'
            f'<figcaption>{e(caption)} (<a href="{e(stem)}.svg">SVG</a>)</figcaption></figure>'
        )
    parts.extend(sections)
    parts.append("<h2>Configuration</h2>")
    for run in runs:
        if multi:
            parts.append(f"<h3>{e(run.name)}</h3>")
        parts.append(f"<pre>{e(run.config_text or '(no config.toml)')}</pre>")
    parts.append("<h2>Run</h2>")
    for run in runs:
        if multi:
            parts.append(f"<h3>{e(run.name)}</h3>")
        parts.append(_meta_list(run))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017 - py3.10
    parts.append(f"<footer>Generated by ticketlab {e(_version())} on {e(stamp)}.</footer>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# TensorBoard


def log_tensorboard(run_dir: Path, log_dir: Path | None = None) -> Path:
    """Per-level scalars (global_step = level) and the ticket's mean training curves, for
    TensorBoard; written to ``RUN/tensorboard`` unless ``log_dir`` is given."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TicketlabError(
            "TensorBoard logging needs the tensorboard package: pip install ticketlab[tensorboard]"
        ) from None
    run = load_run(Path(run_dir))
    log_dir = Path(log_dir) if log_dir is not None else run.path / "tensorboard"
    for old in log_dir.glob("events.out.tfevents.*"):  # a resumed run logs afresh, not twice
        old.unlink()
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for row in run.rows:
            level = int(row["level"])
            writer.add_scalar("weights_remaining_pct", _pct(row["weights_remaining"]), level)
            for branch in run.branches():
                for key, scale in (
                    ("early_stop_test_acc", 100.0),
                    ("final_test_acc", 100.0),
                    ("untrained_test_acc", 100.0),
                    ("early_stop_iter", 1.0),
                ):
                    if (stat := _stat(row, branch, key)) is not None:
                        writer.add_scalar(f"{branch}/{key}", stat["mean"] * scale, level)
                if branch in row["branches"]:
                    writer.add_scalar(f"{branch}/diverged", _diverged(row, branch), level)
        for metrics in run.levels:
            for branch in _ordered(n["branch"] for n in metrics["networks"]):
                curve = _mean_curve([n for n in metrics["networks"] if n["branch"] == branch])
                if curve is None:
                    continue
                tag = f"curves/level_{metrics['level']:02d}/{branch}/test_acc"
                for step, value in zip(*curve, strict=True):
                    if math.isfinite(value):
                        writer.add_scalar(tag, value * 100, int(step))
    finally:
        writer.close()
    return log_dir
