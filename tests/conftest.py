import os

import pytest

os.environ.setdefault("TICKETLAB_DATA_DIR", os.path.join(os.path.dirname(__file__), ".data-cache"))


def pytest_configure(config):
    """The tests train with thread lanes and process lanes in one process, which can hang a forked
    child unless MKL's buffer manager was off from the start (src/ticketlab/train/process_lanes.py):
    one clear line instead of a hung run."""
    import torch

    from ticketlab.train.process_lanes import fork_available

    unsafe = fork_available() and torch.backends.mkl.is_available()
    if unsafe and "MKL_DISABLE_FAST_MM" not in os.environ:
        raise pytest.UsageError(
            "run the tests with MKL_DISABLE_FAST_MM=1 in the environment (make test does): "
            "they switch between thread and process lanes, which MKL's buffer manager does "
            "not survive in a forked child"
        )


@pytest.fixture
def tiny_settings(tmp_path):
    """A ticket search that takes a few seconds: LeNet-300-100 on scikit-learn's digits."""
    return {
        "model": "lenet_300_100",
        "data": "digits",
        "levels": 2,
        "replicates": 2,
        "steps": 60,
        "batch_size": 32,
        "eval_every": 20,
        "lr": 1.2e-3,
        "checkpoint_every": 25,
        "report": False,
        "out": str(tmp_path / "run"),
    }
