"""The checkpoint schema: the one place that names the parts of a checkpoint and says which are optional.

A checkpoint is one DCP directory (dcgan.run.checkpoint writes it) holding this tree:

    model.G, model.D              module state dicts (BatchNorm2d and CrossRankBatchNorm2d share keys)
    optim.G, optim.D              Adam states, in torch's distributed state-dict form
    scaler                        GradScaler state; empty when neither fp16 nor nonfinite=skip   (optional)
    progress.step                 steps trained
    progress.images_seen          global images trained on                    (optional: older checkpoints)
    progress.data                 the loader's position (epoch, step in it): the same on every rank
    progress.world_size           ranks that wrote it                         (optional: older checkpoints)
    progress.global_batch         images per step over all ranks              (optional: older checkpoints)
    rng.rank<N>.noise             older checkpoints only: per-rank noise generators, no longer read (the
                                  noise is a function of the step, dcgan.gan.step.latent_noise)
    fixed_noise                   the sample grid's latent batch              (optional on resume: sample.num)
    meta.run_id, meta.config      the wandb run id; the resolved config as YAML (its model is checked on resume)
    ema.params, ema.updates       the averaged G's parameters and update count   (optional: train.ema > 0)

Training (`dcgan.train.trainer.Trainer`) writes and resumes the whole tree; `sample`/`export`/`eval` read the
generator part (`generator_part`, with `ema_part` for the averaged G); both read the checkpoint's own
config through `saved_config`. What a resume tolerates is decided here too: the model must match
(`check_compatible`), the optional parts are left out of what is read when the checkpoint lacks them
(`trim_to_stored`), and the optimizers keep this run's hyper-parameters (`keep_configured_hyperparameters`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from dcgan.config import Config, ModelConfig, architecture
from dcgan.errors import IncompatibleCheckpoint

log = logging.getLogger(__name__)

MODEL, OPTIM, SCALER, PROGRESS, RNG, FIXED_NOISE, META, EMA = (
    "model",
    "optim",
    "scaler",
    "progress",
    "rng",
    "fixed_noise",
    "meta",
    "ema",
)
PARTS = (MODEL, OPTIM, SCALER, PROGRESS, FIXED_NOISE, META, EMA)
"""The top-level parts, in the order they are written (RNG only in older checkpoints)."""

Loader = Callable[[Path, dict[str, Any]], None]
"""Fills a state tree in place from the checkpoint at a path (Checkpointer.load, or checkpoint.load_in_process)."""

Stored = dict[str, "tuple[int, ...] | None"]
"""A checkpoint's flattened keys ('progress.step', ...) with their tensors' shapes (checkpoint.stored_shapes)."""


def flat_key(*parts: str) -> str:
    """A key as DCP's metadata lists it: `progress.world_size`."""
    return ".".join(parts)


def training_state(
    *,
    g: dict[str, Any],
    d: dict[str, Any],
    optim_g: dict[str, Any],
    optim_d: dict[str, Any],
    scaler: dict[str, Any],
    step: int,
    images_seen: int,
    data: dict[str, Any],
    world_size: int,
    global_batch: int,
    fixed_noise: torch.Tensor,
    run_id: str,
    config_yaml: str,
    ema: dict[str, Any] | None,
) -> dict[str, Any]:
    """The whole tree a training checkpoint holds (every rank builds it; DCP writes each rank's part)."""
    tree = {
        MODEL: {"G": g, "D": d},
        OPTIM: {"G": optim_g, "D": optim_d},
        SCALER: scaler,
        PROGRESS: {
            "step": step,
            "images_seen": images_seen,
            "data": data,
            "world_size": world_size,
            "global_batch": global_batch,
        },
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
    """The averaged G's part of the tree (see dcgan.gan.ema.GeneratorEMA.state_dict), in new tensors: loaded
    beside `generator_part`, which fills G's own."""
    return {
        EMA: {
            "params": {name: torch.empty_like(p) for name, p in generator.named_parameters()},
            "updates": torch.tensor(0),
        }
    }


def has_ema(stored: dict[str, Any]) -> bool:
    """Whether a checkpoint (its stored keys, dcgan.run.checkpoint.stored_shapes) holds the averaged G."""
    return flat_key(EMA, "updates") in stored


def saved_config(path: Path, load: Loader) -> dict[str, Any]:
    """The config a checkpoint was written with, as a dict (its own copy: config.yaml may describe another
    model, e.g. after a resume with other settings was refused)."""
    meta: dict[str, Any] = {META: {"config": ""}}
    load(path, meta)
    return yaml.safe_load(meta[META]["config"]) or {}


def model_of(saved: dict[str, Any]) -> ModelConfig:
    """The model settings of a checkpoint's own config (from saved_config): config.yaml may describe
    another model, e.g. after a resume with other settings was refused."""
    model = saved.get("model", {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in model.items() if k in known})


# --- resuming: what a checkpoint must match, what it may lack ----------------------------------------


def check_compatible(saved: dict[str, Any], config: Config, path: Path) -> None:
    """Refuse, in one line, a checkpoint (its own config `saved`) whose model settings differ from this config's."""
    stored = architecture(model_of(saved))  # a key the checkpoint predates has its default (spectral_norm: none)
    differing = [
        f"model.{k}: checkpoint {stored[k]!r}, config {v!r}"
        for k, v in architecture(config.model).items()
        if stored[k] != v
    ]
    if differing:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} belongs to another model ({'; '.join(differing)}): "
            "use a new run.dir or the checkpoint's model settings"
        )


