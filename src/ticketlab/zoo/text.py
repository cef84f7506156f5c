"""Character-level text as next-token prediction data, with splits that never share a character.

The corpus is the documentation text that ships with Python itself (``pydoc_data.topics``: the
language reference's topics, ~465k characters in 3.11), so it is available offline wherever Python
is. Its exact text changes between Python versions; the run records a digest of it (``run.json``).

Split: the topics, in a fixed seeded order, are joined and cut into three contiguous regions, test
(the last ``test_fraction``), validation (the ``val_fraction`` before it) and training (the
rest); each region is then cut into windows of ``context + 1`` characters, one after another with
stride ``context`` (inputs are the first ``context``, targets the last ``context``). No character of
one region appears in a window of another, and nothing depends on the run's seed, so every
replicate and every study sees the same split.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import TicketlabError

#: The seed that orders the topics before splitting (fixed: the test set never moves).
SPLIT_SEED = 0
TEST_FRACTION = 0.1


def pydoc_text() -> str:
    """Python's bundled documentation topics, joined in a fixed shuffled order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it
        raise TicketlabError(f"this Python has no pydoc_data.topics ({exc})") from None
    names = sorted(topics)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    return "\n\n".join(topics[names[i]] for i in order)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def vocabulary(text: str) -> list[str]:
    """Every distinct character, sorted by code point: its index is the token id."""
    return sorted(set(text))


def windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``[N, context]`` and next-character targets ``[N, context]`` from one region."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise TicketlabError(f"a region of {len(ids)} characters is shorter than one window")
    starts = np.arange(n) * context
    grid = starts[:, None] + np.arange(context + 1)[None, :]
    cut = ids[grid]
    return cut[:, :-1], cut[:, 1:]


def char_splits(
    text: str, context: int, val_fraction: float, test_fraction: float = TEST_FRACTION
) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The vocabulary and ``{"train"|"val"|"test": (x, y)}`` int64 windows (see module doc)."""
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise TicketlabError(
            f"val_fraction {val_fraction} and test fraction {test_fraction} leave no training text"
        )
    vocab = vocabulary(text)
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = np.fromiter((lookup[ch] for ch in text), dtype=np.int64, count=len(text))
    n = len(ids)
    test_start = n - int(round(n * test_fraction))
    val_start = test_start - int(round(n * val_fraction))
    regions = {"train": ids[:val_start], "val": ids[val_start:test_start], "test": ids[test_start:]}
    return vocab, {name: windows(region, context) for name, region in regions.items()}
