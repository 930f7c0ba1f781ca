"""The same run on any number of ranks: the images and the noise of every global batch do not depend on the
number of ranks or loader workers, and a run resized at a checkpoint continues the trajectory of a run
that never was."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import (
    BEYOND_THE_PAPER,
    TINY,
    completed_steps,
    flatten,
    load_checkpoint_tensors,
    run_in_process,
    tiny_config,
)

from dcgan.config import Config
from dcgan.data.build import build_source
from dcgan.data.formats import Manifest
from dcgan.distributed.env import DistInfo
from dcgan.errors import EXIT_OK
from dcgan.gan.step import latent_noise
from dcgan.run.checkpoint import list_checkpoints
from dcgan.run.rundir import RunDir
from dcgan.train.loop import train

GLOBAL_BATCH = 16
PARTITIONS = 4
EPOCH_STEPS = 4
EPOCHS = 3


def rank(r: int, world: int) -> DistInfo:
    return DistInfo(rank=r, world_size=world, local_rank=r, device=torch.device("cpu"))


def image_hash(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16]


def global_batches(config: Config, world: int, steps: int) -> list[Counter[str]]:
    """The multiset of image hashes of each of the first `steps` global batches, read by `world` ranks'
    sources (each rank's batch is its slice of the step's global batch)."""
    per_step: list[Counter[str]] = [Counter() for _ in range(steps)]
    for r in range(world):
        source = build_source(config, rank(r, world))
        try:
            stream = iter(source)
            for step in range(steps):
                batch = next(stream)
                assert len(batch) == GLOBAL_BATCH // world
                per_step[step].update(image_hash(image) for image in batch)
        finally:
            source.close()
    return per_step


def shard_config(tmp: Path, shards: Path, workers: int, *overrides: str) -> Config:
    return tiny_config(
        tmp,
        f"data.shards={shards}",
        f"train.global_batch={GLOBAL_BATCH}",
        f"data.partitions={PARTITIONS}",
        f"data.workers={workers}",
        f"data.epoch_samples={GLOBAL_BATCH * EPOCH_STEPS}",
        *overrides,
    )


@pytest.mark.slow
def test_every_global_batch_of_three_epochs_is_the_same_multiset_for_1_2_4_ranks_and_0_1_2_workers(
    digits_shards: Path, tmp_path: Path
) -> None:
    steps = EPOCHS * EPOCH_STEPS
    reference = global_batches(shard_config(tmp_path, digits_shards, 0), 1, steps)
    assert all(sum(batch.values()) == GLOBAL_BATCH for batch in reference)
    assert len({tuple(sorted(batch)) for batch in reference}) == steps  # a stream, not one batch again
    for world in (1, 2, 4):
        for workers in (0, 1, 2):
            if (world, workers) != (1, 0):
                got = global_batches(shard_config(tmp_path, digits_shards, workers), world, steps)
                assert got == reference, f"{world} rank(s) x {workers} worker(s)"


def test_exact_mode_reads_every_image_at_most_once_per_epoch_whatever_the_ranks(
    digits_shards: Path, tmp_path: Path
) -> None:
    """data.resampled=false: the same global batches on 1 and 2 ranks, and no image twice in an epoch."""
    config = shard_config(tmp_path, digits_shards, 0, "data.resampled=false", "data.epoch_samples=0")
    steps = build_source(config, rank(0, 1)).batches_per_epoch
    counts = sorted(shard.samples for shard in Manifest.read(digits_shards / "manifest.json").shards)
    assert steps == sum(counts[:2]) // (GLOBAL_BATCH // PARTITIONS)  # 8 shards: each partition surely holds 2
    one, two = global_batches(config, 1, 2 * steps), global_batches(config, 2, 2 * steps)
    assert one == two
    for epoch in range(2):
        seen = sum(one[epoch * steps : (epoch + 1) * steps], Counter())
        assert max(seen.values()) == 1 and sum(seen.values()) == steps * GLOBAL_BATCH


def test_built_in_digits_give_the_same_global_batches_on_1_2_4_ranks(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, f"train.global_batch={GLOBAL_BATCH}")
    steps = build_source(config, rank(0, 1)).batches_per_epoch + 3  # into the second epoch
    reference = global_batches(config, 1, steps)
    assert global_batches(config, 2, steps) == reference
    assert global_batches(config, 4, steps) == reference


def test_the_noise_of_a_step_is_the_global_batchs_whatever_the_ranks() -> None:
    """Every rank's slice of step k, put together, is the global latent batch of step k on one rank."""
    for step in (0, 1, 57):
        whole = latent_noise(3, 100, GLOBAL_BATCH, 0, 1, torch.device("cpu"), at=step).draw()
        for world in (2, 4):
            parts = [
                latent_noise(3, 100, GLOBAL_BATCH, r, world, torch.device("cpu"), at=step).draw() for r in range(world)
            ]
            assert torch.equal(torch.cat(parts), whole)
    first, second = (latent_noise(3, 100, GLOBAL_BATCH, 0, 1, torch.device("cpu"), at=s).draw() for s in (0, 1))
    assert not torch.equal(first, second)


