"""``ticketlab`` on the command line: a thin layer over the Python API.

Every user error ends as one line on stderr and exit code 2: usage errors from click, and
``TicketlabError`` from the library. Interrupting a run loses nothing: rerun the same command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from .errors import TicketlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Find, verify, compare and ship lottery tickets.",
)

Opt = typer.Option


@app.command()
def find(
    config_file: Annotated[
        Path | None, Opt("--config", help="TOML file of settings (flags override it).")
    ] = None,
    model: Annotated[str | None, Opt(help="Model name (see `ticketlab models`).")] = None,
    data: Annotated[str | None, Opt(help="Data set name (see `ticketlab datasets`).")] = None,
    levels: Annotated[int | None, Opt(help="Pruning rounds after the dense level.")] = None,
    replicates: Annotated[int | None, Opt(help="Independent repetitions (seeds).")] = None,
    seed: Annotated[int | None, Opt(help="Base seed of inits, data orders and controls.")] = None,
    steps: Annotated[
        str | None, Opt(help="Training iterations per network and level (or epochs: 160ep).")
    ] = None,
    batch_size: Annotated[int | None, Opt(help="Minibatch size.")] = None,
    optimizer: Annotated[str | None, Opt(help="adam or sgd.")] = None,
    lr: Annotated[float | None, Opt(help="Learning rate.")] = None,
    milestones: Annotated[
        str | None, Opt(help="Steps (or epochs: 80ep,120ep) where the learning rate drops.")
    ] = None,
    warmup_steps: Annotated[
        str | None, Opt(help="Linear learning-rate warmup, steps (or epochs: 5ep).")
    ] = None,
    augment: Annotated[
        str | None, Opt(help="Image augmentation: none, crop, flip or crop_flip.")
    ] = None,
    eval_every: Annotated[
        str | None, Opt(help="Evaluate every N iterations (or epochs: 1ep).")
    ] = None,
    val_fraction: Annotated[float | None, Opt(help="Training fraction held out.")] = None,
    fc_rate: Annotated[float | None, Opt(help="Fraction of fc weights pruned per round.")] = None,
    conv_rate: Annotated[float | None, Opt(help="Fraction of conv weights per round.")] = None,
    output_rate: Annotated[float | None, Opt(help="Output layer rate (default fc/2).")] = None,
    scope: Annotated[str | None, Opt(help="layer (per-layer rates) or global.")] = None,
    exclude: Annotated[list[str] | None, Opt(help="Layer or parameter never pruned.")] = None,
    prune_biases: Annotated[bool | None, Opt("--prune-biases", help="Prune biases too.")] = None,
    criterion: Annotated[str | None, Opt(help="Mask criterion (default large_final).")] = None,
    reset: Annotated[str | None, Opt(help="Reset of survivors (default rewind).")] = None,
    rewind_step: Annotated[int | None, Opt(help="Rewind survivors to this step.")] = None,
    retrain: Annotated[
        str | None, Opt(help="After pruning: rewind (default), lr_rewind or finetune.")
    ] = None,
    retrain_steps: Annotated[
        int | None, Opt(help="Budget t of lr_rewind / finetune (default T - rewind step).")
    ] = None,
    controls: Annotated[
        list[str] | None, Opt("--control", help="Controls to run: reinit, random_prune.")
    ] = None,
    no_controls: Annotated[bool, Opt("--no-controls", help="Run no control branch.")] = False,
    tolerance: Annotated[
        float | None, Opt("--tolerance", help="Winning-ticket tolerance in percentage points.")
    ] = None,
    dtype: Annotated[str | None, Opt(help="float32 or float64.")] = None,
    out: Annotated[str | None, Opt(help="Run folder (rerun to resume).")] = None,
    stack_size: Annotated[int | None, Opt(help="Networks trained side by side (0 = auto).")] = None,
    no_batch: Annotated[bool, Opt("--no-batch", help="Train networks one by one.")] = False,
    checkpoint_every: Annotated[int | None, Opt(help="Checkpoint every N steps.")] = None,
    tensorboard: Annotated[
        bool, Opt("--tensorboard", help="Also log TensorBoard scalars.")
    ] = False,
    no_report: Annotated[bool, Opt("--no-report", help="Skip the HTML report.")] = False,
    backend: Annotated[
        str | None, Opt(help="Where stacks train: local, or ray (a Ray cluster; same results).")
    ] = None,
    address: Annotated[
        str | None, Opt(help="Ray cluster address (default: start or join one on this machine).")
    ] = None,
) -> None:
    """Iterative magnitude pruning with the paper's controls; prints the table and the answer."""
    from .api import print_result, run_search
    from .io.config import load_toml, resolve

    flags: dict[str, Any] = {
        "model": model,
        "data": data,
        "levels": levels,
        "replicates": replicates,
        "seed": seed,
        "steps": _count(steps),
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "milestones": None if milestones is None else _counts(milestones),
        "warmup_steps": _count(warmup_steps),
        "augment": augment,
        "eval_every": _count(eval_every),
        "val_fraction": val_fraction,
        "fc_rate": fc_rate,
        "conv_rate": conv_rate,
        "output_rate": output_rate,
        "scope": scope,
        "exclude": exclude or None,
        "prune_biases": prune_biases,
        "criterion": criterion,
        "reset": reset,
        "rewind_step": rewind_step,
        "retrain": retrain,
        "retrain_steps": retrain_steps,
        "controls": [] if no_controls else (controls or None),
        "tolerance_pp": tolerance,
        "dtype": dtype,
        "out": out,
        "stack_size": stack_size,
        "batch": False if no_batch else None,
        "checkpoint_every": checkpoint_every,
        "tensorboard": tensorboard or None,
        "report": False if no_report else None,
        "backend": backend,
        "address": address,
    }
    settings = load_toml(config_file) if config_file else {}
    settings.update({k: v for k, v in flags.items() if v is not None})
    config = resolve(settings)
    console = Console()
    search = run_search(config, console=Console(stderr=True))
    print_result(search, console)
    if config.report:
        console.print(f"Report: {search.run_dir / 'report' / 'index.html'}")


