"""Faults a cluster and a hostile user produce, each ending in one line and an exit status, with no
completed checkpoint lost: a second job on a busy run directory, Ctrl-C, a damaged newest checkpoint,
shards whose samples cannot be decoded, bad input and incomplete launch environments. (Impossible
settings: test_config.py; the signals themselves: test_preemption.py.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed_helpers import descendants, signal_tree, start_training, torchrun_cmd, wait_for
from helpers import ROOT, completed_steps, read_stats, run_cli, run_in_process, subprocess_env, tiny_config

from dcgan.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED
from dcgan.train.loop import train


@pytest.mark.slow  # a training in a process of its own
def test_a_second_job_on_a_busy_run_dir_is_refused_and_a_killed_job_leaves_no_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = start_training(run, "train.steps=100000", "checkpoint.every=20")
    try:
        wait_for(lambda: 20 in completed_steps(run), first)
        second = run_in_process("train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=30", check=False)
        assert second.returncode == 4
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"run directory {run} is in use by pid {first.pid} on " in lines[0]
        assert first.poll() is None  # the owner goes on undisturbed
    finally:
        first.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
        first.wait()
    kept = completed_steps(run)
    assert kept and kept[-1] >= 20
    after = run_in_process("train", "configs/tiny.yaml", f"run.dir={run}", f"train.steps={kept[-1] + 5}")
    assert f"resumed from {run / 'checkpoints'}/step_{kept[-1]:09d}" in after.stderr
    assert completed_steps(run)[-1] == kept[-1] + 5


@pytest.mark.slow  # a training in a process of its own
def test_ctrl_c_checkpoints_and_exits_130_and_a_second_one_stops_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    graceful = start_training(run, "train.steps=100000", "checkpoint.every=20")
    wait_for(lambda: 20 in completed_steps(run), graceful)
    graceful.send_signal(signal.SIGINT)
    _, err = graceful.communicate(timeout=120)
    assert graceful.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and f"exiting {EXIT_INTERRUPTED}" in err
    forced = [line for line in err.splitlines() if "stop signal received: checkpointing step" in line]
    step = int(forced[0].split("checkpointing step ")[1].split(",")[0])
    assert completed_steps(run)[-1] == step > 20  # the Ctrl-C checkpoint, off the regular schedule


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10", "checkpoint.every=5")) == EXIT_OK
    data = run / "checkpoints" / "step_000000010" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # .metadata intact, data truncated

    exported = run_in_process("export", str(run), "--out", str(tmp_path / "g.pt"))
    assert "generator of step 5" in exported.stdout
    assert "checkpoint" in exported.stderr and "step_000000010 cannot be read" in exported.stderr

    resumed = run_in_process("train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=12", "checkpoint.every=5")
    assert "step_000000010 cannot be read" in resumed.stderr
    assert f"resumed from {run / 'checkpoints'}/step_000000005" in resumed.stderr
    assert (run / "checkpoints" / "step_000000010.damaged" / "__0_0.distcp").is_file()  # kept for inspection
    assert completed_steps(run) == [5, 10, 12]


@pytest.mark.slow  # a training in a process of its own
def test_shards_whose_samples_cannot_be_decoded_stop_the_run_in_one_line(digits_shards: Path, tmp_path: Path) -> None:
    """16x16 shards given by pattern (no manifest to check against) to a 32x32 model: every block is
    refused; the run must stop instead of skipping forever."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in digits_shards.glob("*.tar"):
        shutil.copy(shard, bare / shard.name)
    pattern = str(bare / "shard-{000000..000007}.tar")
    started = time.monotonic()
    result = run_cli(
        "train",
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'run'}",
        f"data.shards={pattern}",
        "data.epoch_samples=512",
        "model.resolution=32",
        "data.workers=1",
        check=False,
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dcgan: error: 200 samples in a row could not be decoded (last in ")
    assert "expected (N, 1, 32, 32) uint8" in last and "Traceback" not in result.stderr
    assert result.stderr.count("skipping corrupt block") <= 5
    assert time.monotonic() - started < 100


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not: start the ranks with torchrun or srun"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            "WORLD_SIZE=2 but MASTER_ADDR is not set: start the ranks with torchrun or srun",
        ),
        (  # `srun --ntasks=2 python -m dcgan ...`: two tasks that would each run alone
            {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"},
            "srun started 2 tasks, but none knows its rank (WORLD_SIZE is not set), so each would run alone",
        ),
        (  # what torchrun --max-restarts=3 exports without the fix for its shared store
            {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"},
            "torchrun --max-restarts=3 needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment",
        ),
    ],
)
def test_an_incomplete_launch_environment_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():  # read when the process group is joined, not at import
        monkeypatch.setenv(name, value)
    for command in ("train", "doctor"):  # the doctor starts as training does, and refuses the same
        result = run_in_process(command, "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", check=False)
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"dcgan: error: {message}")
        assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a training in a process of its own
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_from_its_newest_checkpoint(tmp_path: Path) -> None:
    """Elastic restarts with no human: SIGKILL one worker after the first checkpoint; torchrun
    (--max-restarts=1) starts a new round, which resumes there and finishes with one stats line a step."""
    run = tmp_path / "run"
    log = tmp_path / "torchrun.log"
    env = {**subprocess_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    command = torchrun_cmd(2, "train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=200", "checkpoint.every=50")
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [*command[:3], "--max-restarts=1", *command[3:]], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: 50 in completed_steps(run), launcher, timeout=180)
            [rank1] = [
                pid
                for pid in descendants(launcher.pid)
                if "RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            ]
            os.kill(rank1, signal.SIGKILL)
            assert launcher.wait(timeout=240) == 0, log.read_text()[-3000:]
        finally:
            if launcher.poll() is None:
                signal_tree(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    assert "failed (exitcode: -9) local_rank: 1" in text  # torchrun saw the kill ...
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))  # ... and the new round resumed
    assert 50 <= resumed < 200 and completed_steps(run)[-1] == 200
    steps = [row["step"] for row in read_stats(run)]
    assert sorted(steps) == sorted(set(steps)) and steps[-1] == 200


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["train", "configs/tiny.yaml", "run.dir={file}"], 2, "run.dir: {file} is a file, not a directory"),
        (
            ["train", "configs/tiny.yaml", "run.dir={tmp}/r", "seed=1180591620717411303424"],
            2,
            "seed: must be an integer in [0, 2^32)",
        ),
        (
            ["sample", "{file}", "--out", "{tmp}/x.png"],
            2,
            "{file} is not a generator exported by `dcgan export` (EOFError)",
        ),
        (["sample", "{tmp}", "--num", "0", "--out", "{tmp}/x.png"], 2, "argument --num: must be >= 1, got 0"),
        (["eval", "{tmp}", "--data", "digits", "-n", "0"], 2, "argument -n/--num: must be >= 1, got 0"),
        (["export", "{tmp}", "--out", "{tmp}"], 2, "--out {tmp} is a directory: give a file name"),
    ],
)
def test_bad_input_gets_one_line_and_a_status(tmp_path: Path, args: list[str], status: int, message: str) -> None:
    (tmp_path / "config.yaml").write_text("")  # {tmp} looks like a run directory to the readers
    a_file = tmp_path / "not-a-generator.pt"
    a_file.write_bytes(b"")
    fill = {"file": str(a_file), "tmp": str(tmp_path)}
    result = run_in_process(*[a.format(**fill) for a in args], check=False)
    assert result.returncode == status
    last = result.stderr.strip().splitlines()[-1]
    assert message.format(**fill) in last and "Traceback" not in result.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 700 KiB file system (tmpfs, needs root): room for about two tiny checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow  # a training in a process of its own
