"""The run folder's integrity: damaged or foreign files are refused with one line naming the file
and what is wrong; a damaged mid-level checkpoint is discarded and its level retrained to the same
bits; writes are atomic; training state round-trips without pickle.

Design decision (checkpoints vs results). A completed level's files (masks, ticket_final, metrics,
the rewind point) are results: a damaged one stops the run (exit 2, one line) and nothing is
deleted, because they cannot be told apart from good data by anything but their checksum and the
user may want to inspect or restore them. A mid-level checkpoint is only a cache: its level is a
deterministic function of files already verified, so one that fails verification (flipped bytes,
truncated, foreign) is reported in one warning line, deleted, and the level trains from its start,
ending bit-identical to an uninterrupted run. Never silently used either way.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ticketlab import api
from ticketlab.api import run_search
from ticketlab.cli import main
from ticketlab.errors import RunWriteError, TicketlabError
from ticketlab.io.config import resolve
from ticketlab.io.store import TMP_PREFIX, RunStore, atomic_write_bytes, read_checked_tensors
from ticketlab.studies.imp import StoreCheckpointer

SETTINGS = {
    "model": "lenet_300_100",
    "data": "digits",
    "levels": 1,
    "replicates": 2,
    "steps": 20,
    "batch_size": 32,
    "eval_every": 10,
    "checkpoint_every": 5,
    "report": False,
}
ARGS = [
    a for k, v in SETTINGS.items() if k != "report" for a in (f"--{k.replace('_', '-')}", str(v))
]
ARGS.append("--no-report")
HASH = resolve(SETTINGS).hash()

RESULT_FILES = [
    "rewind.safetensors",
    "levels/level_00/masks.safetensors",
    "levels/level_00/ticket_final.safetensors",
    "levels/level_00/metrics.json",
    "levels/level_01/masks.safetensors",
    "levels/level_01/ticket_final.safetensors",
    "levels/level_01/metrics.json",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One finished run, the same run interrupted mid-level 1 (after two checkpoints), and a run
    of another experiment (another seed)."""
    base = tmp_path_factory.mktemp("runs")
    finished = run_search(resolve({**SETTINGS, "out": str(base / "finished")})).run_dir
    level0 = SETTINGS["replicates"] * SETTINGS["steps"]
    stop_at = level0 + 3 * SETTINGS["replicates"] * 12  # about step 12 of level 1's 20
    real_run_imp = api.run_imp

    def interrupted(setup, progress):
        done = [0]

        def counting(n):
            done[0] += n
            if done[0] >= stop_at:
                raise KeyboardInterrupt

        return real_run_imp(setup, counting)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(api, "run_imp", interrupted)
        run_search(resolve({**SETTINGS, "out": str(base / "interrupted")}))
    other = {**SETTINGS, "seed": 1, "levels": 0, "out": str(base / "other")}
    foreign = run_search(resolve(other)).run_dir
    return {"finished": finished, "interrupted": base / "interrupted", "foreign": foreign}


def copy_run(runs, name: str, dest: Path) -> Path:
    return Path(shutil.copytree(runs[name], dest / name))


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def results_of(root: Path) -> dict[str, object]:
    """Every result file's content (JSON parsed, tensors as bytes: header key order may vary)."""
    out: dict[str, object] = {}
    for rel in [*RESULT_FILES, "summary.json"]:
        p = root / rel
        if p.suffix == ".json":
            out[rel] = json.loads(p.read_text())
        else:
            tensors, meta = read_checked_tensors(p)
            out[rel] = (
                {k: (t.dtype, t.shape, t.numpy().tobytes()) for k, t in tensors.items()},
                meta,
            )
    return out


