"""`dcgan doctor`, the preflight of an allocation, in one process on real things: the tiny model reading
real shards, its table and JSON; and checks that fail (missing shards, a run.dir under a file), reported
in the table with the broken status. Across hosts: tests/multihost/test_doctor_hosts.py."""

from __future__ import annotations

import json
from pathlib import Path

from doctor_table import QUICK, leftovers, rows
from helpers import TINY, run_in_process

from dcgan.errors import EXIT_PREFLIGHT_BROKEN


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
