"""The experiment's settings: defaults, then the model's paper preset, then a TOML file, then flags.

The resolved config is saved in the run folder; its hash (of the fields that change results) tells
whether a folder holds the same experiment, so rerunning a command resumes instead of mixing runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..backends import get_backend
from ..core.criteria import CRITERIA
from ..core.resets import RESETS
from ..errors import TicketlabError
from ..train.augment import AUGMENTATIONS

CONTROLS = ("reinit", "random_prune")
RETRAIN = ("rewind", "lr_rewind", "finetune")


@dataclass(frozen=True)
class Config:
    """Every setting of a ticket search. Fields after ``out`` do not change results."""

    model: str = "mnist1d_mlp"
    data: str = "mnist1d"
    levels: int = 10
    replicates: int = 2
    seed: int = 0
    # training (Frankle & Carbin Fig. 2 values come from the model presets below)
    steps: int = 1500
    batch_size: int = 100
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_steps: int = 0
    eval_every: int = 100
    val_fraction: float = 0.1
    dtype: str = "float32"
    augment: str = "none"  # none, crop, flip or crop_flip (4-pixel crops, left-right flips)
    # pruning
    fc_rate: float = 0.2
    conv_rate: float = 0.1
    output_rate: float | None = None  # default: half the fc rate, as in the paper
    scope: str = "layer"
    exclude: list[str] = field(default_factory=list)
    prune_biases: bool = False
    criterion: str = "large_final"
    reset: str = "rewind"
    rewind_step: int = 0
    # retraining after pruning (Renda et al.): rewind | lr_rewind | finetune, budget t in steps
    retrain: str = "rewind"
    retrain_steps: int = 0  # t; 0 = T - rewind_step (the budget of rewinding)
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    tolerance_pp: float = 0.5
    # where and how it runs (not part of the experiment's identity)
    out: str = "runs/latest"
    stack_size: int = 0  # 0 = automatic
    batch: bool = True
    checkpoint_every: int = 250
    tensorboard: bool = False
    report: bool = True
    backend: str = "local"  # or "ray": stacks as tasks on a Ray cluster (same bits)
    address: str = ""  # the Ray cluster's address ("" = start or join one on this machine)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the results."""
        runtime = {"out", "stack_size", "batch", "checkpoint_every", "tensorboard", "report"}
        runtime |= {"backend", "address"}
        identity = {k: v for k, v in dataclasses.asdict(self).items() if k not in runtime}
        if self.augment == "none":  # absent before augmentation existed: old folders still resume
            del identity["augment"]
        if self.rewind_step:
            # Pruned levels train from step k to T with the schedule at step k (late rewinding);
            # folders written when they restarted the schedule at 0 must not resume as this.
            identity["late_rewinding"] = 1
        if self.retrain == "rewind" and not self.retrain_steps:
            # the default: folders written before the retraining modes existed keep their hash
            del identity["retrain"], identity["retrain_steps"]
        return identity

    def retrain_budget(self) -> int:
        """t: the steps a pruned level trains under ``lr_rewind`` and ``finetune``."""
        return self.retrain_steps or self.steps - self.rewind_step

    def hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def output_layer_rate(self) -> float:
        return self.fc_rate / 2 if self.output_rate is None else self.output_rate

    def to_toml_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_CIFAR_RECIPE: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "batch_size": 128,
    "steps": "160ep",
    "milestones": ["80ep", "120ep"],
    "gamma": 0.1,
    "eval_every": "1ep",
    "scope": "global",
    "conv_rate": 0.2,
    "fc_rate": 0.2,
    "exclude": ["fc"],
    "augment": "crop_flip",
}

