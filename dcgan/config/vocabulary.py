"""The words a config may use and the rule every check follows: the evaluation metrics and the result
names they produce (which of them lower is better), the BatchNorm statistics a generator can make images
with, the losses, spectral normalization and augmentations a run can choose, `key_field`, which declares a key with its
help text, and `require`, which turns a value that cannot work into one line naming its key."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Literal, get_args

BnStats = Literal["running", "batch", "standing"]
"""BatchNorm statistics a generator can make images with (dcgan.evaluation.generators.generate implements them)."""


BN_STATS: tuple[str, ...] = get_args(BnStats)


LossKind = Literal["bce", "hinge", "lsgan"]
"""The GAN losses (dcgan.gan.losses implements them): the paper's BCE, the hinge loss, least squares."""

DNorm = Literal["batch", "none"]
"""The normalization of D's inner layers: the paper's BatchNorm, or none (SN-GAN's D, with biases instead)."""

SpectralNorm = Literal["none", "d", "both"]
"""Which networks' conv layers are spectrally normalized (dcgan.gan.models applies it)."""

AUGMENT_POLICIES = ("color", "translation", "cutout")
"""DiffAugment's policies, in the order they are applied (dcgan.gan.augment implements them)."""


def augment_policy(text: str) -> tuple[str, ...]:
    """loss.augment's 'color,translation,cutout' -> the policies in application order; '' -> none. Unknown
    names raise ConfigError naming the key and them."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(AUGMENT_POLICIES))
    require(not unknown, "loss.augment", f"a comma-separated subset of {','.join(AUGMENT_POLICIES)}", text)
    return tuple(name for name in AUGMENT_POLICIES if name in names)


EVAL_METRICS = ("fid", "kid", "swd", "digits")
"""What `dcgan eval` and eval.metrics can compute (dcgan.evaluation.evaluate implements them)."""


DIGITS_KEYS = ("digits_frechet", "digits_confident", "digits_class_balance")
"""The three results of the digits metric (dcgan.evaluation.digits_score.DigitsScore, prefixed)."""


LOWER_IS_BETTER = ("fid", "kid", "swd", "digits_frechet")
"""Result keys for which a smaller value is a better generator: what eval.best may name."""


def metric_keys(metrics: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The result keys `dcgan.evaluation.evaluate.evaluate` returns for these metrics, in order: the one source of
    metric names for config validation, evaluation and eval.best."""
    return tuple(key for metric in metrics for key in (DIGITS_KEYS if metric == "digits" else (metric,)))


def key_field(default: Any, help: str) -> Any:
    """A config key's dataclass field, its help text kept in its metadata (for --help and docs)."""
    return field(default=default, metadata={"help": help})


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def divisors(n: int) -> list[int]:
    """The numbers that divide n, ascending: the rank counts a global batch or a partition count allows."""
    return [k for k in range(1, n + 1) if n % k == 0]


class ConfigError(ValueError):
    """A config key is unknown, mistyped or impossible; the message is one line naming the key."""
