"""Do tickets transfer? A finished run's masks carried to another data set, seed or optimizer.

Morcos et al. (arXiv 1906.02773) carry IMP masks across data sets and optimizers; the MNIST-1D
lottery notebook asks what a mask encodes by carrying it to a regenerated data set, to shuffled
input positions and to a new init. For each chosen level of the source run and each replicate
``r`` (the source's replicate ``r``), the target trains side by side:

- ``transfer``: the source ticket's mask, bit for bit, from the source's rewind weights
  (``init="rewind"``) or from one fresh init per replicate (``init="fresh"``);
- ``random``: a random mask with the same number of weights alive in every layer, same init;
- ``dense``: the unpruned network from the same init (once per replicate, not per level);
- ``oracle`` (with a target run): the target's own IMP ticket at the level of closest sparsity,
  from the target's rewind weights.

Every network of a replicate sees the same data order, so the branches are paired. The output
layer's mask is carried over as it is (``output_mask="carry"``) or re-drawn at random with the
same count (``"redraw"``); with ``redraw`` the output layer may also change shape (another class
count), and then its weights come from a fresh init. Any other shape difference is an error.

Outputs go through the store, one file per level (and one for the dense networks), each skipped
when present, so an interrupted transfer resumes (by groups of levels: a killed group retrains).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.mask import Mask, layer_kinds
from ..core.pruning import random_mask_like
from ..core.seeds import derive_seed
from ..errors import TicketlabError
from ..io.config import Config, load_toml, resolve
from ..io.run_files import level_dir, load_masks, load_rewind
from ..io.store import RunStore
from ..io.summary import spread
from ..train.stacked import State
from ..train.trainer import Job, Progress, Result, train
from ..zoo.data import Dataset, load_dataset
from ..zoo.models import build_model
from .common import train_spec

INITS = ("rewind", "fresh")
OUTPUT_MASKS = ("carry", "redraw")
OPTIMIZERS = ("adam", "sgd")
# Used when the optimizer differs from the source's and no lr is given (the source's lr was tuned
# for its own optimizer): Adam's usual 1e-3; SGD with momentum 0.9 at 0.05 trains the MLPs here.
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
LEVEL_BRANCHES = ("transfer", "random", "oracle")
METRICS = ("early_stop_test_acc", "final_test_acc", "early_stop_iter")
GROUP_JOBS = 16  # levels train in groups of about this many networks (one train() call each)
FORMAT_VERSION = 1

InitState = Callable[[int], State]


@dataclass(frozen=True)
class TransferSettings:
    """What the user chooses; ``None`` means "as in the source run"."""

    to: str
    levels: tuple[int, ...] = ()  # empty: every finished level >= 1 of the source run
    init: str = "rewind"
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    steps: int | None = None
    replicates: int | None = None
    seed: int | None = None
    output_mask: str = "carry"
    target_run: str | None = None
    out: str | None = None
    stack_size: int | None = None


@dataclass(frozen=True)
class RunOnDisk:
    """A finished (or partly finished) IMP run folder, read only."""

    path: Path
    config: Config
    store: RunStore
    levels: dict[int, float]  # finished level -> ticket's weights remaining


def open_run(path: str | Path, what: str = "run") -> RunOnDisk:
    root = Path(path)
    if not (root / "config.toml").is_file():
        raise TicketlabError(f"{root} is not a ticketlab run folder (no config.toml)")
    try:
        config = resolve(load_toml(root / "config.toml"))
    except TicketlabError as exc:
        raise TicketlabError(f"{root / 'config.toml'} is not a usable run config: {exc}") from None
    store = RunStore(root, config.hash())
    levels = {}
    for level in range(config.levels + 1):
        if store.exists(f"{level_dir(level)}/metrics.json"):
            levels[level] = store.read_json(f"{level_dir(level)}/metrics.json")["weights_remaining"]
    if not levels or not store.exists("rewind.safetensors"):
        raise TicketlabError(f"{what} {root} has no finished level yet")
    return RunOnDisk(root, config, store, levels)


@dataclass(frozen=True)
class TransferResult:
    """A finished transfer: its folder and summary (``rows``: one per level, ``dense``)."""

    folder: Path
    summary: dict[str, Any]


def validate(settings: TransferSettings, source: RunOnDisk) -> tuple[int, ...]:
    """Every check that needs no data; returns the levels to transfer."""
    s = settings

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise TicketlabError(message)

    need(s.init in INITS, f"--init must be one of {', '.join(INITS)}, got {s.init!r}")
    need(
        s.output_mask in OUTPUT_MASKS,
        f"--output-mask must be one of {', '.join(OUTPUT_MASKS)}, got {s.output_mask!r}",
    )
    need(
        s.optimizer is None or s.optimizer in OPTIMIZERS,
        f"--optimizer must be adam or sgd, got {s.optimizer!r}",
    )
    need(s.lr is None or (math.isfinite(s.lr) and s.lr > 0), f"--lr must be > 0, got {s.lr}")
    need(
        s.momentum is None or 0 <= s.momentum < 1, f"--momentum must be in [0, 1), got {s.momentum}"
    )
    need(s.steps is None or s.steps >= 1, f"--steps must be >= 1, got {s.steps}")
    need(s.stack_size is None or s.stack_size >= 0, "--stack-size must be >= 0")
    have = source.config.replicates
    need(
        s.replicates is None or 1 <= s.replicates <= have,
        f"--replicates must be in [1, {have}] (the source run's replicates), got {s.replicates}",
    )
    done = sorted(source.levels)
    levels = tuple(dict.fromkeys(s.levels)) or tuple(lv for lv in done if lv >= 1) or (0,)
    for level in levels:
        need(
            level in source.levels,
            f"{source.path} has no finished level {level} (finished: {', '.join(map(str, done))})",
        )
    return levels


def run_transfer(
    source_dir: str | Path,
    settings: TransferSettings,
    *,
    template: nn.Module | None = None,
    init_state: InitState | None = None,
    data: Dataset | None = None,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> TransferResult:
    """Train the transferred tickets and their controls on the target; write and return the table.

    ``template``/``init_state``/``data`` are for a source run made from Python with a custom
    module (``find_ticket``); otherwise the source's registered model is rebuilt for ``to``.
    ``on_total`` is told the number of training steps still to run before they start.
    """
    source = open_run(source_dir, "source run")
    levels = validate(settings, source)
    target = open_run(settings.target_run, "target run") if settings.target_run else None
    c = source.config
    seed = c.seed if settings.seed is None else settings.seed
    replicates = settings.replicates or c.replicates
    if target is not None:
        _check_target(source, target, replicates)
    if data is None:
        data = load_dataset(settings.to, c.val_fraction, seed)
    if template is None:
        if c.model.startswith("custom:"):
            raise TicketlabError(
                f"{source.path} was found on a custom module; transfer it from Python "
                "(ticketlab.transfer_ticket(..., model=...))"
            )

        def init_state(s: int) -> State:
            model = build_model(c.model, data.input_shape, data.num_classes, s)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

        template = build_model(c.model, data.input_shape, data.num_classes, 0)
    assert init_state is not None
    spec = _spec(c, settings)
    plan = _Plan(source, target, settings, template, init_state, data, spec, seed, replicates)
    plan.check_shapes()
    folder = Path(settings.out) if settings.out else source.path / "transfer" / plan.slug()
    store = RunStore(folder, plan.hash())
    with store.lock():
        _write_settings(store, plan)
        store.clean_temp_files()
        pending = [lv for lv in levels if not store.exists(_level_file(lv))]
        dense_pending = not store.exists("dense.json")
        per_level = len(plan.level_branches()) * replicates
        if on_total:
            on_total(spec.steps * (per_level * len(pending) + replicates * dense_pending))
        for group in _groups(pending, per_level, replicates if dense_pending else 0):
            plan.train_and_save(store, group, dense=dense_pending, progress=progress)
            dense_pending = False
        if dense_pending:
            plan.train_and_save(store, [], dense=True, progress=progress)
        summary = summarize(store, plan, levels)
        store.write_json("transfer.json", summary)
        from ..io.transfer_report import write_transfer_outputs

        write_transfer_outputs(store.root, summary)
    return TransferResult(folder, summary)


def _check_target(source: RunOnDisk, target: RunOnDisk, replicates: int) -> None:
    if target.config.model != source.config.model:
        raise TicketlabError(
            f"target run {target.path} trains {target.config.model!r}, the source "
            f"{source.config.model!r}; the oracle must be the same architecture"
        )
    names = load_masks(source.store, min(source.levels), source.config)[0].names()
    theirs = load_masks(target.store, min(target.levels), target.config)[0].names()
    if set(names) != set(theirs):
        raise TicketlabError(
            f"target run {target.path} prunes other tensors than the source "
            f"({', '.join(sorted(set(names) ^ set(theirs)))}); the oracle needs the same ones"
        )
    if target.config.replicates < replicates:
        raise TicketlabError(
            f"target run {target.path} has {target.config.replicates} replicates; "
            f"{replicates} needed (use --replicates)"
        )


def _spec(c: Config, s: TransferSettings):
    optimizer = s.optimizer or c.optimizer
    lr = s.lr if s.lr is not None else (c.lr if optimizer == c.optimizer else DEFAULT_LR[optimizer])
    momentum = c.momentum if s.momentum is None else s.momentum
    steps = s.steps or c.steps
    spec = train_spec(c)
    milestones = tuple(m for m in spec.milestones if m < steps)
    return dataclasses.replace(
        spec,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        steps=steps,
        milestones=milestones,
        warmup_steps=min(spec.warmup_steps, steps),
    )


def _level_file(level: int) -> str:
    return f"levels/level_{level:02d}.json"


def _groups(pending: list[int], per_level: int, dense_jobs: int) -> list[list[int]]:
    """Consecutive levels in groups of about GROUP_JOBS networks (at least one level each)."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = dense_jobs  # the dense networks ride with the first group
    for level in pending:
        if current and size + per_level > GROUP_JOBS:
            groups.append(current)
            current, size = [], 0
        current.append(level)
        size += per_level
    if current:
        groups.append(current)
    return groups


