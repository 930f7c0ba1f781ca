"""A hang report before the collective timeout ends the job.

A rank whose loader stalls (a stuck mount, a dead shard server that keeps the connection) or whose
device stops holds every other rank inside the step's collectives; nothing is printed until
`dist.timeout_s` (600 s) fails them with a traceback naming an address. Here each rank watches its
own progress from a thread: when no step completes for `dist.hang_after` times the median of its
recent step times (and at least `dist.hang_min_s`), it writes every Python thread's stack
(`faulthandler`) and what its loop was doing to `run.dir/hang-<rank>.txt`, and tells rank 0 through the
rendezvous store where it stands. Rank 0 then logs one line naming the ranks that did not reach the
point the others wait at: in synchronous training they all stall together, and only their positions
(waiting for data vs inside the step) tell the cause from the victims.

Only training is timed: sample grids, evaluation and checkpoint saves suspend the watch (their length
has nothing to do with a step's); the collective timeout still bounds them. Cost to the step: a few
attribute writes and a clock read; the thread wakes once a second.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import math
import os
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from dcgan.distributed.store import StoreAddress, round_key_prefix

log = logging.getLogger(__name__)

RECENT_STEPS = 50
"""Step times the median is taken over: recent enough to follow a run that slows down over time."""
MIN_STEPS = 5
"""Steps timed before the watch judges: the first ones (a compile, warm caches) say little."""
GATHER_S = 10.0
"""How long rank 0 waits for the other ranks' positions once it has seen the stall: the others see it
within a second or two, their medians being nearly equal."""
STORE_TIMEOUT_S = 5.0
"""A store request of the watch gives up after this long: a store out of reach must not keep the report
(or the end of the run, which joins the thread) waiting; a reachable one answers in milliseconds."""


@dataclass(frozen=True)
class Position:
    """Where a rank's loop stands, ordered so that a rank behind another compares smaller."""

    step: int
    """The step this rank is working towards (its last completed step + 1)."""
    phase: int
    """AFTER_STEP (the previous step's metric line, agreement, checkpoint), WAITING_FOR_DATA, IN_STEP:
    in the order a step's loop passes them, so that a rank behind another sorts first."""
    doing: str
    host: str

    def key(self) -> tuple[int, int]:
        return (self.step, self.phase)


AFTER_STEP, WAITING_FOR_DATA, IN_STEP = 0, 1, 2


def _doing(phase: int, step: int, workers: int) -> str:
    if phase == WAITING_FOR_DATA:
        source = f"{workers} loader worker process(es)" if workers else "the loader in the training process"
        return f"waiting for its batch of step {step} from {source}"
    if phase == IN_STEP:
        return f"inside step {step}, whose collectives wait for every rank"
    return f"after step {step - 1} (metric line, stop agreement, checkpoint)"


