"""The numbers of one metric window (every log.every steps): losses and D's outputs averaged over the
window's steps, GAN health signs (a collapsing G, a winning D), the time spent outside training, and the
step, data and collective time each rank spent, which the straggler report reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dcgan.config import LossKind
from dcgan.distributed.collectives import COLLECTIVE_CLOCK, all_mean
from dcgan.distributed.env import DistInfo
from dcgan.distributed.stragglers import RankTimes
from dcgan.gan.step import STAT_NAMES

log = logging.getLogger(__name__)


class GanHealth:
    """Warns (once each) when training looks broken, from numbers the loop already has.

    - D wins completely: D(G(z)) below `d_wins_below` for `patience` metric windows in a row (with the
      paper's BCE only: there G's gradient vanishes with D(G(z)); the hinge and least-squares losses give G
      a gradient however sure D is, and a hinge D scores fakes at 0 on the probability scale as a matter
      of course);
    - generator collapse: the diversity of the fixed-noise samples (mean per-pixel standard deviation
      across the batch) falls below `collapse_ratio` times the highest diversity seen in this run.
    """

    def __init__(
        self, patience: int = 5, d_wins_below: float = 0.01, collapse_ratio: float = 0.25, loss: LossKind = "bce"
    ) -> None:
        self.patience = patience
        self.loss = loss
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
        if self.loss != "bce":
            return
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
        on a GPU, whose collectives the host clock cannot see: dcgan.distributed.stragglers estimates it there)."""
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
