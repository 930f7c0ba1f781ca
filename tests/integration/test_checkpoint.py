"""Sharded DCP checkpoints: exact resume after SIGKILL/SIGTERM, atomicity, retention, resharding, export."""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from distributed_helpers import torchrun, torchrun_until
from helpers import (
    BEYOND_THE_PAPER,
    CPU,
    TorchrunRun,
    assert_states_equal,
    checkpoint_complete,
    completed_steps,
    load_checkpoint_tensors,
    run_in_process,
    tiny_config,
)

from dcgan.errors import EXIT_OK, EXIT_TERMINATED
from dcgan.run.checkpoint import list_checkpoints
from dcgan.train.loop import train
from dcgan.train.preemption import STOP_CHECK_EVERY
from dcgan.train.trainer import build_trainer

pytestmark = pytest.mark.slow

STEPS = 200


def run_args(run: Path, data: str, shards: Path, options: tuple[str, ...] = ()) -> list[str]:
    args = [
        "train",
        "configs/tiny.yaml",
        f"run.dir={run}",
        f"train.steps={STEPS}",
        "checkpoint.every=50",
        "checkpoint.async_save=true",
        "log.every=25",
        "sample.every=100",
        "train.ema=0.99",
    ]
    if data == "shards":
        args += [f"data.shards={shards}", "data.workers=2"]
    return args + list(options)


StraightRun = Callable[[str, tuple[str, ...]], Path]
"""The uninterrupted 2-rank run of a data source and options, made at its first use."""


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> StraightRun:
    """One uninterrupted 2-rank run per (data source, options), the reference for every resumed run."""
    runs: dict[tuple[str, tuple[str, ...]], Path] = {}

    def straight(data: str, options: tuple[str, ...]) -> Path:
        if (data, options) not in runs:
            run = tmp_path_factory.mktemp(f"straight_{data}")
            result = torchrun(2, *run_args(run, data, digits_shards, options))
            assert result.returncode == 0, result.stderr
            runs[data, options] = run
        return runs[data, options]

    return straight


def checkpoint_ready(run: Path, step: int) -> bool:
    return checkpoint_complete(run, step)


# Each signal once and each data source once: the resume path does not depend on which killed the run,
# and the data position is restored by the same code for both sources (2 cases keep the suite short);
# a third case turns on every option beyond the paper (TTUR, hinge loss, spectral norm on G and D, whose
# power-iteration vectors are state too, with train.ema's average of G) and SN-GAN's D without BatchNorm
# (the preset configs/digits-sngan.yaml's; test_resize covers the options with the paper's D).
@pytest.mark.parametrize(
    ("data", "sig", "options"),
    [
        ("shards", signal.SIGKILL, ()),
        ("digits", signal.SIGTERM, ()),
        ("digits", signal.SIGKILL, (*BEYOND_THE_PAPER, "model.d_norm=none")),
    ],
    ids=["shards-SIGKILL", "digits-SIGTERM", "options-SIGKILL"],
)
def test_interrupted_and_resumed_run_is_bit_identical_to_a_straight_run(
    tmp_path: Path, straight_runs: StraightRun, digits_shards: Path, data: str, sig: int, options: tuple[str, ...]
) -> None:
    run = tmp_path / "run"
    args = run_args(run, data, digits_shards, options)
    status, stderr = torchrun_until(2, lambda: checkpoint_ready(run, 50), sig, *args)
    steps = completed_steps(run)
    assert steps and steps[-1] < STEPS, f"the run was not interrupted early: {steps}"
    if sig == signal.SIGTERM:
        assert "stop signal received: checkpointing step" in stderr
        assert f"exiting {EXIT_TERMINATED}" in stderr
        forced = int(re.search(r"stop signal received: checkpointing step (\d+)", stderr).group(1))
        assert steps[-1] == forced > 50  # the checkpoint of the step the ranks stopped at, after the signal
        assert forced % STOP_CHECK_EVERY == 0  # where the ranks agree on the stop
    else:
        assert status != 0
    resumed = torchrun(2, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoints'}/step_{steps[-1]:09d}" in resumed.stderr
    final = run / "checkpoints" / f"step_{STEPS:09d}"
    reference = straight_runs(data, options) / "checkpoints" / f"step_{STEPS:09d}"
    resumed_state = load_checkpoint_tensors(final)
    assert int(resumed_state["ema"]["updates"]) == STEPS  # the average of G (train.ema) resumed too
    assert_states_equal(resumed_state, load_checkpoint_tensors(reference))
    if options:  # the options were on: D's normalized layers and their power-iteration vectors are in the state
        assert "main.0.parametrizations.weight.0._u" in resumed_state["model"]["D"]
        assert not any("running_mean" in key for key in resumed_state["model"]["D"])  # model.d_norm=none
    stats = [line for line in (run / "stats.jsonl").read_text().splitlines()]
    steps_logged = [int(line.split('"step": ')[1].split(",")[0]) for line in stats]
    assert steps_logged[-1] == STEPS


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10")) == EXIT_OK
    broken = run / "checkpoints" / "step_000000015"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"half a checkpoint")
    assert train(tiny_config(run, "train.steps=12")) == EXIT_OK
    assert not broken.exists()
    assert "resumed from" in (run / "train.log").read_text() and "step_000000010" in (run / "train.log").read_text()
    assert completed_steps(run)[-1] == 12