def test_a_full_disk_during_a_background_save_is_one_line_and_keeps_the_last_checkpoint(
    small_disk: Path, tmp_path: Path
) -> None:
    run = small_disk / "run"
    result = run_cli(
        "train",
        "configs/tiny.yaml",
        f"run.dir={run}",
        "train.steps=60",
        "checkpoint.every=5",
        "checkpoint.async_save=true",
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dcgan: error: no space left on device at {run / 'checkpoints'}/step_")
    kept = completed_steps(run)
    assert kept and f"the last complete one, step_{kept[-1]:09d}, is kept" in last
    exported = run_in_process("export", str(run), "--out", str(tmp_path / "g.pt"))  # and it reads back whole
    assert f"generator of step {kept[-1]}" in exported.stdout


@pytest.mark.slow  # a training in a process of its own
def test_a_truncated_shard_read_by_workers_is_one_line_naming_it(digits_shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(digits_shards, copy)
    victim = copy / "shard-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    result = run_cli(
        "train",
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'run'}",
        f"data.shards={copy}",
        "data.workers=2",
        "train.steps=400",
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"dcgan: error: cannot read shard {victim}: ReadError: unexpected end of data "
        "(truncated or damaged: write it again with `dcgan shards`)"
    )


@pytest.mark.slow  # a training in a process of its own
def test_a_stop_signal_while_waiting_for_data_that_never_comes_ends_the_run(
    digits_shards: Path, tmp_path: Path
) -> None:
    """A data source that hangs (here a pipe that sleeps before it sends anything, as a stuck mount
    would): one process stops on SIGTERM at once instead of waiting for a batch."""
    run = tmp_path / "run"
    shard = f"pipe:sleep 60 && cat {digits_shards / 'shard-000000.tar'}"
    waiting = start_training(run, f"data.shards={shard}", "data.epoch_samples=64", "data.workers=1", "train.steps=50")
    wait_for(lambda: (run / "train.log").is_file() and "1 rank(s) on cpu" in (run / "train.log").read_text(), waiting)
    time.sleep(1.0)
    stopped = time.monotonic()
    waiting.send_signal(signal.SIGTERM)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == EXIT_TERMINATED, err
    assert time.monotonic() - stopped < 30  # not after the pipe's 60 s
    assert (
        f"stop signal while waiting for data: nothing trained since the last checkpoint, exiting {EXIT_TERMINATED}"
        in err
    )
    assert completed_steps(run) == []


