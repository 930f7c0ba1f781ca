"""The generators a run offers: the trained G and its weight average (train.ema), each with running or batch
BatchNorm statistics, through sample grids, `dcgan sample/export/eval` and in-training evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, load_checkpoint_tensors, read_stats, run_in_process, tiny_config
from PIL import Image

from dcgan.config import load_config
from dcgan.errors import EXIT_OK
from dcgan.evaluation.generators import generate, load_export, load_generator, save_grid
from dcgan.gan.ema import WARMUP_UPDATES, GeneratorEMA, decay_at, refresh_batchnorm_statistics
from dcgan.gan.models import Generator
from dcgan.train.loop import train


def test_the_average_follows_its_formula_with_a_warmup() -> None:
    model = load_config(TINY).model
    source = Generator(model)
    ema = GeneratorEMA(source, model, decay=0.9)
    start = [p.detach().clone() for p in source.parameters()]
    expected = [p.clone() for p in start]
    for update in range(3):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(1.0)
        ema.update(source)
        decay = decay_at(0.9, update)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, source.parameters(), strict=True)]
    for got, want in zip(ema.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert decay_at(0.999, 0) == pytest.approx(1 / WARMUP_UPDATES) and decay_at(0.999, 10**6) == 0.999
    assert ema.updates == 3 and ema.state_dict()["updates"].item() == 3


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that keeps an average of G and evaluates both generators every 20 steps."""
    run = tmp_path_factory.mktemp("ema") / "run"
    config = tiny_config(
        run,
        "train.steps=40",
        "train.ema=0.9",
        "eval.every=20",
        "eval.metrics=[swd,digits]",
        "eval.num=300",
        "eval.best=digits_frechet",
        "sample.every=20",
        "checkpoint.every=20",
    )
    assert train(config) == EXIT_OK
    return run


def test_evaluation_logs_both_generators_and_the_best_checkpoint_ranks_by_the_average(ema_run: Path) -> None:
    from dcgan.run.checkpoint import read_best

    evals = {line["step"]: line for line in read_stats(ema_run) if "eval/swd" in line}
    assert sorted(evals) == [20, 40]
    for line in evals.values():
        assert {"eval/ema_swd", "eval/ema_digits_frechet", "eval/digits_frechet"} <= set(line)
        assert line["eval/ema_swd"] != line["eval/swd"]  # two different generators
    # ranked by the average's metric (that the best is the minimum of the logged values: test_evaluate)
    best = read_best(ema_run / "checkpoints")
    assert best["metric"] == "ema_digits_frechet" and best["value"] == evals[best["step"]]["eval/ema_digits_frechet"]


def test_eval_of_a_run_defaults_to_its_average_and_repeats_the_numbers_logged_in_training(
    ema_run: Path, tmp_path: Path
) -> None:
    logged = next(line for line in read_stats(ema_run) if line["step"] == 40 and "eval/swd" in line)
    for flags, prefix, weights in (([], "ema_", "ema"), (["--raw"], "", "raw")):
        out = tmp_path / f"{weights}.json"
        run_in_process(
            "eval", str(ema_run), "--data", "digits", "-n", "300", "--metrics", "swd,digits", "--out", str(out), *flags
        )
        record = json.loads(out.read_text())
        assert (
            record["protocol"]["generator"]["weights"] == weights
            and record["protocol"]["generator"]["bn"] == "standing"
        )
        for key in ("swd", "digits_frechet", "digits_confident"):
            assert record[key] == pytest.approx(logged[f"eval/{prefix}{key}"], rel=1e-12), (weights, key)


