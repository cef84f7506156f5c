"""The networks of the papers, and a small GPT (``gpt_tiny``) for tickets in language models.

Every builder takes the input shape and class count from the data set, so one architecture works on
MNIST, MNIST-1D and CIFAR alike. The LTH paper's networks (LeNet, Conv-2/4/6) are plain
``nn.Sequential`` with the Gaussian Glorot init of Frankle & Carbin, so they stack on the fast path;
the MNIST-1D notebook's MLP is the same kind of ``nn.Sequential`` but keeps PyTorch's default init,
as the notebook does. The deep CIFAR networks of the follow-ups (``resnet20``, ``vgg16``,
``resnet18``) are ordinary modules with BatchNorm and the Kaiming init of OpenLTH; their output
layer is always called ``fc`` so a preset can leave it out of pruning by name.

A model name may carry options after a colon, ``resnet20:width=0.5``: keyword arguments of the
builder (the deep networks take ``width``, a multiplier of every layer's channel count).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TicketlabError

ModelBuilder = Callable[..., nn.Module]


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


class ResidualMLP(nn.Module):
    """The notebook's ``SparseMLP`` exactly: ``h = relu(linear1(x)); h = h + relu(linear2(h))``."""

    def __init__(self, inputs: int, hidden: int, num_classes: int):
        super().__init__()
        self.linear1 = nn.Linear(inputs, hidden)  # created in the notebook's order: same init
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.linear1(x.flatten(1)))
        return self.linear3(h + torch.relu(self.linear2(h)))


def mnist1d_resmlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``mnist1d_mlp`` with the notebook's residual connection around the middle layer; with the
    same seed its weights are ``mnist1d_mlp``'s (layers are created in the same order)."""
    return ResidualMLP(_flat_size(input_shape), 500, num_classes)


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


# --- deep CIFAR networks with BatchNorm (the rewinding follow-ups) --------------------------------


def _kaiming(model: nn.Module) -> nn.Module:
    """OpenLTH's init for its CIFAR networks (``kaiming_normal`` + ``batchnorm_init='uniform'``):
    Kaiming-normal conv and linear weights, BatchNorm scale uniform in [0, 1) and shift zero;
    biases keep PyTorch's default. The tickets of the rewinding papers were found from this init.
    """
    for layer in model.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.uniform_(layer.weight, 0.0, 1.0)
            nn.init.zeros_(layer.bias)
    return model


def _image_channels(input_shape: tuple[int, ...], model: str, min_side: int = 1) -> int:
    if len(input_shape) != 3:
        raise TicketlabError(
            f"{model} needs image data (channels, height, width); got input shape {input_shape}"
        )
    if min(input_shape[1:]) < min_side:
        raise TicketlabError(
            f"{model} needs images of at least {min_side}x{min_side} pixels; got {input_shape}"
        )
    return input_shape[0]


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers around a residual connection (He et al. 2016).

    The shortcut is the identity, or a strided 1x1 conv + BatchNorm where the shape changes
    (OpenLTH's choice, He et al.'s option B); the ReLU comes after the sum.
    """

    def __init__(self, f_in: int, f_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or f_in != f_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False), nn.BatchNorm2d(f_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem conv, stages of basic blocks (the first of each stage after the first strides 2),
    global average pooling and the output layer ``fc``."""

    def __init__(self, in_channels: int, stem: int, plan: list[tuple[int, int]], num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(stem)
        blocks, current = [], stem
        for stage, (filters, count) in enumerate(plan):
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(current, filters, stride))
                current = filters
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet20(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016; OpenLTH cifar_resnet_20): 3x3 blocks, 16-64, 0.27M."""
    channels = _image_channels(input_shape, "resnet20")
    w = [_scaled(c, width) for c in (16, 32, 64)]
    return _kaiming(ResNet(channels, w[0], [(w[0], 3), (w[1], 3), (w[2], 3)], num_classes))


def resnet18(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0) -> nn.Module:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool): 4x2 blocks, 64-512 channels, 11.2M."""
    channels = _image_channels(input_shape, "resnet18")
    w = [_scaled(c, width) for c in (64, 128, 256, 512)]
    return _kaiming(ResNet(channels, w[0], [(c, 2) for c in w], num_classes))


_VGG16_PLAN: list[int | str] = [
    *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
]


