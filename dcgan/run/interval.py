"""How often to checkpoint: the interval that loses the least work, from what a save costs and how often
the job fails.

Every save costs the time it blocks training; every failure costs the work since the last checkpoint plus
the restart. Saving every T seconds of training, with a save blocking training for S seconds and a job
that fails every M seconds on average, loses about S/T of the time to saves and (T/2 + R)/M to failures
(R: the restart). Young (1974) found the first-order minimum at T = sqrt(2 S M); Daly (2006, "A
higher order estimate of the optimum checkpoint interval for restart dumps") corrected it for saves that
are not small against M. Near the optimum the loss is flat: saving k times too often or too rarely loses
(k + 1/k)/2 times the least, 1.25x at k = 2, which is why the advice only speaks up beyond that.

A job's M comes from a published mean time to failure of a job of another size, read as a per-GPU rate
(failures of any one of G GPUs stop the whole synchronous job, so M scales as 1/G). The figures and their
sources are in docs/performance.md ("Checkpoints: what a save costs and how often to save").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOUR_S = 3600.0


@dataclass(frozen=True)
class FailureRate:
    """A published mean time to failure of jobs of `gpus` GPUs, taken as one failure per
    `hours * gpus` GPU-hours so that it can be scaled to a job of any size."""

    hours: float
    gpus: int
    source: str

    def mtbf_s(self, gpus: int) -> float:
        """The mean time between failures of a synchronous job of `gpus` GPUs, in seconds."""
        if gpus < 1:
            raise ValueError(f"a job has at least one GPU, got {gpus}")
        return self.hours * HOUR_S * self.gpus / gpus


META_1024 = FailureRate(7.9, 1024, "Kokolis et al. 2024, Meta's research clusters")
"""Mean time to failure of 1,024-GPU jobs on Meta's research clusters: 8,090 GPU-hours per failure, the
highest per-GPU rate of the published figures, so the advice errs towards saving often."""

META_16384 = FailureRate(1.8, 16384, "Kokolis et al. 2024, Meta's research clusters")
"""The same paper's figure at 16,384 GPUs: 29,491 GPU-hours per failure (a lower rate per GPU)."""

ASYNC_STAGING_BYTES_PER_S = 2.0e9
"""What an async save blocks training for: DCP's staging copy of the whole state, per rank, measured at
~2 GB/s on a 2-core CPU host (benchmarks/checkpoint_cost.py, one rank). A GPU's copy to host memory is
usually faster: an estimate from it errs long, which the flat optimum forgives."""

SYNC_WRITE_BYTES_PER_S = 0.35e9
"""What a blocking save (checkpoint.async_save=false) waits for: the write to disk, ~0.35 GB/s for a
1.1 GB checkpoint from one rank on the same host."""


def young_interval_s(save_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum: seconds of training between saves, sqrt(2 x save x MTBF)."""
    return math.sqrt(2 * save_s * mtbf_s)


def daly_interval_s(save_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum (seconds of training between saves): Young's with a correction that
    matters once a save is no longer small against the MTBF; at a save of 2 x MTBF or more, the MTBF."""
    if save_s >= 2 * mtbf_s:
        return mtbf_s
    ratio = math.sqrt(save_s / (2 * mtbf_s))
    return young_interval_s(save_s, mtbf_s) * (1 + ratio / 3 + ratio * ratio / 9) - save_s


def lost_share(interval_s: float, save_s: float, restart_s: float, mtbf_s: float) -> float:
    """The first-order share of wall-clock time lost to saves, redone work and restarts when saving
    every `interval_s` seconds of training."""
    period = interval_s + save_s
    return save_s / period + (period / 2 + restart_s) / mtbf_s


SAVE_OVERHEAD_S = 0.05
"""What any save blocks training for, however small: the group's barrier and DCP's exchange of save plans,
0.01-0.10 s for a 3 MB checkpoint at 1-2 ranks on the same host (not measured at scale)."""


def estimated_save_s(checkpoint_bytes: int, async_save: bool) -> float:
    """What a save of `checkpoint_bytes` blocks training for, from the rates measured by the benchmark."""
    rate = ASYNC_STAGING_BYTES_PER_S if async_save else SYNC_WRITE_BYTES_PER_S
    return SAVE_OVERHEAD_S + checkpoint_bytes / rate


@dataclass(frozen=True)
class Advice:
    """The interval for one job and how far a configured cadence is from it."""

    save_s: float
    mtbf_s: float
    interval_s: float
    every_s: float | None
    """checkpoint.every in seconds, when the step time is known."""

    @property
    def ratio(self) -> float | None:
        """checkpoint.every over the advised interval (1 = at it)."""
        return None if self.every_s is None else self.every_s / self.interval_s

    @property
    def excess(self) -> float | None:
        """How many times the least loss the configured cadence loses ((k + 1/k)/2 at k = ratio)."""
        k = self.ratio
        return None if k is None or k <= 0 else (k + 1 / k) / 2

    @property
    def far(self) -> bool:
        """Whether the configured cadence is more than 2x off the advice (>= 1.25x the least loss)."""
        k = self.ratio
        return k is not None and not 0.5 <= k <= 2


SHORTEST_SAVE_S = 1e-3
"""The least save cost the advice assumes: a save logged as taking 0.000 s still takes some time, and an
interval of zero would advise saving at every step."""


def advise(save_s: float, gpus: int, every_steps: int, step_s: float | None, rate: FailureRate = META_1024) -> Advice:
    """The interval for a job of `gpus` GPUs whose save blocks training `save_s` seconds (at least
    SHORTEST_SAVE_S), beside checkpoint.every (`every_steps`) at `step_s` seconds a step, if known."""
    save_s = max(save_s, SHORTEST_SAVE_S)
    mtbf = rate.mtbf_s(gpus)
    every_s = every_steps * step_s if step_s else None
    return Advice(save_s=save_s, mtbf_s=mtbf, interval_s=daly_interval_s(save_s, mtbf), every_s=every_s)
