"""One DCGAN training iteration: a D update, then a G update, as a short list of phases.

The step never reads a value back to the host: its statistics come back as one device tensor that the
loop accumulates and reads every `log.every` steps, so that GPU work is queued without stalls. The
body (`train`) takes its noise as an argument and has static shapes, so that dcgan.gan.cuda_graph can capture
it whole in a CUDA graph; `__call__` draws the noise and runs it eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import get_total_norm

from dcgan.config import Config, LossKind
from dcgan.config.vocabulary import augment_policy
from dcgan.distributed.env import DistInfo
from dcgan.distributed.parallelize import (
    Bare,
    GradientSync,
    average_gradients,
    eager_forward,
    gradient_sync,
    prepare_module,
)
from dcgan.gan.augment import PASSES, Pass, augment, augment_draws
from dcgan.gan.losses import discriminator_loss, generator_loss, realness
from dcgan.gan.models import Discriminator, Generator
from dcgan.pixels import from_uint8
from dcgan.seeds import StepDraws

STAT_NAMES = (
    "loss_D",
    "loss_G",
    "D_x",
    "D_G_z_before",
    "D_G_z_after",
    "grad_norm_G",
    "grad_norm_D",
    "r1_penalty",
    "nonfinite",
)
"""Names of the values in the vector a step returns, in order (one device tensor, summed over steps by
the loop and read once per metric line); index it by name with STAT_INDEX. D_x and D_G_z are means of
D's outputs read as how sure D is that an image is real, on the same scale for every loss.kind
(dcgan.gan.losses.realness). r1_penalty: the mean squared norm of D's gradient on reals, times
loss.r1_every on the steps that measure it and 0 on the others, so that a window's mean estimates it
(0 without loss.r1)."""

STAT_INDEX = {name: index for index, name in enumerate(STAT_NAMES)}
NONFINITE = STAT_INDEX["nonfinite"]
"""Where the step's non-finite-loss flag sits in its statistics vector."""


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: 'auto' means bf16 on GPUs that support it, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def total_grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm of all gradients: one fused multi-tensor kernel on CUDA rather than one per parameter,
    which counts in a launch-bound step."""
    return get_total_norm([p.grad for p in module.parameters() if p.grad is not None])


NOISE_STREAM = 0x4E015E
"""Tags the latent-noise seeds apart from the data order's, which mix the same run seed."""


def latent_noise(
    seed: int, nz: int, global_batch: int, rank: int, world_size: int, device: torch.device, at: int = 0
) -> StepDraws:
    """The latent batch of each step, (batch per rank, nz) standard normal, the same for any number of ranks
    and at resume (dcgan.seeds.StepDraws). Drawing the global batch on every rank costs global_batch x nz
    numbers per step (51,200 at a global batch of 512, z of 100)."""
    return StepDraws(seed, NOISE_STREAM, (global_batch, nz), 0, True, rank, world_size, device, at)


