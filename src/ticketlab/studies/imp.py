"""Iterative magnitude pruning (Frankle & Carbin Algorithm 1), levels x replicates x branches.

Every level writes its outputs to the run folder and is skipped when they exist, so rerunning an
interrupted command resumes it; mid-level, the trainer's checkpoints do the same. Each level's
results are always read back from disk before the next level uses them, so a fresh run and a resumed
run take exactly the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from ..backends import Backend, get_backend
from ..core.criteria import get_criterion
from ..core.mask import (
    Mask,
    find_output_layer,
    layer_groups,
    layer_kinds,
    prunable_layers,
    prunable_names,
)
from ..core.pruning import prune, prune_to_density, random_mask_like
from ..core.resets import get_reset
from ..core.seeds import derive_seed
from ..errors import TicketlabError
from ..io.config import Config
from ..io.run_files import (
    CONTROL_MASKS,
    level_dir,
    load_control_masks,
    load_masks,
    load_replicates,
    load_rewind,
)
from ..io.store import RunStore
from ..train.stacked import StackPlan, State
from ..train.trainer import Job, Progress, Result, TrainSpec, chunk_count, train
from ..zoo.data import Dataset
from .common import StoreCheckpointer, _warn_stderr, data_seed, init_seed, train_spec

InitState = Callable[[int], State]


@dataclass(frozen=True)
class Setup:
    """Everything a level needs, built once per run."""

    config: Config
    template: nn.Module
    init_state: InitState
    data: Dataset
    store: RunStore
    warn: Callable[[str], None] = field(default=_warn_stderr, compare=False)
    # with ``resplit``: replicate r's own train/validation/test split
    replicate_data: Callable[[int], Dataset] | None = field(default=None, compare=False)
    given: State | None = None  # replicate 0's init, when the user handed us a module's weights
    plan: StackPlan | None = None  # how networks train together (default: the trainer decides)

    @property
    def prunable(self) -> list[str]:
        c = self.config
        return prunable_names(self.template, c.prune_biases, c.exclude, c.prune_embeddings)

    @cached_property
    def output_layer(self) -> str | None:
        """The layer pruned at the output rate: given, named by the model (``output_layer``
        attribute; None for a head tied to the embedding), or found from a forward pass."""
        if self.config.output_layer:
            return self.config.output_layer
        if hasattr(self.template, "output_layer"):
            return self.template.output_layer
        return find_output_layer(self.template, self.data.x_train[:2].cpu())

    def rates(self) -> dict[str, float]:
        c = self.config
        by_kind = {
            "conv": c.conv_rate,
            "fc": c.fc_rate,
            "output": c.output_layer_rate(),
            "embedding": c.fc_rate,
        }
        kinds = layer_kinds(self.template, self.output_layer)
        return {name: by_kind[kinds[name]] for name in self.prunable}

    def groups(self) -> list[list[str]] | None:
        """With biases pruned, a layer's weight and bias are ranked together (the notebook)."""
        return layer_groups(self.prunable) if self.config.prune_biases else None

    def data_for(self, replicate: int) -> Dataset:
        if self.config.resplit and self.replicate_data is not None:
            return self.replicate_data(replicate)
        return self.data

    def spec(self) -> TrainSpec:
        return train_spec(self.config)

    def stack_size(self) -> int | None:
        return (self.config.stack_size or None) if self.config.batch else 1

    @cached_property
    def backend(self) -> Backend | None:
        """One per run, so a Ray backend connects once and keeps its relay queue."""
        return get_backend(self.config.backend, self.config.address)


def check_settings(setup: Setup) -> None:
    """Refuse, before anything is written, settings that name what the model does not have."""
    layers = prunable_layers(setup.template)
    known = set(layers) | set(prunable_names(setup.template, prune_biases=True))
    unknown = [name for name in setup.config.exclude if name not in known]
    if unknown:
        raise TicketlabError(
            f"exclude names no prunable layer or parameter: {unknown[0]!r}; prunable layers: "
            f"{', '.join(layers) or 'none'}"
        )
    output = setup.config.output_layer
    if output is not None and output not in layers:
        raise TicketlabError(
            f"output_layer {output!r} is not a Linear/Conv layer of the model; layers: "
            f"{', '.join(layers) or 'none'}"
        )
    if not setup.prunable:
        raise TicketlabError("nothing left to prune: every Linear/Conv layer is excluded")


