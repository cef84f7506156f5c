"""Export: the shipped ticket reloads to exactly the trained ticket, smaller than dense."""

import pytest
import torch

from ticketlab.api import run_search
from ticketlab.cli import main
from ticketlab.io.config import resolve
from ticketlab.io.export import load_ticket
from ticketlab.io.run_files import level_dir, load_masks, load_replicates


def test_export_round_trips_and_is_smaller(tiny_settings, tmp_path, capsys):
    search = run_search(resolve({**tiny_settings, "levels": 4, "replicates": 1}))
    out = tmp_path / "ticket.safetensors"
    assert main(["export", str(search.run_dir), "--level", "4", "--out", str(out)]) == 0
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
    from ticketlab.errors import TicketlabError

    path = tmp_path / "t.safetensors"
    path.write_bytes(junk)
    with pytest.raises(TicketlabError):
        load_ticket(path)
