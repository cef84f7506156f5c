"""``ticketlab find --dry-run``: what a search will train and about how long it will take, before
anything is trained or written.

Part of the IMP study (it counts the study's own levels and branches), in a file of its own so the
IMP loop stays one screen. The time is an estimate from a short calibration: a few steps of one
level's networks on the chosen device and precision, timed twice (``n1`` and ``n2`` steps) so the
difference is the cost of steps alone and the rest is the cost of an evaluation. Pruned levels
that take the sparse path train faster than the dense calibration, so the estimate is an upper
bound there; on a shared machine it moves with the load.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.mask import Mask, prunable_names
from ..io.config import Config
from ..io.run_files import level_dir
from ..train.trainer import Job, TrainSpec, place_data, train
from ..zoo.data import Dataset, load_dataset, not_downloaded, stand_in
from ..zoo.models import build_model
from .common import train_spec
from .imp import branches, level_size

CALIBRATION_STEPS = (2, 10)
EVAL_SLICE = 512  # held-out examples per set the calibration evaluates


@dataclass(frozen=True)
class Plan:
    config: Config
    device: str
    per_level: list[int]  # networks per level
    done_levels: int
    flops_per_step: float  # one network, one training step (forward + backward), dense count
    flops_per_eval: float  # one network, validation + test forward passes
    seconds_per_network_step: float
    seconds_per_network_eval: float
    stand_in_data: bool = False  # the set is not downloaded yet: timed on random stand-in tensors

    @property
    def networks(self) -> int:
        return sum(self.per_level)

    def evals(self) -> int:
        c = self.config
        return len(TrainSpec(steps=c.steps, batch_size=1, eval_every=c.eval_every).eval_steps())

    def total_flops(self) -> float:
        return self.networks * (
            self.config.steps * self.flops_per_step + self.evals() * self.flops_per_eval
        )

    def remaining_seconds(self) -> float:
        todo = sum(self.per_level[self.done_levels :])
        return todo * (
            self.config.steps * self.seconds_per_network_step
            + self.evals() * self.seconds_per_network_eval
        )

    def lines(self) -> list[str]:
        c = self.config
        rows = [
            f"plan for {c.out} (dry run: nothing trained, nothing written)",
            f"model {c.model} on {c.data}; device {self.device}, precision {c.precision}, "
            f"dtype {c.dtype}",
            f"levels 0..{c.levels}: networks per level {self.per_level} "
            f"(replicates {c.replicates}; branches {', '.join(branches(c, min(1, c.levels)))})",
            f"networks {self.networks} x {c.steps} steps = {self.networks * c.steps:,} "
            f"network-steps (batch {c.batch_size}), {self.evals()} evaluations each",
            f"FLOPs: {_si(self.flops_per_step)} per network-step, {_si(self.total_flops())} in "
            "all (dense count: an upper bound for pruned levels)",
        ]
        if self.stand_in_data:
            rows.append(
                f"{c.data} is not downloaded yet: planned on random tensors of its shapes and "
                "sizes (the first real run downloads it)"
            )
        if self.done_levels:
            rows.append(f"resumes: {self.done_levels} of {c.levels + 1} levels already done")
        rows.append(
            f"estimated time on {self.device}: {_duration(self.remaining_seconds())} "
            f"({_rate(1 / max(self.seconds_per_network_step, 1e-12))} network-steps/s measured "
            f"in a {CALIBRATION_STEPS[1]}-step calibration)"
        )
        return rows


def plan_search(
    config: Config,
    *,
    template: nn.Module | None = None,
    data: Dataset | None = None,
    calibrate: bool = True,
) -> Plan:
    """The plan of ``config``'s search (``calibrate=False``: no timing, zeros instead)."""
    spec = train_spec(config)  # resolves the device: an unavailable one fails here, in one line
    stand_in_data = data is None and not_downloaded(config.data)
    if stand_in_data:  # plan before downloading: random tensors of the set's shapes and sizes
        data = stand_in(config.data, config.val_fraction)
    data = data or load_dataset(config.data, config.val_fraction, config.seed)
    if template is None:
        template = build_model(config.model, data.input_shape, data.num_classes, seed=0)
    data = place_data(data, getattr(torch, spec.dtype), torch.device(spec.device))
    per_level = [level_size(config, level) for level in range(config.levels + 1)]
    step_flops, eval_flops = _flops(template, data, config.batch_size, spec)
    step_s = eval_s = 0.0
    if calibrate:
        step_s, eval_s = _calibrate(template, data, spec, per_level[min(1, config.levels)], config)
    return Plan(
        config,
        _device_name(torch.device(spec.device)),
        per_level,
        _done_levels(config),
        step_flops,
        eval_flops,
        step_s,
        eval_s,
        stand_in_data,
    )


def _flops(template: nn.Module, data: Dataset, batch: int, spec: TrainSpec) -> tuple[float, float]:
    model = _on(template, spec)
    x = data.x_train[:batch]
    with FlopCounterMode(display=False) as counter:
        loss = nn.functional.cross_entropy(model(x), data.y_train[:batch])
        loss.backward()
    per_step = counter.get_total_flops() * batch / x.shape[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    per_example = counter.get_total_flops() / x.shape[0]
    return float(per_step), float(per_example * (data.x_val.shape[0] + data.x_test.shape[0]))


def _on(template: nn.Module, spec: TrainSpec) -> nn.Module:
    return copy.deepcopy(template).to(torch.device(spec.device), getattr(torch, spec.dtype))


def _calibrate(
    template: nn.Module, data: Dataset, spec: TrainSpec, k: int, config: Config
) -> tuple[float, float]:
    """Seconds per network-step and per network-evaluation, from two short runs of ``k``
    networks trained the way a level trains them (same stacking and lanes)."""
    state = {n: t.detach().clone() for n, t in template.state_dict().items()}
    names = prunable_names(template, config.prune_biases, config.exclude)
    mask = Mask.ones_like({n: state[n] for n in names})
    jobs = [Job(state, mask, data_seed=i) for i in range(k)]
    size = (config.stack_size or None) if config.batch else 1
    # evaluation timed on a slice and scaled: CIFAR's 15,000 held-out images, evaluated four times,
    # would make the calibration cost minutes on a CPU
    held_out = data.x_val.shape[0] + data.x_test.shape[0]
    part = dataclasses.replace(
        data,
        x_val=data.x_val[:EVAL_SLICE],
        y_val=data.y_val[:EVAL_SLICE],
        x_test=data.x_test[:EVAL_SLICE],
        y_test=data.y_test[:EVAL_SLICE],
    )
    scale = held_out / (part.x_val.shape[0] + part.x_test.shape[0])
    times = []
    for n in CALIBRATION_STEPS:
        short = dataclasses.replace(spec, steps=n, eval_every=n, milestones=(), warmup_steps=0)
        _sync(spec)
        started = time.perf_counter()
        train(template, jobs, part, short, stack_size=size)
        _sync(spec)
        times.append(time.perf_counter() - started)
    (n1, n2), (t1, t2) = CALIBRATION_STEPS, times
    per_step = max(t2 - t1, 1e-9) / (n2 - n1)
    per_eval = max(t1 - n1 * per_step, 0.0) / 2  # two evaluations in each run (steps 0 and n)
    return per_step / k, per_eval * scale / k


def _sync(spec: TrainSpec) -> None:
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize()


def _done_levels(config: Config) -> int:
    done = 0
    while done <= config.levels and (Path(config.out) / level_dir(done) / "metrics.json").is_file():
        done += 1
    return done


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.2g}"


def _si(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}FLOP"
    return f"{value:.0f} FLOP"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
