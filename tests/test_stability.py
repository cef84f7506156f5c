"""Instability analysis: the path, its endpoints, the copies, resume, BatchNorm and bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from ticketlab.api import run_search
from ticketlab.cli import main
from ticketlab.io.config import resolve
from ticketlab.io.report import write_report
from ticketlab.studies import common
from ticketlab.studies import stability as st
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import Dataset, load_dataset

SETTINGS = {
    "model": "lenet_300_100",
    "data": "digits",
    "levels": 1,
    "replicates": 2,
    "steps": 40,
    "batch_size": 32,
    "eval_every": 20,
    "lr": 1.2e-3,
    "checkpoint_every": 10,
    "report": False,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-level search to analyse (each test copies it before writing into it)."""
    out = tmp_path_factory.mktemp("stability") / "run"
    run_search(resolve({**SETTINGS, "out": str(out)}))
    return out


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def analyse(root, **kw) -> tuple[st.RunData, st.Settings, dict]:
    run = st.open_run(root)
    s = st.Settings(**{"level": 1, "ks": (0, 7), "replicates": 1, **kw})
    return run, s, st.run_stability(run, s)


def test_endpoints_reproduce_the_copies_and_paths_are_complete(fresh_run):
    run, s, saved = analyse(fresh_run)
    assert sorted(saved["pairs"]) == sorted(
        st.pair_key(b, k, 0) for b in ("ticket", "random_prune", "reinit") for k in (0, 7)
    )
    for pair in saved["pairs"].values():
        assert len(pair["test_error"]) == len(pair["train_error"]) == 30
        assert pair["alphas"][0] == 0.0 and pair["alphas"][-1] == 1.0
        a, b = pair["copies_final_test_acc"]
        assert pair["test_acc"][0] == a  # exactly: the endpoint is copy 1 itself
        assert pair["test_acc"][-1] == b
        errors = pair["test_error"]
        assert pair["instability_test"] == max(errors) - (errors[0] + errors[-1]) / 2
        assert pair["instability_test"] >= 0
    rows = st.summarize(run)
    assert {(r["branch"], r["k"]) for r in rows} == {
        (b, k) for b in ("ticket", "random_prune", "reinit") for k in (0, 7)
    }
    figures = st.write_outputs(run)
    assert all(f.stat().st_size > 1000 for f in figures)
    page = write_report([fresh_run]).read_text()
    assert "Stability to SGD noise" in page and "stability_0_instability_vs_k.png" in page
    assert (fresh_run / "report" / "stability_0_instability_vs_k.png").is_file()


def test_two_identical_copies_have_instability_exactly_zero(fresh_run):
    run = st.open_run(fresh_run)
    s = st.Settings(level=0, ks=(0,))
    data = run.data
    init = run.init_state(common.init_seed(run.config, 0))
    mask = st.load_masks(run.store, 0, run.config)[0]
    spec = replace(common.train_spec(run.config), steps=15)
    a, b = train(run.template, [Job(init, mask, 5), Job(init, mask, 5)], data, spec)
    for name in a.final:
        assert torch.equal(a.final[name], b.final[name])
    accuracies = st.path_accuracies(run.template, a.final, b.final, [i / 29 for i in range(30)],
                                    data.x_test, data.y_test, s, data)  # fmt: skip
    assert len(set(accuracies)) == 1
    assert st.instability([1.0 - acc for acc in accuracies]) == 0.0


