"""Everything a run holds between steps, in one object: models, optimizers, GradScaler, the weight
average, data, RNG and the step counter, saved and resumed together through DCP (the parts are named in
dcgan.run.schema). `build_trainer` assembles it from a config; `resume` loads the newest complete
checkpoint into it; `log_start` says once what the run is.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dcgan.config import Config, OptimConfig, config_to_dict
from dcgan.data.base import BatchSource
from dcgan.data.build import build_source
from dcgan.distributed.collectives import replicas_agree
from dcgan.distributed.env import DistInfo
from dcgan.distributed.parallelize import log_batchnorm_mode, sync_buffers
from dcgan.evaluation.generators import plain_copy
from dcgan.gan.cuda_graph import StepRunner, make_runner
from dcgan.gan.ema import GeneratorEMA
from dcgan.gan.models import Discriminator, Generator
from dcgan.gan.step import NONFINITE, GANStep, build_step
from dcgan.run import schema
from dcgan.run.checkpoint import Best, Checkpointer, read_newest, stored_shapes
from dcgan.run.rundir import RunDir
from dcgan.train.tracking import new_run_id

log = logging.getLogger(__name__)


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
        return self.config.global_batch(self.info.world_size)

    def train_step(self, images: torch.Tensor) -> torch.Tensor:
        """One step on a batch already on the device; return its statistics (a device tensor, not read)."""
        stats = self.runner(images)
        if self.ema is not None:
            self.ema.update(self.g_bare)
        self.nonfinite_flag += stats[NONFINITE]
        self.step += 1
        self.images_seen += self.global_batch
        self.checkpointer.poll()
        return stats

    # --- the images a run shows ------------------------------------------------------------------

    def image_generator(self) -> Generator:
        """The G that sample grids show: the average when images come from it, else the trained G."""
        if self.ema is not None and self.config.sample.ema:
            return self.ema.generator()
        return self.raw_image_generator()

    def raw_image_generator(self) -> Generator:
        """The trained G for images with sample.bn statistics: a plain copy when its BatchNorm would
        need a collective for batch or standing statistics (cross-rank BatchNorm, images made on rank 0
        alone)."""
        if self.config.sample.bn in ("batch", "standing") and self.info.distributed:
            return plain_copy(self.g_bare, self.config.model)
        return self.g_bare

    # --- state that must survive a resume --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        step_fn = self.step_fn
        return schema.training_state(
            g=get_model_state_dict(self.g_bare),
            d=get_model_state_dict(self.d_bare),
            optim_g=get_optimizer_state_dict(self.g_bare, step_fn.opt_g),
            optim_d=get_optimizer_state_dict(self.d_bare, step_fn.opt_d),
            scaler=step_fn.scaler.state_dict(),
            step=self.step,
            images_seen=self.images_seen,
            data=self.data.state_dict(),
            world_size=self.info.world_size,
            global_batch=self.global_batch,
            fixed_noise=self.fixed_noise,
            run_id=self.run_id,
            config_yaml=yaml.safe_dump(config_to_dict(self.config), sort_keys=False),
            ema=self.ema.state_dict() if self.ema is not None else None,
        )

    def load_state_dict(self, path: Path) -> None:
        """Resume from the checkpoint at `path`: dcgan.run.schema decides what must match (the model) and
        what it may lack; this applies what was read."""
        started = time.monotonic()
        stored = stored_shapes(path)
        saved_config = schema.saved_config(path, self.checkpointer.load)
        schema.check_compatible(saved_config, self.config, path)
        state = schema.trim_to_stored(self.state_dict(), stored)
        self.checkpointer.load(path, state)
        models, optims = state[schema.MODEL], state[schema.OPTIM]
        for name, model, optimizer in (("G", self.g_bare, self.step_fn.opt_g), ("D", self.d_bare, self.step_fn.opt_d)):
            set_model_state_dict(model, models[name])
            schema.keep_configured_hyperparameters(optims[name], optimizer, name)
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
        self.step_fn.start_at(self.step)
        self.checkpointer.resumed(self.step)
        log.info(
            "resumed from %s at step %d (data epoch %d, batch %d) in %.1f s",
            path,
            self.step,
            *self.data.state_dict().values(),
            time.monotonic() - started,
        )
        schema.describe_resize(saved_config, stored, progress, self.global_batch, self.info.world_size)

    def save(self, *, blocking: bool = False, best: Best | None = None) -> None:
        """Check replicas agree, then write this step's checkpoint (collective: every rank calls it)."""
        info = self.info
        sync_buffers(self.g_bare, info)
        sync_buffers(self.d_bare, info)
        differing = replicas_agree(self.g_bare, info) + replicas_agree(self.d_bare, info)
        if differing:
            raise RuntimeError(f"replicas disagree before checkpoint at step {self.step}: {', '.join(differing[:5])}")
        self.checkpointer.save(self.step, self.state_dict(), blocking=blocking, best=best)