def _count(value: str | None) -> int | str | None:
    """A flag's iteration count: an integer is steps; anything else ('160ep') goes to the config
    as text, which converts epochs or names the accepted forms."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value.strip()


def _counts(value: str) -> list[int | str]:
    return [c for c in (_count(v) for v in value.split(",") if v.strip()) if c is not None]


@app.command()
def models() -> None:
    """List the registered models."""
    from .zoo.models import MODELS

    out = Table("model", "description")
    for name, builder in MODELS.items():
        out.add_row(name, (builder.__doc__ or "").strip().splitlines()[0])
    Console().print(out)


@app.command()
def datasets() -> None:
    """List the registered data sets."""
    from .zoo.data import DATASETS, DESCRIPTIONS

    out = Table("data set", "description")
    for name in DATASETS:
        out.add_row(name, DESCRIPTIONS.get(name, ""))
    Console().print(out)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (several are overlaid).")],
    out: Annotated[Path | None, Opt(help="Where to write the report.")] = None,
) -> None:
    """Figures, tables and an HTML page from one run folder, or several overlaid."""
    from .io.report import write_report

    for run in runs:
        if not (run / "config.toml").is_file():
            raise TicketlabError(f"{run} is not a ticketlab run folder (no config.toml)")
    index = write_report(list(runs), out)
    Console().print(f"Report: {index}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    level: Annotated[int, Opt(help="Level whose ticket to export.")],
    out: Annotated[Path, Opt(help="Output .safetensors file.")],
    replicate: Annotated[int, Opt(help="Which replicate's ticket.")] = 0,
    rewind: Annotated[
        bool, Opt("--rewind", help="Export the rewind weights (to retrain) instead of trained.")
    ] = False,
) -> None:
    """The ticket as a compact sparse file, with its measured size and speed."""
    from .api import resolve_saved
    from .io.export import export_ticket

    if not (run / "config.toml").is_file():
        raise TicketlabError(f"{run} is not a ticketlab run folder (no config.toml)")
    report = export_ticket(
        run, resolve_saved(run / "config.toml"), level, out, replicate, not rewind
    )
    for line in report.lines():
        Console().print(line)


def one_line(message: str) -> str:
    """Escape what would break the message over lines (a newline in a path or a name)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)


