"""Cheaper ways to find a ticket, priced in compute against IMP (``ticketlab finders``).

Protocol, per replicate (one init, one data order shared by every network of the replicate):

1. **Find.** Every finder draws its mask at every target sparsity from the same init:
   pruning at init (SNIP, GraSP, SynFlow, magnitude at init, random; ``core.finders``), one-shot
   magnitude after a full dense training, **early-bird** (one dense training that stops as soon as
   the magnitude mask of every target sparsity has stopped changing: newest mask within
   ``eb_threshold`` Hamming fraction of each of the previous ``eb_window - 1``), and **IMP** (the
   paper's levels at the model's per-layer rates, rewinding to the init each level; IMP to a
   sparsity s costs every level up to the last one whose density is >= 1 - s, whose trained weights
   are then pruned, rates scaled down, to exactly 1 - s). The compute of each is recorded: training
   steps, FLOPs (dense-equivalent and on the surviving weights), wall time.
2. **Sanity checks** (Frankle et al. 2021): per finder, the mask shuffled within each layer, the
   kept weights reinitialized, and (score finders) the scores inverted.
3. **Evaluate.** Every mask trains from the init (reinit: a fresh init) for ``steps`` steps, all
   networks of a sparsity side by side; test accuracy at the early-stop iteration (minimum
   validation loss) is reported as mean ± spread over replicates.

Resume: every step's outputs are written atomically through ``io.store`` (the dense training, each
IMP level, the early-bird run, each finder's masks, each evaluated cell) and skipped when present.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ..core.finders import (
    FINDERS,
    EarlyBird,
    actual_flops,
    count_flops,
    find_mask,
    prune_to_density,
    reinit_kept,
    shuffle_within_layers,
    training_flops,
)
from ..core.mask import Mask, layer_kinds, prunable_names
from ..core.pruning import prune_layerwise
from ..core.seeds import derive_seed
from ..errors import TicketlabError
from ..io.config import Config, resolve
from ..io.store import RunStore, atomic_write_bytes
from ..train.stacked import State
from ..train.trainer import Job, Result, TrainSpec, train
from ..zoo.data import Dataset, load_dataset
from ..zoo.models import build_model
from .common import train_spec

ALL_FINDERS = (*FINDERS, "early_bird", "imp")
DEFAULT_FINDERS = ("snip", "grasp", "synflow", "magnitude_init", "random", "magnitude",
                   "early_bird", "imp")  # fmt: skip
CHECKS = ("shuffle", "reinit", "invert")
SCORE_FINDERS = tuple(n for n in FINDERS if n != "random")  # where inverting the scores means
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Settings:
    """Everything that changes the results of a finders run (its hash names the experiment)."""

    model: str = "lenet_300_100"
    data: str = "mnist5k"
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    finders: tuple[str, ...] = DEFAULT_FINDERS
    checks: tuple[str, ...] = ("shuffle",)
    replicates: int = 2
    steps: int = 1000
    seed: int = 0
    eval_every: int | None = None  # default: steps / 20
    lr: float | None = None  # default: the model's preset
    batch_size: int | None = None
    scope: str = "global"
    examples_per_class: int = 10
    synflow_rounds: int = 100
    eb_threshold: float = 0.1
    eb_window: int = 5

    def base(self) -> Config:
        """The model's paper preset (optimizer, rates) with this run's overrides."""
        settings: dict[str, Any] = {"model": self.model, "data": self.data}
        settings.update(replicates=self.replicates, steps=self.steps, seed=self.seed)
        for key in ("lr", "batch_size"):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        settings["eval_every"] = self.eval_every or max(1, self.steps // 20)
        return resolve(settings)

    def identity(self) -> dict[str, Any]:
        """What every file of the run depends on. Sparsities, finders and checks are not in it:
        each (finder, sparsity, check) has files of its own, so a rerun with more of them reuses
        everything already there (the dense training, IMP's levels, every mask and cell)."""
        varying = {"sparsities", "finders", "checks"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in varying}

    def hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def validate(s: Settings, out: str | Path | None = None) -> Config:
    """Every check, before anything is trained or written."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise TicketlabError(f"--out {out} exists and is not a folder")
    if not s.finders:
        raise TicketlabError("no finder given")
    for name in s.finders:
        if name not in ALL_FINDERS:
            raise TicketlabError(
                f"unknown finder {name!r}; known finders: {', '.join(ALL_FINDERS)}"
            )
    for name in s.checks:
        if name not in CHECKS:
            raise TicketlabError(f"unknown check {name!r}; known checks: {', '.join(CHECKS)}")
    if not s.sparsities:
        raise TicketlabError("no sparsity given")
    for sp in s.sparsities:
        if not (isinstance(sp, float) and 0.0 < sp < 1.0):
            raise TicketlabError(
                f"sparsity must be in (0, 1) (fraction of weights removed), got {sp}"
            )
    if s.scope not in ("global", "layer"):
        raise TicketlabError(f"scope must be 'global' or 'layer', got {s.scope!r}")
    if s.examples_per_class < 1:
        raise TicketlabError(f"examples per class must be >= 1, got {s.examples_per_class}")
    if s.synflow_rounds < 1:
        raise TicketlabError(f"synflow rounds must be >= 1, got {s.synflow_rounds}")
    if not 0.0 < s.eb_threshold < 1.0:
        raise TicketlabError(f"early-bird threshold must be in (0, 1), got {s.eb_threshold}")
    if s.eb_window < 2:
        raise TicketlabError(f"early-bird window must be >= 2, got {s.eb_window}")
    if s.eval_every is not None and s.eval_every < 1:
        raise TicketlabError(f"eval every must be >= 1, got {s.eval_every}")
    return s.base()


def variants(finder: str, checks: Sequence[str]) -> list[str]:
    """The networks evaluated for one finder: its mask, then each check that means something."""
    out = [finder]
    for check in checks:
        if check == "shuffle" and finder == "random":
            continue  # a random mask shuffled within layers is a random mask
        if check == "invert" and finder not in SCORE_FINDERS:
            continue  # no score to invert (random, IMP, early-bird)
        out.append(f"{finder}+{check}")
    return out


# --- the run -----------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything built once: settings, data, the template, inits, the store."""

    s: Settings
    c: Config
    data: Dataset
    template: nn.Module
    names: list[str]
    inits: list[State]
    fresh: list[State]
    data_seeds: list[int]
    store: RunStore
    layer_flops: dict[str, int]
    progress: Progress | None

    @property
    def spec(self) -> TrainSpec:
        return train_spec(self.c)

    def densities(self) -> list[float]:
        return [round(1.0 - sp, 12) for sp in self.s.sparsities]

    def dense_mask(self) -> Mask:
        return Mask.ones_like({n: self.inits[0][n] for n in self.names})

    def flops(self, mask: Mask | None) -> float:
        return actual_flops(self.layer_flops, mask)

    def train(self, jobs: list[Job]) -> tuple[list[Result], float]:
        started = time.perf_counter()
        results = train(self.template, jobs, self.data, self.spec, progress=self.progress)
        return results, time.perf_counter() - started


def run_finders(
    settings: Settings, out: str | Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Find, check, evaluate; writes ``results.json``, ``results.md`` and the figures in ``out``."""
    settings = replace(settings, sparsities=tuple(sorted(set(settings.sparsities))))
    c = validate(settings, out)
    store = _open_store(Path(out), settings)
    with store.lock():
        store.clean_temp_files()
        run = _setup(settings, c, store, progress)
        dense = _dense(run)
        masks: dict[str, dict[float, list[Mask]]] = {}
        compute: dict[str, dict[float, dict[str, Any]]] = {}
        for finder in settings.finders:
            for density in run.densities():
                found, cost = _find(run, finder, density, dense)
                masks.setdefault(finder, {})[density] = found
                compute.setdefault(finder, {})[density] = cost
                if f"{finder}+invert" in variants(finder, settings.checks):
                    inverted, _ = _find(run, finder, density, dense, invert=True)
                    masks.setdefault(f"{finder}+invert", {})[density] = inverted
        cells = _evaluate(run, masks)
        results = _results(run, dense, cells, compute)
        write_results(Path(out), results)
    return results


def total_steps(s: Settings) -> int:
    """Network-steps of the evaluation and the dense trainings (IMP levels and early-bird are
    counted as they come, so the bar may move past or stop short of this)."""
    evaluated = sum(len(variants(f, s.checks)) for f in s.finders) * len(s.sparsities)
    return s.replicates * s.steps * (1 + evaluated)


def check_folder(root: Path, s: Settings) -> bool:
    """True when ``root`` holds this very run (resume); refuses any other non-empty folder."""
    saved = root / "settings.json"
    if saved.exists():
        try:
            previous = json.loads(saved.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TicketlabError(f"{saved}: corrupted, not valid JSON ({exc})") from None
        if not isinstance(previous, dict) or previous.get("hash") != s.hash():
            raise TicketlabError(f"{root} holds a different finders run; use another --out")
        return True
    if root.exists() and any(p.name != ".lock" for p in root.iterdir()):
        raise TicketlabError(f"{root} is not empty and holds no finders run; use another --out")
    return False


def _open_store(root: Path, s: Settings) -> RunStore:
    store = RunStore(root, s.hash())
    if check_folder(root, s):
        store.read_json("settings.json")  # verifies its checksum
    else:
        store.write_json("settings.json", {"hash": s.hash(), **s.identity()})
    return store


def _setup(s: Settings, c: Config, store: RunStore, progress: Progress | None) -> _Run:
    data = load_dataset(c.data, c.val_fraction, c.seed)
    template = build_model(c.model, data.input_shape, data.num_classes, seed=0)

    def state(seed: int) -> State:
        built = build_model(c.model, data.input_shape, data.num_classes, seed)
        return {k: v.detach().clone() for k, v in built.state_dict().items()}

    return _Run(
        s=s,
        c=c,
        data=data,
        template=template,
        names=prunable_names(template),
        inits=[state(derive_seed(s.seed, "init", r)) for r in range(s.replicates)],
        fresh=[state(derive_seed(s.seed, "fresh", r)) for r in range(s.replicates)],
        data_seeds=[derive_seed(s.seed, "data", r) for r in range(s.replicates)],
        store=store,
        layer_flops=count_flops(template, data.input_shape),
        progress=progress,
    )


# --- dense training (the reference, one-shot magnitude, IMP's level 0) ---------------------------


def _dense(run: _Run) -> dict[str, Any]:
    """Full dense training of every replicate: final weights and the metrics of each."""
    if not run.store.exists("dense/final.safetensors"):
        mask = run.dense_mask()
        jobs = [Job(run.inits[r], mask, run.data_seeds[r]) for r in range(run.s.replicates)]
        results, seconds = run.train(jobs)
        _write_states(run.store, "dense/final.safetensors", [res.final for res in results])
        run.store.write_json(
            "dense/metrics.json",
            {"seconds": seconds, "networks": [_metrics(res) for res in results]},
        )
    elif run.progress:
        run.progress(run.s.replicates * run.s.steps)
    finals = _read_states(run.store, "dense/final.safetensors", run.s.replicates)
    return {"finals": finals, **run.store.read_json("dense/metrics.json")}


# --- finding -----------------------------------------------------------------------------------


def _find(
    run: _Run, finder: str, density: float, dense: dict[str, Any], invert: bool = False
) -> tuple[list[Mask], dict[str, Any]]:
    """The masks of one finder at one density (one per replicate) and what finding them cost
    (``invert``: the scores' sanity check, which costs what the finder costs)."""
    rel = f"masks/{finder}{'_invert' if invert else ''}/d{density:.6g}"
    if not run.store.exists(f"{rel}.json"):
        if finder == "imp":
            masks, cost = _imp(run, density)
        elif finder == "early_bird":
            masks, cost = _early_bird(run, density)
        else:
            masks, cost = _score_finder(run, finder, density, dense, invert=invert)
        tensors = {f"r{r}/{n}": m[n] for r, m in enumerate(masks) for n in m.names()}
        run.store.write_tensors(f"{rel}.safetensors", tensors)
        run.store.write_json(f"{rel}.json", cost)
    tensors, _ = run.store.read_tensors(f"{rel}.safetensors")
    masks = [Mask({n: tensors[f"r{r}/{n}"] for n in run.names}) for r in range(run.s.replicates)]
    return masks, run.store.read_json(f"{rel}.json")


def _scoring_batches(run: _Run, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``examples_per_class`` labelled training examples per class, drawn per replicate."""
    g = torch.Generator().manual_seed(derive_seed(run.s.seed, "scoring", r))
    y = run.data.y_train
    picked = []
    for label in range(run.data.num_classes):
        where = torch.nonzero(y == label).flatten()
        picked.append(where[torch.randperm(where.numel(), generator=g)[: run.s.examples_per_class]])
    idx = torch.cat(picked)
    return [(run.data.x_train[idx], y[idx])]


def _score_finder(
    run: _Run, finder: str, density: float, dense: dict[str, Any], invert: bool
) -> tuple[list[Mask], dict[str, Any]]:
    entry = FINDERS[finder]
    masks, seconds, examples = [], 0.0, 0
    model = run.template
    for r in range(run.s.replicates):
        batches = _scoring_batches(run, r) if entry.needs_data else []
        examples = sum(int(x.shape[0]) for x, _ in batches)
        g = torch.Generator().manual_seed(derive_seed(run.s.seed, "finder", finder, r, density))
        started = time.perf_counter()
        with _one_thread():
            mask = find_mask(
                model,
                finder,
                density,
                weights=run.inits[r],
                batches=batches,
                trained=dense["finals"][r] if entry.needs_training else None,
                scope=run.s.scope,
                invert=invert,
                rounds=run.s.synflow_rounds if finder == "synflow" else None,
                generator=g,
                input_shape=run.data.input_shape,
            )
        seconds += time.perf_counter() - started
        masks.append(mask)
    f_dense = run.flops(None)
    if finder == "snip":
        steps, dense_eq = 0, 3 * f_dense * examples
        actual = dense_eq
    elif finder == "grasp":  # a gradient pass, then a Hessian-gradient product (~2 more)
        steps, dense_eq = 0, 9 * f_dense * examples
        actual = dense_eq
    elif finder == "synflow":  # one example per round, on the network pruned so far
        rounds = run.s.synflow_rounds
        steps, dense_eq = 0, 3 * f_dense * rounds
        actual = sum(
            3 * _flops_at_density(run, density ** ((k - 1) / rounds)) for k in range(1, rounds + 1)
        )
    elif finder == "magnitude":  # a full dense training
        steps = run.s.steps
        dense_eq = actual = training_flops(f_dense, steps, run.c.batch_size)
        seconds += dense["seconds"]
    else:  # magnitude_init, random: no forward pass at all
        steps, dense_eq, actual = 0, 0.0, 0.0
    return masks, _cost(run, steps, dense_eq, actual, seconds)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Scores are many small tensor operations: one thread is faster than splitting each over the
    cores (several times so on a loaded machine), as the trainer's lanes do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _flops_at_density(run: _Run, density: float) -> float:
    """Forward FLOPs with every prunable layer at ``density`` (SynFlow's rounds, approximately:
    the per-layer split of its masks is not recorded round by round)."""
    total = sum(run.layer_flops.values())
    prunable = sum(f for n, f in run.layer_flops.items() if n in run.names)
    return (total - prunable) + density * prunable


def _cost(run: _Run, steps: int, dense_eq: float, actual: float, seconds: float) -> dict:
    """Per mask (per replicate): training steps, FLOPs, wall seconds (``seconds`` is for all)."""
    return {
        "train_steps": steps,
        "flops_dense": dense_eq,
        "flops_actual": actual,
        "seconds": seconds / run.s.replicates,
    }


def _imp_rates(run: _Run) -> dict[str, float]:
    by_kind = {"conv": run.c.conv_rate, "fc": run.c.fc_rate, "output": run.c.output_layer_rate()}
    kinds = layer_kinds(run.template)
    return {n: by_kind[kinds[n]] for n in run.names}


def _imp_level(run: _Run, level: int) -> dict[str, Any]:
    """Level ``level`` >= 1 of the IMP chain: the mask of every replicate at the model's rates,
    trained from the init; level 0 is the dense training."""
    rel = f"imp/level{level}"
    if not run.store.exists(f"{rel}.json"):
        previous = _imp_level(run, level - 1) if level > 1 else None
        finals = (
            previous["finals"]
            if previous
            else _read_states(run.store, "dense/final.safetensors", run.s.replicates)
        )
        before = previous["masks"] if previous else [run.dense_mask()] * run.s.replicates
        rates = _imp_rates(run)
        masks = [
            prune_layerwise(before[r], {n: finals[r][n].abs() for n in run.names}, rates)
            for r in range(run.s.replicates)
        ]
        jobs = [
            Job(_masked_init(run.inits[r], masks[r]), masks[r], run.data_seeds[r])
            for r in range(run.s.replicates)
        ]
        results, seconds = run.train(jobs)
        tensors = {f"r{r}/{n}": masks[r][n] for r in range(run.s.replicates) for n in run.names}
        tensors.update(
            {f"final/r{r}/{n}": t for r, res in enumerate(results) for n, t in res.final.items()}
        )
        run.store.write_tensors(f"{rel}.safetensors", tensors)
        run.store.write_json(
            f"{rel}.json", {"seconds": seconds, "density": masks[0].density(), "level": level}
        )
    tensors, _ = run.store.read_tensors(f"{rel}.safetensors")
    reps = range(run.s.replicates)
    return {
        "masks": [Mask({n: tensors[f"r{r}/{n}"] for n in run.names}) for r in reps],
        "finals": [
            {
                k[len(f"final/r{r}/") :]: t
                for k, t in tensors.items()
                if k.startswith(f"final/r{r}/")
            }
            for r in reps
        ],
        **run.store.read_json(f"{rel}.json"),
    }


def _imp_density(run: _Run, level: int) -> float:
    """Density after ``level`` levels at the model's rates (exact counts, as ``prune`` does)."""
    rates, mask = _imp_rates(run), run.dense_mask()
    alive = {n: mask[n].numel() for n in run.names}
    for _ in range(level):
        alive = {n: a - int(round(rates[n] * a)) for n, a in alive.items()}
    return sum(alive.values()) / mask.size()


def _imp(run: _Run, density: float) -> tuple[list[Mask], dict[str, Any]]:
    """IMP to ``density``: levels at the model's rates while they stay at or above it, then the
    last level's trained weights pruned to exactly ``density`` (rates scaled down)."""
    last = 0
    while _imp_density(run, last + 1) >= density - 1e-12:
        last += 1
    dense_meta = run.store.read_json("dense/metrics.json")
    steps, dense_eq, actual, seconds = run.s.steps, 0.0, 0.0, dense_meta["seconds"]
    f_dense = run.flops(None)
    dense_eq = actual = training_flops(f_dense, run.s.steps, run.c.batch_size)
    if last == 0:
        before = [run.dense_mask()] * run.s.replicates
        finals = _read_states(run.store, "dense/final.safetensors", run.s.replicates)
    for level in range(1, last + 1):
        info = _imp_level(run, level)
        steps += run.s.steps
        dense_eq += training_flops(f_dense, run.s.steps, run.c.batch_size)
        actual += training_flops(run.flops(info["masks"][0]), run.s.steps, run.c.batch_size)
        seconds += info["seconds"]
        before, finals = info["masks"], info["finals"]
    masks = [
        _prune_scaled(
            before[r], {n: finals[r][n].abs() for n in run.names}, _imp_rates(run), density
        )
        for r in range(run.s.replicates)
    ]
    cost = _cost(run, steps, dense_eq, actual, seconds)
    cost["imp_levels_trained"] = last + 1
    return masks, cost


def _prune_scaled(
    mask: Mask, scores: dict[str, torch.Tensor], rates: dict[str, float], density: float
) -> Mask:
    """Layer-wise pruning at ``alpha * rates`` with alpha chosen so the density lands on
    ``density`` (as close as whole weights allow, never below)."""
    target = density * mask.size()
    alive = {n: int(mask[n].sum()) for n in mask.names()}

    def kept(alpha: float) -> int:
        return sum(a - int(round(min(1.0, alpha * rates[n]) * a)) for n, a in alive.items())

    lo, hi = 0.0, 1.0 / max(rates.values())
    for _ in range(60):
        mid = (lo + hi) / 2
        if kept(mid) >= target - 1e-9:
            lo = mid
        else:
            hi = mid
    return prune_layerwise(mask, scores, {n: min(1.0, lo * rates[n]) for n in rates})


def _masked_init(init: State, mask: Mask) -> State:
    out = dict(init)
    for n in mask.names():
        out[n] = init[n] * mask[n].to(init[n].dtype)
    return out


def _early_bird(run: _Run, density: float) -> tuple[list[Mask], dict[str, Any]]:
    """The early-bird ticket at ``density``; one training per replicate serves every density
    not yet on disk (each stops being watched once drawn; training stops when all are)."""
    rel = f"early_bird/d{density:.6g}"
    if not run.store.exists(f"{rel}.json"):
        missing = [d for d in run.densities() if not run.store.exists(f"early_bird/d{d:.6g}.json")]
        _run_early_bird(run, missing)
    tensors, _ = run.store.read_tensors(f"{rel}.safetensors")
    draws = run.store.read_json(f"{rel}.json")["replicates"]
    masks = [Mask({n: tensors[f"r{r}/{n}"] for n in run.names}) for r in range(run.s.replicates)]
    steps = statistics.fmean(d["step"] for d in draws)
    dense_eq = training_flops(run.flops(None), 1, run.c.batch_size) * steps
    cost = _cost(run, 0, dense_eq, dense_eq, sum(d["seconds"] for d in draws))
    cost["train_steps"] = steps
    cost["drawn"] = [d["drawn"] for d in draws]
    cost["draw_steps"] = [d["step"] for d in draws]
    return masks, cost


def _run_early_bird(run: _Run, densities: Sequence[float]) -> None:
    reps = range(run.s.replicates)
    birds = [{d: EarlyBird(run.s.eb_threshold, run.s.eb_window) for d in densities} for _ in reps]
    last_mask: list[dict[float, Mask]] = [{} for _ in reps]
    times: list[dict[float, float]] = [{} for _ in reps]
    started = time.perf_counter()

    def watcher(r: int) -> Callable[[int, State], bool]:
        def on_eval(step: int, weights: State) -> bool:
            if step == 0:
                return False  # masks are drawn from training (You et al.: after each epoch)
            scores = {n: weights[n].abs() for n in run.names}
            for d, bird in birds[r].items():
                if bird.drawn is None:
                    mask = prune_to_density(run.dense_mask(), scores, d, run.s.scope)
                    if bird.update(step, mask):
                        times[r][d] = time.perf_counter() - started
                    last_mask[r][d] = mask
            return all(b.drawn is not None for b in birds[r].values())

        return on_eval

    jobs = [
        Job(run.inits[r], run.dense_mask(), run.data_seeds[r], on_eval=watcher(r)) for r in reps
    ]
    run.train(jobs)
    elapsed = time.perf_counter() - started
    for d in densities:
        tensors, draws = {}, []
        for r in reps:
            bird = birds[r][d]
            drawn = bird.drawn is not None
            mask = bird.drawn if drawn else last_mask[r][d]  # never drawn: the mask at the end
            tensors.update({f"r{r}/{n}": mask[n] for n in run.names})
            draws.append(
                {
                    "drawn": drawn,
                    "step": bird.drawn_at if drawn else run.s.steps,
                    "seconds": times[r].get(d, elapsed),
                }
            )
        run.store.write_tensors(f"early_bird/d{d:.6g}.safetensors", tensors)
        run.store.write_json(f"early_bird/d{d:.6g}.json", {"replicates": draws})


# --- evaluating --------------------------------------------------------------------------------


def _evaluate(
    run: _Run, masks: dict[str, dict[float, list[Mask]]]
) -> dict[tuple[str, float], dict[str, Any]]:
    """Train every (variant, density) cell not yet on disk, a density's networks side by side."""
    cells: dict[tuple[str, float], dict[str, Any]] = {}
    reps = run.s.replicates
    for density in run.densities():
        pending: list[tuple[str, list[Job]]] = []
        for finder in run.s.finders:
            found = masks[finder][density]
            for variant in variants(finder, run.s.checks):
                rel = _cell_rel(variant, density)
                if run.store.exists(rel):
                    cells[(variant, density)] = run.store.read_json(rel)
                    if run.progress:
                        run.progress(reps * run.s.steps)
                    continue
                inverted = masks.get(f"{finder}+invert", {}).get(density)
                jobs = _cell_jobs(run, variant, density, found, inverted)
                pending.append((variant, jobs))
        if not pending:
            continue
        results, _ = run.train([job for _, jobs in pending for job in jobs])
        for i, (variant, jobs) in enumerate(pending):
            mine = results[i * reps : (i + 1) * reps]
            cell = {
                "variant": variant,
                "density": density,
                "weights_remaining": statistics.fmean(j.mask.density() for j in jobs),
                "layer_remaining": _mean_layers([j.mask for j in jobs]),
                "networks": [_metrics(res) for res in mine],
            }
            run.store.write_json(_cell_rel(variant, density), cell)
            cells[(variant, density)] = cell
    return cells


def _cell_rel(variant: str, density: float) -> str:
    return f"cells/{variant.replace('+', '_')}/d{density:.6g}.json"


def _cell_jobs(
    run: _Run,
    variant: str,
    density: float,
    found: list[Mask],
    inverted: list[Mask] | None,
) -> list[Job]:
    reps = run.s.replicates
    jobs = []
    for r in range(reps):
        mask, init = found[r], run.inits[r]
        g = torch.Generator().manual_seed(derive_seed(run.s.seed, "check", variant, r, density))
        if variant.endswith("+shuffle"):
            mask = shuffle_within_layers(mask, g)
        elif variant.endswith("+invert"):
            mask = inverted[r]
        elif variant.endswith("+reinit"):
            init = reinit_kept(run.fresh[r], init, mask)
        jobs.append(Job(_masked_init(init, mask), mask, run.data_seeds[r]))
    return jobs


def _mean_layers(masks: Sequence[Mask]) -> dict[str, float]:
    per = [m.layer_density() for m in masks]
    return {n: statistics.fmean(p[n] for p in per) for n in per[0]}


def _metrics(res: Result) -> dict[str, Any]:
    return {
        "early_stop_test_acc": _finite(res.early_stop_test_acc),
        "final_test_acc": _finite(res.final_test_acc),
        "early_stop_iter": res.early_stop_iter,
        "diverged": res.diverged,
    }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --- results -----------------------------------------------------------------------------------


def _summary(networks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    acc = [n["early_stop_test_acc"] for n in networks if n["early_stop_test_acc"] is not None]
    return {
        "acc_mean": statistics.fmean(acc) if acc else None,
        "acc_std": statistics.pstdev(acc) if acc else None,
        "acc_min": min(acc) if acc else None,
        "acc_max": max(acc) if acc else None,
        "accs": acc,
    }


def _results(
    run: _Run,
    dense: dict[str, Any],
    cells: dict[tuple[str, float], dict[str, Any]],
    compute: dict[str, dict[float, dict[str, Any]]],
) -> dict[str, Any]:
    rows = []
    for finder in run.s.finders:
        for variant in variants(finder, run.s.checks):
            for density in run.densities():
                cell = cells[(variant, density)]
                rows.append(
                    {
                        "finder": finder,
                        "variant": variant,
                        "sparsity": round(1.0 - density, 12),
                        "weights_remaining": cell["weights_remaining"],
                        "layer_remaining": cell["layer_remaining"],
                        **_summary(cell["networks"]),
                        "compute": compute[finder][density],
                    }
                )
    s = run.s
    return {
        "settings": {
            **dataclasses.asdict(s),
            "optimizer": run.c.optimizer,
            "lr": run.c.lr,
            "batch_size": run.c.batch_size,
            "eval_every": run.c.eval_every,
            "imp_rates": {
                "conv": run.c.conv_rate,
                "fc": run.c.fc_rate,
                "output": run.c.output_layer_rate(),
            },  # fmt: skip
            "forward_flops_dense": run.flops(None),
        },
        "dense": {**_summary(dense["networks"]), "seconds": dense["seconds"] / s.replicates},
        "rows": rows,
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _acc(row: dict[str, Any]) -> str:
    if row["acc_mean"] is None:
        return "-"
    return f"{100 * row['acc_mean']:.1f} ± {100 * row['acc_std']:.1f}"


def _eng(x: float) -> str:
    if x == 0:
        return "0"
    exp = int(math.floor(math.log10(abs(x)) / 3) * 3)
    suffix = {0: "", 3: "K", 6: "M", 9: "G", 12: "T", 15: "P"}.get(exp)
    return f"{x / 10**exp:.3g}{suffix}" if suffix is not None else f"{x:.2e}"


def _by_variant(results: dict[str, Any]) -> dict[str, dict[float, dict[str, Any]]]:
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for row in results["rows"]:
        out.setdefault(row["variant"], {})[row["sparsity"]] = row
    return out


def tables(results: dict[str, Any]) -> list[Table]:
    """Accuracy per variant and sparsity; then the compute each finder spent to find its masks."""
    sparsities = results["settings"]["sparsities"]
    by_variant = _by_variant(results)
    d = results["dense"]
    acc = Table(
        title="Test accuracy at early stop (%), mean ± std over replicates",
        caption=f"dense: {_pct(d['acc_mean'])} ± {_pct(d['acc_std'])}",
    )
    acc.add_column("finder / check")
    for sp in sparsities:
        remaining = next(iter(by_variant.values()))[sp]["weights_remaining"]
        acc.add_column(f"{100 * remaining:.1f}% left", justify="right")
    for variant, per in by_variant.items():
        acc.add_row(variant, *(_acc(per[sp]) for sp in sparsities))
    cost = Table(title="Compute to find one mask (per replicate), at the sparsest target")
    for name in ("finder", "train steps", "FLOPs dense-eq.", "FLOPs actual", "wall s"):
        cost.add_column(name, justify="left" if name == "finder" else "right")
    last = max(sparsities)
    for variant, per in by_variant.items():
        if "+" in variant:
            continue
        c = per[last]["compute"]
        cost.add_row(
            variant,
            f"{c['train_steps']:.0f}",
            _eng(c["flops_dense"]),
            _eng(c["flops_actual"]),
            f"{c['seconds']:.2f}",
        )
    return [acc, cost]


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    sparsities = s["sparsities"]
    by_variant = _by_variant(results)
    first = next(iter(by_variant.values()))
    head = ["finder / check"] + [
        f"{100 * first[sp]['weights_remaining']:.1f}% left" for sp in sparsities
    ]
    d = results["dense"]
    lines = [
        f"# Finders: {s['model']} on {s['data']}",
        "",
        f"{s['replicates']} replicates, {s['steps']} steps ({s['optimizer']} lr {s['lr']:g}, "
        f"batch {s['batch_size']}), scope {s['scope']}. Dense: {_pct(d['acc_mean'])} ± "
        f"{_pct(d['acc_std'])}%.",
        "",
        "Test accuracy at early stop (%), mean ± std over replicates:",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(sparsities),
    ]
    for variant, per in by_variant.items():
        lines.append("| " + " | ".join([variant, *(_acc(per[sp]) for sp in sparsities)]) + " |")
    lines += [
        "",
        "Compute to find one mask (per replicate): train steps / FLOPs dense-equivalent / "
        "FLOPs on surviving weights / wall s:",
        "",
        "| finder | "
        + " | ".join(f"{100 * (1 - sp):.0f}% kept target" for sp in sparsities)
        + " |",
        "|---|" + "---:|" * len(sparsities),
    ]
    for variant, per in by_variant.items():
        if "+" in variant:
            continue
        cells = []
        for sp in sparsities:
            c = per[sp]["compute"]
            cells.append(
                f"{c['train_steps']:.0f} / {_eng(c['flops_dense'])} / {_eng(c['flops_actual'])}"
                f" / {c['seconds']:.2f}"
            )
        lines.append("| " + " | ".join([variant, *cells]) + " |")
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any]) -> dict[str, bytes]:
    """Three panels: accuracy vs weights remaining per finder; what each sanity check changes at
    the sparsest target; accuracy vs the FLOPs each finder spent to find its mask."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    by_variant = _by_variant(results)
    sparsities = sorted(results["settings"]["sparsities"])
    finders = list(dict.fromkeys(r["finder"] for r in results["rows"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {f: colors[i % len(colors)] for i, f in enumerate(finders)}
    markers = "os^Dv<>ph*"
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5.2))
    for finder in finders:
        rows = [by_variant[finder][sp] for sp in sparsities]
        rows = [r for r in rows if r["acc_mean"] is not None]
        x = [100 * r["weights_remaining"] for r in rows]
        left.plot(x, [100 * r["acc_mean"] for r in rows], "o-", ms=4, color=color[finder],
                  label=finder)  # fmt: skip
        lo, hi = [100 * r["acc_min"] for r in rows], [100 * r["acc_max"] for r in rows]
        left.fill_between(x, lo, hi, color=color[finder], alpha=0.12)
        for j, r in enumerate(rows):
            flops = max(r["compute"]["flops_actual"], 1.0)
            right.plot(flops, 100 * r["acc_mean"], markers[j % len(markers)], ms=7,
                       color=color[finder], label=finder if j == 0 else None)  # fmt: skip
    d = results["dense"]
    if d["acc_mean"] is not None:
        for ax in (left, right):
            ax.axhline(100 * d["acc_mean"], color="k", lw=0.8, ls="--", label="dense")
    left.set_xscale("log")
    left.invert_xaxis()
    left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    left.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    left.set_xlabel("% of weights remaining")
    left.set_ylabel("test accuracy at early stop (%)")
    left.set_title("Accuracy vs weights remaining (band: min-max)")
    left.legend(fontsize=7)
    # sanity checks at the sparsest target: change of mean accuracy vs the finder's own mask
    sparsest = sparsities[-1]
    checks = [c for c in CHECKS if any(v.endswith("+" + c) for v in by_variant)]
    width = 0.8 / max(1, len(checks))
    for k, check in enumerate(checks):
        xs, ys = [], []
        for i, finder in enumerate(finders):
            own, other = by_variant[finder][sparsest], by_variant.get(f"{finder}+{check}")
            if other is None or own["acc_mean"] is None or other[sparsest]["acc_mean"] is None:
                continue
            xs.append(i + (k - (len(checks) - 1) / 2) * width)
            ys.append(100 * (other[sparsest]["acc_mean"] - own["acc_mean"]))
        middle.bar(xs, ys, width, label=check)
    middle.axhline(0, color="k", lw=0.8)
    middle.set_xticks(range(len(finders)), finders, rotation=30, ha="right", fontsize=8)
    middle.set_ylabel("accuracy change vs the finder's mask (pp)")
    remaining = 100 * by_variant[finders[0]][sparsest]["weights_remaining"]
    middle.set_title(f"Sanity checks at {remaining:.1f}% of weights (Frankle et al. 2021)")
    if checks:
        middle.legend(fontsize=8)
    right.set_xscale("log")
    right.xaxis.set_major_formatter(
        FuncFormatter(lambda v, _: "0" if v <= 1 else f"1e{math.log10(v):.0f}")
    )
    right.set_xlabel("FLOPs spent to find the mask (on surviving weights; 0 = none)")
    right.set_ylabel("test accuracy at early stop (%)")
    shapes = ", ".join(
        f"{markers[j % len(markers)]} {100 * (1 - sp):.3g}%" for j, sp in enumerate(sparsities)
    )
    right.set_title(f"Accuracy vs compute to find (kept: {shapes})", fontsize=10)
    right.legend(fontsize=7)
    s = results["settings"]
    fig.suptitle(f"Finders: {s['model']} on {s['data']}, {s['replicates']} replicates")
    fig.tight_layout()
    out = {}
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=110)
        out[ext] = buf.getvalue()
    plt.close(fig)
    return out


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``results.md``, ``finders.png`` and ``finders.svg``, each atomically."""
    atomic_write_bytes(
        out / "results.json", json.dumps(results, indent=1, allow_nan=False).encode()
    )
    atomic_write_bytes(out / "results.md", markdown(results).encode())
    for ext, payload in figure(results).items():
        atomic_write_bytes(out / f"finders.{ext}", payload)


# --- state files -------------------------------------------------------------------------------


def _write_states(store: RunStore, rel: str, states: Sequence[State]) -> None:
    store.write_tensors(rel, {f"r{r}/{n}": t for r, st in enumerate(states) for n, t in st.items()})


def _read_states(store: RunStore, rel: str, replicates: int) -> list[State]:
    tensors, _ = store.read_tensors(rel)
    return [
        {k[len(f"r{r}/") :]: t for k, t in tensors.items() if k.startswith(f"r{r}/")}
        for r in range(replicates)
    ]


def parse_list(text: str, what: str) -> tuple[str, ...]:
    names = [part.strip() for part in text.split(",")]
    if any(not n for n in names):
        raise TicketlabError(f"--{what} must be a comma-separated list, got {text!r}")
    return tuple(dict.fromkeys(names))


def parse_sparsities(text: str) -> tuple[float, ...]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise TicketlabError(f"sparsity {part.strip()!r} is not a number") from None
    return tuple(sorted(dict.fromkeys(values)))


def run_with_progress(s: Settings, out: str | Path, console: Any) -> dict[str, Any]:
    """``run_finders`` under a rich progress bar of network-steps (what the CLI shows)."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    s = replace(s, sparsities=tuple(sorted(set(s.sparsities))))
    validate(s, out)
    check_folder(Path(out), s)
    bar = Bar(
        TextColumn("finders"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} network-steps"),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task("finders", total=total_steps(s))
        return run_finders(s, out, progress=lambda n: bar.advance(task, n))
