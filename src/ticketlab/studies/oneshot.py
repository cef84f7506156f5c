"""One-shot pruning of a trained dense network, how large language models are pruned today.

Given a finished IMP run folder (``ticketlab find``), take each replicate's trained dense network
(level 0) and prune it once, at the sparsities of the run's levels, by

* ``magnitude``: the smallest |W| go (per layer, or in one global ranking when the run's scope is
  global), as in Han et al. 2015 and the magnitude baselines of the LLM pruning papers;
* ``wanda``: the smallest |W_ij| * ||X_j||_2 go within each output row, with the input norms from
  a few calibration batches of training data (Sun et al. 2023; ``core/wanda.py``);

then evaluate it as it is, and after a short masked fine-tune (by default a tenth of the run's
training steps, at a tenth of its learning rate). The same prunable matrices as the run's IMP
(its ``exclude``/``prune_embeddings``), the same data, the same early-stop rule (min. validation
loss), so the rows sit beside the run's ticket and controls in one table (``oneshot.md``).

Results go to ``RUN/oneshot/oneshot.json`` and ``oneshot.md``, through the run's store.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..core.mask import Mask, prunable_names
from ..core.pruning import prune
from ..core.seeds import derive_seed
from ..core.wanda import input_norms, wanda_mask, wanda_scores
from ..errors import TicketlabError
from ..io.config import Config
from ..io.run_files import level_dir, load_replicates
from ..io.store import RunStore, atomic_write_bytes
from ..io.summary import LANGUAGE_MODEL
from ..train.trainer import Job, Progress, train
from ..zoo.data import Dataset, load_dataset
from ..zoo.models import build_model
from .common import train_spec

METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class OneShotSettings:
    """How the one-shot baselines run (everything else comes from the run's config)."""

    methods: tuple[str, ...] = METHODS
    finetune_steps: int | None = None  # default: a tenth of the run's steps
    finetune_lr_factor: float = 0.1
    calibration_batches: int = 8
    densities: tuple[float, ...] = ()  # default: the weights remaining of the run's levels

    def validate(self) -> None:
        for method in self.methods:
            if method not in METHODS:
                raise TicketlabError(f"unknown one-shot method {method!r}; known: {METHODS}")
        if not self.methods:
            raise TicketlabError("give at least one one-shot method")
        if self.finetune_steps is not None and self.finetune_steps < 0:
            raise TicketlabError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if not 0 < self.finetune_lr_factor <= 1:
            raise TicketlabError(
                f"finetune_lr_factor must be in (0, 1], got {self.finetune_lr_factor}"
            )
        if self.calibration_batches < 1:
            raise TicketlabError(
                f"calibration_batches must be >= 1, got {self.calibration_batches}"
            )
        for d in self.densities:
            if not 0 < d < 1:
                raise TicketlabError(f"densities must be in (0, 1), got {d}")


def run_densities(store: RunStore) -> list[float]:
    """Weights remaining of the run's finished pruned levels."""
    found = []
    level = 1
    while store.exists(f"{level_dir(level)}/metrics.json"):
        found.append(
            float(store.read_json(f"{level_dir(level)}/metrics.json")["weights_remaining"])
        )
        level += 1
    return found


def calibration_batches(data: Dataset, batches: int, batch_size: int, seed: int):
    """``batches`` training batches in a seeded order (Wanda's calibration set)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.x_train.shape[0], generator=g)
    for b in range(batches):
        rows = order[b * batch_size : (b + 1) * batch_size]
        if len(rows):
            yield data.x_train[rows]


def oneshot_mask(
    method: str,
    weights: dict[str, torch.Tensor],
    names: Sequence[str],
    density: float,
    scope: str,
    norms: dict[str, torch.Tensor] | None = None,
) -> Mask:
    """The mask of ``method`` keeping ``density`` of the prunable weights ``names``."""
    full = Mask.ones_like({n: weights[n] for n in names})
    if method == "magnitude":
        scores = {n: weights[n].abs() for n in names}
        return prune(full, scores, {n: 1.0 - density for n in names}, scope)
    assert norms is not None
    return wanda_mask(wanda_scores({n: weights[n] for n in names}, norms), density)


def run_oneshot(
    run_dir: Path,
    config: Config,
    settings: OneShotSettings,
    *,
    data: Dataset | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Prune each replicate's trained dense network once per method and density; evaluate it
    untouched and after a short fine-tune. Returns (and writes) ``oneshot.json``."""
    settings.validate()
    store = RunStore(run_dir, config.hash())
    if not store.exists(f"{level_dir(0)}/metrics.json"):
        raise TicketlabError(f"{run_dir} has no trained dense network yet (level 0 unfinished)")
    densities = list(settings.densities) or run_densities(store)
    if not densities:
        raise TicketlabError(f"{run_dir} has no pruned level yet; give densities explicitly")
    data = data or load_dataset(config.data, config.val_fraction, config.seed)
    template = build_model(config.model, data.input_shape, data.num_classes, seed=0)
    names = prunable_names(template, config.prune_biases, config.exclude, config.prune_embeddings)
    if "wanda" in settings.methods:
        modules = dict(template.named_modules())
        bad = [n for n in names if not isinstance(modules[n.rpartition(".")[0]], torch.nn.Linear)]
        if bad:
            raise TicketlabError(f"wanda prunes Linear weights only; the run also prunes {bad[0]}")
    dense = load_replicates(store, f"{level_dir(0)}/ticket_final.safetensors", config)

    labels: list[tuple[str, float, int]] = []
    jobs: list[Job] = []
    for r, state in enumerate(dense):
        norms = None
        if "wanda" in settings.methods:
            model = build_model(config.model, data.input_shape, data.num_classes, seed=0)
            model.load_state_dict(state)
            seed = derive_seed(config.seed, "calibration", r)
            batches = calibration_batches(
                data, settings.calibration_batches, config.batch_size, seed
            )
            norms = input_norms(model, names, batches)
        for density in densities:
            for method in settings.methods:
                mask = oneshot_mask(method, state, names, density, config.scope, norms)
                init = {n: t * mask[n] if n in mask.tensors else t for n, t in state.items()}
                seed = derive_seed(config.seed, "oneshot", method, r, round(density, 6))
                jobs.append(Job(init, mask, seed))
                labels.append((method, density, r))

    base = train_spec(config)
    steps = settings.finetune_steps
    steps = max(1, config.steps // 10) if steps is None else steps
    size = (config.stack_size or None) if config.batch else 1
    # one run: its evaluation at step 0 is the network as pruned, its early stop the fine-tuned one
    tune = replace(
        base,
        steps=max(steps, 1),
        lr=config.lr * settings.finetune_lr_factor,
        warmup_steps=0,
        milestones=(),
        eval_every=max(1, steps // 2),  # as pruned, halfway, end: early stop picks one
    )
    trained = train(template, jobs, data, tune, stack_size=size, progress=progress)
    as_pruned = trained
    tuned = trained if steps else None

    networks = []
    for i, ((method, density, r), job) in enumerate(zip(labels, jobs, strict=True)):
        row = {
            "method": method,
            "target_density": density,
            "weights_remaining": job.mask.density(),
            "replicate": r,
            "pruned_test_loss": as_pruned[i].curve["test_loss"][0],
            "pruned_test_acc": as_pruned[i].curve["test_acc"][0],
        }
        if tuned is not None:
            metrics = tuned[i].metrics()
            row["finetuned_test_loss"] = metrics["early_stop_test_loss"]
            row["finetuned_test_acc"] = metrics["early_stop_test_acc"]
            row["finetune_early_stop_iter"] = metrics["early_stop_iter"]
        networks.append(row)
    result = {
        "settings": {**asdict(settings), "finetune_steps": steps, "densities": densities},
        "task": data.task,
        "networks": networks,
    }
    store.write_json("oneshot/oneshot.json", result)
    count = 1 if settings.densities else len(densities) + 1  # IMP levels beside the rows
    levels = [store.read_json(f"{level_dir(level)}/metrics.json") for level in range(count)]
    text = oneshot_markdown(result, levels)
    atomic_write_bytes(store.path("oneshot/oneshot.md"), text.encode())
    return result


def _value(loss: float | None, acc: float | None, task: str) -> float | None:
    if task == LANGUAGE_MODEL:
        return None if loss is None else math.exp(min(loss, 700.0))
    return None if acc is None else 100 * acc


def _cell(values: list[float | None], task: str) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    digits = 3 if task == LANGUAGE_MODEL else 1
    std = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.fmean(finite):.{digits}f} ± {std:.{digits}f}"


def oneshot_markdown(result: dict[str, Any], levels: list[dict[str, Any]]) -> str:
    """One row per density: the run's IMP branches at that level (if any), then each one-shot
    method as pruned and fine-tuned; mean ± std over replicates."""
    task = result["task"]
    what = "test perplexity" if task == LANGUAGE_MODEL else "test accuracy (%)"
    methods = list(dict.fromkeys(n["method"] for n in result["networks"]))
    branches = list(dict.fromkeys(n["branch"] for lv in levels[1:] for n in lv["networks"]))
    tuned = "finetuned_test_loss" in (result["networks"][0] if result["networks"] else {})
    header = ["% weights"] + [f"IMP {b}" for b in branches]
    for m in methods:
        header += [f"{m} one-shot"] + ([f"{m} + fine-tune"] if tuned else [])
    dense_nets = [n for n in levels[0]["networks"] if n["branch"] == "ticket"]
    dense = _cell(
        [
            _value(n.get("early_stop_test_loss"), n.get("early_stop_test_acc"), task)
            for n in dense_nets
        ],
        task,
    )
    lines = [
        f"Dense (level 0): {what} {dense}. Entries: {what} at early stop (IMP, fine-tune) or as "
        f"pruned, mean ± std over replicates; fine-tune: {result['settings']['finetune_steps']} "
        f"steps at {result['settings']['finetune_lr_factor']}x the run's learning rate.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for i, density in enumerate(result["settings"]["densities"]):
        cells = [f"{100 * density:.1f}"]
        level = levels[i + 1] if i + 1 < len(levels) else None
        for b in branches:
            nets = [n for n in level["networks"] if n["branch"] == b] if level else []
            values = [
                _value(n.get("early_stop_test_loss"), n.get("early_stop_test_acc"), task)
                for n in nets
            ]
            cells.append(_cell(values, task) if nets else "")
        for m in methods:
            nets = [
                n for n in result["networks"] if n["method"] == m and n["target_density"] == density
            ]
            cells.append(
                _cell(
                    [_value(n["pruned_test_loss"], n["pruned_test_acc"], task) for n in nets], task
                )
            )
            if tuned:
                cells.append(
                    _cell(
                        [
                            _value(n["finetuned_test_loss"], n["finetuned_test_acc"], task)
                            for n in nets
                        ],
                        task,
                    )
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
