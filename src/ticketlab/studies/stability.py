"""Instability analysis (Frankle, Dziugaite, Roy & Carbin 2020, arXiv 1912.05671).

For a level of a finished ``find`` run and each rewind step k: two copies of the subnetwork start
from the same weights at step k (the dense network's weights at k, masked) and train to the end T
with different data orders; the error is measured along the straight line between the two trained
copies at ``points`` evenly spaced places. Instability = the largest error on the line minus the
mean of the two endpoints' errors (test and training set); stable when below 2 percentage points.

The copies of every k, branch and replicate are the jobs of one ``train`` call (each k is its own
stack, the stacks train side by side); the ``points`` interpolated networks of a pair are evaluated
as one stack. Everything lands in ``RUN/<name>/`` through the run's store: rewind points first,
then ``level_LL.json`` when a level's pairs are done; the trainer's checkpoints make a killed run
resume to the same bits.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.mask import Mask, prunable_names
from ..core.pruning import random_mask_like
from ..core.seeds import derive_seed
from ..errors import TicketlabError
from ..io.config import Config, load_toml, resolve
from ..io.run_files import level_dir, load_masks, load_rewind
from ..io.store import RunStore
from ..train.stacked import State, max_stack_size, stack_networks
from ..train.trainer import (
    EVAL_CHUNK,
    Job,
    Progress,
    Result,
    chunk_count,
    loss_and_accuracy,
    train,
)
from ..zoo.data import Dataset, load_dataset
from ..zoo.models import build_model
from .common import StoreCheckpointer, dense_data_seed, init_seed, train_spec

STABLE_PP = 2.0
BRANCHES = ("ticket", "random_prune", "reinit")
BN_STATS = ("interpolate", "reestimate")


@dataclass(frozen=True)
class Settings:
    """What one ``ticketlab stability`` call asks for."""

    level: int
    ks: tuple[int, ...]
    replicates: int | None = None  # default: every replicate of the run
    controls: bool = True
    points: int = 30
    bn_stats: str = "interpolate"  # BatchNorm running statistics along the path
    bn_batches: int = 20  # training batches that re-estimate them ("reestimate")
    name: str = "stability"
    stack_size: int | None = None

    def identity(self) -> dict[str, Any]:
        """The settings every saved pair of the folder must share (k and levels may grow)."""
        return {"points": self.points, "bn_stats": self.bn_stats, "bn_batches": self.bn_batches}


@dataclass(frozen=True)
class RunData:
    """A finished ``find`` run, opened for another study."""

    root: Path
    config: Config
    store: RunStore
    template: nn.Module
    data: Dataset
    init_state: Callable[[int], State] = field(compare=False)


def open_run(root: Path) -> RunData:
    """The run folder, its config, model and data; one clear line if it is not a ``find`` run."""
    root = Path(root)
    if not (root / "config.toml").is_file():
        raise TicketlabError(f"{root} is not a ticketlab run folder (no config.toml)")
    try:
        config = resolve(load_toml(root / "config.toml"))
    except TicketlabError as exc:
        raise TicketlabError(f"{root / 'config.toml'} is not a usable run config: {exc}") from None
    if config.model.startswith("custom:"):
        raise TicketlabError(
            f"{root} was found on a custom model from Python; stability needs a registered model"
        )
    store = RunStore(root, config.hash())
    if not store.exists(f"{level_dir(0)}/metrics.json"):
        raise TicketlabError(f"{root} holds no trained level (run `ticketlab find` first)")
    store.read_json(f"{level_dir(0)}/metrics.json")  # another experiment's folder stops here
    data = load_dataset(config.data, config.val_fraction, config.seed)
    template = build_model(config.model, data.input_shape, data.num_classes, seed=0)

    def init_state(seed: int) -> State:
        model = build_model(config.model, data.input_shape, data.num_classes, seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return RunData(root, config, store, template, data, init_state)


def validate(run: RunData, s: Settings) -> None:
    c = run.config

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise TicketlabError(message)

    done = [lv for lv in range(c.levels + 1) if run.store.exists(f"{level_dir(lv)}/metrics.json")]
    need(
        s.level in done,
        f"level {s.level} does not exist in {run.root} (levels with results: "
        f"{', '.join(map(str, done))})",
    )
    need(bool(s.ks), "give at least one rewind step with --k")
    for k in s.ks:
        need(
            0 <= k < c.steps,
            f"k must be in [0, {c.steps}) (the run trains {c.steps} steps), got {k}",
        )
    need(len(set(s.ks)) == len(s.ks), f"rewind steps repeat in {list(s.ks)}")
    reps = s.replicates if s.replicates is not None else c.replicates
    need(1 <= reps <= c.replicates, f"replicates must be in [1, {c.replicates}], got {reps}")
    need(s.points >= 2, f"points must be >= 2, got {s.points}")
    need(
        s.bn_stats in BN_STATS, f"bn_stats must be one of {', '.join(BN_STATS)}, got {s.bn_stats!r}"
    )
    need(s.bn_batches >= 1, f"bn_batches must be >= 1, got {s.bn_batches}")
    need(
        bool(s.name) and "/" not in s.name and s.name not in (".", ".."),
        f"name must be a plain folder name, got {s.name!r}",
    )


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TicketlabError(f"--k must be comma-separated steps, got {text!r}") from None
    return tuple(sorted(ks))


def branches(run: RunData, s: Settings) -> list[str]:
    """The dense network has no controls (they would equal it)."""
    return ["ticket", *(BRANCHES[1:] if s.controls and s.level else [])]


def replicates(run: RunData, s: Settings) -> int:
    return s.replicates if s.replicates is not None else run.config.replicates


# ------------------------------------------------------------------------------------------------
# The study


def run_stability(run: RunData, s: Settings, progress: Progress | None = None) -> dict[str, Any]:
    """Train the missing pairs, evaluate their paths, save ``level_LL.json``; returns it."""
    validate(run, s)
    store, rel = run.store, f"{s.name}/{level_dir(s.level).split('/')[-1]}.json"
    _check_settings(store, s)
    saved = store.read_json(rel) if store.exists(rel) else {"level": s.level, "pairs": {}}
    todo = [
        (b, k, r)
        for b in branches(run, s)
        for k in s.ks
        for r in range(replicates(run, s))
        if pair_key(b, k, r) not in saved["pairs"]
    ]
    if todo:
        points = rewind_points(run, s, sorted({k for _, k, _ in todo}))
        pairs = _train_pairs(run, s, todo, points, progress)
        saved["pairs"].update(pairs)
        saved["weights_remaining"] = _level_density(run, s.level)
        store.write_json(rel, saved)
        _remove_checkpoints(store, s)
    elif progress:
        progress(0)
    return saved


def pair_key(branch: str, k: int, r: int) -> str:
    return f"{branch}/k{k}/r{r}"


def _check_settings(store: RunStore, s: Settings) -> None:
    rel = f"{s.name}/settings.json"
    if store.exists(rel):
        before = store.read_json(rel)
        if before != s.identity():
            diff = ", ".join(
                f"{k}={before.get(k)}" for k in s.identity() if before.get(k) != getattr(s, k)
            )
            raise TicketlabError(
                f"{store.path(s.name)} was analysed with {diff}; pass the same settings or "
                "another --name"
            )
    else:
        store.write_json(rel, s.identity())


def _level_density(run: RunData, level: int) -> float:
    return float(run.store.read_json(f"{level_dir(level)}/metrics.json")["weights_remaining"])


def rewind_points(
    run: RunData, s: Settings, ks: Sequence[int], progress: Progress | None = None
) -> dict[tuple[int, int], State]:
    """The dense network's weights at each step k, per replicate: its init at k = 0, the run's own
    rewind point at its rewind step, and otherwise a dense copy retrained to k with the run's seeds
    (saved, so a resumed analysis starts from the same bits)."""
    c, store = run.config, run.store
    rel = f"{s.name}/rewind_points.safetensors"
    saved, _ = store.read_tensors(rel) if store.exists(rel) else ({}, {})
    run_rewind = load_rewind(store, c)
    out: dict[tuple[int, int], State] = {}
    missing: list[tuple[int, int]] = []
    for r in range(replicates(run, s)):
        for k in ks:
            prefix = f"r{r}/k{k}/"
            if k == 0:
                out[r, k] = run.init_state(init_seed(c, r))
            elif k == c.rewind_step:
                out[r, k] = run_rewind[r]
            elif any(key.startswith(prefix) for key in saved):
                out[r, k] = {
                    key[len(prefix) :]: t for key, t in saved.items() if key.startswith(prefix)
                }
            else:
                missing.append((r, k))
    if missing:
        spec = replace(train_spec(c), steps=max(k for _, k in missing))
        everything = Mask.ones_like(
            {n: p for n, p in run.template.state_dict().items() if n in _prunable(run)}
        )
        jobs = [
            Job(run.init_state(init_seed(c, r)), everything, dense_data_seed(c, r), snapshot_step=k)
            for r, k in missing
        ]
        results = train(
            run.template, jobs, run.data, spec, stack_size=s.stack_size, progress=progress
        )
        for (r, k), res in zip(missing, results, strict=True):
            assert res.snapshot is not None
            out[r, k] = res.snapshot
            saved.update({f"r{r}/k{k}/{n}": t for n, t in res.snapshot.items()})
        store.write_tensors(rel, saved)
    return out


def _prunable(run: RunData) -> list[str]:
    c = run.config
    return prunable_names(run.template, c.prune_biases, c.exclude)


def pair_jobs(
    run: RunData, s: Settings, todo: Sequence[tuple[str, int, int]], points: dict
) -> list[Job]:
    """Two jobs per (branch, k, replicate): same weights, mask and start step k; the copies
    differ only in their data seed (and so in data order and any augmentation)."""
    c = run.config
    order = [n for n in run.template.state_dict() if n in _prunable(run)]
    # the model's own layer order (a safetensors file does not keep one), so the random mask's
    # draws go to the same layers in every process
    masks = [Mask({n: m[n] for n in order}) for m in load_masks(run.store, s.level, c)]
    jobs = []
    for branch, k, r in todo:
        mask = masks[r]
        start = dict(points[r, k])
        if branch == "random_prune":
            g = torch.Generator().manual_seed(derive_seed(c.seed, "stability-mask", r, s.level))
            mask = random_mask_like(mask, g)
        if branch == "reinit":
            start = dict(run.init_state(derive_seed(c.seed, "stability-fresh", r, s.level)))
        for name in mask.names():
            start[name] = start[name] * mask[name]
        for copy in (0, 1):
            seed = derive_seed(c.seed, "stability-data", s.level, branch, k, r, copy)
            jobs.append(Job(start, mask, seed, start_step=k))
    return jobs


def _train_pairs(
    run: RunData,
    s: Settings,
    todo: Sequence[tuple[str, int, int]],
    points: dict,
    progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    c = run.config
    jobs = pair_jobs(run, s, todo, points)
    starts = [j.start_step for j in jobs]
    n_chunks = chunk_count(run.template, len(jobs), s.stack_size, start_steps=starts)
    tag = hashlib.sha256(json.dumps([list(t) for t in todo]).encode()).hexdigest()[:10]
    checkpointers = [
        StoreCheckpointer(
            run.store,
            f"{s.name}/checkpoints/level_{s.level:02d}_{tag}_n{n_chunks}_c{i}.safetensors",
            c.checkpoint_every,
        )
        for i in range(n_chunks)
    ]
    results = train(
        run.template,
        jobs,
        run.data,
        train_spec(c),
        stack_size=s.stack_size,
        progress=progress,
        checkpointers=checkpointers,
    )
    pairs = {}
    for i, (branch, k, r) in enumerate(todo):
        a, b = results[2 * i], results[2 * i + 1]
        pairs[pair_key(branch, k, r)] = pair_record(run, s, branch, k, r, a, b)
    return pairs


def pair_record(
    run: RunData, s: Settings, branch: str, k: int, r: int, a: Result, b: Result
) -> dict[str, Any]:
    alphas = [i / (s.points - 1) for i in range(s.points)]
    d = run.data
    test_acc = path_accuracies(run.template, a.final, b.final, alphas, d.x_test, d.y_test, s, d)
    train_acc = path_accuracies(run.template, a.final, b.final, alphas, d.x_train, d.y_train, s, d)
    test = [1.0 - acc for acc in test_acc]
    train_err = [1.0 - acc for acc in train_acc]
    return {
        "branch": branch,
        "k": k,
        "replicate": r,
        "copies_final_test_acc": [a.final_test_acc, b.final_test_acc],
        "alphas": alphas,
        "test_acc": test_acc,
        "train_acc": train_acc,
        "test_error": test,
        "train_error": train_err,
        "instability_test": instability(test),
        "instability_train": instability(train_err),
    }


def instability(errors: Sequence[float]) -> float:
    """The error barrier: the largest error on the path minus the mean of its endpoints'."""
    return max(errors) - (errors[0] + errors[-1]) / 2


