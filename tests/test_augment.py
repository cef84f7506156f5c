"""Augmentation on tensors: crops and flips checked against a per-image reference written here
(F.pad + slicing + torch.flip), deterministic per network seed and epoch, independent of the
other networks in the stack, and a pure function of the step (so resume is exact)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from ticketlab.errors import TicketlabError
from ticketlab.train import augment
from ticketlab.train.trainer import Batches
from ticketlab.zoo.data import Dataset


def reference(x, dy, dx, flip, fill, pad=4):
    out = []
    for i in range(x.shape[0]):
        img = torch.stack(
            [F.pad(x[i, c], (pad, pad, pad, pad), value=float(fill[c])) for c in range(x.shape[1])]
        )
        h, w = x.shape[2:]
        crop = img[:, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out.append(torch.flip(crop, dims=[2]) if flip[i] else crop)
    return torch.stack(out)


def test_crop_and_flip_equal_the_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 7, 9, generator=g)
    dy, dx = torch.randint(0, 9, (2, 64), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    fill = torch.tensor([-1.5, 0.25, -0.75])
    assert torch.equal(augment.apply(x, dy, dx, flip, fill), reference(x, dy, dx, flip, fill))
    same = torch.full((64,), 4)
    no_flip = torch.zeros(64, dtype=torch.bool)
    assert torch.equal(augment.apply(x, same, same, no_flip, fill), x)


def test_draws_are_deterministic_per_seed_and_epoch_and_respect_the_kind():
    a = augment.draw("crop_flip", seed=5, epoch=2, n=500)
    b = augment.draw("crop_flip", seed=5, epoch=2, n=500)
    assert all(
        torch.equal(u, v) for u, v in zip((a.dy, a.dx, a.flip), (b.dy, b.dx, b.flip), strict=True)
    )
    other_seed = augment.draw("crop_flip", seed=6, epoch=2, n=500)
    other_epoch = augment.draw("crop_flip", seed=5, epoch=3, n=500)
    assert not torch.equal(a.dy, other_seed.dy) and not torch.equal(a.dy, other_epoch.dy)
    assert int(a.dy.min()) >= 0 and int(a.dx.max()) <= 8 and 0.4 < a.flip.float().mean() < 0.6
    crop = augment.draw("crop", seed=5, epoch=2, n=500)
    flip = augment.draw("flip", seed=5, epoch=2, n=500)
    assert not crop.flip.any() and bool((flip.dy == 4).all() and (flip.dx == 4).all())


def images(n=40, shape=(2, 6, 6)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return Dataset("img", x, y, x[:4], y[:4], x[:4], y[:4])


def test_batches_augment_each_network_on_its_own_stream():
    data = images()
    fill = augment.black_level(data.x_train)
    assert torch.equal(fill, data.x_train.amin(dim=(0, 2, 3)))
    pair = Batches(data, [11, 12], 8, "crop_flip")
    alone = Batches(data, [12], 8, "crop_flip")
    plain = Batches(data, [12], 8)
    for step in (0, 1, 4, 5, 9):  # 5 steps an epoch: crosses epochs
        x2, y2 = pair(step)
        x1, y1 = alone(step)
        x0, y0 = plain(step)
        assert torch.equal(x2[1], x1[0]) and torch.equal(y2.view(2, -1)[1], y1)
        assert torch.equal(y0, y1) and not torch.equal(x0, x1)  # same examples, augmented
        epoch, position = divmod(step, 5)
        d = augment.draw("crop_flip", 12, epoch, 40)
        window = slice(position * 8, (position + 1) * 8)
        want = reference(x0[0], d.dy[window], d.dx[window], d.flip[window], fill)
        assert torch.equal(x1[0], want)
    # a pure function of the step: a fresh object (a resumed run) gives the same batch
    assert torch.equal(Batches(data, [11, 12], 8, "crop_flip")(9)[0], pair(9)[0])


def test_augmenting_non_images_is_one_clear_error():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 40, generator=g), torch.randint(0, 3, (20,), generator=g)
    with pytest.raises(TicketlabError, match="needs images"):
        Batches(Dataset("flat", x, y, x, y, x, y), [1], 4, "crop")


def test_augmentation_is_a_small_part_of_a_step():
    """Vectorised: 4 networks x 128 CIFAR images augment in milliseconds (~10 ms on a quiet core;
    the bound is generous for a loaded shared machine)."""
    x = torch.randn(512, 3, 32, 32)
    d = augment.draw("crop_flip", 0, 0, 512)
    fill = torch.zeros(3)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        augment.apply(x, d.dy, d.dx, d.flip, fill)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.25
