"""What importing ``torch._dynamo`` once in the parent saves a search whose lanes are processes.

    .venv/bin/python benchmarks/lane_start.py     # ~2 min

``torch.optim`` imports ``torch._dynamo`` when a process makes its first optimizer; process lanes
are forked afresh for every level, so unless the parent has imported it, every lane of every
level imports it again before its first step (``process_lanes._import_before_forking``). Each
variant runs a small LeNet-300-100 search on mnist5k (levels 0..3, 2 replicates, both controls,
1000 steps) in a fresh interpreter, the two variants alternating, ROUNDS times; wall seconds.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

ROUNDS = 2
SEARCH = """
    import sys, tempfile, time
    from pathlib import Path
    from ticketlab.api import run_search
    from ticketlab.io.config import resolve
    from ticketlab.train import process_lanes
    if sys.argv[1] == "per-lane":
        process_lanes._import_before_forking = lambda: None
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve({"model": "lenet_300_100", "data": "mnist5k", "levels": 3,
                          "replicates": 2, "steps": 1000, "eval_every": 100,
                          "out": str(Path(tmp) / "run"), "report": False})
        start = time.perf_counter()
        run_search(config)
        print(time.perf_counter() - start)
"""


def wall(variant: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SEARCH), variant],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[-1])


def main() -> None:
    times: dict[str, list[float]] = {"per-lane": [], "shipped": []}
    for _ in range(ROUNDS):
        for variant in times:
            times[variant].append(wall(variant))
    for variant, seconds in times.items():
        print(f"{variant:9} " + "  ".join(f"{s:6.1f} s" for s in seconds))
    print(
        f"ratio per-lane / shipped (best of {ROUNDS}): "
        f"{min(times['per-lane']) / min(times['shipped']):.2f}"
    )


if __name__ == "__main__":
    main()