def run_imp(setup: Setup, progress: Progress | None = None) -> list[dict]:
    """The IMP loop: train -> score -> prune -> reset -> repeat. Returns every level's metrics.

    A replicate whose ticket diverged (NaN/inf loss) stops there: its mask is not pruned further
    and its networks are not trained at later levels (each level's metrics say so)."""
    c, store = setup.config, setup.store
    weights = setup.template.state_dict()
    masks = [Mask.ones_like({n: weights[n] for n in setup.prunable})] * c.replicates
    stopped: dict[int, int] = {}  # replicate -> level at which its ticket diverged
    metrics = []
    for level in range(c.levels + 1):
        if len(stopped) == c.replicates:
            setup.warn(f"every replicate's ticket diverged; stopping before level {level}")
            break
        if store.exists(f"{level_dir(level)}/metrics.json"):
            load_masks(store, level, c)  # verified (checksum, owner); the loop recomputes them
            if store.exists(f"{level_dir(level)}/{CONTROL_MASKS}"):
                load_control_masks(store, level, c)
            remove_checkpoints(store, level)  # left if a run was killed just after metrics.json
            if progress:
                progress(level_size(c, level, len(stopped)) * level_steps(c, level))
        else:
            jobs = branch_jobs(setup, level, masks, restart_points(store, c, level), stopped)
            results = train_level(setup, level, jobs, progress)
            save_level(setup, level, jobs, results, stopped)
        metrics.append(store.read_json(f"{level_dir(level)}/metrics.json"))
        for net in metrics[-1]["networks"]:
            if net["branch"] == "ticket" and net["diverged"]:
                stopped.setdefault(net["replicate"], level)
        finals = load_replicates(store, f"{level_dir(level)}/ticket_final.safetensors", c)
        rewind = load_rewind(store, c)
        criterion = get_criterion(c.criterion)
        target = c.target_density(level + 1) if level < c.levels else None
        for r in range(c.replicates):
            if r in stopped:
                continue
            g = torch.Generator().manual_seed(derive_seed(c.seed, "criterion", r, level))
            scores = {n: criterion(rewind[r][n], finals[r][n], g) for n in setup.prunable}
            if target is None:
                masks[r] = prune(masks[r], scores, setup.rates(), c.scope, setup.groups())
            else:
                masks[r] = prune_to_density(masks[r], scores, target, c.scope, setup.groups())
    return metrics


def restart_points(store: RunStore, c: Config, level: int) -> list[State] | None:
    """The weights a pruned level's survivors restart from (Renda et al., arXiv 2003.02389):
    the rewind point for ``rewind``; the previous level's trained ticket for ``lr_rewind`` and
    ``finetune``. None for the dense level."""
    if not level:
        return None
    if c.retrain == "rewind":
        return load_rewind(store, c)
    return load_replicates(store, f"{level_dir(level - 1)}/ticket_final.safetensors", c)


def start_step(c: Config) -> int:
    """Where a pruned level's schedule and data order start: the rewind step k (weights and
    schedule back to k), or ``T - t`` when the last ``t`` steps are replayed or fine-tuned."""
    return c.rewind_step if c.retrain == "rewind" else c.steps - c.retrain_budget()


def level_spec(c: Config, level: int) -> TrainSpec:
    """Fine-tuning trains at the schedule's final learning rate, held constant."""
    spec = train_spec(c)
    if level and c.retrain == "finetune":
        final = spec.lr * spec.lr_factor(spec.steps - 1)
        spec = replace(spec, lr=final, milestones=(), warmup_steps=0, cosine=False)
    return spec


def branch_jobs(
    setup: Setup,
    level: int,
    masks: list[Mask],
    rewind: list[State] | None,
    stopped: dict[int, int] | None = None,
) -> list[tuple[str, int, Job]]:
    """(branch, replicate, job) for each network of a level: the ticket and the paper's controls."""
    c = setup.config
    jobs = []
    for branch in branches(c, level):
        for r in range(c.replicates):
            if stopped and r in stopped:
                continue
            seed = data_seed(c, r, level, branch)
            job = _make_job(setup, level, branch, r, masks[r], rewind, seed)
            jobs.append((branch, r, job))
    return jobs


def branches(c: Config, level: int) -> list[str]:
    """The dense level has only the ticket (the controls would equal it)."""
    return ["ticket"] + (list(c.controls) if level else [])


def level_size(c: Config, level: int, stopped: int = 0) -> int:
    return len(branches(c, level)) * (c.replicates - stopped)


def _make_job(
    setup: Setup,
    level: int,
    branch: str,
    r: int,
    mask: Mask,
    rewinds: list[State] | None,
    data_seed: int,
) -> Job:
    c = setup.config
    if rewinds is None:  # the dense network: its weights at rewind_step become the rewind point
        given = setup.given if r == 0 else None
        init = given if given is not None else setup.init_state(init_seed(c, r))
        return Job(init, mask, data_seed, snapshot_step=c.rewind_step)
    rewind = rewinds[r]
    reset_name = {"ticket": c.reset, "reinit": "reinit", "random_prune": "rewind"}[branch]
    if branch == "random_prune":
        g = torch.Generator().manual_seed(derive_seed(c.seed, branch, r, level))
        mask = random_mask_like(mask, g, setup.groups())
    fresh = setup.init_state(derive_seed(c.seed, "fresh", branch, r, level))
    reset = get_reset(reset_name)
    g = torch.Generator().manual_seed(derive_seed(c.seed, "reset", branch, r, level))
    init = dict(rewind)
    for name in mask.names():
        init[name] = reset(rewind[name], fresh[name], mask[name], g)
    return Job(init, mask, data_seed, start_step=start_step(c))


