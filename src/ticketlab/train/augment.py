"""Data augmentation on tensors: random crops after zero padding and horizontal flips, per network.

The CIFAR recipes of the rewinding papers (OpenLTH, He et al. 2016) pad each image by 4 pixels,
take a random crop of the original size, and flip it left-right with probability 1/2. Here that
happens on the whole batch of the K networks of a stack at once, on the device the batch is on:
one padded copy and one ``gather``, no per-image Python and no DataLoader workers, so it costs a few
percent of a step even for the smallest network (benchmarks/throughput.py measures it).

What is drawn is a pure function of (network seed, epoch): every network has its own augmentation
stream, independent of which networks share its stack, and a resumed run draws exactly the same
crops and flips as an uninterrupted one.

Padding uses a black pixel, as torchvision's ``RandomCrop(32, padding=4)`` does on the raw image
before normalisation. Our images are normalised already, so "black" is each channel's smallest
value over the training set (every image set here has black pixels in every channel), which equals
``-mean / std`` of the normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")
PAD = 4


@dataclass(frozen=True)
class Draw:
    """One epoch's augmentation of one network: per sample position, crop offsets and flips."""

    dy: torch.Tensor  # int64 [n], 0..2*pad
    dx: torch.Tensor  # int64 [n]
    flip: torch.Tensor  # bool [n]


def draw(kind: str, seed: int, epoch: int, n: int, pad: int = PAD) -> Draw:
    """The crops and flips network ``seed`` applies in ``epoch`` to its samples, in order."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 0xA06) % (2**63 - 1))
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    flips = torch.randint(0, 2, (n,), generator=g).bool()
    crop = kind in ("crop", "crop_flip")
    flip = kind in ("flip", "crop_flip")
    if not crop:
        offsets = torch.full_like(offsets, pad)
    if not flip:
        flips = torch.zeros_like(flips)
    return Draw(offsets[0], offsets[1], flips)


def black_level(x_train: torch.Tensor) -> torch.Tensor:
    """Each channel's smallest training value ([C]): the normalised value of a black pixel."""
    return x_train.transpose(0, 1).reshape(x_train.shape[1], -1).amin(dim=1)


def apply(
    x: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    fill: torch.Tensor,
    pad: int = PAD,
) -> torch.Tensor:
    """Crop and flip a batch ``x`` ([N, C, H, W]) image by image, all in one gather.

    Image ``i`` becomes the ``H x W`` window at (``dy[i]``, ``dx[i]``) of itself padded by ``pad``
    pixels of ``fill`` ([C]) on every side, mirrored left-right where ``flip[i]``. With
    ``dy = dx = pad`` and no flip it is returned unchanged.
    """
    n, c, h, w = x.shape
    device = x.device
    padded = fill.to(x.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    rows = dy.to(device).view(n, 1) + torch.arange(h, device=device)  # [N, H]
    ramp = torch.arange(w, device=device)
    cols = torch.where(flip.to(device).view(n, 1), (w - 1) - ramp, ramp) + dx.to(device).view(n, 1)
    index = (rows.unsqueeze(2) * (w + 2 * pad) + cols.unsqueeze(1)).view(n, 1, h * w)
    out = torch.gather(padded.view(n, c, -1), 2, index.expand(n, c, h * w))
    return out.view(n, c, h, w)
