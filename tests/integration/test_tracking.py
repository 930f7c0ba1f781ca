"""Tracking: offline wandb runs read back from disk, stats.jsonl, rank-0-only output, GAN health."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import signal_tree, start_training, torchrun, wait_for
from helpers import (
    CPU,
    TorchrunRun,
    completed_steps,
    load_checkpoint_tensors,
    read_stats,
    run_cli,
    run_in_process,
    tiny_config,
)
from PIL import Image

from dcgan.errors import EXIT_NONFINITE
from dcgan.run.wandb_files import history, records, run_id, uploadable_segments
from dcgan.train.loop import run_loop
from dcgan.train.preemption import StopSignal
from dcgan.train.tracking import Tracker
from dcgan.train.trainer import build_trainer
from dcgan.train.window import GanHealth, sample_diversity


def offline_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))


@pytest.mark.slow  # wandb runs in processes of their own
def test_offline_wandb_run_holds_metrics_images_histograms_and_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli(
        "train",
        "configs/tiny.yaml",
        f"run.dir={run}",
        "log.wandb=offline",
        "train.steps=20",
        "log.every=5",
        "sample.every=10",
        "log.tags=a,b",
    )
    (wandb_dir,) = offline_runs(run)
    assert f"upload all its segments as one run with: dcgan sync {run}" in result.stderr
    rows = history(wandb_dir)
    assert [row["_step"] for row in rows] == [5, 10, 15, 20]
    for key in (
        "loss_D",
        "loss_G",
        "D_x",
        "D_G_z_before",
        "D_G_z_after",
        "grad_norm_G",
        "grad_norm_D",
        "img_per_s",
        "img_per_s_per_gpu",
        "data_wait_share",
        "step_time_ms",
        "skipped_samples",
    ):
        assert all(np.isfinite(row[key]) for row in rows), key
    with_images = [row for row in rows if "samples/path" in row]
    assert [row["_step"] for row in with_images] == [10, 20]
    for row in with_images:
        image = Image.open(wandb_dir / "files" / row["samples/path"])
        assert image.mode == "RGB" and image.size == (row["samples/width"], row["samples/height"]) == (74, 74)
        assert row["D_real/_type"] == "histogram" and row["D_fake/_type"] == "histogram"
        assert row["sample_diversity"] >= 0
    run_record = next(
        r.run for r in records(next(wandb_dir.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"
    )
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    model = config["model"].get("value", config["model"])  # wandb wraps values as {"value": ...} in some versions
    assert model["resolution"] == 16 and list(run_record.tags) == ["a", "b"]
    stats = read_stats(run)
    assert [s["step"] for s in stats] == [5, 10, 15, 20]
    assert [s["loss_D"] for s in stats] == [row["loss_D"] for row in rows]


def test_resume_after_a_kill_between_checkpoints_keeps_one_stats_line_per_step(tmp_path: Path) -> None:
    import shutil

    from dcgan.errors import EXIT_OK
    from dcgan.train.loop import train

    run = tmp_path / "run"
    settings = ("log.every=10", "checkpoint.every=20", "checkpoint.keep=5", "sample.every=100")
    assert train(tiny_config(run, "train.steps=30", *settings)) == EXIT_OK
    # As if killed after logging step 30 but before its checkpoint, mid-way through another line.
    shutil.rmtree(run / "checkpoints" / "step_000000030")
    with (run / "stats.jsonl").open("a") as stats:
        stats.write('{"step": 3')
    first_pass = {json.loads(line)["step"]: line for line in (run / "stats.jsonl").read_text().splitlines()[:3]}
    assert train(tiny_config(run, "train.steps=40", *settings)) == EXIT_OK  # resumes from step 20
    lines = (run / "stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40]
    assert lines[:2] == [first_pass[10], first_pass[20]] and lines[2] != first_pass[30]  # 30 is the new pass's


def test_only_rank_zero_writes(two_rank_run: TorchrunRun) -> None:
    run = two_rank_run.run
    assert len(offline_runs(run)) == 1
    assert [row["step"] for row in read_stats(run)] == [5, 10]
    assert "[rank 1]" not in (run / "train.log").read_text()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000000010.png"]


class PoisonAt:
    """Wraps the real step runner and, once, sets one D weight to NaN first (a forced divergence)."""

    def __init__(self, runner, trainer, at: int) -> None:  # type: ignore[no-untyped-def]
        self.runner, self.trainer, self.at = runner, trainer, at

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.trainer.step + 1 == self.at:
            with torch.no_grad():
                self.trainer.d_bare.main[0].weight[0, 0, 0, 0] = float("nan")
        return self.runner(images)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    trainer = build_trainer(tiny_config(run, "train.steps=30", "checkpoint.every=5", "log.every=10"), CPU)
    trainer.checkpointer.prepare()
    trainer.runner = PoisonAt(trainer.runner, trainer, at=7)
    with caplog.at_level(logging.ERROR):
        status = run_loop(trainer, Tracker(), StopSignal())
    trainer.checkpointer.close()
    assert status == EXIT_NONFINITE
    assert "non-finite loss at or before step 10" in caplog.text and "checkpoint (step 5) is kept" in caplog.text
    assert completed_steps(run) == [5]
    saved = load_checkpoint_tensors(run / "checkpoints" / "step_000000005")
    assert all(torch.isfinite(t).all() for t in saved["model"]["D"].values())


def test_gan_health_warns_once_when_d_wins_and_when_samples_collapse(caplog: pytest.LogCaptureFixture) -> None:
    health = GanHealth(patience=3)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 8):
            health.observe_metrics(step * 100, {"D_G_z_before": 0.001})
        varied = torch.rand(16, 1, 8, 8)
        health.observe_samples(100, sample_diversity(varied))
        health.observe_samples(200, sample_diversity(varied[:1].repeat(16, 1, 1, 1) + 0.001 * varied))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("D wins completely" in m for m in messages) == 1 and "step 300" in messages[0]
    assert sum("may be collapsing" in m for m in messages) == 1
    calm = GanHealth(patience=3)
    for step in range(10):
        calm.observe_metrics(step, {"D_G_z_before": 0.3})
        calm.observe_samples(step, 0.5)
    assert calm.warned == set()
    hinge = GanHealth(patience=3, loss="hinge")  # a hinge D scores fakes at 0 as a matter of course
    for step in range(10):
        hinge.observe_metrics(step, {"D_G_z_before": 0.0})
    assert hinge.warned == set()


def test_skip_mode_skips_non_finite_updates_and_finishes(tmp_path: Path) -> None:
    trainer = build_trainer(
        tiny_config(tmp_path / "run", "train.steps=6", "train.nonfinite=skip", "checkpoint.every=100"), CPU
    )
    trainer.checkpointer.prepare()
    trainer.runner = PoisonAt(trainer.runner, trainer, at=4)
    g_before = {k: v.clone() for k, v in trainer.g_bare.state_dict().items()}
    assert run_loop(trainer, Tracker(), StopSignal()) == 0
    trainer.checkpointer.close()
    g_after = trainer.g_bare.state_dict()
    assert all(torch.isfinite(v).all() for v in g_after.values())  # the NaN never reached G's weights
    assert not torch.equal(g_before["main.0.weight"], g_after["main.0.weight"])  # steps 1-3 did update


@pytest.mark.slow  # wandb runs in processes of their own
def test_a_resumed_run_keeps_its_wandb_run_id_and_images_seen_counts_across_world_sizes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ("train", "configs/tiny.yaml", f"run.dir={run}", "log.wandb=offline", "log.every=5", "sample.every=10")
    run_cli(*common, "train.steps=10")  # one process, batch 16
    resumed = torchrun(2, *common, "train.steps=20")  # two ranks: 32 images a step from here on
    assert resumed.returncode == 0, resumed.stderr
    stats = read_stats(run)
    assert [(s["step"], s["images_seen"]) for s in stats] == [(5, 80), (10, 160), (15, 320), (20, 480)]
    first, second = offline_runs(run)
    # one wandb run in two segments, its steps continuing (three single-process segments: the last test)
    assert (
        run_id(first)
        == run_id(second)
        == str(load_checkpoint_tensors(run / "checkpoints" / "step_000000020")["meta"]["run_id"])
    )
    assert [r["_step"] for r in history(first)] == [5, 10]
    assert [r["_step"] for r in history(second)] == [15, 20]
    rows = history(first) + history(second)
    assert [row["images_seen"] for row in rows if "loss_D" in row] == [80, 160, 320, 480]
    assert all("images_seen" in row for row in rows)  # images and histograms carry it too
    metrics = [r.metric for r in records(next(second.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "images_seen" for m in metrics)
    eval_summaries = {(m.summary.min, m.summary.max) for m in metrics if m.glob_name == "eval/*"}
    assert (True, False) in eval_summaries and (False, True) in eval_summaries


@pytest.mark.slow  # wandb runs in processes of their own
def test_offline_segments_of_a_twice_killed_run_log_every_step_exactly_once(tmp_path: Path) -> None:
    """Each start writes an offline segment with the same run id; a segment resumed from a checkpoint
    older than the last logged step must not log the steps in between again: `dcgan sync` uploads the
    segments in order into one run, and their union is the whole history, once."""
    import signal

    run = tmp_path / "run"
    settings = ("log.wandb=offline", "log.every=5", "checkpoint.every=20", "sample.every=1000")

    def last_logged() -> int:
        lines = (run / "stats.jsonl").read_text().splitlines() if (run / "stats.jsonl").is_file() else []
        return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)

    for kill_after in (30, 70):
        process = start_training(run, "train.steps=100000", *settings)
        wait_for(lambda kill_after=kill_after: last_logged() >= kill_after, process)
        signal_tree(process.pid, signal.SIGKILL)  # the job's whole process tree, wandb's service included
        process.wait()
    run_cli("train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=160", *settings)
    segments = offline_runs(run)
    assert len(segments) == 3
    # a SIGKILLed segment may have lost its unwritten records, even its run record: only readable ones count
    readable = [s.path for s in uploadable_segments(run)]
    assert segments[-1] in readable and len({run_id(s) for s in readable}) == 1
    logged = [row["_step"] for s in readable for row in history(s) if "loss_D" in row]
    assert sorted(logged) == list(range(5, 161, 5))  # every logged step, none twice
    assert logged == sorted(logged)  # and in order, segment after segment
    sync = run_in_process("sync", str(run), "--dry-run").stdout.strip()
    assert sync.endswith(" ".join(str(s) for s in readable))
    assert f"wandb sync --id {run_id(segments[-1])} --project dcgan " in sync
