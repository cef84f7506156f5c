"""The command line: listings, a real run, every bad input -> one line, exit 2, nothing written."""

import json

import pytest

from ticketlab.cli import main

TINY = [
    "--model", "lenet_300_100", "--data", "digits", "--levels", "1", "--replicates", "1",
    "--steps", "30", "--batch-size", "32", "--eval-every", "10", "--no-report",
]  # fmt: skip


def run_cli(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_and_datasets_are_listed(capsys):
    code, out, _ = run_cli(capsys, ["models"])
    assert code == 0
    for name in ("lenet_300_100", "conv2", "conv4", "conv6", "mnist1d_mlp"):
        assert name in out
    code, out, _ = run_cli(capsys, ["datasets"])
    assert code == 0
    for name in ("mnist1d", "mnist5k", "digits"):
        assert name in out


def test_find_prints_table_and_answer_and_saves_config(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, ["find", *TINY, "--out", str(out_dir)])
    assert code == 0
    assert "% weights" in out and "too few replicates to tell" in out.lower()  # 1 replicate
    saved = (out_dir / "config.toml").read_text()
    assert 'model = "lenet_300_100"' in saved and "steps = 30" in saved
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [row["level"] for row in summary["rows"]] == [0, 1]
    # rerunning the same command resumes: nothing to do, same answer
    code, again, _ = run_cli(capsys, ["find", *TINY, "--out", str(out_dir)])
    assert code == 0 and again.splitlines()[-3:] == out.splitlines()[-3:]


def test_config_file_then_flags(capsys, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'model = "lenet_300_100"\ndata = "digits"\nlevels = 1\nreplicates = 1\n'
        "steps = 20\nbatch_size = 32\neval_every = 10\nreport = false\nlr = 0.5\n"
    )
    out_dir = tmp_path / "run"
    code, _, err = run_cli(
        capsys, ["find", "--config", str(toml), "--lr", "0.001", "--out", str(out_dir)]
    )
    assert code == 0, err
    assert "lr = 0.001" in (out_dir / "config.toml").read_text()


BAD_ARGS = [
    (["find", "--model", "resnet9000"], "unknown model"),
    (["find", "--data", "imagenet"], "unknown data set"),
    (["find", "--fc-rate", "1.5"], "fc_rate must be in (0, 1)"),
    (["find", "--fc-rate", "0"], "fc_rate must be in (0, 1)"),
    (["find", "--conv-rate", "-0.1"], "conv_rate must be in (0, 1)"),
    (["find", "--levels", "-1"], "levels must be in [0, 10000]"),
    (["find", "--replicates", "0"], "replicates must be in [1, 10000]"),
    (["find", "--seed", "-1"], "seed must be in [0, "),
    (["find", "--scope", "global", "--conv-rate", "0.2"], "conv_rate cannot apply"),
    (["find", "--levels", "many"], "--levels"),
    (["find", "--criterion", "biggest"], "unknown criterion"),
    (["find", "--reset", "nope"], "unknown reset"),
    (["find", "--scope", "everywhere"], "scope must be"),
    (["find", "--control", "nothing"], "unknown control"),
    (["find", "--bogus-flag"], "--bogus-flag"),
    (["nonsense-command"], "nonsense-command"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGS)
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        capsys, [*args, "--out", str(tmp_path / "run")] if args[0] == "find" else args
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("levels = [1, 2\n", "not valid TOML"),
        ("colour = 'blue'\n", "unknown config key 'colour'"),
        ("levels = 'ten'\n", "config key 'levels' must be int"),
        ("fc_rate = 2.0\n", "fc_rate must be in (0, 1)"),
    ],
)
def test_bad_config_file(capsys, tmp_path, content, message):
    toml = tmp_path / "run.toml"
    toml.write_text(content)
    code, _, err = run_cli(capsys, ["find", "--config", str(toml), "--out", str(tmp_path / "run")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["find", "--config", str(tmp_path / "nope.toml")])
    assert code == 2 and "does not exist" in err


def test_folder_of_a_different_experiment_is_refused_untouched(capsys, tmp_path):
    out_dir = tmp_path / "run"
    assert run_cli(capsys, ["find", *TINY, "--out", str(out_dir)])[0] == 0
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, ["find", *TINY, "--lr", "0.5", "--out", str(out_dir)])
    assert code == 2 and "different experiment" in err and "lr" in err
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before


def test_non_run_folder_is_refused(capsys, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, ["find", *TINY, "--out", str(tmp_path)])
    assert code == 2 and "holds no ticketlab run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
