"""Data-set variants (zoo/variants.py): deterministic per name and seed, validation held out like
the base sets, every option checked against a plain NumPy reference, bad names -> one line."""

import numpy as np
import pytest
import torch

from ticketlab.cli import main
from ticketlab.errors import TicketlabError
from ticketlab.zoo.data import DATASETS, load_dataset


def _rows(*tensors):
    """The set of input rows (as bytes) of several tensors."""
    return sorted(t.numpy().tobytes() for x in tensors for t in x)


def test_class_split_keeps_only_those_classes_relabelled_and_holds_out_validation():
    x, y, x_test, y_test = DATASETS["digits"]()
    d = load_dataset("digits:5-9", val_fraction=0.1, seed=3)
    keep = y >= 5
    assert d.num_classes == 5
    assert len(d.x_val) == round(keep.sum() * 0.1)
    assert len(d.x_train) + len(d.x_val) == keep.sum()
    # train and validation together are exactly the base training digits of classes 5-9
    expected = [torch.as_tensor(r, dtype=torch.float32).numpy().tobytes() for r in x[keep]]
    assert _rows(d.x_train, d.x_val) == sorted(expected)
    assert sorted(d.y_train.tolist() + d.y_val.tolist()) == sorted((y[keep] - 5).tolist())
    assert sorted(d.y_test.tolist()) == sorted((y_test[y_test >= 5] - 5).tolist())
    # same name and seed -> same tensors; another seed -> another validation split
    again = load_dataset("digits:classes=5-9", val_fraction=0.1, seed=3)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_val, d.y_val)
    other = load_dataset("digits:5-9", val_fraction=0.1, seed=4)
    assert not torch.equal(other.y_val, d.y_val)
    assert load_dataset("digits:0-2+7").num_classes == 4


def test_permutation_is_one_fixed_permutation_of_positions():
    base = load_dataset("digits", seed=0)
    perm = load_dataset("digits:permute=5", seed=0)
    order = np.random.default_rng(5).permutation(64)
    flat = base.x_test.reshape(len(base.x_test), -1)
    assert torch.equal(perm.x_test.reshape(len(flat), -1), flat[:, order])
    assert torch.equal(perm.y_train, base.y_train)  # the split is the base set's
    assert not torch.equal(load_dataset("digits:permute=6").x_test, perm.x_test)


def test_resize_matches_torch_interpolate():
    base = load_dataset("digits", seed=0)
    big = load_dataset("digits:size=28", seed=0)
    assert big.input_shape == (1, 28, 28)
    ref = torch.nn.functional.interpolate(
        base.x_test, size=(28, 28), mode="bilinear", align_corners=False, antialias=True
    )
    torch.testing.assert_close(big.x_test, ref)
    assert load_dataset("digits:size=5x6").input_shape == (1, 5, 6)


def test_mnist1d_regenerated_with_its_own_arguments_is_deterministic():
    a = load_dataset("mnist1d:num_samples=400,seed=1")
    b = load_dataset("mnist1d:num_samples=400,seed=1")
    c = load_dataset("mnist1d:num_samples=400,seed=2")
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == 400
    assert len(a.x_val) == round(320 * 0.1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    noisy = load_dataset("mnist1d:num_samples=400,seed=1,iid_noise_scale=0.5")
    assert not torch.equal(noisy.x_train, a.x_train)
    shuffled = load_dataset("mnist1d:num_samples=400,seed=1,permute=0")
    order = np.random.default_rng(0).permutation(40)
    assert torch.equal(shuffled.x_test, a.x_test[:, order])


@pytest.mark.parametrize(
    "name",
    [
        "digits:",
        "digits:7-3",
        "digits:x",
        "digits:bogus=1",
        "digits:seed=1",  # generation arguments are mnist1d's only
        "mnist1d:size=8",  # not images
        "mnist1d:scale_coeff=abc",
        "digits:classes=11",
        "nosuch:0-4",
        "digits:permute=1.5",
        "digits:size=0",
    ],
)
def test_bad_variants_are_one_line(name):
    with pytest.raises(TicketlabError) as info:
        load_dataset(name)
    assert "\n" not in str(info.value)


def test_cli_bad_variant_exits_2_without_writing(capsys, tmp_path):
    code = main(["find", "--data", "digits:bogus=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bogus" in err
    assert not (tmp_path / "run").exists()


def test_variants_of_a_downloaded_set(tmp_path, monkeypatch):
    """The download path's sets take the same options (tested on small files in their format)."""
    from test_data import write_idx_set

    monkeypatch.setenv("TICKETLAB_DATA_DIR", str(tmp_path / "cache"))
    raw = write_idx_set(tmp_path / "cache", subdir="fashion_mnist")
    d = load_dataset("fashion_mnist:0-4,size=8", val_fraction=0.2, seed=0)
    keep = raw["train"][1] < 5
    assert d.input_shape == (1, 8, 8)
    assert len(d.x_train) + len(d.x_val) == keep.sum()
    assert set(d.y_train.tolist()) <= set(range(5))
