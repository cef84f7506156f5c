"""Seeds derived from names, so that every network's init, data order and mask draw is reproducible
on its own, whatever else the run contains or in which process it trains."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of names and numbers, stable across processes."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