def _write_settings(store: RunStore, plan: _Plan) -> None:
    if store.exists("settings.json"):
        try:
            store.read_json("settings.json")
        except TicketlabError as exc:
            if "another experiment" in str(exc):
                raise TicketlabError(
                    f"{store.root} holds a different transfer; use another --out"
                ) from None
            raise
        return
    if store.root.exists() and any(
        p.name not in (".lock",) and not p.name.startswith(".tmp-") for p in store.root.iterdir()
    ):
        raise TicketlabError(f"{store.root} is not empty and holds no transfer; use another --out")
    store.write_json("settings.json", plan.identity())


@dataclass(frozen=True)
class _Plan:
    """Everything resolved: which networks to build for a level, and from what."""

    source: RunOnDisk
    target: RunOnDisk | None
    settings: TransferSettings
    template: nn.Module
    init_state: InitState
    data: Dataset
    spec: Any
    seed: int
    replicates: int

    # identity ---------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": FORMAT_VERSION,
            "source": str(self.source.path),
            "source_config_hash": self.source.config.hash(),
            "source_model": self.source.config.model,
            "source_data": self.source.config.data,
            "to": s.to,
            "data_fingerprint": _fingerprint(self.data) if s.to == "custom" else None,
            "input_shape": list(self.data.input_shape),
            "num_classes": self.data.num_classes,
            "init": s.init,
            "output_mask": s.output_mask,
            "replicates": self.replicates,
            "seed": self.seed,
            "val_fraction": self.source.config.val_fraction,
            "train": dataclasses.asdict(self.spec),
            "target_run": str(self.target.path) if self.target else None,
            "target_config_hash": self.target.config.hash() if self.target else None,
        }

    def hash(self) -> str:
        blob = json.dumps({k: v for k, v in self.identity().items() if k != "source"}, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def slug(self) -> str:
        s = self.settings
        parts = [s.to, s.init, self.spec.optimizer]
        if s.output_mask != "carry":
            parts.append(f"output-{s.output_mask}")
        if self.target is not None:
            parts.append("oracle")
        name = "_".join(re.sub(r"[^A-Za-z0-9.=+-]", "-", p) for p in parts)
        return f"{name}_{self.hash()[:6]}"

    def level_branches(self) -> tuple[str, ...]:
        return LEVEL_BRANCHES if self.target is not None else LEVEL_BRANCHES[:2]

    # shapes -----------------------------------------------------------------------------------
    def output_names(self) -> set[str]:
        return {n for n, kind in layer_kinds(self.template).items() if kind == "output"}

    def check_shapes(self) -> None:
        """Every tensor of the source (rewind weights, masks) must fit the target's network; with
        ``redraw`` the output layer may differ (it is then re-initialised)."""
        want = {k: tuple(v.shape) for k, v in self.template.state_dict().items()}
        loose = self.output_names() if self.settings.output_mask == "redraw" else set()
        runs = [("source", self.source)] + ([("target", self.target)] if self.target else [])
        for what, run in runs:
            rewind = load_rewind(run.store, run.config)[0]
            mask = load_masks(run.store, min(run.levels), run.config)[0]
            _compare(what, run, want, {k: tuple(v.shape) for k, v in rewind.items()}, loose)
            _compare(what, run, want, {k: tuple(v.shape) for k, v in mask.tensors.items()}, loose)

    # networks ---------------------------------------------------------------------------------
    def replicate_init(self, r: int) -> State:
        """The weights every network of replicate ``r`` starts from (before masking)."""
        if self.settings.init == "fresh":
            return self.init_state(derive_seed(self.seed, "transfer-fresh", r))
        init = dict(load_rewind(self.source.store, self.source.config)[r])
        want = self.template.state_dict()
        mismatched = [k for k, v in init.items() if tuple(v.shape) != tuple(want[k].shape)]
        if mismatched:  # only the output layer, under redraw (check_shapes): a fresh head
            head = self.init_state(derive_seed(self.seed, "transfer-head", r))
            for k in mismatched:
                init[k] = head[k]
        return init

    def data_seed(self, r: int) -> int:
        return derive_seed(self.seed, "transfer-data", r)

    def transferred_mask(self, level: int, r: int) -> Mask:
        """The source ticket's mask; under ``redraw`` the output layer's is drawn at random with
        the same count (scaled to a new shape when the class count differs)."""
        mask = load_masks(self.source.store, level, self.source.config)[r]
        if self.settings.output_mask == "carry":
            return mask
        want = self.template.state_dict()
        g = torch.Generator().manual_seed(derive_seed(self.seed, "transfer-output", r, level))
        tensors = dict(mask.tensors)
        for name in sorted(self.output_names() & set(tensors)):
            keep = tensors[name]
            alive = int(keep.sum())
            if tuple(keep.shape) != tuple(want[name].shape):
                alive = round(alive / keep.numel() * want[name].numel())
            shape_of = torch.zeros(want[name].shape, dtype=torch.bool)
            shape_of.view(-1)[:alive] = True
            tensors[name] = random_mask_like(Mask({name: shape_of}), g)[name]
        return Mask(tensors)

    def random_mask(self, mask: Mask, level: int, r: int) -> Mask:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "transfer-random", r, level))
        return random_mask_like(mask, g)

    def oracle(self, level: int, r: int) -> tuple[int, Mask, State]:
        assert self.target is not None
        density = self.source.levels[level]
        best = min(
            self.target.levels,
            key=lambda lv: abs(math.log(self.target.levels[lv]) - math.log(density)),
        )
        mask = load_masks(self.target.store, best, self.target.config)[r]
        return best, mask, load_rewind(self.target.store, self.target.config)[r]

    def jobs(self, levels: Sequence[int], dense: bool) -> list[tuple[int | None, str, int, Job]]:
        """(level or None for dense, branch, replicate, job)."""
        out: list[tuple[int | None, str, int, Job]] = []
        for r in range(self.replicates):
            init = self.replicate_init(r)
            if dense:
                names = load_masks(self.source.store, min(self.source.levels), self.source.config)
                ones = Mask.ones_like({n: init[n] for n in names[r].names()})
                out.append((None, "dense", r, Job(init, ones, self.data_seed(r))))
            for level in levels:
                mask = self.transferred_mask(level, r)
                rnd = self.random_mask(mask, level, r)
                for branch, m in (("transfer", mask), ("random", rnd)):
                    out.append((level, branch, r, Job(_masked(init, m), m, self.data_seed(r))))
                if self.target is not None:
                    _, omask, oinit = self.oracle(level, r)
                    job = Job(_masked(oinit, omask), omask, self.data_seed(r))
                    out.append((level, "oracle", r, job))
        return out

    def train_and_save(
        self, store: RunStore, levels: list[int], dense: bool, progress: Progress | None
    ) -> None:
        labelled = self.jobs(levels, dense)
        results = train(
            self.template,
            [job for *_, job in labelled],
            self.data,
            self.spec,
            stack_size=self.settings.stack_size or None,
            progress=progress,
        )
        for level in levels:
            self._save_level(store, level, labelled, results)
        if dense:
            nets = [
                _network(b, r, job, res)
                for (lv, b, r, job), res in zip(labelled, results, strict=True)
                if lv is None
            ]
            store.write_json("dense.json", {"networks": nets})

    def _save_level(
        self,
        store: RunStore,
        level: int,
        labelled: list[tuple[int | None, str, int, Job]],
        results: list[Result],
    ) -> None:
        """Masks first, the level's JSON last: its existence marks the level as done."""
        pairs = zip(labelled, results, strict=True)
        mine = [(b, r, job, res) for (lv, b, r, job), res in pairs if lv == level]
        store.write_tensors(
            f"levels/level_{level:02d}_masks.safetensors",
            {f"{b}/r{r}/{n}": job.mask[n] for b, r, job, _ in mine for n in job.mask.names()},
        )
        record: dict[str, Any] = {
            "level": level,
            "weights_remaining": self.source.levels[level],
            "networks": [_network(b, r, job, res) for b, r, job, res in mine],
        }
        if self.target is not None:
            best, _, _ = self.oracle(level, 0)
            record["oracle_level"] = best
            record["oracle_weights_remaining"] = self.target.levels[best]
        store.write_json(_level_file(level), record)