# The LTH paper's hyperparameters per network (REFERENCE.md; Frankle & Carbin Fig. 2), and the
# MNIST-1D notebook's for its MLP. Kept here, not in models.py: models know nothing of experiments.
PRESETS: dict[str, dict[str, Any]] = {
    "lenet_300_100": {"optimizer": "adam", "lr": 1.2e-3, "batch_size": 60, "steps": 50_000},
    "conv2": {"optimizer": "adam", "lr": 2e-4, "batch_size": 60, "steps": 20_000, "conv_rate": 0.1},
    "conv4": {"optimizer": "adam", "lr": 3e-4, "batch_size": 60, "steps": 25_000, "conv_rate": 0.1},
    "conv6": {
        "optimizer": "adam",
        "lr": 3e-4,
        "batch_size": 60,
        "steps": 30_000,
        "conv_rate": 0.15,
    },
    # The notebook's Adam 2e-2 flips the signs of ~44% of the weights in training, which erases the
    # init-dependence that tickets rely on (criteria and resets then make no difference); at 2e-3
    # the dense net trains better and the paper's effects appear (README, "Deconstructing").
    "mnist1d_mlp": {"optimizer": "adam", "lr": 2e-3, "batch_size": 100, "steps": 1500},
    # The deep CIFAR networks of the rewinding follow-ups (Frankle et al. 2020, arXiv 1912.05671;
    # Renda et al. 2020, arXiv 2003.02389) with OpenLTH's defaults (models/cifar_resnet.py and
    # cifar_vgg.py, default_hparams): SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128,
    # 160 epochs with x0.1 drops at epochs 80 and 120, global magnitude pruning 20% per level,
    # and the standard CIFAR augmentation (4-pixel crops, flips). Counts in epochs are turned
    # into steps once the training-set size is known (CIFAR-10 with 10% held out: 351 a epoch).
    # The output layer ``fc`` is left out of pruning, as OpenLTH's VGG preset does (its ResNet-20
    # preset prunes the 640 fc weights too: 0.2% of the network, no measurable difference).
    "resnet20": {**_CIFAR_RECIPE},
    "vgg16": {**_CIFAR_RECIPE},
    # The CIFAR ResNet-18 (11.2M) has no preset in the anchors: the same OpenLTH CIFAR recipe.
    # (Frankle & Carbin's "Resnet-18" is the 20-layer network above: 16/32/64 channels, 274K.)
    "resnet18": {**_CIFAR_RECIPE},
}

_FIELD_TYPES = {f.name: f.type for f in fields(Config)}

# Iteration counts that may be given in epochs, as "160ep" (or in steps, as 62400 or "62400it").
STEP_FIELDS = ("steps", "milestones", "warmup_steps", "eval_every", "rewind_step", "retrain_steps")
_COUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ep|it)\s*$")


def _is_count(value: Any) -> bool:
    return isinstance(value, str) and _COUNT.match(value) is not None


