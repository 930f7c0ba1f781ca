"""torchrun across emulated hosts (tests/support/hosts.py): the same run on 2 hosts as on one, and faults between
hosts (a lost host, a partition, a peer lost at start-up, a host name that resolves to loopback) that
end every surviving process in seconds with one line naming the lost rank and host, leave no process
behind, and keep every completed checkpoint.

Timing bounds below follow from the defaults (dist.liveness_s=15): a lost peer whose connection closes
is judged after ~4 s of silence, a silent one after 15 s, one that never starts 20 s after rank 0 starts; torchrun's
agent on a cut-off host is ended 5 s after its worker (dcgan.distributed.liveness). The tests allow 30 s, the bound
README promises."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    assert_states_equal,
    completed_steps,
    load_checkpoint_tensors,
    read_stats,
)
from hosts import (
    EmulatedHosts,
    Launch,
    emulated_hosts,
    error_lines,
    missing_requirements,
    torchrun_on,
    wait_for,
    worker_pids,
    worker_traceback,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

SURVIVOR_BOUND_S = 30.0
"""README's promise: every surviving process ends within this many seconds of a fault (defaults)."""
START_UP_BOUND_S = 45.0
"""For a peer lost at start-up the rule counts from rank 0's first beat (20 s, which the line shows),
so the time from the fault also holds the survivor's own start-up (imports), which a loaded machine
stretches: measured 26-28 s here; still far below the 5x dist.timeout_s it was."""


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[EmulatedHosts]:
    with emulated_hosts(["hosta", "hostb"], tmp_path / "net") as hosts:
        yield hosts


def test_two_hosts_of_two_ranks_train_the_same_weights_as_one_host_of_four(
    two_hosts: EmulatedHosts, tmp_path: Path
) -> None:
    """Bit for bit. The hosts resolve their own names to loopback (Debian's default), which
    GLOO_SOCKET_IFNAME makes work: the fix that the refusal below names."""
    settings = ("train.steps=8", "train.batch_size=8", "checkpoint.every=8", "sample.every=8", "log.every=4")
    across = torchrun_on(
        two_hosts,
        ["hosta", "hostb"],
        2,
        tmp_path / "across",
        *settings,
        tag="across",
        loopback_name=True,
        env={"GLOO_SOCKET_IFNAME": "eth0"},
    )
    assert {name: status for name, (status, _) in across.wait(120).items()} == {"hosta": 0, "hostb": 0}, across.log(
        "hosta"
    )
    alone = torchrun_on(two_hosts, ["hosta"], 4, tmp_path / "alone", *settings, tag="alone")
    assert alone.wait(120)["hosta"][0] == 0, alone.log("hosta")
    assert ": 4 rank(s) on cpu" in (tmp_path / "across" / "train.log").read_text()
    final = f"checkpoints/step_{8:09d}"
    assert_states_equal(
        load_checkpoint_tensors(tmp_path / "across" / final), load_checkpoint_tensors(tmp_path / "alone" / final)
    )
    assert [line["step"] for line in read_stats(tmp_path / "across")] == [
        line["step"] for line in read_stats(tmp_path / "alone")
    ]


FAULT_RUN = ("train.steps=400", "log.every=5", "checkpoint.every=10", "sample.every=100000")


def test_a_lost_host_ends_the_survivor_in_one_line_and_elastic_torchrun_resumes_on_the_rest(
    two_hosts: EmulatedHosts, tmp_path: Path
) -> None:
    """kill -9 of everything on host B; torchrun --nnodes=1:2 on A starts a new round without it, which
    resumes from the newest checkpoint with a warning that the global batch changed."""
    run = tmp_path / "run"
    launch = torchrun_on(
        two_hosts,
        ["hosta", "hostb"],
        1,
        run,
        *FAULT_RUN,
        "train.steps=60",
        flags=["--max-restarts=1", "--rdzv-conf=last_call_timeout=2"],
        env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
        nnodes="1:2",
    )
    wait_for(lambda: len(completed_steps(run)) >= 2, 120, "two checkpoints")
    kept = completed_steps(run)
    fault = time.monotonic()
    two_hosts.kill_all("hostb")
    wait_for(lambda: bool(error_lines(launch.log("hosta"))), SURVIVOR_BOUND_S, "the survivor's line")
    ended_s = time.monotonic() - fault
    [line] = error_lines(launch.log("hosta"))
    # c10d's rendezvous orders hosts by name: rank 0 is on host A
    assert re.match(r"dcgan: error: lost rank 1 on hostb: no heartbeat for \d s \(dist.liveness_s=15\)", line), line
    assert line.endswith("Completed checkpoints are kept: start the job again to resume")
    status = launch.procs["hosta"].wait(timeout=120)
    log = launch.log("hosta")
    assert status == 0, log[-3000:]
    assert "Traceback" not in log  # the worker's one line, and torchrun recovered without a summary
    resumed = int(re.search(rf"resumed from {run / 'checkpoints'}/step_(\d+)", log).group(1))
    assert resumed >= kept[-1]  # the newest complete checkpoint at the fault, or one completed just after
    assert "the global batch changed on resume: 32 on 2 rank(s) when checkpointed, 16 on 1 now" in log
    assert completed_steps(run)[-1] == 60
    assert two_hosts.pids("hostb") == []
    print(f"lost host: survivor's line {ended_s:.1f} s after the fault")