@app.command()
def compare(
    model: Annotated[str, Opt(help="Model name (see `ticketlab models`).")] = "mnist1d_mlp",
    data: Annotated[str, Opt(help="Data set name (see `ticketlab datasets`).")] = "mnist1d",
    criteria: Annotated[
        str, Opt(help="Comma-separated mask criteria.")
    ] = "large_final,magnitude_increase,random,small_final",
    resets: Annotated[
        str, Opt(help="Comma-separated resets.")
    ] = "rewind,reinit,signed_constant,reinit_signed,reshuffle,reshuffle_signed",
    sparsities: Annotated[
        str, Opt(help="Comma-separated fractions pruned per hidden layer (output layer: half).")
    ] = "0.5,0.8,0.9",
    replicates: Annotated[int, Opt(help="Independent repetitions (seeds) of the grid.")] = 2,
    steps: Annotated[int, Opt(help="Training iterations of every network.")] = 400,
    seed: Annotated[int, Opt(help="Base seed of inits, data orders and masks.")] = 0,
    eval_every: Annotated[int | None, Opt(help="Evaluate every N steps (def. steps/10).")] = None,
    lr: Annotated[float | None, Opt(help="Learning rate (default: the model's preset).")] = None,
    supermask: Annotated[
        bool, Opt("--supermask/--no-supermask", help="Add learned-supermask and edge-popup rows.")
    ] = True,
    supermask_steps: Annotated[
        int | None, Opt(help="Score-training steps of the supermask rows (default --steps).")
    ] = None,
    supermask_rescale: Annotated[
        bool, Opt(help="Dynamic weight rescaling (Zhou) in the learned-supermask rows.")
    ] = False,
    stack_size: Annotated[int | None, Opt(help="Networks trained side by side (0 = auto).")] = None,
    out: Annotated[str, Opt(help="Folder for grid.json and grid.md.")] = "runs/grid",
    backend: Annotated[
        str, Opt(help="Where stacks train: local, or ray (a Ray cluster; same results).")
    ] = "local",
    address: Annotated[
        str, Opt(help="Ray cluster address (default: start or join one on this machine).")
    ] = "",
) -> None:
    """Zhou et al.'s grid: mask criterion x reset x sparsity (one-shot), plus supermasks."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .studies.grid import parse_names, parse_sparsities, run_grid, tables, total_steps, validate

    settings: dict[str, Any] = {
        "criteria": parse_names(criteria, "criteria"),
        "resets": parse_names(resets, "resets"),
        "sparsities": parse_sparsities(sparsities),
        "replicates": replicates,
        "steps": steps,
        "supermask": supermask,
        "supermask_steps": supermask_steps,
        "supermask_rescale": supermask_rescale,
    }
    where = {"model": model, "data": data, "seed": seed, "stack_size": stack_size, "out": out}
    where.update(eval_every=eval_every, lr=lr)
    validate(**where, **settings)
    from .backends import get_backend

    get_backend(backend, address)  # an unknown backend or a missing Ray: one line, before training
    bar = Progress(
        TextColumn("grid"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with bar:
        task = bar.add_task("grid", total=total_steps(**settings))
        grid = run_grid(
            progress=lambda n: bar.advance(task, n),
            backend=backend,
            address=address,
            **where,
            **settings,
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: the table's full width, not 80 columns
        console = Console(width=160)
    for table in tables(grid):
        console.print(table)
    console.print(f"Saved {Path(out) / 'grid.json'} and {Path(out) / 'grid.md'}")


@app.command()
def retrain(
    config_file: Annotated[
        Path | None, Opt("--config", help="TOML file of settings (flags override it).")
    ] = None,
    model: Annotated[str | None, Opt(help="Model name (see `ticketlab models`).")] = None,
    data: Annotated[str | None, Opt(help="Data set name (see `ticketlab datasets`).")] = None,
    levels: Annotated[int | None, Opt(help="Pruning rounds after the dense level.")] = None,
    replicates: Annotated[int | None, Opt(help="Independent repetitions (seeds).")] = None,
    seed: Annotated[int | None, Opt(help="Base seed of inits, data orders and controls.")] = None,
    steps: Annotated[int | None, Opt(help="Training iterations T of the dense network.")] = None,
    batch_size: Annotated[int | None, Opt(help="Minibatch size.")] = None,
    lr: Annotated[float | None, Opt(help="Learning rate.")] = None,
    eval_every: Annotated[int | None, Opt(help="Evaluate every N iterations.")] = None,
    fc_rate: Annotated[float | None, Opt(help="Fraction of fc weights pruned per round.")] = None,
    conv_rate: Annotated[float | None, Opt(help="Fraction of conv weights per round.")] = None,
    rewind_step: Annotated[int | None, Opt(help="k of the rewind mode.")] = None,
    budget: Annotated[
        int | None, Opt(help="t, steps of lr_rewind and finetune (default T - k).")
    ] = None,
    modes: Annotated[str, Opt(help="Comma-separated modes.")] = "rewind,lr_rewind,finetune",
    controls: Annotated[bool, Opt("--controls", help="Also train the controls.")] = False,
    stack_size: Annotated[int | None, Opt(help="Networks trained side by side (0 = auto).")] = None,
    out: Annotated[str, Opt(help="Folder: one run per mode, retrain.json/md.")] = "runs/retrain",
) -> None:
    """Renda et al.'s comparison: the same IMP search retrained by weight rewinding, learning-rate
    rewinding and fine-tuning; one table of test accuracy per sparsity and mode."""
    from .api import run_search
    from .io.config import load_toml, resolve
    from .studies.retrain import markdown, parse_modes, run_retrain

    chosen = parse_modes(modes)
    flags = {
        "model": model, "data": data, "levels": levels, "replicates": replicates, "seed": seed,
        "steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": eval_every,
        "fc_rate": fc_rate, "conv_rate": conv_rate, "rewind_step": rewind_step,
        "retrain_steps": budget, "stack_size": stack_size, "out": out,
    }  # fmt: skip
    settings = {"controls": [], **(load_toml(config_file) if config_file else {})}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if controls:
        settings.pop("controls")
    err = Console(stderr=True)
    table = run_retrain(resolve(settings), chosen, lambda c: run_search(c, console=err).levels)
    Console().print(markdown(table), markup=False, highlight=False)
    Console().print(f"Saved {Path(out) / 'retrain.json'} and {Path(out) / 'retrain.md'}")


@app.command()
def stability(
    run: Annotated[Path, typer.Argument(help="Run folder of `ticketlab find`.")],
    level: Annotated[int, Opt(help="Level to analyse (0 = the dense network).")] = 0,
    k: Annotated[str, Opt("--k", help="Comma-separated rewind steps.")] = "0,25,100,500",
    replicates: Annotated[int | None, Opt(help="Replicates (default: all of the run).")] = None,
    controls: Annotated[
        bool, Opt("--controls/--no-controls", help="Also random-prune and reinit (levels >= 1).")
    ] = True,
    points: Annotated[int, Opt(help="Evenly spaced points on the path.")] = 30,
    bn_stats: Annotated[
        str, Opt(help="BatchNorm statistics on the path: interpolate or reestimate.")
    ] = "interpolate",
    bn_batches: Annotated[int, Opt(help="Training batches that re-estimate them.")] = 20,
    name: Annotated[str, Opt(help="Subfolder of the run for the results.")] = "stability",
    stack_size: Annotated[int | None, Opt(help="Networks trained side by side (0 = auto).")] = None,
) -> None:
    """Instability analysis (Frankle et al. 2020): the error barrier between two copies trained
    from step k with different data orders; rerun to resume."""
    from .studies import stability as st

    settings = st.Settings(
        level,
        st.parse_ks(k),
        replicates,
        controls,
        points,
        bn_stats,
        bn_batches,
        name,
        stack_size or None,
    )
    opened = st.open_run(run)
    st.validate(opened, settings)
    with opened.store.lock(), _bar("stability", st.total_steps(opened, settings)) as advance:
        st.run_stability(opened, settings, advance)
        figures = st.write_outputs(opened, name)
        if name == "stability" and (run / "report").is_dir():
            from .io.report import write_report

            write_report([run])
    console = Console(width=None if Console().is_terminal else 160)
    console.print(st.markdown(st.summarize(opened, name)), markup=False, highlight=False)
    for figure in figures:
        console.print(f"Saved {figure}", markup=False, highlight=False)


def _bar(label: str, total: int):
    """A progress bar on stderr; the context yields the function that advances it."""
    import contextlib

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        progress = Progress(
            TextColumn(label),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        with progress:
            task = progress.add_task(label, total=total)
            yield lambda n: progress.advance(task, n)

    return bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 with one line on stderr for any user error."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        app(args=argv, standalone_mode=False, prog_name="ticketlab")
    except TicketlabError as exc:
        err.print(f"error: {one_line(str(exc))}", markup=False)
        return 2
    except TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        err.print(f"error: {one_line(exc.format_message())}", markup=False)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("interrupted; rerun the same command to resume", markup=False)
        return 130
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume", markup=False)
        return 130
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
