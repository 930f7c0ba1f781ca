"""The control plane at thousands of ranks, measured: a real TCPStore (torch's default libuv server) in a
process of its own, driven by the project's real heartbeat (dcgan.distributed.liveness.Liveness) for
every host of an emulated job, many hosts per process, as 8-GPU nodes would run it.

    python benchmarks/control_plane.py --ranks 256,1024,4096 --per-host 8,1

Per job size and design (`--per-host 8`: one beater per 8-GPU host, as training runs; `--per-host 1`:
every rank beats, the design this replaced), after the connections are up:
- the store's request rate from the heartbeat (every client counts what it sends: CountedStore), over a
  steady window of --window seconds;
- latency: of the heartbeat's own requests (p50/p99, as its clients saw them: this includes waiting
  for a busy generator process's interpreter), and of a lone probe client sending one request every
  10 ms beside them (p50/p99: what the store itself answers at that load);
- false verdicts: any verdict before the fault is one;
- the fault: one host's process is killed (SIGKILL); the delay until rank 0 names it, and until the last
  other host has heard the verdict.

A host's other ranks make no request at all (they read their beater's verdict from a file on the host),
so only beaters are emulated; tests/unit/test_liveness.py shows the non-beaters hold no connection. The
generators run on this machine's cores beside the store: a cluster's store host has the store alone.
Prints one table (markdown) and, with --json, writes one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIVENESS_S = 15.0
"""dist.liveness_s's default: what a lost host is named after."""
PROBE_EVERY_S = 0.01
GENERATORS = 4
"""Processes that run the emulated hosts' heartbeats (threads), beside the victim's and the store's."""


@dataclass
class Row:
    ranks: int
    per_host: int
    hosts: int
    connections: int
    requests_per_s: float
    heartbeat_p50_ms: float
    heartbeat_p99_ms: float
    probe_p50_ms: float
    probe_p99_ms: float
    false_verdicts: int
    named_after_s: float
    all_heard_after_s: float
    verdict: str


def raise_file_limit() -> None:
    """Thousands of connections need thousands of descriptors (the soft limit is often 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(ports: Any, done: Any) -> None:
    """The store: torch's TCPStore server (libuv), alone in this process, as rank 0's host runs it."""
    import torch.distributed as dist

    raise_file_limit()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    ports.put(store.port)
    done.wait()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


class Emulated:
    """The hosts of one generator process: their Liveness, and when each reached a verdict."""

    def __init__(self, hosts: list[int], per_host: int, world_size: int, port: int) -> None:
        from dcgan.distributed.liveness import Liveness
        from dcgan.distributed.store import StoreAddress

        address = StoreAddress("127.0.0.1", port)
        self.decided: dict[int, tuple[float, str]] = {}
        self.beats = [
            Liveness(address, host * per_host, world_size, LIVENESS_S, self._ignore, per_host) for host in hosts
        ]
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch_verdicts, daemon=True)

    def _ignore(self, line: str) -> None:
        """A verdict ends nothing here: the monitor records when it was reached."""

    def start(self, spread_s: float) -> None:
        """Start every host's heartbeat over `spread_s`, and return once each has its connection: the
        measured window then holds no connection's start-up (which waits for rank 0's keys)."""
        for liveness in self.beats:
            liveness.start()
            time.sleep(spread_s / max(len(self.beats), 1))
        self._monitor.start()
        deadline = time.monotonic() + 300
        while any(lv.connection is None for lv in self.beats) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _watch_verdicts(self) -> None:
        while not self._stop.wait(0.02):
            for liveness in self.beats:
                if liveness.verdict is not None and liveness.rank not in self.decided:
                    self.decided[liveness.rank] = (time.time(), liveness.verdict)

    def counts(self) -> tuple[int, int]:
        """Requests sent so far, and latencies recorded so far, over every connection."""
        stores = [liveness.connection for liveness in self.beats if liveness.connection is not None]
        return sum(s.requests for s in stores), sum(len(s.latencies_s) for s in stores)

    def latencies_since(self, marks: list[int]) -> list[float]:
        stores = [liveness.connection for liveness in self.beats]
        return [x for s, m in zip(stores, marks, strict=True) if s is not None for x in s.latencies_s[m:]]

    def marks(self) -> list[int]:
        return [len(lv.connection.latencies_s) if lv.connection is not None else 0 for lv in self.beats]


def probe(port: int, inbox: Any, outbox: Any) -> None:
    """One lone client, one request every PROBE_EVERY_S during the window: the store's own answer time."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    outbox.put(("ready", -1))
    window_start, window_end, _ = inbox.get()
    time.sleep(max(0.0, window_start - time.time()))
    latencies = []
    while time.time() < window_end:
        started = time.perf_counter()
        store.add("benchmark/probe", 1)
        latencies.append(time.perf_counter() - started)
        time.sleep(PROBE_EVERY_S)
    outbox.put(("window", {"latencies": latencies}))
    outbox.close()
    outbox.join_thread()
    os._exit(0)


