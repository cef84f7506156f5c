"""Crash safety end to end: a real ``ticketlab find`` process is SIGKILLed at random moments, the
same command is rerun until it completes, and the run folder must then equal an uninterrupted run's.

SIGKILL gives the process no chance to clean up, so this checks the claims of the store and the
trainer together: every file is written whole or not at all, a mid-level checkpoint resumes to the
same bits, completed levels are skipped, and leftover temp files are swept.

Each attempt is a separate OS process running ``ticketlab.cli.main(["find", ...])``. A fresh
``python -m ticketlab.cli`` spends ~7 s on this machine before it trains (torch, scikit-learn and
torch._dynamo imports), which would make 20+ kills cost minutes; so the default test forks the
attempts from a server process that has done those imports once (the child then loads the data,
verifies the folder and trains exactly as the CLI does), and finishes the run with a genuine
``python -m ticketlab.cli find`` process. ``test_kill_resume_exec`` (slow) does every attempt
with ``python -m ticketlab.cli``.

Kill moments come from a seeded ``random.Random`` and from what the harness sees in the run
folder, calibrated on the uninterrupted run (its start-up time and the typical gap between two
finished writes): after the attempt's first finished write plus a random delay of up to one gap,
at the next temp file (inside a write: checkpoint, mask, metrics..., proven afterwards by the temp
file it orphaned), at a random time in the first few writes, or during start-up/resume. Kills
continue until there are at least 20, at least 3 in each level, and two of them have landed inside
writes, one of them a checkpoint's (a race the harness can lose, so it keeps trying), then the
command is rerun until it completes. After every kill, every file in the folder must verify (a
torn checkpoint would otherwise be discarded and retrained, invisible in the final comparison).
SIGKILL cannot tear a write whose bytes already reached the page cache, so ``atomic_write_bytes``'s
own guarantee is also tested deterministically
(``test_sigkill_inside_a_write_leaves_the_previous_file``).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ticketlab.cli import main
from ticketlab.io.config import resolve
from ticketlab.io.store import TMP_PREFIX, RunStore, atomic_write_bytes, read_checked_tensors

SETTINGS = {
    "model": "lenet_300_100",
    "data": "digits",
    "levels": 2,
    "replicates": 2,
    "steps": 30,
    "batch_size": 32,
    "eval_every": 10,
    "checkpoint_every": 5,
}
ARGS = [a for k, v in SETTINGS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
ARGS.append("--no-report")
HASH = resolve({**SETTINGS, "report": False}).hash()
MIN_KILLS = 20
MIN_KILLS_PER_LEVEL = 3
MAX_ATTEMPTS = 150  # a campaign that has not caught its kills by then is a failure
LEVELS = SETTINGS["levels"] + 1
POLL = 0.002  # seconds between looks at the run folder
ATTEMPT_TIMEOUT = 180.0

# The fork server: imports once what every `ticketlab find` imports, then forks one child per
# attempt; the child runs the CLI's main() with stdout/stderr in a log file. Children are reaped
# only when the harness asks, so a pid the harness signals cannot have been reused.
FORK_SERVER = r"""
import json, os, sys, traceback
import sklearn.datasets  # load_dataset("digits")
import torch._dynamo  # the first torch.optim optimizer
import ticketlab.api, ticketlab.cli
import gc
gc.freeze()  # children share these pages instead of copying them when the collector runs
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                code = ticketlab.cli.main(cmd["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply = pid
    else:
        reply = os.waitstatus_to_exitcode(os.waitpid(cmd["pid"], 0)[1])
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
"""


class Child:
    """One attempt's process: wait for its exit through a pidfd, SIGKILL it, reap it."""

    def __init__(self, pid: int, reap, log: Path):
        self.pidfd = os.pidfd_open(pid)
        self._reap, self.log = reap, log

    def exited(self, timeout: float) -> bool:
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def kill(self) -> None:
        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> int:
        code = self._reap()
        os.close(self.pidfd)
        return code


class ForkLauncher:
    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        assert self.proc.stdout.readline() == "ready\n", "fork server failed to start"

    def _ask(self, cmd: dict) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], log: Path) -> Child:
        pid = self._ask({"op": "run", "argv": argv, "log": str(log)})
        return Child(pid, lambda: self._ask({"op": "reap", "pid": pid}), log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class ExecLauncher:
    """``python -m ticketlab.cli find ...``: the command a user types."""

    def __init__(self, cwd: Path):
        self.cwd = cwd

    def start(self, argv: list[str], log: Path) -> Child:
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ticketlab.cli", *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
            )
        return Child(proc.pid, proc.wait, log)

    def close(self) -> None:
        pass


