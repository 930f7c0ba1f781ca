"""Where a run's numbers and pictures go: a log file, stats.jsonl, a progress line, and wandb.

Only rank 0 tracks; every other rank gets the no-op `Tracker`, so call sites never branch on rank.
wandb is imported lazily and only when enabled. The wandb run id lives in the checkpoint, so a resumed
or requeued job continues the same wandb run (online: resumed; offline: same id, `wandb sync` later).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from dcgan.collective_clock import COLLECTIVE_CLOCK
from dcgan.config import Config, ConfigError, LogConfig, config_to_dict, load_config
from dcgan.distributed import DistInfo, all_mean
from dcgan.rundir import RunDir
from dcgan.step import STAT_NAMES
from dcgan.stragglers import RankTimes
from dcgan.wandb_files import uploadable_segments

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """An 8-character id in wandb's alphabet, made here so runs without wandb have one too."""
    return uuid.uuid4().hex[:8]


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """INFO to stderr (and RUN_DIR/train.log) on rank 0; warnings only, prefixed with the rank, elsewhere."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and rank == 0:
        handlers.append(logging.FileHandler(RunDir(run_dir).train_log))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class Tracker:
    """The no-op tracker of ranks other than 0 (and the interface of the real one)."""

    run_id: str = ""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_image(self, step: int, images_seen: int, key: str, image: np.ndarray) -> None:
        pass

    def log_histogram(self, step: int, images_seen: int, key: str, values: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class RunTracker(Tracker):
    """Rank 0's tracker: appends JSON lines to stats.jsonl and mirrors everything to wandb if enabled."""

    def __init__(self, run_dir: Path, config: Config, wandb_id: str, start_step: int = 0) -> None:
        self.run_id = wandb_id
        self.run_dir = run_dir
        stats = RunDir(run_dir).stats
        dropped = rewind_stats(stats, start_step)
        if dropped:
            log.info(
                "dropped %d stats.jsonl line(s) logged after step %d, the step this run resumes from",
                dropped,
                start_step,
            )
            if config.log.wandb != "disabled":
                log.warning(
                    "wandb keeps the values it first received for steps after %d (it ignores steps that go back)",
                    start_step,
                )
        self._stats: TextIO = stats.open("a")
        self._wandb_from = 0
        if config.log.wandb == "offline":
            earlier = uploadable_segments(run_dir)  # what `dcgan sync` will upload
            self._wandb_from = 1 + max((max(s.steps, default=0) for s in earlier), default=0)
            if start_step + 1 < self._wandb_from:
                log.info(
                    "earlier wandb segments already hold steps up to %d: this segment logs from step %d on, so "
                    "that `dcgan sync` uploads every step once",
                    self._wandb_from - 1,
                    self._wandb_from,
                )
        self._wandb: Any = _start_wandb(run_dir, config, wandb_id) if config.log.wandb != "disabled" else None
        if config.log.wandb == "offline":
            self._replay_unlogged(stats, start_step)

    def _replay_unlogged(self, stats: Path, start_step: int) -> None:
        """A killed job loses the wandb records its service had not yet written: metrics of steps up to
        the resumed one that no earlier segment holds are logged again from stats.jsonl (images and
        histograms of those steps are lost), so that the segments together still hold every step."""
        replayed = 0
        for row in read_stats(stats):
            if self._wandb_from <= row["step"] <= start_step:
                self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=row["step"])
                replayed += 1
        if replayed:
            log.info(
                "logged %d metric line(s) of steps <= %d to wandb again: no earlier segment holds them",
                replayed,
                start_step,
            )
        self._wandb_from = max(self._wandb_from, start_step + 1)

    def _to_wandb(self, step: int) -> bool:
        return self._wandb is not None and step >= self._wandb_from

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._stats.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._stats.flush()
        if self._to_wandb(step):
            self._wandb.log(metrics, step=step)

    def log_image(self, step: int, images_seen: int, key: str, image: np.ndarray) -> None:
        if self._to_wandb(step):
            import wandb

            self._wandb.log({key: wandb.Image(image), IMAGE_AXIS: images_seen}, step=step)

    def log_histogram(self, step: int, images_seen: int, key: str, values: np.ndarray) -> None:
        if self._to_wandb(step):
            import wandb

            self._wandb.log({key: wandb.Histogram(values), IMAGE_AXIS: images_seen}, step=step)

    def close(self) -> None:
        self._stats.close()
        if self._wandb is not None:
            self._wandb.finish()
            if self._wandb.settings.mode == "offline":
                log.info(
                    "wandb offline run saved; upload all its segments as one run with: dcgan sync %s", self.run_dir
                )
            self._wandb = None


