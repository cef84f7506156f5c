"""The networks of the papers, as plain ``nn.Sequential`` so they can be stacked and exported, and
a small GPT (``gpt_tiny``) for the question of tickets in language models.

Every builder takes the input shape and class count from the data set, so one architecture works on
MNIST, MNIST-1D and CIFAR alike. Weights use the Gaussian Glorot init of Frankle & Carbin.
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
    """The MLP of the MNIST-1D lottery notebook (Greydanus): 40-500-500-10."""
    return _glorot(_mlp(input_shape, [500, 500], num_classes))


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
        # kernel of the latter and would loop over the networks one by one (measured ~10x slower)
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
    layers: int = 2,
    width: int = 64,
    heads: int = 4,
    mlp: int = 4,
) -> nn.Module:
    """Character-level GPT (decoder-only; nanoGPT's layout, scaled down): 2 blocks, width 64."""
    if len(input_shape) != 1:
        raise TicketlabError(
            f"gpt_tiny needs token sequences (context length,); got input shape {input_shape}"
        )
    for key, value in {"layers": layers, "width": width, "heads": heads, "mlp": mlp}.items():
        if value < 1:
            raise TicketlabError(f"gpt_tiny option {key} must be >= 1, got {value}")
    model = GPT(num_classes, input_shape[0], width, layers, heads, mlp)
    return _gpt_init(model, layers)


MODELS: dict[str, ModelBuilder] = {
    "lenet_300_100": lenet_300_100,
    "mnist1d_mlp": mnist1d_mlp,
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
    "gpt_tiny": gpt_tiny,
}


def parse_model_name(name: str) -> tuple[str, dict[str, int]]:
    """``"gpt_tiny:layers=4,width=128"`` -> ``("gpt_tiny", {"layers": 4, "width": 128})``.

    Sizes ride in the model name so that everything that records or rebuilds a model (the run's
    config, the export's metadata) carries them without a new field.
    """
    base, _, rest = name.partition(":")
    options: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip().lstrip("-").isdigit():
            raise TicketlabError(f"model option {item!r} in {name!r} must be key=integer")
        options[key.strip()] = int(value)
    return base, options


def check_model_name(name: str) -> None:
    """Raise ``TicketlabError`` unless ``name`` is a registered model with options it accepts."""
    base, options = parse_model_name(name)
    if base not in MODELS:
        raise TicketlabError(f"unknown model {base!r}; known models: {', '.join(MODELS)}")
    accepted = list(inspect.signature(MODELS[base]).parameters)[2:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = ", ".join(accepted) or "none"
        raise TicketlabError(f"model {base!r} has no option {unknown[0]!r} (options: {known})")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the seed fixes the init so replicates are reproducible."""
    check_model_name(name)
    base, options = parse_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[base](input_shape, num_classes, **options)