def test_copies_differ_only_in_data_order(fresh_run):
    run = st.open_run(fresh_run)
    s = st.Settings(level=1, ks=(0, 7), replicates=2)
    todo = [(b, k, r) for b in ("ticket", "random_prune", "reinit") for k in (0, 7) for r in (0, 1)]
    points = st.rewind_points(run, s, [0, 7])
    jobs = st.pair_jobs(run, s, todo, points)
    seeds = set()
    for i, (branch, k, _) in enumerate(todo):
        one, two = jobs[2 * i], jobs[2 * i + 1]
        assert one.init.keys() == two.init.keys()
        assert all(torch.equal(one.init[n], two.init[n]) for n in one.init)
        assert all(torch.equal(one.mask[n], two.mask[n]) for n in one.mask.names())
        assert one.start_step == two.start_step == k
        assert one.data_seed != two.data_seed
        seeds |= {one.data_seed, two.data_seed}
        if branch == "ticket" and k == 7:  # the run's own rewind point at 0, retrained at 7
            assert not torch.equal(one.init["1.weight"], jobs[2 * (i - 2)].init["1.weight"])
    assert len(seeds) == 2 * len(todo)  # every copy its own data order


def test_rewind_point_at_the_runs_own_step_is_the_saved_one(tmp_path):
    out = tmp_path / "run"
    run_search(
        resolve({**SETTINGS, "levels": 0, "replicates": 1, "rewind_step": 5, "out": str(out)})
    )
    run = st.open_run(out)
    s = st.Settings(level=0, ks=(0, 5, 9))
    points = st.rewind_points(run, s, [0, 5, 9])
    saved = st.load_rewind(run.store, run.config)[0]
    assert all(torch.equal(points[0, 5][n], saved[n]) for n in saved)
    init = run.init_state(common.init_seed(run.config, 0))
    assert all(torch.equal(points[0, 0][n], init[n]) for n in init)
    # k = 9 is retrained with the run's seeds: equal (to float noise) to a run rewound to 9
    ref = resolve(
        {**SETTINGS, "levels": 0, "replicates": 1, "rewind_step": 9, "out": str(tmp_path / "r9")}
    )
    run_search(ref)
    nine = st.load_rewind(st.open_run(tmp_path / "r9").store, ref)[0]
    for n in nine:
        torch.testing.assert_close(points[0, 9][n], nine[n], rtol=0, atol=1e-5)


def test_killed_stability_run_resumes_bit_identically(run_dir, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    shutil.copytree(run_dir, reference)
    analyse(reference, ks=(3,), replicates=2)
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    real_save = common.StoreCheckpointer.save
    for stop_after in (1, 3):  # after the first checkpoint; after the resumed run's next ones
        calls = {"n": 0}

        def save(self, state, limit=stop_after, calls=calls):
            real_save(self, state)
            calls["n"] += 1
            if calls["n"] >= limit:
                raise KeyboardInterrupt

        monkeypatch.setattr(common.StoreCheckpointer, "save", save)
        with pytest.raises(KeyboardInterrupt):
            analyse(killed, ks=(3,), replicates=2)
        assert list((killed / "stability" / "checkpoints").glob("*.safetensors"))
    monkeypatch.setattr(common.StoreCheckpointer, "save", real_save)
    analyse(killed, ks=(3,), replicates=2)

    def content(root):
        saved = json.loads((root / "stability" / "level_01.json").read_text())
        return saved["pairs"]

    assert content(killed) == content(reference)
    assert not list((killed / "stability" / "checkpoints").glob("*.safetensors"))
    # a finished analysis is skipped; a new k adds pairs without touching the others
    _, _, more = analyse(killed, ks=(3, 0), replicates=2)
    assert {k: v for k, v in more["pairs"].items() if "/k3/" in k} == content(reference)


class BatchNormMLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 10))  # fmt: skip


def bn_states() -> tuple[nn.Module, dict, dict, Dataset]:
    d = load_dataset("digits")
    data = Dataset(d.name, d.x_train[:256], d.y_train[:256], d.x_val, d.y_val, d.x_test, d.y_test)
    template = BatchNormMLP()
    spec = TrainSpec(steps=12, batch_size=32, lr=1e-2)
    jobs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = BatchNormMLP()
        init = {k: v.detach().clone() for k, v in net.state_dict().items()}
        jobs.append(Job(init, st.Mask.ones_like({"1.weight": net[1].weight}), seed))
    a, b = train(template, jobs, data, spec)
    return template, a.final, b.final, data