def flip(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF  # never maps a byte to itself, nor ASCII to ASCII
    path.write_bytes(bytes(raw))


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def find(capsys, root: Path) -> tuple[int, str, str]:
    code = main(["find", *ARGS, "--out", str(root)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *phrases: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


# --- completed levels: a damaged or foreign file stops the run, and nothing is touched ----------


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("rel", RESULT_FILES)
def test_damaged_result_file_stops_the_rerun(runs, tmp_path, capsys, rel, damage):
    root = copy_run(runs, "finished", tmp_path)
    target = root / rel
    size = target.stat().st_size
    if damage == "flip":
        flip(target, size - 3)  # tensor data, or the JSON's tail
    else:
        truncate(target, size // 2)
    before = files_of(root)
    code, out, err = find(capsys, root)
    assert code == 2
    assert_one_error_line(err, str(target), "corrupted")
    assert files_of(root) == before  # refused before writing anything


@pytest.mark.parametrize("rel", [*RESULT_FILES, "run.json", "summary.json"])
def test_any_flipped_byte_or_truncation_is_detected_on_read(runs, tmp_path, rel):
    """Flip each of ~50 bytes (the safetensors header length, header, data, last byte) and cut
    the file at ~12 lengths: every read fails with the file's name and "corrupted"."""
    root = copy_run(runs, "finished", tmp_path)
    store = RunStore(root, HASH)
    target = root / rel
    original = target.read_bytes()
    rng = random.Random(rel)
    n = len(original)
    header_end = 8 + int.from_bytes(original[:8], "little") if rel.endswith(".safetensors") else n
    flips = sorted({*range(8), *rng.sample(range(n), 40), header_end - 1, n // 2, n - 1})
    cuts = sorted({0, 1, 7, 8, 9, header_end - 1, header_end, n // 3, n // 2, n - 2, n - 1} - {n})
    read = store.read_json if rel.endswith(".json") else store.read_tensors
    read(rel)  # intact: fine
    for damage, positions in (("flip", flips), ("cut", cuts)):
        for position in positions:
            target.write_bytes(original)
            if damage == "flip":
                flip(target, position)
            else:
                truncate(target, position)
            with pytest.raises(TicketlabError) as info:
                read(rel)
            message = str(info.value)
            assert str(target) in message and "corrupted" in message, (damage, position, message)
            assert "\n" not in message


@pytest.mark.parametrize(
    "rel",
    [
        "levels/level_00/metrics.json",
        "levels/level_00/ticket_final.safetensors",
        "rewind.safetensors",
    ],
)
def test_file_of_another_experiment_is_refused(runs, tmp_path, capsys, rel):
    """A whole, valid file copied in from a run with another seed: its config hash gives it away."""
    root = copy_run(runs, "finished", tmp_path)
    shutil.copyfile(runs["foreign"] / rel, root / rel)
    before = files_of(root)
    code, _, err = find(capsys, root)
    assert code == 2
    assert_one_error_line(err, str(root / rel), "belongs to another experiment")
    assert files_of(root) == before


def test_damaged_config_toml_is_refused(runs, tmp_path, capsys):
    root = copy_run(runs, "finished", tmp_path)
    (root / "config.toml").write_bytes(b"\xff\xfe garbage = [")
    code, _, err = find(capsys, root)
    assert code == 2
    assert_one_error_line(err, str(root / "config.toml"), "not a usable run config")


# --- mid-level checkpoints: discarded with one warning, the level retrained to the same bits ----


def checkpoints_of(root: Path) -> list[Path]:
    """Level 1's checkpoints, one per stack of networks trained together."""
    paths = sorted(root.glob("levels/level_01/checkpoint_*.safetensors"))
    assert paths, "the interrupted run left no checkpoint"
    return paths


def test_intact_checkpoint_is_used(runs):
    root = runs["interrupted"]
    for path in checkpoints_of(root):
        warnings: list[str] = []
        rel = str(path.relative_to(root))
        state = StoreCheckpointer(RunStore(root, HASH), rel, 5, warnings.append).load()
        assert state is not None and warnings == []
        assert state["step"] > 0 and state["step"] % SETTINGS["checkpoint_every"] == 0


def restamped(path: Path, root: Path) -> None:
    """The same checkpoint, whole and checksummed, but written by another experiment."""
    rel = str(path.relative_to(root))
    state = RunStore(root, HASH).read_state(rel)
    RunStore(root, "0123456789abcdef").write_state(rel, state)


DAMAGES = {
    "flipped-data": (lambda p, root: flip(p, p.stat().st_size - 5), "checksum mismatch"),
    "flipped-header": (lambda p, root: flip(p, 20), "corrupted"),
    "truncated": (lambda p, root: truncate(p, p.stat().st_size // 2), "corrupted"),
    "empty": (lambda p, root: truncate(p, 0), "corrupted"),
    "foreign": (restamped, "belongs to another experiment"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_checkpoint_failing_verification_is_reported_and_discarded(runs, tmp_path, damage):
    root = copy_run(runs, "interrupted", tmp_path)
    path = checkpoints_of(root)[0]
    apply, reason = DAMAGES[damage]
    apply(path, root)
    warnings: list[str] = []
    checkpointer = StoreCheckpointer(
        RunStore(root, HASH), str(path.relative_to(root)), 5, warnings.append
    )
    assert checkpointer.load() is None
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(path) in warnings[0] and reason in warnings[0] and "discarding it" in warnings[0]
    assert not path.exists()


def test_damaged_checkpoint_costs_a_retrain_not_the_result(runs, tmp_path, capsys, monkeypatch):
    """End to end through the CLI: one warning line, exit 0, results equal to an uninterrupted
    run's, and nothing unpickled on the way."""
    root = copy_run(runs, "interrupted", tmp_path)
    path = checkpoints_of(root)[0]
    flip(path, path.stat().st_size - 5)

    def no_pickle(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, no_pickle)
    # process lanes hand their results to the parent pickled over a pipe (bytes the run made, not
    # the file's); thread lanes read the checkpoint through the same code, with nothing in between
    monkeypatch.setenv("TICKETLAB_LANES", "threads")
    code, _, err = find(capsys, root)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith("warning: ") and str(path) in warnings[0]
    assert "corrupted" in warnings[0] and "retraining" in warnings[0]
    assert "Traceback" not in err
    assert results_of(root) == results_of(runs["finished"])
    assert not list(root.rglob("checkpoint_*")) and not list(root.rglob(TMP_PREFIX + "*"))


# --- atomic writes ------------------------------------------------------------------------------


@pytest.mark.parametrize("fails", ["replace", "fsync", "write"])
@pytest.mark.parametrize("existed", [False, True])
def test_failed_write_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch, fails, existed):
    target = tmp_path / "sub" / "metrics.json"
    if existed:
        atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fails == "write":  # the payload is consumed, then the disk fills up mid-write
        real_fdopen = os.fdopen

        class Half:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                self.fh.flush()
                boom()

            def __getattr__(self, name):
                return getattr(self.fh, name)

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: Half(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(os, fails, boom)
    with pytest.raises(RunWriteError, match="No space") as err:  # one line naming the file
        atomic_write_bytes(target, b"new payload" * 1000)
    assert str(target) in str(err.value) and "\n" not in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in target.parent.iterdir()) == (["metrics.json"] if existed else [])
    if existed:
        assert target.read_bytes() == b"old"


def test_store_writes_are_whole_files_with_no_temp_left(tmp_path):
    store = RunStore(tmp_path, HASH)
    store.write_json("a/m.json", {"x": [1, 2.5, None]})
    store.write_tensors("a/t.safetensors", {"w": torch.arange(6.0).view(2, 3)}, {"k": 1})
    assert store.read_json("a/m.json") == {"x": [1, 2.5, None]}
    tensors, meta = store.read_tensors("a/t.safetensors")
    assert torch.equal(tensors["w"], torch.arange(6.0).view(2, 3)) and meta == {"k": 1}
    assert store.leftover_temp_files() == []
    for p in (tmp_path / "a").iterdir():
        assert p.stat().st_mode & 0o777 == 0o644


# --- training state round-trips through safetensors + JSON ---------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.uint8, torch.bool]  # fmt: skip


def make_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (math.prod(shape),), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        return (t % 2).bool().view(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).view(shape)  # any bit pattern: NaNs, infinities, subnormals


tensors = st.builds(
    make_tensor,
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 3), max_size=3),
    st.integers(0, 2**31),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
keys = st.text(max_size=6) | st.integers(-3, 3)
states = st.recursive(
    scalars | tensors,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=12,
)


def same(a, b) -> bool:
    """Exact equality: type, tensor dtype/shape/bits, float bits (NaN, -0.0), dict keys' types."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist()
        )
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@settings(max_examples=120, deadline=None)
@given(state=states)
def test_write_state_read_state_round_trip(state):
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp), HASH)
        store.write_state("state.safetensors", state)
        assert same(store.read_state("state.safetensors"), state)


def test_round_trip_of_a_real_training_checkpoint(tmp_path):
    """An Adam state dict (int keys, tuples -> lists, scalar tensors) restores an optimizer."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.Adam(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "x": None}
    store = RunStore(tmp_path, HASH)
    store.write_state("ckpt.safetensors", state)
    back = store.read_state("ckpt.safetensors")
    assert back["step"] == 7 and back["x"] is None and torch.equal(back["rng"], state["rng"])
    fresh = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    for i in (0, 1):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(
                fresh.state_dict()["state"][i][key], opt.state_dict()["state"][i][key]
            )
    assert back["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]  # tuples come back lists


def test_write_state_with_shared_and_viewed_tensors(tmp_path):
    """A state is written without copying its tensors first; ones that share memory (the same
    tensor twice, two views of one buffer) are still written, each with its own values."""
    base = torch.arange(12.0)
    same = torch.randn(3)
    state = {"a": same, "b": [same, base[:6]], "c": base[6:].view(2, 3), "d": base.view(3, 4).t()}
    store = RunStore(tmp_path, HASH)
    store.write_state("s.safetensors", state)
    back = store.read_state("s.safetensors")
    assert torch.equal(back["a"], same) and torch.equal(back["b"][0], same)
    assert torch.equal(back["b"][1], base[:6]) and torch.equal(back["c"], base[6:].view(2, 3))
    assert torch.equal(back["d"], base.view(3, 4).t())
    assert torch.equal(base, torch.arange(12.0))  # nothing written into the caller's tensors


def test_checkpoints_skip_fsync_and_results_keep_it(tmp_path, monkeypatch):
    """A checkpoint (write_state) is a checksummed cache: renamed into place without fsync; a
    result (write_tensors, write_json) is fsynced, file and folder."""
    import ticketlab.io.store as store_mod

    synced: list[int] = []
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: synced.append(fd))
    store = RunStore(tmp_path, HASH)
    store.write_state("ckpt.safetensors", {"w": torch.randn(3)})
    assert synced == [] and store.read_state("ckpt.safetensors")["w"].shape == (3,)
    store.write_tensors("final.safetensors", {"w": torch.randn(3)})
    assert len(synced) == 2
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))
