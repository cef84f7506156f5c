"""Data-set variants: a base data set with options, named ``BASE:OPTION,OPTION,...``.

Transfer experiments need targets that differ from the source task in one controlled way, and they
must exist offline. A variant is a pure function of its name: the same name always gives the same
tensors, and it goes through the base sets' seeded validation split, so it is usable wherever a
data set name is (``find --data``, ``compare --data``, ``transfer --to``). Options, applied in
this order:

``seed=N``, ``scale_coeff=0.6``, ... (``mnist1d`` only)
    regenerate MNIST-1D with any argument of the ``mnist1d`` package's ``get_dataset_args``
    (e.g. another ``seed``: a fresh data set of the same kind).
``0-4`` or ``classes=0-4`` (ranges and single classes joined by ``+``: ``0-2+7+9``)
    keep only those classes, train and test, relabelled ``0..k-1`` in increasing order, so
    ``mnist5k:0-4`` and ``mnist5k:5-9`` both have a 5-way output layer of the same shape.
``size=H`` or ``size=HxW`` (image sets)
    resize every image to ``H x W`` (bilinear with antialiasing), e.g. ``digits:size=28`` to
    share LeNet's input with ``mnist5k``, or ``mnist5k:size=8`` the other way round.
``permute=N``
    permute the input positions (the features of a 1-D set, the pixels of an image, the same for
    every channel) by one fixed permutation drawn from seed ``N``.

An unknown base, option or value is a ``TicketlabError`` (one line, exit 2 from the CLI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import TicketlabError

RawSplit = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

SYNTAX = (
    "BASE[:OPTION,...] with options 0-4 / classes=0-4 (class subset, relabelled 0..k-1), "
    "size=H or HxW (resize images), permute=N (fixed permutation of input positions), and for "
    "mnist1d any mnist1d generation argument (seed=N, scale_coeff=..., ...)"
)
# mnist1d's own arguments that are not generation parameters (or not expressible as one value)
_MNIST1D_SKIP = ("url", "padding")


@dataclass(frozen=True)
class Variant:
    """A parsed variant name; ``classes`` None keeps every class."""

    base: str
    generation: dict[str, int | float | bool] = field(default_factory=dict)
    classes: tuple[int, ...] | None = None
    size: tuple[int, int] | None = None
    permute: int | None = None


def mnist1d_defaults() -> dict[str, object]:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    values = args.__dict__ if hasattr(args, "__dict__") else dict(args)
    return {k: v for k, v in values.items() if k not in _MNIST1D_SKIP}


def _int(text: str, what: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        message = f"data set {name!r}: {what} must be an integer, got {text!r}"
        raise TicketlabError(message) from None


def _classes(text: str, name: str) -> tuple[int, ...]:
    chosen: set[int] = set()
    for part in text.split("+"):
        low, dash, high = part.partition("-")
        a = _int(low, "a class", name)
        b = _int(high, "a class", name) if dash else a
        if a < 0 or b < a:
            raise TicketlabError(f"data set {name!r}: bad class range {part!r}")
        chosen.update(range(a, b + 1))
    return tuple(sorted(chosen))


def _size(text: str, name: str) -> tuple[int, int]:
    h, x, w = text.lower().partition("x")
    size = (_int(h, "size", name), _int(w, "size", name) if x else _int(h, "size", name))
    if min(size) < 1:
        raise TicketlabError(f"data set {name!r}: size must be positive, got {text!r}")
    return size


def _generation_value(key: str, text: str, default: object, name: str) -> int | float | bool:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise TicketlabError(f"data set {name!r}: {key} must be true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, int):
        return _int(text, key, name)
    try:
        value = float(text)
    except ValueError:
        raise TicketlabError(f"data set {name!r}: {key} must be a number, got {text!r}") from None
    if not np.isfinite(value):
        raise TicketlabError(f"data set {name!r}: {key} must be finite, got {text!r}")
    return value


def parse_variant(name: str, known: Callable[[str], bool]) -> Variant:
    """``name`` -> Variant, checking every option (no data is loaded). ``known``: is a base name
    registered."""
    base, colon, options = name.partition(":")
    if not known(base):
        raise TicketlabError(f"unknown data set {base!r}")
    if not colon:
        return Variant(base)
    if not options:
        raise TicketlabError(f"data set {name!r}: nothing after ':'; syntax: {SYNTAX}")
    generation: dict[str, int | float | bool] = {}
    classes = size = permute = None
    defaults = mnist1d_defaults() if base == "mnist1d" else {}
    for option in options.split(","):
        key, eq, value = option.strip().partition("=")
        if not eq:
            key, value = "classes", key
        if key == "classes":
            classes = _classes(value, name)
        elif key == "size":
            size = _size(value, name)
        elif key == "permute":
            permute = _int(value, "permute", name)
        elif key in defaults:
            generation[key] = _generation_value(key, value, defaults[key], name)
        else:
            extra = f" (mnist1d arguments: {', '.join(defaults)})" if defaults else ""
            raise TicketlabError(f"data set {name!r}: unknown option {option!r}{extra}")
    return Variant(base, generation, classes, size, permute)


def mnist1d_generated(overrides: dict[str, int | float | bool]) -> RawSplit:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for key, value in overrides.items():
        setattr(args, key, value)
    try:
        data = make_dataset(args)
    except Exception as exc:  # the package validates nothing; a bad argument fails anywhere
        raise TicketlabError(f"mnist1d cannot generate with {overrides}: {exc}") from None
    return data["x"], data["y"], data["x_test"], data["y_test"]


def apply_variant(v: Variant, raw: RawSplit, name: str) -> RawSplit:
    """Class subset, resize, permutation, in that order, on the base set's arrays."""
    x, y, x_test, y_test = raw
    if v.classes is not None:
        present = set(np.unique(y).tolist())
        missing = [c for c in v.classes if c not in present]
        if missing:
            raise TicketlabError(f"data set {name!r}: no class {missing[0]} in {v.base}")
        relabel = {c: i for i, c in enumerate(v.classes)}
        keep, keep_test = np.isin(y, v.classes), np.isin(y_test, v.classes)
        x, x_test = x[keep], x_test[keep_test]
        y = np.array([relabel[int(c)] for c in y[keep]], dtype=np.int64)
        y_test = np.array([relabel[int(c)] for c in y_test[keep_test]], dtype=np.int64)
    if v.size is not None:
        if x.ndim != 4:
            raise TicketlabError(
                f"data set {name!r}: size= needs images (channels, height, width); "
                f"{v.base} has inputs of shape {tuple(x.shape[1:])}"
            )
        x, x_test = _resize(x, v.size), _resize(x_test, v.size)
    if v.permute is not None:
        positions = int(np.prod(x.shape[2:] if x.ndim == 4 else x.shape[1:]))
        order = np.random.default_rng(v.permute).permutation(positions)
        x, x_test = _permute(x, order), _permute(x_test, order)
    return x, y, x_test, y_test


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    out = torch.nn.functional.interpolate(
        t, size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out.numpy()


def _permute(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # the same pixel permutation in every channel
        n, c, h, w = x.shape
        return x.reshape(n, c, h * w)[:, :, order].reshape(n, c, h, w)
    flat = x.reshape(len(x), -1)[:, order]
    return flat.reshape(x.shape)
