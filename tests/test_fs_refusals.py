"""The file system refusing: one line naming the path; exit 2 before any training, exit 1 mid-run
with nothing finished lost (rerunning resumes to the same result)."""

import errno
import os

import pytest

import ticketlab.io.store as store_mod
from ticketlab.cli import main

TINY = [
    "--model", "lenet_300_100", "--data", "digits", "--levels", "1", "--replicates", "1",
    "--steps", "20", "--batch-size", "32", "--eval-every", "10", "--no-report",
]  # fmt: skip


def run(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    code, out, err = run(capsys, ["find", *TINY, "--out", str(target)])
    assert code == 2 and str(target) in one_line(err) and "is a file" in err
    assert target.read_text() == "mine"


def test_parent_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    code, _, err = run(capsys, ["find", *TINY, "--out", str(tmp_path / "f" / "run")])
    assert code == 2 and str(tmp_path / "f") in one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_parent(capsys, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, _, err = run(capsys, ["find", *TINY, "--out", str(parent / "missing" / "run")])
    finally:
        parent.chmod(0o700)
    assert code == 2 and "Permission denied" in one_line(err)


@pytest.mark.parametrize(
    "code_, text", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")]
)
def test_parent_cannot_be_created(capsys, tmp_path, monkeypatch, code_, text):
    """Permission and read-only refusals made by the OS (simulated: tests may run as root)."""
    out = tmp_path / "missing" / "run"
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "missing")):
            raise OSError(code_, os.strerror(code_), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    code, _, err = run(capsys, ["find", *TINY, "--out", str(out)])
    assert code == 2 and text in one_line(err) and str(out) in err
    assert not (tmp_path / "missing").exists()


def test_disk_full_mid_run_exits_1_and_resume_loses_nothing(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = store_mod._atomic_write_bytes

    def full(path, payload, *rest):
        if "level_01" in str(path) and path.name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, payload, *rest)

    monkeypatch.setattr(store_mod, "_atomic_write_bytes", full)
    code, _, err = run(capsys, ["find", *TINY, "--out", str(out)])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    line = errors[0]
    assert code == 1 and "No space left on device" in line and "metrics.json" in line
    assert (out / "levels" / "level_00" / "metrics.json").is_file()
    assert not (out / "levels" / "level_01" / "metrics.json").exists()
    assert not list(out.rglob(".tmp-*"))
    monkeypatch.setattr(store_mod, "_atomic_write_bytes", real)
    code, resumed, err = run(capsys, ["find", *TINY, "--out", str(out)])
    assert code == 0, err
    fresh = tmp_path / "fresh"
    code, clean, _ = run(capsys, ["find", *TINY, "--out", str(fresh)])
    assert resumed.replace(str(out), "X") == clean.replace(str(fresh), "X")


def test_negative_seed_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, ["find", *TINY, "--seed", "-1", "--out", str(tmp_path / "r")])
    assert code == 2 and "seed must be in [0, " in one_line(err)
    assert not (tmp_path / "r").exists()
