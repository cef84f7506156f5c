"""The networks of the papers, as plain ``nn.Sequential`` so they can be stacked and exported.

Every builder takes the input shape and class count from the data set, so one architecture works on
MNIST, MNIST-1D and CIFAR alike. Weights use the Gaussian Glorot init of Frankle & Carbin, except
the MNIST-1D notebook's MLP, which keeps PyTorch's default init as the notebook does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import TicketlabError

ModelBuilder = Callable[[tuple[int, ...], int], nn.Sequential]


def _glorot(model: nn.Module) -> nn.Module:
    for layer in model.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return model


def _flat_size(input_shape: tuple[int, ...]) -> int:
    size = 1
    for dim in input_shape:
        size *= dim
    return size


def _mlp(input_shape: tuple[int, ...], hidden: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat_size(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet_300_100(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Lenet-300-100 of LeCun et al. 1998, the LTH paper's MNIST network (266K weights)."""
    return _glorot(_mlp(input_shape, [300, 100], num_classes))


def mnist1d_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The MLP of the MNIST-1D lottery notebook (Greydanus): 40-500-500-10, PyTorch's default init.

    The notebook keeps ``nn.Linear``'s own init (uniform, bound 1/sqrt(fan_in)) rather than Glorot;
    with Glorot its tickets fall 4-8 points short of the published column (issue 10)."""
    return _mlp(input_shape, [500, 500], num_classes)


def _conv_net(input_shape: tuple[int, ...], num_classes: int, blocks: list[int]) -> nn.Sequential:
    """Conv-2/4/6 of the LTH paper: pairs of 3x3 convs then max-pool, then fc 256-256-classes."""
    if len(input_shape) != 3:
        raise TicketlabError(
            f"conv nets need image data (channels, height, width); got input shape {input_shape}"
        )
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out in blocks:
        layers += [
            nn.Conv2d(channels, out, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(out, out, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, height, width = out, height // 2, width // 2
    layers.append(nn.Flatten())
    layers += [nn.Linear(channels * height * width, 256), nn.ReLU()]
    layers += [nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes)]
    return _glorot(nn.Sequential(*layers))


def conv2(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Conv-2: 64,64,pool then fc 256,256."""
    return _conv_net(input_shape, num_classes, [64])


def conv4(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Conv-4: 64,64,pool,128,128,pool then fc 256,256."""
    return _conv_net(input_shape, num_classes, [64, 128])


def conv6(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Conv-6: 64,64,pool,128,128,pool,256,256,pool then fc 256,256."""
    return _conv_net(input_shape, num_classes, [64, 128, 256])


MODELS: dict[str, ModelBuilder] = {
    "lenet_300_100": lenet_300_100,
    "mnist1d_mlp": mnist1d_mlp,
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Sequential:
    """A freshly initialised model; the seed fixes the init so replicates are reproducible."""
    if name not in MODELS:
        raise TicketlabError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes)
