"""A diverged ticket stops its replicate's pruning (said in table and report); the random-prune
control's masks are saved beside the ticket's; replicates may redraw the split."""

import json

import numpy as np
import torch

import ticketlab.studies.imp as imp
from ticketlab.api import print_result, run_search
from ticketlab.io.config import resolve
from ticketlab.io.run_files import load_control_masks, load_masks
from ticketlab.io.summary import answer_line, stopped_lines
from ticketlab.zoo.data import load_dataset


def test_diverged_ticket_stops_its_replicate(tiny_settings, monkeypatch):
    real_train = imp.train
    calls = []

    def train_with_divergence(template, jobs, data, spec, **kwargs):
        results = real_train(template, jobs, data, spec, **kwargs)
        calls.append(len(jobs))
        if len(calls) == 2:  # level 1: jobs are ticket r0, ticket r1, reinit..., random_prune...
            results[1].diverged = True
            results[1].diverged_at = 5
        return results

    monkeypatch.setattr(imp, "train", train_with_divergence)
    search = run_search(resolve({**tiny_settings, "levels": 3, "report": True}))
    assert calls == [2, 6, 3, 3]  # replicate 1 trains nothing after level 1
    level2 = search.levels[2]
    assert level2["stopped"] == {"1": 1}
    assert {n["replicate"] for n in level2["networks"]} == {0}
    masks = load_masks(search.store, 1, search.config)
    later = load_masks(search.store, 2, search.config)
    assert later[0].is_subset_of(masks[0]) and later[0].alive() < masks[0].alive()
    assert later[1].tensors == {}  # nothing saved for the stopped replicate
    lines = stopped_lines(search.summary)
    assert lines == [
        "Replicate 1: its ticket diverged (NaN/inf loss) at level 1; pruning of this replicate "
        "stopped there, later levels average the other replicates."
    ]
    html = (search.run_dir / "report" / "index.html").read_text()
    md = (search.run_dir / "report" / "summary.md").read_text()
    assert "Replicate 1: its ticket diverged" in html and "Replicate 1: its ticket diverged" in md
    from rich.console import Console

    console = Console(record=True, width=200)
    print_result(search, console)
    assert "Replicate 1: its ticket diverged" in console.export_text()
    assert answer_line(search.summary)


def test_control_masks_are_saved_beside_the_ticket(tiny_settings):
    search = run_search(resolve({**tiny_settings, "report": True}))
    c = search.config
    assert load_control_masks(search.store, 0, c) == [None, None]
    for level in (1, 2):
        tickets = load_masks(search.store, level, c)
        controls = load_control_masks(search.store, level, c)
        for ticket, control in zip(tickets, controls, strict=True):
            assert control is not None and sorted(control.names()) == sorted(ticket.names())
            for n in ticket.names():  # same count per layer, other places
                assert int(control[n].sum()) == int(ticket[n].sum())
            assert any(not torch.equal(control[n], ticket[n]) for n in ticket.names())
        metrics = search.levels[level]
        assert metrics["control_layer_remaining"]["random_prune"] == metrics["layer_remaining"]
    svg = (search.run_dir / "report" / "layers.svg").read_text()
    assert "random-prune control" in svg


def test_resplit_redraws_train_and_test_per_replicate(tiny_settings):
    a = load_dataset("digits", 0.1, split_seed=1)
    b = load_dataset("digits", 0.1, split_seed=2)
    base = load_dataset("digits", 0.1, 0)
    assert a.x_test.shape == b.x_test.shape == base.x_test.shape
    assert a.x_train.shape == base.x_train.shape
    assert not torch.equal(a.x_test, b.x_test)
    pooled = lambda d: sorted(  # noqa: E731
        map(
            bytes,
            np.concatenate([d.x_train, d.x_val, d.x_test])
            .reshape(len(d.y_train) + len(d.y_val) + len(d.y_test), -1)
            .astype(np.float32),
        )
    )
    assert pooled(a) == pooled(base)  # the same digits, split differently
    search = run_search(resolve({**tiny_settings, "levels": 1, "resplit": True}))
    dense = [n for n in search.levels[0]["networks"]]
    assert len(dense) == 2
    row = search.summary["rows"][1]
    assert row["compare"]["dense"]["n"] == 2
    assert json.loads((search.run_dir / "summary.json").read_text())["rows"][1]["verdict"]
