"""Retraining modes after pruning (Renda et al.): where each starts, its schedule, the table."""

from __future__ import annotations

import json

import pytest
import torch

from ticketlab.api import run_search
from ticketlab.cli import main
from ticketlab.errors import TicketlabError
from ticketlab.io.config import resolve
from ticketlab.io.run_files import level_dir, load_masks, load_replicates
from ticketlab.studies import imp
from ticketlab.studies.common import train_spec
from ticketlab.studies.retrain import build_table, parse_modes

TINY = {
    "model": "lenet_300_100",
    "data": "digits",
    "levels": 1,
    "replicates": 1,
    "steps": 40,
    "batch_size": 32,
    "eval_every": 10,
    "milestones": [25],
    "gamma": 0.1,
    "controls": [],
    "report": False,
}


@pytest.mark.parametrize("mode", ["lr_rewind", "finetune"])
def test_lr_rewind_and_finetune_keep_the_final_weights_and_train_the_last_t_steps(tmp_path, mode):
    config = resolve({**TINY, "retrain": mode, "retrain_steps": 12, "out": str(tmp_path / mode)})
    search = run_search(config)
    # the survivors restart from the dense network's trained weights, not from the rewind point
    finals = load_replicates(search.store, f"{level_dir(0)}/ticket_final.safetensors", config)
    points = imp.restart_points(search.store, config, 1)
    assert all(torch.equal(points[0][n], finals[0][n]) for n in finals[0])
    assert imp.start_step(config) == 28 and imp.level_steps(config, 1) == 12
    curve = search.levels[1]["networks"][0]["curve"]["iteration"]
    assert curve[0] == 28.0 and curve[-1] == 40.0
    spec = imp.level_spec(config, 1)
    if mode == "lr_rewind":  # the schedule replayed from T - t: 1e-3 up to step 24, then 1e-4
        assert spec == train_spec(config)
        assert [spec.lr * spec.lr_factor(s) for s in (28, 39)] == pytest.approx([1.2e-4] * 2)
    else:  # the final learning rate, held constant
        assert spec.milestones == () and spec.warmup_steps == 0
        assert spec.lr == pytest.approx(1.2e-4)
    assert imp.level_spec(config, 0) == train_spec(config)  # the dense network is untouched
    masks = load_masks(search.store, 1, config)
    assert masks[0].density() < 1


def test_rewind_is_the_default_and_keeps_old_run_hashes():
    base = resolve(TINY)
    assert "retrain" not in base.identity() and "retrain_steps" not in base.identity()
    assert resolve({**TINY, "retrain": "rewind"}).hash() == base.hash()
    assert resolve({**TINY, "retrain": "finetune"}).hash() != base.hash()
    assert resolve({**TINY, "retrain": "lr_rewind", "retrain_steps": 5}).retrain_budget() == 5
    assert resolve({**TINY, "rewind_step": 4, "retrain": "lr_rewind"}).retrain_budget() == 36
    with pytest.raises(TicketlabError, match="retrain must be one of"):
        resolve({**TINY, "retrain": "prune"})
    with pytest.raises(TicketlabError, match="retrain_steps must be in"):
        resolve({**TINY, "retrain_steps": 41})


def test_modes_are_parsed_and_tabled():
    assert parse_modes("rewind, finetune") == ("rewind", "finetune")
    for bad in ("rewind,rewind", "warm", ""):
        with pytest.raises(TicketlabError):
            parse_modes(bad)

    def level(i, accs):
        nets = [{"branch": "ticket", "final_test_acc": a, "early_stop_test_acc": a} for a in accs]
        return {"level": i, "weights_remaining": 0.8**i, "networks": nets}

    table = build_table(
        resolve(TINY),
        {"rewind": [level(0, [0.9, 0.92]), level(1, [0.91, 0.91])],
         "finetune": [level(0, [0.9, 0.92]), level(1, [0.85, 0.87])]},
    )  # fmt: skip
    assert table["dense_final_test_acc"] == pytest.approx(91.0)
    row = table["rows"][1]
    assert row["rewind"]["final_test_acc"] == pytest.approx(91.0) and row["rewind"]["matching"]
    assert row["finetune"]["final_test_acc"] == pytest.approx(86.0)
    assert row["finetune"]["final_test_std"] == pytest.approx(2**0.5)
    assert not row["finetune"]["matching"]


def test_retrain_command_runs_the_three_modes_side_by_side(tmp_path, capsys):
    args = ["retrain", "--model", "lenet_300_100", "--data", "digits", "--levels", "1",
            "--replicates", "1", "--steps", "20", "--batch-size", "32", "--eval-every", "10",
            "--budget", "8", "--out", str(tmp_path / "cmp")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    for mode in ("rewind", "lr_rewind", "finetune"):
        assert mode in out
        assert (tmp_path / "cmp" / mode / "levels" / "level_01" / "metrics.json").is_file()
    table = json.loads((tmp_path / "cmp" / "retrain.json").read_text())
    assert table["modes"] == ["rewind", "lr_rewind", "finetune"] and len(table["rows"]) == 2
    # the dense level is the same network in every mode
    dense = {table["rows"][0][m]["final_test_acc"] for m in table["modes"]}
    assert len(dense) == 1
    assert main([*args[:-2], "--modes", "rewind,warm", "--out", str(tmp_path / "x")]) == 2
    assert "unknown retraining mode 'warm'" in capsys.readouterr().err
