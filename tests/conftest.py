import os

import pytest

os.environ.setdefault("TICKETLAB_DATA_DIR", os.path.join(os.path.dirname(__file__), ".data-cache"))


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
