"""Malformed input never crashes the CLI: random TOML files (unknown keys, wrong types, out-of-range
values, garbage bytes) and random argument lists each end in exit code 2, exactly one line on
stderr, nothing on stdout, no traceback, and no file written.

Every generated input carries at least one element that is invalid whatever the rest says (a
"poison"), so none of them can start a training run: an invalid flag value placed last (a later
option overrides an earlier one), or, in a config file, an unknown key, garbage, or a bad value of
a key no flag can override. The rest is random and may or may not be valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile
from pathlib import Path

import tomli_w
import typer.main
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ticketlab.cli import app, main
from ticketlab.io.config import Config

FIND = typer.main.get_command(app).commands["find"]
VALUE_FLAGS = [opt for p in FIND.params if not p.is_flag for opt in p.opts]
BOOL_FLAGS = [opt for p in FIND.params if p.is_flag for opt in p.opts]
KEYS = [f.name for f in dataclasses.fields(Config)]
# keys no flag can set: a bad value here cannot be overridden by a random flag
FLAGLESS = {"momentum", "weight_decay", "gamma"}
assert set(KEYS) >= FLAGLESS and not {f"--{k.replace('_', '-')}" for k in FLAGLESS} & {
    *VALUE_FLAGS,
    *BOOL_FLAGS,
}

# --- random pieces ---------------------------------------------------------------------------

words = st.sampled_from(
    ["", "0", "-1", "1", "1.5", "nan", "inf", "-inf", "1e999", "true", "none", "-", "--",
     "lenet_300_100", "digits", "mnist1d", "adam", "sgd", "layer", "global", "float64",
     "reinit", "random_prune", "rewind", "large_final", "run", "é", "a\nb", "a\x00b"]
)  # fmt: skip
numbers = st.integers(-3, 200).map(str) | st.integers().map(str) | st.floats().map(str)
values = words | numbers | st.text(max_size=12)
FIELD_OF_FLAG = {"--tolerance": "tolerance_pp", "--control": "controls"}
NAMES = {
    "model": ["lenet_300_100", "mnist1d_mlp", "conv2"],
    "data": ["digits", "mnist1d"],
    "optimizer": ["adam", "sgd"],
    "scope": ["layer", "global"],
    "criterion": ["large_final", "magnitude_increase"],
    "reset": ["rewind", "reinit"],
    "dtype": ["float32", "float64"],
    "controls": ["reinit", "random_prune"],
    "exclude": ["1.weight", "fc"],
    "out": ["run", "out/run"],
}


def plausible_values(flag: str) -> st.SearchStrategy[str] | None:
    """Values of the flag's type, mostly in range, so that many inputs reach validation."""
    field = FIELD_OF_FLAG.get(flag, flag[2:].replace("-", "_"))
    kind = {f.name: f.type for f in dataclasses.fields(Config)}.get(field)
    if field in NAMES:
        return st.sampled_from(NAMES[field])
    if kind == "int":
        return st.integers(-2, 60).map(str)
    if kind in ("float", "float | None"):
        return st.floats(-0.5, 2.0).map(repr) | st.sampled_from(["0.1", "0.2", "1e-3"])
    return None


PLAUSIBLE = {flag: plausible_values(flag) for flag in VALUE_FLAGS}
unknown_flags = st.from_regex(r"--[a-z][a-z-]{0,15}", fullmatch=True).filter(
    lambda f: f not in VALUE_FLAGS + BOOL_FLAGS and not f.startswith("--h")
)


def relative(token: str) -> str:
    """Keep any path a token may become inside the test's empty working directory."""
    token = token.replace("..", "__")
    return "rel" + token if token.startswith(("/", "~")) else token


@st.composite
def random_args(draw, flags: list[str]) -> list[str]:
    """Flags with values, some plausible, some not; a quarter of the lists also hold junk
    (unknown flags, stray words, a flag missing its value)."""
    kinds = ["value-flag"] * 4 + ["bool-flag"]
    if draw(st.integers(0, 3)) == 0:
        kinds += ["unknown", "bare", "no-value"]
    args: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(kinds))
        if kind in ("value-flag", "no-value"):
            args.append(draw(st.sampled_from(flags)))
        if kind == "value-flag":
            plausible = PLAUSIBLE.get(args[-1])
            junk = plausible is None or draw(st.integers(0, 4)) == 0
            args.append(draw(values if junk else plausible))
        elif kind == "bool-flag":
            args.append(draw(st.sampled_from(BOOL_FLAGS)))
        elif kind == "unknown":
            args.append(draw(unknown_flags))
        elif kind == "bare":
            args.append(draw(values))
    return [relative(a) for a in args]