# --- looking at the run folder --------------------------------------------------------------


def scan(root: Path) -> tuple[set[tuple[str, int, int]], list[str]]:
    """(identities of finished files, names of temp files). A finished file's identity is
    (path, inode, mtime): an atomic rewrite replaces the inode, so every write is a new identity."""
    done, temps = set(), []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name == ".lock":
                continue
            if name.startswith(TMP_PREFIX):
                temps.append(os.path.join(dirpath, name))
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:  # deleted between listing and stat (checkpoints at level end)
                continue
            done.add((os.path.join(dirpath, name), st.st_ino, st.st_mtime_ns))
    return done, temps


def completed_levels(root: Path) -> int:
    return sum(1 for _ in root.glob("levels/level_*/metrics.json"))


def temp_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob(TMP_PREFIX + "*")}


def assert_every_file_whole(root: Path) -> None:
    """Right after a kill: every file but temp files is whole and verifies (a torn checkpoint
    would be discarded and retrained, so the final comparison alone would not show it)."""
    store = RunStore(root, HASH)
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if p.is_dir() or p.name == ".lock" or p.name.startswith(TMP_PREFIX):
            continue
        if p.suffix == ".json":
            store.read_json(rel)
        elif p.suffix == ".safetensors":
            store.read_tensors(rel)
        else:
            assert p.name == "config.toml", rel
            assert resolve(tomllib.loads(p.read_text())).hash() == HASH


def folder_contents(root: Path) -> dict[str, object]:
    """Every file's content, comparable across runs: JSON parsed, tensors as exact bytes (a
    safetensors header's key order is not fixed, so raw file bytes are not comparable)."""
    contents: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir() or p.name == ".lock":
            continue
        if p.suffix == ".json":
            obj = json.loads(p.read_text())
            if p.name == "run.json":  # when it started, and so its checksum, differ
                del obj["started"], obj["_checksum"]
            contents[rel] = obj
        elif p.name == "config.toml":
            contents[rel] = {k: v for k, v in tomllib.loads(p.read_text()).items() if k != "out"}
        elif p.suffix == ".safetensors":
            tensors, meta = read_checked_tensors(p)
            tensor_bytes = {k: (t.dtype, t.shape, t.numpy().tobytes()) for k, t in tensors.items()}
            contents[rel] = (tensor_bytes, meta)
        else:
            contents[rel] = p.read_bytes()
    return contents


def assert_one_line(err: str, phrase: str) -> None:
    assert len(err.strip().splitlines()) == 1 and phrase in err and "Traceback" not in err, err


# --- the harness ----------------------------------------------------------------------------


@dataclass
class Timeline:
    """What an uninterrupted attempt looked like: when the first file appeared, and the typical
    time between finished writes once training runs."""

    startup: float
    write_gap: float
    duration: float


@dataclass
class Kill:
    plan: str
    after: float
    level: int
    orphaned: list[str]  # temp files this attempt left: it died inside these writes


@dataclass
class Campaign:
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0


def run_reference(launcher, root: Path, logs: Path, second_run: bool = True) -> Timeline:
    """The uninterrupted run, timed. With ``second_run``, a second process started on the same
    folder while this one holds it must stop at once with exit 2 and one line (the launcher must
    start processes well within the run's few seconds)."""
    argv = ["find", *ARGS, "--out", str(root)]
    child = launcher.start(argv, logs / "reference.log")
    t0 = time.monotonic()
    first, times, seen, second = None, [], set(), None
    while not child.exited(0.005):
        done, _ = scan(root)
        new = done - seen
        if new:
            now = time.monotonic() - t0
            first = first if first is not None else now
            times += [now] * len(new)
            seen |= new
        if second_run and second is None and (root / "config.toml").exists():  # lock held
            second = launcher.start(argv, logs / "second.log")
            assert second.exited(ATTEMPT_TIMEOUT)
            assert not child.exited(0), "the reference ended before the second run was done"
            assert second.reap() == 2, second.log.read_text()
            assert_one_line(second.log.read_text(), "in use")
    duration = time.monotonic() - t0
    assert child.reap() == 0, child.log.read_text()
    assert second is not None or not second_run
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
    return Timeline(first or duration / 4, statistics.median(gaps), duration)