@dataclass
class GANStep:
    """Holds what an iteration touches. `g`/`d` may be DDP wrappers; `d_bare` is D without DDP."""

    g: nn.Module
    d: nn.Module
    d_bare: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype
    noise: StepDraws
    loss: LossKind = "bce"
    """loss.kind: the paper's BCE, hinge or least squares (dcgan.gan.losses)."""
    augment: tuple[str, ...] = ()
    """loss.augment's policies, applied to every batch D sees (dcgan.gan.augment); () for the paper."""
    augment_draws: StepDraws | None = None
    """The per-step uniforms of the augmentation, where `augment` is not empty."""
    r1: float = 0.0
    """loss.r1's gamma: 0 = no penalty (the paper)."""
    r1_every: int = 16
    """loss.r1_every: the penalty's steps are those divisible by it, scaled by it (lazy regularization)."""
    channels_last: bool = False
    autocast_cache: bool = True
    """Off under CUDA-graph capture: autocast's cast cache must not outlive the captured region."""
    average_gradients: Callable[[nn.Module], None] | None = None
    """Averages a model's gradients over ranks after its backward pass, where `g`/`d` are bare modules
    (train.cuda_graph with several ranks); None where DDP does it, or for one process."""
    last_logits: tuple[torch.Tensor, torch.Tensor] | None = None
    """D's logits on the last real and fake batch (device tensors, for occasional histograms)."""

    def _autocast(self, device: torch.device) -> torch.autocast:
        enabled = self.dtype != torch.float32
        return torch.autocast(device.type, dtype=self.dtype, enabled=enabled, cache_enabled=self.autocast_cache)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Train on one batch of uint8 images already on the device; return the stats vector."""
        penalize = self.r1_due(self.noise.at)
        return self.train(images, self.noise.draw(), self.draw_augmentation(), penalize=penalize)

    def r1_due(self, step: int) -> bool:
        """Whether step `step` adds the R1 penalty: a function of the step alone, so every rank and a resume agree."""
        return self.r1 > 0 and step % self.r1_every == 0

    def lazy_r1(self, real_seen: torch.Tensor) -> torch.Tensor:
        """The R1 penalty of a penalized step, scaled by r1_every: measured every r1_every steps only, it
        then weighs what every step would have added (stylegan2's lazy regularization). The metric line's
        loss_D stays the GAN loss alone."""
        return self.r1_penalty(real_seen) * self.r1_every

    def r1_penalty(self, real_seen: torch.Tensor) -> torch.Tensor:
        """Mean over this rank's reals of |grad_x D(x)|^2, differentiable (for D's backward).

        In fp32 outside autocast (a squared gradient underflows in half precision) and through D's eager
        forward: torch.compile cannot differentiate a gradient (AOTAutograd has no double backward). Each
        rank differentiates its own outputs, and cross-rank BatchNorm's backward sums over ranks: the
        gradient is that of the global batch's outputs, as on one process, so world sizes agree. The extra
        forward moves D's BatchNorm running statistics once more (D trains in batch-statistics mode, so
        they never change a step) and, with spectral normalization, its power iteration.
        """
        x = real_seen.detach().float().requires_grad_(True)
        with torch.autocast(x.device.type, enabled=False):
            logits = eager_forward(self.d_bare, x)
            (gradient,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
        return gradient.square().sum(dim=(1, 2, 3)).mean()

    def start_at(self, step: int) -> None:
        """Resume the step's random streams (noise, augmentation) at `step`: each is a function of the step."""
        self.noise.at = step
        if self.augment_draws is not None:
            self.augment_draws.at = step

    def draw_augmentation(self) -> torch.Tensor | None:
        """This step's augmentation uniforms (PASSES x batch x UNIFORMS), or None without augmentation."""
        return None if self.augment_draws is None else self.augment_draws.draw()

    def seen_by_d(self, images: torch.Tensor, uniforms: torch.Tensor | None, seen: Pass) -> torch.Tensor:
        """`images` as D sees them in pass `seen` (one of dcgan.gan.augment.PASSES): augmented, or as they are."""
        if uniforms is None:
            return images
        seen_images = augment(images, uniforms[PASSES.index(seen)], self.augment)
        # the gathers of a translation return NCHW: give D the layout it was built for again
        return seen_images.contiguous(memory_format=torch.channels_last) if self.channels_last else seen_images

    def train(
        self, images: torch.Tensor, z: torch.Tensor, uniforms: torch.Tensor | None = None, *, penalize: bool = False
    ) -> torch.Tensor:
        """The step's body: only device work, no host reads, shapes fixed by the inputs' shapes.
        `uniforms`: the step's augmentation draws (None: D sees the batches as they are); `penalize`: add
        the R1 penalty this step (a step of its own kind: CUDA graphs capture only the other)."""
        device = images.device
        real = from_uint8(images, self.dtype)
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)

        # Phase 1: D on a real batch and on a fake batch, two forwards (separate batch statistics).
        self.opt_d.zero_grad(set_to_none=True)
        with self._autocast(device):
            fake = self.g(z)
            real_seen = self.seen_by_d(real, uniforms, "real")
            real_logits = self.d(real_seen)
            fake_logits = self.d(self.seen_by_d(fake.detach(), uniforms, "fake_for_d"))
            loss_d = discriminator_loss(real_logits, fake_logits, self.loss)
        r1_penalty = self.lazy_r1(real_seen) if penalize else loss_d.new_zeros(())
        self.scaler.scale(loss_d + 0.5 * self.r1 * r1_penalty).backward()
        if self.average_gradients is not None:
            self.average_gradients(self.d_bare)
        self.scaler.unscale_(self.opt_d)
        grad_norm_d = total_grad_norm(self.d_bare)
        self.scaler.step(self.opt_d)

        # Phase 2: G against the updated D, D frozen (no weight gradients, no DDP all-reduce for D).
        self.d_bare.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast(device):
            fake_logits_after = self.d_bare(self.seen_by_d(fake, uniforms, "fake_for_g"))
            loss_g = generator_loss(fake_logits_after, self.loss)
        self.scaler.scale(loss_g).backward()
        self.d_bare.requires_grad_(True)
        if self.average_gradients is not None:
            self.average_gradients(self.g)
        self.scaler.unscale_(self.opt_g)
        grad_norm_g = total_grad_norm(self.g)
        self.scaler.step(self.opt_g)
        self.scaler.update()

        self.last_logits = (real_logits.detach(), fake_logits.detach())
        losses = torch.stack([loss_d.detach(), loss_g.detach(), r1_penalty.detach()])
        return torch.stack(
            [
                losses[0],
                losses[1],
                realness(real_logits.detach(), self.loss).mean(),
                realness(fake_logits.detach(), self.loss).mean(),
                realness(fake_logits_after.detach(), self.loss).mean(),
                grad_norm_g,
                grad_norm_d,
                losses[2],
                (~torch.isfinite(losses)).any().float(),
            ]
        )


