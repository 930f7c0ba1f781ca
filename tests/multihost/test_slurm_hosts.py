"""SLURM across hosts: a real 2-node cluster on emulated hosts (network namespaces, tests/support/hosts.py), one
slurmd per host and slurmctld on the bridge (slurm/local-cluster/start-multinode.sh), running the
project's 2-node jobs as users submit them: `sbatch --nodes=2 slurm/train.sbatch` (srun + torchrun, c10d
rendezvous on the first node, gloo between the hosts), its requeue after USR1, a job refused by its
training on both nodes (exit 2, never requeued), a job of `--nodes=1-2` requeued onto the one node left
after the other is drained (the same trajectory as a 1-rank run), a job of `--nodes=1-2` that shrinks
onto one node when the other is lost (elastic torchrun, no requeue), and `dcgan submit --nodes 2`
(submitit: srun starts one training process per node) and `--nodes 1-2` (train.sbatch)."""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    checkpoint_complete,
    completed_steps,
    flatten,
    free_port,
    load_checkpoint_tensors,
    read_stats,
    subprocess_env,
)
from hosts import EmulatedHosts, missing_requirements

LOCAL_CLUSTER = ROOT / "slurm" / "local-cluster"
NAMES = ("node1", "node2")


def why_not() -> str | None:
    """Why the 2-node cluster cannot run here (None when it can): the skip reason."""
    if reason := missing_requirements():
        return reason
    missing = [d for d in ("munged", "slurmctld", "slurmd") if not Path("/usr/sbin", d).exists()]
    missing += [c for c in ("sbatch", "squeue", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): bash slurm/local-cluster/start.sh installs it"
    return None


WHY_NOT = why_not()
pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@dataclass
class Cluster:
    hosts: EmulatedHosts
    workdir: Path
    env: dict[str, str]
    """The environment users of this cluster have: SLURM_CONF, and what every job here must set."""

    def slurm(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def in_queue(self, job: str) -> bool:
        """Pending, running or completing (a requeued job is pending again)."""
        return bool(self.slurm("squeue", "-h", "-j", job, check=False).stdout.strip())

    def wait_until_gone(self, job: str, timeout: float, log: Path | None = None) -> None:
        deadline = time.monotonic() + timeout
        while self.in_queue(job):
            if time.monotonic() > deadline:
                text = log.read_text() if log and log.exists() else ""
                raise AssertionError(
                    f"job {job} still in the queue after {timeout:.0f} s\n{self.job_fields(job)}\n{text[-3000:]}"
                )
            time.sleep(0.5)

    def wait_until_idle(self, timeout: float = 60) -> None:
        """Until every node is idle and responding (state exactly `idle`: not `idle*`, drained, down or
        completing), as a job of a node range needs both: SLURM gives such a job only the nodes free when it
        is scheduled."""
        deadline = time.monotonic() + timeout
        while set(self.slurm("sinfo", "-h", "-N", "-o", "%T").stdout.split()) != {"idle"}:
            assert time.monotonic() < deadline, self.slurm("sinfo", "-N", "-l").stdout
            time.sleep(0.5)

    def job_fields(self, job: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (completed jobs stay MinJobAge=300 s)."""
        text = self.slurm("scontrol", "show", "job", "-o", job, check=False).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def ranks_by_host(self) -> dict[str, set[int]]:
        """Training processes running on each host now, by their RANK: read from /proc of every process in
        the host's network namespace (torchrun's workers and submitit's tasks carry RANK; agents do not)."""
        found: dict[str, set[int]] = {}
        for name in NAMES:
            for pid in self.hosts.pids(name):
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")), None)
                if rank is not None and b"dcgan" in command and b"torch.distributed.run" not in command:
                    found.setdefault(name, set()).add(int(rank))
        return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two emulated hosts and a SLURM cluster across them; afterwards, whatever happened, its jobs are
    cancelled, its daemons stopped (by pid file), everything left on the hosts killed and the hosts removed."""
    # under /tmp, searchable by user munge (munged runs as munge), short enough for a socket path
    workdir = Path(tempfile.mkdtemp(prefix="dcgan-mnslurm-", dir="/tmp"))
    workdir.chmod(0o755)
    env = {
        **subprocess_env(),
        "SLURM_CONF": str(workdir / "slurm" / "slurm.conf"),
        "SLURM_MN_CTLD_PORT": str(free_port("")),
        "SLURM_MN_CRED_EXPIRE": "5",  # SLURM's minimum: a requeued job may start again 6 s after the requeue
        "WANDB_MODE": "disabled",
    }
    for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_NODELIST", "SBATCH_"))]:
        del env[key]  # a test run inside a SLURM job must not pass that job's identity on
    hosts = EmulatedHosts(NAMES, workdir / "hosts")
    try:
        hosts.start()
        started = subprocess.run(
            [
                "bash",
                str(LOCAL_CLUSTER / "start-multinode.sh"),
                str(workdir / "slurm"),
                hosts.head_address,
                *(f"{name}={host.address}" for name, host in hosts.hosts.items()),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, f"start-multinode.sh failed:\n{started.stdout}\n{started.stderr}"
        yield Cluster(hosts, workdir, env)
    finally:
        try:
            subprocess.run(
                ["bash", str(LOCAL_CLUSTER / "stop-multinode.sh"), str(workdir / "slurm")],
                env=env,
                capture_output=True,
                timeout=90,
            )
        finally:
            hosts.close()  # slurmstepd and job processes that outlived their slurmd end here
            shutil.rmtree(workdir, ignore_errors=True)


def requeued_until_completed(cluster: Cluster, job: str, out: Path) -> tuple[dict[str, str], str]:
    """USR1 to the batch shell, as SLURM sends it before a time limit (--signal=B:USR1@120): every rank
    checkpoints, the script requeues the job, and the next attempt completes it. Returns the job's
    fields and its output."""
    cluster.slurm("scancel", "--signal=USR1", "--batch", job)
    cluster.wait_until_gone(job, timeout=180, log=out)
    text = out.read_text()
    fields = cluster.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        f"{fields}\n{text}"
    )
    return fields, text


MULTINODE_CLUSTER = "dcganmn"
"""slurm/local-cluster/start-multinode.sh's ClusterName (the local single-node cluster's differs, so their
jobs of the same number keep their states apart)."""


def sbatch(cluster: Cluster, out: Path, *args: str, nodes: str = "2", export: str = "") -> str:
    """slurm/train.sbatch on `nodes` nodes (N or MIN-MAX) x 1 process, as a user submits it on a CPU cluster;
    `export`: more of the script's variables, e.g. MIN_NODES=1,MAX_RESTARTS=1. A range waits for both nodes
    to be idle first, so that the job starts on both."""
    if "-" in nodes:
        cluster.wait_until_idle()
    return cluster.slurm(
        "sbatch",
        "--parsable",
        f"--chdir={ROOT}",
        f"--nodes={nodes}",
        "--gres=none",
        "--cpus-per-task=1",
        "--mem=2G",
        f"--output={out}",
        f"--export=ALL,PYTHON={sys.executable},NPROC_PER_NODE=1{',' + export if export else ''}",
        str(ROOT / "slurm" / "train.sbatch"),
        "configs/tiny.yaml",
        *args,
        "log.wandb=disabled",
    ).stdout.strip()


def test_sbatch_job_trains_across_two_hosts_and_resumes_on_both_after_a_requeue(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The signal goes right after the first checkpoint (step 10), 110 steps before the end."""
    run, out = tmp_path / "run", tmp_path / "out.txt"
    job = sbatch(cluster, out, f"run.dir={run}", "train.steps=120", "checkpoint.every=10")
    ranks: dict[str, set[int]] = {}
    deadline = time.monotonic() + 120
    while not (checkpoint_complete(run, 10) and len(ranks) == 2):
        for host, seen in cluster.ranks_by_host().items():
            ranks.setdefault(host, set()).update(seen)
        assert cluster.in_queue(job), (
            f"job {job} ended before its first checkpoint:\n{out.read_text() if out.exists() else ''}"
        )
        assert time.monotonic() < deadline, (
            f"no checkpoint of step 10 with ranks on both hosts (ranks {ranks}):\n{out.read_text() if out.exists() else ''}"
        )
        time.sleep(0.2)
    assert sorted(ranks) == list(NAMES) and sorted(r for seen in ranks.values() for r in seen) == [0, 1], ranks

    # what SLURM does before a time limit (--signal=B:USR1@120): the batch shell gets USR1, forwards SIGTERM
    # to the step, every rank checkpoints on both hosts, and the script requeues the job
    fields, text = requeued_until_completed(cluster, job, out)
    assert fields["NodeList"] == "node[1-2]"
    for restart in (0, 1):
        assert f"job {job} restart {restart}: 2 node(s) x 1 process(es), torchrun --nnodes=2, rendezvous node1:" in text
    assert text.count("2 rank(s) on cpu") == 2, text  # rank 0's line, in each slice
    assert "signal USR1: asking the job step to checkpoint" in text and f"requeueing job {job}" in text, text
    stops = [
        int(step)
        for step in re.findall(r"\[rank 1\] WARNING \S+: stop signal received: checkpointing step (\d+)", text)
    ]
    stopped = int(re.search(r"^\S+ WARNING \S+: stop signal received: checkpointing step (\d+)", text, re.M).group(1))
    assert stops == [stopped] and 10 <= stopped < 120, text  # the rank on the other host checkpointed the same step
    assert f"resumed from {run / 'checkpoints'}/step_{stopped:09d} at step {stopped}" in text, text
    assert completed_steps(run)[-1] == 120
    stats = read_stats(run)
    assert stats[-1]["step"] == 120
    assert all(row["global_batch"] == 32 and row["images_seen"] == row["step"] * 32 for row in stats)  # 2 ranks x 16
    assert any(row["step"] > stopped for row in stats) and not cluster.ranks_by_host()


def test_two_node_job_whose_training_refuses_to_start_ends_failed_without_a_requeue(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A bad setting: every rank refuses with exit 2. The job is fixed-size (srun --kill-on-bad-exit=1), so
    the first launcher to exit gets its peer SIGKILLed, and srun may report that 137 instead of 2; each
    launcher's own status, in the job's shared directory, makes the script end the job: FAILED with 2,
    never requeued (was: a 137 requeued it up to REQUEUE_LIMIT times)."""
    run, out = tmp_path / "run", tmp_path / "out.txt"
    job = sbatch(cluster, out, f"run.dir={run}", "train.no_such_key=1")
    cluster.wait_until_gone(job, timeout=120, log=out)
    text = out.read_text()
    fields = cluster.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "2:0", "0"), f"{fields}\n{text}"
    assert "training ended with status 2 on a node (a setting or a busy run.dir; see the log): not requeueing" in text
    state = ROOT / ".dcgan-slurm" / f"{MULTINODE_CLUSTER}-{job}"  # slurm/train.sbatch's <cluster>-<job>
    assert "requeueing job" not in text and not state.exists(), text


@pytest.fixture
def drain(cluster: Cluster) -> Iterator[Callable[[str], None]]:
    """Drain a node of the cluster (as an admin does with a failing one: its jobs run on, nothing new
    starts there); every node drained here is returned to service afterwards, whatever happened."""
    drained: list[str] = []

    def drain_node(name: str) -> None:
        drained.append(name)
        cluster.slurm("scontrol", "update", f"nodename={name}", "state=drain", "reason=test")

    yield drain_node
    for name in drained:
        cluster.slurm("scontrol", "update", f"nodename={name}", "state=resume", check=False)
    cluster.wait_until_idle()


def wait_for_checkpoint_on_both_hosts(cluster: Cluster, job: str, run: Path, step: int, out: Path) -> None:
    """Until the checkpoint of `step` is complete with a training rank seen on each host (ranks 0 and 1)."""
    ranks: dict[str, set[int]] = {}
    deadline = time.monotonic() + 120
    while not (checkpoint_complete(run, step) and len(ranks) == 2):
        for host, seen in cluster.ranks_by_host().items():
            ranks.setdefault(host, set()).update(seen)
        log = out.read_text() if out.exists() else ""
        nodes = cluster.job_fields(job).get("NodeList", "")
        assert nodes in ("node[1-2]", "(null)", ""), f"job {job} started on {nodes} alone:\n{log}"
        assert cluster.in_queue(job), f"job {job} ended before its checkpoint of step {step}:\n{log}"
        assert time.monotonic() < deadline, f"no checkpoint of step {step} with ranks on both hosts ({ranks}):\n{log}"
        time.sleep(0.2)
    assert sorted(ranks) == list(NAMES) and sorted(r for seen in ranks.values() for r in seen) == [0, 1], ranks


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over one tensor: the error in units of the tensor's own scale."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def test_job_of_one_to_two_nodes_requeued_onto_one_node_continues_the_same_trajectory(
    cluster: Cluster, drain: Callable[[str], None], tmp_path: Path
) -> None:
    """`sbatch --nodes=1-2` starts on both hosts; node2 is drained and the job requeued (USR1, as before a
    time limit): the next attempt gets node1 alone, resumes the 2-rank checkpoint on 1 rank and ends with
    the weights of a 1-rank run of the same config (train.global_batch fixes the images per step; the
    data order and noise are functions of the step)."""
    steps, every = 40, 10
    common = ["configs/tiny.yaml", f"train.steps={steps}", f"checkpoint.every={every}", "train.global_batch=16"]
    run, out = tmp_path / "run", tmp_path / "out.txt"
    job = sbatch(cluster, out, *common[1:], f"run.dir={run}", nodes="1-2")
    wait_for_checkpoint_on_both_hosts(cluster, job, run, every, out)

    drain("node2")
    fields, text = requeued_until_completed(cluster, job, out)
    assert fields["NodeList"] == "node1", fields
    assert f"job {job} restart 0: 2 node(s) x 1 process(es), torchrun --nnodes=2, rendezvous node1:" in text, text
    assert f"job {job} restart 1: 1 node(s) x 1 process(es), torchrun --nnodes=1, rendezvous node1:" in text, text
    assert "2 rank(s) on cpu, batch 8 per rank (global 16)" in text, text
    assert "1 rank(s) on cpu, batch 16 per rank (global 16)" in text, text
    stopped = int(re.search(r"stop signal received: checkpointing step (\d+)", text).group(1))
    assert every <= stopped < steps, text
    assert f"resumed from {run / 'checkpoints'}/step_{stopped:09d} at step {stopped}" in text, text
    assert "resized from 2 to 1 ranks: same global batch (16), same data order and noise, the same trajectory" in text
    assert completed_steps(run)[-1] == steps
    stats = read_stats(run)
    assert all(row["global_batch"] == 16 and row["images_seen"] == row["step"] * 16 for row in stats)

    from dcgan.config import load_config
    from dcgan.train.loop import train

    reference = tmp_path / "reference"
    assert train(load_config(str(ROOT / common[0]), [*common[1:], f"run.dir={reference}"])) == 0
    final = f"checkpoints/step_{steps:09d}"
    resized = flatten(load_checkpoint_tensors(run / final)["model"])
    straight = flatten(load_checkpoint_tensors(reference / final)["model"])
    assert sorted(resized) == sorted(straight)
    worst = max(max_relative_difference(resized[k], straight[k]) for k in straight if straight[k].is_floating_point())
    print(f"resized vs 1-rank run at step {steps}: max relative difference {worst:.3g}")
    for key, weights in straight.items():
        assert torch.allclose(resized[key], weights, rtol=1e-4, atol=1e-5), (
            f"{key}: max relative difference {max_relative_difference(resized[key], weights):.3g}"
        )


def bring_back(cluster: Cluster) -> None:
    """A node whose processes were all killed rejoins the cluster: start-multinode.sh starts its slurmd again
    and returns it to service (as an admin does once the machine is back)."""
    hosts = cluster.hosts
    started = subprocess.run(
        [
            "bash",
            str(LOCAL_CLUSTER / "start-multinode.sh"),
            str(cluster.workdir / "slurm"),
            hosts.head_address,
            *(f"{name}={host.address}" for name, host in hosts.hosts.items()),
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, f"start-multinode.sh failed:\n{started.stdout}\n{started.stderr}"


def test_job_of_one_to_two_nodes_shrinks_onto_the_node_left_when_the_other_is_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`MIN_NODES=1 sbatch --nodes=1-2`: torchrun --nnodes=1:2 on both hosts. After the first checkpoint every
    process of node2 is killed (slurmd, torchrun, its rank: the machine is gone) and node2 is set DOWN, as the
    controller does once SlurmdTimeout passes (30 s here; done at once to keep the test short). The agent on
    node1 starts a new round alone, which resumes from the newest checkpoint with the same global batch; SLURM
    removes node2 from the job instead of killing it (--no-kill), and the job completes, never requeued."""
    steps, every = 60, 10
    run, out = tmp_path / "run", tmp_path / "out.txt"
    settings = [f"run.dir={run}", f"train.steps={steps}", f"checkpoint.every={every}", "train.global_batch=16"]
    job = sbatch(cluster, out, *settings, nodes="1-2", export="MIN_NODES=1,MAX_RESTARTS=1,LAST_CALL_TIMEOUT=2")
    wait_for_checkpoint_on_both_hosts(cluster, job, run, every, out)
    try:
        lost = time.monotonic()
        assert cluster.hosts.kill_all("node2")
        cluster.slurm("scontrol", "update", "nodename=node2", "state=down", "reason=lost")
        cluster.wait_until_gone(job, timeout=240, log=out)
        print(f"node2 lost: the job ended {time.monotonic() - lost:.0f} s later")
    finally:
        bring_back(cluster)

    text = out.read_text()
    fields = cluster.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "0"), (
        f"{fields}\n{text}"
    )
    assert fields["NodeList"] == "node1", fields  # node2 removed from the job, the job not killed
    assert f"job {job} restart 0: 2 node(s) x 1 process(es), torchrun --nnodes=1:2, rendezvous node1:" in text, text
    assert "2 rank(s) on cpu, batch 8 per rank (global 16)" in text, text
    assert "1 rank(s) on cpu, batch 16 per rank (global 16)" in text, text  # the new round, on node1 alone
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert every <= resumed < steps and "training finished" in text, text
    assert completed_steps(run)[-1] == steps
    stats = read_stats(run)
    assert all(row["global_batch"] == 16 and row["images_seen"] == row["step"] * 16 for row in stats)


def launch_slurm(cluster: Cluster, *argv: str) -> tuple[str, str]:
    """`dcgan submit ARGV` as a user of the cluster runs it: the job id and what it said on stderr."""
    submitted = subprocess.run(
        [sys.executable, "-m", "dcgan", "submit", *argv],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    return re.search(r"^job (\d+)$", submitted.stdout, re.M).group(1), submitted.stderr


def test_submitit_job_of_two_nodes_runs_one_task_on_each_host(cluster: Cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job, _ = launch_slurm(
        cluster,
        "configs/tiny.yaml",
        f"run.dir={run}",
        "train.steps=20",
        "log.wandb=disabled",
        *("--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--mem-gb", "2", "--time", "5"),
    )
    logs = run / "slurm_logs" / job
    cluster.wait_until_gone(job, timeout=120)

    fields = cluster.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"], fields["NodeList"]) == ("COMPLETED", "0:0", "node[1-2]"), fields
    for task, host in enumerate(NAMES):
        started = (logs / f"{job}_{task}_log.out").read_text()
        assert f"hostname={host}, local_rank=0(1), node={task}(2), global_rank={task}(2)" in started, started
        assert pickle.loads((logs / f"{job}_{task}_result.pkl").read_bytes()) == ("success", 0)
    assert "2 rank(s) on cpu" in (logs / f"{job}_0_log.err").read_text()
    assert completed_steps(run) == [10, 20] and checkpoint_complete(run, 20)
    assert [row["global_batch"] for row in read_stats(run)] == [32] * 4


def test_submit_of_one_to_two_nodes_runs_train_sbatch_elastically_on_both_idle_hosts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`dcgan submit --nodes 1-2` goes in as slurm/train.sbatch (torchrun --nnodes=1:2, MIN_NODES set by dcgan
    submit) and, on two idle hosts, runs on both (no --ntasks-per-node on the sbatch line: SLURM would size
    the job for MIN nodes), each rank on half the global batch."""
    run = tmp_path / "run"
    argv = ["configs/tiny.yaml", f"run.dir={run}", "train.steps=10", "train.global_batch=16", "log.wandb=disabled"]
    argv += ["--nodes", "1-2", "--cpus-per-task", "1", "--mem-gb", "2", "--time", "5"]
    cluster.wait_until_idle()
    job, said = launch_slurm(cluster, *argv)
    assert "warning" not in said, said  # a fixed global batch: nothing to warn about
    cluster.wait_until_gone(job, timeout=120)

    fields = cluster.job_fields(job)
    text = (run / "slurm_logs" / f"{job}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["NodeList"]) == ("COMPLETED", "0:0", "node[1-2]"), fields
    assert f"job {job} restart 0: 2 node(s) x 1 process(es), torchrun --nnodes=1:2, rendezvous node1:" in text, text
    assert "2 rank(s) on cpu, batch 8 per rank (global 16)" in text and "training finished" in text, text
    assert completed_steps(run) == [10]
