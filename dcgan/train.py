"""The training loop: build everything from a Config, resume if a checkpoint exists, train, close.

One code path for one CPU process, one GPU, `torchrun --nproc_per_node=8` and SLURM/submitit: the
process group (if any) comes from the environment. Everything a resume needs lives in one state dict
saved through DCP: models, optimizers, GradScaler, step, data position, per-rank noise RNG, fixed noise,
the tracker's run id and the config.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dcgan import schema
from dcgan.checkpoint import Best, Checkpointer, read_best, read_newest, stored_shapes
from dcgan.config import Config, architecture, config_to_dict, save_config
from dcgan.data import build_source
from dcgan.data.base import BatchSource
from dcgan.distributed import (
    DistInfo,
    GradientSync,
    all_mean,
    average_gradients,
    any_rank,
    destroy_distributed,
    explain_failure,
    init_distributed,
    log_batchnorm_mode,
    Bare,
    prepare_module,
    replicas_agree,
    sync_buffers,
)
from dcgan.ema import GeneratorEMA
from dcgan.graphs import StepRunner, gradient_sync, make_runner
from dcgan.models import Discriminator, Generator
from dcgan.preemption import StopSignal, StoppedWhileWaiting
from dcgan.errors import IncompatibleCheckpoint, RunDirInUse
from dcgan.rundir import MAX_ATTEMPTS_WITHOUT_PROGRESS, RunDirLock, count_attempt, create_run_dir, refuse_without_progress
from dcgan.sample import LoadedGenerator, generate, plain_copy, save_grid, to_uint8_grid
from dcgan.step import NONFINITE, STAT_NAMES, GANStep, resolve_precision
from dcgan.tracking import GanHealth, Progress, Tracker, make_tracker, new_run_id, sample_diversity, setup_logging

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NONFINITE = 3
"""Exit status when a non-finite loss stopped the run (train.nonfinite=stop)."""


def noise_seed(seed: int, rank: int) -> int:
    """Per-rank latent noise: ranks must not draw the same z, or the global batch repeats itself."""
    return seed * 1_000_003 + rank + 1


@dataclass
class Trainer:
    """Everything one rank holds during a run."""

    config: Config
    info: DistInfo
    run_dir: Path
    g_bare: Generator
    d_bare: Discriminator
    step_fn: GANStep
    runner: StepRunner
    """What the loop calls each step: `step_fn` itself, or its CUDA-graph replay (train.cuda_graph)."""
    data: BatchSource
    fixed_noise: torch.Tensor
    checkpointer: Checkpointer
    run_id: str
    step: int = 0
    images_seen: int = 0
    """Images trained on by all ranks together since step 0: the x-axis on which runs with different
    numbers of GPUs (and a run resumed with another) compare."""
    nonfinite_flag: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    ema: GeneratorEMA | None = None
    """The average of G's weights (train.ema > 0), updated after every step."""

    @property
    def global_batch(self) -> int:
        """Images one step trains on across all ranks."""
        return self.config.train.batch_size * self.info.world_size

    # --- state that must survive a resume ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        step_fn = self.step_fn
        return schema.training_state(
            g=get_model_state_dict(self.g_bare), d=get_model_state_dict(self.d_bare),
            optim_g=get_optimizer_state_dict(self.g_bare, step_fn.opt_g),
            optim_d=get_optimizer_state_dict(self.d_bare, step_fn.opt_d),
            scaler=step_fn.scaler.state_dict(), step=self.step, images_seen=self.images_seen, data=self.data.state_dict(),
            rank=self.info.rank, noise_rng=step_fn.noise.get_state(), fixed_noise=self.fixed_noise,
            run_id=self.run_id, config_yaml=yaml.safe_dump(config_to_dict(self.config), sort_keys=False),
            ema=self.ema.state_dict() if self.ema is not None else None,
        )

    def image_generator(self) -> Generator:
        """The G that sample grids show: the average when kept (and sample.ema), else the trained G,
        as a plain copy when its BatchNorm would need a collective for batch statistics."""
        if self.ema is not None and self.config.sample.ema:
            return self.ema.generator()
        return self.raw_image_generator()

    def raw_image_generator(self) -> Generator:
        """The trained G for images with sample.bn statistics: a plain copy when its BatchNorm would
        need a collective for batch statistics (cross-rank BatchNorm, images made on rank 0 alone)."""
        if self.config.sample.bn == "batch" and self.info.distributed:
            return plain_copy(self.g_bare, self.config.model)
        return self.g_bare

    def load_state_dict(self, path: Path) -> None:
        """Resume from the checkpoint at `path`, refusing one written for another model."""
        saved_config = check_compatible(path, self.config, self.checkpointer)
        state = self.state_dict()
        stored = stored_shapes(path)
        rank = schema.rank_key(self.info.rank)
        # the schema's optional parts: left out of what is read when this checkpoint lacks them
        # rng: absent when fewer ranks wrote the checkpoint; another shape when a CPU run resumes on a GPU
        has_rng = stored.get(schema.flat_key(schema.RNG, rank, "noise")) == tuple(self.step_fn.noise.get_state().shape)
        if not has_rng:
            del state[schema.RNG]
        if stored.get(schema.FIXED_NOISE) != tuple(self.fixed_noise.shape):
            log.info("sample.num changed since the checkpoint: sample grids from here on use new fixed noise")
            del state[schema.FIXED_NOISE]
        if schema.flat_key(schema.PROGRESS, "images_seen") not in stored:  # written before the count existed
            del state[schema.PROGRESS]["images_seen"]
        stored_ema = schema.has_ema(stored)
        if self.ema is not None and not stored_ema:
            del state[schema.EMA]
            log.warning("train.ema=%g but the checkpoint holds no average of G: it starts from this step's G", self.ema.decay)
        elif self.ema is None and stored_ema:
            log.warning("the checkpoint holds an average of G but train.ema=0: it is not kept from here on")
        if state[schema.SCALER] and not any(key.startswith(schema.SCALER + ".") for key in stored):
            log.info("the checkpoint has no loss-scaler state (written without fp16 or nonfinite=skip): default scale")
            state[schema.SCALER] = {}
        self.checkpointer.load(path, state)
        models, optims = state[schema.MODEL], state[schema.OPTIM]
        set_model_state_dict(self.g_bare, models["G"])
        set_model_state_dict(self.d_bare, models["D"])
        for name, model, optimizer in (("G", self.g_bare, self.step_fn.opt_g), ("D", self.d_bare, self.step_fn.opt_d)):
            keep_configured_hyperparameters(optims[name], optimizer, name)
            set_optimizer_state_dict(model, optimizer, optims[name])
        if state[schema.SCALER]:
            self.step_fn.scaler.load_state_dict(state[schema.SCALER])
        progress = state[schema.PROGRESS]
        self.step = int(progress["step"])
        self.images_seen = int(progress.get("images_seen", self.step * self.global_batch))
        self.data.load_state_dict(progress["data"])
        if schema.FIXED_NOISE in state:
            self.fixed_noise.copy_(state[schema.FIXED_NOISE])
        if self.ema is not None:
            if schema.EMA in state:
                self.ema.load_state_dict(state[schema.EMA])
            else:
                self.ema = GeneratorEMA(self.g_bare, self.config.model, self.config.train.ema)
        self.run_id = str(state[schema.META]["run_id"])
        if has_rng:
            self.step_fn.noise.set_state(state[schema.RNG][rank]["noise"])
        else:
            self.step_fn.noise.manual_seed(noise_seed(self.config.seed, self.info.rank) + self.step)
            log.warning("checkpoint has no noise RNG for rank %d (fewer ranks or another device wrote it): reseeded", self.info.rank)
        self.checkpointer.resumed(self.step)
        log.info("resumed from %s at step %d (data epoch %d, batch %d)", path, self.step, *self.data.state_dict().values())
        warn_if_global_batch_changed(saved_config, stored, self.config.train.batch_size, self.info.world_size)


