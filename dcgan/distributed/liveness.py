"""Peer liveness: a lost host, a partition or a dead rank ends every surviving rank in seconds, with one
line naming the lost rank(s) and their host(s).

Why not the collective timeout alone: `dist.timeout_s` has to be long (a slow checkpoint save, a first
compile, an evaluation on several ranks), 600 s by default, and a collective waiting for a lost peer then
either idles that long or fails with a traceback that names an address, not a rank. So every rank beats
in the rendezvous store once a second, from a thread of its own (a busy main thread, inside a compile,
a save or a collective, still beats) and through a connection of its own whose timeout is the short
`dist.liveness_s`:

- rank 0 judges everyone: a rank whose beat count stands still for `liveness_s` (or that never beats
  within `liveness_s` + ARRIVAL_SLACK_S of rank 0's start) is lost; rank 0 writes the verdict into the
  store, where every other rank reads it within a second;
- every other rank watches rank 0's beat (rank 0's process gone while its host and the store live);
- any rank that cannot reach the store for `liveness_s` is cut off (its link is down, or the store's
  host is gone) and says so;
- a rank whose collective fails first (a peer's connection closed) marks the store "suspect": rank 0
  then judges with a patience of SUSPECT_PATIENCE_S instead of `liveness_s`;
- a rank that ends says how (finished, or failed with its error's line), so that rank 0 names a failed
  rank with its own error at once.

A verdict ends the process with `os._exit(PeerLost.exit_status)` after logging its line: the main thread
may be blocked inside a collective that nothing interrupts, and the usual cleanup (a checkpoint wait, a
barrier) would wait for the lost peer. Completed checkpoints are untouched; one being written has no
`.metadata` yet and is removed at the next start. Cost: three small store requests a second per rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from dcgan.distributed.reaper import end_stuck_agent
from dcgan.distributed.store import StoreAddress, round_key_prefix
from dcgan.errors import PeerLost, one_line, tell_launcher

log = logging.getLogger(__name__)

BEAT_INTERVAL_S = 1.0
ARRIVAL_SLACK_S = 5.0
"""Extra time a rank gets for its first beat: ranks start together (torchrun's rendezvous or srun is
complete when they are spawned), so only the difference in their start-up (imports) adds to the rule."""
SUSPECT_PATIENCE_S = 4.0
"""How long rank 0 waits for a missing beat once a collective has failed somewhere: about three beats
(a beat is seen up to one interval late)."""


def _exit_with(line: str) -> None:
    """Log the verdict, print it as the CLI prints errors, and end the process now."""
    log.error("%s", line)
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(f"dcgan: error: {line}", file=sys.stderr, flush=True)
    tell_launcher(PeerLost(line))
    os._exit(PeerLost.exit_status)


FINISHED = -1
"""A beat count that says: this rank ended normally (it will not beat again, and is not lost)."""
FAILED = -2
"""A beat count that says: this rank ended with an error, whose line is under its `error` key."""


class Liveness:
    """The heartbeat of one rank (see the module's docstring): start it before the process group, stop
    it after the rank's last collective."""

    def __init__(
        self,
        address: StoreAddress,
        rank: int,
        world_size: int,
        liveness_s: float,
        on_verdict: Callable[[str], None] = _exit_with,
    ) -> None:
        self.address, self.rank, self.world_size = address, rank, world_size
        self.liveness_s = liveness_s
        self.on_verdict = on_verdict
        self.prefix = round_key_prefix(address)
        self.verdict: str | None = None
        self._stopped = threading.Event()
        self._decided = threading.Event()
        self._decision = threading.Lock()
        self._ending = False
        self._store: dist.TCPStore | None = None
        self._last_contact = time.monotonic()
        self._contacted = False
        self._judge = _Judge(world_size, liveness_s)
        self._watched = _Watched(liveness_s)
        self._thread = threading.Thread(target=self._run, name="dcgan-heartbeat", daemon=True)
        self._watch = threading.Thread(target=self._watch_contact, name="dcgan-liveness-watch", daemon=True)

    def _key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def start(self) -> Liveness:
        """Start beating. The thread connects by itself: the store may not exist yet (rank 0 creates it in
        `init_process_group` when torchrun's agent does not serve one), and a rank 0 that never creates it
        must end the wait too."""
        self._thread.start()
        self._watch.start()
        return self

    def ending(self) -> None:
        """This rank is ending on its own (an error every rank raised, a stop signal): from now on a peer
        that finishes or fails is no news, only silence and a lost store are (a cleanup may still hang).
        Without this, the first rank to fail would turn its peers' own exit statuses and lines into
        "rank N failed"."""
        self._ending = True

    def stop(self, error: BaseException | None = None) -> None:
        """Stop beating, saying how this rank ended: finished (peers no longer watch it) or failed (rank 0
        names it with its error at once instead of waiting for silence). Rank 0, whose process may hold
        the store, waits (at most `liveness_s`) until every rank has said how it ended."""
        self._ending = True
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * BEAT_INTERVAL_S)
        # through a thread with a bounded wait: a request to a store that cannot be reached blocks
        final = threading.Thread(target=self._say_how_it_ended, args=(error,), daemon=True)
        final.start()
        final.join(timeout=self.liveness_s + 2 * BEAT_INTERVAL_S if self.rank == 0 else 2 * BEAT_INTERVAL_S)

    def _say_how_it_ended(self, error: BaseException | None) -> None:
        store = self._store
        if store is None:
            return
        try:
            if error is not None:
                store.set(self._key("error", self.rank), one_line(error))
            store.set(self._key("beat", self.rank), str(FINISHED if error is None else FAILED))
            if self.rank == 0:
                self._wait_for_the_others(store)
        except Exception:  # noqa: BLE001 - the store is gone: peers learn of this rank by its silence
            pass

    def _wait_for_the_others(self, store: dist.TCPStore) -> None:
        """Rank 0 at its end: until every rank that still beats has said how it ended (bounded by
        `liveness_s`), so that none of them takes the end of a store in this process for a lost host."""
        keys = [self._key("beat", rank) for rank in range(self.world_size)]
        if not store.check(keys):
            return  # a rank that never beat cannot say how it ended
        deadline, previous = time.monotonic() + self.liveness_s, None
        while time.monotonic() < deadline:
            counts = [int(value) for value in store.multi_get(keys)]
            running = [rank for rank, count in enumerate(counts) if count >= 0]
            if not running or (previous is not None and all(counts[r] == previous[r] for r in running)):
                return  # everyone ended, or those left stopped beating without a word
            previous = counts
            time.sleep(1.5 * BEAT_INTERVAL_S)

    def explain(self, error: BaseException) -> None:
        """A collective failed in the main thread: tell rank 0 to judge quickly, and wait for a verdict,
        which ends the process. Bounded by the slowest rule (a rank that never started); returns only
        when no verdict came, i.e. the error was not a lost peer."""
        try:
            if self._store is not None:
                self._store.add(self._key("suspect"), 1)
        except Exception:  # noqa: BLE001 - an unreachable store is itself what the thread will report
            pass
        log.debug("collective failed (%s): waiting for the liveness verdict", error)
        if self._decided.wait(timeout=self.liveness_s + ARRIVAL_SLACK_S + 3 * BEAT_INTERVAL_S):
            time.sleep(3 * BEAT_INTERVAL_S)  # the deciding thread lingers, then ends the process

    def _decide(self, line: str, *, cut_off: bool = False, linger_s: float = 0.0) -> None:
        """Take the first verdict only; `linger_s` lets the other ranks read a verdict rank 0 wrote before
        this process (and a store it may host) ends."""
        with self._decision:
            if self._decided.is_set() or self._stopped.is_set():
                return
            self.verdict = line
            self._decided.set()
        if cut_off:
            end_stuck_agent()
        time.sleep(linger_s)
        self.on_verdict(line)

    def _paused(self, slept_s: float) -> bool:
        """Whether this process was paused (SIGSTOP, a suspended SLURM job): a one-second wait took far
        longer. Every rule restarts its clock then, since the peers were most likely paused too."""
        if slept_s < BEAT_INTERVAL_S + self.liveness_s / 2:
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
            if self._stopped.wait(BEAT_INTERVAL_S) or self._paused(time.monotonic() - started):
                if self._stopped.is_set():
                    return
                continue
            limit = self.liveness_s if self._contacted else self.liveness_s + ARRIVAL_SLACK_S
            silent_s = time.monotonic() - self._last_contact
            if silent_s > limit:
                self._decide(self._cut_off_line(TimeoutError(f"no answer for {silent_s:.0f} s"), limit), cut_off=True)
                return

    def _connect(self) -> dist.TCPStore:
        """A connection of this thread's own, with the short timeout (plus the arrival slack to connect)."""
        store = dist.TCPStore(
            self.address.host,
            self.address.port,
            is_master=False,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.liveness_s + ARRIVAL_SLACK_S),
        )
        store.set_timeout(datetime.timedelta(seconds=self.liveness_s))
        store.set(self._key("host", self.rank), socket.gethostname())
        if self.rank == 0:
            for rank in range(self.world_size):
                store.add(self._key("beat", rank), 0)
            store.add(self._key("suspect"), 0)
        return store

    def _run(self) -> None:
        try:
            self._store = self._connect()
        except Exception as exc:  # noqa: BLE001 - whatever the reason, the store cannot be reached
            self._decide(self._cut_off_line(exc, self.liveness_s + ARRIVAL_SLACK_S), cut_off=True)
            return
        self._last_contact, self._contacted = time.monotonic(), True
        while True:
            started = time.monotonic()
            if self._stopped.wait(BEAT_INTERVAL_S):
                return
            paused = self._paused(time.monotonic() - started)
            try:
                self._store.add(self._key("beat", self.rank), 1)
                line, linger_s = self._judge_all() if self.rank == 0 else (self._watch_rank_zero(), 0.0)
            except _RankZeroFinished:
                self._stopped.set()
                return
            except Exception:  # noqa: BLE001 - the connection broke: the watch thread judges the silence
                return  # (a broken client stays broken, and each retry would print torch's C++ warning)
            self._last_contact = time.monotonic()
            if line is not None and not paused:
                self._decide(line, linger_s=linger_s)
                return

    def _judge_all(self) -> tuple[str | None, float]:
        """Rank 0: read every beat in one request; a verdict (written for the others to read) and how long
        to linger so that they can."""
        assert self._store is not None
        keys = [self._key("beat", rank) for rank in range(self.world_size)] + [self._key("suspect")]
        values = [int(value) for value in self._store.multi_get(keys)]
        lost = self._judge.update(values[:-1], suspect=values[-1] > 0, failures_count=not self._ending)
        if not lost:
            return None, 0.0
        line = self._lost_line(lost)
        self._store.set(self._key("verdict"), line)
        return line, 2 * BEAT_INTERVAL_S if self._judge.listeners(lost) else 0.0

    def _watch_rank_zero(self) -> str | None:
        """The others: rank 0's verdict, or rank 0 itself silent or failed."""
        assert self._store is not None
        if not self._ending and self._store.check([self._key("verdict")]):
            return self._store.get(self._key("verdict")).decode()
        count = int(self._store.add(self._key("beat", 0), 0))
        if count == FINISHED:
            raise _RankZeroFinished
        if (count == FAILED and not self._ending) or self._watched.update(count):
            return self._lost_line([0])
        return None

    def _read(self, key: str) -> str | None:
        store = self._store
        try:
            if store is not None and store.check([key]):
                return store.get(key).decode()
        except Exception:  # noqa: BLE001 - naming a host or an error is best effort
            pass
        return None

    def _lost_line(self, lost: list[int]) -> str:
        """One line for all lost ranks: those that failed with their own error, the others by silence."""
        failed = [(rank, error) for rank in lost if (error := self._read(self._key("error", rank))) is not None]
        silent = [rank for rank in lost if rank not in dict(failed)]
        parts = [f"rank {rank} on {self._host_of(rank)} failed: {error}" for rank, error in failed]
        if silent:
            who = ", ".join(f"rank {rank} on {self._host_of(rank)}" for rank in silent)
            quiet_s = self._judge.silent_s(silent[0]) if self.rank == 0 else self._watched.silent_s()
            parts.append(
                f"lost {who}: no heartbeat for {quiet_s:.0f} s (dist.liveness_s={self.liveness_s:g}): the host is "
                "down or cut off, or the process was killed"
            )
        return "; ".join(parts) + ". Completed checkpoints are kept: start the job again to resume"

    def _host_of(self, rank: int) -> str:
        return self._read(self._key("host", rank)) or "a host never reported (the rank never started)"

    def _cut_off_line(self, error: BaseException, waited_s: float) -> str:
        reason = one_line(error)
        return (
            f"rank {self.rank} on {socket.gethostname()} lost contact with rank 0's rendezvous store at "
            f"{self.address} for {waited_s:g} s: this host is cut off, or rank 0's host is down ({reason}). "
            "Completed checkpoints are kept: start the job again to resume"
        )


