"""Data sets: the offline sets' shapes, and the downloaded sets read from tiny files in the same
formats in a temporary cache dir (no network: urlopen is patched to fail unless a test serves
bytes itself)."""

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from ticketlab.cli import main
from ticketlab.errors import TicketlabError
from ticketlab.zoo import data
from ticketlab.zoo.data import (
    DATASETS,
    DESCRIPTIONS,
    RemoteFile,
    dataset_names,
    fetch,
    load_dataset,
    read_idx,
)

IDX_SETS = [("mnist", 0.1307, 0.3081), ("fashion_mnist", 0.2860, 0.3530)]


# --- builders for tiny files in the official formats ------------------------------------------


def idx_gz(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def write_idx_set(root, subdir="mnist", n_train=50, n_test=20):
    """Image i carries i in pixel (0, 0), so a loaded row can be traced back to its source."""
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        arrays[prefix] = (images, (np.arange(n) * 7 % 10).astype(np.uint8))
    folder = root / subdir
    folder.mkdir(parents=True)
    for prefix, (images, labels) in arrays.items():
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_gz(images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_gz(labels))
    return arrays


def cifar_batch(n: int, offset: int) -> dict:
    rows = np.random.default_rng(offset).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    rows[:, 0, 0, 0] = offset + np.arange(n)  # traceable, as for MNIST
    return {
        b"batch_label": b"tiny",
        b"labels": [(offset + i) % 10 for i in range(n)],
        b"data": rows.reshape(n, 3072),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def write_tar(path, members: dict) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def write_cifar(root, per_batch=4, n_test=3, skip=(), numpy1=False):
    batches = {f"data_batch_{i}": cifar_batch(per_batch, 100 * i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n_test, 0)
    (root / "cifar10").mkdir(parents=True)
    members = {
        f"cifar-10-batches-py/{name}": pickle.dumps(batch, protocol=3)
        for name, batch in batches.items()
        if name not in skip
    }
    if numpy1:  # the official files name numpy 1.x's module, which numpy 2 no longer writes
        old, new = b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"
        members = {name: payload.replace(old, new) for name, payload in members.items()}
    write_tar(root / "cifar10" / "cifar-10-python.tar.gz", members)
    return batches


def unnormalise(x: np.ndarray, mean, std) -> np.ndarray:
    return np.rint((x * std + mean) * 255.0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir, and a network that is down: any download attempt fails."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setenv("TICKETLAB_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path / "cache"


# --- offline sets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, n_train, n_test",
    [
        ("digits", (1, 8, 8), 1400, 397),
        ("mnist5k", (1, 28, 28), 4000, 1000),
        ("mnist1d", (40,), 4000, 1000),
    ],
)
def test_offline_sets(name, shape, n_train, n_test):
    d = load_dataset(name, val_fraction=0.1, seed=0)
    assert d.input_shape == shape and d.num_classes == 10
    n_val = round(n_train * 0.1)
    assert (len(d.x_val), len(d.x_train), len(d.x_test)) == (n_val, n_train - n_val, n_test)
    assert d.x_train.dtype == d.x_test.dtype == torch.float32


def test_registry_is_lazy_and_described(cache, capsys):
    assert {"mnist", "fashion_mnist", "cifar10", "digits"} <= set(DATASETS)
    assert set(DESCRIPTIONS) == set(dataset_names())
    assert main(["datasets"]) == 0
    assert "cifar10" in capsys.readouterr().out
    assert not cache.exists()  # listing neither downloads nor creates the cache dir


def test_unknown_name_lists_known_sets():
    with pytest.raises(TicketlabError, match="unknown data set 'imagenet'.*mnist"):
        load_dataset("imagenet")


# --- MNIST-format sets from cached files -----------------------------------------------------


@pytest.mark.parametrize("name, mean, std", IDX_SETS)
def test_idx_set_shapes_labels_and_normalisation(cache, name, mean, std):
    raw = write_idx_set(cache, subdir=name)
    x, y, x_test, y_test = DATASETS[name]()
    assert x.shape == (50, 1, 28, 28) and x_test.shape == (20, 1, 28, 28)
    assert x.dtype == x_test.dtype == np.float32 and y.dtype == y_test.dtype == np.int64
    np.testing.assert_array_equal(y, raw["train"][1])
    np.testing.assert_array_equal(y_test, raw["t10k"][1])
    np.testing.assert_array_equal(unnormalise(x[:, 0], mean, std), raw["train"][0])
    np.testing.assert_array_equal(unnormalise(x_test[:, 0], mean, std), raw["t10k"][0])


def test_val_split_is_seeded_and_disjoint(cache):
    write_idx_set(cache)

    def source_rows(x):
        return set(unnormalise(x[:, 0, 0, 0].numpy(), 0.1307, 0.3081).astype(int).tolist())

    a, b, c = (load_dataset("mnist", val_fraction=0.2, seed=s) for s in (3, 3, 4))
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (40, 10, 20)
    assert a.input_shape == (1, 28, 28) and a.x_val.dtype == torch.float32
    train, val = source_rows(a.x_train), source_rows(a.x_val)
    assert not train & val and train | val == set(range(50))
    assert source_rows(b.x_val) == val and (a.y_val == b.y_val).all()
    assert source_rows(c.x_val) != val


@pytest.mark.parametrize(
    "payload",
    [
        b"this is not gzip at all",
        gzip.compress(idx_gz(np.zeros((3, 28, 28))))[:-12],  # truncated gzip stream
        gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 64),  # float idx, not unsigned bytes
        gzip.compress(b"\x00\x00\x08\x01\x00"),  # 1-d header cut short
        gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09" + b"\x00" * 5),  # 9 promised, 5 held
    ],
    ids=["not-gzip", "truncated", "wrong-type", "short-header", "short-data"],
)
def test_corrupt_idx_file_is_a_user_error(cache, payload):
    write_idx_set(cache)
    path = cache / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(payload)
    with pytest.raises(TicketlabError, match=str(path)):
        load_dataset("mnist")


def test_idx_with_wrong_image_size_is_rejected(cache):
    write_idx_set(cache)
    (cache / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(idx_gz(np.zeros((20, 8, 8))))
    with pytest.raises(TicketlabError, match=r"shape \(N, 28, 28\)"):
        load_dataset("mnist")


def test_read_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(idx_gz(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


# --- CIFAR-10 from a cached tarball ----------------------------------------------------------


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-pickles", "numpy1-pickles"])
def test_cifar10_shapes_labels_and_channel_normalisation(cache, numpy1):
    batches = write_cifar(cache, numpy1=numpy1)
    x, y, x_test, y_test = DATASETS["cifar10"]()
    assert x.shape == (20, 3, 32, 32) and x_test.shape == (3, 3, 32, 32)
    assert x.dtype == x_test.dtype == np.float32 and y.dtype == y_test.dtype == np.int64
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(y, np.concatenate([b[b"labels"] for b in train]))
    np.testing.assert_array_equal(y_test, batches["test_batch"][b"labels"])
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)
    rows = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(unnormalise(x, mean, std), rows)  # R, G, B planes in order
    d = load_dataset("cifar10", val_fraction=0.25, seed=0)
    assert (len(d.x_train), len(d.x_val), d.input_shape) == (15, 5, (3, 32, 32))


class RunsCode:
    """A pickle that would create a directory when loaded by plain pickle.load."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_pickle_cannot_run_code(cache, tmp_path):
    write_cifar(cache)
    target = str(tmp_path / "pwned")
    evil = {b"data": RunsCode(target), b"labels": []}
    members = {
        f"cifar-10-batches-py/{n}": pickle.dumps(evil)
        for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    }
    write_tar(cache / "cifar10" / "cifar-10-python.tar.gz", members)
    with pytest.raises(TicketlabError, match="forbidden global"):
        load_dataset("cifar10")
    assert not os.path.exists(target)


def test_corrupt_or_incomplete_cifar_tarball(cache):
    write_cifar(cache, skip=("test_batch",))
    with pytest.raises(TicketlabError, match="no member cifar-10-batches-py/test_batch"):
        load_dataset("cifar10")
    path = cache / "cifar10" / "cifar-10-python.tar.gz"
    path.write_bytes(b"garbage")
    with pytest.raises(TicketlabError, match="not a readable .tar.gz"):
        load_dataset("cifar10")
    write_tar(path, {f"cifar-10-batches-py/data_batch_{i}": b"junk" for i in range(1, 6)})
    with pytest.raises(TicketlabError, match="not a CIFAR-10 batch"):
        load_dataset("cifar10")


# --- downloading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, missing",
    [("mnist", "train-images-idx3-ubyte.gz"), ("cifar10", "cifar-10-python.tar.gz")],
)
def test_no_network_says_which_file_goes_where(cache, name, missing):
    with pytest.raises(TicketlabError) as info:
        load_dataset(name)
    message = str(info.value)
    assert "\n" not in message and "network is unreachable" in message
    assert f"place it at {cache / name / missing}" in message
    assert list((cache / name).iterdir()) == []  # no partial or temporary file left behind


def test_no_network_from_the_cli_is_one_line_exit_2(cache, capsys, tmp_path):
    code = main(["find", "--data", "fashion_mnist", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: could not download train-images-idx3-ubyte.gz")


def serve(monkeypatch, responses: dict[str, bytes], calls: list[str]) -> None:
    def fake_urlopen(request, timeout=None):
        calls.append(request.full_url)
        if request.full_url not in responses:
            raise urllib.error.URLError("unreachable")
        return io.BytesIO(responses[request.full_url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)


def test_fetch_tries_mirrors_verifies_md5_and_caches(cache, monkeypatch):
    payload = b"the official bytes"
    remote = RemoteFile(
        "x", "f.bin", hashlib.md5(payload).hexdigest(), ("http://a/", "http://b/", "http://c/")
    )
    calls: list[str] = []
    serve(monkeypatch, {"http://b/f.bin": b"tampered bytes", "http://c/f.bin": payload}, calls)
    path = fetch(remote)
    assert path == cache / "x" / "f.bin" and path.read_bytes() == payload
    assert calls == ["http://a/f.bin", "http://b/f.bin", "http://c/f.bin"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]  # temp files cleaned up
    assert fetch(remote) == path and len(calls) == 3  # already cached: no second download


def test_fetch_rejects_bytes_that_fail_the_checksum(cache, monkeypatch):
    remote = RemoteFile("x", "f.bin", hashlib.md5(b"good").hexdigest(), ("http://a/",))
    serve(monkeypatch, {"http://a/f.bin": b"bad"}, [])
    with pytest.raises(TicketlabError, match="expected .*place it at"):
        fetch(remote)
    assert list((cache / "x").iterdir()) == []


def test_official_files_are_named_with_their_published_md5():
    names = {f.name: f.md5 for f in data.MNIST_FILES}
    assert names["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert data.CIFAR10_FILE.md5 == "c58f30108f718f92721af3b95e74349a"
    assert all(len(f.md5) == 32 and f.mirrors for f in [*data.MNIST_FILES, data.CIFAR10_FILE])
    assert [f.name for f in data.MNIST_FILES] == [f.name for f in data.FASHION_MNIST_FILES]


def test_offline_sets_are_cached_exactly_and_rebuilt_when_the_cache_is_bad(tmp_path, monkeypatch):
    from ticketlab.zoo import data as data_module

    monkeypatch.setenv("TICKETLAB_DATA_DIR", str(tmp_path))
    first = data_module.DATASETS["digits"]()  # built, then written to the cache
    (cached,) = (tmp_path / "generated").glob("digits-*.npz")
    again = data_module.DATASETS["digits"]()  # read back
    for a, b in zip(first, again, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    cached.write_bytes(b"not an npz file")  # a corrupt cache is rebuilt, not an error
    rebuilt = data_module.DATASETS["digits"]()
    assert all(np.array_equal(a, b) for a, b in zip(first, rebuilt, strict=True))
    assert np.load(cached)["x"].shape == first[0].shape  # and rewritten whole
