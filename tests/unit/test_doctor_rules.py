"""The doctor's schedule of host pairs: rounds of disjoint pairs that cover every pair once."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("hosts", [2, 3, 4, 7, 8])
def test_host_pairs_come_in_rounds_of_disjoint_pairs_covering_every_pair_once(hosts: int) -> None:
    """The schedule of the host-pair transfers: no host in two pairs of a round (they run at once), and
    every pair exactly once, in hosts - 1 rounds (hosts if odd)."""
    from dcgan.cluster.doctor_links import pair_rounds

    rounds = pair_rounds(hosts)
    assert len(rounds) == hosts - 1 + hosts % 2
    for pairs in rounds:
        members = [host for pair in pairs for host in pair]
        assert len(members) == len(set(members))
    every = sorted(pair for pairs in rounds for pair in pairs)
    assert every == [(a, b) for a in range(hosts) for b in range(a + 1, hosts)]
