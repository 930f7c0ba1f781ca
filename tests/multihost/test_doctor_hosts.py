"""`dcgan doctor` across three emulated hosts (tests/support/hosts.py): a host with a slow link (`tc tbf`)
named by its pairs of hosts, and shards only one host can read (served on its loopback) that make the
other rank BROKEN in the table, without a hang."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from doctor_table import QUICK, rows
from helpers import subprocess_env
from hosts import EmulatedHosts, emulated_hosts, error_lines, missing_requirements, torchrun_on, worker_pids

from dcgan.errors import EXIT_PREFLIGHT_BROKEN, EXIT_PREFLIGHT_FAR_OFF

log = logging.getLogger(__name__)

multihost = pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))


@pytest.fixture
def three_hosts(tmp_path: Path) -> Iterator[EmulatedHosts]:
    with emulated_hosts(["hosta", "hostb", "hostc"], tmp_path / "net") as hosts:
        yield hosts


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[EmulatedHosts]:
    with emulated_hosts(["hosta", "hostb"], tmp_path / "net") as hosts:
        yield hosts


@pytest.mark.slow
@multihost
def test_a_slow_link_is_named_by_its_pairs_of_hosts(three_hosts: EmulatedHosts, tmp_path: Path) -> None:
    """Three hosts, one rank each, host B's link limited: the pairs with host B are slow and named, the
    pair A-C is the fast reference, host B is the host in every slow pair, its row says SLOW LINK, and
    the exit status is the far-off one on every host."""
    three_hosts.limit_rate("hostb", SLOW_LINK_MBIT)
    out = tmp_path / "doctor.json"
    launch = torchrun_on(
        three_hosts,
        ["hosta", "hostb", "hostc"],
        1,
        tmp_path / "run",
        *QUICK,
        "--pair-mib",
        "1",
        "--json",
        str(out),
        command="doctor",
        tag="slow",
    )
    ended = launch.wait(150)
    log = launch.log("hosta")
    print(log)
    assert all(status != 0 for status, _ in ended.values()), ended
    assert f"exitcode  : {EXIT_PREFLIGHT_FAR_OFF}" in log  # torchrun's summary of its worker
    table = rows(log)
    assert sorted(row["host"] for row in table.values()) == ["hosta", "hostb", "hostc"]
    for row in table.values():
        assert int(row["step"]) > 0 and int(row["write"]) > 0
        assert ("SLOW LINK" in row["status"]) == (row["host"] == "hostb")
    assert "data: built-in digits: no shards to read" in log
    assert re.search(r"all-reduce of the gradients \(\d+ floats, [\d.]+ MiB\) over 3 ranks: [\d.]+ ms", log)
    [line] = [line for line in log.splitlines() if line.startswith("host pairs")]
    assert re.match(
        r"host pairs \(3, 1 MiB each way\): slowest (hosta-hostb|hostb-hostc) [\d.]+ MB/s, fastest hosta-hostc", line
    ), line
    assert line.endswith("; SLOW: hosta-hostb, hostb-hostc; in every slow pair: hostb") or line.endswith(
        "; SLOW: hostb-hostc, hosta-hostb; in every slow pair: hostb"
    ), line
    document = json.loads(out.read_text())
    assert document["exit_status"] == EXIT_PREFLIGHT_FAR_OFF and document["suspect_hosts"] == ["hostb"]
    rates = {tuple(pair["hosts"]): pair["mb_s"] for pair in document["pairs"]}
    fast, slow = rates[("hosta", "hostc")], max(rates[("hosta", "hostb")], rates[("hostb", "hostc")])
    assert slow < fast / 1.5
    print(f"pairs: A-C {fast:.1f} MB/s, with host B at most {slow:.1f} MB/s ({SLOW_LINK_MBIT} Mbit/s link)")


@pytest.mark.slow
@multihost
def test_shards_only_one_host_can_read_make_the_other_rank_broken_without_a_hang(
    two_hosts: EmulatedHosts, digits_shards: Path, tmp_path: Path
) -> None:
    """data.shards names a server on 127.0.0.1, which only host A runs (a URL that means another machine
    on each node): host B's rank cannot reach it, says so in its row and one line, and both hosts end
    with the broken status, within a bound, leaving no rank running."""
    server_log = tmp_path / "server.log"
    two_hosts.popen(
        "hosta",
        [sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", str(digits_shards)],
        log=server_log,
        env=subprocess_env(PYTHONUNBUFFERED="1"),
    )
    deadline = time.monotonic() + 30
    while "Serving HTTP" not in server_log.read_text():
        assert time.monotonic() < deadline, server_log.read_text()
        time.sleep(0.1)
    launch = torchrun_on(
        two_hosts,
        ["hosta", "hostb"],
        1,
        tmp_path / "run",
        "data.shards=http://127.0.0.1:8000/",
        "data.timeout_s=2",
        *QUICK,
        command="doctor",
        tag="broken",
    )
    ended = launch.wait(120)
    log = launch.log("hosta")
    print(log)
    assert all(status != 0 for status, _ in ended.values()), ended
    assert f"exitcode  : {EXIT_PREFLIGHT_BROKEN}" in log
    table = rows(log)
    assert table[0]["host"] == "hosta" and "BROKEN" not in table[0]["status"] and int(table[0]["loader"]) > 0
    assert table[1]["host"] == "hostb" and table[1]["status"] == "BROKEN" and table[1]["loader"] == "-"
    [cause] = [line for line in log.splitlines() if line.startswith("rank 1 on hostb: ")]
    assert cause.startswith("rank 1 on hostb: data: cannot reach shard server http://127.0.0.1:8000 (")
    assert "Connection refused" in cause and cause.endswith("is it running, and is data.shards right?")
    assert f"verdict: BROKEN: {cause} (exit 7)" in log
    assert not error_lines(log)  # no lost peer, no traceback's line: the report is the outcome
    assert "Traceback" not in log.split("verdict:")[0]
    assert worker_pids(two_hosts, "hosta") == [] and worker_pids(two_hosts, "hostb") == []
    assert not (tmp_path / "run").exists()
    print(f"broken rank: ended { ({name: round(s, 1) for name, (_, s) in ended.items()}) } s after the start")


SLOW_LINK_MBIT = 50
"""Host B's link: 6 MB/s each way, against hundreds of MB/s between the other hosts' namespaces."""