def drive(
    child: Child, root: Path, plan: str, rng: random.Random, timeline: Timeline, stale: set[str]
) -> float | None:
    """Run one attempt under ``plan``; SIGKILL it when the plan says. Returns the kill time after
    the start, or None when the process ended by itself first. ``stale``: temp files an earlier
    kill left, which this attempt sweeps (they are not a write of this attempt)."""
    t0 = time.monotonic()
    seen, _ = scan(root)
    writes_needed = {"progress": 1, "mid-write": rng.choice((0, 1))}.get(plan, 0)
    extra = rng.uniform(0.0, timeline.write_gap) if plan == "progress" else 0.0
    early_at = {
        "early": rng.uniform(0.0, timeline.startup),
        "anytime": rng.uniform(0.0, timeline.startup + 2 * timeline.write_gap),
    }.get(plan)
    armed_at = None  # when enough new writes have been seen
    writes = 0
    while True:
        if child.exited(POLL):
            return None
        now = time.monotonic() - t0
        assert now < ATTEMPT_TIMEOUT, f"attempt hung; log: {child.log.read_text()[-2000:]}"
        if early_at is not None:  # a plain timed kill
            if now >= early_at:
                break
            continue
        done, temps = scan(root)
        writes += len(done - seen)
        seen |= done
        if armed_at is None and writes >= writes_needed:
            armed_at = now
        if armed_at is None:
            continue
        if plan == "mid-write" and set(temps) - stale:
            break
        if plan == "mid-write" and now >= armed_at + 4 * timeline.write_gap:
            break  # no temp file showed up: a timed kill then
        if plan == "progress" and now >= armed_at + extra:
            break
    child.kill()
    return time.monotonic() - t0


def kill_until_done(
    launcher, final_launcher, root: Path, logs: Path, timeline: Timeline, seed: int
) -> Campaign:
    """Rerun the same command until it completes, killing attempts as planned; once enough kills
    have landed in every level, ``final_launcher`` runs the remaining attempts without a kill."""
    rng = random.Random(seed)
    campaign = Campaign()
    argv = ["find", *ARGS, "--out", str(root)]
    while True:
        assert campaign.attempts < MAX_ATTEMPTS, [
            (k.plan, k.level, k.orphaned) for k in campaign.kills
        ]
        per_level = [sum(k.level == lv for k in campaign.kills) for lv in range(LEVELS)]
        # a kill inside a write is a race the harness can lose (the write ends between the look
        # that saw its temp file and the signal): keep trying until it has been won
        torn = died_writing(campaign.kills)
        caught = len(torn) >= 2 and any(n.startswith(TMP_PREFIX + "checkpoint_") for n in torn)
        enough = (
            len(campaign.kills) >= MIN_KILLS and min(per_level) >= MIN_KILLS_PER_LEVEL and caught
        )
        weights = [4, 4, 3, 1]  # progress, mid-write, anytime, early
        if completed_levels(root) == LEVELS - 1:
            # Last level: an attempt that is not killed in time finishes the run and ends the
            # campaign, and after a few resumes little of the level is left to train. So kill
            # within the attempt's start-up (while it verifies the folder and resumes) until the
            # campaign has enough kills; before that, slower plans would leave it short. A
            # mid-write kill lands at the attempt's first write, early enough too.
            weights = [0, 0, 0, 1] if caught else [0, 1, 0, 1]
        plans = ("progress", "mid-write", "anytime", "early")
        plan = None if enough else rng.choices(plans, weights)[0]
        log = logs / f"attempt_{campaign.attempts:03d}.log"
        stale = temp_files(root)
        child = (final_launcher if plan is None else launcher).start(argv, log)
        campaign.attempts += 1
        if plan is None:
            assert child.exited(ATTEMPT_TIMEOUT), "final attempt hung"
            killed_after = None
        else:
            killed_after = drive(child, root, plan, rng, timeline, stale)
        code = child.reap()
        if killed_after is None or code == 0:  # finished by itself (maybe just before the kill)
            assert code == 0, log.read_text()[-3000:]
            return campaign
        assert code == -signal.SIGKILL, log.read_text()[-3000:]
        level = min(completed_levels(root), LEVELS - 1)
        assert_every_file_whole(root)
        orphaned = sorted(Path(t).name for t in temp_files(root) - stale)
        campaign.kills.append(Kill(plan, killed_after, level, orphaned))