IMAGE_AXIS = "images_seen"
"""Logged with every metric and declared wandb's x-axis: runs on 1 and 64 GPUs line up on it."""


def _start_wandb(run_dir: Path, config: Config, run_id: str) -> Any:
    run = _init_wandb(run_dir, config, run_id)
    run.define_metric(IMAGE_AXIS)
    run.define_metric("*", step_metric=IMAGE_AXIS)
    for summary in ("min", "max"):  # the best value of an eval metric may be either, by metric
        run.define_metric("eval/*", step_metric=IMAGE_AXIS, summary=summary)
    return run


def _init_wandb(run_dir: Path, config: Config, run_id: str) -> Any:
    import wandb

    cfg: LogConfig = config.log
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity or None,
        name=cfg.name or Path(config.run.dir).name,
        group=cfg.group or None,
        tags=list(cfg.tags) or None,
        config=config_to_dict(config),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=cfg.wandb,
        settings=wandb.Settings(console="off", silent=True),
    )


def make_tracker(run_dir: Path, config: Config, wandb_id: str, rank: int, start_step: int = 0) -> Tracker:
    return RunTracker(run_dir, config, wandb_id, start_step) if rank == 0 else Tracker()


def sync_command(run_dir: Path) -> list[str]:
    """The `wandb sync` command that uploads every offline segment of a run (one per start or requeue)
    as ONE wandb run: all segments in one call, with the run's id, so wandb syncs them in order of
    start time into that run. Each segment holds only steps the earlier ones do not (RunTracker), so
    the history is appended to, never rewritten."""
    found = uploadable_segments(run_dir)
    if not found:
        raise ConfigError(f"{run_dir} has no offline wandb segments (run with log.wandb=offline)")
    ids = {segment.run_id for segment in found}
    if len(ids) != 1:
        raise ConfigError(f"{run_dir}: the offline segments belong to {len(ids)} wandb runs ({', '.join(sorted(ids))})")
    log_config = load_config(RunDir(run_dir).config).log
    command = [sys.executable, "-m", "wandb", "sync", "--id", ids.pop(), "--project", log_config.project]
    if log_config.entity:
        command += ["--entity", log_config.entity]
    return command + [str(segment.path) for segment in found]


