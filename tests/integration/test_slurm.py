"""SLURM through submitit and sbatch, against a real single-node cluster started by the test run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, checkpoint_complete, completed_steps, run_in_process, subprocess_env

from dcgan.cluster.slurm import Resources, executor_parameters, make_executor, srun_check_skipped, submit, validate
from dcgan.config import ConfigError

REFERENCE = ROOT / "tests" / "support" / "data" / "sbatch_4x8gpu.txt"


@pytest.fixture(scope="module")
def cluster() -> None:
    """Start (or find running) the local cluster; skip, saying why, where it cannot be installed."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local SLURM cluster needs root and apt-get (Debian) to install")
    result = subprocess.run(
        ["bash", str(ROOT / "slurm" / "local-cluster" / "start.sh")], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        pytest.skip(f"SLURM could not be started here: {result.stderr.strip().splitlines()[-1:]}")


def tiny(run: Path, *extra: str) -> list[str]:
    return [f"run.dir={run}", *extra]


def log_text(job_folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(job_folder.rglob("*_log.err")))


@pytest.mark.slurm
def test_two_task_job_finishes_and_leaves_a_complete_checkpoint(cluster: None, tmp_path: Path) -> None:
    job, _ = submit(
        "configs/tiny.yaml",
        tiny(tmp_path / "run", "train.steps=20"),
        Resources(tasks_per_node=2, cpus_per_task=1, mem_gb=2, time_min=5),
        tmp_path / "logs",
    )
    assert job.results() == [0, 0]
    assert completed_steps(tmp_path / "run") == [10, 20]
    assert "2 rank(s) on cpu" in log_text(tmp_path / "logs")


@pytest.mark.slurm
def test_preempted_job_is_requeued_and_continues_from_its_checkpoint(cluster: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job, _ = submit(
        "configs/tiny.yaml",
        tiny(run, "train.steps=200", "checkpoint.every=50"),
        Resources(tasks_per_node=2, cpus_per_task=1, mem_gb=2, time_min=5),
        tmp_path / "logs",
    )
    deadline = time.monotonic() + 120
    while not checkpoint_complete(run, 50):
        assert time.monotonic() < deadline, "the job never wrote its first checkpoint"
        time.sleep(0.2)
    job._interrupt()  # submitit's preemption simulation: SIGTERM, then USR2
    assert job.results() == [0, 0]
    logs = log_text(tmp_path / "logs")
    stopped = int(re.search(r"stop signal received: checkpointing step (\d+)", logs).group(1))
    assert 50 <= stopped < 200
    assert f"resumed from {run / 'checkpoints'}/step_{stopped:09d} at step {stopped}" in logs
    assert completed_steps(run)[-1] == 200


def wait_until_gone(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} is still in the queue"
        time.sleep(1)


def unsignalled_slices(logs: str) -> int:
    """Time slices (starts) of a job that have not received a stop signal yet, from rank 0's lines."""
    starts = 1 + logs.count("resumed from ")
    stops = sum(1 for line in logs.splitlines() if "stop signal received" in line and "[rank " not in line)
    return starts - stops


@pytest.mark.slurm
def test_job_at_its_time_limit_is_requeued_and_resumes_and_scancel_ends_it_for_good(
    cluster: None, tmp_path: Path
) -> None:
    """No dependence on speed: the run is far longer than any time slice, however fast or loaded the
    machine, so it always meets its limit; the test ends it with scancel once a requeued slice has
    trained past its resume step. On a loaded machine a slice may spend most of its minute starting: the
    test waits for whichever requeued slice first checkpoints past its own resume step."""
    run = tmp_path / "run"
    res = Resources(tasks_per_node=2, cpus_per_task=1, mem_gb=2, time_min=1, signal_delay_s=15)
    job, _ = submit(
        "configs/tiny.yaml",
        tiny(run, "train.steps=1000000", "checkpoint.every=20", "log.every=50"),
        res,
        tmp_path / "logs",
    )
    deadline = time.monotonic() + 600
    # scancel once the running requeued slice has trained past its resume step, and before its own
    # time-limit signal (every stop so far was followed by a resume): a scancel during a requeue hand-over
    # ends in 75, not 143
    while (
        not (resumes := re.findall(r"resumed from \S+ at step (\d+)", log_text(tmp_path / "logs")))
        or not any(step > int(resumes[-1]) for step in completed_steps(run))
        or unsignalled_slices(log_text(tmp_path / "logs")) != 1
    ):
        assert time.monotonic() < deadline, "no requeued slice trained past its resume step in 10 minutes"
        time.sleep(1)
    subprocess.run(["scancel", job.job_id], check=True)
    wait_until_gone(job.job_id, timeout=120)
    logs = log_text(tmp_path / "logs")
    stops = [
        (int(step), int(status))
        for step, status in re.findall(r"stop signal received: checkpointing step (\d+), then exiting (\d+)", logs)
    ]
    assert stops[0] == (int(resumes[0]), 75)  # the time limit: checkpoint, requeue, resume there
    assert stops[-1][1] == 143 and "not requeueing" in logs  # the scancel: checkpoint, and gone
    assert completed_steps(run)[-1] == stops[-1][0]


def sbatch_and_wait(*args: str, timeout: float = 180) -> str:
    """Submit with plain sbatch (no GPU, 2 GB, from the repository root), wait until the job (all its
    array tasks) has left the queue, and return its id."""
    job = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={ROOT}", "--gres=none", "--mem=2G", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(1)
    return job


@pytest.mark.slurm
def test_sbatch_script_runs_two_processes_through_srun_and_torchrun(cluster: None, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    sbatch_and_wait(
        "--cpus-per-task=2",
        f"--output={out}",
        f"--export=ALL,PYTHON={sys.executable},NPROC_PER_NODE=2",
        str(ROOT / "slurm" / "train.sbatch"),
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'run'}",
        "train.steps=10",
    )
    text = out.read_text()
    assert "1 node(s) x 2 process(es)" in text and "2 rank(s) on cpu" in text
    assert checkpoint_complete(tmp_path / "run", 10)


def job_fields(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


@pytest.mark.slurm
def cluster_name() -> str:
    """The local cluster's ClusterName: slurm/train.sbatch keeps a job's state in .dcgan-slurm/<cluster>-<job>."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return next(line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("ClusterName"))


def test_sbatch_job_whose_torchrun_exhausts_its_restarts_is_requeued_and_never_completed(
    cluster: None, tmp_path: Path
) -> None:
    """Every worker fails (its shard is a command that fails): torchrun restarts it once (MAX_RESTARTS=1),
    then gives up; the script requeues the job instead of reporting it done, and the requeued attempt,
    failing the same way at REQUEUE_LIMIT=1, ends it FAILED. Never COMPLETED."""
    out = tmp_path / "out.txt"
    job = sbatch_and_wait(
        "--cpus-per-task=1",
        f"--output={out}",
        f"--export=ALL,PYTHON={sys.executable},NPROC_PER_NODE=1,MAX_RESTARTS=1,REQUEUE_LIMIT=1",
        str(ROOT / "slurm" / "train.sbatch"),
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'run'}",
        "data.shards=pipe:false",
        "data.epoch_samples=64",
        "log.wandb=disabled",
        timeout=240,
    )
    text = out.read_text()
    fields = job_fields(job)
    assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "1"), f"{fields}\n{text}"
    assert fields["ExitCode"] != "0:0"
    assert f"training failed with status 1 after its restarts: requeueing job {job}" in text, text
    assert f"job {job} was requeued 1 times already after failures (REQUEUE_LIMIT): not requeueing" in text, text
    assert "training finished" not in text
    state = ROOT / ".dcgan-slurm" / f"{cluster_name()}-{job}"
    assert out.read_text().count(f"job {job} restart") == 2 and not state.exists()  # its state goes with the job


def normalized_sbatch(folder: Path) -> str:
    """The script submitit writes for four nodes of eight GPUs, as `--dry-run` prints it: no SLURM needed."""
    with srun_check_skipped():
        executor = make_executor(
            Resources(
                nodes=4,
                gpus_per_node=8,
                cpus_per_task=12,
                mem_gb=480,
                partition="gpu",
                time_min=1440,
                account="vision",
                qos="high",
            ),
            folder,
            "dcgan-celeba64",
        )
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit %j", "uid")
    return text.replace(str(folder), "FOLDER").replace(sys.executable, "PYTHON")


def test_generated_sbatch_for_four_nodes_of_eight_gpus_matches_the_reference(tmp_path: Path) -> None:
    text = normalized_sbatch(tmp_path)
    if os.environ.get("DCGAN_WRITE_REFERENCE"):
        REFERENCE.write_text(text)
        pytest.skip(f"wrote {REFERENCE}: review its diff, then run without DCGAN_WRITE_REFERENCE to compare")
    assert text == REFERENCE.read_text()
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --partition=gpu",
    ):
        assert line in text


@pytest.mark.parametrize(
    ("res", "message"),
    [
        (Resources(gpus_per_node=8, tasks_per_node=4), "one task per GPU"),
        (Resources(nodes=2, local=True), "--local runs on this machine only"),
        (Resources(local=True, partition="gpu"), "--local takes no --partition"),
        (Resources(time_min=1, signal_delay_s=120), "--signal-delay 120s is not shorter than --time 1 min"),
        (Resources(nodes=0), "must be >= 1"),
    ],
)
def test_options_that_make_no_sense_together_fail_before_submission(res: Resources, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(res)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["submit", "dry-run"])
def test_cli_rejects_a_bad_config_before_submitting(tmp_path: Path, dry_run: list[str]) -> None:
    """In one line, for a submission as for its dry run (the dry run fails like the submission would)."""
    result = run_in_process(
        "configs/tiny.yaml",
        "model.resolution=48",
        "--local",
        "--folder",
        str(tmp_path),
        *dry_run,
        program="dcgan submit",
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "dcgan submit: error: model.resolution: must be a power of two >= 16, got 48"
    assert not any(tmp_path.iterdir())


def test_a_node_range_dry_run_prints_the_sbatch_command_and_script_it_submits_without_slurm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--nodes 1-2` goes in as slurm/train.sbatch: the dry run prints the sbatch command (MIN_NODES for the
    elastic torchrun, one task per node with all its processes' CPUs) and the script itself, with no SLURM
    on PATH, and submits nothing."""
    from dcgan.cli.main import main as dcgan_main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    run = tmp_path / "run"
    argv = ["submit", "configs/tiny.yaml", f"run.dir={run}", "train.global_batch=16", "--nodes", "1-2"]
    assert dcgan_main([*argv, "--tasks-per-node", "2", "--cpus-per-task", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    command = next(line for line in out.splitlines() if line.startswith("sbatch --"))
    assert command.startswith("sbatch --parsable "), command  # what submitting runs, to the letter
    for option in ("--nodes=1-2", "--cpus-per-task=2", "--gres=none", "--signal=B:USR1@120"):
        assert f" {option} " in command, command
    assert f"--export=ALL,MIN_NODES=1,NPROC_PER_NODE=2,PYTHON={sys.executable} " in command, command
    assert command.endswith(f"slurm/train.sbatch configs/tiny.yaml run.dir={run} train.global_batch=16"), command
    assert out.endswith((ROOT / "slurm" / "train.sbatch").read_text()) and "SLURM (sbatch --test-only)" not in out
    assert not run.exists()


def test_local_executor_parameters_carry_no_slurm_keys() -> None:
    params = executor_parameters(Resources(local=True, tasks_per_node=2), "x")
    assert params["tasks_per_node"] == 2 and not any(k.startswith("slurm_") for k in params)


@pytest.mark.slurm
def test_a_sweep_is_one_job_array_and_a_preempted_task_resumes_without_touching_its_siblings(
    cluster: None, tmp_path: Path
) -> None:
    from dcgan.cluster.sweep import parse_sweep, point_name, submit_sweep
    from dcgan.config import load_config

    base = tmp_path / "sweep"
    points = parse_sweep(["optim.lr=1e-4,2e-4", "seed=0,1"])
    submitted = submit_sweep(
        "configs/tiny.yaml",
        [f"run.dir={base}", "train.steps=200", "checkpoint.every=10", "train.batch_size=64"],
        points,
        Resources(cpus_per_task=1, mem_gb=2, time_min=5),
        tmp_path / "logs",
        parallelism=2,
    )
    array_ids = {str(job.job_id).split("_")[0] for _, job, _ in submitted}
    assert len(array_ids) == 1  # ONE array job
    assert [str(job.job_id).split("_")[1] for _, job, _ in submitted] == ["0", "1", "2", "3"]
    first_run = Path(submitted[0][2])
    deadline = time.monotonic() + 180
    # task 0 is interrupted right after its first checkpoint, 190 steps before its end, whatever the speed
    while not checkpoint_complete(first_run, 10):
        assert time.monotonic() < deadline, "the first task never wrote its first checkpoint"
        time.sleep(0.2)
    for _ in range(20):  # preempt task 0 only: SIGTERM, then USR2 (SLURM may briefly refuse: retry)
        try:
            submitted[0][1]._interrupt()
            break
        except subprocess.CalledProcessError:
            time.sleep(0.25)
    assert [job.results() for _, job, _ in submitted] == [[0]] * 4
    for index, (point, _, run_dir) in enumerate(submitted):
        run = Path(run_dir)
        assert run == base / point_name(point)
        saved = load_config(run / "config.yaml")
        assert (saved.optim.lr, saved.seed) == (float(point["optim.lr"]), int(point["seed"]))
        assert (saved.log.group, saved.log.name) == ("sweep", point_name(point))
        assert completed_steps(run)[-1] == 200
        resumed = "resumed from" in (run / "train.log").read_text()
        assert resumed == (index == 0), f"task {index}"  # only the preempted task was restarted


@pytest.mark.slurm
def test_sbatch_job_array_runs_one_point_per_task_from_a_points_file(cluster: None, tmp_path: Path) -> None:
    points = tmp_path / "points.txt"
    written = run_in_process(
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'sweep'}",
        "train.steps=10",
        "--sweep",
        "seed=0,1",
        "--write-points",
        str(points),
        program="dcgan submit",
    ).stdout
    assert f"POINTS={points} sbatch --array=0-1%64 slurm/train.sbatch configs/tiny.yaml" in written
    assert points.read_text().splitlines() == [
        f"seed=0 run.dir={tmp_path / 'sweep' / 'seed=0'} log.name=seed=0 log.group=sweep",
        f"seed=1 run.dir={tmp_path / 'sweep' / 'seed=1'} log.name=seed=1 log.group=sweep",
    ]
    out = tmp_path / "out-%A_%a.txt"
    job = sbatch_and_wait(
        "--array=0-1",
        "--cpus-per-task=1",
        f"--output={out}",
        f"--export=ALL,PYTHON={sys.executable},NPROC_PER_NODE=1,POINTS={points}",
        str(ROOT / "slurm" / "train.sbatch"),
        "configs/tiny.yaml",
        "train.steps=10",
        timeout=240,
    )
    for task in (0, 1):
        text = (tmp_path / f"out-{job}_{task}.txt").read_text()
        assert f"job {job}_{task} restart 0" in text  # the task's own id: what a requeue addresses
        run = tmp_path / "sweep" / f"seed={task}"
        assert checkpoint_complete(run, 10)
        assert f"seed: {task}" in (run / "config.yaml").read_text()


@pytest.mark.slurm
def test_a_request_the_partition_can_never_satisfy_is_refused_before_submission(cluster: None, tmp_path: Path) -> None:
    """4 CPUs a task x 2 tasks on the 2-CPU node would pend forever (PartitionConfig): sbatch --test-only
    says so first, and nothing reaches the queue."""
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    result = run_in_process(
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'run'}",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "4",
        program="dcgan submit",
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "dcgan submit: error: SLURM refuses this request (1 node(s) x 2 task(s) x 4 CPU(s), 0 GPU(s) a node): "
    )
    assert line.endswith("Requested node configuration is not available")
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split() == before


def test_shards_that_do_not_exist_here_are_refused_before_submission(tmp_path: Path) -> None:
    result = run_in_process(
        "configs/tiny.yaml",
        f"data.shards={tmp_path / 'nowhere'}",
        "--local",
        "--folder",
        str(tmp_path / "logs"),
        program="dcgan submit",
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"dcgan submit: error: data.shards: {tmp_path / 'nowhere'} does not exist on this machine (give a path the cluster's nodes share)"
    )
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_local_job_logs_beside_its_run_and_leaves_nothing_else(tmp_path: Path) -> None:
    """--local: logs under run.dir/slurm_logs, named by the job id (not in the current directory), and no
    empty directory literally named %j beside them."""
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcgan",
            "submit",
            str(ROOT / "configs" / "tiny.yaml"),
            f"run.dir={run}",
            "train.steps=2",
            "--local",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"^job (\d+)$", result.stdout, re.M).group(1)
    assert f"logs {run / 'slurm_logs'}\n" in result.stdout
    deadline = time.monotonic() + 120
    while not checkpoint_complete(run, 2):
        assert time.monotonic() < deadline, "the local job never finished"
        time.sleep(0.5)
    logs = sorted(p.name for p in (run / "slurm_logs").iterdir())
    assert logs and all(name.startswith(f"{job_id}_") for name in logs), logs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