def warn_if_global_batch_changed(saved_config: dict[str, Any], stored: dict[str, Any], batch_size: int, world_size: int) -> None:
    """A resume on another number of ranks changes the global batch (batch_size is per process): say so,
    since the lr was chosen for the old one. The writers are counted by their per-rank noise state."""
    writers = sum(1 for key in stored if key.startswith(schema.flat_key(schema.RNG, "rank")) and key.endswith(".noise"))
    saved_batch = int(saved_config.get("train", {}).get("batch_size", 0))
    before, now = saved_batch * writers, batch_size * world_size
    if writers and before != now:
        log.warning(
            "the global batch changed on resume: %d (%d rank(s) x %d) when checkpointed, %d (%d x %d) now; optim.lr "
            "is not rescaled (for the same global batch: train.batch_size=%d)",
            before, writers, saved_batch, now, world_size, batch_size, max(before // world_size, 1),
        )


PAPER_LR, PAPER_BATCH = 2e-4, 128
"""Radford et al.'s Adam learning rate and the (global) batch it was chosen for."""


def lr_advice(lr: float, global_batch: int) -> str | None:
    """The README's one rule, at the start of every run whose global batch is not the paper's: for a
    k-fold global batch start from lr x sqrt(k). Advice, not a change: the paper's per-GPU batch at the
    paper's lr is also a sound (slower) choice, and the user's lr stands."""
    if global_batch == PAPER_BATCH:
        return None
    suggested = PAPER_LR * math.sqrt(global_batch / PAPER_BATCH)
    return (
        f"global batch {global_batch}: optim.lr {lr:.3g}; the sqrt rule from the paper's {PAPER_LR:.0e} at {PAPER_BATCH} "
        f"suggests {suggested:.2g} (README: Many GPUs and nodes)"
    )


def keep_configured_hyperparameters(saved: dict[str, Any], optimizer: torch.optim.Optimizer, name: str) -> None:
    """Put this run's hyperparameters into a loaded optimizer state before it is applied.

    The checkpoint supplies the state (Adam's moments and step counts); the config supplies lr, betas and
    the implementation flags: a resume with a new `optim.lr` must use it, and a run resumed on a GPU or
    with `train.cuda_graph` needs fused/capturable Adam whatever wrote the checkpoint. torch's
    `load_state_dict` would otherwise restore every value saved in `param_groups`.
    """
    for saved_group, live_group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        for key in ("lr", "betas"):
            before, now = _as_tuple(saved_group.get(key)), _as_tuple(live_group[key])
            if before != now:
                log.info("optimizer %s: %s %s in the checkpoint, %s in the config: using the config's", name, key, before, now)
        saved_group.update({k: v for k, v in live_group.items() if k not in ("params", "param_names")})


def _as_tuple(value: Any) -> tuple[Any, ...]:
    """Betas come back from a checkpoint as a list, lr as a float: compare them as tuples."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def check_compatible(path: Path, config: Config, checkpointer: Checkpointer) -> dict[str, Any]:
    """Refuse, in one line, a checkpoint whose model settings differ from this config's; return the
    checkpoint's own config (as a dict)."""
    saved_config = schema.saved_config(path, checkpointer.load)
    saved = saved_config.get("model", {})
    wanted = architecture(config.model)
    differing = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if differing:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} belongs to another model ({'; '.join(differing)}): "
            "use a new run.dir or the checkpoint's model settings"
        )
    return saved_config


