"""The Python API: ``run_search`` for a resolved config, ``find_ticket`` for any ``nn.Module``.

The CLI is a thin layer over ``run_search``; everything a run produces is in its folder, and the
returned ``TicketSearch`` reads it back.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from . import __version__
from .core.mask import Mask, prunable_names
from .core.seeds import derive_seed
from .errors import TicketlabError
from .io.config import SUMMARY_ONLY, Config, load_toml, resolve
from .io.export import ExportReport, export_ticket
from .io.run_files import load_masks, load_rewind
from .io.store import TMP_PREFIX, RunStore, atomic_write_bytes, check_writable_folder
from .io.summary import answer_line, stopped_lines, summarize, table
from .studies.common import train_spec
from .studies.imp import Setup, check_settings, run_imp, total_steps
from .train.layout import buffer_names
from .train.stacked import State, plan_stack
from .train.trainer import place_data
from .zoo.checks import as_arrays, check_fit
from .zoo.data import Dataset, load_dataset, redraw_split, split_validation
from .zoo.models import build_model


@dataclass(frozen=True)
class TicketSearch:
    """A finished (or resumed) search: its folder, per-level metrics and summary."""

    run_dir: Path
    config: Config
    levels: list[dict[str, Any]]
    summary: dict[str, Any]
    #: the architecture searched (find_ticket's module, or the registered model): for export
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def store(self) -> RunStore:
        return RunStore(self.run_dir, self.config.hash())

    def ticket(self, level: int, replicate: int = 0) -> tuple[Mask, State]:
        """The ticket of a level: its mask and the (masked) rewind weights it restarts from."""
        mask = load_masks(self.store, level, self.config)[replicate]
        if not mask.tensors:
            raise TicketlabError(f"replicate {replicate} has no ticket at level {level} (diverged)")
        rewind = load_rewind(self.store, self.config)[replicate]
        weights = {n: t * mask[n] if n in mask.tensors else t for n, t in rewind.items()}
        return mask, weights

    def export(
        self, level: int, out: str | Path, replicate: int = 0, weights: str = "early_stop"
    ) -> ExportReport:
        """The ticket of ``level`` as a packed file (``ticketlab export``), for any model; load
        it back with ``load_ticket(out, module=...)``."""
        return export_ticket(
            self.run_dir, self.config, level, Path(out), replicate, weights, self.module
        )


def open_store(config: Config) -> RunStore:
    """The run folder for ``config``; refuses, before writing anything, one holding another run."""
    root = Path(config.out)
    store = RunStore(root, config.hash())
    saved = root / "config.toml"
    if root.exists() and not root.is_dir():
        raise TicketlabError(f"cannot use {root} as the run folder: it is a file")
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
        return resolve(load_toml(path), saved=True)
    except TicketlabError as exc:
        raise TicketlabError(f"{path} is not a usable run config: {exc}") from None


def _metadata(config: Config, data: Dataset) -> dict[str, Any]:
    return {
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "task": data.task,
        **({"data_digest": data.digest} if data.digest else {}),
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
    replicate_data: Callable[[int], Dataset] | None = None,
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
    if data is None:
        data = load_dataset(config.data, config.val_fraction, config.seed)
        if config.resplit:
            splits = [
                load_dataset(
                    config.data,
                    config.val_fraction,
                    split_seed=derive_seed(config.seed, "split", r),
                )
                for r in range(config.replicates)
            ]
            replicate_data = splits.__getitem__
    if template is None:
        template = build_model(config.model, data.input_shape, data.num_classes, seed=0)

        def init_state(seed: int) -> State:
            model = build_model(config.model, data.input_shape, data.num_classes, seed)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    assert init_state is not None
    config_dtype = getattr(torch, config.dtype)
    prunable = prunable_names(template, config.prune_biases, config.exclude)
    check_fit(template, data, prunable, config_dtype)  # on the CPU, before anything is written
    plan = plan_stack(template, data.x_train.to(config_dtype))
    if not plan.side_by_side and config.batch and config.stack_size != 1:
        warn(
            f"{type(template).__name__} trains its networks one after another, not side by "
            f"side: {plan.reason}"
        )
    spec = train_spec(config)  # settles the device (one line if it is not there) before writing
    dtype, device = getattr(torch, spec.dtype), torch.device(spec.device)
    data = place_data(data, dtype, device)  # moved once
    if replicate_data is not None:
        placed = [place_data(replicate_data(r), dtype, device) for r in range(config.replicates)]
        replicate_data = placed.__getitem__
    setup = Setup(
        config, template, init_state, data, store, warn, replicate_data, given=given, plan=plan
    )
    check_settings(setup)  # before anything is written
    check_writable_folder(store.root)
    with store.lock():
        _write_config(store, config)
        if not store.exists("run.json"):  # separately: a run can be killed between the two
            store.write_json("run.json", _metadata(config, data))
        store.clean_temp_files()
        with _progress_bar(console) as bar:
            task = bar.add_task("ticket search", total=total_steps(config))
            try:
                levels = run_imp(setup, progress=lambda n: bar.advance(task, n))
            except BaseException:
                bar.live.transient = True  # an error leaves its one line, not a half-drawn bar
                raise
        summary = summarize_config(levels, config, data.task)
        store.write_json("summary.json", summary)
        if config.report:
            from .io.report import write_report

            write_report([store.root])
        if config.tensorboard:
            from .io.report import log_tensorboard

            log_tensorboard(store.root)
    return TicketSearch(store.root, config, levels, summary, template)


def summarize_config(
    levels: list[dict[str, Any]], config: Config, task: str = "classification"
) -> dict[str, Any]:
    return summarize(
        levels,
        config.tolerance_pp,
        task,
        early_stop_tolerance=config.early_stop_tolerance,
        eval_every=config.eval_every,
        confidence=config.confidence,
    )


def _write_config(store: RunStore, config: Config) -> None:
    """config.toml, written once; rewritten when only summary settings changed (a finished run
    rerun with another tolerance is re-summarized, and its folder says with which)."""
    path = store.path("config.toml")
    if path.exists():
        saved = resolve_saved(path)
        if all(getattr(saved, k) == getattr(config, k) for k in SUMMARY_ONLY):
            return
    atomic_write_bytes(path, tomli_w.dumps(config.to_toml_dict()).encode())


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
    if not console.is_terminal:  # piped or captured: the table's full width, not 80 columns
        console.width = max(console.width, 200)
    console.print(table(search.summary))
    for line in stopped_lines(search.summary):
        console.print(line)
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
    ``settings`` are config keys (``levels``, ``replicates``, ``steps``, ``fc_rate``...,
    ``device="auto"|"cpu"|"cuda"|"cuda:N"|"mps"``, ``precision="fp32"|"bf16"|"fp16"``).
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
    splits = []
    if config.resplit:
        for r in range(config.replicates):
            seed = derive_seed(config.seed, "split", r)
            raw = redraw_split(x, y, x_test, y_test, seed)
            splits.append(split_validation("custom", *raw, config.val_fraction, seed))
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
    return run_search(
        config,
        template=model,
        init_state=module_init_state(model, init),
        data=data,
        console=console,
        replicate_data=splits.__getitem__ if splits else None,
        given=module_state(model),
    )


def module_init_state(model: nn.Module, init: Init | None = None) -> Callable[[int], State]:
    """Seeded inits of any module: ``init(copy)`` under the seed, or by default each
    submodule's own ``reset_parameters``."""

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

    return init_state


