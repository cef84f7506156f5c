"""The Ray backend on a real local cluster: a head and a worker node as separate processes.

Results must be the same bits as the local backend's, also when a worker is killed mid-level
(Ray retries its task from the checkpoint the driver gave it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
from ray.cluster_utils import Cluster  # noqa: E402

from ticketlab.api import run_search  # noqa: E402
from ticketlab.cli import main  # noqa: E402
from ticketlab.io.config import resolve  # noqa: E402
from ticketlab.studies.grid import run_grid  # noqa: E402

FIND = {
    "model": "lenet_300_100",
    "data": "digits",
    "levels": 2,
    "replicates": 2,
    "steps": 150,
    "eval_every": 50,
    "checkpoint_every": 40,
    "report": False,
}
GRID = {
    "model": "lenet_300_100",
    "data": "digits",
    "criteria": ["large_final", "random"],
    "resets": ["rewind", "reinit"],
    "sparsities": [0.5, 0.9],
    "replicates": 2,
    "steps": 60,
    "supermask": False,
}


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine (head + worker), each its own raylet process."""
    local = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    local.add_node(num_cpus=2)
    local.wait_for_nodes()
    ray.init(address=local.address, log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield local
    ray.shutdown()
    local.shutdown()


def level_files(run: Path) -> dict[str, object]:
    """Every finished level's metrics and tensors, as values (not file bytes)."""
    from ticketlab.io.store import read_checked_tensors

    out: dict[str, object] = {}
    for path in sorted((run / "levels").rglob("*")):
        rel = str(path.relative_to(run))
        if path.name == "metrics.json":
            body = json.loads(path.read_text())
            out[rel] = body
        elif path.suffix == ".safetensors" and not path.name.startswith("checkpoint"):
            tensors, _ = read_checked_tensors(path)
            out[rel] = {k: v.numpy().tobytes() for k, v in tensors.items()}
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    run_search(resolve({**FIND, "out": str(out)}))
    return out


def test_find_through_the_cli_on_a_cluster_is_bit_identical(cluster, local_run, tmp_path):
    out = tmp_path / "ray"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in FIND.items() if k != "report"]
    cmd = [sys.executable, "-m", "ticketlab.cli", "find", *args, "--no-report"]
    cmd += ["--backend", "ray", "--address", cluster.address, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert level_files(out) == level_files(local_run)
    assert (out / "summary.json").exists()


def test_a_killed_worker_is_retried_and_the_run_ends_with_the_same_bits(
    cluster, local_run, tmp_path
):
    out = tmp_path / "killed"
    errors: list[BaseException] = []

    def search() -> None:
        try:
            run_search(resolve({**FIND, "out": str(out), "backend": "ray"}))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    driver = threading.Thread(target=search)
    driver.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and driver.is_alive() and time.monotonic() < deadline:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any("_run_stack_task" in part for part in proc.info["cmdline"] or []):
                time.sleep(0.3)  # let it train (and checkpoint) a little first
                proc.kill()
                killed = proc.info["pid"]
                break
        time.sleep(0.05)
    driver.join(timeout=600)
    assert not errors, errors
    assert killed is not None, "no worker was running a stack task"
    assert level_files(out) == level_files(local_run)


def test_compare_on_a_cluster_is_bit_identical(cluster, tmp_path):
    local = run_grid(**GRID, out=tmp_path / "local")
    remote = run_grid(**GRID, out=tmp_path / "ray", backend="ray", address=cluster.address)
    strip = {"seconds", "wall_seconds", "elapsed", "out"}

    def cells(grid: dict) -> object:
        return json.loads(json.dumps({k: v for k, v in grid.items() if k not in strip}))

    assert cells(remote) == cells(local)


def test_ray_missing_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    out = tmp_path / "never"
    code = main(["find", "--backend", "ray", "--steps", "10", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "pip install 'ticketlab[ray]'" in err[0]
    assert not out.exists()


def test_unknown_backend_is_refused(tmp_path, capsys):
    code = main(["find", "--backend", "spark", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "unknown backend 'spark'" in capsys.readouterr().err