def _compare(
    what: str,
    run: RunOnDisk,
    want: dict[str, tuple[int, ...]],
    have: dict[str, tuple[int, ...]],
    loose: set[str],
) -> None:
    for name, shape in have.items():
        if name not in want:
            raise TicketlabError(
                f"{what} run {run.path} has a tensor {name!r} that the target network lacks: "
                "a mask of another architecture"
            )
        if shape != want[name] and name not in loose:
            hint = " (or --output-mask redraw)" if name in _output_like(want) else ""
            raise TicketlabError(
                f"{what} run {run.path}: {name} has shape {list(shape)}, the network on the "
                f"target data needs {list(want[name])}; a ticket transfers only to the same "
                f"architecture and input size (resize with a variant such as :size=28){hint}"
            )


def _output_like(want: dict[str, tuple[int, ...]]) -> set[str]:
    names = [k for k in want if k.endswith(".weight") or k.endswith(".bias")]
    last = names[-1].rpartition(".")[0] if names else ""
    return {k for k in names if k.rpartition(".")[0] == last}


def _masked(init: State, mask: Mask) -> State:
    return {n: t * mask[n] if n in mask.tensors else t for n, t in init.items()}


def _network(branch: str, r: int, job: Job, res: Result) -> dict[str, Any]:
    return {"branch": branch, "replicate": r, "weights_remaining": job.mask.density()} | {
        k: v for k, v in res.metrics().items()
    }


