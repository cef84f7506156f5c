"""``find_ticket`` on a user's own module (not a registered model, not an nn.Sequential)."""

import torch
from sklearn.datasets import load_digits
from torch import nn

from ticketlab import find_ticket


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.hidden = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.out(h + torch.relu(self.hidden(h)))


def test_find_ticket_on_a_custom_module(tmp_path):
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    search = find_ticket(
        ResidualMLP(), (x[:1400], y[:1400]), (x[1400:], y[1400:]),
        out=tmp_path / "run", levels=2, replicates=2, steps=60, batch_size=32, eval_every=20,
        lr=3e-3,
    )  # fmt: skip
    assert [row["level"] for row in search.summary["rows"]] == [0, 1, 2]
    mask, weights = search.ticket(2)
    assert set(mask.names()) == {"inp.weight", "hidden.weight", "out.weight"}
    assert int(mask["inp.weight"].sum()) == 1310  # 2048 -> 1638 -> 1310: 20% of remaining, twice
    for name in mask.names():
        assert (weights[name][~mask[name]] == 0).all()
    dense = search.summary["rows"][0]["branches"]["ticket"]["early_stop_test_acc"]["mean"]
    assert dense > 0.5  # it really trained (chance is 0.1)
    # the replicates start from different seeded inits
    first, _ = search.ticket(0, replicate=0)
    w0 = search.ticket(0, replicate=0)[1]["inp.weight"]
    w1 = search.ticket(0, replicate=1)[1]["inp.weight"]
    assert first.density() == 1.0 and not torch.equal(w0, w1)