class VGG(nn.Module):
    """Conv3x3 + BatchNorm + ReLU layers with max-pools (``features``), global average pooling,
    one output layer ``fc`` (the CIFAR VGG of OpenLTH and of Frankle et al. 2020)."""

    def __init__(self, in_channels: int, plan: list[int | str], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        current = in_channels
        for spec in plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(spec, int)
                layers += [nn.Conv2d(current, spec, 3, padding=1), nn.BatchNorm2d(spec), nn.ReLU()]
                current = spec
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # on 32x32 inputs the features are 2x2 here, and this is OpenLTH's AvgPool2d(2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def vgg16(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0) -> nn.Module:
    """VGG-16 for CIFAR with BatchNorm (OpenLTH cifar_vgg_16): 13 conv layers, fc 512, 14.7M."""
    channels = _image_channels(input_shape, "vgg16", min_side=16)
    plan = [s if s == "M" else _scaled(int(s), width) for s in _VGG16_PLAN]
    return _kaiming(VGG(channels, plan, num_classes))


# --- a small GPT ------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with explicit q/k/v/out ``nn.Linear`` projections.

    Explicit Linear layers (not ``nn.MultiheadAttention``, whose fused ``in_proj_weight`` is a raw
    parameter) let the mask, the pruning criteria and Wanda see four ordinary weight matrices.
    The causal mask is built inside ``forward`` (no buffer), so the module is stateless and
    ``torch.func.vmap`` can train many copies side by side.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise TicketlabError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        # written out, not F.scaled_dot_product_attention: vmap has no batching rule for the CPU
        # kernel of the latter and falls back to a loop over the networks (it warns so)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        future = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)
        y = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, mlp_ratio * width)
        self.proj = nn.Linear(mlp_ratio * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.proj(F.gelu(self.fc(self.ln2(h))))


class GPT(nn.Module):
    """Decoder-only transformer over token ids ``[B, T]`` -> next-token logits ``[B, T, vocab]``.

    The output head is tied to the token embedding (GPT-2), so the prunable matrices by default
    (``prunable_names``: Linear weights) are exactly the attention and MLP matrices; embeddings,
    LayerNorms and biases are never pruned unless asked for. Inputs may arrive as floats (the
    trainer's example batch is cast to the training dtype); ids are exact integers either way.
    """

    output_layer = None  # the head is the tied embedding: no Linear gets the output-layer rate

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int, mlp: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x.long()
        positions = torch.arange(idx.shape[-1], device=idx.device)
        h = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok.weight.T


def _gpt_init(model: GPT, layers: int) -> GPT:
    """GPT-2's init: N(0, 0.02) for matrices and embeddings, residual projections scaled by
    1/sqrt(2 * layers), zero biases, LayerNorm at identity."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("out", "proj")) else 0.02
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    return model


def gpt_tiny(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    layers: float = 2,
    width: float = 64,
    heads: float = 4,
    mlp: float = 4,
) -> nn.Module:
    """Character-level GPT (decoder-only; nanoGPT's layout, scaled down): 2 blocks, width 64."""
    if len(input_shape) != 1:
        raise TicketlabError(
            f"gpt_tiny needs token sequences (context length,); got input shape {input_shape}"
        )
    sizes = {"layers": layers, "width": width, "heads": heads, "mlp": mlp}
    for key, value in sizes.items():
        if value < 1 or value != int(value):
            raise TicketlabError(f"gpt_tiny option {key} must be a whole number >= 1, got {value}")
    n_layers, n_width, n_heads, n_mlp = (int(v) for v in sizes.values())
    model = GPT(num_classes, input_shape[0], n_width, n_layers, n_heads, n_mlp)
    return _gpt_init(model, n_layers)


MODELS: dict[str, ModelBuilder] = {
    "lenet_300_100": lenet_300_100,
    "mnist1d_mlp": mnist1d_mlp,
    "mnist1d_resmlp": mnist1d_resmlp,
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
    "resnet20": resnet20,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "gpt_tiny": gpt_tiny,
}


def parse_model_name(name: str) -> tuple[str, dict[str, float]]:
    """``"resnet20:width=0.5"`` -> ``("resnet20", {"width": 0.5})``, checked against the builder.

    Every problem (unknown base name, malformed or unknown option, value out of range) is one
    ``TicketlabError`` naming what is accepted.
    """
    base, colon, rest = name.partition(":")
    if base not in MODELS:
        raise TicketlabError(f"unknown model {base!r}; known models: {', '.join(MODELS)}")
    accepted = _options_of(MODELS[base])
    options: dict[str, float] = {}
    for item in rest.split(",") if rest else ():
        key, eq, value = item.partition("=")
        if not eq or key not in accepted:
            known = ", ".join(f"{k}=<number>" for k in accepted) or "none"
            raise TicketlabError(f"model option {item!r} of {base} is not known; options: {known}")
        try:
            number = float(value)
        except ValueError:
            raise TicketlabError(f"model option {key} must be a number, got {value!r}") from None
        if not (math.isfinite(number) and number > 0):
            raise TicketlabError(f"model option {key} must be a positive number, got {value}")
        options[key] = number
    if colon and not options:
        raise TicketlabError(f"model name {name!r} has an empty option list after ':'")
    return base, options


def _options_of(builder: ModelBuilder) -> list[str]:
    params = inspect.signature(builder).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def is_known_model(name: str) -> bool:
    try:
        parse_model_name(name)
    except TicketlabError:
        return False
    return True


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the seed fixes the init so replicates are reproducible."""
    base, options = parse_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[base](input_shape, num_classes, **options)
