"""The deep CIFAR networks (ResNet-20, VGG-16, ResNet-18) and their recipes: shapes and parameter
counts against the papers and a hand count, BatchNorm never pruned, the output layer left out of
global pruning by the presets, counts in epochs, and a tiny end-to-end run of each model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ticketlab.cli import main
from ticketlab.core.mask import Mask, layer_kinds, prunable_names
from ticketlab.core.pruning import prune
from ticketlab.errors import TicketlabError
from ticketlab.io.config import resolve
from ticketlab.studies.common import train_spec
from ticketlab.train.trainer import Job, TrainSpec, train
from ticketlab.zoo.data import Dataset
from ticketlab.zoo.models import build_model, parse_model_name

CIFAR = (3, 32, 32)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int = 3, bias: bool = False) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def resnet_count(stem: int, plan: list[tuple[int, int]], classes: int, c_in: int = 3) -> int:
    """Hand count of a CIFAR ResNet with 1x1-conv + BatchNorm shortcuts where the shape changes."""
    total = conv(c_in, stem) + bn(stem)
    current = stem
    for stage, (filters, blocks) in enumerate(plan):
        for b in range(blocks):
            total += conv(current, filters) + bn(filters) + conv(filters, filters) + bn(filters)
            if (stage > 0 and b == 0) or current != filters:
                total += conv(current, filters, 1) + bn(filters)
            current = filters
    return total + current * classes + classes


def test_resnet20_has_the_papers_027m_parameters_and_shapes():
    model = build_model("resnet20", CIFAR, 10, seed=0)
    count = n_params(model)
    assert count == resnet_count(16, [(16, 3), (32, 3), (64, 3)], 10) == 272_474
    assert round(count / 1e6, 2) == 0.27  # He et al. 2016, Table 6: 0.27M
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 conv layers and the fc layer: "ResNet-20"
    assert [c.out_channels for c in convs[1::6]] == [16, 32, 64]
    assert model(torch.randn(2, *CIFAR)).shape == (2, 10)


def test_vgg16_and_resnet18_parameter_counts():
    vgg = build_model("vgg16", CIFAR, 10, seed=0)
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    expected, current = 0, 3
    for spec in plan:
        if spec != "M":
            expected += conv(current, spec, bias=True) + bn(spec)
            current = spec
    expected += 512 * 10 + 10
    assert n_params(vgg) == expected == 14_728_266  # OpenLTH cifar_vgg_16: 14.7M
    # VGG-16's 13 conv layers; the CIFAR version has one fc layer where ImageNet's has three
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 13
    resnet18 = build_model("resnet18", CIFAR, 10, seed=0)
    assert n_params(resnet18) == resnet_count(64, [(64, 2), (128, 2), (256, 2), (512, 2)], 10)
    assert n_params(resnet18) == 11_173_962  # the CIFAR ResNet-18 everyone quotes as 11.2M
    with torch.no_grad():
        assert vgg.eval()(torch.randn(1, *CIFAR)).shape == (1, 10)


def test_width_option_scales_channels_and_inputs_adapt():
    half = build_model("resnet20:width=0.5", (1, 32, 32), 7, seed=0)
    assert n_params(half) == resnet_count(8, [(8, 3), (16, 3), (32, 3)], 7, c_in=1)
    assert half(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    assert half(torch.randn(3, 1, 28, 28)).shape == (3, 7)  # global pooling: any size
    assert parse_model_name("vgg16:width=0.25") == ("vgg16", {"width": 0.25})


@pytest.mark.parametrize(
    "name",
    ["resnet20:depth=3", "resnet20:width=", "resnet20:width=abc", "resnet20:width=-1",
     "resnet20:width=nan", "resnet20:", "resnet21", "conv2:width=2"],
)  # fmt: skip
def test_bad_model_names_are_one_clear_error(name):
    with pytest.raises(TicketlabError):
        build_model(name, CIFAR, 10, seed=0)
    with pytest.raises(TicketlabError):
        resolve({"model": name, "data": "mnist5k", "steps": 10})


def test_images_too_small_or_not_images_are_refused():
    with pytest.raises(TicketlabError, match="at least 16x16"):
        build_model("vgg16", (1, 8, 8), 10, seed=0)
    with pytest.raises(TicketlabError, match="image data"):
        build_model("resnet20", (40,), 10, seed=0)


def test_init_is_openlths_and_seeded():
    a = build_model("resnet20", CIFAR, 10, seed=3)
    b = build_model("resnet20", CIFAR, 10, seed=3)
    c = build_model("resnet20", CIFAR, 10, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in prunable_names(a))
    gammas = torch.cat([m.weight.detach() for m in a.modules() if isinstance(m, nn.BatchNorm2d)])
    assert float(gammas.min()) >= 0 and float(gammas.max()) < 1  # uniform [0, 1)
    assert all(
        float(m.bias.detach().abs().max()) == 0
        for m in a.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    w = a.blocks[8].conv2.weight.detach()  # Kaiming normal, fan-in 64*9: std sqrt(2/576)
    assert float(w.std()) == pytest.approx((2 / 576) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "resnet18"])
def test_presets_leave_batchnorm_and_the_output_layer_out_of_global_pruning(name):
    config = resolve({"model": name, "data": "mnist5k_32"})
    recipe = (config.optimizer, config.lr, config.momentum, config.weight_decay, config.batch_size)
    assert recipe == ("sgd", 0.1, 0.9, 1e-4, 128)
    assert (config.scope, config.conv_rate, config.exclude) == ("global", 0.2, ["fc"])
    model = build_model(f"{name}:width=0.125", (1, 32, 32), 10, seed=0)
    names = prunable_names(model, config.prune_biases, config.exclude)
    bn_params = {
        f"{m_name}.{p}"
        for m_name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    assert bn_params and not bn_params & set(names)
    assert "fc.weight" not in names and "fc.bias" not in names
    assert set(layer_kinds(model)[n] for n in names) == {"conv"}
    # one level of global magnitude pruning: exactly 20% of the conv weights go, nothing else
    weights = dict(model.named_parameters())
    mask = Mask.ones_like({n: weights[n] for n in names})
    scores = {n: weights[n].abs() for n in names}
    pruned = prune(mask, scores, {n: config.conv_rate for n in names}, config.scope)
    assert pruned.alive() == mask.size() - round(0.2 * mask.size())
    # without the exclusion the fc layer competes in the ranking
    with_fc = prunable_names(model)
    assert "fc.weight" in with_fc and not bn_params & set(with_fc)


def test_counts_in_epochs_become_steps():
    # mnist5k: 4000 training examples, 10% held out -> 3600 // 128 = 28 steps an epoch
    config = resolve({"model": "resnet20", "data": "mnist5k_32"})
    assert (config.steps, config.milestones, config.eval_every) == (4480, [2240, 3360], 28)
    assert train_spec(config).milestones == (2240, 3360)
    assert train_spec(config).augment == "crop_flip"
    mixed = resolve(
        {
            "model": "resnet20",
            "data": "mnist5k",
            "steps": "2.5ep",
            "milestones": [10, "1ep"],
            "warmup_steps": "7it",
            "eval_every": 5,
            "rewind_step": "0.5ep",
        }
    )
    assert (mixed.steps, mixed.milestones, mixed.warmup_steps) == (70, [10, 28], 7)
    assert mixed.rewind_step == 14
    cifar = resolve({"model": "vgg16", "data": "cifar10"})  # no download: sizes are known
    assert (cifar.steps, cifar.milestones) == (160 * 351, [80 * 351, 120 * 351])


@pytest.mark.parametrize(
    "settings",
    [{"steps": "10 epochs"}, {"steps": "ep"}, {"milestones": ["1x"]}, {"warmup_steps": "1.5it"},
     {"steps": "2ep", "milestones": ["3ep"]}, {"warmup_steps": -1}, {"warmup_steps": 2.5},
     {"milestones": [True]}, {"milestones": "10,20"}, {"augment": "rotate"},
     {"steps": "1ep", "data": "custom"}],
)  # fmt: skip
def test_bad_counts_are_one_clear_error(settings):
    with pytest.raises(TicketlabError):
        resolve({"model": "resnet20", "data": "mnist5k", **settings})


def test_cli_takes_epochs_milestones_and_augment(tmp_path, capsys):
    code = main(
        ["find", "--model", "resnet20:width=0.125", "--data", "mnist5k", "--steps", "2ep",
         "--milestones", "1ep,50", "--augment", "rotate", "--out", str(tmp_path / "r")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "augment" in err[0]
    assert not (tmp_path / "r").exists()


def tiny_images(n: int = 48, shape=(3, 12, 12), classes: int = 4, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, *shape, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.5
    return Dataset("tiny", x, y, x[:16], y[:16], x[:16], y[:16])


@pytest.mark.parametrize(
    "name", ["resnet20:width=0.25", "vgg16:width=0.0625", "resnet18:width=0.0625"]
)
def test_tiny_end_to_end_training_of_each_model(name):
    """Trains (SGD with warmup and a milestone, augmentation), pruned weights stay zero,
    BatchNorm statistics move, the output layer is left dense, and (ResNet-20) the result is
    reproducible bit for bit."""
    shape = (3, 16, 16) if name.startswith("vgg") else (3, 8, 8)
    data = tiny_images(shape=shape)
    template = build_model(name, shape, 4, seed=0)
    spec = TrainSpec(
        steps=4, batch_size=8, optimizer="sgd", lr=0.05, weight_decay=1e-4, eval_every=2,
        milestones=(3,), warmup_steps=2, augment="crop_flip",
    )  # fmt: skip
    names = prunable_names(template, exclude=["fc"])
    init = {k: v.clone() for k, v in build_model(name, shape, 4, seed=1).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(init[n].shape, generator=g) > 0.5 for n in names})
    jobs = [Job(init, mask, data_seed=1)]
    (result,) = train(template, jobs, data, spec)
    assert result.curve["iteration"] == [0.0, 2.0, 4.0]
    for n in names:
        assert bool((result.final[n][~mask[n]] == 0).all())
    assert bool((result.final["fc.weight"] != 0).all())
    moved = [k for k in result.final if k.endswith("running_mean")]
    assert moved and all(not torch.equal(result.final[k], init[k]) for k in moved)
    if name.startswith("resnet20"):
        (again,) = train(template, jobs, data, spec)
        assert all(torch.equal(result.final[k], again.final[k]) for k in result.final)


def test_find_on_resnet20_end_to_end_masks_only_conv_weights(tmp_path, capsys):
    """The CLI path with the preset: one IMP level of a tiny ResNet-20 on the 32x32 digits."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    code = main(
        ["find", "--model", "resnet20:width=0.125", "--data", "mnist5k_32", "--levels", "1",
         "--replicates", "1", "--steps", "4", "--batch-size", "32", "--eval-every", "2",
         "--milestones", "3", "--no-controls", "--no-report", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    masks = load_file(out / "levels" / "level_01" / "masks.safetensors")
    assert masks and all(
        ".conv" in k or ".shortcut.0." in k or k == "r0/conv.weight" for k in masks
    )
    assert not any("bn" in k or "fc" in k or "shortcut.1" in k for k in masks)
    alive = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert alive == total - round(0.2 * total)  # global: 20% of all conv weights, in one ranking