def exits_within(launch: Launch, fault: float, bound: float) -> dict[str, tuple[int, float]]:
    """Each host's (exit status, seconds after the fault), asserting that all ended within `bound`."""
    ended = launch.wait(bound + (fault - launch.started) + 5)
    after = {name: (status, seconds - (fault - launch.started)) for name, (status, seconds) in ended.items()}
    late = {name: round(s, 1) for name, (_, s) in after.items() if s > bound}
    assert not late, f"ended later than {bound} s after the fault: {late}"
    return after


def test_a_partition_ends_both_sides_in_seconds_and_the_next_start_resumes(
    two_hosts: EmulatedHosts, tmp_path: Path
) -> None:
    """Host B's link goes down, its processes alive: both sides end within the bound in one line each,
    torchrun's agent on the cut-off host included, nothing is left running, and once the link is back
    the same command resumes from the newest complete checkpoint."""
    run = tmp_path / "run"
    launch = torchrun_on(two_hosts, ["hosta", "hostb"], 1, run, *FAULT_RUN, "train.steps=40")
    wait_for(lambda: len(completed_steps(run)) >= 2, 120, "two checkpoints")
    fault = time.monotonic()
    two_hosts.set_link("hostb", up=False)
    ended = exits_within(launch, fault, SURVIVOR_BOUND_S)
    assert all(status != 0 for status, _ in ended.values()), ended
    kept = completed_steps(run)
    [line_a] = error_lines(launch.log("hosta"))
    [line_b] = error_lines(launch.log("hostb"))
    assert re.match(r"dcgan: error: lost rank 1 on hostb: no heartbeat for 1\d s \(dist.liveness_s=15\)", line_a), (
        line_a
    )
    assert re.match(
        r"dcgan: error: rank 1 on hostb lost contact with rank 0's rendezvous store at hosta:\d+ for 15 s", line_b
    ), line_b
    assert "torchrun's agent" in launch.log("hostb") and "was stuck on the unreachable rendezvous" in launch.log(
        "hostb"
    )
    assert not worker_traceback(launch.log("hosta") + launch.log("hostb"))
    time.sleep(0.5)
    assert two_hosts.pids("hosta") == [] and two_hosts.pids("hostb") == []
    print(f"partition: exits { ({name: round(s, 1) for name, (_, s) in ended.items()}) } s after the fault")

    two_hosts.set_link("hostb", up=True)
    two_hosts.wait_reachable("hostb", two_hosts.hosts["hosta"].address)
    again = torchrun_on(two_hosts, ["hosta", "hostb"], 1, run, *FAULT_RUN, "train.steps=40", tag="again")
    assert {name: status for name, (status, _) in again.wait(120).items()} == {"hosta": 0, "hostb": 0}
    log = again.log("hosta") + again.log("hostb")
    assert f"resumed from {run / 'checkpoints'}/step_{kept[-1]:09d}" in log
    assert completed_steps(run)[-1] == 40


def test_a_peer_lost_during_start_up_ends_the_survivor_within_the_bound(
    two_hosts: EmulatedHosts, tmp_path: Path
) -> None:
    """Host B dies as soon as its rank is spawned, before it reaches the process group: host A's rank,
    waiting for it inside init_process_group, ends within the bound (it waited 5x dist.timeout_s)."""
    launch = torchrun_on(two_hosts, ["hosta", "hostb"], 1, tmp_path / "run", *FAULT_RUN)
    wait_for(lambda: bool(worker_pids(two_hosts, "hostb")), 60, "host B's rank to start")
    fault = time.monotonic()
    two_hosts.kill_all("hostb")
    ended = exits_within(launch, fault, START_UP_BOUND_S)
    assert ended["hosta"][0] != 0
    [line] = error_lines(launch.log("hosta"))
    assert re.match(
        r"dcgan: error: lost rank 1 on a host never reported \(the rank never started\): no heartbeat for "
        r"2\d s",
        line,
    ), line  # the arrival rule: dist.liveness_s + 5 s after rank 0's start
    assert not worker_traceback(launch.log("hosta"))
    assert not (tmp_path / "run" / "checkpoints").exists() or completed_steps(tmp_path / "run") == []
    assert two_hosts.pids("hosta") == []
    print(f"peer lost at start-up: host A ended {ended['hosta'][1]:.1f} s after the fault")


def test_a_host_name_that_resolves_to_loopback_is_refused_in_one_line(two_hosts: EmulatedHosts, tmp_path: Path) -> None:
    """Debian's `127.0.1.1 <host>` line on every host: gloo would listen on loopback; each rank refuses
    before any work, naming the interface towards the rendezvous (with it set, the first test trains)."""
    refused = torchrun_on(two_hosts, ["hosta", "hostb"], 1, tmp_path / "refused", "train.steps=4", loopback_name=True)
    ended = refused.wait(90)
    assert all(status != 0 for status, _ in ended.values())
    for name in ("hosta", "hostb"):
        assert error_lines(refused.log(name)) == [
            f"dcgan: error: this host's name {name} resolves to 127.0.1.1 (loopback), so gloo would listen where the other "
            f"hosts of this multi-host job cannot reach it: set GLOO_SOCKET_IFNAME=eth0 for the job (and NCCL_SOCKET_IFNAME "
            f"on GPUs), or make {name} resolve to this host's network address in /etc/hosts or DNS"
        ]
    assert not (tmp_path / "refused" / "checkpoints").exists()
