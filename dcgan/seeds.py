"""Seeds derived from the run's seed and a position (an epoch, a partition, a step): every random stream
of a run is a pure function of where it is, never of which rank or worker draws it, so that the same
run on another number of ranks or loader workers draws the same numbers."""

from __future__ import annotations


def mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash of ints is not salted across processes,
    but tuples of them are not promised stable either: this is explicit arithmetic)."""
    seed = 0x9E3779B97F4A7C15
    for value in values:
        seed = (seed * 1_000_003 + value + 0x632BE5AB) & 0x7FFF_FFFF_FFFF_FFFF
    return seed
