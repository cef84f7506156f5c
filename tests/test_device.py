"""Devices and precision: resolution and its one-line errors, mixed precision keeping masks exact,
checkpoints on the CPU whatever the device, and the dry run's plan."""

import dataclasses
import math

import pytest
import torch

from ticketlab.api import run_search
from ticketlab.cli import main
from ticketlab.core.mask import Mask, prunable_names
from ticketlab.errors import TicketlabError
from ticketlab.io.config import resolve
from ticketlab.io.run_files import level_dir, load_replicates
from ticketlab.train.device import placement, resolve_device, to_cpu
from ticketlab.train.trainer import Job, TrainSpec, place_data, train
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model

CUDA = torch.cuda.is_available()


def test_auto_is_cuda_when_present_else_cpu():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line(name, capsys, tiny_settings):
    code = main(["find", "--model", "lenet_300_100", "--data", "digits", "--device", name])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
        (["--precision", "bf16", "--dtype", "float64"], "needs dtype float32"),
    ],
)
def test_bad_device_or_precision_is_one_line_before_writing(flags, message, capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["find", "--data", "digits", "--model", "lenet_300_100", "--out", str(out), *flags]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_placement_rejects_fp16_on_cpu_and_accepts_bf16():
    with pytest.raises(TicketlabError, match="fp16 needs a GPU"):
        placement("cpu", "fp16")
    where = placement("cpu", "bf16")
    assert where.mixed and where.grad_scaler() is None
    with where.autocast():
        y = torch.randn(3, 4) @ torch.randn(4, 2)
    assert y.dtype == torch.bfloat16


def _jobs(template, density: float, k: int = 2) -> list[Job]:
    state = {n: t.detach().clone() for n, t in template.state_dict().items()}
    names = prunable_names(template)
    g = torch.Generator().manual_seed(0)
    mask = Mask({n: torch.rand(state[n].shape, generator=g) < density for n in names})
    return [Job(state, mask, data_seed=i) for i in range(k)]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 0.1, 0)


def test_bf16_trains_fp32_weights_and_keeps_masks_exact(digits):
    template = build_model("lenet_300_100", digits.input_shape, digits.num_classes, seed=0)
    jobs = _jobs(template, 0.3)
    spec = TrainSpec(steps=30, batch_size=32, eval_every=10, precision="bf16")
    results = train(template, jobs, digits, spec)
    fp32 = train(template, jobs, digits, dataclasses.replace(spec, precision="fp32"))
    for job, res, ref in zip(jobs, results, fp32, strict=True):
        for name in job.mask.names():
            for state in (res.final, res.early_stop):
                assert state[name].dtype == torch.float32  # master weights
                assert torch.all(state[name][~job.mask[name]] == 0)  # exact zeros
        # bf16 is an approximation of the same training, not another one, and not fp32 itself
        assert abs(res.final_test_acc - ref.final_test_acc) < 0.1
        assert not torch.equal(res.final["1.weight"], ref.final["1.weight"])


def test_bf16_resume_from_checkpoint_is_bit_identical(digits):
    template = build_model("lenet_300_100", digits.input_shape, digits.num_classes, seed=0)
    jobs = _jobs(template, 0.5)
    spec = TrainSpec(steps=24, batch_size=32, eval_every=5, precision="bf16")
    first = Keep(every=7)
    full = train(template, jobs, digits, spec, stack_size=2, checkpointers=[first])
    for saved in first.saved:
        again = train(template, jobs, digits, spec, stack_size=2, checkpointers=[Keep(7, saved)])
        for a, b in zip(full, again, strict=True):
            assert a.curve == b.curve and a.early_stop_iter == b.early_stop_iter
            for state, other in ((a.final, b.final), (a.early_stop, b.early_stop)):
                assert all(torch.equal(state[n], other[n]) for n in state)


def test_early_stop_weights_are_those_at_the_validation_minimum(digits):
    """The kept copy equals the final weights of a run stopped at early_stop_iter."""
    template = build_model("lenet_300_100", digits.input_shape, digits.num_classes, seed=0)
    jobs = _jobs(template, 1.0)
    spec = TrainSpec(steps=60, batch_size=32, eval_every=10, lr=5e-2)  # lr high: val loss turns
    results = train(template, jobs, digits, spec, stack_size=2)
    for i, res in enumerate(results):
        curve = res.curve["val_loss"]
        best = min(range(len(curve)), key=lambda j: (curve[j], j))
        assert res.early_stop_iter == int(res.curve["iteration"][best])
        stop = res.early_stop_iter
        if stop:
            short = dataclasses.replace(spec, steps=stop)
            expected = train(template, jobs, digits, short, stack_size=2)[i].final
        else:
            expected = jobs[i].init
        for name, tensor in res.early_stop.items():
            assert torch.equal(tensor, expected[name]), name


class Keep:
    """A checkpointer in memory."""

    def __init__(self, every: int, resume_from: dict | None = None):
        self.every, self.resume_from, self.saved = every, resume_from, []

    def load(self):
        return self.resume_from

    def save(self, state):
        self.saved.append(state)