def generate_and_report(hosts: list[int], per_host: int, world_size: int, port: int, inbox: Any, outbox: Any) -> None:
    """`generate`, reporting the window's counts at its end (a victim is killed after that) and the
    verdicts at the end of the schedule."""
    raise_file_limit()
    emulated = Emulated(hosts, per_host, world_size, port)
    emulated.start(spread_s=1.0)
    outbox.put(("ready", {}))
    window_start, window_end, end = inbox.get()
    time.sleep(max(0.0, window_start - time.time()))
    sent_before, _ = emulated.counts()
    marks = emulated.marks()
    time.sleep(max(0.0, window_end - time.time()))
    sent_after, _ = emulated.counts()
    connections = sum(lv.connection is not None for lv in emulated.beats)
    window = {"requests": sent_after - sent_before, "latencies": emulated.latencies_since(marks)}
    outbox.put(("window", {**window, "connections": connections}))
    time.sleep(max(0.0, end - time.time()))
    outbox.put(("end", {"decided": emulated.decided}))
    outbox.close()
    outbox.join_thread()
    os._exit(0)  # no orderly stop: rank 0's would wait for every host to say it ended


def share(hosts: int, victim: int) -> list[list[int]]:
    """Hosts per process: host 0 (rank 0, the judge) alone, as its process is in a job (its thread
    shares no interpreter with hundreds of others); the victim apart; the rest over GENERATORS."""
    others = [host for host in range(1, hosts) if host != victim]
    return [[0]] + [others[g::GENERATORS] for g in range(GENERATORS)]


def measure(ranks: int, per_host: int, window_s: float) -> Row:
    """One job size and design: the steady window, then one host killed, as the module says."""
    ctx = mp.get_context("spawn")
    ports, done, outbox = ctx.Queue(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=serve, args=(ports, done), daemon=True)
    server.start()
    port = ports.get(timeout=60)
    hosts = ranks // per_host
    victim_host = hosts // 2
    started: list[tuple[Any, Any]] = []

    def launch(target: Any, *args: Any) -> Any:
        inbox = ctx.Queue()
        process = ctx.Process(target=target, args=(*args, inbox, outbox), daemon=True)
        process.start()
        started.append((process, inbox))
        return process

    for group in share(hosts, victim_host):  # all at once, as a launcher spawns ranks: rank 0 is not first
        launch(generate_and_report, group, per_host, ranks, port)
    victim = launch(generate_and_report, [victim_host], per_host, ranks, port)
    launch(probe, port)
    for _ in range(len(started)):
        assert outbox.get(timeout=600)[0] == "ready"
    window_start = time.time() + 5.0
    kill_at = window_start + window_s + 1.0
    schedule = (window_start, window_start + window_s, kill_at + LIVENESS_S + 10.0)
    for _, inbox in started:
        inbox.put(schedule)
    time.sleep(max(0.0, kill_at - time.time()))
    os.kill(victim.pid, signal.SIGKILL)
    reports = [outbox.get(timeout=schedule[2] - time.time() + 60) for _ in range(2 * len(started) - 2)]
    done.set()
    for process, _ in started:
        process.join(timeout=10)
    server.join(timeout=10)
    return summarize(ranks, per_host, hosts, window_s, kill_at, reports)


def summarize(ranks: int, per_host: int, hosts: int, window_s: float, kill_at: float, reports: list) -> Row:
    windows = [payload for kind, payload in reports if kind == "window"]
    heartbeat = [x for w in windows if "connections" in w for x in w["latencies"]]
    probe_latencies = [x for w in windows if "connections" not in w for x in w["latencies"]]
    decided: dict[int, tuple[float, str]] = {}
    for kind, payload in reports:
        if kind == "end":
            decided.update(payload["decided"])
    false = sum(1 for moment, _ in decided.values() if moment < kill_at)
    named = decided.get(0, (float("nan"), ""))
    heard = [moment for rank, (moment, _) in decided.items() if rank != 0 and moment >= kill_at]
    all_heard = max(heard) - kill_at if len(heard) == hosts - 2 else float("nan")
    return Row(
        ranks=ranks,
        per_host=per_host,
        hosts=hosts,
        connections=sum(w.get("connections", 0) for w in windows),
        requests_per_s=sum(w["requests"] for w in windows if "connections" in w) / window_s,
        heartbeat_p50_ms=percentile(heartbeat, 0.50),
        heartbeat_p99_ms=percentile(heartbeat, 0.99),
        probe_p50_ms=percentile(probe_latencies, 0.50),
        probe_p99_ms=percentile(probe_latencies, 0.99),
        false_verdicts=false,
        named_after_s=named[0] - kill_at,
        all_heard_after_s=all_heard,
        verdict=named[1][:120],
    )


