"""Export: the shipped ticket reloads to exactly the trained ticket, smaller than dense."""

import pytest
import torch
from torch import nn

from ticketlab.api import run_search
from ticketlab.cli import main
from ticketlab.errors import TicketlabError
from ticketlab.io.config import resolve
from ticketlab.io.export import load_ticket
from ticketlab.io.run_files import level_dir, load_masks, load_replicates


def test_export_round_trips_and_is_smaller(tiny_settings, tmp_path, capsys):
    search = run_search(resolve({**tiny_settings, "levels": 4, "replicates": 1}))
    out = tmp_path / "ticket.safetensors"
    argv = ["export", str(search.run_dir), "--level", "4", "--out", str(out), "--weights", "final"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "smaller" in printed and "inference" in printed
    model = load_ticket(out)
    final = load_replicates(
        search.store, f"{level_dir(4)}/ticket_final.safetensors", search.config
    )[0]
    mask = load_masks(search.store, 4, search.config)[0]
    for name, tensor in model.state_dict().items():
        assert torch.equal(
            tensor, final[name] * mask[name] if name in mask.tensors else final[name]
        )
    dense_bytes = sum(t.numel() * 4 for t in final.values())
    assert out.stat().st_size < 0.6 * dense_bytes  # 41% remain + 1 bit per weight


def test_export_bad_level_is_one_line(tiny_settings, tmp_path, capsys):
    search = run_search(resolve({**tiny_settings, "levels": 1, "replicates": 1}))
    capsys.readouterr()
    code = main(["export", str(search.run_dir), "--level", "7", "--out", str(tmp_path / "t.st")])
    err = capsys.readouterr().err
    assert code == 2 and "no finished level 7" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("junk", [b"", b"not a safetensors file at all"])
def test_loading_a_corrupt_export_is_refused(tmp_path, junk):
    path = tmp_path / "t.safetensors"
    path.write_bytes(junk)
    with pytest.raises(TicketlabError):
        load_ticket(path)


def test_export_defaults_to_the_early_stop_weights(tiny_settings, tmp_path):
    search = run_search(resolve({**tiny_settings, "levels": 1, "replicates": 1}))
    out = tmp_path / "t.safetensors"
    assert main(["export", str(search.run_dir), "--level", "1", "--out", str(out)]) == 0
    mask = load_masks(search.store, 1, search.config)[0]
    rel = f"{level_dir(1)}/ticket_early_stop.safetensors"
    early = load_replicates(search.store, rel, search.config)[0]
    model = load_ticket(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(
            tensor, early[name] * mask[name] if name in mask.tensors else early[name]
        )
    # the level's metrics say where that is; final differs after it
    metrics = search.levels[1]["networks"][0]
    assert metrics["early_stop_iter"] <= search.config.steps


def test_export_without_early_stop_weights_is_one_line(tiny_settings, tmp_path, capsys):
    search = run_search(resolve({**tiny_settings, "levels": 1, "replicates": 1}))
    search.store.path(f"{level_dir(1)}/ticket_early_stop.safetensors").unlink()  # an older run
    capsys.readouterr()
    code = main(["export", str(search.run_dir), "--level", "1", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and "--weights final" in err and len(err.strip().splitlines()) == 1
    assert (
        main(
            [
                "export",
                str(search.run_dir),
                "--level",
                "1",
                "--out",
                str(tmp_path / "t"),
                "--weights",
                "bogus",
            ]
        )
        == 2
    )
    assert "unknown weights 'bogus'" in capsys.readouterr().err


class Residual(nn.Module):
    """Not a Sequential: a residual MLP with a bias-free layer and a nested block."""

    def __init__(self, inputs: int = 64, classes: int = 10):
        super().__init__()
        self.stem = nn.Linear(inputs, 32)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(32, 32, bias=False))
        self.head = nn.Linear(32, classes, bias=False)

    def forward(self, x):
        h = self.stem(x.flatten(1))
        return self.head(torch.relu(h + self.block(h)))


def test_find_ticket_run_exports_and_loads_into_the_users_module(tmp_path, capsys):
    from sklearn.datasets import load_digits

    from ticketlab import find_ticket

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    search = find_ticket(
        Residual(),
        (x[:1400], y[:1400]),
        (x[1400:], y[1400:]),
        out=tmp_path / "run",
        levels=2,
        replicates=1,
        steps=40,
        eval_every=10,
        batch_size=32,
        controls=[],
    )
    out = tmp_path / "custom.safetensors"
    assert main(["export", str(search.run_dir), "--level", "2", "--out", str(out)]) == 0
    assert "not measured" in capsys.readouterr().out  # the CLI has no module to time
    with pytest.raises(TicketlabError, match="module="):
        load_ticket(out)
    model = load_ticket(out, module=Residual())
    mask = load_masks(search.store, 2, search.config)[0]
    early = load_replicates(
        search.store, f"{level_dir(2)}/ticket_early_stop.safetensors", search.config
    )[0]
    for name, tensor in model.state_dict().items():
        assert torch.equal(
            tensor, early[name] * mask[name] if name in mask.tensors else early[name]
        )
    # from Python the search knows its module: the speed is measured too
    report = search.export(2, tmp_path / "again.safetensors", weights="final")
    assert report.sparse_ms is not None and report.weights == "final"
    with pytest.raises(TicketlabError, match="does not fit"):
        load_ticket(out, module=nn.Linear(64, 10))


def test_sparse_inference_equals_dense_for_any_module():
    from ticketlab.io.export import SparseLinear, sparse_inference

    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape) < 0.1)
    sparse = sparse_inference(model, min_weights=0)
    kinds = {n: type(m).__name__ for n, m in sparse.named_modules()}
    assert kinds["stem"] == kinds["block.1"] == kinds["head"] == "SparseLinear"
    for batch in (1, 7):
        x = torch.randn(batch, 64)
        assert torch.allclose(sparse(x), model(x), atol=1e-5)
    x3 = torch.randn(2, 3, 32)  # leading dimensions, as nn.Linear allows
    assert torch.allclose(SparseLinear(model.head)(x3), model.head(x3), atol=1e-5)
    assert type(sparse_inference(model).head).__name__ == "Linear"  # too small to pay


def test_packed_file_at_5_percent_is_under_a_tenth_of_dense(tmp_path):
    from ticketlab.core.mask import Mask
    from ticketlab.io.export import read_ticket, write_ticket
    from ticketlab.zoo.models import build_model

    model = build_model("lenet_300_100", (1, 28, 28), 10, seed=0)
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    mask = Mask(
        {
            n: torch.rand(t.shape, generator=g) < 0.05
            for n, t in state.items()
            if n.endswith("weight")
        }
    )
    path = tmp_path / "t.safetensors"
    write_ticket(path, state, mask, {"model": "lenet_300_100"})
    dense_bytes = sum(t.numel() * 4 for t in state.values())
    assert path.stat().st_size < 0.10 * dense_bytes
    loaded, meta = read_ticket(path)
    for name, tensor in state.items():
        expected = tensor * mask[name] if name in mask.tensors else tensor
        assert torch.equal(loaded[name], expected)