def interpolate(a: State, b: State, alpha: float) -> State:
    """``(1 - alpha) a + alpha b`` on every float tensor: exactly ``a`` at 0 and ``b`` at 1.
    Integer buffers (BatchNorm's batch counter) come from ``a``."""
    return {
        n: (1 - alpha) * a[n] + alpha * b[n] if a[n].is_floating_point() else a[n].clone()
        for n in a
    }


PATH_ROWS = 16_384


def path_accuracies(
    template: nn.Module,
    a: State,
    b: State,
    alphas: Sequence[float],
    x: torch.Tensor,
    y: torch.Tensor,
    s: Settings,
    data: Dataset,
) -> list[float]:
    """Accuracy of each interpolated network: one stack for all of them, or one network at a time
    for modules that cannot share a stack (BatchNorm, dropout)."""
    dtype = next(t.dtype for t in a.values() if t.is_floating_point())
    states = [interpolate(a, b, alpha) for alpha in alphas]
    if s.bn_stats == "reestimate" and has_batchnorm(template):
        states = [reestimate_bn(template, st, data, s.bn_batches) for st in states]
    x = x.to(dtype)
    # at most PATH_ROWS rows (networks x examples) in one forward pass: 30 conv nets on a chunk of
    # 2,048 images at once held gigabytes of activations and spent half its time in the kernel
    group = 1 if max_stack_size(template) == 1 else max(1, PATH_ROWS // min(len(x), EVAL_CHUNK))
    accuracies: list[float] = []
    for start in range(0, len(states), group):
        stack = stack_networks(template, states[start : start + group], dtype, x)
        accuracies += loss_and_accuracy(stack, x, y)[1].tolist()
    return accuracies


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def reestimate_bn(template: nn.Module, state: State, data: Dataset, batches: int) -> State:
    """BatchNorm running statistics recomputed on training batches (a cumulative average over
    ``batches`` batches of 128, in a fixed order) instead of interpolated; weights unchanged."""
    import copy

    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    net = copy.deepcopy(template).to(dtype)
    net.load_state_dict(state)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts equally
    g = torch.Generator().manual_seed(0x57AB)
    order = torch.randperm(data.x_train.shape[0], generator=g)
    net.train()
    with torch.no_grad():
        for i in range(batches):
            idx = order[(i * 128) % len(order) :][:128]
            net(data.x_train[idx].to(dtype))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _remove_checkpoints(store: RunStore, s: Settings) -> None:
    folder = store.path(f"{s.name}/checkpoints")
    if folder.is_dir():
        for path in folder.glob("*.safetensors"):
            path.unlink(missing_ok=True)


def total_steps(run: RunData, s: Settings) -> int:
    """Network-steps of the pairs still to train (the dense rewind points are extra, and small)."""
    c, store = run.config, run.store
    rel = f"{s.name}/{level_dir(s.level).split('/')[-1]}.json"
    done = store.read_json(rel)["pairs"] if store.exists(rel) else {}
    return sum(
        2 * (c.steps - k)
        for b in branches(run, s)
        for k in s.ks
        for r in range(replicates(run, s))
        if pair_key(b, k, r) not in done
    )


# ------------------------------------------------------------------------------------------------
# Summary, table and figures


def summarize(run: RunData, name: str = "stability") -> list[dict[str, Any]]:
    """One row per (level, branch, k) over replicates, from every level file of the folder."""
    store, c = run.store, run.config
    dense = run.store.read_json(f"{level_dir(0)}/metrics.json")["networks"]
    dense_acc = _mean([n["final_test_acc"] for n in dense if n["branch"] == "ticket"])
    rows = []
    for path in sorted(store.path(name).glob("level_*.json")):
        saved = store.read_json(f"{name}/{path.name}")
        groups: dict[tuple[str, int], list[dict]] = {}
        for pair in saved["pairs"].values():
            groups.setdefault((pair["branch"], pair["k"]), []).append(pair)
        for (branch, k), pairs in sorted(
            groups.items(), key=lambda t: (BRANCHES.index(t[0][0]), t[0][1])
        ):
            test = [p["instability_test"] * 100 for p in pairs]
            train_ = [p["instability_train"] * 100 for p in pairs]
            acc = _mean([a for p in pairs for a in p["copies_final_test_acc"]]) * 100
            rows.append(
                {
                    "level": saved["level"],
                    "weights_remaining": saved.get("weights_remaining", 1.0),
                    "branch": branch,
                    "k": k,
                    "replicates": len(pairs),
                    "instability_test_pp": _mean(test),
                    "instability_test_std": _std(test),
                    "instability_train_pp": _mean(train_),
                    "instability_train_std": _std(train_),
                    "stable": _mean(test) < STABLE_PP,
                    "test_acc": acc,
                    "dense_test_acc": dense_acc * 100,
                    "matching": acc >= dense_acc * 100 - c.tolerance_pp,
                }
            )
    return rows


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def write_outputs(run: RunData, name: str = "stability") -> list[Path]:
    """summary.json, summary.md and the two figures in ``RUN/<name>/``; returns the figures."""
    rows = summarize(run, name)
    store = run.store
    store.write_json(f"{name}/summary.json", {"rows": rows, "stable_below_pp": STABLE_PP})
    from ..io.store import atomic_write_bytes

    atomic_write_bytes(store.path(f"{name}/summary.md"), markdown(rows).encode())
    return plot(run, rows, name)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| level | % weights | branch | k | instability test (pp) | instability train (pp) "
        "| stable | test acc % | matching |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['level']} | {100 * r['weights_remaining']:.1f} | {r['branch']} | {r['k']} "
        f"| {r['instability_test_pp']:.2f} ± {r['instability_test_std']:.2f} "
        f"| {r['instability_train_pp']:.2f} ± {r['instability_train_std']:.2f} "
        f"| {'yes' if r['stable'] else 'no'} | {r['test_acc']:.2f} "
        f"| {'yes' if r['matching'] else 'no'} |\n"
        for r in rows
    )
    return head + body