def build_step(
    config: Config, info: DistInfo, *, sync: GradientSync | None = None
) -> tuple[Generator, Discriminator, GANStep]:
    """Models (wrapped for this rank), optimizers and the GAN step: everything but data and I/O.
    `sync` overrides how gradients are averaged (default: what the config's step mode needs)."""
    torch.manual_seed(config.seed)
    device = info.device
    t = config.train
    sync = sync or gradient_sync(config, info)

    def wrap(module: Bare) -> tuple[nn.Module, Bare]:
        return prepare_module(
            module, info, compile=t.compile, channels_last=t.channels_last, sync_bn=config.model.sync_bn,
            gradient_sync=sync,
        )

    g, g_bare = wrap(Generator(config.model))
    d, d_bare = wrap(Discriminator(config.model))
    fused = device.type == "cuda"
    betas = (config.optim.beta1, config.optim.beta2)
    # capturable: Adam keeps its step count on the device, which a CUDA-graph replay requires.
    adam: dict[str, Any] = {"lr": config.optim.lr, "betas": betas, "fused": fused, "capturable": t.cuda_graph}
    opt_g = torch.optim.Adam(g_bare.parameters(), **adam)
    opt_d = torch.optim.Adam(d_bare.parameters(), **adam)
    dtype = resolve_precision(t.precision, device)
    step_fn = GANStep(
        g=g, d=d, d_bare=d_bare, opt_g=opt_g, opt_d=opt_d, scaler=make_scaler(dtype, t.nonfinite, device),
        dtype=dtype, nz=config.model.nz, noise=torch.Generator(device=device).manual_seed(noise_seed(config.seed, info.rank)),
        channels_last=t.channels_last and device.type == "cuda",
        average_gradients=partial(average_gradients, info=info) if sync == "explicit" else None,
    )
    return g_bare, d_bare, step_fn


