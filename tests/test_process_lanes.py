"""Parallel stacks in forked processes: the same bits as thread lanes, errors and deaths reported,
no child outliving its parent, and settings that act or are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from test_trainer import assert_identical, make_jobs, random_mask, state_of
from ticketlab.errors import TicketlabError
from ticketlab.io.store import RunStore
from ticketlab.studies.common import StoreCheckpointer
from ticketlab.train import process_lanes, trainer
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import Dataset, load_dataset
from ticketlab.zoo.models import build_model

pytestmark = pytest.mark.skipif(not process_lanes.fork_available(), reason="needs fork (Linux)")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    d = load_dataset("digits")
    return Dataset(
        d.name, d.x_train[:128], d.y_train[:128], d.x_val[:96], d.y_val[:96], d.x_test, d.y_test
    )


def sparse_jobs(data: Dataset, n: int) -> tuple[torch.nn.Module, list[Job]]:
    """LeNet-300-100 at 97% sparsity: float32 stacks that take the sparse path and its kernels."""
    template = build_model("lenet_300_100", data.input_shape, data.num_classes, seed=0)
    jobs = []
    for i in range(n):
        net = build_model("lenet_300_100", data.input_shape, data.num_classes, seed=10 + i)
        jobs.append(Job(state_of(net), random_mask(net, 0.97, seed=i), data_seed=i))
    return template, jobs


def test_processes_give_the_bits_threads_give(digits, monkeypatch):
    template, jobs = sparse_jobs(digits, 4)
    dense_template, dense_jobs = make_jobs("lenet_300_100", digits, n=3)
    s = TrainSpec(steps=25, batch_size=16, lr=3e-3, eval_every=10)
    out = {}
    for kind in ("threads", "processes"):
        monkeypatch.setenv("TICKETLAB_LANES", kind)
        out[kind] = train(template, jobs, digits, s, lanes=2) + train(
            dense_template, dense_jobs, digits, s, lanes=2
        )
    for a, b in zip(out["threads"], out["processes"], strict=True):
        for name in a.final:
            assert torch.equal(a.final[name], b.final[name]), name
        for name in a.early_stop or {}:
            assert torch.equal(a.early_stop[name], b.early_stop[name]), name
        assert a.curve == b.curve
        assert (a.early_stop_iter, a.final_test_acc) == (b.early_stop_iter, b.final_test_acc)
    for result, job in zip(out["processes"][:4], jobs, strict=True):  # pruned weights stay zero
        for name, keep in job.mask.tensors.items():
            assert not result.final[name][~keep].any(), name


def test_a_child_that_dies_is_an_error_naming_its_exit_code(digits, monkeypatch):
    monkeypatch.setenv("TICKETLAB_LANES", "processes")
    template, jobs = sparse_jobs(digits, 2)
    real = trainer.train_stack

    def dies_on_the_second(template, jobs, *args, **kwargs):
        if jobs[0].data_seed == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return real(template, jobs, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_stack", dies_on_the_second)
    s = TrainSpec(steps=10, batch_size=16, lr=3e-3, eval_every=10)
    with pytest.raises(TicketlabError, match=r"exit code -9"):
        train(template, jobs, digits, s, lanes=2)


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_on_eval_callbacks_run_in_this_process_and_stop_their_stack(digits, kind, monkeypatch):
    """A job's ``on_eval`` may keep what it sees (early-bird does): in process lanes it is called
    here, with the child's weights, and its answer stops the child's stack as it would alone."""
    monkeypatch.setenv("TICKETLAB_LANES", kind)
    template, jobs = sparse_jobs(digits, 2)
    seen: list[tuple[int, int, float]] = []

    def watcher(i: int):
        def record(step: int, weights) -> bool:
            seen.append((i, step, float(weights["1.weight"].abs().sum())))
            return i == 0 or step >= 20  # job 0 is done at once, job 1 at step 20

        return record

    watched = [Job(j.init, j.mask, j.data_seed, on_eval=watcher(i)) for i, j in enumerate(jobs)]
    s = TrainSpec(steps=50, batch_size=16, lr=3e-3, eval_every=10)
    results = train(template, watched, digits, s, lanes=2)
    assert sorted((i, step) for i, step, _ in seen) == [(0, 0), (1, 0), (1, 10), (1, 20)]
    assert results[0].curve["iteration"] == [0.0]
    assert results[1].curve["iteration"] == [0.0, 10.0, 20.0]
    at_20 = next(norm for i, step, norm in seen if (i, step) == (1, 20))
    assert at_20 == float(results[1].final["1.weight"].abs().sum())


def test_a_misspelt_lane_kind_is_refused_in_one_line(digits, monkeypatch, capsys, tmp_path):
    from test_fs_refusals import TINY, one_line
    from ticketlab.cli import main

    template, jobs = sparse_jobs(digits, 2)
    monkeypatch.setenv("TICKETLAB_LANES", "process")
    s = TrainSpec(steps=10, batch_size=16, lr=3e-3, eval_every=10)
    with pytest.raises(TicketlabError, match="TICKETLAB_LANES must be one of processes, threads"):
        train(template, jobs, digits, s, lanes=2)
    assert main(["find", *TINY, "--out", str(tmp_path / "run")]) == 2
    assert "TICKETLAB_LANES must be one of" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "level_00").exists()  # refused before any training


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found |= {int(c) for c in text.split()}
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its new parent to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_killing_the_parent_kills_its_children(tmp_path, how):
    """A parent killed with SIGKILL mid-training leaves no stack training on (which would hold
    the run folder's lock and keep writing); Ctrl-C (SIGINT to the parent alone here) ends the
    parent with KeyboardInterrupt (Python then exits as killed by SIGINT) and its children."""
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("no /proc/.../children here")
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, sys
            # as an interactive Python would: a background job (CI's) starts with SIGINT ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.path.insert(0, sys.argv[1])
            from test_process_lanes import sparse_jobs
            from ticketlab.train.trainer import TrainSpec, train
            from ticketlab.zoo.data import load_dataset
            data = load_dataset("digits")
            template, jobs = sparse_jobs(data, 2)
            spec = TrainSpec(steps=10**7, batch_size=16, lr=3e-3, eval_every=10**6)
            said = []
            def progress(n):
                if not said:
                    said.append(print("go", flush=True))
            train(template, jobs, data, spec, lanes=2, progress=progress)
            """
        )
    )
    env = {**os.environ, "TICKETLAB_LANES": "processes"}
    parent = subprocess.Popen(
        [sys.executable, str(script), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == b"go"
        children = _children(parent.pid)
        assert len(children) == 2
        parent.send_signal(how)
        code = parent.wait(timeout=30)
        if how == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == -signal.SIGINT and b"KeyboardInterrupt" in parent.stderr.read()
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(c) for c in children):
        time.sleep(0.05)
    alive = [c for c in children if _running(c)]
    for c in alive:
        os.kill(c, signal.SIGKILL)
    assert not alive


#: Python for a fresh interpreter: two dense MNIST-1D jobs, ``template``, ``data`` and ``jobs``
_TWO_MNIST1D_JOBS = """
import sys, torch
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.train import trainer
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model
data = load_dataset("mnist1d")
template = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=0)
names = prunable_names(template)
jobs = []
for i in range(2):
    net = build_model("mnist1d_mlp", data.input_shape, data.num_classes, seed=i)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    jobs.append(Job(state, Mask.ones_like({n: state[n] for n in names}), data_seed=i))
"""


def _run_fresh(code: str, without: tuple[str, ...]) -> None:
    """``code`` in a fresh interpreter, the environment's ``without`` variables unset; it must
    print "done"."""
    env = {k: v for k, v in os.environ.items() if k not in without}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]


