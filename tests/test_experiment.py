"""The IMP loop end to end on real data: determinism, resume, rewind, controls."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ticketlab import api
from ticketlab.api import run_search
from ticketlab.io.config import resolve
from ticketlab.io.run_files import level_dir, load_masks, load_replicates, load_rewind
from ticketlab.io.store import read_checked_tensors
from ticketlab.studies.imp import Setup, branch_jobs
from ticketlab.train.trainer import train
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model


def level_files(run: Path) -> dict[str, object]:
    """Every level file's content: JSON parsed, tensors as exact bytes (safetensors headers are
    JSON objects whose key order is not fixed, so raw file bytes are not comparable)."""
    contents: dict[str, object] = {}
    for p in sorted((run / "levels").rglob("*")):
        if p.suffix == ".json":
            contents[str(p.relative_to(run))] = json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            tensors, meta = read_checked_tensors(p)
            contents[str(p.relative_to(run))] = (
                {k: (t.dtype, t.shape, t.numpy().tobytes()) for k, t in tensors.items()},
                meta,
            )
    return contents


def setup_of(search) -> Setup:
    """The Setup a search ran with, rebuilt to inspect the jobs it made."""
    config = search.config
    data = load_dataset(config.data, config.val_fraction, config.seed)

    def init_state(seed):
        return build_model(config.model, data.input_shape, data.num_classes, seed).state_dict()

    template = build_model(config.model, data.input_shape, data.num_classes, 0)
    return Setup(config, template, init_state, data, search.store)


def test_same_seed_gives_bit_identical_runs(tiny_settings, tmp_path):
    a = run_search(resolve(tiny_settings))
    b = run_search(resolve({**tiny_settings, "out": str(tmp_path / "other")}))
    assert level_files(a.run_dir) == level_files(b.run_dir)
    assert a.summary == b.summary
    c = run_search(resolve({**tiny_settings, "seed": 1, "out": str(tmp_path / "seed1")}))
    assert c.levels[1]["networks"] != a.levels[1]["networks"]


def test_structure_masks_shrink_and_pruned_weights_stay_zero(tiny_settings):
    search = run_search(resolve(tiny_settings))
    config, store = search.config, search.store
    assert len(search.levels) == 3
    previous = None
    for level in range(3):
        masks = load_masks(store, level, config)
        finals = load_replicates(store, f"{level_dir(level)}/ticket_final.safetensors", config)
        for mask, final in zip(masks, finals, strict=True):
            for name in mask.names():
                assert (final[name][~mask[name]] == 0).all()
        if previous:
            for new, old in zip(masks, previous, strict=True):
                assert new.is_subset_of(old) and new.alive() < old.alive()
        previous = masks
    # layer-wise rates: fc 20%, output 10% of the remaining, per level
    layer = search.levels[2]["layer_remaining"]
    assert layer["1.weight"] == pytest.approx(0.64, abs=1e-3)
    assert layer["5.weight"] == pytest.approx(0.81, abs=1e-2)
    branches = {(n["branch"], n["replicate"]) for n in search.levels[1]["networks"]}
    assert branches == {(b, r) for b in ("ticket", "reinit", "random_prune") for r in (0, 1)}
    assert search.summary["rows"][1]["branches"]["ticket"]["early_stop_test_acc"]["n"] == 2


def test_interrupted_then_resumed_run_is_bit_identical(tiny_settings, tmp_path, monkeypatch):
    reference = run_search(resolve({**tiny_settings, "out": str(tmp_path / "ref")}))
    config = resolve(tiny_settings)
    real_run_imp = api.run_imp
    for stop_after in (130, 290, 500):  # inside levels 1 and 2, after mid-level checkpoints

        def interrupted(setup, progress, limit=stop_after):
            done = {"n": 0}

            def counting(n):
                done["n"] += n
                if done["n"] >= limit:
                    raise KeyboardInterrupt

            return real_run_imp(setup, counting)

        monkeypatch.setattr(api, "run_imp", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_search(config)
    monkeypatch.setattr(api, "run_imp", real_run_imp)
    resumed = run_search(config)
    assert level_files(resumed.run_dir) == level_files(reference.run_dir)
    assert not list(Path(config.out).rglob("checkpoint_*"))


def test_rewind_restores_the_step_k_weights_on_survivors(tiny_settings):
    config = resolve({**tiny_settings, "rewind_step": 7, "levels": 1})
    search = run_search(config)
    setup = setup_of(search)
    data, template = setup.data, setup.template
    rewind = load_rewind(search.store, config)
    # independently: the dense nets trained for exactly 7 steps, same seeds, data orders, stack
    dense = [job for _, _, job in branch_jobs(setup, 0, load_masks(search.store, 0, config), None)]
    short = train(template, dense, data, replace(setup.spec(), steps=7))
    for r in range(2):
        for name, tensor in short[r].final.items():
            assert torch.equal(rewind[r][name], tensor)
    masks = load_masks(search.store, 1, config)
    jobs = branch_jobs(setup, 1, masks, rewind)
    ticket = next(job for b, r, job in jobs if b == "ticket" and r == 0)
    for name in masks[0].names():
        keep = masks[0][name]
        assert torch.equal(ticket.init[name][keep], rewind[0][name][keep])
        assert (ticket.init[name][~keep] == 0).all()
    # late rewinding: every network of the pruned level (controls too) trains from step 7 to T
    assert all(job.start_step == 7 for _, _, job in jobs)
    level1 = search.levels[1]["networks"]
    assert {n["curve"]["iteration"][0] for n in level1} == {7.0}
    assert {n["curve"]["iteration"][-1] for n in level1} == {float(config.steps)}
    assert search.levels[0]["networks"][0]["curve"]["iteration"][0] == 0.0


def test_controls_use_a_fresh_init_and_a_random_mask_of_equal_sparsity(tiny_settings):
    config = resolve({**tiny_settings, "levels": 1})
    search = run_search(config)
    setup = setup_of(search)
    masks = load_masks(search.store, 1, config)
    rewind = load_rewind(search.store, config)
    jobs = {(b, r): job for b, r, job in branch_jobs(setup, 1, masks, rewind)}
    for r in range(2):
        ticket, reinit, rand = jobs["ticket", r], jobs["reinit", r], jobs["random_prune", r]
        for name in masks[r].names():
            keep = masks[r][name]
            assert torch.equal(reinit.mask[name], keep)
            assert not torch.equal(reinit.init[name][keep], ticket.init[name][keep])
            # fresh draws come from the same Glorot distribution
            ratio = reinit.init[name][keep].std() / rewind[r][name].std()
            assert 0.9 < float(ratio) < 1.1
            assert int(rand.mask[name].sum()) == int(keep.sum())
            assert not torch.equal(rand.mask[name], keep)
            assert torch.equal(rand.init[name][rand.mask[name]], rewind[r][name][rand.mask[name]])
    # the saved metrics say which branch is which, with their own densities
    level1 = json.loads((search.run_dir / "levels/level_01/metrics.json").read_text())
    densities = {n["branch"]: n["weights_remaining"] for n in level1["networks"]}
    assert densities["ticket"] == densities["random_prune"] == densities["reinit"] < 1


def test_ticket_api_returns_mask_and_rewind_weights(tiny_settings):
    search = run_search(resolve({**tiny_settings, "levels": 1}))
    mask, weights = search.ticket(1)
    assert 0.7 < mask.density() < 0.85
    for name in mask.names():
        assert (weights[name][~mask[name]] == 0).all()