def test_batchnorm_path_interpolates_running_statistics_by_default():
    template, a, b, data = bn_states()
    assert not torch.equal(a["2.running_mean"], b["2.running_mean"])
    mid = st.interpolate(a, b, 0.5)
    torch.testing.assert_close(
        mid["2.running_mean"], (a["2.running_mean"] + b["2.running_mean"]) / 2
    )
    torch.testing.assert_close(mid["2.running_var"], (a["2.running_var"] + b["2.running_var"]) / 2)
    assert st.interpolate(a, b, 0.0)["2.running_var"].equal(a["2.running_var"])
    s = st.Settings(level=0, ks=(0,), points=3)
    path = st.path_accuracies(template, a, b, [0.0, 0.5, 1.0], data.x_test, data.y_test, s, data)
    # the midpoint, by hand in plain PyTorch: eval mode with the interpolated statistics
    net = BatchNormMLP()
    net.load_state_dict(mid)
    net.eval()
    with torch.no_grad():
        acc = (net(data.x_test).argmax(1) == data.y_test).double().mean().item()
    assert path[1] == pytest.approx(acc, abs=1e-12)


def test_batchnorm_statistics_can_be_reestimated_on_training_batches():
    template, a, b, data = bn_states()
    mid = st.interpolate(a, b, 0.5)
    re = st.reestimate_bn(template, mid, data, batches=3)
    # independently: the cumulative average of the three batches' means of the BN input
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0x57AB))
    w, bias = mid["1.weight"], mid["1.bias"]
    means, vars_ = [], []
    for i in range(3):
        idx = order[(i * 128) % 256 :][:128]  # batches 0, 1, then 0 again (256 images)
        h = data.x_train[idx].reshape(-1, 64) @ w.T + bias
        means.append(h.mean(0))
        vars_.append(h.var(0, unbiased=True))
    torch.testing.assert_close(re["2.running_mean"], torch.stack(means).mean(0))
    torch.testing.assert_close(re["2.running_var"], torch.stack(vars_).mean(0))
    for name in ("1.weight", "2.weight", "4.weight"):  # the weights are untouched
        assert torch.equal(re[name], mid[name])
    s = st.Settings(level=0, ks=(0,), points=3, bn_stats="reestimate", bn_batches=3)
    path = st.path_accuracies(template, a, b, [0.0, 0.5, 1.0], data.x_test, data.y_test, s, data)
    net = BatchNormMLP()
    net.load_state_dict(re)
    net.eval()
    with torch.no_grad():
        acc = (net(data.x_test).argmax(1) == data.y_test).double().mean().item()
    assert path[1] == pytest.approx(acc, abs=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--level", "5"], "level 5 does not exist"),
        (["--level", "1", "--k", "40"], "k must be in [0, 40)"),
        (["--level", "1", "--k", "0,abc"], "--k must be"),
        (["--level", "0", "--k", "0", "--replicates", "3"], "replicates must be in [1, 2]"),
        (["--level", "0", "--k", "0", "--points", "1"], "points must be >= 2"),
        (["--level", "0", "--k", "0", "--bn-stats", "mean"], "bn_stats must be one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(fresh_run, capsys, args, message):
    code = main(["stability", str(fresh_run), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (fresh_run / "stability").exists()


def test_run_folder_of_another_experiment_is_refused(fresh_run, tmp_path, capsys):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "grid.json").write_text("{}")
    assert main(["stability", str(tmp_path / "grid")]) == 2
    assert "not a ticketlab run folder" in capsys.readouterr().err
    config = fresh_run / "config.toml"
    config.write_text(config.read_text().replace("seed = 0", "seed = 1"))
    assert main(["stability", str(fresh_run), "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another experiment" in err and err.count("\n") == 1
