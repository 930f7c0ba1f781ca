"""How many data partitions a run reads, decided once per run: from its newest checkpoint where it has
one (a resume on other ranks or workers keeps the data order), else chosen now. Training owns this, not
the data package: it reads checkpoints, which sit above data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dcgan.config import Config, replace
from dcgan.distributed.env import DistInfo

log = logging.getLogger(__name__)


def with_run_partitions(config: Config, info: DistInfo) -> Config:
    """The config with the run's data.partitions made explicit: those its newest checkpoint was written
    with (a resume on another number of ranks or workers keeps the data order), else the number chosen
    now. An explicit data.partitions that differs from the checkpoint's wins, with a warning: the data
    order changes from there. Where the checkpoint's partitions cannot serve this world size and the run
    promises no trajectory (train.global_batch=0: its global batch changes with the ranks anyway), they
    are chosen anew, with a warning; with train.global_batch set, resolve_partitions refuses in one line."""
    if config.uses_builtin_digits:
        return config
    from dcgan.data.partitions import partitions_fit, resolve_partitions

    stored = checkpointed_partitions(Path(config.run.dir))
    wanted = config.data.partitions
    if stored and wanted and wanted != stored:
        log.warning(
            "data.partitions=%d, but the run was checkpointed with %d: the data order changes from here", wanted, stored
        )
    kept = wanted or stored
    global_batch = config.global_batch(info.world_size)
    if (
        stored
        and not wanted
        and not config.train.global_batch
        and not partitions_fit(stored, global_batch, info.world_size)
    ):
        log.warning(
            "the run's %d data partitions cannot serve %d ranks at a global batch of %d: chosen anew, and the data "
            "order changes from here, as the global batch does (train.global_batch keeps both on any number of ranks)",
            stored,
            info.world_size,
            global_batch,
        )
        kept = 0
    chosen = replace(config, data={"partitions": kept})
    return replace(chosen, data={"partitions": resolve_partitions(chosen, info.world_size, config.data.workers)})


def checkpointed_partitions(run_dir: Path) -> int:
    """data.partitions of the newest readable checkpoint's own config (0: none, or an older checkpoint
    that read its shards by rank)."""
    from dcgan.run.checkpoint import UNREADABLE, load_in_process, read_newest
    from dcgan.run.rundir import RunDir
    from dcgan.run.schema import saved_config

    try:
        saved = read_newest(RunDir(run_dir).checkpoints, lambda path: saved_config(path, load_in_process))
    except UNREADABLE:
        return 0  # every checkpoint is damaged: the resume itself says so
    return int((saved or {}).get("data", {}).get("partitions", 0))