def trim_to_stored(state: dict[str, Any], stored: Stored) -> dict[str, Any]:
    """Leave out of a training tree (about to be read in place) the optional parts this checkpoint does
    not hold in the same shape, saying what each means for the run; return the tree."""
    for key in ("world_size", "global_batch"):
        if flat_key(PROGRESS, key) not in stored:  # written before the run's shape was kept
            del state[PROGRESS][key]
    if stored.get(FIXED_NOISE) != tuple(state[FIXED_NOISE].shape):
        log.info("sample.num changed since the checkpoint: sample grids from here on use new fixed noise")
        del state[FIXED_NOISE]
    if flat_key(PROGRESS, "images_seen") not in stored:  # written before the count existed
        del state[PROGRESS]["images_seen"]
    if EMA in state and not has_ema(stored):
        del state[EMA]
        log.warning("train.ema > 0 but the checkpoint holds no average of G: it starts from this step's G")
    elif EMA not in state and has_ema(stored):
        log.warning("the checkpoint holds an average of G but train.ema=0: it is not kept from here on")
    if state[SCALER] and not any(key.startswith(SCALER + ".") for key in stored):
        log.info("the checkpoint has no loss-scaler state (written without fp16 or nonfinite=skip): default scale")
        state[SCALER] = {}
    return state


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
                log.info(
                    "optimizer %s: %s %s in the checkpoint, %s in the config: using the config's",
                    name,
                    key,
                    before,
                    now,
                )
        saved_group.update({k: v for k, v in live_group.items() if k not in ("params", "param_names")})


def _as_tuple(value: Any) -> tuple[Any, ...]:
    """Betas come back from a checkpoint as a list, lr as a float: compare them as tuples."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def describe_resize(
    saved: dict[str, Any], stored: Stored, progress: dict[str, Any], global_batch: int, world_size: int
) -> None:
    """Say what a resume on another number of ranks means for the run: with the same global batch it
    continues the same trajectory (data and noise are functions of the step); with another (train.batch_size
    is per process where train.global_batch=0) the lr was chosen for the old one. Checkpoints written
    before the run's shape was kept tell the ranks by their per-rank noise state."""
    if "world_size" in progress:
        writers, before = int(progress["world_size"]), int(progress["global_batch"])
    else:
        writers = sum(1 for key in stored if key.startswith(flat_key(RNG, "rank")) and key.endswith(".noise"))
        before = int(saved.get("train", {}).get("batch_size", 0)) * writers
        log.warning(
            "the checkpoint was written by an older version, whose data order and noise depended on the rank: "
            "from here both are functions of the step, so the run does not continue bit-identically to its past"
        )
    if not writers or (writers == world_size and before == global_batch):
        return
    if before == global_batch:
        log.info(
            "resized from %d to %d ranks: same global batch (%d), same data order and noise, the same trajectory",
            writers,
            world_size,
            global_batch,
        )
        return
    log.warning(
        "the global batch changed on resume: %d on %d rank(s) when checkpointed, %d on %d now; the data order "
        "changes and optim.lr is not rescaled (for the same global batch on any number of ranks: "
        "train.global_batch=%d)",
        before,
        writers,
        global_batch,
        world_size,
        before,
    )
