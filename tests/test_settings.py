"""Every setting acts or is refused in one line; summary-only settings are not the experiment's
identity; the output layer is found from the forward pass, not from registration order."""

import json

import pytest
import torch
from torch import nn

from ticketlab.api import find_ticket, run_search
from ticketlab.cli import main
from ticketlab.core.mask import find_output_layer, layer_kinds
from ticketlab.errors import TicketlabError
from ticketlab.io.config import INT_RANGES, Config, resolve


def test_summary_settings_are_not_the_identity():
    a = resolve({"tolerance_pp": 0.5})
    b = resolve({"tolerance_pp": 2.0, "early_stop_tolerance": 3, "confidence": 0.9})
    assert a.hash() == b.hash()
    assert a.hash() != resolve({"seed": 1}).hash()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"scope": "global", "conv_rate": 0.1}, "conv_rate cannot apply: scope 'global'"),
        ({"scope": "global", "output_rate": 0.1}, "output_rate cannot apply"),
        ({"schedule": "linear", "fc_rate": 0.3}, "fc_rate cannot apply: schedule 'linear'"),
        ({"final_sparsity": 0.9}, "final_sparsity cannot apply"),
        ({"sparsities": [0.5]}, "sparsities cannot apply"),
        ({"momentum": 0.5}, "momentum cannot apply: optimizer 'adam'"),
        ({"seed": -1}, "seed must be in [0, "),
        ({"seed": 2**63}, "seed must be in [0, "),
        ({"levels": 10**6}, "levels must be in [0, 10000]"),
        ({"early_stop_tolerance": -1}, "early_stop_tolerance must be in [0, "),
        ({"milestones": [0]}, "milestones must be in (0, steps="),
        ({"schedule": "list", "sparsities": [0.5, 0.4]}, "sparsities must increase"),
        ({"schedule": "list", "sparsities": [0.5, 0.9], "levels": 3}, "levels (3) must equal"),
        ({"confidence": 1.0}, "confidence must be in (0, 1)"),
        ({"data_order": "random"}, "data_order must be one of"),
    ],
)
def test_ignored_or_out_of_range_settings_are_refused(settings, message):
    with pytest.raises(TicketlabError) as err:
        resolve(settings)
    assert message in str(err.value)


def test_every_integer_setting_has_a_range():
    ints = [f for f, t in Config.__annotations__.items() if t == "int"]
    for name in ints:  # the lower bound of every one is refused one below it
        low, _high = INT_RANGES.get(name, (0, 2**63 - 1))
        if name == "rewind_step":
            continue  # bounded by steps too
        with pytest.raises(TicketlabError, match=name):
            resolve({name: low - 1})


def test_schedules_give_targets():
    c = resolve({"schedule": "list", "sparsities": [0.45, 0.8, 0.9]})
    assert c.levels == 3 and c.target_density(2) == pytest.approx(0.2)
    c = resolve({"schedule": "linear", "final_sparsity": 0.9, "levels": 3})
    assert [round(c.target_density(k), 6) for k in range(4)] == [1.0, 0.7, 0.4, 0.1]
    assert resolve({}).target_density(1) is None


def test_saved_config_resolves_to_the_same_experiment(tmp_path):
    import tomli_w

    from ticketlab.io.config import load_toml

    c = resolve({"scope": "global", "optimizer": "adam"})
    path = tmp_path / "c.toml"
    path.write_bytes(tomli_w.dumps(c.to_toml_dict()).encode())
    again = resolve(load_toml(path))  # fed back as --config: nothing ignored in it
    assert again.hash() == c.hash()


