"""Where a run's numbers and pictures go: stats.jsonl and wandb (the log and the progress line are
dcgan.console's).

Only rank 0 tracks; every other rank gets the no-op `Tracker`, so call sites never branch on rank.
wandb is imported lazily and only when enabled. The wandb run id lives in the checkpoint, so a resumed
or requeued job continues the same wandb run (online: resumed; offline: same id, `wandb sync` later).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dcgan.config import Config, ConfigError, LogConfig, config_to_dict, load_config
from dcgan.run.rundir import RunDir
from dcgan.run.stats import read_stats, rewind_stats
from dcgan.run.wandb_files import uploadable_segments

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """An 8-character id in wandb's alphabet, made here so runs without wandb have one too."""
    return uuid.uuid4().hex[:8]


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