def test_a_world_size_that_does_not_divide_the_global_batch_is_one_line_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "3")  # as each of 3 ranks started by torchrun sees it, before any rendezvous
    result = run_in_process("train", str(TINY), f"run.dir={run}", "train.global_batch=16", check=False)
    assert (result.returncode, result.stderr) == (
        2,
        "dcgan: error: train.global_batch: 16 images cannot be split over 3 ranks: run on a number of ranks "
        "that divides it (1, 2, 4, 8, 16) or change train.global_batch\n",
    )
    assert not run.exists()


def test_partitions_the_ranks_cannot_share_are_one_line_naming_the_rank_counts_that_can(tmp_path: Path) -> None:
    from dcgan.config import ConfigError
    from dcgan.data.partitions import resolve_partitions

    config = tiny_config(tmp_path, "train.global_batch=24", "data.partitions=6")
    with pytest.raises(ConfigError, match=r"which 4 ranks cannot share: run on 1, 2, 3, 6 rank\(s\)"):
        resolve_partitions(config, 4, 2)
    assert resolve_partitions(config, 3, 2) == 6
    auto = tiny_config(tmp_path, "train.global_batch=24")
    assert resolve_partitions(auto, 2, 2) == 4  # ranks x workers
    assert resolve_partitions(auto, 2, 3) == 6
    odd = tiny_config(tmp_path, "train.global_batch=20")
    assert resolve_partitions(odd, 2, 4) == 4  # 8 does not divide 20 (nor 6): the most per rank that do


# --- resized at checkpoints: 2 ranks -> 1 -> 4 against a straight 1-rank run ----------------------------


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    [path] = [p for s, p in list_checkpoints(RunDir(run).checkpoints) if s == step]
    state = flatten(load_checkpoint_tensors(path))
    return {k: v for k, v in state.items() if k.startswith(("model.", "optim.")) and isinstance(v, torch.Tensor)}


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        x, y = a[key].double(), b[key].double()
        worst = max(worst, float(((x - y).abs() / y.abs().clamp_min(1e-3)).max()))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("options", [(), BEYOND_THE_PAPER], ids=["paper", "options"])
def test_a_run_resized_from_2_to_1_to_4_ranks_ends_where_a_straight_1_rank_run_ends(
    digits_shards: Path, tmp_path: Path, options: tuple[str, ...]
) -> None:
    """With the paper's recipe, and with every option beyond it (TTUR, hinge loss, spectral norm on G and
    D: the power iteration depends on the weights alone, not on the ranks' batches)."""
    from distributed_helpers import torchrun

    args = [
        f"data.shards={digits_shards}",
        f"train.global_batch={GLOBAL_BATCH}",
        f"data.partitions={PARTITIONS}",
        "data.workers=1",
        "checkpoint.every=10",
        "checkpoint.keep=3",
        "log.every=5",
        *options,
    ]
    straight = tmp_path / "straight"
    assert train(tiny_config(straight, *args, "train.steps=30")) == EXIT_OK

    resized = tmp_path / "resized"
    first = torchrun(2, "train", str(TINY), f"run.dir={resized}", *args, "train.steps=10")
    assert first.returncode == 0, first.stderr
    assert train(tiny_config(resized, *args, "train.steps=20")) == EXIT_OK
    last = torchrun(4, "train", str(TINY), f"run.dir={resized}", *args, "train.steps=30")
    assert last.returncode == 0, last.stderr
    assert completed_steps(resized)[-1] == 30
    log = RunDir(resized).train_log.read_text()
    assert "resized from 2 to 1 ranks: same global batch (16), same data order and noise" in log
    assert "resized from 1 to 4 ranks: same global batch (16), same data order and noise" in log

    for step in (10, 20, 30):
        difference = max_relative_difference(weights(resized, step), weights(straight, step))
        print(f"step {step}: max relative difference {difference:.2e}")
        assert difference < 1e-3, f"step {step}: {difference:.2e}"


def test_a_resume_keeps_the_runs_partitions_and_chooses_anew_only_where_no_trajectory_is_promised(
    digits_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Partitions chosen at the start (1 rank x 2 workers = 2) are kept by a resume on 2 ranks; 4 ranks
    cannot share them: with train.global_batch=0 (the global batch changes anyway) they are chosen anew
    with a warning, with train.global_batch set the resume is refused in one line."""
    from dcgan.config import ConfigError
    from dcgan.train.run_partitions import with_run_partitions

    for global_batch in (0, GLOBAL_BATCH):
        run = tmp_path / f"run{global_batch}"
        args = (
            f"data.shards={digits_shards}",
            "data.workers=2",
            f"train.global_batch={global_batch}",
            "train.steps=2",
            "checkpoint.every=2",
        )
        assert train(tiny_config(run, *args)) == EXIT_OK
        logging.getLogger().addHandler(caplog.handler)  # train() set up logging afresh, without pytest's handler
        assert with_run_partitions(tiny_config(run, *args), rank(0, 2)).data.partitions == 2
        if global_batch:
            with pytest.raises(ConfigError, match=r"^data.partitions: the run reads its shards in 2 partitions"):
                with_run_partitions(tiny_config(run, *args), rank(0, 4))
        else:
            caplog.clear()
            assert with_run_partitions(tiny_config(run, *args), rank(0, 4)).data.partitions == 8
            assert (
                "the run's 2 data partitions cannot serve 4 ranks at a global batch of 64: chosen anew" in caplog.text
            )