def test_grids_sample_and_export_use_the_average_and_the_raw_generator_on_request(
    ema_run: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again.png"
    run_in_process("sample", str(ema_run), "--fixed-noise", "--num", "16", "--out", str(again))
    grid = np.asarray(Image.open(ema_run / "samples" / "step_000000040.png"))
    assert np.array_equal(np.asarray(Image.open(again)), grid)  # the training grid showed the average

    averaged, raw = tmp_path / "ema.pt", tmp_path / "raw.pt"
    assert "generator of step 40, ema weights" in run_in_process("export", str(ema_run), "--out", str(averaged)).stdout
    assert "raw weights" in run_in_process("export", str(ema_run), "--out", str(raw), "--raw").stdout
    blob = torch.load(averaged, weights_only=True)  # plain tensors and data: safe to load
    assert blob["model"]["ngf"] == 8 and blob["step"] == 40
    # the export carries the run's fixed noise: its generator draws the training grid again, by hand and by `sample`
    by_hand, from_export = tmp_path / "by_hand.png", tmp_path / "from_export.png"
    save_grid(generate(load_export(averaged).generator, load_export(averaged).fixed_noise), by_hand)
    run_in_process("sample", str(averaged), "--fixed-noise", "--num", "16", "--out", str(from_export))
    assert np.array_equal(np.asarray(Image.open(by_hand)), grid) and np.array_equal(
        np.asarray(Image.open(from_export)), grid
    )
    run_in_process("sample", str(averaged), "--num", "4", "--out", str(tmp_path / "four.png"))
    assert Image.open(tmp_path / "four.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    from_run = load_generator(ema_run)
    exported = load_export(averaged)
    assert exported.weights == "ema" and torch.equal(exported.images(noise), from_run.images(noise))
    assert torch.equal(load_export(raw).images(noise), load_generator(ema_run, weights="raw").images(noise))
    assert not torch.equal(load_export(raw).images(noise), exported.images(noise))
    # the average's BatchNorm statistics are its own (re-estimated), not the raw G's running averages
    raw_mean = load_export(raw).generator.main[1].running_mean
    assert not torch.equal(exported.generator.main[1].running_mean, raw_mean)


def test_a_run_without_an_average_refuses_to_export_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10")) == EXIT_OK
    result = run_in_process("export", str(run), "--out", str(tmp_path / "g.pt"), check=False)
    assert result.returncode == 0  # default: what the run made its images with, the raw G
    assert load_export(tmp_path / "g.pt").weights == "raw"
    with pytest.raises(Exception, match="holds no averaged generator"):
        load_generator(run, weights="ema")


def test_batch_statistics_leave_the_running_averages_alone_and_depend_on_the_batch(ema_run: Path) -> None:
    loaded = load_generator(ema_run, weights="raw")
    g = loaded.generator.train()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    batch = generate(g, noise, "batch")
    assert g.training  # restored
    for key, value in g.state_dict().items():
        assert torch.equal(value, before[key]), key
    running = generate(g, noise, "running")
    assert not torch.allclose(batch, running, atol=1e-3)
    torch.testing.assert_close(generate(g, noise[:4], "running"), running[:4])  # per image
    assert not torch.allclose(generate(g, noise[:4], "batch"), batch[:4], atol=1e-4)  # per batch


def test_standing_statistics_are_those_of_the_current_weights_however_stale_the_running_ones(
    ema_run: Path, tmp_path: Path
) -> None:
    """Running statistics made stale on purpose (as a fast-moving G leaves them): standing statistics are
    measured on the weights, equal what the average's re-estimation gives, and leave G's buffers alone."""
    loaded = load_generator(ema_run, weights="raw")
    g = loaded.generator
    with torch.no_grad():
        for name, buffer in g.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(3.0)
            elif name.endswith("running_var"):
                buffer.mul_(25.0)
    stale = {k: v.clone() for k, v in g.state_dict().items()}
    noise = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    standing = generate(g, noise, "standing")
    for key, value in g.state_dict().items():
        assert torch.equal(value, stale[key]), key  # put back
    reference = Generator(loaded.model)
    reference.load_state_dict(stale)
    refresh_batchnorm_statistics(reference, loaded.model.nz)
    torch.testing.assert_close(standing, generate(reference, noise, "running"), rtol=0, atol=0)
    batch, running = generate(g, noise, "batch"), generate(g, noise, "running")
    # 512 images' own statistics are close to those of the 1,024 fixed latents; the stale ones are not
    assert (standing - batch).abs().mean() < 0.1 * (running - batch).abs().mean()
    loaded.bn = "standing"
    assert torch.equal(loaded.images(noise[:8]), standing[:8]) and loaded.standing is not None
    out = tmp_path / "e.json"
    run_in_process(
        "eval", str(ema_run), "--raw", "--bn", "standing", "--data", "digits", "-n", "300", "--out", str(out)
    )
    assert json.loads(out.read_text())["protocol"]["generator"]["bn"] == "standing"
    # the average holds standing statistics already: 'standing' reads them, measures nothing again
    average = load_generator(ema_run, weights="ema", bn="standing")
    assert torch.equal(average.images(noise[:8]), generate(average.generator, noise[:8], "standing"))
    assert average.standing is None


def test_a_run_with_batch_statistics_records_them_and_sample_can_override(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10", "sample.bn=batch")) == EXIT_OK
    loaded = load_generator(run)
    assert (loaded.bn, loaded.weights) == ("batch", "raw")
    assert load_generator(run, bn="running").bn == "running"
    out = tmp_path / "e.json"
    run_in_process("eval", str(run), "--data", "digits", "-n", "300", "--out", str(out))
    assert json.loads(out.read_text())["protocol"]["generator"]["bn"] == "batch"
    printed = run_in_process(
        "sample", str(run), "--bn", "running", "--seed", "1", "--out", str(tmp_path / "s.png")
    ).stdout
    assert "running BatchNorm statistics" in printed


@pytest.mark.slow
def test_turning_the_average_on_at_a_resume_starts_it_from_the_resumed_generator(tmp_path: Path) -> None:
    from dcgan.run.checkpoint import checkpoint_dir

    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10")) == EXIT_OK
    assert train(tiny_config(run, "train.steps=20", "train.ema=0.9")) == EXIT_OK
    assert "the checkpoint holds no average of G: it starts from this step's G" in (run / "train.log").read_text()
    state = load_checkpoint_tensors(checkpoint_dir(run / "checkpoints", 20))
    assert int(state["ema"]["updates"]) == 10
