"""Zhou et al.'s comparison grid: mask criterion x reset x sparsity, all from one dense run.

Protocol (arXiv 1905.01067, one-shot):

1. Train the dense network of every replicate once (all replicates in one stack).
2. For each criterion and sparsity, score each weight from its (init, final) pair and keep the top
   of every layer: hidden Linear and Conv layers lose ``sparsity`` of their weights, the output
   layer *half* that rate, as in Frankle & Carbin and Zhou et al. (so the fraction of weights left
   is a bit above ``1 - sparsity``; it is recorded per sparsity). Biases are never pruned.
3. For each reset, the survivors restart from ``reset(init, fresh, mask)``: the init is the rewind
   point (step 0); ``fresh`` is one new init per replicate for the reinit variants.
4. Every (criterion, reset, sparsity, replicate) network trains with the batched trainer (it stacks
   them itself), with the model's preset optimiser and the same data order per replicate. Recorded:
   the **untrained** test accuracy (step 0: the masked, reset network before any training, Zhou's
   supermask accuracy), the test accuracy at the **early-stop** iteration (minimum validation loss),
   and the **final** test accuracy.
5. Learned supermasks (Zhou §5) and edge-popup (Ramanujan et al.) at 50% kept weights, trained from
   the same inits for ``supermask_steps``: see ``supermask.py`` for how they are evaluated.

Everything is kept in memory and written at the end (``grid.json`` and ``grid.md``, atomically).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from ..backends import get_backend
from ..core.criteria import get_criterion
from ..core.mask import Mask, layer_kinds, prunable_names
from ..core.pruning import prune_layerwise
from ..core.resets import get_reset
from ..core.seeds import derive_seed
from ..errors import TicketlabError
from ..io.config import Config, resolve
from ..io.store import atomic_write_bytes
from ..train.stacked import State
from ..train.supermask import SupermaskResult, default_spec, find_supermasks
from ..train.trainer import Job, Result, TrainSpec, train
from ..zoo.data import load_dataset
from ..zoo.models import build_model
from .common import train_spec

DEFAULT_CRITERIA = ("large_final", "magnitude_increase", "random", "small_final")
DEFAULT_RESETS = (
    "rewind",
    "reinit",
    "signed_constant",
    "reinit_signed",
    "reshuffle",
    "reshuffle_signed",
)
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9)
# (method, weights) of the supermask rows; all at 50% kept weights (the learned one at ~50%).
SUPERMASK_ROWS = (
    ("learned", "init"),
    ("learned", "signed_constant"),
    ("edge_popup", "kaiming_normal"),
    ("edge_popup", "kaiming_constant"),
)
SUPERMASK_DENSITY = 0.5
METRICS = ("untrained_test_acc", "early_stop_test_acc", "final_test_acc")

Progress = Callable[[int], None]


def parse_names(text: str, what: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (duplicates dropped); an empty entry is an error."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise TicketlabError(f"--{what} must be a comma-separated list of names, got {text!r}")
    return list(dict.fromkeys(names))


def parse_sparsities(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise TicketlabError(f"sparsity {part.strip()!r} is not a number") from None
    return list(dict.fromkeys(values))


def validate(
    *,
    model: str,
    data: str,
    criteria: Sequence[str],
    resets: Sequence[str],
    sparsities: Sequence[float],
    replicates: int,
    steps: int,
    seed: int,
    eval_every: int | None,
    supermask_steps: int | None,
    stack_size: int | None,
    supermask: bool = True,
    supermask_rescale: bool = False,
    out: str | Path | None = None,
    lr: float | None = None,
) -> Config:
    """Every check, before anything is trained or written; returns the model's training settings."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise TicketlabError(f"--out {out} exists and is not a folder")
    if not criteria:
        raise TicketlabError("no criterion given")
    if not resets:
        raise TicketlabError("no reset given")
    if not sparsities:
        raise TicketlabError("no sparsity given")
    for name in criteria:
        get_criterion(name)
    for name in resets:
        get_reset(name)
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise TicketlabError(
                f"sparsity must be in (0, 1) (fraction of weights removed), got {s}"
            )
    if supermask_steps is not None and supermask_steps < 1:
        raise TicketlabError(f"supermask steps must be >= 1, got {supermask_steps}")
    settings: dict[str, Any] = {
        "model": model,
        "data": data,
        "replicates": replicates,
        "steps": steps,
        "seed": seed,
    }
    if eval_every is not None:
        settings["eval_every"] = eval_every
    if lr is not None:
        settings["lr"] = lr
    if stack_size is not None:
        settings["stack_size"] = stack_size
    return resolve(settings)