# an invalid value for a flag, valid or not whatever comes before it (the last one wins)
poison_flags = st.sampled_from(
    [("--steps", "0"), ("--steps", "-3"), ("--levels", "-1"), ("--replicates", "0"),
     ("--batch-size", "0"), ("--eval-every", "0"), ("--checkpoint-every", "0"),
     ("--fc-rate", "1.5"), ("--fc-rate", "0"), ("--conv-rate", "nan"), ("--output-rate", "1"),
     ("--lr", "0"), ("--lr", "inf"), ("--lr", "-1e-3"), ("--val-fraction", "1"),
     ("--tolerance", "-1"), ("--tolerance", "inf"), ("--rewind-step", "-1"),
     ("--stack-size", "-1"), ("--optimizer", "rmsprop"), ("--scope", "net"),
     ("--dtype", "float16"), ("--criterion", "biggest"), ("--reset", "nope"),
     ("--model", "resnet9000"), ("--data", "imagenet"), ("--out", ""), ("--out", "r\x00n"),
     ("--levels", "ten"), ("--lr", "fast"), ("--seed", "1.5"), ("--bogus-flag",)]
).map(list)  # fmt: skip
poison_flags = poison_flags | st.tuples(st.sampled_from(["--model", "--data"]), values).filter(
    lambda mv: (
        mv[1] not in ("lenet_300_100", "mnist1d_mlp", "conv2", "conv4", "conv6")
        and mv[1] not in ("digits", "mnist1d", "mnist5k")
        and not mv[1].startswith("custom")
    )
).map(list)

toml_scalars = (
    st.text(max_size=10)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.datetimes()
    | st.dates()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
unknown_keys = st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda k: k not in KEYS)
bad_flagless = st.sampled_from(
    [("momentum", 1.5), ("momentum", -0.1), ("momentum", "high"), ("momentum", math.nan),
     ("gamma", 0.0), ("gamma", -1), ("gamma", math.inf), ("weight_decay", -1e-4),
     ("weight_decay", [1]), ("gamma", "low"), ("gamma", [0.1]), ("momentum", True)]
)  # fmt: skip


@st.composite
def toml_files(draw) -> bytes:
    """A config file that is certainly invalid: garbage, or a table with a poisoned entry."""
    kind = draw(st.sampled_from(["table", "table", "table", "binary", "broken", "deep"]))
    if kind == "binary":
        return b"\xff" + draw(st.binary(max_size=40))  # not UTF-8
    if kind == "broken":
        return (draw(st.text(max_size=40)) + "\n= [ broken\n").encode()
    if kind == "deep":  # tomllib recurses per nesting level
        depth = draw(st.integers(1, 5000))
        return f"nested = {'[' * depth}1{']' * depth}\n".encode()
    table = draw(st.dictionaries(st.sampled_from(KEYS) | unknown_keys, toml_values, max_size=6))
    if draw(st.booleans()):
        table[draw(unknown_keys)] = draw(toml_values)
    else:
        key, value = draw(bad_flagless)
        table[key] = value
    return tomli_w.dumps(table).encode()


@st.composite
def invalid_invocations(draw) -> tuple[list[str], bytes | None]:
    """(arguments after ``find``, config file content or None)."""
    if draw(st.booleans()):
        content = draw(toml_files())
        args = draw(random_args([f for f in VALUE_FLAGS if f != "--config"]))
        return ["--config", "CONFIG", *args], content
    return [*draw(random_args(VALUE_FLAGS)), *draw(poison_flags)], None


# --- the property --------------------------------------------------------------------------------


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(invocation=invalid_invocations())
@example(invocation=(["--config", "CONFIG"], b"a = " + b"[" * 5000 + b"1" + b"]" * 5000))
@example(invocation=(["--config", "no\nsuch.toml"], None))
@example(invocation=(["--config", "CONFIG"], b"gamma = inf\n"))
@example(invocation=(["--out", "r\x00n"], None))
@example(invocation=(["--lr", "inf"], None))
@example(invocation=(["--bo\ngus"], None))
def test_invalid_input_is_one_line_exit_2_nothing_written(invocation):
    args, content = invocation
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        cwd, inputs = Path(tmp, "cwd"), Path(tmp, "inputs")
        cwd.mkdir()
        inputs.mkdir()
        if content is not None:
            (inputs / "run.toml").write_bytes(content)
        argv = ["find", *[str(inputs / "run.toml") if a == "CONFIG" else a for a in args]]
        os.chdir(cwd)
        try:
            code, out, err = call([*argv[:1], "--out", "run", *argv[1:]])
        finally:
            os.chdir(previous)
        assert code == 2, (argv, err)
        assert out == "", out
        assert err.startswith("error: ") and err.endswith("\n"), err
        assert err.count("\n") == 1, err
        assert "Traceback" not in err
        assert list(cwd.iterdir()) == [], "something was written"
        assert sorted(p.name for p in inputs.iterdir()) == (["run.toml"] if content else [])
