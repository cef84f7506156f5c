"""The Python API: ``run_search`` for a resolved config, ``find_ticket`` for any ``nn.Module``.

The CLI is a thin layer over ``run_search``; everything a run produces is in its folder, and the
returned ``TicketSearch`` reads it back.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from . import __version__
from .core.mask import Mask, prunable_names
from .errors import TicketlabError
from .io.config import Config, load_toml, resolve
from .io.run_files import load_masks, load_rewind
from .io.store import TMP_PREFIX, RunStore, atomic_write_bytes
from .io.summary import answer_line, summarize, table
from .studies.imp import Setup, run_imp, total_steps
from .train.layout import buffer_names
from .train.stacked import State, plan_stack
from .zoo.checks import as_arrays, check_fit
from .zoo.data import Dataset, load_dataset, split_validation
from .zoo.models import build_model


@dataclass(frozen=True)
class TicketSearch:
    """A finished (or resumed) search: its folder, per-level metrics and summary."""

    run_dir: Path
    config: Config
    levels: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def store(self) -> RunStore:
        return RunStore(self.run_dir, self.config.hash())

    def ticket(self, level: int, replicate: int = 0) -> tuple[Mask, State]:
        """The ticket of a level: its mask and the (masked) rewind weights it restarts from."""
        mask = load_masks(self.store, level, self.config)[replicate]
        rewind = load_rewind(self.store, self.config)[replicate]
        weights = {n: t * mask[n] if n in mask.tensors else t for n, t in rewind.items()}
        return mask, weights


def open_store(config: Config) -> RunStore:
    """The run folder for ``config``; refuses, before writing anything, one holding another run."""
    root = Path(config.out)
    store = RunStore(root, config.hash())
    saved = root / "config.toml"
    if saved.exists():
        previous = resolve_saved(saved)
        if previous.hash() != config.hash():
            changed = [k for k, v in config.identity().items() if previous.identity().get(k) != v]
            raise TicketlabError(
                f"{root} holds a different experiment (differs in: {', '.join(changed)}); "
                "use another --out"
            )
    elif root.exists() and any(not _ours_before_config(p.name) for p in root.iterdir()):
        raise TicketlabError(f"{root} is not empty and holds no ticketlab run; use another --out")
    return store


def _ours_before_config(name: str) -> bool:
    """What a run creates before config.toml: its lock, and a temp file if killed mid-write."""
    return name == ".lock" or name.startswith(TMP_PREFIX)


def resolve_saved(path: Path) -> Config:
    try:
        return resolve(load_toml(path))
    except TicketlabError as exc:
        raise TicketlabError(f"{path} is not a usable run config: {exc}") from None


def _metadata(config: Config, data: Dataset) -> dict[str, Any]:
    return {
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "ticketlab_version": __version__,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config.hash(),
    }


def run_search(
    config: Config,
    *,
    template: nn.Module | None = None,
    init_state: Callable[[int], State] | None = None,
    data: Dataset | None = None,
    console: Console | None = None,
    given: State | None = None,
) -> TicketSearch:
    """Run (or resume) the search ``config`` describes, print its table, write its report.

    ``given``: replicate 0's initial weights (a user's module as passed); ``init_state(seed)``
    draws every other init. The data is checked against the module before anything is written.
    """
    console = console or Console(stderr=True)

    def warn(message: str) -> None:
        console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)

    store = open_store(config)
    data = data or load_dataset(config.data, config.val_fraction, config.seed)
    if template is None:
        template = build_model(config.model, data.input_shape, data.num_classes, seed=0)

        def init_state(seed: int) -> State:
            model = build_model(config.model, data.input_shape, data.num_classes, seed)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    assert init_state is not None
    dtype = getattr(torch, config.dtype)
    check_fit(template, data, prunable_names(template, config.prune_biases, config.exclude), dtype)
    plan = plan_stack(template, data.x_train.to(dtype))
    if not plan.side_by_side and config.batch and config.stack_size != 1:
        warn(
            f"{type(template).__name__} trains its networks one after another, not side by "
            f"side: {plan.reason}"
        )
    with store.lock():
        if not store.path("config.toml").exists():
            atomic_write_bytes(
                store.path("config.toml"), tomli_w.dumps(config.to_toml_dict()).encode()
            )
        if not store.exists("run.json"):  # separately: a run can be killed between the two
            store.write_json("run.json", _metadata(config, data))
        store.clean_temp_files()
        setup = Setup(config, template, init_state, data, store, warn, given=given, plan=plan)
        with _progress_bar(console) as bar:
            task = bar.add_task("ticket search", total=total_steps(config))
            try:
                levels = run_imp(setup, progress=lambda n: bar.advance(task, n))
            except BaseException:
                bar.live.transient = True  # an error leaves its one line, not a half-drawn bar
                raise
        summary = summarize(levels, config.tolerance_pp)
        store.write_json("summary.json", summary)
        if config.report:
            from .io.report import write_report

            write_report([store.root])
        if config.tensorboard:
            from .io.report import log_tensorboard

            log_tensorboard(store.root)
    return TicketSearch(store.root, config, levels, summary)


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def print_result(search: TicketSearch, console: Console) -> None:
    console.print(table(search.summary))
    console.print(answer_line(search.summary))
    console.print(f"Run folder: {search.run_dir}")


Init = Callable[[nn.Module], Any]


def find_ticket(
    model: nn.Module,
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    out: str | Path | None = None,
    init: Init | None = None,
    console: Console | None = None,
    **settings: Any,
) -> TicketSearch:
    """IMP on any ``nn.Module``: ``train``/``test`` are (inputs, integer labels) pairs of NumPy
    arrays or tensors, checked against the module before anything trains.

    Replicate 0 starts from ``model``'s weights exactly as passed. Every other replicate, and the
    reinit control, starts from ``init(module)`` applied to a copy of ``model`` under its own seed
    (``init`` initialises the copy in place, or returns the module to use). By default that is each
    submodule's ``reset_parameters``; parameters that no ``reset_parameters`` covers (raw
    ``nn.Parameter``s of your own modules) keep their given values, with a warning naming them.
    ``settings`` are config keys (``levels``, ``replicates``, ``steps``, ``fc_rate``...).
    """
    if not isinstance(model, nn.Module):
        raise TicketlabError("find_ticket needs a torch.nn.Module")
    console = console or Console(stderr=True)
    fingerprint = hashlib.sha256(repr(model).encode()).hexdigest()[:8]
    out = out or tempfile.mkdtemp(prefix="ticketlab-")
    config = resolve(
        {
            "report": False,
            **settings,
            "model": f"custom:{type(model).__name__}:{fingerprint}",
            "data": "custom",
            "out": str(out),
        }
    )
    x, y = as_arrays(train, "train")
    x_test, y_test = as_arrays(test, "test")
    data = split_validation("custom", x, y, x_test, y_test, config.val_fraction, config.seed)
    if init is None:
        uncovered = _names_without_reset(model)
        if uncovered and (config.replicates > 1 or "reinit" in config.controls):
            console.print(
                f"warning: no reset_parameters covers {', '.join(uncovered)}: other replicates "
                "and the reinit control keep their given values; pass init= to draw them",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def init_state(seed: int) -> State:
        fresh = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if init is None:
                for module in fresh.modules():
                    if callable(getattr(module, "reset_parameters", None)):
                        module.reset_parameters()
            else:
                returned = init(fresh)
                fresh = returned if isinstance(returned, nn.Module) else fresh
        return module_state(fresh)

    return run_search(
        config,
        template=model,
        init_state=init_state,
        data=data,
        console=console,
        given=module_state(model),
    )


def module_state(module: nn.Module) -> State:
    """A detached copy of the parameters and saved buffers, each tensor under one name (a tied
    weight under its first), which is how every stack and run file names them."""
    named = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    named.update({n: buffers[n] for n in buffer_names(module)})
    return {n: t.detach().clone() for n, t in named.items()}


def _names_without_reset(model: nn.Module) -> list[str]:
    """Parameters whose own module has no ``reset_parameters`` (default init leaves them alone)."""
    names = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        covered = callable(getattr(module, "reset_parameters", None))
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not covered:
                names.append(f"{module_name}.{name}" if module_name else name)
    return names