def test_keep_last_k_plus_every_nth(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tiny_config(run, "train.steps=10", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_every=4")
    assert train(config) == EXIT_OK
    assert completed_steps(run) == [4, 8, 10]
    assert list_checkpoints(run / "checkpoints", complete=False) == []


def test_incompatible_config_is_refused_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=5")) == EXIT_OK
    result = run_in_process(
        "train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=10", "model.ngf=16", check=False
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "belongs to another model (model.ngf: checkpoint 8, config 16)" in last
    # spectral normalization on or off is another model too (its layers hold other parameters)
    normalized = run_in_process(
        "train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=10", "model.spectral_norm=d", check=False
    )
    assert normalized.returncode == 2
    assert normalized.stderr.strip().splitlines()[-1] == (
        f"dcgan: error: checkpoint {run / 'checkpoints' / 'step_000000005'} belongs to another model "
        "(model.spectral_norm: checkpoint 'none', config 'd'): use a new run.dir or the checkpoint's model settings"
    )
    assert checkpoint_ready(run, 5)  # the completed checkpoint is untouched
    # and so is the run directory's description of it: readers still build the right generator
    assert "ngf: 8" in (run / "config.yaml").read_text()
    assert "generator of step 5" in run_in_process("export", str(run), "--out", str(tmp_path / "g.pt")).stdout
    # a config.yaml edited by hand cannot mislead them either: the checkpoint carries its model settings
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("ngf: 8", "ngf: 16"))
    run_in_process("sample", str(run), "--num", "4", "--out", str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_resume_takes_the_state_from_the_checkpoint_and_lr_and_betas_from_the_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10")) == EXIT_OK
    saved = load_checkpoint_tensors(run / "checkpoints" / "step_000000010")["optim"]["G"]
    resumed = build_trainer(tiny_config(run, "train.steps=20", "optim.lr=1e-5", "optim.beta1=0.9"), CPU)
    resumed.load_state_dict(run / "checkpoints" / "step_000000010")
    resumed.checkpointer.close()
    optimizer = resumed.step_fn.opt_g
    assert [(g["lr"], tuple(g["betas"])) for g in optimizer.param_groups] == [(1e-5, (0.9, 0.999))]
    first = dict(resumed.g_bare.named_parameters())["main.0.weight"]
    assert torch.equal(optimizer.state[first]["exp_avg"], saved["state"]["main.0.weight"]["exp_avg"])
    assert float(optimizer.state[first]["step"]) == 10.0


def test_resume_accepts_a_new_precision_and_sample_count(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=5", "checkpoint.every=5")) == EXIT_OK  # fp32: no scaler state
    assert train(tiny_config(run, "train.steps=10", "checkpoint.every=5", "train.precision=fp16")) == EXIT_OK
    assert "scale" in load_checkpoint_tensors(run / "checkpoints" / "step_000000010")["scaler"]
    assert (
        train(tiny_config(run, "train.steps=15", "checkpoint.every=5", "train.precision=bf16", "sample.num=36"))
        == EXIT_OK
    )
    assert load_checkpoint_tensors(run / "checkpoints" / "step_000000015")["fixed_noise"].shape[0] == 36


def test_two_rank_checkpoint_loads_into_one_and_three_ranks(two_rank_run: TorchrunRun, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_rank_run.run, run)  # the shared run stays as it was: this test resumes it
    saved = load_checkpoint_tensors(run / "checkpoints" / "step_000000010")
    one = build_trainer(tiny_config(run, "train.steps=10"), CPU)
    one.load_state_dict(run / "checkpoints" / "step_000000010")
    assert one.step == 10
    for name, value in one.g_bare.state_dict().items():
        assert torch.equal(value, saved["model"]["G"][name]), name
    three = torchrun(3, "train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=14")
    assert three.returncode == 0, three.stderr
    assert "resumed from" in three.stderr and "3 rank(s)" in three.stderr
    assert "the global batch changed on resume: 32 on 2 rank(s) when checkpointed, 48 on 3 now" in three.stderr
    assert checkpoint_ready(run, 14)


def test_the_best_marker_names_only_a_complete_checkpoint_and_survives_pruning(tmp_path: Path) -> None:
    """Background saves: best.json appears once its checkpoint is complete, never before, and pruning
    keeps the best one while it removes the others beyond `keep`."""
    from dcgan.config import CheckpointConfig
    from dcgan.run.checkpoint import Best, Checkpointer, is_complete, read_best

    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep=1, async_save=True), CPU)
    state = {"w": torch.arange(200_000, dtype=torch.float32)}
    checkpointer.save(10, state, best=Best("swd", 2.5))
    marker = read_best(tmp_path)
    assert marker is None or is_complete(tmp_path / "step_000000010")  # never a half-written checkpoint
    assert checkpointer.saved_step == 10
    checkpointer.wait()
    assert read_best(tmp_path) == {"step": 10, "metric": "swd", "value": 2.5} and checkpointer.complete_step == 10
    for step in (20, 30):
        checkpointer.save(step, state)
    checkpointer.close()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10, 30]  # keep=1, plus the best


def test_a_training_checkpoint_holds_the_schemas_parts_and_nothing_else(trained_digits_run: Path) -> None:
    from dcgan.run import schema
    from dcgan.run.checkpoint import stored_shapes

    [(_, path)] = list_checkpoints(trained_digits_run / "checkpoints")[-1:]
    parts = {key.split(".")[0] for key in stored_shapes(path)}
    assert (
        set(schema.PARTS) - {schema.SCALER, schema.EMA} <= parts <= set(schema.PARTS)
    )  # scaler: empty without fp16; ema: off
    assert schema.flat_key(schema.PROGRESS, "world_size") in stored_shapes(path)