def died_writing(kills: list[Kill]) -> list[str]:
    """The temp files that kills orphaned: writes the process died inside."""
    return [name for k in kills for name in k.orphaned]


def check_campaign(campaign: Campaign, root: Path, reference: Path) -> None:
    kills = campaign.kills
    summary = [(k.plan, round(k.after, 2), k.level, k.orphaned) for k in kills]
    assert len(kills) >= MIN_KILLS, summary
    for level in range(LEVELS):
        assert sum(k.level == level for k in kills) >= MIN_KILLS_PER_LEVEL, summary
    torn = died_writing(kills)
    assert len(torn) >= 2, summary
    assert any(name.startswith(TMP_PREFIX + "checkpoint_") for name in torn), summary
    assert temp_files(root) == set()
    assert not list(root.rglob("checkpoint_*"))
    assert folder_contents(root) == folder_contents(reference)


def test_kill_resume_is_bit_identical(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    server = ForkLauncher(tmp_path)
    try:
        reference = tmp_path / "reference"
        timeline = run_reference(server, reference, logs)
        campaign = kill_until_done(
            server, ExecLauncher(tmp_path), tmp_path / "killed", logs, timeline, seed=2024
        )
    finally:
        server.close()
    check_campaign(campaign, tmp_path / "killed", reference)


@pytest.mark.slow
def test_kill_resume_exec(tmp_path):
    """Every attempt a fresh ``python -m ticketlab.cli find`` (minutes: ~7 s start-up each)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    launcher = ExecLauncher(tmp_path)
    reference = tmp_path / "reference"
    timeline = run_reference(launcher, reference, logs, second_run=False)
    campaign = kill_until_done(launcher, launcher, tmp_path / "killed", logs, timeline, seed=7)
    check_campaign(campaign, tmp_path / "killed", reference)


def test_sigkill_inside_a_write_leaves_the_previous_file(tmp_path):
    """Deterministically: the process dies after the new bytes are written but before they are
    renamed over the old file; the old file is intact and the orphaned temp file is swept."""
    target = tmp_path / "run" / "metrics.json"
    code = f"""
import os, signal
from pathlib import Path
from ticketlab.io.store import atomic_write_bytes
target = Path({str(target)!r})
atomic_write_bytes(target, b"old")
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
atomic_write_bytes(target, b"new" * 100_000)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert target.read_bytes() == b"old"
    (orphan,) = target.parent.glob(TMP_PREFIX + "*")
    assert orphan.read_bytes() == b"new" * 100_000
    RunStore(target.parent, HASH).clean_temp_files()
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


# --- the lock -------------------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True], ids=["lock-only", "config-written"])
def test_second_run_on_a_folder_in_use_exits_2(tmp_path, capsys, started):
    """The first run holds the lock (just started, or well under way); the second says so."""
    out = tmp_path / "run"
    config = resolve({**SETTINGS, "report": False, "out": str(out)})
    store = RunStore(out, config.hash())
    with store.lock():
        if started:
            atomic_write_bytes(out / "config.toml", tomli_w.dumps(config.to_toml_dict()).encode())
        before = sorted(p.name for p in out.iterdir())
        code = main(["find", *ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "in use" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_run_killed_before_writing_its_config_resumes(tmp_path, capsys):
    """A folder holding only the lock and a temp file is a run killed in its first moments:
    rerunning resumes it (it is not "a folder holding no ticketlab run")."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").touch()
    (out / f"{TMP_PREFIX}config.toml.abc123").write_bytes(b"model = ")
    tiny = {"--levels": "0", "--replicates": "1", "--steps": "4", "--checkpoint-every": "2"}
    args = [*ARGS, *[a for kv in tiny.items() for a in kv]]  # later flags win
    code = main(["find", *args, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "config.toml").is_file() and (out / "levels/level_00/metrics.json").is_file()
    assert temp_files(out) == set()
