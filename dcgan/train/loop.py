"""The training run, start to end, and its loop, read top to bottom.

One code path for one CPU process, one GPU, `torchrun --nproc_per_node=8` and SLURM/submitit: the
process group (if any) comes from the environment. Everything a resume needs lives in one state dict
saved through DCP (its parts are named in dcgan.run.schema): models, optimizers, GradScaler, step, data
position, the run's world size and global batch, fixed noise, the tracker's run id and the config. The pieces live with
their owners: what one rank holds in `trainer` (Trainer), the step in `gan.step`, metric windows in
`window`, where metrics go in `tracking`, evaluation in `evaluation.evaluate`, the run directory in
`run.rundir`, stop signals in `preemption`; this module says when each one runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dcgan.config import Config
from dcgan.console import Progress, setup_logging
from dcgan.data.base import BatchSource
from dcgan.data.build import build_source
from dcgan.distributed.collectives import any_rank, wait_for_every_rank
from dcgan.distributed.env import launched_world_size
from dcgan.distributed.hang import HangWatch
from dcgan.distributed.parallelize import sync_buffers
from dcgan.distributed.session import distributed_session
from dcgan.distributed.store import rendezvous_store
from dcgan.distributed.stragglers import RankWatch
from dcgan.errors import EXIT_NONFINITE, EXIT_OK
from dcgan.evaluation.generators import LoadedGenerator, save_grid, to_uint8_grid
from dcgan.gan.losses import realness
from dcgan.run.checkpoint import Best, read_best
from dcgan.run.rundir import RunDir, RunDirLock, check_progress, own_run_dir, save_run_config
from dcgan.train.overfit import OverfitProbe
from dcgan.train.preemption import StoppedWhileWaiting, StopSignal, stop_agreed
from dcgan.train.run_partitions import with_run_partitions
from dcgan.train.tracking import Tracker, make_tracker
from dcgan.train.trainer import Trainer, build_trainer, log_start, resume
from dcgan.train.window import Elapsed, GanHealth, Window, sample_diversity

log = logging.getLogger(__name__)

__all__ = ["EXIT_NONFINITE", "EXIT_OK", "Trainer", "build_trainer", "run_loop", "train"]


# --- what the loop does besides training -----------------------------------------------------------


def nonfinite_seen(trainer: Trainer) -> bool:
    """Whether any rank saw a non-finite loss since the run (re)started; one read, all ranks agree."""
    return any_rank(bool(trainer.nonfinite_flag.item()), trainer.info)


def write_samples(trainer: Trainer, tracker: Tracker, health: GanHealth) -> float:
    """Fixed-noise grid (the image generator, sample.bn statistics) to samples/ and wandb, plus
    histograms of D's last outputs; return the grid's diversity."""
    cfg = trainer.config
    weights = "ema" if cfg.images_from_average else "raw"
    shown = LoadedGenerator(
        trainer.image_generator(), cfg.model, trainer.step, trainer.fixed_noise, cfg.sample.bn, weights
    )
    images = shown.images(trainer.fixed_noise)
    save_grid(images, RunDir(trainer.run_dir).sample_grid(trainer.step))
    tracker.log_image(trainer.step, trainer.images_seen, "samples", to_uint8_grid(images))
    diversity = sample_diversity(images)
    health.observe_samples(trainer.step, diversity)
    every = cfg.log.histogram_every or cfg.sample.every
    if trainer.step % every == 0 and trainer.step_fn.last_logits is not None:
        real, fake = trainer.step_fn.last_logits
        for key, logits in (("D_real", real), ("D_fake", fake)):
            values = realness(logits, cfg.loss.kind)  # D's outputs on one scale for every loss.kind
            tracker.log_histogram(trainer.step, trainer.images_seen, key, values.cpu().numpy())
    return diversity


def evaluate_now(trainer: Trainer) -> dict[str, float]:
    """eval.metrics of the trained G (sample.bn statistics; rank 0's running statistics) and, when kept,
    of its average; collective."""
    from dcgan.evaluation.evaluate import evaluate_during_training

    cfg = trainer.config
    sync_buffers(trainer.g_bare, trainer.info)
    raw = LoadedGenerator(trainer.raw_image_generator(), cfg.model, trainer.step, trainer.fixed_noise, bn=cfg.sample.bn)
    average = None
    if trainer.ema is not None:
        average = LoadedGenerator(
            trainer.ema.generator(), cfg.model, trainer.step, trainer.fixed_noise, bn=cfg.sample.bn, weights="ema"
        )
    return evaluate_during_training(raw, average, cfg, trainer.info)


def keep_if_best(trainer: Trainer, results: dict[str, float], best: float) -> float:
    """Checkpoint this step as the best when eval.best improved (the checkpointer marks it once the save
    is complete); return the best value so far."""
    from dcgan.evaluation.evaluate import best_key

    if not trainer.config.eval.best:
        return best
    metric = best_key(trainer.config)
    if results[metric] >= best:
        return best
    trainer.save(best=Best(metric, results[metric]))
    log.info("step %d is the best so far by %s = %.5f: its checkpoint is kept", trainer.step, metric, results[metric])
    return results[metric]


def stop_now(trainer: Trainer, stop: StopSignal) -> int:
    """A stop signal every rank agreed on: this step's checkpoint (unless saved already), then the exit."""
    log.warning("stop signal received: checkpointing step %d, then exiting %d", trainer.step, stop.exit_status)
    if trainer.checkpointer.saved_step != trainer.step:
        trainer.save(blocking=True)
    trainer.checkpointer.wait()
    return stop.exit_status


def stop_while_waiting(trainer: Trainer, stop: StopSignal) -> int:
    """A stop signal while a single process waited for data: checkpoint the last completed step (unless
    it already is one, or none was trained) and exit as after any stop signal."""
    if trainer.step > 0 and trainer.step != trainer.checkpointer.saved_step:
        log.warning(
            "stop signal while waiting for data: checkpointing step %d, then exiting %d", trainer.step, stop.exit_status
        )
        trainer.save(blocking=True)
    else:
        log.warning(
            "stop signal while waiting for data: nothing trained since the last checkpoint, exiting %d",
            stop.exit_status,
        )
    return stop.exit_status


def stop_nonfinite(trainer: Trainer) -> int:
    """A non-finite loss: nothing of this step is recorded; the last complete checkpoint stays."""
    trainer.checkpointer.wait()
    complete = trainer.checkpointer.complete_step
    kept = f"the last complete checkpoint (step {complete}) is kept" if complete >= 0 else "no checkpoint was completed"
    log.error("non-finite loss at or before step %d: stopping; %s", trainer.step, kept)
    return EXIT_NONFINITE


# --- the loop --------------------------------------------------------------------------------------


def run_loop(trainer: Trainer, tracker: Tracker, stop: StopSignal) -> int:
    """Train until train.steps; return an exit status (dcgan.errors: EXIT_OK, EXIT_NONFINITE, or a stop's).

    After each step, in this order, each cadence one `if`: the non-finite check (nothing is logged or
    saved after a non-finite loss), the sample grid (before the metric line that reports its
    diversity), the metric line, evaluation (which may save this step as the best), a stop signal
    (which saves and ends the run), the regular checkpoint (unless this step is saved already).
    """
    hang = start_hang_watch(trainer)
    try:
        return _loop(trainer, tracker, stop, hang)
    finally:
        hang.stop()


def start_hang_watch(trainer: Trainer) -> HangWatch:
    """This rank's hang report (dist.hang_after), started."""
    cfg, info = trainer.config, trainer.info
    return HangWatch(
        trainer.run_dir,
        info.rank,
        info.world_size,
        cfg.dist.hang_after,
        cfg.dist.hang_min_s,
        cfg.data.workers,
        rendezvous_store() if info.world_size > 1 else None,
        timeout_s=cfg.dist.timeout_s,
    ).start()


@dataclass
class LoopState:
    """What the loop carries from step to step besides the Trainer: the open metric window, the
    straggler watch, the progress line, GAN health, the newest grid's diversity and the best eval value."""

    window: Window
    ranks: RankWatch
    progress: Progress
    health: GanHealth
    hang: HangWatch
    best: float
    diversity: float | None = None  # of the newest grid (rank 0), reported with the next metric line
    overfit: OverfitProbe | None = None
    """D's accuracy on training against held-out reals (data.holdout), for each metric line."""

    @contextmanager
    def outside_training(self) -> Iterator[Elapsed]:
        """Work between steps that is not training: kept out of the window's rates and the hang watch."""
        with self.window.outside_training() as took, self.hang.not_training():
            yield took


def start_loop(trainer: Trainer, hang: HangWatch) -> LoopState:
    """The loop's state at its first step (a resumed run continues its best eval value)."""
    cfg, info = trainer.config, trainer.info
    previous_best = read_best(trainer.checkpointer.root)
    return LoopState(
        window=Window(info.device),
        ranks=RankWatch(info.rank, info.world_size, info.flag_group, cfg.log.straggler, cfg.log.straggler_windows),
        progress=Progress(cfg.train.steps, trainer.step, enabled=info.is_main),
        health=GanHealth(loss=cfg.loss.kind),
        hang=hang,
        best=previous_best["value"] if previous_best else math.inf,
        overfit=OverfitProbe.for_run(cfg, info),
    )


def _loop(trainer: Trainer, tracker: Tracker, stop: StopSignal, hang: HangWatch) -> int:
    """run_loop's body; every wait that is not a step is inside `hang.not_training()`."""
    cfg, info = trainer.config, trainer.info
    batches = iter(trainer.data)
    state = start_loop(trainer, hang)
    while trainer.step < cfg.train.steps:
        try:
            images, waited = next_batch(trainer, batches, stop, hang)
        except StoppedWhileWaiting:
            with hang.not_training():
                return stop_while_waiting(trainer, stop)
        hang.in_step(trainer.step + 1)
        state.window.add(trainer.train_step(images), waited)
        if state.overfit is not None:
            state.overfit.remember(images)
        hang.step_done(trainer.step)
        state.progress.update(trainer.step)
        step, final = trainer.step, trainer.step == cfg.train.steps
        log_due = step % cfg.log.every == 0 or final
        checkpoint_due = step % cfg.checkpoint.every == 0 or final

        # Non-finite loss: reading the device flag is a host sync, so it is checked only where a metric
        # line or a checkpoint would record the step; a NaN in between is caught there.
        if (log_due or checkpoint_due) and cfg.train.nonfinite == "stop" and nonfinite_seen(trainer):
            with hang.not_training():
                return stop_nonfinite(trainer)
        if step % cfg.sample.every == 0 or final:
            sample_grid_now(trainer, tracker, state)
        if log_due:
            log_window(trainer, tracker, state)
        if cfg.eval.every > 0 and step % cfg.eval.every == 0:
            evaluate_and_keep_best(trainer, tracker, state)
        # A stop signal every rank agreed on: this step's checkpoint, then the exit.
        if stop_agreed(stop, step, info):
            with hang.not_training():
                return stop_now(trainer, stop)
        # The regular checkpoint (unless saved as the best); the final one blocks, so the run ends with it complete.
        if checkpoint_due and trainer.checkpointer.saved_step != step:
            with state.outside_training():
                trainer.save(blocking=final)
        elif final:
            with hang.not_training():
                trainer.checkpointer.wait()
    state.progress.close()
    if info.is_main:
        log.info("%s", RunDir(trainer.run_dir).finished_message(trainer.step, trainer.images_seen))
    return EXIT_OK


def next_batch(
    trainer: Trainer, batches: Iterator[torch.Tensor], stop: StopSignal, hang: HangWatch
) -> tuple[torch.Tensor, float]:
    """The next step's images on the device, and the seconds spent waiting for them (the loader's time,
    measured before the step). A single process waiting for data can be interrupted by a stop signal
    (StoppedWhileWaiting); ranks of a group wait, and agree on the stop after the step."""
    waited = time.perf_counter()
    hang.waiting_for_data(trainer.step + 1)
    with stop.waiting(interruptible=not trainer.info.distributed):
        images = next(batches).to(trainer.info.device, non_blocking=True)
    return images, time.perf_counter() - waited


def sample_grid_now(trainer: Trainer, tracker: Tracker, state: LoopState) -> None:
    """Fixed-noise grid, made on rank 0 with everyone's BatchNorm buffers in agreement; the other ranks
    wait for it here, outside training, not inside the next step's collectives."""
    with state.outside_training():
        sync_buffers(trainer.g_bare, trainer.info)
        if trainer.info.is_main:
            state.diversity = write_samples(trainer, tracker, state.health)
        wait_for_every_rank(trainer.info)


def log_window(trainer: Trainer, tracker: Tracker, state: LoopState) -> None:
    """The metric line of the window that ends at this step; a new window starts."""
    step, info = trainer.step, trainer.info
    metrics = state.window.metrics(
        info,
        global_batch=trainer.global_batch,
        images_seen=trainer.images_seen,
        skipped_samples=trainer.data.skipped_samples,
        shard_retries=trainer.data.shard_retries,
    )
    metrics.update(state.ranks.window_metrics(step, state.window.rank_times()))
    if state.diversity is not None:
        metrics["sample_diversity"] = state.diversity
    if state.overfit is not None:
        with state.outside_training():
            metrics.update(state.overfit.measure(trainer.g_bare, trainer.d_bare, info))
    tracker.log_metrics(step, metrics)
    state.progress.report(step, metrics)
    state.health.observe_metrics(step, metrics)
    state.window = Window(info.device)


def evaluate_and_keep_best(trainer: Trainer, tracker: Tracker, state: LoopState) -> None:
    """Evaluation, its time kept out of the training rate; a new best is checkpointed here."""
    step = trainer.step
    with state.outside_training() as took:
        results = evaluate_now(trainer)
    tracker.log_metrics(
        step,
        {
            "images_seen": trainer.images_seen,
            "eval_time_s": took.seconds,
            **{f"eval/{k}": v for k, v in results.items()},
        },
    )
    log.info("step %d eval (%.1f s): %s", step, took.seconds, " ".join(f"{k}={v:.5f}" for k, v in results.items()))
    with state.outside_training():
        state.best = keep_if_best(trainer, results, state.best)


# --- start to end ----------------------------------------------------------------------------------


def train(config: Config) -> int:
    """Entry point of `dcgan train`: returns the process exit status."""
    config.batch_per_rank(launched_world_size())  # a global batch the ranks cannot share: before any work
    run_dir = Path(config.run.dir)
    tracker: Tracker = Tracker()
    stop: StopSignal | None = None
    data: BatchSource | None = None
    trainer: Trainer | None = None
    lock: RunDirLock | None = None

    def release() -> None:
        """What this rank holds, freed after a failure is explained and before the group goes: the
        checkpointer's background save still needs the group."""
        if trainer is not None:
            trainer.checkpointer.close()
        if data is not None:
            data.close()
        tracker.close()
        if stop is not None:
            stop.uninstall()
        if lock is not None:
            lock.release()

    with distributed_session(
        config.train.device,
        config.dist.timeout_s,
        force=config.dist.force,
        liveness_s=config.dist.liveness_s,
        release=release,
    ) as info:
        stop = StopSignal().install()
        setup_logging(None, info.rank)
        # what the data refuses (a batch too large, missing shards, ranks that cannot share the global
        # batch or the partitions): before run.dir exists
        config = with_run_partitions(config, info)
        data = build_source(config, info)
        lock = own_run_dir(run_dir, info)
        setup_logging(RunDir(run_dir).train_log, info.rank)
        trainer = build_trainer(config, info, data)
        trainer.checkpointer.prepare()
        resume(trainer)
        check_progress(run_dir, trainer.step, config.train.steps, info)
        save_run_config(config, run_dir, info)  # only now: a refused checkpoint leaves the old config in place
        log_start(trainer)
        tracker = make_tracker(run_dir, config, trainer.run_id, info.rank, trainer.step)
        if trainer.step >= config.train.steps:
            log.info("nothing to do: the run already reached step %d", trainer.step)
            return EXIT_OK
        return run_loop(trainer, tracker, stop)
