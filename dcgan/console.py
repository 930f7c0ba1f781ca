"""What a person watching a terminal or a log file sees: the log format of every command (rank-tagged,
to a run's train.log as well), and the progress line of a long loop. Kept apart from tracking so that
commands that track nothing (doctor, bench) share one format.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


def setup_logging(log_file: Path | None, rank: int) -> None:
    """INFO to stderr (and `log_file`, a run's train.log) on rank 0; warnings only, prefixed with the rank,
    elsewhere."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def say(what: str) -> None:
    """What a long command is doing now, on stderr: a benchmark at batch 1024 on a CPU is quiet for
    minutes otherwise, and stdout keeps only its results."""
    print(f"... {what}", file=sys.stderr, flush=True)


def bar(done: int, total: int, width: int = 30) -> str:
    """`[#####.....]`: the share done, as every progress line of the project draws it."""
    filled = width * done // max(total, 1)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Rows of text cells as an aligned plain-text table (the first row is the header): columns two
    spaces apart, each as wide as its widest cell, left-aligned but for the column numbers in `right`.

    Plain text on purpose, not a library's boxes: these tables land in SLURM logs, CI output and files
    that tests and people grep, where a width that follows the terminal or box characters get in the way."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Rank 0's progress: a bar redrawn in place on a terminal, plain log lines otherwise."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.stream = stream
        self.interactive = enabled and stream.isatty()
        self.started = time.perf_counter()

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        return elapsed / done * (self.total - step) if done > 0 else math.inf

    def update(self, step: int) -> None:
        """Cheap per-step redraw (terminal only); reads no device values."""
        if not self.interactive:
            return
        self.stream.write(f"\r{bar(step, self.total)} {step}/{self.total} ETA {_duration(self.eta_s(step))} ")
        self.stream.flush()

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """One line every log.every steps with the key numbers, rate and ETA."""
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r")
        shown = " ".join(
            f"{k}={metrics[k]:.3f}" for k in ("loss_D", "loss_G", "D_x", "D_G_z_before", "D_overfit") if k in metrics
        )
        rate = metrics.get("img_per_s", 0.0)
        log.info("step %d/%d %s %.0f img/s ETA %s", step, self.total, shown, rate, _duration(self.eta_s(step)))

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
