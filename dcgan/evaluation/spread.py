"""Error bars: the one place that turns repeated measurements (seeds, draws) into a mean, a spread and
a 95% interval. Used by `dcgan compare` (seeds of a setting) and `dcgan probe` (draws of labelled sets)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student t quantile (scipy comes with scikit-learn, the demo extra)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation and the half-width of a 95% t-interval of some values."""

    mean: float
    std: float
    half_width: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Spread:
        n = len(values)
        std = float(np.std(values, ddof=1)) if n > 1 else math.nan
        return Spread(float(np.mean(values)), std, t_critical(n - 1) * std / math.sqrt(n) if n > 1 else math.nan, n)

    def excludes_zero(self) -> bool:
        return abs(self.mean) > self.half_width

    def __str__(self) -> str:
        return f"{self.mean:.4f} +- {self.std:.4f} (95% CI {self.mean - self.half_width:.4f} .. {self.mean + self.half_width:.4f})"