class HeadFirst(nn.Module):
    """Registers its output layer first: registration order would pick `body` as the output."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.body = nn.Linear(8, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_output_layer_is_found_from_the_forward_pass():
    model = HeadFirst()
    assert find_output_layer(model, torch.zeros(2, 8)) == "head"
    kinds = layer_kinds(model, "head")
    assert kinds["head.weight"] == "output" and kinds["body.weight"] == "fc"


def _xy(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_find_ticket_prunes_the_real_output_layer_at_half_rate(tmp_path):
    search = find_ticket(
        HeadFirst(), _xy(), _xy(32), levels=1, replicates=1, steps=4, batch_size=16,
        eval_every=2, out=tmp_path / "run",
    )  # fmt: skip
    layers = search.levels[1]["layer_remaining"]
    assert layers["head.weight"] == pytest.approx(1 - round(0.1 * 48) / 48)
    assert layers["body.weight"] == pytest.approx(1 - round(0.2 * 128) / 128)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"exclude": ["hed"]}, "exclude names no prunable layer or parameter: 'hed'; prunable "
         "layers: head, body"),
        ({"output_layer": "tail"}, "output_layer 'tail' is not a Linear/Conv layer"),
    ],
)  # fmt: skip
def test_names_the_model_lacks_are_refused_before_writing(tmp_path, settings, message):
    out = tmp_path / "run"
    with pytest.raises(TicketlabError) as err:
        find_ticket(HeadFirst(), _xy(), _xy(32), levels=1, steps=4, out=out, **settings)
    assert message in str(err.value)
    assert not out.exists()


def test_other_tolerance_on_a_finished_run_resummarizes_without_training(
    tiny_settings, monkeypatch
):
    first = run_search(resolve(tiny_settings))
    import ticketlab.studies.imp as imp

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(imp, "train", no_training)
    again = run_search(resolve({**tiny_settings, "tolerance_pp": 50.0, "early_stop_tolerance": 9}))
    assert again.summary["tolerance_pp"] == 50.0 and again.levels == first.levels
    saved = json.loads((first.run_dir / "summary.json").read_text())
    assert saved["tolerance_pp"] == 50.0
    assert "tolerance_pp = 50.0" in (first.run_dir / "config.toml").read_text()


def test_cli_refuses_global_scope_with_conv_rate(capsys, tmp_path):
    code = main(["find", "--scope", "global", "--conv-rate", "0.1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "conv_rate cannot apply" in err and not (tmp_path / "r").exists()


def test_mnist1d_preset_is_the_notebooks_and_reaches_the_trainer():
    from ticketlab.studies.common import train_spec
    from ticketlab.train.trainer import Batches
    from ticketlab.zoo.data import Dataset
    from ticketlab.zoo.models import build_model

    c = resolve({})
    assert (c.model, c.lr, c.batch_size, c.data_order, c.prune_biases) == (
        "mnist1d_mlp",
        2e-2,
        100,
        "cyclic",
        True,
    )
    assert train_spec(c).data_order == "cyclic"
    # PyTorch's default nn.Linear init: uniform within 1/sqrt(fan_in), the bias too
    model = build_model("mnist1d_mlp", (40,), 10, seed=0)
    first = model[1]
    weight, bias = first.weight.detach(), first.bias.detach()
    assert float(weight.abs().max()) <= 40**-0.5 and float(bias.abs().max()) > 0
    # cyclic order: every network takes examples step*B .. step*B+B-1 (mod n), the same for all
    x = torch.arange(10.0).view(10, 1)
    data = Dataset("t", x, torch.arange(10), x[:1], torch.arange(1), x[:1], torch.arange(1))
    batches = Batches(data, [3, 4], 4, order="cyclic")
    xb, yb = batches(2)  # examples 8, 9, 0, 1
    assert yb.tolist() == [8, 9, 0, 1, 8, 9, 0, 1] and xb.shape == (2, 4, 1)
    for step in range(12):  # windows that wrap and windows that do not, against the rule
        xb, yb = batches(step)
        rows = [(step * 4 + i) % 10 for i in range(4)] * 2
        assert yb.tolist() == rows and xb.flatten().tolist() == [float(r) for r in rows]


def test_mnist1d_resmlp_is_the_notebooks_residual_mlp():
    """The notebook's SparseMLP: h = relu(l1(x)); logits = l3(h + relu(l2(h))), written out here
    with plain tensors; same init as mnist1d_mlp for the same seed (layers made in one order)."""
    from ticketlab.train.stacked import plan_stack
    from ticketlab.zoo.models import build_model

    res = build_model("mnist1d_resmlp", (40,), 10, seed=5)
    plain = build_model("mnist1d_mlp", (40,), 10, seed=5)
    for a, b in zip(res.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    p = dict(res.named_parameters())
    x = torch.randn(7, 1, 40)
    h = torch.relu(x.flatten(1) @ p["linear1.weight"].t() + p["linear1.bias"])
    h = h + torch.relu(h @ p["linear2.weight"].t() + p["linear2.bias"])
    expected = h @ p["linear3.weight"].t() + p["linear3.bias"]
    assert torch.allclose(res(x), expected, atol=1e-6)
    assert plan_stack(res, x).side_by_side  # networks of it train side by side