def _check_type(key: str, value: Any) -> Any:
    kind = _FIELD_TYPES[key]
    if key in STEP_FIELDS:
        counts = value if kind == "list[int]" and isinstance(value, list) else [value]
        if any(_is_count(v) for v in counts) and all(
            _is_count(v) or (isinstance(v, int) and not isinstance(v, bool)) for v in counts
        ):
            return value  # converted to steps in ``resolve`` once the data set is known
        if any(isinstance(v, str) for v in counts):
            raise TicketlabError(
                f"config key {key!r} takes steps (an integer or '<n>it') or epochs ('<n>ep'), "
                f"got {value!r}"
            )
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "float | None": value is None
        or (isinstance(value, int | float) and not isinstance(value, bool)),
        "list[int]": isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise TicketlabError(f"config key {key!r} must be {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def resolve(overrides: dict[str, Any]) -> Config:
    """Defaults < model preset < ``overrides`` (from TOML and flags); validated."""
    unknown = sorted(set(overrides) - set(_FIELD_TYPES))
    if unknown:
        raise TicketlabError(
            f"unknown config key {unknown[0]!r}; known keys: {', '.join(_FIELD_TYPES)}"
        )
    checked = {k: _check_type(k, v) for k, v in overrides.items()}
    model = checked.get("model", Config.model)
    merged = {**PRESETS.get(model.partition(":")[0], {}), **checked}
    merged = _counts_in_steps(merged)
    config = Config(**merged)
    validate(config)
    return config


def _counts_in_steps(settings: dict[str, Any]) -> dict[str, Any]:
    """Iteration counts given in epochs ('160ep') or as '<n>it' -> steps.

    An epoch is ``training examples // batch_size`` steps: the trainer's own epoch (a network
    sees each training example at most once per epoch, the last partial batch is dropped).
    Counts in epochs are rounded to the nearest step.
    """
    if not any(_is_count(v) for k in STEP_FIELDS for v in _as_list(settings.get(k))):
        return settings
    out = dict(settings)
    per_epoch: int | None = None
    for key in STEP_FIELDS:
        values = _as_list(settings.get(key))
        if not any(_is_count(v) for v in values):
            continue
        converted = []
        for v in values:
            if not _is_count(v):
                converted.append(v)
                continue
            number, unit = _COUNT.match(v).groups()  # type: ignore[union-attr]
            if unit == "it":
                if float(number) != int(float(number)):
                    raise TicketlabError(f"{key}: a step count must be whole, got {v!r}")
                converted.append(int(float(number)))
                continue
            if per_epoch is None:
                per_epoch = _steps_per_epoch(settings)
            converted.append(int(round(float(number) * per_epoch)))
        out[key] = converted if isinstance(settings[key], list) else converted[0]
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _steps_per_epoch(settings: dict[str, Any]) -> int:
    from ..zoo.data import training_examples

    data = settings.get("data", Config.data)
    if data == "custom":
        raise TicketlabError("counts in epochs need a registered data set; give them in steps")
    val_fraction = settings.get("val_fraction", Config.val_fraction)
    if not 0 < val_fraction < 1:
        raise TicketlabError(f"val_fraction must be in (0, 1), got {val_fraction}")
    batch = settings.get("batch_size", Config.batch_size)
    if batch < 1:
        raise TicketlabError(f"batch_size must be >= 1, got {batch}")
    n = training_examples(data, val_fraction, settings.get("seed", Config.seed))
    return max(1, n // batch)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise TicketlabError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise TicketlabError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise TicketlabError(f"cannot read config file {path}: {exc}") from None
    except RecursionError:  # tomllib recurses once per nesting level of arrays and tables
        raise TicketlabError(f"config file {path} is not valid TOML: nested too deeply") from None
    return table


def validate(c: Config) -> None:
    from ..zoo.data import DATASETS
    from ..zoo.models import MODELS, is_known_model

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise TicketlabError(message)

    for f in fields(c):  # inf passes every range check below (lr = inf would train to NaN)
        value = getattr(c, f.name)
        if isinstance(value, float):
            need(math.isfinite(value), f"{f.name} must be a finite number, got {value}")

    # "custom" names come from the Python API, which brings its own module and tensors
    known_model = is_known_model(c.model) or c.model.startswith("custom:")
    need(known_model, f"unknown model {c.model!r}; known models: {', '.join(MODELS)}")
    known_data = c.data in DATASETS or c.data == "custom"
    need(known_data, f"unknown data set {c.data!r}; known: {', '.join(DATASETS)}")
    need(c.levels >= 0, f"levels must be >= 0, got {c.levels}")
    need(c.replicates >= 1, f"replicates must be >= 1, got {c.replicates}")
    need(c.steps >= 1, f"steps must be >= 1, got {c.steps}")
    need(c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}")
    need(c.optimizer in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd', got {c.optimizer!r}")
    need(c.lr > 0, f"lr must be > 0, got {c.lr}")
    need(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}")
    need(0 <= c.momentum < 1, f"momentum must be in [0, 1), got {c.momentum}")
    need(c.gamma > 0, f"gamma must be > 0, got {c.gamma}")
    need(c.warmup_steps >= 0, f"warmup_steps must be >= 0, got {c.warmup_steps}")
    need(c.eval_every >= 1, f"eval_every must be >= 1, got {c.eval_every}")
    for m in c.milestones:
        need(0 < m <= c.steps, f"milestones must be in (0, steps={c.steps}], got {m}")
    need(c.augment in AUGMENTATIONS, f"augment must be one of {', '.join(AUGMENTATIONS)}")
    need(0 < c.val_fraction < 1, f"val_fraction must be in (0, 1), got {c.val_fraction}")
    need(c.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {c.dtype!r}")
    for key in ("fc_rate", "conv_rate"):
        rate = getattr(c, key)
        need(0 < rate < 1, f"{key} must be in (0, 1), got {rate}")
    need(
        0 < c.output_layer_rate() < 1,
        f"output_rate must be in (0, 1), got {c.output_layer_rate()}",
    )
    need(c.scope in ("layer", "global"), f"scope must be 'layer' or 'global', got {c.scope!r}")
    need(
        c.criterion in CRITERIA, f"unknown criterion {c.criterion!r}; known: {', '.join(CRITERIA)}"
    )
    need(c.reset in RESETS, f"unknown reset {c.reset!r}; known: {', '.join(RESETS)}")
    need(0 <= c.rewind_step < c.steps, f"rewind_step must be in [0, steps), got {c.rewind_step}")
    need(
        c.retrain in RETRAIN,
        f"retrain must be one of {', '.join(RETRAIN)}, got {c.retrain!r}",
    )
    need(
        0 <= c.retrain_steps <= c.steps,
        f"retrain_steps must be in [0, steps] (0 = steps - rewind_step), got {c.retrain_steps}",
    )
    for control in c.controls:
        need(control in CONTROLS, f"unknown control {control!r}; known: {', '.join(CONTROLS)}")
    need(c.tolerance_pp >= 0, f"tolerance_pp must be >= 0, got {c.tolerance_pp}")
    need(c.stack_size >= 0, f"stack_size must be >= 0, got {c.stack_size}")
    need(c.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {c.checkpoint_every}")
    get_backend(c.backend, c.address)  # unknown, or Ray not installed: one line before any work
    need(bool(c.out) and "\0" not in c.out, f"out must be a folder path, got {c.out!r}")
