"""D's overfitting in the metric line: held-out shards written by `dcgan shards --holdout`, ADA's r_v on
them (D_overfit), which rises where D memorises a small training set, without changing what training
computes, and the same on two ranks as on one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, read_stats, run_in_process, tiny_config

from dcgan.config import ConfigError
from dcgan.data.offline import read_images
from dcgan.data.writer import write_shards
from dcgan.errors import EXIT_OK
from dcgan.train.loop import train

HELD_OUT = 1733
"""All but 64 of the 1,797 digits: a training set small enough for the tiny D to start memorising in 400 steps."""


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("holdout") / "digits"
    result = run_in_process(
        "shards", "digits", ".", str(out), "--resolution", "16", "--shard-size", "32", "--holdout", str(HELD_OUT)
    )
    assert f"{out / 'holdout'}: {HELD_OUT} images held out of training (train with data.holdout=" in result.stdout
    return out


@pytest.fixture(scope="module")
def large_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All but 97 digits in training."""
    out = tmp_path_factory.mktemp("holdout") / "digits"
    write_shards("digits", Path("."), out, resolution=16, shard_size=500, workers=1, progress=False, holdout=97)
    return out


def test_holdout_writes_the_last_images_of_the_written_order_apart(small_set: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    write_shards("digits", Path("."), whole, resolution=16, shard_size=500, workers=1, progress=False)
    everything, trained = read_images(str(whole), 16, 1), read_images(str(small_set), 16, 1)
    held_out = read_images(str(small_set / "holdout"), 16, 1)
    assert (len(trained), len(held_out), len(everything)) == (1797 - HELD_OUT, HELD_OUT, 1797)
    assert all(np.array_equal(trained[i], everything[i]) for i in trained)
    assert all(np.array_equal(held_out[i], everything[len(trained) + i]) for i in held_out)


def overfit_runs(shards: Path, run: Path, *overrides: str) -> list[dict]:
    settings = ("train.steps=400", "log.every=50", "checkpoint.every=400", "sample.every=400", *overrides)
    assert train(tiny_config(run, f"data.shards={shards}", *settings)) == EXIT_OK
    return read_stats(run)


def test_d_memorising_a_small_set_shows_in_the_metric_line_and_measuring_changes_nothing(
    small_set: Path, large_set: Path, tmp_path: Path
) -> None:
    """ADA's r_v on held-out reals: clearly above zero where D trains on 64 images, near zero where it
    trains on 1,700 (measured: 0.05-0.09 against -0.02-0.02 over 800 steps); and the measurement leaves
    training as it was (the same losses at every line as a run without it)."""
    small = overfit_runs(small_set, tmp_path / "small", f"data.holdout={small_set / 'holdout'}")
    large = overfit_runs(large_set, tmp_path / "large", f"data.holdout={large_set / 'holdout'}")
    plain = overfit_runs(small_set, tmp_path / "plain")
    for line, plain_line in zip(small, plain, strict=True):
        assert (line["loss_D"], line["loss_G"]) == (plain_line["loss_D"], plain_line["loss_G"]), line["step"]
        assert "D_overfit" not in plain_line
        separation = line["D_out_train"] - line["D_out_fake"]
        assert line["D_overfit"] == pytest.approx((line["D_out_train"] - line["D_out_heldout"]) / separation)
    late = {
        name: [line["D_overfit"] for line in lines if line["step"] > 200]
        for name, lines in (("small", small), ("large", large))
    }
    print({name: [round(value, 3) for value in values] for name, values in late.items()})
    assert np.mean(late["small"]) > np.mean(late["large"]) + 0.03 and abs(np.mean(late["large"])) < 0.03, late


def test_too_few_held_out_images_are_refused_in_one_line(small_set: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.holdout: .* has 64 readable images, fewer than one global batch"):
        train(
            tiny_config(
                tmp_path / "run",
                f"data.shards={small_set / 'holdout'}",
                f"data.holdout={small_set}",
                "train.batch_size=128",
            )
        )


@pytest.mark.slow
def test_the_accuracies_on_two_ranks_are_those_of_one(small_set: Path, tmp_path: Path) -> None:
    from distributed_helpers import torchrun

    common = [f"data.shards={small_set}", f"data.holdout={small_set / 'holdout'}", "train.steps=20", "log.every=10"]
    common += ["train.global_batch=16", "data.partitions=2"]
    assert train(tiny_config(tmp_path / "one", *common)) == EXIT_OK
    two = torchrun(2, "train", str(TINY), f"run.dir={tmp_path / 'two'}", *common)
    assert two.returncode == 0, two.stderr
    for one_line, two_line in zip(read_stats(tmp_path / "one"), read_stats(tmp_path / "two"), strict=True):
        for key in ("D_out_train", "D_out_heldout", "D_out_fake"):
            assert two_line[key] == pytest.approx(one_line[key], rel=1e-3, abs=1e-4), (key, one_line, two_line)