def plot(run: RunData, rows: Sequence[dict[str, Any]], name: str = "stability") -> list[Path]:
    """Instability vs k (symmetric log x, so k = 0 shows) per level and branch; the test error
    along the path for each k of each analysed level's ticket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.store import atomic_write_bytes

    out = []
    series: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        series.setdefault((row["level"], row["branch"]), []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("test", "train"), ("test", "train"), strict=True):
        for (level, branch), rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["k"])
            ks = [r["k"] for r in rs]
            style = {"ticket": "-o", "random_prune": "--s", "reinit": ":^"}[branch]
            tag = "dense" if level == 0 else f"{branch} {100 * rs[0]['weights_remaining']:.1f}%"
            ax.errorbar(
                ks,
                [r[f"instability_{key}_pp"] for r in rs],
                yerr=[r[f"instability_{key}_std"] for r in rs],
                fmt=style,
                capsize=3,
                label=tag,
            )
        positive = sorted({r["k"] for r in rows if r["k"] > 0})
        ax.set_xscale("symlog", linthresh=positive[0] if positive else 1)
        ax.axhline(STABLE_PP, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("rewind step k")
        ax.set_ylabel(f"instability, {label} error (pp)")
        ax.set_title(f"{run.config.model} on {run.config.data}: {label} set")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, run.store.path(f"{name}/instability_vs_k.png"), atomic_write_bytes))
    plt.close(fig)

    for path in sorted(run.store.path(name).glob("level_*.json")):
        saved = run.store.read_json(f"{name}/{path.name}")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        pairs = sorted(
            (p for p in saved["pairs"].values() if p["branch"] == "ticket"),
            key=lambda p: (p["k"], p["replicate"]),
        )
        for p in pairs:
            if p["replicate"] == 0:
                ax.plot(p["alphas"], [100 * e for e in p["test_error"]], label=f"k = {p['k']}")
        ax.set_xlabel("interpolation α (copy 1 → copy 2)")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"level {saved['level']}: error along the path (replicate 0)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        target = run.store.path(f"{name}/path_{path.stem}.png")
        out.append(_save(fig, target, atomic_write_bytes))
        plt.close(fig)
    return out


def _save(fig, path: Path, writer) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    writer(path, buf.getvalue())
    return path


def settings_dict(s: Settings) -> dict[str, Any]:
    return asdict(s)
