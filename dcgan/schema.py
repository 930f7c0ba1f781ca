"""The checkpoint schema: the one place that names the parts of a checkpoint and says which are optional.

A checkpoint is one DCP directory (dcgan.checkpoint writes it) holding this tree:

    model.G, model.D              module state dicts (BatchNorm2d and CrossRankBatchNorm2d share keys)
    optim.G, optim.D              Adam states, in torch's distributed state-dict form
    scaler                        GradScaler state; empty when neither fp16 nor nonfinite=skip   (optional)
    progress.step                 steps trained
    progress.images_seen          global images trained on                    (optional: older checkpoints)
    progress.data                 the loader's position (epoch, batch)
    rng.rank<N>.noise             each writing rank's latent-noise generator  (optional: another rank count)
    fixed_noise                   the sample grid's latent batch              (optional on resume: sample.num)
    meta.run_id, meta.config      the wandb run id; the resolved config as YAML (its model is checked on resume)
    ema.params, ema.updates       the averaged G's parameters and update count   (optional: train.ema > 0)

Training (`dcgan.train.Trainer`) writes and resumes the whole tree; `sample`/`export`/`eval` read the
generator part (`generator_part`, with `ema_part` for the averaged G); both read the checkpoint's own config through `saved_config`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

MODEL, OPTIM, SCALER, PROGRESS, RNG, FIXED_NOISE, META, EMA = (
    "model", "optim", "scaler", "progress", "rng", "fixed_noise", "meta", "ema"
)
PARTS = (MODEL, OPTIM, SCALER, PROGRESS, RNG, FIXED_NOISE, META, EMA)
"""The top-level parts, in the order they are written."""

Loader = Callable[[Path, dict[str, Any]], None]
"""Fills a state tree in place from the checkpoint at a path (Checkpointer.load, or a one-process dcp.load)."""


def rank_key(rank: int) -> str:
    """The key of one rank's entry under `rng`."""
    return f"rank{rank}"


def flat_key(*parts: str) -> str:
    """A key as DCP's metadata lists it: `rng.rank0.noise`."""
    return ".".join(parts)


def training_state(
    *, g: dict[str, Any], d: dict[str, Any], optim_g: dict[str, Any], optim_d: dict[str, Any], scaler: dict[str, Any],
    step: int, images_seen: int, data: dict[str, Any], rank: int, noise_rng: torch.Tensor, fixed_noise: torch.Tensor,
    run_id: str, config_yaml: str, ema: dict[str, Any] | None,
) -> dict[str, Any]:
    """The whole tree a training checkpoint holds (every rank builds it; DCP writes each rank's part)."""
    tree = {
        MODEL: {"G": g, "D": d},
        OPTIM: {"G": optim_g, "D": optim_d},
        SCALER: scaler,
        PROGRESS: {"step": step, "images_seen": images_seen, "data": data},
        RNG: {rank_key(rank): {"noise": noise_rng}},
        FIXED_NOISE: fixed_noise,
        META: {"run_id": run_id, "config": config_yaml},
    }
    if ema is not None:
        tree[EMA] = ema
    return tree


def generator_part(generator: torch.nn.Module, fixed_noise_shape: tuple[int, ...]) -> dict[str, Any]:
    """The part of the tree that `sample`, `export` and `eval` read: G, the step and the fixed noise."""
    return {
        MODEL: {"G": generator.state_dict()},
        PROGRESS: {"step": 0},
        FIXED_NOISE: torch.empty(fixed_noise_shape),
    }


def ema_part(generator: torch.nn.Module) -> dict[str, Any]:
    """The averaged G's part of the tree (see dcgan.ema.GeneratorEMA.state_dict), in new tensors: loaded
    beside `generator_part`, which fills G's own."""
    return {EMA: {"params": {name: torch.empty_like(p) for name, p in generator.named_parameters()}, "updates": torch.tensor(0)}}


def has_ema(stored: dict[str, Any]) -> bool:
    """Whether a checkpoint (its stored keys, dcgan.checkpoint.stored_shapes) holds the averaged G."""
    return flat_key(EMA, "updates") in stored


def saved_config(path: Path, load: Loader) -> dict[str, Any]:
    """The config a checkpoint was written with, as a dict (its own copy: config.yaml may describe another
    model, e.g. after a resume with other settings was refused)."""
    meta: dict[str, Any] = {META: {"config": ""}}
    load(path, meta)
    return yaml.safe_load(meta[META]["config"]) or {}