def test_checkpoints_hold_cpu_tensors_and_results_come_back_on_cpu(digits):
    template = build_model("lenet_300_100", digits.input_shape, digits.num_classes, seed=0)
    keep = Keep(every=10)
    jobs = _jobs(template, 0.5)
    spec = TrainSpec(steps=20, batch_size=16, eval_every=10)
    res = train(template, jobs, digits, spec, stack_size=2, checkpointers=[keep])
    saved = keep.saved

    def devices(obj):
        if isinstance(obj, torch.Tensor):
            yield obj.device
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from devices(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                yield from devices(v)

    assert saved and {d.type for s in saved for d in devices(s)} == {"cpu"}
    assert "best" in saved[0] and "seeds" in saved[0]
    assert {t.device.type for r in res for t in r.final.values()} == {"cpu"}


def test_to_cpu_copies_from_the_meta_device():
    """The plumbing that makes checkpoints device-independent, on a non-CPU device (meta)."""
    nested = {"a": torch.empty(3, device="meta"), "b": [torch.ones(2)], "c": 4}
    assert to_cpu({"b": nested["b"], "c": 4})["b"][0].device.type == "cpu"
    with pytest.raises(NotImplementedError):  # meta has no data to copy: it really moves
        to_cpu(nested)


def test_place_data_moves_once_and_is_free_when_already_there(digits):
    placed = place_data(digits, torch.float32, torch.device("cpu"))
    assert placed is digits
    as64 = place_data(digits, torch.float64, torch.device("cpu"))
    assert as64.x_train.dtype == torch.float64 and as64.y_train.dtype == torch.int64
    assert place_data(as64, torch.float64, torch.device("cpu")) is as64
    meta = place_data(digits, torch.float32, torch.device("meta"))
    assert {getattr(meta, f).device.type for f in ("x_train", "y_val", "x_test")} == {"meta"}


def test_precision_is_part_of_the_experiment_but_fp32_keeps_old_hashes(tiny_settings):
    bf16 = resolve({**tiny_settings, "precision": "bf16"})
    fp32 = resolve({**tiny_settings, "precision": "fp32"})
    assert bf16.hash() != fp32.hash()
    assert "precision" not in fp32.identity() and "device" not in bf16.identity()
    assert resolve({**tiny_settings, "device": "cpu"}).hash() == fp32.hash()


def test_bf16_search_writes_early_stop_weights(tiny_settings):
    search = run_search(resolve({**tiny_settings, "levels": 1, "precision": "bf16"}))
    rel = f"{level_dir(1)}/ticket_early_stop.safetensors"
    early = load_replicates(search.store, rel, search.config)
    assert len(early) == 2 and all(t.dtype == torch.float32 for s in early for t in s.values())


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_settings, capsys, tmp_path):
    out = tmp_path / "planned"
    argv = ["find", "--model", "lenet_300_100", "--data", "digits", "--levels", "3"]
    argv += ["--replicates", "2", "--steps", "40", "--out", str(out), "--dry-run"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "networks per level [2, 6, 6, 6]" in printed
    assert "networks 20 x 40 steps = 800 network-steps" in printed
    assert "FLOP" in printed and "estimated time on cpu" in printed
    assert not out.exists()


def test_plan_flops_match_a_hand_count():
    from ticketlab.studies.imp_plan import plan_search

    config = resolve({"model": "lenet_300_100", "data": "digits", "levels": 1, "batch_size": 10})
    plan = plan_search(config, calibrate=False)
    macs = 64 * 300 + 300 * 100 + 100 * 10  # digits: 8x8 inputs
    # forward, weight gradients, and input gradients of every layer but the first
    expected = 2 * 10 * (macs + macs + (macs - 64 * 300))
    assert plan.flops_per_step == expected
    assert math.isfinite(plan.remaining_seconds())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_run_resumes_on_cpu(tiny_settings):  # pragma: no cover - no GPU on the CI machine
    gpu = run_search(resolve({**tiny_settings, "levels": 1, "device": "cuda"}))
    cpu = run_search(resolve({**tiny_settings, "levels": 2, "device": "cpu"}))
    assert gpu.run_dir == cpu.run_dir and len(cpu.levels) == 3
    for res in (gpu, cpu):
        final = load_replicates(res.store, f"{level_dir(1)}/ticket_final.safetensors", res.config)
        assert {t.device.type for s in final for t in s.values()} == {"cpu"}


def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_gpu_check_without_cuda_says_so_in_one_line(capsys):
    assert _gpu_check().main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and len(out.strip().splitlines()) == 1


def test_dry_run_plans_a_set_that_is_not_downloaded_yet(tmp_path, monkeypatch, capsys):
    """CIFAR-10 absent from the cache: planned on stand-in tensors, nothing fetched or written."""
    from ticketlab.zoo import data as data_module

    monkeypatch.setenv("TICKETLAB_DATA_DIR", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not download")

    monkeypatch.setattr(data_module, "fetch", no_network)
    out = tmp_path / "planned"
    argv = ["find", "--model", "lenet_300_100", "--data", "cifar10", "--levels", "1"]
    argv += ["--steps", "20", "--batch-size", "8", "--out", str(out), "--dry-run"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "cifar10 is not downloaded yet" in printed
    assert "estimated time on cpu" in printed
    assert not out.exists() and not (tmp_path / "cache").exists()
    stand_in = data_module.stand_in("cifar10")  # the real sizes, 45,000 / 5,000 / 10,000
    assert stand_in.x_train.shape == (45_000, 3, 32, 32) and stand_in.x_test.shape[0] == 10_000
    assert stand_in.num_classes == 10


def test_training_flushes_denormals_only_while_it_trains():
    """Denormals cost microcode assists; training flushes them in its thread and leaves the
    thread as torch starts it."""
    from ticketlab.train.device import denormals_flushed

    tiny = torch.tensor([1e-39])  # below float32's smallest normal, 1.2e-38
    assert (tiny * 1.0).item() != 0.0
    with denormals_flushed():
        flushed = (tiny * 1.0).item()
    assert (tiny * 1.0).item() != 0.0
    supported = torch.set_flush_denormal(True)  # whether this CPU can flush at all
    torch.set_flush_denormal(False)
    assert flushed == (0.0 if supported else tiny.item())