# --- building a step from a config ---------------------------------------------------------------


def make_scaler(dtype: torch.dtype, nonfinite: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 needs loss scaling. With train.nonfinite=skip the scaler (at scale 1 for other dtypes) is
    what skips an update whose gradients are not finite; otherwise it is disabled (a no-op)."""
    if dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    if nonfinite == "skip":
        return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)
    return torch.amp.GradScaler(device.type, enabled=False)


def build_step(
    config: Config, info: DistInfo, *, sync: GradientSync | None = None
) -> tuple[Generator, Discriminator, GANStep]:
    """Models (wrapped for this rank), optimizers and the GAN step: everything but data and I/O, which
    is what training and `dcgan bench step` share. `sync` overrides how gradients are averaged
    (default: what the config's step mode needs)."""
    torch.manual_seed(config.seed)
    device = info.device
    t = config.train
    sync = sync or gradient_sync(config, info)

    def wrap(module: Bare) -> tuple[nn.Module, Bare]:
        return prepare_module(
            module,
            info,
            compile=t.compile,
            channels_last=t.channels_last,
            sync_bn=config.model.sync_bn,
            gradient_sync=sync,
        )

    g, g_bare = wrap(Generator(config.model))
    d, d_bare = wrap(Discriminator(config.model))
    # capturable: Adam keeps its step count on the device, which a CUDA-graph replay requires.
    adam: dict[str, Any] = {"fused": device.type == "cuda", "capturable": t.cuda_graph}
    lr_g, betas_g = config.optim.adam("G")
    lr_d, betas_d = config.optim.adam("D")
    opt_g = torch.optim.Adam(g_bare.parameters(), lr=lr_g, betas=betas_g, **adam)
    opt_d = torch.optim.Adam(d_bare.parameters(), lr=lr_d, betas=betas_d, **adam)
    dtype = resolve_precision(t.precision, device)
    policy = augment_policy(config.loss.augment)
    step_fn = GANStep(
        g=g,
        d=d,
        d_bare=d_bare,
        opt_g=opt_g,
        opt_d=opt_d,
        scaler=make_scaler(dtype, t.nonfinite, device),
        dtype=dtype,
        noise=latent_noise(
            config.seed, config.model.nz, config.global_batch(info.world_size), info.rank, info.world_size, device
        ),
        loss=config.loss.kind,
        augment=policy,
        augment_draws=(
            augment_draws(config.seed, config.global_batch(info.world_size), info.rank, info.world_size, device)
            if policy
            else None
        ),
        r1=config.loss.r1,
        r1_every=config.loss.r1_every,
        channels_last=t.channels_last and device.type == "cuda",
        average_gradients=partial(average_gradients, info=info) if sync == "explicit" else None,
    )
    return g_bare, d_bare, step_fn