def real_cost(hosts: int, per_host: int, steps: int) -> str:
    """The control-plane line of a real job: `hosts` emulated hosts (tests/support/hosts.py, needs root)
    x `per_host` gloo ranks training configs/tiny.yaml for `steps` steps; rank 0 logs what the heartbeat
    sent (dcgan.distributed.liveness)."""
    import re
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    from hosts import emulated_hosts, torchrun_on

    with tempfile.TemporaryDirectory() as work:
        names = [f"host{chr(ord('a') + i)}" for i in range(hosts)]
        with emulated_hosts(names, Path(work) / "net") as emulated:
            run = Path(work) / "run"
            launch = torchrun_on(emulated, names, per_host, run, f"train.steps={steps}", "sample.every=100000")
            statuses = {name: status for name, (status, _) in launch.wait(900).items()}
            assert set(statuses.values()) == {0}, statuses
        match = re.search(r"control plane: .*", (run / "train.log").read_text())
        return match.group(0) if match else "no control-plane line"


def table(rows: list[Row]) -> str:
    lines = [
        "| ranks | ranks per beater | connections | requests/s at the store | heartbeat p50 / p99 ms "
        "| probe p50 / p99 ms | false verdicts | named after | all hosts heard after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.ranks:,} | {r.per_host} | {r.connections:,} | {r.requests_per_s:,.0f} "
            f"| {r.heartbeat_p50_ms:.2f} / {r.heartbeat_p99_ms:.1f} | {r.probe_p50_ms:.2f} / {r.probe_p99_ms:.1f} "
            f"| {r.false_verdicts} | {r.named_after_s:.1f} s | {r.all_heard_after_s:.1f} s |"
        )
    return "\n".join(lines)


def in_own_network() -> None:
    """Run again inside a network namespace of its own (root: `unshare -n`, loopback only), unless already.

    Why: torch's store looks up the peer's name of every connection it accepts, in its event loop. Where
    the name server cannot be reached quickly (this machine's answers lag 5 s under a burst) a burst of
    connections stalls every request for seconds: measured here, 128 connections took 85-100 s and an
    established client waited 5.0 s; in a namespace whose lookups fail at once, 0.02 s and 8 ms. A
    cluster's name server answers; this machine's must not decide the figures."""
    if os.environ.get("DCGAN_BENCH_NETNS") or os.geteuid() != 0:
        return
    env = {**os.environ, "DCGAN_BENCH_NETNS": "1"}
    script = 'ip link set lo up && exec "$0" "$@"'
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", script, sys.executable, *sys.argv], env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="256,1024,4096", help="emulated job sizes (ranks), comma-separated")
    parser.add_argument(
        "--per-host",
        default="8,1",
        help="ranks per beating host: 8 (as training runs on 8-GPU nodes), 1 (every rank beats)",
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds of steady heartbeat measured")
    parser.add_argument(
        "--real",
        default="",
        metavar="HOSTSxRANKS,...",
        help="instead: real jobs on emulated hosts (root), e.g. 2x1,2x4,8x4, each printing its control-plane line",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON line per row here")
    args = parser.parse_args()
    if not args.real:
        in_own_network()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # thousands of clients' reverse-lookup warnings
    if args.real:
        for shape in args.real.split(","):
            hosts, per_host = (int(x) for x in shape.split("x"))
            print(f"{hosts} host(s) x {per_host} rank(s): {real_cost(hosts, per_host, steps=60)}", flush=True)
        return 0
    rows = []
    for per_host in [int(x) for x in args.per_host.split(",")]:
        for ranks in [int(x) for x in args.ranks.split(",")]:
            row = measure(ranks, per_host, args.window)
            print(json.dumps(asdict(row)), file=sys.stderr, flush=True)
            rows.append(row)
            if args.json is not None:
                with open(args.json, "a") as out:
                    out.write(json.dumps(asdict(row)) + "\n")
    where = "a network namespace of its own" if os.environ.get("DCGAN_BENCH_NETNS") else "the host's network"
    print(
        f"python {' '.join(sys.argv)}  ({os.cpu_count()} cores; store, generators and probe on this machine, {where})"
    )
    print(table(rows))
    print(f"verdict: {rows[-1].verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
