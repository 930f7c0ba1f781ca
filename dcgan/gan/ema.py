"""An exponential moving average of the generator's weights (train.ema), and coherent BatchNorm statistics
for any generator whose weights did not produce its stored running statistics.

Why not `torch.optim.swa_utils.AveragedModel`: its update reads a device counter back to the host twice
(`bool(self.n_averaged == 0)`, `if self.n_averaged > 0`), one stall per step on a GPU; here the step
count lives on the host and the update is one fused `_foreach_lerp_` with no read-back.

BatchNorm: the averaged weights never ran in training, so the raw G's running statistics do not belong
to them. The average therefore holds parameters only; before it makes images with running statistics,
those are re-estimated from its own outputs on a fixed, seeded set of latent batches
(`torch.optim.swa_utils.update_bn`), which makes them a deterministic function of the weights: a
resumed run, an exported file and a sample grid all see the same statistics for the same weights.

Spectral normalization on G (model.spectral_norm=both): the average keeps G's power-iteration vectors,
copied at every update (its weights follow G's, so G's estimate of their largest singular value is the
one that fits them best at no cost); a resumed run, which loads G's, and a generator read from a
checkpoint therefore see the same vectors. Re-estimating BatchNorm statistics leaves them as they were.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from dcgan.config import ModelConfig
from dcgan.gan.models import Generator, spectral_norm_vectors, spectral_norm_vectors_kept

WARMUP_UPDATES = 10
"""The decay ramps as (1 + n) / (WARMUP_UPDATES + n) until it reaches train.ema, so that the average
forgets the random initialization within the first few hundred steps instead of ~1/(1 - decay) x 5."""

STATISTICS_BATCHES, STATISTICS_BATCH, STATISTICS_SEED = 8, 128, 20151119
"""Latent batches that re-estimate BatchNorm running statistics (1024 images; the seed is the paper's
arXiv date): fixed, so that the statistics are a function of the weights alone."""


def decay_at(decay: float, updates: int) -> float:
    """The decay of update number `updates` (0-based), warmup included."""
    return min(decay, (1 + updates) / (WARMUP_UPDATES + updates))


@torch.no_grad()
def refresh_batchnorm_statistics(generator: nn.Module, nz: int) -> None:
    """Replace G's BatchNorm running statistics by those of its own outputs on the fixed latent batches
    (a cumulative average over STATISTICS_BATCHES x STATISTICS_BATCH images, in train mode)."""
    device = next(generator.parameters()).device
    noise = torch.randn(
        STATISTICS_BATCHES, STATISTICS_BATCH, nz, generator=torch.Generator().manual_seed(STATISTICS_SEED)
    )
    with spectral_norm_vectors_kept(generator):
        update_bn(list(noise), generator, device=device)


class GeneratorEMA:
    """The averaged generator: a plain `Generator` (plain BatchNorm, whatever the training G uses) on the
    training device whose parameters follow G's after every step."""

    def __init__(self, source: nn.Module, model: ModelConfig, decay: float) -> None:
        self.model, self.decay = model, decay
        device = next(source.parameters()).device
        self.module = Generator(model).to(device).requires_grad_(False).eval()
        self.module.load_state_dict(source.state_dict())
        self.updates = 0
        self._targets: list[torch.Tensor] = [p.detach() for p in self.module.parameters()]
        self._vectors = spectral_norm_vectors(self.module)
        self._source_vectors = spectral_norm_vectors(source)
        """The training G's power-iteration vectors (loaded in place on resume): the average uses G's."""
        self._statistics_fresh = False

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """One step of the average towards `source`'s current parameters (no host read-back)."""
        weight = 1.0 - decay_at(self.decay, self.updates)
        torch._foreach_lerp_(self._targets, [p.detach() for p in source.parameters()], weight)
        if self._vectors:
            torch._foreach_copy_(self._vectors, spectral_norm_vectors(source))
        self.updates += 1
        self._statistics_fresh = False

    def generator(self) -> Generator:
        """The averaged G with BatchNorm statistics of its current weights (re-estimated when stale)."""
        if not self._statistics_fresh:
            refresh_batchnorm_statistics(self.module, self.model.nz)
            self._statistics_fresh = True
        return self.module

    def state_dict(self) -> dict[str, object]:
        """Parameters and the update count: what a resume needs (statistics are re-estimated)."""
        return {
            "params": {name: p for name, p in self.module.named_parameters()},
            "updates": torch.tensor(self.updates),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        params = state["params"]
        assert isinstance(params, dict)
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(params[name])
            if self._vectors:  # not in the state: G's, which a resume loads before the average
                torch._foreach_copy_(self._vectors, self._source_vectors)
        updates = state["updates"]
        assert isinstance(updates, torch.Tensor)
        self.updates = int(updates)
        self._statistics_fresh = False