def build_trainer(config: Config, info: DistInfo, data: BatchSource | None = None) -> Trainer:
    """Models, optimizers, data (`data`, or the config's), checkpointer for this rank; nothing is
    trained or loaded yet."""
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
        data=data or build_source(config, info),
        fixed_noise=fixed.to(info.device),
        checkpointer=Checkpointer(RunDir(run_dir).checkpoints, config.checkpoint, info),
        run_id=new_run_id(),
        nonfinite_flag=torch.zeros((), device=info.device),
        ema=GeneratorEMA(g_bare, config.model, config.train.ema) if config.train.ema > 0 else None,
    )


def resume(trainer: Trainer) -> Path | None:
    """Load the newest complete checkpoint that reads back (a damaged newer one is set aside with a
    warning); return its path, or None for a fresh run."""

    def load(path: Path) -> Path:
        trainer.load_state_dict(path)
        return path

    return read_newest(trainer.checkpointer.root, load, set_aside=trainer.checkpointer.set_aside)


def log_start(trainer: Trainer) -> None:
    """What this run is, in the first lines of its log."""
    cfg, info = trainer.config, trainer.info
    log.info(
        "run %s: %d rank(s) on %s, batch %d per rank (global %d), %s precision, %d CPU thread(s) per rank, "
        "step %d -> %d",
        trainer.run_dir,
        info.world_size,
        info.device,
        trainer.global_batch // info.world_size,
        trainer.global_batch,
        trainer.step_fn.dtype,
        torch.get_num_threads(),
        trainer.step,
        cfg.train.steps,
    )
    log_batchnorm_mode(info, cfg.model.sync_bn, trainer.global_batch)
    if info.is_main and (advice := lr_advice(cfg.optim, trainer.global_batch)):
        log.info("%s", advice)


PAPER_LR, PAPER_BATCH = 2e-4, 128
"""Radford et al.'s Adam learning rate and the (global) batch it was chosen for."""


def lr_advice(optim: OptimConfig, global_batch: int) -> str | None:
    """docs/distributed.md's one rule, at the start of every run whose global batch is not the paper's: for a
    k-fold global batch start from lr x sqrt(k). Advice, not a change: the paper's per-GPU batch at the
    paper's lr is also a sound (slower) choice, and the user's lr stands. With per-network lrs (TTUR:
    optim.lr_g / optim.lr_d) the rule scales both by the same factor, which keeps their ratio."""
    if global_batch == PAPER_BATCH:
        return None
    factor = math.sqrt(global_batch / PAPER_BATCH)
    if optim.per_network_lr:
        (lr_g, _), (lr_d, _) = optim.adam("G"), optim.adam("D")
        return (
            f"global batch {global_batch}: optim.lr_g {lr_g:.3g}, optim.lr_d {lr_d:.3g}; the sqrt rule scales lrs "
            f"chosen at the paper's batch {PAPER_BATCH} by {factor:.2g}: if these were, it suggests "
            f"{lr_g * factor:.2g} and {lr_d * factor:.2g} (docs/distributed.md)"
        )
    suggested = PAPER_LR * factor
    return (
        f"global batch {global_batch}: optim.lr {optim.lr:.3g}; the sqrt rule from the paper's {PAPER_LR:.0e} at {PAPER_BATCH} "
        f"suggests {suggested:.2g} (docs/distributed.md)"
    )