def _fingerprint(data: Dataset) -> str:
    digest = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        digest.update(np.ascontiguousarray(t.numpy()).tobytes())
    return digest.hexdigest()[:16]


def summarize(store: RunStore, plan: _Plan, levels: Sequence[int]) -> dict[str, Any]:
    """Per level and branch: mean, std, min, max over replicates (diverged networks counted)."""
    dense = store.read_json("dense.json")["networks"]
    rows = []
    for level in sorted(levels, key=lambda lv: -plan.source.levels[lv]):
        record = store.read_json(_level_file(level))
        branches = {
            b: _stats([n for n in record["networks"] if n["branch"] == b])
            for b in plan.level_branches()
        }
        row = {"level": level, "weights_remaining": record["weights_remaining"], **branches}
        if "oracle_level" in record:
            row["oracle_level"] = record["oracle_level"]
            row["oracle_weights_remaining"] = record["oracle_weights_remaining"]
        rows.append(row)
    s = plan.settings
    return {
        "source": str(plan.source.path),
        "source_model": plan.source.config.model,
        "source_data": plan.source.config.data,
        "source_optimizer": plan.source.config.optimizer,
        "to": s.to,
        "init": s.init,
        "output_mask": s.output_mask,
        "optimizer": plan.spec.optimizer,
        "lr": plan.spec.lr,
        "steps": plan.spec.steps,
        "replicates": plan.replicates,
        "seed": plan.seed,
        "target_run": str(plan.target.path) if plan.target else None,
        "dense": _stats(dense),
        "rows": rows,
    }


def _stats(nets: list[dict[str, Any]]) -> dict[str, Any]:
    healthy = [n for n in nets if not n["diverged"]]
    out: dict[str, Any] = {key: spread([float(n[key]) for n in healthy]) for key in METRICS}
    out["diverged"] = len(nets) - len(healthy)
    return out
