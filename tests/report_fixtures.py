"""A synthetic run folder in the engine's format, for the report tests (no training needed)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ticketlab.io.summary import STATS, spread

DEFAULT_BRANCHES = ("ticket", "reinit", "random_prune")
LAYERS = {"1.weight": 0.8, "3.weight": 0.8, "5.weight": 0.9}
EVAL_EVERY = 100
STEPS = 1000


def remaining(level: int) -> float:
    """Overall fraction of weights remaining at ``level`` (0.8 per level, as with fc_rate=0.2)."""
    return round(0.8**level, 6)


def accuracy(branch: str, level: int, replicate: int) -> float:
    """Tickets hold their accuracy, the controls lose it with sparsity; replicates differ."""
    drop = {"ticket": 0.001, "reinit": 0.03, "random_prune": 0.04}.get(branch, 0.02)
    return round(0.90 - drop * level + 0.01 * replicate, 6)


def _network(
    branch: str, level: int, replicate: int, diverged: bool, untrained: bool
) -> dict[str, object]:
    acc = 0.10 if diverged else accuracy(branch, level, replicate)
    iterations = list(range(0, STEPS + 1, EVAL_EVERY))
    stop = 400 + 100 * replicate + (0 if branch == "ticket" else 200)
    test_acc: list[float | None] = [
        round(0.1 + (acc - 0.1) * min(1.0, i / stop), 6) for i in iterations
    ]
    if diverged:
        test_acc = [0.1, 0.1, *[None] * (len(iterations) - 2)]
    curve = {
        "iteration": iterations,
        "train_loss": [None, *[1.0 / (1 + i) for i in iterations[1:]]],
        "val_loss": [1.0 - (v or 0) for v in test_acc],
        "val_acc": test_acc,
        "test_loss": [1.0 - (v or 0) for v in test_acc],
        "test_acc": test_acc,
    }
    return {
        "branch": branch,
        "replicate": replicate,
        "weights_remaining": remaining(level),
        "early_stop_iter": 100 if diverged else stop,
        "early_stop_test_acc": acc,
        "final_test_acc": 0.10 if diverged else round(acc - 0.01, 6),
        "untrained_test_acc": (0.1 + 0.01 * level) if untrained else None,
        "diverged": diverged,
        "diverged_at": 200 if diverged else None,
        "curve": curve,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # the engine's store stamps these two keys into every JSON file; the report must ignore them
    path.write_text(json.dumps({**obj, "_config_hash": "0123456789abcdef", "_checksum": "x"}))


def make_fake_run(
    path: Path,
    levels: int = 4,
    replicates: int = 2,
    branches: Iterable[str] = DEFAULT_BRANCHES,
    diverged: Iterable[tuple[int, str, int]] = (),
    summary: bool = True,
    untrained: bool = True,
    config_extra: str = "",
) -> Path:
    """A run folder with ``levels + 1`` levels (0 = dense, ticket only); ``diverged`` lists
    (level, branch, replicate) networks that diverged. Returns ``path``."""
    path = Path(path)
    branches = tuple(branches)
    broken = set(diverged)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(
        f'model = "mnist1d_mlp"\ndata = "mnist1d"\nlevels = {levels}\n'
        f"replicates = {replicates}\ntolerance_pp = 0.5\n{config_extra}"
    )
    _write_json(
        path / "run.json",
        {
            "ticketlab_version": "0.1.0",
            "torch_version": "2.13.0+cpu",
            "python": "3.11.7",
            "platform": "Linux-x86_64",
            "cpu": "Test CPU <fast>",
            "started": "2025-01-01T12:00:00+00:00",
            "config_hash": "0123456789abcdef",
        },
    )
    rows = []
    for level in range(levels + 1):
        names = ["ticket"] + ([b for b in branches if b != "ticket"] if level else [])
        networks = [
            _network(b, level, r, (level, b, r) in broken, untrained)
            for b in names
            for r in range(replicates)
        ]
        _write_json(
            path / f"levels/level_{level:02d}/metrics.json",
            {
                "level": level,
                "weights_remaining": remaining(level),
                "layer_remaining": {k: round(v**level, 6) for k, v in LAYERS.items()},
                "networks": networks,
            },
        )
        per_branch = {}
        for b in names:
            healthy = [n for n in networks if n["branch"] == b and not n["diverged"]]
            stats = {k: spread([n[k] for n in healthy if n[k] is not None]) for k in STATS}
            per_branch[b] = {**stats, "diverged": replicates - len(healthy)}
        rows.append({"level": level, "weights_remaining": remaining(level), "branches": per_branch})
    if summary:
        win = None
        dense = rows[0]["branches"]["ticket"]["early_stop_test_acc"]["mean"]
        for row in rows[1:]:
            ticket = row["branches"]["ticket"]["early_stop_test_acc"]["mean"]
            if ticket is not None and ticket >= dense - 0.005:
                win = {"level": row["level"], "weights_remaining": row["weights_remaining"]}
        _write_json(
            path / "summary.json", {"rows": rows, "winning_ticket": win, "tolerance_pp": 0.5}
        )
    return path