def read_stats(path: Path) -> list[dict[str, Any]]:
    """stats.jsonl as dicts, one per line; a line that does not parse (torn by a kill, or being written
    right now by a running job) is skipped. The one reader of the file."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def rewind_stats(path: Path, step: int) -> int:
    """Drop the stats.jsonl lines of steps after `step` (and lines torn by a kill); return how many
    lines were dropped.

    A run killed between two checkpoints resumes from the older one and logs those steps again; keeping
    one line per step keeps the file a single history (what plots and `jq` users expect). The file is
    replaced atomically; kept lines are written back as they were logged (json.dumps of the same dict).
    """
    if not path.is_file():
        return 0
    lines = len(path.read_text().splitlines())
    kept = [row for row in read_stats(path) if row["step"] <= step]
    if len(kept) == lines:
        return 0
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(json.dumps(row) + "\n" for row in kept))
    partial.replace(path)
    return lines - len(kept)


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
        width = 30
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] {step}/{self.total} ETA {_duration(self.eta_s(step))} ")
        self.stream.flush()

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """One line every log.every steps with the key numbers, rate and ETA."""
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r")
        shown = " ".join(f"{k}={metrics[k]:.3f}" for k in ("loss_D", "loss_G", "D_x", "D_G_z_before") if k in metrics)
        rate = metrics.get("img_per_s", 0.0)
        log.info("step %d/%d %s %.0f img/s ETA %s", step, self.total, shown, rate, _duration(self.eta_s(step)))

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")


class GanHealth:
    """Warns (once each) when training looks broken, from numbers the loop already has.

    - D wins completely: D(G(z)) below `d_wins_below` for `patience` metric windows in a row;
    - generator collapse: the diversity of the fixed-noise samples (mean per-pixel standard deviation
      across the batch) falls below `collapse_ratio` times the highest diversity seen in this run.
    """

    def __init__(self, patience: int = 5, d_wins_below: float = 0.01, collapse_ratio: float = 0.25) -> None:
        self.patience = patience
        self.d_wins_below = d_wins_below
        self.collapse_ratio = collapse_ratio
        self.low_windows = 0
        self.best_diversity = 0.0
        self.warned: set[str] = set()

    def _warn(self, kind: str, message: str, *args: object) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            log.warning(message, *args)

    def observe_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.low_windows = self.low_windows + 1 if metrics["D_G_z_before"] < self.d_wins_below else 0
        if self.low_windows >= self.patience:
            self._warn(
                "d_wins",
                "step %d: D wins completely (D(G(z)) < %.2g for %d metric windows): G gets no useful "
                "gradient; consider a lower D lr, label smoothing or a restart",
                step,
                self.d_wins_below,
                self.low_windows,
            )

    def observe_samples(self, step: int, diversity: float) -> None:
        self.best_diversity = max(self.best_diversity, diversity)
        if diversity < self.collapse_ratio * self.best_diversity:
            self._warn(
                "collapse",
                "step %d: the generator may be collapsing: sample diversity %.4f fell below %.0f%% of its peak %.4f",
                step,
                diversity,
                100 * self.collapse_ratio,
                self.best_diversity,
            )


def sample_diversity(images: torch.Tensor) -> float:
    """Mean per-pixel standard deviation across a batch of samples (0 = all samples identical)."""
    return float(images.float().std(dim=0).mean())


@dataclass
class Elapsed:
    """Seconds a block took, filled in when it ends."""

    seconds: float = 0.0


@dataclass
class Window:
    """Statistics accumulated on the device between two metric lines (read once per window).

    Rates count training time only: work between steps that is not training (evaluation, sample grids,
    checkpoint saves) runs inside `outside_training()` and is subtracted, so that a window with an eval
    reports the training rate (it read ~45 img/s instead of ~2800 when eval time counted)."""

    device: torch.device
    sums: torch.Tensor = field(init=False)
    steps: int = 0
    data_wait_s: float = 0.0
    excluded_s: float = 0.0
    excluded_collective_s: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    started: float = field(init=False)
    collective_at_start: float = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(len(STAT_NAMES), device=self.device)
        self.started = self.clock()
        self.collective_at_start = COLLECTIVE_CLOCK.seconds

    def add(self, stats: torch.Tensor, data_wait_s: float) -> None:
        self.sums += stats
        self.steps += 1
        self.data_wait_s += data_wait_s

    @contextmanager
    def outside_training(self) -> Iterator[Elapsed]:
        """Time spent in this block is not training time; the block's seconds are in what it yields."""
        elapsed, began, collective_began = Elapsed(), self.clock(), COLLECTIVE_CLOCK.seconds
        try:
            yield elapsed
        finally:
            elapsed.seconds = self.clock() - began
            self.excluded_s += elapsed.seconds
            self.excluded_collective_s += COLLECTIVE_CLOCK.seconds - collective_began

    def training_s(self) -> float:
        """Seconds of this window spent training (steps and waiting for their data)."""
        return max(self.clock() - self.started - self.excluded_s, 1e-9)

    def rank_times(self) -> RankTimes:
        """This rank's mean seconds per step in the window: wall, data wait, blocked in collectives (NaN
        on a GPU, whose collectives the host clock cannot see: dcgan.stragglers estimates it there)."""
        steps = max(self.steps, 1)
        blocked_s = COLLECTIVE_CLOCK.seconds - self.collective_at_start - self.excluded_collective_s
        collective_s = max(blocked_s, 0.0) / steps if self.device.type == "cpu" else math.nan
        return RankTimes(self.training_s() / steps, self.data_wait_s / steps, collective_s)

    def metrics(
        self, info: DistInfo, *, global_batch: int, images_seen: int, skipped_samples: int, shard_retries: int = 0
    ) -> dict[str, float]:
        """The window's metric line: means over its steps and over ranks, rates from wall time. One
        device->host read (and one all-reduce with several ranks). skipped_samples and shard_retries are
        the loaders' running counts, summed over ranks."""
        elapsed = self.training_s()
        local = torch.cat(
            [
                self.sums / max(self.steps, 1),
                torch.tensor(
                    [self.data_wait_s / elapsed, float(skipped_samples), float(shard_retries)], device=self.sums.device
                ),
            ]
        )
        values = all_mean(local, info).tolist()
        metrics = dict(zip(STAT_NAMES, values[: len(STAT_NAMES)], strict=True))
        metrics.pop("nonfinite")
        img_per_s = self.steps * global_batch / elapsed
        metrics.update(
            images_seen=images_seen,
            img_per_s=img_per_s,
            img_per_s_per_gpu=img_per_s / info.world_size,
            step_time_ms=1000 * elapsed / max(self.steps, 1),
            data_wait_share=values[len(STAT_NAMES)],
            skipped_samples=values[len(STAT_NAMES) + 1] * info.world_size,
            shard_retries=values[len(STAT_NAMES) + 2] * info.world_size,
            global_batch=global_batch,
        )
        if info.device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
        return metrics