def build_trainer(config: Config, info: DistInfo) -> Trainer:
    """Models, optimizers, data, checkpointer for this rank; nothing is trained or loaded yet."""
    g_bare, d_bare, step_fn = build_step(config, info)
    fixed = torch.randn(config.sample.num, config.model.nz, generator=torch.Generator().manual_seed(config.seed))
    run_dir = Path(config.run.dir)
    return Trainer(
        config=config,
        info=info,
        run_dir=run_dir,
        g_bare=g_bare,
        d_bare=d_bare,
        step_fn=step_fn,
        runner=make_runner(step_fn, config, info),
        data=build_source(config, info),
        fixed_noise=fixed.to(info.device),
        checkpointer=Checkpointer(run_dir / "checkpoints", config.checkpoint, info),
        run_id=new_run_id(),
        nonfinite_flag=torch.zeros((), device=info.device),
        ema=GeneratorEMA(g_bare, config.model, config.train.ema) if config.train.ema > 0 else None,
    )


def make_scaler(dtype: torch.dtype, nonfinite: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 needs loss scaling. With train.nonfinite=skip the scaler (at scale 1 for other dtypes) is
    what skips an update whose gradients are not finite; otherwise it is disabled (a no-op)."""
    if dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    if nonfinite == "skip":
        return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)
    return torch.amp.GradScaler(device.type, enabled=False)


# --- the loop ------------------------------------------------------------------------------------


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
    clock: Callable[[], float] = time.perf_counter
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(len(STAT_NAMES), device=self.device)
        self.started = self.clock()

    def add(self, stats: torch.Tensor, data_wait_s: float) -> None:
        self.sums += stats
        self.steps += 1
        self.data_wait_s += data_wait_s

    @contextmanager
    def outside_training(self) -> Iterator[Elapsed]:
        """Time spent in this block is not training time; the block's seconds are in what it yields."""
        elapsed, began = Elapsed(), self.clock()
        try:
            yield elapsed
        finally:
            elapsed.seconds = self.clock() - began
            self.excluded_s += elapsed.seconds

    def training_s(self) -> float:
        """Seconds of this window spent training (steps and waiting for their data)."""
        return max(self.clock() - self.started - self.excluded_s, 1e-9)


def window_metrics(window: Window, trainer: Trainer) -> dict[str, float]:
    """Means over the window and over ranks; rates from wall time. One device->host read."""
    info = trainer.info
    elapsed = window.training_s()
    local = torch.cat(
        [
            window.sums / max(window.steps, 1),
            torch.tensor([window.data_wait_s / elapsed, float(trainer.data.skipped_samples)], device=window.sums.device),
        ]
    )
    values = all_mean(local, info).tolist()
    metrics = dict(zip(STAT_NAMES, values[: len(STAT_NAMES)], strict=True))
    metrics.pop("nonfinite")
    img_per_s = window.steps * trainer.global_batch / elapsed
    metrics.update(
        images_seen=trainer.images_seen,
        img_per_s=img_per_s,
        img_per_s_per_gpu=img_per_s / info.world_size,
        step_time_ms=1000 * elapsed / max(window.steps, 1),
        data_wait_share=values[len(STAT_NAMES)],
        skipped_samples=values[len(STAT_NAMES) + 1] * info.world_size,
        global_batch=trainer.global_batch,
    )
    if info.device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    return metrics


def write_samples(trainer: Trainer, tracker: Tracker, health: GanHealth) -> float:
    """Fixed-noise grid (the image generator, sample.bn statistics) to samples/ and wandb, plus
    histograms of D's last outputs."""
    images = generate(trainer.image_generator(), trainer.fixed_noise, trainer.config.sample.bn)
    save_grid(images, trainer.run_dir / "samples" / f"step_{trainer.step:09d}.png")
    tracker.log_image(trainer.step, trainer.images_seen, "samples", to_uint8_grid(images))
    diversity = sample_diversity(images)
    health.observe_samples(trainer.step, diversity)
    every = trainer.config.log.histogram_every or trainer.config.sample.every
    if trainer.step % every == 0 and trainer.step_fn.last_logits is not None:
        real, fake = trainer.step_fn.last_logits
        for key, logits in (("D_real", real), ("D_fake", fake)):
            tracker.log_histogram(trainer.step, trainer.images_seen, key, torch.sigmoid(logits.float()).cpu().numpy())
    return diversity


EMA_PREFIX = "ema_"
"""Eval results of the averaged G are logged beside the raw G's under this prefix (eval/ema_swd)."""


def evaluate_now(trainer: Trainer) -> dict[str, float]:
    """eval.metrics of the trained G (sample.bn statistics; rank 0's running statistics) and, when kept,
    of its average (prefixed EMA_PREFIX); collective."""
    from dcgan.evaluate import evaluate

    cfg = trainer.config
    sync_buffers(trainer.g_bare, trainer.info)
    generators = {"": LoadedGenerator(trainer.raw_image_generator(), cfg.model, trainer.step, trainer.fixed_noise, bn=cfg.sample.bn)}
    if trainer.ema is not None:
        generators[EMA_PREFIX] = LoadedGenerator(trainer.ema.generator(), cfg.model, trainer.step, trainer.fixed_noise, bn=cfg.sample.bn, weights="ema")
    data = cfg.eval.data or cfg.data.shards or "digits"
    results: dict[str, float] = {}
    for prefix, loaded in generators.items():
        evaluation = evaluate(loaded, data, cfg.eval.num, list(cfg.eval.metrics), trainer.info, cfg.eval.inception)
        results.update({prefix + key: value for key, value in evaluation.results.items()})
    return results


def best_key(config: Config) -> str:
    """The eval result that eval.best ranks checkpoints by: of the G that images come from."""
    uses_ema = config.train.ema > 0 and config.sample.ema
    return (EMA_PREFIX if uses_ema else "") + config.eval.best


def keep_if_best(trainer: Trainer, results: dict[str, float], best: float) -> float:
    """Checkpoint this step as the best when eval.best improved (the checkpointer marks it once the save
    is complete); return the best value so far."""
    if not trainer.config.eval.best:
        return best
    metric = best_key(trainer.config)
    if results[metric] >= best:
        return best
    save_checkpoint(trainer, best=Best(metric, results[metric]))
    log.info("step %d is the best so far by %s = %.5f: its checkpoint is kept", trainer.step, metric, results[metric])
    return results[metric]


def nonfinite_seen(trainer: Trainer) -> bool:
    """Whether any rank saw a non-finite loss since the run (re)started; one read, all ranks agree."""
    return any_rank(bool(trainer.nonfinite_flag.item()), trainer.info)


def save_checkpoint(trainer: Trainer, *, blocking: bool = False, best: Best | None = None) -> None:
    """Check replicas agree, then write this step's checkpoint (collective: every rank calls it)."""
    info = trainer.info
    sync_buffers(trainer.g_bare, info)
    sync_buffers(trainer.d_bare, info)
    differing = replicas_agree(trainer.g_bare, info) + replicas_agree(trainer.d_bare, info)
    if differing:
        raise RuntimeError(f"replicas disagree before checkpoint at step {trainer.step}: {', '.join(differing[:5])}")
    trainer.checkpointer.save(trainer.step, trainer.state_dict(), blocking=blocking, best=best)


STOP_CHECK_EVERY = 10
"""With several ranks, steps between agreements on a stop signal (a host-side collective each time)."""


def stop_agreed(stop: StopSignal, step: int, info: DistInfo) -> bool:
    """Whether every rank stops after this step. One process checks its flag at every step; ranks agree
    every STOP_CHECK_EVERY steps (the same steps everywhere), so that a launch-bound step does not wait
    on a cross-node round trip each time: SLURM's 120 s warning leaves room for ten more steps."""
    if not info.distributed:
        return stop.requested
    return step % STOP_CHECK_EVERY == 0 and any_rank(stop.requested, info)


def stop_while_waiting(trainer: Trainer, stop: StopSignal) -> int:
    """A stop signal while a single process waited for data: checkpoint the last completed step (unless
    it already is one) and exit as after any stop signal."""
    if trainer.step > 0 and trainer.step != trainer.checkpointer.saved_step:
        log.warning("stop signal while waiting for data: checkpointing step %d, then exiting %d", trainer.step, stop.exit_status)
        save_checkpoint(trainer, blocking=True)
    else:
        log.warning("stop signal while waiting for data: nothing trained since the last checkpoint, exiting %d", stop.exit_status)
    return stop.exit_status


@dataclass
class LoopState:
    """What the end-of-step schedule carries from one step to the next."""

    window: Window
    progress: Progress
    health: GanHealth = field(default_factory=GanHealth)
    diversity: float | None = None
    """Of the newest fixed-noise grid (rank 0): reported with the next metric line, which may come later."""
    best: float = math.inf
    """The best eval.best value so far (from best.json on resume)."""


@dataclass(frozen=True)
class Due:
    """Which cadences fall on this step (the final step is due for everything but eval)."""

    step: int
    final: bool
    log: bool
    samples: bool
    eval: bool
    checkpoint: bool

    @staticmethod
    def at(step: int, config: Config) -> Due:
        final = step == config.train.steps
        return Due(
            step=step, final=final,
            log=step % config.log.every == 0 or final,
            samples=step % config.sample.every == 0 or final,
            eval=config.eval.every > 0 and step % config.eval.every == 0,
            checkpoint=step % config.checkpoint.every == 0 or final,
        )


Action = Callable[[Trainer, Tracker, StopSignal, LoopState, Due], "int | None"]
"""One entry of the end-of-step schedule: returns an exit status to end the run, None to go on."""


def check_finite(trainer: Trainer, tracker: Tracker, stop: StopSignal, state: LoopState, due: Due) -> int | None:
    """A non-finite loss ends the run before anything records it. Checked only when a metric line or a
    checkpoint is due: the check reads a device flag (a host sync), and a NaN between those steps is
    caught at the next one, before it can be logged or saved."""
    if not (due.log or due.checkpoint) or trainer.config.train.nonfinite != "stop" or not nonfinite_seen(trainer):
        return None
    trainer.checkpointer.wait()
    log.error(
        "non-finite loss at or before step %d: stopping; the last complete checkpoint (step %d) is kept",
        due.step, trainer.checkpointer.complete_step,
    )
    return EXIT_NONFINITE


def samples_if_due(trainer: Trainer, tracker: Tracker, stop: StopSignal, state: LoopState, due: Due) -> int | None:
    """The fixed-noise grid, before the metric line that reports its diversity."""
    if due.samples:
        sync_buffers(trainer.g_bare, trainer.info)
        if trainer.info.is_main:
            with state.window.outside_training():
                state.diversity = write_samples(trainer, tracker, state.health)
    return None


def metrics_if_due(trainer: Trainer, tracker: Tracker, stop: StopSignal, state: LoopState, due: Due) -> int | None:
    """The metric line of the window that ends here; a new window starts."""
    if due.log:
        metrics = window_metrics(state.window, trainer)
        if state.diversity is not None:
            metrics["sample_diversity"] = state.diversity
        tracker.log_metrics(due.step, metrics)
        state.progress.report(due.step, metrics)
        state.health.observe_metrics(due.step, metrics)
        state.window = Window(trainer.info.device)
    return None


def eval_if_due(trainer: Trainer, tracker: Tracker, stop: StopSignal, state: LoopState, due: Due) -> int | None:
    """Evaluation (its time kept out of the training rate); a new best is checkpointed here, which
    makes this step's regular checkpoint unnecessary (see checkpoint_if_due)."""
    if due.eval:
        with state.window.outside_training() as took:
            results = evaluate_now(trainer)
        tracker.log_metrics(due.step, {"images_seen": trainer.images_seen, "eval_time_s": took.seconds, **{f"eval/{k}": v for k, v in results.items()}})
        log.info("step %d eval (%.1f s): %s", due.step, took.seconds, " ".join(f"{k}={v:.5f}" for k, v in results.items()))
        state.best = keep_if_best(trainer, results, state.best)
    return None


def stop_if_agreed(trainer: Trainer, tracker: Tracker, stop: StopSignal, state: LoopState, due: Due) -> int | None:
    """A stop signal every rank agreed on: this step's checkpoint, written before exiting, then the exit."""
    if not stop_agreed(stop, due.step, trainer.info):
        return None
    log.warning("stop signal received: checkpointing step %d, then exiting %d", due.step, stop.exit_status)
    if trainer.checkpointer.saved_step != due.step:
        save_checkpoint(trainer, blocking=True)
    trainer.checkpointer.wait()
    return stop.exit_status


def checkpoint_if_due(trainer: Trainer, tracker: Tracker, stop: StopSignal, state: LoopState, due: Due) -> int | None:
    """The regular checkpoint, unless this step is saved already (as the best, by eval_if_due); the
    final one blocks, so that the run ends with it complete."""
    if due.checkpoint and trainer.checkpointer.saved_step != due.step:
        with state.window.outside_training():
            save_checkpoint(trainer, blocking=due.final)
    elif due.final:
        trainer.checkpointer.wait()
    return None


END_OF_STEP: tuple[Action, ...] = (check_finite, samples_if_due, metrics_if_due, eval_if_due, stop_if_agreed, checkpoint_if_due)
"""What happens after each step, in this order: the one place the loop's schedule is written down.
The order matters: nothing is logged or saved after a non-finite loss; the grid comes before the metric
line that reports its diversity; eval may save this step as the best; a stop saves and ends the run
before the regular checkpoint, which then only runs when this step is not saved yet."""


def run_loop(trainer: Trainer, tracker: Tracker, stop: StopSignal) -> int:
    """Train until train.steps; return an exit status (0, EXIT_REQUEUE, EXIT_TERMINATED, EXIT_INTERRUPTED or EXIT_NONFINITE)."""
    cfg, info = trainer.config, trainer.info
    batches = iter(trainer.data)
    previous_best = read_best(trainer.checkpointer.root)
    state = LoopState(
        Window(info.device), Progress(cfg.train.steps, trainer.step, enabled=info.is_main),
        best=previous_best["value"] if previous_best else math.inf,
    )
    while trainer.step < cfg.train.steps:
        waited = time.perf_counter()
        try:
            with stop.waiting(interruptible=not info.distributed):
                images = next(batches).to(info.device, non_blocking=True)
        except StoppedWhileWaiting:
            return stop_while_waiting(trainer, stop)
        waited = time.perf_counter() - waited
        stats = trainer.runner(images)
        if trainer.ema is not None:
            trainer.ema.update(trainer.g_bare)
        trainer.nonfinite_flag += stats[NONFINITE]
        state.window.add(stats, waited)
        trainer.step += 1
        trainer.images_seen += trainer.global_batch
        trainer.checkpointer.poll()
        state.progress.update(trainer.step)
        due = Due.at(trainer.step, cfg)
        for action in END_OF_STEP:
            status = action(trainer, tracker, stop, state, due)
            if status is not None:
                return status
    state.progress.close()
    if info.is_main:
        log.info("%s", finished_message(trainer))
    return EXIT_OK


def finished_message(trainer: Trainer) -> str:
    """Where a finished run's results are and what to do next, for the end of the log."""
    run = trainer.run_dir
    return (
        f"finished step {trainer.step} ({trainer.images_seen} images): samples in {run / 'samples'}, checkpoints in "
        f"{run / 'checkpoints'}, metrics in {run / 'stats.jsonl'}. Next: `dcgan sample {run} --num 64 --out grid.png`, "
        f"`dcgan eval {run} --data DATA`, `dcgan export {run} --out generator.pt`; to train further, run the same "
        "command with a larger train.steps (it resumes)"
    )


def prepare_run_dir(trainer: Trainer) -> None:
    """Create the checkpoint directory, remove half-written checkpoints (nothing is resumed yet)."""
    if trainer.info.is_main:
        (trainer.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer.checkpointer.remove_incomplete()


def resume(trainer: Trainer) -> Path | None:
    """Load the newest complete checkpoint that reads back (a damaged newer one is set aside with a
    warning); return its path, or None for a fresh run. The resolved config is written only after this
    (`save_run_config`): a refused checkpoint must leave the run directory describing the run it holds."""
    def load(path: Path) -> Path:
        trainer.load_state_dict(path)
        return path

    return read_newest(trainer.checkpointer.root, load, set_aside=trainer.checkpointer.set_aside)


def save_run_config(trainer: Trainer) -> None:
    if trainer.info.is_main:
        save_config(trainer.config, trainer.run_dir / "config.yaml")


def check_progress(trainer: Trainer) -> None:
    """Stop a requeued job that keeps resuming from the same step (see rundir.count_attempt); all ranks
    learn rank 0's decision."""
    info, attempts = trainer.info, 0
    if info.is_main and trainer.step < trainer.config.train.steps:
        attempts = count_attempt(trainer.run_dir, trainer.step)
    if any_rank(attempts > MAX_ATTEMPTS_WITHOUT_PROGRESS, info):
        refuse_without_progress(trainer.run_dir, trainer.step, max(attempts, MAX_ATTEMPTS_WITHOUT_PROGRESS + 1))


def own_run_dir(run_dir: Path, info: DistInfo) -> RunDirLock | None:
    """Rank 0 takes the run directory's lock; every rank learns whether it did (one line each if not)."""
    lock, refusal = None, None
    if info.is_main:
        try:
            lock = RunDirLock(run_dir).acquire()
        except RunDirInUse as exc:
            refusal = exc
    if any_rank(refusal is not None, info):
        raise refusal or RunDirInUse(f"run directory {run_dir} is in use by another job (see rank 0's message)")
    return lock


def train(config: Config) -> int:
    """Entry point of `dcgan train`: returns the process exit status."""
    info = init_distributed(config.train.device, config.dist.timeout_s, force=config.dist.force, liveness_s=config.dist.liveness_s)
    tracker: Tracker = Tracker()
    stop = StopSignal().install()
    trainer: Trainer | None = None
    lock: RunDirLock | None = None
    failure: BaseException | None = None
    try:
        if info.is_main:
            create_run_dir(Path(config.run.dir))
        lock = own_run_dir(Path(config.run.dir), info)
        setup_logging(Path(config.run.dir), info.rank)
        trainer = build_trainer(config, info)
        prepare_run_dir(trainer)
        resume(trainer)
        check_progress(trainer)
        save_run_config(trainer)
        log.info(
            "run %s: %d rank(s) on %s, batch %d per rank (global %d), %s precision, %d CPU thread(s) per rank, "
            "step %d -> %d", trainer.run_dir, info.world_size, info.device, config.train.batch_size,
            trainer.global_batch, trainer.step_fn.dtype, torch.get_num_threads(),
            trainer.step, config.train.steps,
        )
        log_batchnorm_mode(info, config.model.sync_bn, config.train.batch_size)
        if info.is_main and (advice := lr_advice(config.optim.lr, trainer.global_batch)):
            log.info("%s", advice)
        tracker = make_tracker(trainer.run_dir, config, trainer.run_id, info.rank, trainer.step)
        if trainer.step >= config.train.steps:
            log.info("nothing to do: the run already reached step %d", trainer.step)
            return EXIT_OK
        return run_loop(trainer, tracker, stop)
    except BaseException as exc:
        failure = exc
        explain_failure(exc)
        raise
    finally:
        if trainer is not None:
            trainer.checkpointer.close()
            trainer.data.close()
        tracker.close()
        stop.uninstall()
        if lock is not None:
            lock.release()
        destroy_distributed(failure)
