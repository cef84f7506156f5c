"""``ticketlab transfer``: the carried mask is the source's bit for bit, the random control keeps
every layer's count, the oracle is the target run's ticket, resume retrains nothing, and every bad
input (another architecture, another input size, a missing level) is one line and exit 2."""

import json

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import ticketlab
from ticketlab.cli import main
from ticketlab.errors import TicketlabError
from ticketlab.io.config import resolve
from ticketlab.io.run_files import load_masks
from ticketlab.io.store import RunStore, read_checked_tensors
from ticketlab.studies import transfer as transfer_study

TINY = [
    "--model", "lenet_300_100", "--levels", "2", "--replicates", "2", "--steps", "20",
    "--batch-size", "32", "--eval-every", "10", "--no-report", "--no-controls",
]  # fmt: skip
FAST = ["--steps", "20"]


def run_cli(capsys, args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A source run on digits 0-4 and a target run on digits 5-9 (the oracle's)."""
    root = tmp_path_factory.mktemp("transfer")
    for name, data in (("source", "digits:0-4"), ("target", "digits:5-9")):
        assert main(["find", *TINY, "--data", data, "--out", str(root / name)]) == 0
    return root


def _store(run):
    from ticketlab.api import resolve_saved

    config = resolve_saved(run / "config.toml")
    return RunStore(run, config.hash()), config


def test_transfer_carries_the_mask_bit_for_bit_beside_the_controls(capsys, runs, tmp_path):
    args = ["transfer", runs / "source", "--to", "digits:5-9", "--target-run", runs / "target"]
    code, text, err = run_cli(capsys, [*args, *FAST])
    assert code == 0, err
    (out,) = (runs / "source/transfer").glob("digits-5-9_rewind_adam_oracle_*")
    assert "transfer" in text and "oracle" in text and "dense" in text
    store, config = _store(runs / "source")
    target_store, target_config = _store(runs / "target")
    summary = json.loads((out / "transfer.json").read_text())
    assert [row["level"] for row in summary["rows"]] == [1, 2]
    for level in (1, 2):
        saved, _ = read_checked_tensors(out / f"levels/level_{level:02d}_masks.safetensors")
        source_masks = load_masks(store, level, config)
        target_masks = load_masks(target_store, level, target_config)
        record = json.loads((out / f"levels/level_{level:02d}.json").read_text())
        assert record["oracle_level"] == level  # same rates, so the same sparsity
        for r in range(2):
            for name in source_masks[r].names():
                carried = saved[f"transfer/r{r}/{name}"]
                assert carried.dtype == torch.bool
                assert torch.equal(carried, source_masks[r][name])  # bit for bit
                rnd = saved[f"random/r{r}/{name}"]
                assert int(rnd.sum()) == int(carried.sum())  # same count in every layer
                assert not torch.equal(rnd, carried)
                assert torch.equal(saved[f"oracle/r{r}/{name}"], target_masks[r][name])
        nets = record["networks"]
        assert sorted((n["branch"], n["replicate"]) for n in nets) == sorted(
            (b, r) for b in ("transfer", "random", "oracle") for r in range(2)
        )
    dense = json.loads((out / "dense.json").read_text())["networks"]
    assert [n["weights_remaining"] for n in dense] == [1.0, 1.0]
    assert (out / "transfer.png").stat().st_size > 0 and (out / "transfer.md").is_file()
    assert summary["dense"]["final_test_acc"]["mean"] > 0.5  # it really trained (chance 0.2)

    # rerun: every level is on disk, so nothing trains and the summary is the same
    def refuse(*_, **__):
        raise AssertionError("a finished level was retrained")

    original = transfer_study.train
    transfer_study.train = refuse
    try:
        code, _, err = run_cli(capsys, [*args, *FAST])
    finally:
        transfer_study.train = original
    assert code == 0, err
    assert json.loads((out / "transfer.json").read_text())["rows"] == summary["rows"]

    # the run's report shows the transfer
    from ticketlab.io.report import write_report

    index = write_report([runs / "source"], tmp_path / "report")
    assert "Transfer:" in index.read_text()


def test_a_fresh_init_sgd_and_a_redrawn_output_mask(runs, tmp_path):
    result = ticketlab.transfer_ticket(
        runs / "source", "digits", levels=[2], init="fresh", optimizer="sgd", steps=10,
        output_mask="redraw", replicates=1, out=tmp_path / "t",
    )  # fmt: skip
    s = result.summary
    sgd_lr = transfer_study.DEFAULT_LR["sgd"]
    assert (s["optimizer"], s["lr"], s["init"]) == ("sgd", sgd_lr, "fresh")
    store, config = _store(runs / "source")
    source = load_masks(store, 2, config)[0]
    saved, _ = read_checked_tensors(tmp_path / "t/levels/level_02_masks.safetensors")
    for name in source.names():
        carried = saved[f"transfer/r0/{name}"]
        if name == "5.weight":  # the output layer: 5 classes -> 10, re-drawn at the same density
            assert carried.shape == (10, 100)
            assert int(carried.sum()) == round(source[name].float().mean().item() * 1000)
        else:
            assert torch.equal(carried, source[name])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--to", "digits:5-9:size=10"], "unknown option"),
        (["--to", "digits:5-9,size=10"], "input size"),  # 100 inputs, the mask has 64
        (["--to", "digits"], "--output-mask redraw"),  # 10 classes, the output mask has 5
        (["--to", "digits:5-9", "--level", "7"], "no finished level 7"),
        (["--to", "digits:5-9", "--init", "warm"], "--init"),
        (["--to", "digits:5-9", "--optimizer", "rmsprop"], "--optimizer"),
        (["--to", "digits:5-9", "--replicates", "3"], "--replicates"),
        (["--to", "nosuch"], "unknown data set"),
    ],
)
def test_bad_transfers_are_one_line_and_write_nothing(capsys, runs, tmp_path, extra, needle):
    out = tmp_path / "t"
    code, _, err = run_cli(capsys, ["transfer", runs / "source", *extra, "--out", out])
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_not_a_run_and_an_oracle_of_another_architecture(capsys, runs, tmp_path):
    code, _, err = run_cli(capsys, ["transfer", tmp_path, "--to", "digits"])
    assert code == 2 and "not a ticketlab run folder" in err
    other = tmp_path / "other"
    assert main(["find", *TINY[2:], "--model", "mnist1d_mlp", "--data", "digits:5-9",
                 "--out", str(other)]) == 0  # fmt: skip
    capsys.readouterr()
    code, _, err = run_cli(
        capsys, ["transfer", runs / "source", "--to", "digits:5-9", "--target-run", other]
    )
    assert code == 2 and "same architecture" in err and len(err.strip().splitlines()) == 1


