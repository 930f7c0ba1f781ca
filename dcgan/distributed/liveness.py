"""Peer liveness: a lost host, a partition or a dead rank ends every surviving rank in seconds, with one
line naming the lost rank(s) and their host(s).

Why not the collective timeout alone: `dist.timeout_s` has to be long (a slow checkpoint save, a first
compile, an evaluation on several ranks), 600 s by default, and a collective waiting for a lost peer then
either idles that long or fails with a traceback that names an address, not a rank. So every host beats
in the rendezvous store once a second: its first rank (the host's beater), from a thread of its own (a
busy main thread, inside a compile, a save or a collective, still beats) and through a connection of its
own whose timeout is the short `dist.liveness_s`. The host's other ranks make no request at all: torchrun's
agent already ends them when one of them dies, and they learn a verdict from a file their beater writes
on the host (dcgan.distributed.verdicts has the rules and why a host, not a rank, beats).

- rank 0 judges every host: one whose beat count stands still for `liveness_s` (or that never beats
  within `liveness_s` plus an arrival slack, which grows with the hosts' load: verdicts.Timing, of rank
  0's start or of the latest host's first beat, whichever is later) is lost; rank 0 writes the verdict into the store and marks every listening host's beat
  count, so that each learns of it from its next beat;
- every other host watches rank 0's beat (rank 0's process gone while its host and the store live);
- a beater that cannot reach the store for `liveness_s` is cut off (its link is down, or the store's
  host is gone) and says so, for its whole host;
- a rank whose collective fails first (a peer's connection closed) marks the store "suspect": rank 0
  then judges with a patience of SUSPECT_PATIENCE_S instead of `liveness_s`;
- a rank that fails adds itself, with its error's line, to the store's list of failures, which rank 0
  reads with the beats: a failed rank is named with its own error at once.

A verdict ends the process with `os._exit(PeerLost.exit_status)` after logging its line: the main thread
may be blocked inside a collective that nothing interrupts, and the usual cleanup (a checkpoint wait, a
barrier) would wait for the lost peer. Completed checkpoints are untouched; one being written has no
`.metadata` yet and is removed at the next start. Cost at the store: rank 0 sends two requests a second
(one more per MULTI_KEYS hosts), every other host 1.33; rank 0 logs what was sent at the end of the run.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from dcgan.distributed.reaper import end_stuck_agent
from dcgan.distributed.store import CountedStore, StoreAddress, round_key_prefix
from dcgan.distributed.verdicts import (
    ENDED,
    VERDICT_MARK,
    WATCH_EVERY,
    Hosts,
    Judge,
    Timing,
    Watched,
    cost_line,
    failed_ranks,
    local_verdict_file,
    lost_line,
    process_age_s,
    read_verdict_file,
    write_verdict_file,
)
from dcgan.errors import PeerLost, one_line, tell_launcher

log = logging.getLogger(__name__)


def _exit_with(line: str) -> None:
    """Log the verdict, print it as the CLI prints errors, and end the process now."""
    log.error("%s", line)
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(f"dcgan: error: {line}", file=sys.stderr, flush=True)
    tell_launcher(PeerLost(line))
    os._exit(PeerLost.exit_status)


class Liveness:
    """The heartbeat of one rank (see the module's docstring): start it before the process group, stop
    it after the rank's last collective. `per_host` ranks share a host (LOCAL_WORLD_SIZE)."""

    def __init__(
        self,
        address: StoreAddress,
        rank: int,
        world_size: int,
        liveness_s: float,
        on_verdict: Callable[[str], None] = _exit_with,
        per_host: int = 1,
    ) -> None:
        self.address, self.rank, self.world_size = address, rank, world_size
        self.on_verdict = on_verdict
        self.hosts = Hosts(world_size, per_host)
        self.timing = Timing.for_job(liveness_s, self.hosts.count, process_age_s())
        self.liveness_s = self.timing.liveness_s
        self.host = self.hosts.of(rank)
        self.beats = self.hosts.beats_for_its_host(rank)
        self.prefix = round_key_prefix(address)
        self.verdict_file = local_verdict_file(self.prefix, address, self.host)
        self.verdict: str | None = None
        self._stopped = threading.Event()
        self._decided = threading.Event()
        self._decision = threading.Lock()
        self._ending = False
        self._store: CountedStore | None = None
        self._last_contact = time.monotonic()
        self._started_wall = time.time()
        self._contacted = False
        self._judge = Judge(self.hosts.count, self.timing)
        self._watched = Watched(self.timing)
        self._zero_seen = False
        self._watch: threading.Thread | None
        if self.beats:
            self._thread = threading.Thread(target=self._run, name="dcgan-heartbeat", daemon=True)
            self._watch = threading.Thread(target=self._watch_contact, name="dcgan-liveness-watch", daemon=True)
        else:
            self._thread = threading.Thread(target=self._listen, name="dcgan-liveness-listen", daemon=True)
            self._watch = None

    def _key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    @property
    def connection(self) -> CountedStore | None:
        """The beater's store connection once it is open, with what it sent (benchmarks/control_plane.py)."""
        return self._store

    def start(self) -> Liveness:
        """Start beating (or listening). The thread connects by itself: the store may not exist yet (rank
        0 creates it in `init_process_group` when torchrun's agent does not serve one), and a rank 0 that
        never creates it must end the wait too."""
        if self.beats:
            self.verdict_file.unlink(missing_ok=True)
        self._thread.start()
        if self._watch is not None:
            self._watch.start()
        return self

    def ending(self) -> None:
        """This rank is ending on its own (an error every rank raised, a stop signal): from now on a peer
        that finishes or fails is no news, only silence and a lost store are (a cleanup may still hang).
        Without this, the first rank to fail would turn its peers' own exit statuses and lines into
        "rank N failed"."""
        self._ending = True

    def stop(self, error: BaseException | None = None) -> None:
        """Stop beating, saying how this rank ended: a failure goes on the store's list (rank 0 names it
        with its error at once instead of waiting for silence), a beater's host is marked ended. Rank 0,
        whose process may hold the store, waits (at most `liveness_s`) until every host has ended."""
        self._ending = True
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.timing.beat_s)
        # through a thread with a bounded wait: a request to a store that cannot be reached blocks
        final = threading.Thread(target=self._say_how_it_ended, args=(error,), daemon=True)
        final.start()
        final.join(timeout=self.liveness_s + 2 * self.timing.beat_s if self.rank == 0 else 2 * self.timing.beat_s)
        if self.beats:
            self.verdict_file.unlink(missing_ok=True)

    def _say_how_it_ended(self, error: BaseException | None) -> None:
        try:
            store = self._store if self.beats else (self._connect_briefly() if error is not None else None)
            if store is None:
                return
            if error is not None:
                store.set(self._key("error", self.rank), one_line(error))
                store.append(self._key("failed"), f"{self.rank},")
            if not self.beats:
                return
            store.set(self._key("cost", self.host), json.dumps(self._cost(store)))
            store.set(self._key("beat", self.host), str(ENDED))
            if self.rank == 0:
                self._wait_for_the_others(store)
        except Exception:  # noqa: BLE001 - the store is gone: peers learn of this rank by its silence
            pass

    def _cost(self, store: CountedStore) -> dict[str, float]:
        return {"requests": store.requests + 2, "seconds": time.monotonic() - store.opened}

    def _wait_for_the_others(self, store: CountedStore) -> None:
        """Rank 0 at its end: until every host that still beats has ended (bounded by `liveness_s`), so
        that none of them takes the end of a store in this process for a lost host; then the cost line."""
        keys = [self._key("beat", host) for host in range(self.hosts.count)]
        deadline = time.monotonic() + self.liveness_s
        counts = [int(value) for value in store.multi_get(keys)]
        while time.monotonic() < deadline:
            if all(count == ENDED for count in counts):
                break  # (a host that died silently keeps rank 0 here until the deadline: its store stays up)
            time.sleep(0.5 * self.timing.beat_s)
            counts = [int(value) for value in store.multi_get(keys)]
        ended = [host for host, count in enumerate(counts) if count == ENDED]
        costs = [json.loads(value) for value in store.multi_get([self._key("cost", host) for host in ended])]
        log.info("%s", cost_line(costs, self.world_size, self.hosts.count))

    def explain(self, error: BaseException) -> None:
        """A collective failed in the main thread: tell rank 0 to judge quickly, and wait for a verdict,
        which ends the process. Bounded by the slowest rule (a host that never started); returns only
        when no verdict came, i.e. the error was not a lost peer."""
        try:
            if self._store is not None:
                self._store.add(self._key("suspect"), 1)
        except Exception:  # noqa: BLE001 - an unreachable store is itself what the thread will report
            pass
        log.debug("collective failed (%s): waiting for the liveness verdict", error)
        if self._decided.wait(timeout=self.liveness_s + self.timing.arrival_slack_s + 3 * self.timing.beat_s):
            time.sleep(3 * self.timing.beat_s)  # the deciding thread lingers, then ends the process

    def _decide(self, line: str, *, cut_off: bool = False, linger_s: float = 0.0) -> None:
        """Take the first verdict only; a beater leaves it for its host's other ranks; `linger_s` lets the
        other hosts read a verdict rank 0 wrote before this process (and a store it may host) ends."""
        with self._decision:
            if self._decided.is_set() or self._stopped.is_set():
                return
            self.verdict = line
            self._decided.set()
        if self.beats and self.hosts.per_host > 1:
            write_verdict_file(self.verdict_file, line)
        if cut_off:
            end_stuck_agent()
        time.sleep(linger_s)
        self.on_verdict(line)

    def _paused(self, slept_s: float) -> bool:
        """Whether this process was paused (SIGSTOP, a suspended SLURM job): a one-second wait took far
        longer. Every rule restarts its clock then, since the peers were most likely paused too."""
        if slept_s < self.timing.beat_s + self.liveness_s / 2:
            return False
        now = time.monotonic()
        self._last_contact = now
        self._judge.forgive(now)
        self._watched.forgive(now)
        return True

    def _watch_contact(self) -> None:
        """The cut-off rule, in a thread that never touches the network: a store request to a host that
        cannot be reached blocks (the store's timeout covers only waiting for keys), so the heartbeat
        thread cannot notice it is stuck."""
        while True:
            started = time.monotonic()
            if self._stopped.wait(self.timing.beat_s) or self._paused(time.monotonic() - started):
                if self._stopped.is_set():
                    return
                continue
            limit = self.liveness_s if self._contacted else self.liveness_s + self.timing.arrival_slack_s
            silent_s = time.monotonic() - self._last_contact
            if silent_s > limit:
                self._decide(self._cut_off_line(TimeoutError(f"no answer for {silent_s:.0f} s"), limit), cut_off=True)
                return

    def _listen(self) -> None:
        """A rank that does not beat: its host's verdict, from the file its beater writes (no request)."""
        while not self._stopped.wait(self.timing.beat_s):
            line = read_verdict_file(self.verdict_file, since=self._started_wall)
            if line is not None:
                self._decide(line)
                return

    def _open(self) -> CountedStore:
        store = dist.TCPStore(
            self.address.host,
            self.address.port,
            is_master=False,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.liveness_s + self.timing.arrival_slack_s),
        )
        store.set_timeout(datetime.timedelta(seconds=self.liveness_s))
        return CountedStore(store)

    def _connect(self) -> CountedStore:
        """A connection of this thread's own, with the short timeout (plus the arrival slack to connect)."""
        store = self._open()
        store.set(self._key("host", self.host), socket.gethostname())
        if self.rank == 0:
            for host in range(self.hosts.count):  # an add of 0 never changes a count (or an ENDED) already there
                store.add(self._key("beat", host), 0)
            store.add(self._key("suspect"), 0)
            store.append(self._key("failed"), "")
        return store

    def _connect_briefly(self) -> CountedStore | None:
        """A rank that does not beat and is failing: a connection to say so (the thread is bounded)."""
        return self._open()

    def _run(self) -> None:
        try:
            self._store = self._connect()
        except Exception as exc:  # noqa: BLE001 - whatever the reason, the store cannot be reached
            self._decide(self._cut_off_line(exc, self.liveness_s + self.timing.arrival_slack_s), cut_off=True)
            return
        self._last_contact, self._contacted = time.monotonic(), True
        beat = 0
        while True:
            started = time.monotonic()
            if self._stopped.wait(self.timing.beat_s):
                return
            paused = self._paused(time.monotonic() - started)
            beat += 1
            try:
                count = self._store.add(self._key("beat", self.host), 1)
                if self.rank == 0:
                    line, linger_s = self._judge_all()
                else:
                    line, linger_s = self._watch_rank_zero(count, watch=beat % WATCH_EVERY == 0), 0.0
            except _RankZeroFinished:
                self._stopped.set()
                return
            except Exception as exc:  # noqa: BLE001 - the connection broke: the watch thread judges the silence
                log.debug("heartbeat of host %d stopped: %s", self.host, one_line(exc))
                return  # (a broken client stays broken, and each retry would print torch's C++ warning)
            self._last_contact = time.monotonic()
            if line is not None and not paused:
                self._decide(line, linger_s=linger_s)
                return

    def _judge_all(self) -> tuple[str | None, float]:
        """Rank 0: the failures and every host's beat, in one request per MULTI_KEYS hosts; a verdict
        (written for the others, whose beat counts it marks) and how long to linger so that they read it."""
        assert self._store is not None
        keys = [self._key("suspect"), self._key("failed")] + [self._key("beat", h) for h in range(self.hosts.count)]
        values = self._store.multi_get(keys)
        failed = [] if self._ending else [r for r in failed_ranks(values[1].decode()) if r != self.rank]
        lost = self._judge.update([int(v) for v in values[2:]], suspect=int(values[0]) > 0)
        if not lost and not failed:
            return None, 0.0
        line = self._lost_line(failed, lost)
        self._store.set(self._key("verdict"), line)
        listeners = self._judge.listeners(lost)
        self._store.multi_set([self._key("beat", h) for h in listeners], [str(VERDICT_MARK)] * len(listeners))
        return line, 2 * self.timing.beat_s if listeners else 0.0

    def _watch_rank_zero(self, count: int, *, watch: bool) -> str | None:
        """The other hosts: the verdict once rank 0 has marked this host's count; every WATCH_EVERY beats,
        rank 0 itself, silent or failed."""
        assert self._store is not None
        if count >= VERDICT_MARK:
            return None if self._ending else self._store.get(self._key("verdict")).decode()
        if not watch:
            return None
        keys = [self._key("beat", 0), self._key("failed")]
        if not self._zero_seen:  # rank 0 still starting: a read now would block until its keys exist
            self._zero_seen = self._store.check(keys)
            if not self._zero_seen:
                return self._lost_line([], [0]) if self._watched.update(0) else None
        zero, failed = self._store.multi_get(keys)
        if int(zero) == ENDED:
            raise _RankZeroFinished
        if not self._ending and 0 in failed_ranks(failed.decode()):
            return self._lost_line([0], [])
        if self._watched.update(int(zero)):
            return self._lost_line([], [0])
        return None

    def _read(self, key: str) -> str | None:
        store = self._store
        try:
            if store is not None and store.check([key]):
                return store.get(key).decode()
        except Exception:  # noqa: BLE001 - naming a host or an error is best effort
            pass
        return None

    def _lost_line(self, failed: list[int], lost: list[int]) -> str:
        """One line for all that is lost: failed ranks with their own errors, silent hosts by their ranks."""
        named = [
            (f"rank {r} on {self._host_name(self.hosts.of(r))}", self._read(self._key("error", r)) or "?")
            for r in failed
        ]
        silent = [f"{self.hosts.ranks(host)} on {self._host_name(host)}" for host in lost]
        quiet_s = (self._judge.silent_s(lost[0]) if self.rank == 0 else self._watched.silent_s()) if lost else 0.0
        return lost_line(named, silent, quiet_s, self.liveness_s)

    def _host_name(self, host: int) -> str:
        never = "the rank never started" if self.hosts.per_host == 1 else "its ranks never started"
        return self._read(self._key("host", host)) or f"a host never reported ({never})"

    def _cut_off_line(self, error: BaseException, waited_s: float) -> str:
        reason = one_line(error)
        return (
            f"rank {self.rank} on {socket.gethostname()} lost contact with rank 0's rendezvous store at "
            f"{self.address} for {waited_s:g} s: this host is cut off, or rank 0's host is down ({reason}). "
            "Completed checkpoints are kept: start the job again to resume"
        )


class _RankZeroFinished(Exception):
    """Rank 0 ended normally: every collective is over, nothing is left to watch."""