class HangWatch:
    """This rank's progress (set by the loop) and the thread that reports a stall (see the module)."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        factor: float,
        min_s: float,
        workers: int,
        store: StoreAddress | None,
        timeout_s: float = math.inf,
    ) -> None:
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.factor, self.min_s, self.workers = factor, min_s, workers
        self.timeout_s = timeout_s
        """dist.timeout_s: the report must come before the collective timeout ends the job."""
        self.store_address = store
        self.host = socket.gethostname()
        self.intervals: deque[float] = deque(maxlen=RECENT_STEPS)
        self.step = 0
        self.phase = AFTER_STEP
        self.last_progress = time.monotonic()
        self.suspended = 0
        self.skip_interval = True  # the first step's time includes start-up
        self.reported: int | None = None
        """The step whose stall was reported (once per stall)."""
        self._published = False
        self._store: dist.TCPStore | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dcgan-hang-watch", daemon=True)

    # --- what the loop tells it (cheap: no locks, no I/O) -------------------------------------------

    def waiting_for_data(self, step: int) -> None:
        self.step, self.phase = step, WAITING_FOR_DATA

    def in_step(self, step: int) -> None:
        self.step, self.phase = step, IN_STEP

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        if not self.skip_interval:
            self.intervals.append(now - self.last_progress)
        self.skip_interval = False
        self.last_progress, self.step, self.phase = now, step + 1, AFTER_STEP
        if self.reported is not None and self.reported <= step:
            if self.rank == 0:
                log.info("step %d completed: the stall reported in hang-*.txt is over", step)
            self.reported = None

    @contextmanager
    def not_training(self) -> Iterator[None]:
        """Work that is not a step (a sample grid, an evaluation, a checkpoint save): not timed, and the
        next step's time does not include it. The clock restarts before the suspension ends (the thread
        reads them in the other order), so the block's length is never taken for a stall."""
        self.suspended += 1
        try:
            yield
        finally:
            self.last_progress, self.skip_interval = time.monotonic(), True
            self.suspended -= 1

    # --- the thread ---------------------------------------------------------------------------------

    def start(self) -> HangWatch:
        if self.factor > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread (a gather in progress gives up at once); drop the store connection."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0 + STORE_TIMEOUT_S)
        self._store = None

    def limit_s(self) -> float | None:
        """Seconds without a step that count as a hang now (None until enough steps were timed)."""
        if len(self.intervals) < MIN_STEPS:
            return None
        return min(max(self.factor * statistics.median(self.intervals), self.min_s), self.timeout_s / 2)

    def _run(self) -> None:
        while not self._stopped.wait(1.0):
            if self._published and self.reported is None:
                self._withdraw()  # the stall is over: a later one must not read this position
            suspended = self.suspended  # before the clock: see not_training
            stalled_s = time.monotonic() - self.last_progress
            limit = self.limit_s()
            if suspended or limit is None or stalled_s <= limit or self.reported == self.step:
                continue
            self.reported = self.step
            try:
                self._report(stalled_s, limit)
            except Exception as exc:  # noqa: BLE001 - a report that fails must not end the run
                log.warning("could not write the hang report: %s", exc)

    def position(self) -> Position:
        return Position(self.step, self.phase, _doing(self.phase, self.step, self.workers), self.host)

    def _report(self, stalled_s: float, limit_s: float) -> None:
        """Position to the store and the log first, the stacks file last: run.dir may sit on the very
        mount that hangs, and a blocked write must not silence the rest."""
        position = self.position()
        median_s = statistics.median(self.intervals)
        why = (
            f"no step completed for {stalled_s:.0f} s ({self.factor:g}x the median step time of "
            f"{median_s:.3g} s, at least dist.hang_min_s={self.min_s:g}, at most half dist.timeout_s)"
        )
        self._publish(position)
        if self.rank == 0:
            log.warning("%s", stall_line(why, self._gather(position), self.world_size, self.run_dir))
        else:
            log.warning(
                "%s; rank %d is %s; its stacks go to %s",
                why,
                self.rank,
                position.doing,
                stacks_path(self.run_dir, self.rank),
            )
        write_stacks(self.run_dir, self.rank, position, why)

    # --- the store ----------------------------------------------------------------------------------

    def _key(self, rank: int) -> str:
        assert self.store_address is not None
        return f"{round_key_prefix(self.store_address)}/hang/{rank}"

    def _connect(self) -> dist.TCPStore | None:
        if self.store_address is None or self.world_size == 1:
            return None
        if self._store is None:
            self._store = dist.TCPStore(
                self.store_address.host,
                self.store_address.port,
                is_master=False,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S),
            )
        return self._store

    def _publish(self, position: Position) -> None:
        with suppress(Exception):  # a store out of reach: rank 0 reports this rank as silent
            store = self._connect()
            if store is not None:
                store.set(self._key(self.rank), json.dumps(position.__dict__))
                self._published = True

    def _withdraw(self) -> None:
        self._published = False
        with suppress(Exception):
            store = self._connect()
            if store is not None:
                store.delete_key(self._key(self.rank))

    def _gather(self, mine: Position) -> dict[int, Position]:
        """Rank 0: every rank's position, waiting up to GATHER_S for those that have not written it."""
        found = {0: mine}
        deadline = time.monotonic() + GATHER_S
        with suppress(Exception):
            store = self._connect()
            while store is not None and len(found) < self.world_size and time.monotonic() < deadline:
                for rank in range(1, self.world_size):
                    if rank not in found and store.check([self._key(rank)]):
                        found[rank] = Position(**json.loads(store.get(self._key(rank))))
                if self._stopped.wait(0.2):
                    break
        return found


def stacks_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"hang-{rank}.txt"


def write_stacks(run_dir: Path, rank: int, position: Position, why: str) -> Path:
    """run.dir/hang-<rank>.txt: why, where the loop stands, then every thread's Python stack. (Worker
    processes of the loader are not in it: their stacks are theirs; `py-spy dump --pid` reads them.)"""
    path = stacks_path(run_dir, rank)
    with open(path, "w") as out:
        out.write(f"rank {rank} on {position.host}, pid {os.getpid()}, at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        out.write(f"{why}\nthe loop is {position.doing}\n")
        out.write(f"the loop runs in the main thread, Thread 0x{threading.main_thread().ident or 0:016x} below\n\n")
        out.flush()
        faulthandler.dump_traceback(out, all_threads=True)
    return path


def stall_line(why: str, positions: dict[int, Position], world_size: int, run_dir: Path) -> str:
    """Rank 0's one line: the ranks furthest behind (those the others wait for), then the rest."""
    silent = [rank for rank in range(world_size) if rank not in positions]
    behind_key = min(p.key() for p in positions.values())
    behind = sorted(rank for rank, p in positions.items() if p.key() == behind_key)
    ahead = sorted(rank for rank in positions if rank not in behind)
    first = positions[behind[0]]
    parts = [why]
    who = ", ".join(f"rank {rank} on {positions[rank].host}" for rank in behind)
    if ahead:
        parts.append(f"{who} did not reach the point the others wait at: {first.doing}")
        others = ", ".join(f"rank {rank} on {positions[rank].host}" for rank in ahead)
        parts.append(f"{others}: {positions[ahead[0]].doing}")
    elif len(behind) == 1:
        parts.append(f"{who} is {first.doing}")
    else:
        parts.append(f"{who}: all {first.doing}")
    if silent:
        parts.append(
            "no position from " + ", ".join(f"rank {rank}" for rank in silent) + " (stuck outside Python, or cut off)"
        )
    parts.append(f"stacks in {run_dir}/hang-<rank>.txt")
    return "; ".join(parts)
