"""Lottery tickets in a small GPT: the model, the text data, sequence training, Wanda, `find`."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ticketlab.cli import main
from ticketlab.core.mask import Mask, layer_kinds, prunable_names
from ticketlab.core.wanda import input_norms, keep_per_row, wanda_scores
from ticketlab.errors import TicketlabError
from ticketlab.io.config import resolve
from ticketlab.train.stacked import VmapStack, stack_networks
from ticketlab.train.trainer import Job, TrainSpec, loss_and_accuracy, train
from ticketlab.zoo.data import Dataset, load_dataset
from ticketlab.zoo.models import build_model, parse_model_name
from ticketlab.zoo.text import char_splits

SMALL = "gpt_tiny:layers=2,width=16,heads=2,mlp=2"


def small_gpt(seed=0, context=12, vocab=11):
    return build_model(SMALL, (context,), vocab, seed)


def token_data(n=48, context=12, vocab=11, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n + 20, context + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    return Dataset(
        "tokens", x[:n], y[:n], x[n : n + 10], y[n : n + 10], x[n + 10 :], y[n + 10 :], vocab
    )


def test_causal_masking_no_position_sees_the_future():
    model = small_gpt()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (3, 12), generator=g)
    base = model(x)
    assert base.shape == (3, 12, 11)
    for t in range(11):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randint(0, 11, (3, 11 - t), generator=g)
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} saw the future"
    present = x.clone()
    present[:, 5] = (present[:, 5] + 1) % 11
    assert not torch.allclose(model(present)[:, 5], base[:, 5])  # but it does see the present


def test_text_split_is_deterministic_and_disjoint():
    text = "".join(chr(0x4E00 + i) for i in range(2000))  # every character distinct: id = position
    vocab, splits = char_splits(text, context=16, val_fraction=0.1)
    _, again = char_splits(text, context=16, val_fraction=0.1)
    spans = {}
    for name, (x, y) in splits.items():
        assert np.array_equal(x, again[name][0]) and np.array_equal(y, again[name][1])
        assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        ids = np.union1d(x, y)
        spans[name] = (ids.min(), ids.max())
        assert len(ids) == ids.max() - ids.min() + 1  # one contiguous stretch of text
    assert spans["train"][1] < spans["val"][0] and spans["val"][1] < spans["test"][0]
    assert spans["test"][1] > len(vocab) - 1 - 16 and spans["test"][1] - spans["test"][0] > 150


def test_pydoc_chars_is_really_there_and_stable():
    a = load_dataset("pydoc_chars")
    b = load_dataset("pydoc_chars", seed=7)  # the split never depends on the run's seed
    assert a.task == "language_model" and a.input_shape == (64,) and a.num_classes > 60
    assert a.x_train.dtype == torch.int64 and a.y_train.shape == a.x_train.shape
    assert sum(t.numel() for t in (a.y_train, a.y_val, a.y_test)) > 400_000
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.x_val, b.x_val)
    assert a.to(torch.float64).x_train.dtype == torch.int64  # token ids are never cast
    assert int(max(t.max() for t in (a.x_train, a.x_val, a.x_test))) < a.num_classes


def test_layernorm_embeddings_and_biases_are_never_pruned_by_default():
    model = small_gpt()
    names = prunable_names(model)
    expected = [
        f"blocks.{i}.{p}.weight"
        for i in range(2)
        for p in ("attn.q", "attn.k", "attn.v", "attn.out", "fc", "proj")
    ]
    assert names == expected
    assert all("ln" not in n and "tok" not in n and "pos" not in n for n in names)
    assert {"tok.weight", "pos.weight"} <= set(prunable_names(model, embeddings=True))
    kinds = layer_kinds(model)
    assert "output" not in kinds.values()  # the tied head: no layer gets the output rate
    assert kinds["tok.weight"] == "embedding"
    with pytest.raises(TicketlabError):
        parse_model_name("gpt_tiny:layers")
    with pytest.raises(TicketlabError):
        resolve({"model": "gpt_tiny:depth=3"})
    assert resolve({"model": "gpt_tiny:layers=1"}).batch_size == 32  # the preset still applies


def test_sequence_loss_matches_plain_cross_entropy_and_stacks_exactly():
    data = token_data()
    nets = [small_gpt(seed=s) for s in range(2)]
    stack = stack_networks(nets[0], [n.state_dict() for n in nets], torch.float32, data.x_train)
    assert isinstance(stack, VmapStack)  # stateless: trained side by side
    loss, acc = loss_and_accuracy(stack, data.x_test, data.y_test)
    loss, acc = loss.detach(), acc.detach()
    for i, net in enumerate(nets):
        logits = net(data.x_test).detach()
        ref = F.cross_entropy(logits.reshape(-1, 11), data.y_test.reshape(-1))
        ref_acc = (logits.argmax(-1) == data.y_test).double().mean()
        assert math.isclose(float(loss[i]), float(ref), rel_tol=1e-5)
        assert math.isclose(float(acc[i]), float(ref_acc), rel_tol=1e-9)
    # K networks trained side by side == each trained alone
    names = prunable_names(nets[0])
    g = torch.Generator().manual_seed(3)
    jobs = [
        Job(
            n.state_dict(),
            Mask({k: torch.rand(n.state_dict()[k].shape, generator=g) > 0.5 for k in names}),
            s,
        )
        for s, n in enumerate(nets)
    ]
    spec = TrainSpec(steps=6, batch_size=8, eval_every=3, lr=3e-3)
    together = train(nets[0], jobs, data, spec, stack_size=2, lanes=1)
    alone = train(nets[0], jobs, data, spec, stack_size=1, lanes=1)
    for a, b, job in zip(together, alone, jobs, strict=True):
        for name, t in a.final.items():
            assert torch.allclose(t, b.final[name], atol=1e-5), name
        for name in names:
            assert not bool(a.final[name][~job.mask[name]].any())  # pruned stays exactly zero
        assert a.curve["test_loss"] == pytest.approx(b.curve["test_loss"], rel=1e-5)


def test_wanda_score_and_rows_against_a_hand_computation():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-0.1, 0.3, -4.0]]))
    batches = [torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]]), torch.tensor([[[3.0, 0.0, 0.0]]])]
    norms = input_norms(layer, ["0.weight"], batches)
    # column norms over all 3 rows: sqrt(1+1+9), sqrt(0+1+0), sqrt(4+0+0)
    expected_norms = torch.tensor([math.sqrt(11), 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(norms["0.weight"], expected_norms)
    scores = wanda_scores({"0.weight": layer[0].weight}, norms)["0.weight"]
    hand = torch.tensor(
        [[1 * math.sqrt(11), 2 * 1, 0.5 * 2], [0.1 * math.sqrt(11), 0.3 * 1, 4.0 * 2]],
        dtype=torch.float64,
    )
    assert torch.allclose(scores, hand)
    keep = keep_per_row(scores, 1 / 3)  # one weight per output row survives
    assert keep.tolist() == [[True, False, False], [False, False, True]]
    # magnitude alone would keep -2.0 in row 0: Wanda keeps the weight on the loud input instead


def test_tiny_find_report_oneshot_and_export_on_the_transformer(tmp_path, capsys, monkeypatch):
    import ticketlab.api as api

    data = token_data(n=64)
    real = api.load_dataset
    monkeypatch.setattr(
        api,
        "load_dataset",
        lambda name, *a, **k: data if name == "pydoc_chars" else real(name, *a, **k),
    )
    out = tmp_path / "run"
    args = [
        "find", "--model", SMALL, "--data", "pydoc_chars", "--levels", "2", "--replicates", "1",
        "--steps", "6", "--batch-size", "8", "--eval-every", "3", "--fc-rate", "0.5",
        "--rewind-step", "2", "--scope", "global", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed.lower()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "language_model"
    assert [r["level"] for r in summary["rows"]] == [0, 1, 2]
    assert set(summary["rows"][1]["branches"]) == {"ticket", "reinit", "random_prune"}
    ppl = summary["rows"][0]["branches"]["ticket"]["early_stop_test_ppl"]["mean"]
    loss = json.loads((out / "levels/level_00/metrics.json").read_text())["networks"][0][
        "early_stop_test_loss"
    ]
    assert ppl == pytest.approx(math.exp(loss))
    metrics = json.loads((out / "levels/level_02/metrics.json").read_text())
    assert metrics["weights_remaining"] == pytest.approx(0.25, abs=1e-3)
    assert all("ln" not in n and "tok" not in n for n in metrics["layer_remaining"])
    html = (out / "report/index.html").read_text()
    assert "ppl." in html and "perplexity" in html.lower()
    assert main(args) == 0  # rerun = resume: nothing left to train, same answer
    assert capsys.readouterr().out.splitlines()[-4:] == printed.splitlines()[-4:]

    import ticketlab.studies.oneshot as oneshot

    monkeypatch.setattr(oneshot, "load_dataset", lambda *a, **k: data)
    assert main(["oneshot", str(out), "--finetune-steps", "2", "--calibration-batches", "2"]) == 0
    result = json.loads((out / "oneshot/oneshot.json").read_text())
    assert {(n["method"], round(n["target_density"], 2)) for n in result["networks"]} == {
        (m, d) for m in ("magnitude", "wanda") for d in (0.5, 0.25)
    }
    for n in result["networks"]:
        assert n["weights_remaining"] == pytest.approx(n["target_density"], abs=0.01)
        assert math.isfinite(n["pruned_test_loss"]) and math.isfinite(n["finetuned_test_loss"])
    assert "wanda + fine-tune" in (out / "oneshot/oneshot.md").read_text()

    ticket = tmp_path / "ticket.safetensors"
    assert main(["export", str(out), "--level", "2", "--out", str(ticket)]) == 0
    from ticketlab.io.export import load_ticket

    model = load_ticket(ticket)
    assert model(data.x_test).shape == (10, 12, 11)
