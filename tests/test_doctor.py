"""`dcgan doctor`, the preflight of an allocation, on real things: one process on the tiny model reading
real shards; three emulated hosts (tests/hosts.py) of which one has a slow link (`tc tbf`), which the
doctor must name; checks that fail on one rank only (shards served on one host's loopback), or on
every rank (missing shards, a run.dir under a file), which must be reported in the table, not hang the
others, and end with the broken status."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TINY, run_in_process, subprocess_env
from hosts import EmulatedHosts, emulated_hosts, missing_requirements
from test_multihost import error_lines, torchrun_on, worker_pids

from dcgan.errors import EXIT_PREFLIGHT_BROKEN, EXIT_PREFLIGHT_FAR_OFF

QUICK = ("--seconds", "1", "--write-mib", "4")
"""Short measurements: a second each, 4 MiB written a rank."""

ROW = re.compile(
    r"^\s*(?P<rank>\d+)\s+(?P<host>\S+)\s+(?P<device>cpu)\s+(?P<threads>\d+)\s+(?P<cpus>\d+)\s+(?P<step>[\d-]+)\s+"
    r"(?P<ratio>[\d.]+x|-)\s+(?P<loader>[\d-]+)\s+(?P<write>[\d-]+)\s+(?P<status>.+)$",
    re.MULTILINE,
)


def rows(text: str) -> dict[int, dict[str, str]]:
    """The doctor's table, by rank."""
    return {int(m["rank"]): m.groupdict() for m in ROW.finditer(text)}


def leftovers(directory: Path) -> list[Path]:
    return list(directory.glob(".dcgan-doctor-*"))


def test_one_process_reports_its_rates_in_the_table_and_the_json(digits_shards: Path, tmp_path: Path) -> None:
    """`dcgan doctor tiny.yaml data.shards=...` in one process: exit 0, one row of real positive rates,
    the same numbers in the JSON; run.dir is not created and the timed file is gone."""
    run = tmp_path / "not-yet" / "run"
    out = tmp_path / "doctor.json"
    result = run_in_process(
        "doctor", str(TINY), f"run.dir={run}", f"data.shards={digits_shards}", *QUICK, "--json", str(out)
    )
    print(result.stdout)
    [row] = rows(result.stdout).values()
    assert row["status"] == "ok" and row["ratio"] == "-"  # alone: no other rank to compare with
    assert int(row["step"]) > 0 and int(row["loader"]) > 0 and int(row["write"]) > 0
    assert int(row["threads"]) >= 1 and int(row["cpus"]) >= 1
    assert "collectives: one rank, none to time" in result.stdout
    assert "host pairs: one host, no pairs of hosts to time" in result.stdout
    assert f"data: {digits_shards} (8 shards, 1797 images): readable; loader at data.workers=0" in result.stdout
    assert result.stdout.rstrip().splitlines()[-2] == "verdict: ok: 1 rank(s), nothing far off (exit 0)"
    [rank] = json.loads(out.read_text())["ranks"]
    assert round(rank["step_img_s"]) == int(row["step"]) and round(rank["loader_img_s"]) == int(row["loader"])
    assert rank["write_mb_s"] > 0 and rank["errors"] == [] and rank["flags"] == []
    assert json.loads(out.read_text())["exit_status"] == 0
    assert not run.parent.exists() and leftovers(tmp_path) == []


def test_checks_that_fail_are_one_line_each_and_the_broken_status(tmp_path: Path) -> None:
    """Shards that are not there and a run.dir below a file: the row says BROKEN, each failed check is
    one line naming its cause, the step rate is still measured, and the exit status is the broken one."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    missing = tmp_path / "no-such-shards"
    result = run_in_process(
        "doctor", str(TINY), f"run.dir={blocker / 'run'}", f"data.shards={missing}", *QUICK, check=False
    )
    print(result.stdout)
    assert result.returncode == EXIT_PREFLIGHT_BROKEN
    [row] = rows(result.stdout).values()
    assert row["status"] == "BROKEN" and int(row["step"]) > 0 and row["loader"] == "-" and row["write"] == "-"
    name = rows(result.stdout)[0]["host"]
    assert f"rank 0 on {name}: data: shard not found: {missing}" in result.stdout.splitlines()
    assert f"rank 0 on {name}: write: run.dir {blocker / 'run'}: {blocker} is not a directory" in result.stdout
    assert f"verdict: BROKEN: rank 0 on {name}: data: shard not found: {missing} (and 1 more) (exit 7)" in result.stdout


multihost = pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))


@pytest.fixture
def three_hosts(tmp_path: Path) -> Iterator[EmulatedHosts]:
    with emulated_hosts(["hosta", "hostb", "hostc"], tmp_path / "net") as hosts:
        yield hosts


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[EmulatedHosts]:
    with emulated_hosts(["hosta", "hostb"], tmp_path / "net") as hosts:
        yield hosts


SLOW_LINK_MBIT = 50
"""Host B's link: 6 MB/s each way, against hundreds of MB/s between the other hosts' namespaces."""


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
