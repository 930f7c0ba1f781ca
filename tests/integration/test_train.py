"""Single-process training: the step, repeatability, the run directory, and real learning on digits."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CPU, DIGITS_MODEL, read_stats, run_cli, run_in_process, tiny_config
from PIL import Image

from dcgan.errors import EXIT_OK
from dcgan.evaluation.digits_score import DigitsScorer
from dcgan.evaluation.generators import generate
from dcgan.gan.step import STAT_NAMES
from dcgan.pixels import from_uint8
from dcgan.run.schema import describe_resize
from dcgan.train.loop import train
from dcgan.train.trainer import build_trainer
from dcgan.train.window import Window


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def one_step(tmp_path: Path, seed: int) -> tuple[dict, dict, torch.Tensor]:
    trainer = build_trainer(tiny_config(tmp_path, f"seed={seed}"), CPU)
    images = next(iter(trainer.data))
    stats = trainer.step_fn(images)
    return snapshot(trainer.g_bare), snapshot(trainer.d_bare), stats


def test_one_step_changes_both_networks_and_is_bit_repeatable(tmp_path: Path) -> None:
    before = build_trainer(tiny_config(tmp_path), CPU)
    g0, d0 = snapshot(before.g_bare), snapshot(before.d_bare)
    g1, d1, stats1 = one_step(tmp_path, 0)
    g2, d2, stats2 = one_step(tmp_path, 0)
    for name in ("main.0.weight", "main.1.weight"):
        assert not torch.equal(g0[name], g1[name]), f"G.{name} did not change"
    assert not torch.equal(d0["main.0.weight"], d1["main.0.weight"])
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and all(torch.equal(d1[k], d2[k]) for k in d1)
    assert torch.equal(stats1, stats2)
    g3, _, _ = one_step(tmp_path, 1)
    assert not torch.equal(g1["main.0.weight"], g3["main.0.weight"])


def test_step_stats_are_sane(tmp_path: Path) -> None:
    _, _, stats = one_step(tmp_path, 0)
    loss_d, loss_g, d_x, d_gz, d_gz_after, gn_g, gn_d, r1_penalty, nonfinite = stats.tolist()
    assert 0 < loss_d < 5 and 0 < loss_g < 10
    assert 0 < d_x < 1 and 0 < d_gz < 1 and 0 < d_gz_after < 1
    assert gn_g > 0 and gn_d > 0 and nonfinite == 0
    assert r1_penalty == 0  # loss.r1 is off by default


def mean_squared_input_gradient(d: torch.nn.Module, images: torch.Tensor) -> float:
    """E |grad_x D(x)|^2 over a batch, by plain autograd on a separate copy of D (no double backward)."""
    x = from_uint8(images, torch.float32).requires_grad_(True)
    (gradient,) = torch.autograd.grad(d(x).sum(), x)
    return gradient.square().sum(dim=(1, 2, 3)).mean().item()


def test_r1_is_the_input_gradient_of_d_every_kth_step_and_flattens_d(tmp_path: Path) -> None:
    """loss.r1's penalty is measured on the steps divisible by loss.r1_every (scaled by it: lazy
    regularization), is D's squared input-gradient norm on the real batch, and does what it is for: D
    trained with it has a much smaller gradient on reals than D trained without it."""
    trainer = build_trainer(tiny_config(tmp_path / "r1", "loss.r1=10", "loss.r1_every=3"), CPU)
    r1 = STAT_NAMES.index("r1_penalty")
    batches = iter(trainer.data)
    penalties = []
    for step in range(7):
        images = next(batches)
        d_before = copy.deepcopy(trainer.d_bare)
        penalties.append(trainer.step_fn(images)[r1].item())
        if step % 3 == 0:
            assert penalties[-1] == pytest.approx(3 * mean_squared_input_gradient(d_before, images), rel=1e-4)
    assert [step for step, penalty in enumerate(penalties) if penalty > 0] == [0, 3, 6]

    plain = build_trainer(tiny_config(tmp_path / "plain"), CPU)
    for _ in range(7, 60):
        trainer.step_fn(next(batches))
    for _, images in zip(range(60), iter(plain.data), strict=False):
        plain.step_fn(images)
    probe = next(iter(plain.data))
    flat, steep = mean_squared_input_gradient(trainer.d_bare, probe), mean_squared_input_gradient(plain.d_bare, probe)
    print(f"E|grad_x D|^2 on reals after 60 steps: {flat:.3g} with loss.r1=10, {steep:.3g} without")
    assert flat < 0.25 * steep


def test_gradient_norms_are_those_of_the_applied_gradients(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path), CPU)
    stats = trainer.runner(next(iter(trainer.data)))
    by_hand = {
        name: torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item()
        for name, module in (("G", trainer.g_bare), ("D", trainer.d_bare))  # D's grads: its own step's
    }
    assert stats[STAT_NAMES.index("grad_norm_G")].item() == pytest.approx(by_hand["G"], rel=1e-5)
    assert stats[STAT_NAMES.index("grad_norm_D")].item() == pytest.approx(by_hand["D"], rel=1e-5)


def test_run_directory_contents(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=20", "log.every=5", "sample.every=10", "checkpoint.every=10")) == EXIT_OK
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    lines = read_stats(run)
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    for key in (
        "loss_D",
        "loss_G",
        "D_x",
        "D_G_z_before",
        "D_G_z_after",
        "img_per_s",
        "grad_norm_G",
        "data_wait_share",
    ):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000000010.png", "step_000000020.png"]
    grid = Image.open(run / "samples" / "step_000000020.png")
    assert grid.size == (4 * 16 + 5 * 2, 4 * 16 + 5 * 2)  # 16 images, 4x4 grid, 2-pixel padding
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000010", "step_000000020"]
    assert "step 20/20" in (run / "train.log").read_text()


def test_training_on_digits_improves_the_quality_score(trained_digits_run: Path) -> None:
    config = tiny_config(trained_digits_run, *DIGITS_MODEL, "train.steps=300")
    scorer = DigitsScorer(32)
    untrained = build_trainer(config, CPU)
    noise = torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
    before = scorer.score(generate(untrained.g_bare, noise))
    trained = build_trainer(config, CPU)
    trained.load_state_dict(trained.checkpointer.latest())
    assert trained.step == 300
    after = scorer.score(generate(trained.g_bare, noise))
    assert after.frechet < 0.3 * before.frechet, (before, after)
    assert after.class_balance > before.class_balance + 0.3, (before, after)
    assert after.confident > 0.3, after  # (an untrained G is "confidently" one class: balance tells)


@pytest.mark.slow
def test_quality_score_of_real_digits_is_near_perfect() -> None:
    from dcgan.data.digits import digits_images

    scorer = DigitsScorer(32)
    real = scorer.score(from_uint8(digits_images(32)))
    noise = scorer.score(torch.rand(500, 1, 32, 32) * 2 - 1)
    assert real.frechet < 1e-6 < noise.frechet
    assert real.confident > 0.8 and real.class_balance > 0.99


@pytest.mark.slow
def test_cli_train_then_sample(tmp_path: Path) -> None:
    run = tmp_path / "cli_run"
    trained = run_cli("train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=10", env={"OMP_NUM_THREADS": "1"})
    assert "1 CPU thread(s) per rank" in trained.stderr
    # the end of the log says where everything is and what to run next
    last = trained.stderr.strip().splitlines()[-1]
    assert f"finished step 10 (160 images): samples in {run / 'samples'}, checkpoints in {run / 'checkpoints'}" in last
    assert f"`dcgan sample {run} --num 64 --out grid.png`" in last
    out = tmp_path / "grid.png"
    result = run_in_process("sample", str(run), "--num", "9", "--out", str(out))
    assert str(out) in result.stdout
    assert Image.open(out).size == (3 * 16 + 4 * 2, 3 * 16 + 4 * 2)


def test_a_window_counts_training_time_only() -> None:
    """An eval (or a sample grid, or a blocking save) between steps is not training time: a window
    that holds one reports the training rate, not a rate diluted by the eval (a clock the test drives)."""
    now = [100.0]
    window = Window(torch.device("cpu"), clock=lambda: now[0])
    now[0] = 102.0  # two seconds of steps
    with window.outside_training():
        now[0] = 160.0  # a minute of eval
    now[0] = 163.0  # three more seconds of steps
    assert window.training_s() == pytest.approx(5.0)


def test_a_resume_on_another_number_of_ranks_says_whether_the_trajectory_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="dcgan.run.schema")
    progress = {"world_size": 2, "global_batch": 256}
    describe_resize({}, {}, progress, global_batch=256, world_size=2)
    assert not caplog.records
    describe_resize({}, {}, progress, global_batch=256, world_size=4)
    describe_resize({}, {}, progress, global_batch=128, world_size=1)
    resized, changed = (record.getMessage() for record in caplog.records)
    assert resized.startswith("resized from 2 to 4 ranks: same global batch (256), same data order and noise")
    assert "256 on 2 rank(s) when checkpointed, 128 on 1 now" in changed and "train.global_batch=256" in changed
    # written before the run's shape was kept: the ranks are counted by their noise generators
    caplog.clear()
    stored = {"rng.rank0.noise": (5056,), "rng.rank1.noise": (5056,), "model.G.x": (3,)}
    describe_resize({"train": {"batch_size": 128}}, stored, {}, global_batch=128, world_size=1)
    older, changed = (record.getMessage() for record in caplog.records)
    assert older.startswith("the checkpoint was written by an older version, whose data order and noise")
    assert "256 on 2 rank(s) when checkpointed, 128 on 1 now" in changed


def test_lr_advice_follows_the_readmes_one_rule() -> None:
    from dcgan.config import OptimConfig
    from dcgan.train.trainer import lr_advice

    assert lr_advice(OptimConfig(lr=2e-4), 128) is None
    paper = lr_advice(OptimConfig(lr=2e-4), 1024)
    assert paper is not None and "suggests 0.00057" in paper and "optim.lr 0.0002" in paper
    assert "suggests 0.00028" in str(lr_advice(OptimConfig(lr=4e-4), 256))
    # TTUR: both lrs scale by the same factor (their ratio kept); an unset one is optim.lr
    ttur = lr_advice(OptimConfig(lr=2e-4, lr_d=4e-4), 512)
    assert ttur == (
        "global batch 512: optim.lr_g 0.0002, optim.lr_d 0.0004; the sqrt rule scales lrs chosen at the paper's "
        "batch 128 by 2: if these were, it suggests 0.0004 and 0.0008 (docs/distributed.md)"
    )
    assert lr_advice(OptimConfig(lr_g=1e-4, lr_d=4e-4), 128) is None
