"""Typed run configuration: one frozen dataclass per concern, loaded from YAML plus dotted overrides.

Every key is declared here (those of `optim` and `loss` in objective.py) with its type, default and a
one-line help text (shown by `dcgan train --help`). Loading fails before any work starts, with a single line that names the key and
what is allowed, so that a typo in a 500-GPU job costs seconds rather than a queue wait.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dcgan.config.objective import LossConfig, OptimConfig
from dcgan.config.vocabulary import (
    EVAL_METRICS,
    LOWER_IS_BETTER,
    BnStats,
    ConfigError,
    DNorm,
    SpectralNorm,
    divisors,
    is_power_of_two,
    metric_keys,
    require,
)
from dcgan.config.vocabulary import key_field as _field


@dataclass(frozen=True)
class RunConfig:
    dir: str = _field("runs/dcgan", "run directory: config, log, stats.jsonl, samples/, checkpoints/")

    def check(self) -> None:
        require(self.dir != "", "run.dir", "a directory path", self.dir)


@dataclass(frozen=True)
class ModelConfig:
    resolution: int = _field(64, "image side in pixels, a power of two >= 16")
    nz: int = _field(100, "length of the latent vector z")
    ngf: int = _field(64, "generator width (channels of its last hidden layer)")
    ndf: int = _field(64, "discriminator width (channels of its first layer)")
    channels: int = _field(3, "image channels: 1 (grey) or 3 (RGB)")
    sync_bn: bool = _field(
        True, "with several ranks, BatchNorm statistics over the global batch (false: each rank's own batch)"
    )
    spectral_norm: SpectralNorm = _field(
        "none",
        "spectral normalization of the conv layers (Miyato et al. 2018; one power iteration per forward): "
        "none (the paper), d = D's, both = D's and G's",
    )
    d_norm: DNorm = _field(
        "batch",
        "normalization of D's inner layers: batch = the paper's BatchNorm (cross-rank with model.sync_bn); none = "
        "no normalization, the convs with biases instead (SN-GAN's D, to pair with model.spectral_norm=d)",
    )

    def check(self) -> None:
        """One line naming the key of a value that type-checks but cannot work (as every section's check)."""
        require(
            is_power_of_two(self.resolution) and self.resolution >= 16,
            "model.resolution",
            "a power of two >= 16",
            self.resolution,
        )
        require(self.channels in (1, 3), "model.channels", "1 or 3", self.channels)
        for key in ("nz", "ngf", "ndf"):
            require(getattr(self, key) >= 1, f"model.{key}", ">= 1", getattr(self, key))


@dataclass(frozen=True)
class DataConfig:
    shards: str = _field(
        "", "shard directory with manifest.json (or its http(s) URL), brace pattern or URL; empty = built-in digits"
    )
    holdout: str = _field(
        "",
        "shards of real images D never trains on (`dcgan shards ... --holdout N` writes OUT_DIR/holdout): each metric "
        "line then shows how far D scores them from training images, towards fakes (D_overfit, ADA's r_v: 0 = "
        "none, 1 = memorised), the sign that a small data set needs loss.augment; empty = not measured",
    )
    workers: int = _field(2, "DataLoader worker processes per rank (0 = load in the training process)")
    shuffle_buffer: int = _field(1000, "samples held in each partition's shuffle buffer")
    resampled: bool = _field(
        True,
        "an endless stream: after each epoch's deal of the shuffled shards, deal them again (equal batches on "
        "every rank, any shard count); false = one deal per epoch, every image at most once",
    )
    epoch_samples: int = _field(0, "images per epoch, all ranks together; 0 = the data set size")
    partitions: int = _field(
        0,
        "independent seeded streams the shards are read in, fixed when a run starts and kept in its checkpoints: "
        "each gives global_batch / partitions images a step, a rank reads only its partitions, so the data order "
        "does not depend on the number of ranks or workers; 0 = ranks x workers at the run's start (as many as "
        "divide the global batch); set it to give fresh runs on other hardware the same data order",
    )
    prefetch: int = _field(4, "steps each worker prepares ahead (the rank's ring holds prefetch + 3 batches)")
    retries: int = _field(
        6,
        "http(s) shards: reconnections after a dropped connection, a silent or restarting server, before the run "
        "stops; 0.5 s apart, doubling (6 = about 30 s of outage); the shard resumes at the byte where it broke",
    )
    timeout_s: float = _field(
        30.0,
        "http(s) shards: seconds a server may stay silent (connecting, or mid-shard) before the read counts as "
        "dropped; an unreachable server at the start is refused after this long",
    )

    def check(self) -> None:
        require(self.partitions >= 0, "data.partitions", ">= 0 (0 = chosen when the run starts)", self.partitions)
        require(self.workers >= 0, "data.workers", ">= 0", self.workers)
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1", self.shuffle_buffer)
        require(
            self.epoch_samples >= 0, "data.epoch_samples", ">= 0 (0 = derive from the data set)", self.epoch_samples
        )
        require(self.prefetch >= 1, "data.prefetch", ">= 1", self.prefetch)
        require(self.retries >= 0, "data.retries", ">= 0", self.retries)
        require(self.timeout_s > 0, "data.timeout_s", "> 0", self.timeout_s)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _field(10000, "training iterations (one D and one G update each)")
    batch_size: int = _field(
        128, "images per process per step when train.global_batch=0 (the global batch is this x ranks)"
    )
    global_batch: int = _field(
        0,
        "images per step over all ranks, whatever their number: each rank trains on global_batch / ranks, and a "
        "rank count that does not divide it is refused; 0 = train.batch_size per process",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _field(
        "auto", "autocast precision; auto = bf16 on GPUs that support it, fp32 on CPU"
    )
    compile: bool = _field(False, "torch.compile the bare G and D before DDP wraps them")
    channels_last: bool = _field(True, "channels-last memory format on CUDA (ignored on CPU)")
    cuda_graph: bool = _field(
        False,
        "replay the whole step as a CUDA graph after 3 eager steps (CUDA; bf16/fp32, nonfinite=stop; with several "
        "ranks the step all-reduces its gradients itself, one flat all-reduce per model, instead of DDP)",
    )
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "auto = cuda when available, else cpu")
    nonfinite: Literal["stop", "skip"] = _field(
        "stop", "on a non-finite loss: stop the run (last good checkpoint kept) or skip the update"
    )
    ema: float = _field(
        0.0,
        "decay of an exponential moving average of G's weights, kept in checkpoints (0 = off; e.g. 0.999): "
        "grids, sample, export and eval use it (sample.ema=false: the raw G); eval logs both",
    )

    def check(self) -> None:
        require(self.steps >= 1, "train.steps", ">= 1", self.steps)
        require(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        require(
            self.global_batch >= 0, "train.global_batch", ">= 0 (0 = train.batch_size per process)", self.global_batch
        )
        if self.cuda_graph:
            require(
                self.device != "cpu",
                "train.cuda_graph",
                "false with train.device=cpu (CUDA graphs need CUDA)",
                self.cuda_graph,
            )
            require(
                self.precision != "fp16" and self.nonfinite == "stop",
                "train.cuda_graph",
                "false with train.precision=fp16 or train.nonfinite=skip (their GradScaler is not captured)",
                self.cuda_graph,
            )
        require(0 <= self.ema < 1, "train.ema", "in [0, 1) (0 = off)", self.ema)


@dataclass(frozen=True)
class LogConfig:
    every: int = _field(50, "steps between metric lines in stats.jsonl / wandb")
    wandb: Literal["offline", "online", "disabled"] = _field(
        "offline", "wandb mode; offline writes run_dir/wandb (upload later with `wandb sync`)"
    )
    project: str = _field("dcgan", "wandb project")
    entity: str = _field("", "wandb entity (team or user); empty = your default")
    name: str = _field("", "wandb run name; empty = the run directory's name")
    group: str = _field("", "wandb group")
    tags: tuple[str, ...] = _field((), "wandb tags (YAML list or comma-separated)")
    histogram_every: int = _field(0, "steps between histograms of D's outputs (0 = with every sample grid)")
    straggler: float = _field(
        0.5,
        "warn when one rank's own time per step (step time less its wait in collectives) stays this much "
        "above the other ranks' median (0.5 = 50% slower) for log.straggler_windows metric lines; 0 = no "
        "warning (the slowest rank is still logged with every metric line)",
    )
    straggler_windows: int = _field(3, "metric lines in a row a rank must lag before the straggler warning")

    def check(self) -> None:
        require(self.every >= 1, "log.every", ">= 1", self.every)
        require(self.histogram_every >= 0, "log.histogram_every", ">= 0", self.histogram_every)
        require(self.straggler >= 0, "log.straggler", ">= 0 (0 = off)", self.straggler)
        require(self.straggler_windows >= 1, "log.straggler_windows", ">= 1", self.straggler_windows)


@dataclass(frozen=True)
class SampleConfig:
    every: int = _field(500, "steps between fixed-noise sample grids")
    num: int = _field(64, "images in each sample grid")
    bn: BnStats = _field(
        "standing",
        "G's BatchNorm statistics when making images (grids, sample, eval): standing = re-estimated from G's "
        "own outputs on fixed latents (1,024 images) just before, as the average of G always is, so they "
        "cannot lag the weights; running = the averages kept in training (eval mode); batch = each "
        "generated batch's own (train mode)",
    )
    ema: bool = _field(True, "with train.ema > 0, images come from the averaged G (false: from the raw G)")

    def check(self) -> None:
        require(self.every >= 1, "sample.every", ">= 1", self.every)
        require(self.num >= 1, "sample.num", ">= 1", self.num)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _field(1000, "steps between checkpoints (a final one is always written)")
    keep: int = _field(3, "complete checkpoints kept (oldest removed first)")
    keep_every: int = _field(0, "also keep every checkpoint whose step is a multiple of this (0 = none)")
    async_save: bool = _field(True, "write checkpoints in the background while training continues")

    def check(self) -> None:
        require(self.every >= 1, "checkpoint.every", ">= 1", self.every)
        require(self.keep >= 1, "checkpoint.keep", ">= 1", self.keep)
        require(self.keep_every >= 0, "checkpoint.keep_every", ">= 0", self.keep_every)


@dataclass(frozen=True)
class EvalConfig:
    every: int = _field(0, "steps between evaluations during training (0 = never); see `dcgan eval`")
    metrics: tuple[str, ...] = _field(("swd",), "metrics computed during training: fid, kid, swd, digits")
    num: int = _field(2000, "generated (and real) images per evaluation")
    data: str = _field("", "real images to compare with (shard directory or 'digits'); empty = data.shards, or digits")
    inception: str = _field("", "TorchScript Inception for fid/kid (empty = env DCGAN_INCEPTION)")
    best: str = _field(
        "",
        "keep the checkpoint with the lowest value of this result of eval.metrics (fid, kid, swd or digits_frechet) until a better one",
    )

    def check(self) -> None:
        require(self.every >= 0, "eval.every", ">= 0 (0 = never)", self.every)
        require(
            bool(self.metrics) and set(self.metrics) <= set(EVAL_METRICS),
            "eval.metrics",
            f"a non-empty list from {', '.join(EVAL_METRICS)}",
            list(self.metrics),
        )
        require(self.num >= 2, "eval.num", ">= 2", self.num)
        eligible = [key for key in metric_keys(self.metrics) if key in LOWER_IS_BETTER]
        require(
            self.best == "" or self.best in eligible,
            "eval.best",
            f"empty or one of {', '.join(eligible)} (what eval.metrics produces; lower is better)",
            self.best,
        )


@dataclass(frozen=True)
class DistConfig:
    timeout_s: int = _field(
        600, "seconds a collective may wait for a slow rank (a long save, a first compile) before the job fails"
    )
    liveness_s: float = _field(
        15.0,
        "seconds without a heartbeat before a rank or host counts as lost and every rank stops in one line "
        "(5 s more for a rank that never starts); 0 turns the check off",
    )
    hang_after: float = _field(
        10.0,
        "when no step completes for this many times the median step time (and at least dist.hang_min_s), every "
        "rank writes its stacks to run.dir/hang-<rank>.txt and rank 0 names the ranks that did not reach the "
        "step; 0 = off",
    )
    hang_min_s: float = _field(60.0, "seconds without a step that never count as a hang, however fast the steps")
    force: bool = _field(
        False, "run the multi-rank code path (process group, DDP, cross-rank BatchNorm) even as one process"
    )

    def check(self) -> None:
        require(self.timeout_s >= 1, "dist.timeout_s", ">= 1", self.timeout_s)
        require(
            self.liveness_s == 0 or 3 <= self.liveness_s <= self.timeout_s,
            "dist.liveness_s",
            "0 (off) or between 3 (three heartbeats) and dist.timeout_s",
            self.liveness_s,
        )
        require(self.hang_after >= 0, "dist.hang_after", ">= 0 (0 = off)", self.hang_after)
        require(self.hang_min_s > 0, "dist.hang_min_s", "> 0", self.hang_min_s)


@dataclass(frozen=True)
class Config:
    seed: int = _field(0, "seed of weights, noise and data order")
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def uses_builtin_digits(self) -> bool:
        return self.data.shards == ""

    def global_batch(self, world_size: int) -> int:
        """Images one step trains on over `world_size` ranks."""
        return self.train.global_batch or self.train.batch_size * world_size

    def batch_per_rank(self, world_size: int) -> int:
        """Images each of `world_size` ranks trains on per step; refused in one line (before any work)
        where a fixed train.global_batch cannot be split evenly."""
        total = self.train.global_batch
        if not total:
            return self.train.batch_size
        if total % world_size:
            fitting = [str(n) for n in divisors(total)]
            raise ConfigError(
                f"train.global_batch: {total} images cannot be split over {world_size} ranks: run on a number of "
                f"ranks that divides it ({', '.join(fitting[:12])}{', ...' if len(fitting) > 12 else ''}) or change "
                "train.global_batch"
            )
        return total // world_size

    @property
    def images_from_average(self) -> bool:
        """Whether grids, samples, exports and eval.best use the averaged G (train.ema > 0 and
        sample.ema) rather than the trained one."""
        return self.train.ema > 0 and self.sample.ema


# ----------------------------------------------------------------------------------------------------
# Building a Config from plain data, with one-line errors


SHAPE_FREE_MODEL_KEYS = ("sync_bn",)
"""Model settings that change how statistics are computed, not the parameters a checkpoint holds."""


def architecture(model: ModelConfig) -> dict[str, Any]:
    """The model settings that decide parameter shapes: what a checkpoint must match to be resumed."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in SHAPE_FREE_MODEL_KEYS}


# ----------------------------------------------------------------------------------------------------
# Validation of values that type-check but cannot work


def validate(config: Config) -> None:
    """Reject impossible values with one line naming the key; called by every loader of configs. Each
    section checks its own values (its `check`); the rules that span sections are here."""
    for section in (
        config.run,
        config.model,
        config.data,
        config.train,
        config.optim,
        config.loss,
        config.log,
        config.sample,
        config.checkpoint,
        config.eval,
        config.dist,
    ):
        section.check()
    m = config.model
    require(0 <= config.seed < 2**32, "seed", "an integer in [0, 2^32)", config.seed)
    require(
        not (config.train.cuda_graph and config.loss.r1 > 0),
        "loss.r1",
        "0 with train.cuda_graph (a graph replays one kind of step; R1 adds a second every loss.r1_every steps)",
        config.loss.r1,
    )
    if config.uses_builtin_digits:
        require(m.channels == 1, "model.channels", "1 for the built-in digits (data.shards is empty)", m.channels)
    require(
        not ("digits" in config.eval.metrics and m.channels != 1),
        "eval.metrics",
        "without digits for a 3-channel model",
        list(config.eval.metrics),
    )