def test_eval_against_data_of_another_shape_is_one_line(trained_digits_run: Path, digits_shards: Path) -> None:
    result = run_in_process("eval", str(trained_digits_run), "--data", str(digits_shards), "-n", "10", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"dcgan: error: --data {digits_shards} holds 16x16 1-channel images; the generator makes 32x32 1-channel ones"
    )


def test_requeued_attempts_that_never_progress_stop_requeueing(
    digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every requeued attempt resumes from step 10 and fails before saving anything newer (here a shard
    that cannot be read; a time slice shorter than start-up ends the same way): the fourth refuses.
    (In this process: SLURM_RESTART_COUNT is read when a run starts, not at import.)"""
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10")) == EXIT_OK
    broken = tmp_path / "shards"
    shutil.copytree(digits_shards, broken)
    for shard in broken.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:2000])
    attempt = ("train", "configs/tiny.yaml", f"run.dir={run}", f"data.shards={broken}", "train.steps=100")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert run_in_process(*attempt, check=False).returncode == 1  # by hand (no SLURM requeue): never counted
    for restart in (1, 2, 3):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        assert run_in_process(*attempt, check=False).returncode == 1
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")
    refused = run_in_process(*attempt, check=False)
    assert refused.returncode == 5
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("dcgan: error: 3 requeued attempts in a row resumed from step 10 and saved nothing newer")
    )
    # the remedy the message names: without the record of attempts the job starts (and progresses) again
    (run / "attempts.json").unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    resumed = run_in_process("train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=20")
    assert "resumed from" in resumed.stderr and completed_steps(run)[-1] == 20
