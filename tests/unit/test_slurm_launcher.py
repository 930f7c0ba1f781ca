"""slurm/train.sbatch's launcher (dcgan.cluster.slurm_job.launch) without SLURM: the status it reports and
records for the batch script however its agent ends, the failure requeues it counts against REQUEUE_LIMIT
when the first node is lost, and the reaper taking it for torchrun's agent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcgan.cluster import slurm_job
from dcgan.distributed import reaper


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DCGAN_JOB_STATE", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("REQUEUE_LIMIT", "1")
    return tmp_path


def test_an_agent_killed_by_a_signal_is_reported_as_128_plus_it_and_the_first_node_checked(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper SIGKILLs a stuck agent: the launcher, its parent, still records 137 and runs the check."""
    checked: list[str] = []
    monkeypatch.setattr(slurm_job, "requeue_if_first_node_lost", checked.append)
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda _argv: real_popen(killed))
    assert slurm_job.launch(["--rdzv-endpoint", "node1:20001", "-m", "dcgan"]) == 137
    assert (state / "status.1").read_text() == "137\n" and checked == ["node1"]


def test_a_refusal_is_recorded_and_the_first_node_is_not_checked(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad torchrun argument exits 2 in the real agent child (argparse): recorded, no head check."""
    checked: list[str] = []
    monkeypatch.setattr(slurm_job, "requeue_if_first_node_lost", checked.append)
    assert slurm_job.launch(["--no-such-option", "--rdzv-endpoint=node1:20001"]) == 2
    assert (state / "status.1").read_text() == "2\n" and checked == []


def test_the_first_node_lost_is_requeued_once_an_attempt_and_within_the_failure_limit(state: Path) -> None:
    assert slurm_job.failure_requeue_allowed("77")
    assert not slurm_job.failure_requeue_allowed("77")  # another node of the same attempt
    os.environ["SLURM_RESTART_COUNT"] = "1"
    assert not slurm_job.failure_requeue_allowed("77")  # REQUEUE_LIMIT=1 failure requeue done
    assert (state / "failure-requeues").read_text() == "1\n"


def test_the_rendezvous_host_is_read_from_either_spelling() -> None:
    assert slurm_job.rendezvous_host(["--nnodes=2", "--rdzv-endpoint=node1:20001", "-m", "x"]) == "node1"
    assert slurm_job.rendezvous_host(["--rdzv_endpoint", "node2:5"]) == "node2"
    assert slurm_job.rendezvous_host(["--rdzv-endpoint=node3"]) == "node3"


def test_the_reaper_starts_on_a_parent_that_named_itself_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's agent child runs as `python -m dcgan.cluster.slurm_job`: no torchrun on its command line."""
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **_: started.append(argv))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.delenv(reaper.AGENT_PID_VARIABLE, raising=False)
    reaper.end_stuck_agent()  # the parent here is pytest's runner, no agent
    assert started == []
    monkeypatch.setenv(reaper.AGENT_PID_VARIABLE, str(os.getppid()))
    reaper.end_stuck_agent()
    assert len(started) == 1 and started[0][3] == str(os.getppid())
