"""The criterion x reset x sparsity grid: every cell, sane values, files, CLI, bad input."""

import json

import pytest

from ticketlab.cli import main
from ticketlab.errors import TicketlabError
from ticketlab.studies.grid import METRICS, SUPERMASK_ROWS, run_grid

TINY = {
    "model": "lenet_300_100",
    "data": "digits",
    "criteria": ["large_final", "random"],
    "resets": ["rewind", "signed_constant", "reinit"],
    "sparsities": [0.5, 0.8],
    "replicates": 2,
    "steps": 40,
    "eval_every": 20,
    "supermask_steps": 40,
}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "out"
    return out, run_grid(**TINY, out=out)


def test_every_cell_is_there_with_sane_values(grid):
    _, g = grid
    cells = {(c["criterion"], c["reset"], c["sparsity"]): c for c in g["cells"]}
    assert len(cells) == len(g["cells"]) == 2 * 3 * 2
    for criterion in TINY["criteria"]:
        for reset in TINY["resets"]:
            for sparsity in TINY["sparsities"]:
                cell = cells[(criterion, reset, sparsity)]
                assert len(cell["replicates"]) == 2 and cell["diverged"] == 0
                for net in cell["replicates"]:
                    for key in METRICS:
                        assert 0.0 <= net[key] <= 1.0
                    assert net["early_stop_iter"] in (0, 20, 40)
                    assert (
                        net["early_stop_test_acc"]
                        == net["test_acc_curve"][net["early_stop_iter"] // 20]
                    )
    # the output layer is pruned at half the rate: a bit more than 1 - sparsity is left
    assert 0.50 < cells[("random", "rewind", 0.5)]["weights_remaining"] < 0.52
    assert 0.20 < cells[("random", "rewind", 0.8)]["weights_remaining"] < 0.22
    # trained networks learn; the dense one is good; large_final + rewind is a supermask already
    assert g["dense"]["mean"]["early_stop_test_acc"] > 0.8
    assert all(c["mean"]["final_test_acc"] > 0.5 for c in g["cells"])
    assert cells[("large_final", "rewind", 0.5)]["mean"]["untrained_test_acc"] > 0.3
    # supermask rows, all near 50% kept and above chance
    assert [(r["method"], r["weights"]) for r in g["supermasks"]] == list(SUPERMASK_ROWS)
    for row in g["supermasks"]:
        assert len(row["replicates"]) == 2
        assert 0.35 < row["mean"]["weights_remaining"] < 0.65
        assert row["mean"]["test_acc"] > 0.3


def test_files_are_written_and_match(grid):
    out, g = grid
    saved = json.loads((out / "grid.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(g["cells"]))
    md = (out / "grid.md").read_text()
    assert md.count("| large_final |") == 3 and "edge-popup" in md and "20.8% left" in md
    assert not list(out.glob(".tmp-*"))


def test_same_seed_same_grid():
    small = {**TINY, "criteria": ["large_final"], "resets": ["rewind"], "sparsities": [0.5]}
    small.update(steps=6, eval_every=3, supermask=False)
    a, b = run_grid(**small), run_grid(**small)
    assert a["cells"] == b["cells"] and a["dense"] == b["dense"]
    assert a["settings"]["lr"] == 1.2e-3  # the model's preset
    assert run_grid(**small, lr=0.01)["settings"]["lr"] == 0.01


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"criteria": ["large_final", "biggest"]}, "unknown criterion 'biggest'"),
        ({"resets": ["rewind", "nope"]}, "unknown reset 'nope'"),
        ({"sparsities": [0.5, 1.0]}, "sparsity must be in"),
        ({"sparsities": [0.0]}, "sparsity must be in"),
        ({"sparsities": [-0.2]}, "sparsity must be in"),
        ({"criteria": []}, "no criterion"),
        ({"model": "resnet9000"}, "unknown model"),
        ({"data": "imagenet"}, "unknown data set"),
        ({"replicates": 0}, r"replicates must be in \[1, 10000\]"),
        ({"steps": 0}, r"steps must be in \[1, "),
        ({"supermask_steps": 0}, "supermask steps must be >= 1"),
        ({"lr": -0.1}, "lr must be > 0"),
    ],
)
def test_bad_input_raises_before_anything_is_written(tmp_path, override, message):
    out = tmp_path / "grid"
    with pytest.raises(TicketlabError, match=message):
        run_grid(**{**TINY, **override}, out=out)
    assert not out.exists()


def test_compare_command(capsys, tmp_path):
    out = tmp_path / "g"
    args = [
        "compare", "--model", "lenet_300_100", "--data", "digits", "--criteria",
        "large_final,random", "--resets", "rewind,reinit_signed", "--sparsities", "0.5,0.9",
        "--replicates", "1", "--steps", "10", "--eval-every", "5", "--supermask-steps", "5",
        "--supermask-rescale", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reinit_signed" in printed and "edge-popup" in printed and "10.9% left" in printed
    assert (out / "grid.json").is_file() and (out / "grid.md").is_file()
    saved = json.loads((out / "grid.json").read_text())
    assert saved["settings"]["supermask_rescale"] is True
    for row in saved["supermasks"]:  # dynamic weight rescaling: the learned rows only
        learned = row["method"] == "learned"
        assert [r["rescaled"] for r in row["replicates"]] == [learned]
        assert row["weights"].endswith(", rescaled") == learned


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--criteria", "large_final,wat"], "unknown criterion 'wat'"),
        (["--resets", "rewind,,reinit"], "--resets must be a comma-separated list"),
        (["--sparsities", "0.5,1.2"], "sparsity must be in (0, 1)"),
        (["--sparsities", "0.5,half"], "sparsity 'half' is not a number"),
    ],
)
def test_compare_bad_input_is_one_line_exit_2(capsys, tmp_path, args, message):
    out = tmp_path / "g"
    assert main(["compare", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()