class TwoLayer(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.inp = nn.Linear(64, hidden)
        self.out = nn.Linear(hidden, 5)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x.flatten(1))))


def _digits(low):
    d = load_digits()
    keep = (d.target >= low) & (d.target < low + 5)
    x = torch.tensor(d.data[keep] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[keep] - low)
    return (x[:700], y[:700]), (x[700:], y[700:])


def test_transfer_from_python_for_any_module(tmp_path):
    train, test = _digits(0)
    search = ticketlab.find_ticket(
        TwoLayer(), train, test, out=tmp_path / "src", levels=1, replicates=1, steps=20,
        batch_size=32, eval_every=10, controls=[],
    )  # fmt: skip
    train5, test5 = _digits(5)
    result = ticketlab.transfer_ticket(
        search.run_dir, "digits 5-9", model=TwoLayer(), train=train5, test=test5, steps=20
    )
    assert result.folder.parent == search.run_dir / "transfer"
    saved, _ = read_checked_tensors(result.folder / "levels/level_01_masks.safetensors")
    mask, _ = search.ticket(1)
    assert torch.equal(saved["transfer/r0/inp.weight"], mask["inp.weight"])
    # a module of another architecture: one clear error
    with pytest.raises(TicketlabError, match="input size|another architecture"):
        ticketlab.transfer_ticket(
            search.run_dir, "digits 5-9", model=TwoLayer(hidden=16), train=train5, test=test5
        )
    with pytest.raises(TicketlabError, match="custom module"):
        ticketlab.transfer_ticket(search.run_dir, "digits:5-9")
    assert resolve({"data": "digits:5-9"}).data == "digits:5-9"