def test_forking_after_this_process_trained_with_its_own_threads_does_not_hang(tmp_path):
    """One stack in this process (2 intra-op threads using MKL), then two in process lanes, over
    and over, in a fresh interpreter without ``MKL_DISABLE_FAST_MM``: the pattern of a search
    whose levels have one network, then several. (Alternating *thread lanes* with process lanes
    did hang a child within five rounds here; the trainer never does that by default.)"""
    code = _TWO_MNIST1D_JOBS + textwrap.dedent("""
        torch.set_num_threads(2)
        spec = TrainSpec(steps=30, batch_size=100, eval_every=30)
        for _ in range(12):
            train(template, jobs[:1], data, spec)
            train(template, jobs, data, spec, lanes=2)
        print("done")
    """)
    _run_fresh(code, without=("MKL_DISABLE_FAST_MM", "TICKETLAB_LANES"))


def test_children_start_with_what_every_level_would_import_again(tmp_path):
    """``torch._dynamo`` (imported by a process's first optimizer, over a second) is imported once
    in the parent, not in every child of every level: checked in a fresh interpreter, whose
    children report what they found loaded when their stack started."""
    code = _TWO_MNIST1D_JOBS + textwrap.dedent(f"""
        assert "torch._dynamo" not in sys.modules
        real = trainer.train_stack
        def reporting(template, jobs, *args, **kwargs):
            with open({str(tmp_path / "seen")!r}, "a") as fh:
                fh.write(str("torch._dynamo" in sys.modules) + "\\n")
            return real(template, jobs, *args, **kwargs)
        trainer.train_stack = reporting
        train(template, jobs, data, TrainSpec(steps=5, batch_size=100, eval_every=5), lanes=2)
        print("done")
    """)
    _run_fresh(code, without=("TICKETLAB_LANES",))
    assert (tmp_path / "seen").read_text().split() == ["True", "True"]


class _PidRecordingCheckpointer(StoreCheckpointer):
    """The run folder's checkpointer, noting which process called each save."""

    def save(self, state: dict) -> None:
        with open(self.store.path("savers.txt"), "a") as fh:
            fh.write(f"{os.getpid()}\n")
        super().save(state)


def test_children_write_the_run_folders_checkpoints_themselves(digits, tmp_path, monkeypatch):
    """A checkpointer that only writes files is called in the lane (no 13 MB pickle through the
    pipe for the busy parent to write), and a resume from what the lanes wrote is bit-identical."""
    monkeypatch.setenv("TICKETLAB_LANES", "processes")
    template, jobs = make_jobs("lenet_300_100", digits, n=4)
    s = TrainSpec(steps=30, batch_size=16, lr=3e-3, eval_every=10)
    store = RunStore(tmp_path, "hash")
    checkpointers = [
        _PidRecordingCheckpointer(store, f"stack_{c}.safetensors", every=20) for c in range(2)
    ]
    full = train(template, jobs, digits, s, checkpointers=checkpointers, lanes=2)
    savers = store.path("savers.txt").read_text().split()
    assert len(savers) == 2 and len(set(savers)) == 2 and str(os.getpid()) not in savers
    assert [store.read_state(f"stack_{c}.safetensors")["step"] for c in range(2)] == [20, 20]
    ticks: list[int] = []
    resumed = train(
        template, jobs, digits, s, checkpointers=checkpointers, lanes=2, progress=ticks.append
    )
    assert sum(ticks) == 10 * len(jobs)  # it went on from the files' step 20
    for a, b in zip(full, resumed, strict=True):
        assert_identical(a, b)