def _train_spec(c: Config, eval_every: int | None) -> TrainSpec:
    return replace(train_spec(c), eval_every=eval_every or max(1, c.steps // 10))


def run_grid(
    *,
    model: str = "mnist1d_mlp",
    data: str = "mnist1d",
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    resets: Sequence[str] = DEFAULT_RESETS,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    replicates: int = 2,
    steps: int = 400,
    seed: int = 0,
    eval_every: int | None = None,
    lr: float | None = None,
    supermask: bool = True,
    supermask_steps: int | None = None,
    supermask_rescale: bool = False,
    stack_size: int | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    backend: str = "local",
    address: str = "",
) -> dict[str, Any]:
    """Run the grid; returns what ``grid.json`` holds and, with ``out``, writes it and ``grid.md``.

    ``sparsity`` is the fraction of each hidden layer's weights removed (the output layer loses
    half of it). ``eval_every`` defaults to a tenth of ``steps``; ``supermask_steps`` to ``steps``;
    ``lr`` (of the weight training) to the model's preset (``config.PRESETS``).
    ``supermask_rescale``: Zhou's dynamic weight rescaling in the learned-supermask rows.
    ``backend``/``address``: where the weight-training stacks run (``ticketlab.backends``); the
    supermask rows train in this process.
    """
    criteria, resets = list(dict.fromkeys(criteria)), list(dict.fromkeys(resets))
    sparsities = sorted(dict.fromkeys(float(s) for s in sparsities))
    c = validate(
        model=model,
        data=data,
        criteria=criteria,
        resets=resets,
        sparsities=sparsities,
        replicates=replicates,
        steps=steps,
        seed=seed,
        eval_every=eval_every,
        supermask_steps=supermask_steps,
        stack_size=stack_size,
        out=out,
        lr=lr,
    )
    started = time.perf_counter()
    dataset = load_dataset(c.data, c.val_fraction, c.seed)
    template = build_model(c.model, dataset.input_shape, dataset.num_classes, seed=0)
    spec = _train_spec(c, eval_every)
    names = prunable_names(template)
    dense_mask = Mask.ones_like({n: t for n, t in template.state_dict().items() if n in names})

    def state(seed_: int) -> State:
        built = build_model(c.model, dataset.input_shape, dataset.num_classes, seed_)
        return {k: v.detach().clone() for k, v in built.state_dict().items()}

    inits = [state(derive_seed(seed, "init", r)) for r in range(replicates)]
    fresh = [state(derive_seed(seed, "fresh", r)) for r in range(replicates)]
    data_seeds = [derive_seed(seed, "data", r) for r in range(replicates)]
    size = stack_size or None
    runner = get_backend(backend, address)

    # 1. the dense networks, one stack
    dense = train(
        template,
        [Job(inits[r], dense_mask, data_seeds[r]) for r in range(replicates)],
        dataset,
        spec,
        stack_size=size,
        progress=progress,
        backend=runner,
    )

    # 2-4. one-shot masks, resets, and every pruned network trained in stacks
    cells, jobs = _one_shot_jobs(
        template, inits, fresh, dense, data_seeds, criteria, resets, sparsities, seed
    )
    results = train(
        template, jobs, dataset, spec, stack_size=size, progress=progress, backend=runner
    )
    for i, cell in enumerate(cells):
        cell.update(_aggregate(results[i * replicates : (i + 1) * replicates]))

    # 5. supermask rows
    rows = []
    if supermask:
        sm_steps = supermask_steps or c.steps
        for method, weights in SUPERMASK_ROWS:
            sm_spec = default_spec(method, sm_steps, c.batch_size)
            seeds = [derive_seed(seed, "supermask", method, weights, r) for r in range(replicates)]
            options = {"method": method, "weights": weights, "density": SUPERMASK_DENSITY}
            options["rescale"] = supermask_rescale and method == "learned"
            found = find_supermasks(
                template,
                inits,
                dataset,
                sm_spec,
                seeds=seeds,
                stack_size=size,
                progress=progress,
                **options,
            )
            rows.append(_supermask_row(method, weights, sm_spec, found))

    grid = {
        "settings": {
            "model": c.model,
            "data": c.data,
            "criteria": criteria,
            "resets": resets,
            "sparsities": sparsities,
            "replicates": replicates,
            "seed": seed,
            "steps": c.steps,
            "batch_size": c.batch_size,
            "optimizer": c.optimizer,
            "lr": c.lr,
            "eval_every": spec.eval_every,
            "pruning": "one-shot, layer-wise; output layer at half the rate",
            "supermask_steps": (supermask_steps or c.steps) if supermask else None,
            "supermask_rescale": supermask_rescale,
        },
        "dense": _aggregate(dense),
        "cells": cells,
        "supermasks": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if out is not None:
        write_grid(Path(out), grid)
    return grid


def _one_shot_jobs(
    template: torch.nn.Module,
    inits: list[State],
    fresh: list[State],
    dense: list[Result],
    data_seeds: list[int],
    criteria: Sequence[str],
    resets: Sequence[str],
    sparsities: Sequence[float],
    seed: int,
) -> tuple[list[dict[str, Any]], list[Job]]:
    """One cell per (criterion, sparsity, reset) and, cell after cell, one job per replicate."""
    names = prunable_names(template)
    kinds = layer_kinds(template)
    dense_mask = Mask.ones_like({n: inits[0][n] for n in names})
    cells: list[dict[str, Any]] = []
    jobs: list[Job] = []
    for criterion in criteria:
        score = get_criterion(criterion)
        for sparsity in sparsities:
            rates = {n: sparsity / 2 if kinds[n] == "output" else sparsity for n in names}
            masks = []
            for r, (init, result) in enumerate(zip(inits, dense, strict=True)):
                g = torch.Generator().manual_seed(derive_seed(seed, "criterion", criterion, r))
                scores = {n: score(init[n], result.final[n], g) for n in names}
                masks.append(prune_layerwise(dense_mask, scores, rates))
            for reset_name in resets:
                reset = get_reset(reset_name)
                cells.append(
                    {
                        "criterion": criterion,
                        "reset": reset_name,
                        "sparsity": sparsity,
                        "weights_remaining": statistics.fmean(m.density() for m in masks),
                    }
                )
                for r, mask in enumerate(masks):
                    key = derive_seed(seed, "reset", criterion, sparsity, reset_name, r)
                    g = torch.Generator().manual_seed(key)
                    start = dict(inits[r])
                    for n in names:
                        start[n] = reset(inits[r][n], fresh[r][n], mask[n], g)
                    jobs.append(Job(start, mask, data_seeds[r]))
    return cells, jobs


def _supermask_row(
    method: str, weights: str, spec: TrainSpec, found: Sequence[SupermaskResult]
) -> dict[str, Any]:
    per = []
    for f in found:
        metrics = {k: v for k, v in f.metrics().items() if k not in ("curve", "layer_remaining")}
        per.append({**metrics, "test_acc_curve": f.curve["test_acc"]})
    keys = ("test_acc", "sampled_test_acc", "expected_test_acc", "untrained_test_acc")
    rescaled = any(f.rescaled for f in found)
    return {
        "method": method,
        "weights": f"{weights}, rescaled" if rescaled else weights,
        "steps": spec.steps,
        "lr": spec.lr,
        "replicates": per,
        "mean": {k: _mean([p[k] for p in per]) for k in (*keys, "weights_remaining")},
    }


def total_steps(
    *,
    criteria: Sequence[str],
    resets: Sequence[str],
    sparsities: Sequence[float],
    replicates: int,
    steps: int,
    supermask: bool,
    supermask_steps: int | None,
    supermask_rescale: bool = False,
) -> int:
    """Network-steps of a grid (what the ``progress`` callback adds up to)."""
    cells = len(set(criteria)) * len(set(resets)) * len(set(sparsities))
    total = replicates * steps * (1 + cells)
    if supermask:
        total += len(SUPERMASK_ROWS) * replicates * (supermask_steps or steps)
    return total


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _aggregate(results: Sequence[Result]) -> dict[str, Any]:
    """Per-replicate metrics and their mean and spread; diverged networks are counted, not
    averaged."""
    per = [
        {
            "untrained_test_acc": _finite(res.curve["test_acc"][0]),
            "early_stop_test_acc": _finite(res.early_stop_test_acc),
            "final_test_acc": _finite(res.final_test_acc),
            "early_stop_iter": res.early_stop_iter,
            "diverged": res.diverged,
            "test_acc_curve": res.curve["test_acc"],
        }
        for res in results
    ]
    healthy = [p for p in per if not p["diverged"]]
    std = {}
    for key in METRICS:
        values = [p[key] for p in healthy if p[key] is not None]
        std[key] = statistics.pstdev(values) if values else None
    return {
        "replicates": per,
        "diverged": len(per) - len(healthy),
        "mean": {k: _mean([p[k] for p in healthy]) for k in (*METRICS, "early_stop_iter")},
        "std": std,
    }


# --- presentation ------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _remaining(grid: dict[str, Any]) -> dict[float, float]:
    out: dict[float, float] = {}
    for cell in grid["cells"]:
        out.setdefault(cell["sparsity"], cell["weights_remaining"])
    return out


def _header(sparsity: float, remaining: float) -> str:
    return f"{100 * remaining:.1f}% left\n(pruned {sparsity:g})"


def _rows(grid: dict[str, Any]) -> list[tuple[str, str, list[list[str]]]]:
    """(criterion, reset, [[untrained, early stop, final] per sparsity]) in grid order."""
    by_key = {(c["criterion"], c["reset"], c["sparsity"]): c for c in grid["cells"]}
    rows = []
    for criterion in grid["settings"]["criteria"]:
        for reset in grid["settings"]["resets"]:
            per_sparsity = []
            for s in grid["settings"]["sparsities"]:
                cell = by_key[(criterion, reset, s)]
                values = [_pct(cell["mean"][k]) for k in METRICS]
                if cell["diverged"]:
                    values[-1] += f" ({cell['diverged']} diverged)"
                per_sparsity.append(values)
            rows.append((criterion, reset, per_sparsity))
    return rows


def _dense_line(grid: dict[str, Any]) -> str:
    d, s = grid["dense"]["mean"], grid["settings"]
    return (
        f"Dense {s['model']} on {s['data']} ({s['steps']} steps, replicates: {s['replicates']}): "
        f"early stop {_pct(d['early_stop_test_acc'])}%, final {_pct(d['final_test_acc'])}%, "
        f"untrained {_pct(d['untrained_test_acc'])}%."
    )


def _supermask_cells(row: dict[str, Any]) -> list[str]:
    m = row["mean"]
    return [
        row["method"].replace("_", "-"),
        row["weights"],
        _pct(m["weights_remaining"]),
        _pct(m["test_acc"]),
        _pct(m["sampled_test_acc"]) if m["sampled_test_acc"] is not None else "",
        _pct(m["untrained_test_acc"]),
    ]


SUPERMASK_COLUMNS = (
    "supermask",
    "weights",
    "% kept",
    "test acc",
    "10 draws",
    "at step 0",
)


def tables(grid: dict[str, Any]) -> list[Table]:
    """The grid as rich tables: criterion x reset by sparsity, then the supermask rows."""
    remaining = _remaining(grid)
    main = Table(
        title="Test accuracy (%), mean over replicates: untrained / early stop / final",
        caption=_dense_line(grid),
    )
    main.add_column("criterion")
    main.add_column("reset")
    for s in grid["settings"]["sparsities"]:
        main.add_column(_header(s, remaining[s]), justify="center")
    for criterion, reset, per_sparsity in _rows(grid):
        main.add_row(criterion, reset, *(" / ".join(v) for v in per_sparsity))
    out = [main]
    if grid["supermasks"]:
        steps = grid["settings"]["supermask_steps"]
        sm = Table(title=f"Supermasks: weights never trained, masks trained {steps} steps")
        for name in SUPERMASK_COLUMNS:
            sm.add_column(name, justify="left" if name in ("supermask", "weights") else "right")
        for row in grid["supermasks"]:
            sm.add_row(*_supermask_cells(row))
        out.append(sm)
    return out


def markdown(grid: dict[str, Any]) -> str:
    """The same tables in Markdown."""
    remaining = _remaining(grid)
    sparsities = grid["settings"]["sparsities"]
    head = ["criterion", "reset"] + [
        f"{100 * remaining[s]:.1f}% left (pruned {s:g})" for s in sparsities
    ]
    lines = [
        "# Mask criterion x reset grid",
        "",
        _dense_line(grid),
        "",
        "Test accuracy (%), mean over replicates, each cell **untrained / early stop / final**. "
        "One-shot layer-wise pruning from the dense run (output layer at half the rate); "
        "*untrained* is the masked, reset network before any training.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + ":---:|" * len(sparsities),
    ]
    for criterion, reset, per_sparsity in _rows(grid):
        cells = [" / ".join(values) for values in per_sparsity]
        lines.append("| " + " | ".join([criterion, reset, *cells]) + " |")
    if grid["supermasks"]:
        steps = grid["settings"]["supermask_steps"]
        lines += [
            "",
            f"Supermasks: weights never trained, masks trained {steps} steps; *test acc* is the "
            "returned binary mask (one Bernoulli draw for the learned supermask).",
            "",
            "| " + " | ".join(SUPERMASK_COLUMNS) + " |",
            "|---|---|" + "---:|" * (len(SUPERMASK_COLUMNS) - 2),
        ]
        for row in grid["supermasks"]:
            lines.append("| " + " | ".join(_supermask_cells(row)) + " |")
    lines += ["", f"Took {grid['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write_grid(out: Path, grid: dict[str, Any]) -> None:
    """``grid.json`` and ``grid.md`` in ``out``, each written atomically."""
    payload = json.dumps(grid, indent=1, allow_nan=False).encode()
    atomic_write_bytes(out / "grid.json", payload)
    atomic_write_bytes(out / "grid.md", markdown(grid).encode())