def transfer_ticket(
    run: str | Path,
    to: str,
    *,
    model: nn.Module | None = None,
    train: tuple[torch.Tensor, torch.Tensor] | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    console: Console | None = None,
    **settings: Any,
) -> Any:
    """Carry the tickets of ``run`` to the data set ``to`` and train them beside the controls.

    ``settings``: ``levels``, ``init`` (rewind/fresh), ``optimizer``, ``lr``, ``steps``,
    ``replicates``, ``seed``, ``output_mask`` (carry/redraw), ``target_run``, ``out``. For a run
    found with ``find_ticket`` on a custom module, pass the same ``model`` and the target's
    ``train``/``test`` tensors (``to`` then only names them). Returns a ``TransferResult``.
    """
    from .studies.transfer import TransferSettings, open_run, run_transfer

    console = console or Console(stderr=True)
    known = {f.name for f in dataclasses.fields(TransferSettings)} - {"to"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TicketlabError(f"unknown transfer setting {unknown[0]!r}; known: {', '.join(known)}")
    if isinstance(settings.get("levels"), int):
        settings["levels"] = (settings["levels"],)
    chosen = {k: v for k, v in settings.items() if v is not None}
    if "levels" in chosen:
        chosen["levels"] = tuple(int(lv) for lv in chosen["levels"])
    options = TransferSettings(to=to, **chosen)
    template = init_state = data = None
    if model is not None or train is not None or test is not None:
        if model is None or train is None or test is None:
            raise TicketlabError("a custom transfer needs model, train and test together")
        source = open_run(run, "source run")
        x, y = as_arrays(train, "train")
        x_test, y_test = as_arrays(test, "test")
        seed = source.config.seed if options.seed is None else options.seed
        vf = source.config.val_fraction
        data = split_validation("custom", x, y, x_test, y_test, vf, seed)
        template, init_state = model, module_init_state(model)
        options = dataclasses.replace(options, to="custom")
    with _progress_bar(console) as bar:
        task = bar.add_task("transfer", total=None)
        try:
            return run_transfer(
                run,
                options,
                template=template,
                init_state=init_state,
                data=data,
                progress=lambda n: bar.advance(task, n),
                on_total=lambda total: bar.update(task, total=total),
            )
        except BaseException:
            bar.live.transient = True
            raise


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