def level_steps(c: Config, level: int) -> int:
    """Steps each network of a level trains: the pruned levels go from their start step to the end
    (late rewinding: the schedule and data order continue from step k, they do not restart)."""
    return c.steps - (start_step(c) if level else 0)


def train_level(
    setup: Setup, level: int, jobs: list[tuple[str, int, Job]], progress: Progress | None
) -> list[Result]:
    """Train a level's networks; with ``resplit`` each replicate's own split trains apart."""
    if not setup.config.resplit:
        return _train_group(setup, level, "", [job for _, _, job in jobs], setup.data, progress)
    results: dict[int, Result] = {}
    for r in dict.fromkeys(rep for _, rep, _ in jobs):
        mine = [i for i, (_, rep, _) in enumerate(jobs) if rep == r]
        trained = _train_group(
            setup, level, f"r{r}_", [jobs[i][2] for i in mine], setup.data_for(r), progress
        )
        results.update(zip(mine, trained, strict=True))
    return [results[i] for i in range(len(jobs))]


def _train_group(
    setup: Setup,
    level: int,
    prefix: str,
    jobs: list[Job],
    data: Dataset,
    progress: Progress | None,
) -> list[Result]:
    size, spec = setup.stack_size(), level_spec(setup.config, level)
    starts = [j.start_step for j in jobs]
    chunks = chunk_count(setup.template, len(jobs), size, start_steps=starts, device=spec.device)
    checkpointers = [
        StoreCheckpointer(
            setup.store,
            f"{level_dir(level)}/checkpoint_{prefix}s{size or 0}_c{i}.safetensors",
            setup.config.checkpoint_every,
            setup.warn,
        )
        for i in range(chunks)
    ]
    return train(
        setup.template,
        jobs,
        data,
        spec,
        stack_size=size,
        progress=progress,
        checkpointers=checkpointers,
        plan=setup.plan,
        backend=setup.backend,
    )


def save_level(
    setup: Setup,
    level: int,
    jobs: list[tuple[str, int, Job]],
    results: list[Result],
    stopped: dict[int, int] | None = None,
) -> None:
    """Tensors first, metrics.json last: its existence marks the level as done."""
    c, store, where = setup.config, setup.store, level_dir(level)
    tickets = [
        (r, job, res) for (b, r, job), res in zip(jobs, results, strict=True) if b == "ticket"
    ]
    controls = [(r, job) for b, r, job in jobs if b == "random_prune"]
    if level == 0:
        store.write_tensors(
            "rewind.safetensors",
            {f"r{r}/{n}": t for r, _, res in tickets for n, t in (res.snapshot or {}).items()},
            {"rewind_step": c.rewind_step},
        )
    store.write_tensors(
        f"{where}/masks.safetensors",
        {f"r{r}/{n}": job.mask[n] for r, job, _ in tickets for n in job.mask.names()},
    )
    if controls:  # the random-prune control's masks, beside the ticket's
        store.write_tensors(
            f"{where}/{CONTROL_MASKS}",
            {f"r{r}/{n}": job.mask[n] for r, job in controls for n in job.mask.names()},
        )
    store.write_tensors(
        f"{where}/ticket_final.safetensors",
        {f"r{r}/{n}": t for r, _, res in tickets for n, t in res.final.items()},
    )
    store.write_tensors(  # the weights behind early_stop_test_acc (what `export` ships)
        f"{where}/ticket_early_stop.safetensors",
        {f"r{r}/{n}": t for r, _, res in tickets for n, t in (res.early_stop or {}).items()},
    )
    ticket_mask = tickets[0][1].mask
    extra = {}
    if controls:
        extra["control_layer_remaining"] = {"random_prune": controls[0][1].mask.layer_density()}
    if stopped:
        extra["stopped"] = {str(r): at for r, at in sorted(stopped.items())}
    networks = [
        {"branch": b, "replicate": r, "weights_remaining": job.mask.density(), **res.metrics()}
        for (b, r, job), res in zip(jobs, results, strict=True)
    ]
    store.write_json(
        f"{where}/metrics.json",
        {
            "level": level,
            "weights_remaining": ticket_mask.density(),
            "layer_remaining": ticket_mask.layer_density(),
            "networks": networks,
            **extra,
        },
    )
    remove_checkpoints(store, level)


def remove_checkpoints(store: RunStore, level: int) -> None:
    for path in store.path(level_dir(level)).glob("checkpoint_*.safetensors"):
        path.unlink(missing_ok=True)


def total_steps(c: Config) -> int:
    return sum(level_steps(c, level) * level_size(c, level) for level in range(c.levels + 1))
