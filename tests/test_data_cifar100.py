"""CIFAR-100 through the download path, read from a tiny tarball in the official format that the
test writes (no network), and the offline 32x32 MNIST variant for the CIFAR networks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from test_data import cache, unnormalise, write_tar  # noqa: F401 (cache is a fixture)
from ticketlab.errors import TicketlabError
from ticketlab.zoo.data import DATASETS, load_dataset, training_examples


def cifar100_part(n: int, offset: int) -> dict:
    rows = np.random.default_rng(offset).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return {
        b"filenames": [b"x.png"] * n,
        b"fine_labels": [(offset + 37 * i) % 100 for i in range(n)],
        b"coarse_labels": [i % 20 for i in range(n)],
        b"data": rows.reshape(n, 3072),
    }


def write_cifar100(root, n_train=12, n_test=5, labels_key=b"fine_labels"):
    parts = {"train": cifar100_part(n_train, 1), "test": cifar100_part(n_test, 2)}
    if labels_key != b"fine_labels":
        for part in parts.values():
            part[labels_key] = part.pop(b"fine_labels")
    (root / "cifar100").mkdir(parents=True)
    members = {f"cifar-100-python/{k}": pickle.dumps(v, protocol=3) for k, v in parts.items()}
    write_tar(root / "cifar100" / "cifar-100-python.tar.gz", members)
    return parts


def test_cifar100_shapes_fine_labels_and_channel_normalisation(cache):  # noqa: F811
    parts = write_cifar100(cache)
    x, y, x_test, y_test = DATASETS["cifar100"]()
    assert x.shape == (12, 3, 32, 32) and x_test.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(y, parts["train"][b"fine_labels"])
    np.testing.assert_array_equal(y_test, parts["test"][b"fine_labels"])
    assert int(y.max()) > 9  # 100 classes, not 10
    mean = np.array([0.5071, 0.4865, 0.4409]).reshape(1, 3, 1, 1)
    std = np.array([0.2673, 0.2564, 0.2762]).reshape(1, 3, 1, 1)
    rows = parts["train"][b"data"].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(unnormalise(x, mean, std), rows)
    d = load_dataset("cifar100", val_fraction=0.25, seed=0)
    assert (len(d.x_train), len(d.x_val), d.input_shape) == (9, 3, (3, 32, 32))


def test_cifar100_bad_files_are_one_clear_error(cache):  # noqa: F811
    write_cifar100(cache, labels_key=b"labels")  # a CIFAR-10-style file under CIFAR-100's name
    with pytest.raises(TicketlabError, match="fine_labels"):
        load_dataset("cifar100")
    path = cache / "cifar100" / "cifar-100-python.tar.gz"
    path.write_bytes(b"junk")
    with pytest.raises(TicketlabError, match="not a readable .tar.gz"):
        load_dataset("cifar100")
    path.unlink()
    with pytest.raises(TicketlabError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100")  # not cached, network down: says what to put where


def test_mnist5k_resized_to_32():
    d = load_dataset("mnist5k_32")
    small = load_dataset("mnist5k")
    assert d.input_shape == (1, 32, 32) and d.num_classes == 10
    assert torch.equal(d.y_train, small.y_train) and len(d.x_test) == len(small.x_test) == 1000
    # bilinear resizing keeps the background (black) level and the digits' mean roughly
    assert float(d.x_train.min()) == pytest.approx(float(small.x_train.min()), abs=1e-5)
    assert float(d.x_train.mean()) == pytest.approx(float(small.x_train.mean()), abs=0.02)
    assert training_examples("mnist5k_32") == len(d.y_train) == 3600