class _RankZeroFinished(Exception):
    """Rank 0 ended normally: every collective is over, nothing is left to watch."""


class _Judge:
    """Rank 0's view of every rank's beat count: who stood still for too long, or failed."""

    def __init__(self, world_size: int, liveness_s: float) -> None:
        now = time.monotonic()
        self.liveness_s = liveness_s
        self.counts = [0] * world_size
        self.changed = [now] * world_size

    def update(self, counts: list[int], *, suspect: bool, failures_count: bool = True) -> list[int]:
        """The lost ranks given the latest counts: silent past the patience (shorter once a collective
        failed somewhere; longer for a rank not yet started), or failed (unless rank 0 is ending too)."""
        now = time.monotonic()
        for rank, count in enumerate(counts):
            if count != self.counts[rank]:
                self.counts[rank], self.changed[rank] = count, now
        patience = SUSPECT_PATIENCE_S if suspect else self.liveness_s
        arrival = max(self.liveness_s + ARRIVAL_SLACK_S, patience)

        def lost(rank: int, count: int) -> bool:
            if count in (FINISHED, FAILED):
                return count == FAILED and failures_count
            return now - self.changed[rank] > (patience if count > 0 else arrival)

        return [rank for rank, count in enumerate(self.counts) if lost(rank, count)]

    def forgive(self, now: float) -> None:
        """Restart every silence clock (this process was paused, and so, most likely, were the others)."""
        self.changed = [now] * len(self.changed)

    def listeners(self, lost: list[int]) -> list[int]:
        """Ranks other than rank 0 that are still beating: those that will read the verdict."""
        return [rank for rank, count in enumerate(self.counts) if rank != 0 and rank not in lost and count > 0]

    def silent_s(self, rank: int) -> float:
        return time.monotonic() - self.changed[rank]


class _Watched:
    """A non-zero rank's view of rank 0's beat count."""

    def __init__(self, liveness_s: float) -> None:
        self.liveness_s = liveness_s
        self.count = 0
        self.changed = time.monotonic()

    def update(self, count: int) -> bool:
        """Whether rank 0 has stood still too long (the arrival rule until its first beat)."""
        now = time.monotonic()
        if count != self.count:
            self.count, self.changed = count, now
        patience = self.liveness_s if self.count > 0 else self.liveness_s + ARRIVAL_SLACK_S
        return now - self.changed > patience

    def forgive(self, now: float) -> None:
        self.changed = now

    def silent_s(self) -> float:
        return time.monotonic() - self.changed
