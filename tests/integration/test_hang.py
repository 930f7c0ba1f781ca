"""The hang report (dcgan.distributed.hang): a rank whose loader stalls mid-run, as a stuck mount or a shard server
that keeps the connection open makes it, on torchrun's two ranks. Every rank writes its stacks and
position to run.dir/hang-<rank>.txt, rank 0 names the rank the others wait for, long before the
collective timeout, and the run finishes once the data comes."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from distributed_helpers import signal_tree, start_torchrun, wait_for
from helpers import TINY, read_stats

from dcgan.distributed.hang import AFTER_STEP, IN_STEP, MIN_STEPS, WAITING_FOR_DATA, HangWatch, Position, stall_line
from dcgan.run.stats import read_stats as stats_rows

STALL_S = 20
"""How long rank 1's shard pipe sleeps once: past the hang limit (5 s here), far below dist.timeout_s."""


def stalling_shards(shards: Path, tmp_path: Path) -> tuple[str, Path]:
    """`pipe:` shards that read normally until the returned file exists; then the next shard rank 1
    opens sleeps STALL_S seconds before it sends a byte (once)."""
    mark, once = tmp_path / "stall-now", tmp_path / "stalled"
    script = tmp_path / "shard.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$RANK" = 1 ] && [ -e {mark} ] && mkdir {once} 2>/dev/null; then sleep {STALL_S}; fi\n'
        'exec cat "$1"\n'
    )
    count = len(list(shards.glob("shard-*.tar")))
    return f"pipe:sh {script} {shards}/shard-{{000000..{count - 1:06d}}}.tar", mark


@pytest.mark.slow  # two ranks through torchrun, with a 15 s stall
def test_a_stalled_loader_is_named_by_rank_0_and_every_rank_writes_its_stacks(
    digits_shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    spec, mark = stalling_shards(digits_shards, tmp_path)
    proc = start_torchrun(
        2,
        "train",
        str(TINY),
        f"run.dir={run}",
        f"data.shards={spec}",
        "data.workers=0",
        "data.epoch_samples=512",
        "train.steps=160",
        "log.every=10",
        "checkpoint.every=1000",
        "sample.every=1000",
        "dist.hang_min_s=5",
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: any(row["step"] >= 40 for row in stats_rows(run / "stats.jsonl")), proc, timeout=120)
        mark.touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]

    train_log = (run / "train.log").read_text()
    stalls = [line for line in train_log.splitlines() if "no step completed for" in line and "rank 1 on" in line]
    assert stalls, train_log[-3000:]  # (a loaded machine may add a stall of its own: only this one is asserted)
    found = re.search(
        r"no step completed for (\d+) s \(10x the median step time of [0-9.e-]+ s, at least dist.hang_min_s=5, "
        r"at most half dist.timeout_s\); "
        r"rank 1 on (\S+) did not reach the point the others wait at: waiting for its batch of step (\d+) from the "
        r"loader in the training process; rank 0 on \S+: inside step (\d+), whose collectives wait for every rank; "
        rf"stacks in {re.escape(str(run))}/hang-<rank>.txt",
        stalls[0],
    )
    assert found, stalls[0]
    waited_s, step = int(found[1]), int(found[3])
    assert 5 <= waited_s < STALL_S and int(found[4]) == step
    assert f"step {step} completed: the stall reported in hang-*.txt is over" in train_log

    rank1 = (run / "hang-1.txt").read_text()
    assert rank1.startswith("rank 1 on ")
    assert f"the loop is waiting for its batch of step {step} from the loader in the training process" in rank1
    assert re.search(r'File ".*dcgan/data/\w+\.py", line \d+ in ', rank1), rank1  # its main thread, reading
    rank0 = (run / "hang-0.txt").read_text()
    assert f"the loop is inside step {step}, whose collectives wait for every rank" in rank0
    assert re.search(r'File ".*dcgan/distributed/batchnorm\.py", line \d+ in forward', rank0), (
        rank0
    )  # waiting for rank 1
    assert max(row["step"] for row in read_stats(run)) == 160


def test_the_stall_line_names_the_ranks_behind_and_those_that_sent_no_position(tmp_path: Path) -> None:
    data = Position(7, WAITING_FOR_DATA, "waiting for its batch of step 7 from 2 loader worker process(es)", "b")
    inside = Position(7, IN_STEP, "inside step 7, whose collectives wait for every rank", "a")
    why = "no step completed for 70 s (...)"
    line = stall_line(why, {0: inside, 1: inside, 3: data}, 4, tmp_path)
    assert line == (
        f"{why}; rank 3 on b did not reach the point the others wait at: {data.doing}; rank 0 on a, rank 1 on a: "
        f"{inside.doing}; no position from rank 2 (stuck outside Python, or cut off); stacks in {tmp_path}/hang-<rank>.txt"
    )
    assert (
        stall_line(why, {0: data}, 1, tmp_path)
        == f"{why}; rank 0 on b is {data.doing}; stacks in {tmp_path}/hang-<rank>.txt"
    )
    assert f"rank 0 on a, rank 1 on a: all {inside.doing}" in stall_line(why, {0: inside, 1: inside}, 2, tmp_path)
    # rank 0 stuck after step 6 (its metric line on a hung file system) holds rank 1 inside step 7
    after = Position(7, AFTER_STEP, "after step 6 (metric line, stop agreement, checkpoint)", "a")
    assert f"rank 0 on a did not reach the point the others wait at: {after.doing}; rank 1 on a: {inside.doing}" in (
        stall_line(why, {0: after, 1: inside}, 2, tmp_path)
    )


def test_the_watch_judges_only_after_enough_steps_ignores_work_outside_training_and_reports_a_stall_once(
    tmp_path: Path,
) -> None:
    """One process, the thread running: a block outside training longer than the limit is no stall;
    steps that stop coming are, reported once, in hang-0.txt; the limit stays below dist.timeout_s."""
    watch = HangWatch(tmp_path, 0, 1, factor=10, min_s=1.0, workers=0, store=None, timeout_s=600).start()
    try:
        for step in range(1, MIN_STEPS + 1):
            assert watch.limit_s() is None  # too few steps timed (the first interval, start-up, is not one)
            watch.waiting_for_data(step)
            time.sleep(0.01)
            watch.step_done(step)
        assert len(watch.intervals) == MIN_STEPS - 1 and watch.limit_s() is None
        watch.step_done(MIN_STEPS + 1)
        assert watch.limit_s() == 1.0  # 10x ~10 ms is below dist.hang_min_s
        with watch.not_training():
            time.sleep(2.5)  # a checkpoint save longer than the limit
        watch.step_done(MIN_STEPS + 2)
        assert not (tmp_path / "hang-0.txt").exists() and watch.reported is None
        assert len(watch.intervals) == MIN_STEPS  # the step after the save is not timed either
        watch.waiting_for_data(MIN_STEPS + 3)
        time.sleep(3.0)  # a stall: reported after 1 s, and only once
        assert watch.reported == MIN_STEPS + 3
        report = (tmp_path / "hang-0.txt").read_text()
        assert f"the loop is waiting for its batch of step {MIN_STEPS + 3} from the loader" in report
        assert "in test_the_watch_judges_only_after_enough_steps" in report  # this main thread's stack
        watch.step_done(MIN_STEPS + 3)
        assert watch.reported is None
    finally:
        watch.stop()
    capped = HangWatch(tmp_path, 0, 1, factor=10, min_s=60, workers=0, store=None, timeout_s=30)
    capped.intervals.extend([1.0] * MIN_STEPS)
    assert capped.limit_s() == 15.0  # half dist.timeout_s: the report comes before the timeout ends the job
