"""The checkpoint interval rule (dcgan.run.interval) on real numbers, and the advice `dcgan train --dry-run`
prints from it: the save cost it assumes (estimated from the model, or measured in train.log), the MTBF
of the job's size, the interval and the verdict on checkpoint.every."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import run_in_process, tiny_config

from dcgan.errors import EXIT_OK
from dcgan.run.interval import (
    META_1024,
    META_16384,
    advise,
    daly_interval_s,
    estimated_save_s,
    lost_share,
    young_interval_s,
)
from dcgan.train.loop import train


def field(report: str, prefix: str) -> str:
    (line,) = [line for line in report.splitlines() if line.startswith(prefix)]
    return line


def test_young_is_the_square_root_of_twice_the_save_times_the_mtbf_and_daly_corrects_it_slightly() -> None:
    """A 10 s save in a 1,024-GPU job (Meta's 7.9 h): sqrt(2 x 10 x 28,440) = 754.2 s; Daly's
    higher-order form is a little shorter (747.5 s: it subtracts the save and adds small terms)."""
    mtbf = META_1024.mtbf_s(1024)
    assert mtbf == pytest.approx(7.9 * 3600) == pytest.approx(28_440)
    assert young_interval_s(10, mtbf) == pytest.approx(math.sqrt(2 * 10 * 28_440)) == pytest.approx(754.19, abs=0.01)
    assert daly_interval_s(10, mtbf) == pytest.approx(747.54, abs=0.01)
    assert daly_interval_s(100, 40) == 40  # a save longer than twice the MTBF: save once per MTBF


def test_the_mtbf_falls_and_the_interval_shortens_as_the_job_grows() -> None:
    mtbfs = [META_1024.mtbf_s(gpus) for gpus in (1, 8, 64, 1024, 16384)]
    assert mtbfs == sorted(mtbfs, reverse=True) and mtbfs[1] == pytest.approx(1011.2 * 3600)
    intervals = [daly_interval_s(0.5, mtbf) for mtbf in mtbfs]
    assert intervals == sorted(intervals, reverse=True)
    # the paper's other figure reads as fewer failures per GPU than the 1,024-GPU one
    assert META_16384.mtbf_s(16384) == pytest.approx(1.8 * 3600) and META_16384.mtbf_s(1024) > mtbfs[3]
    with pytest.raises(ValueError):
        META_1024.mtbf_s(0)


def test_the_advised_interval_loses_the_least_and_twice_off_loses_a_quarter_more() -> None:
    save, restart, mtbf = 2.0, 60.0, META_1024.mtbf_s(64)
    best = daly_interval_s(save, mtbf)
    loss = lost_share(best, save, restart, mtbf)
    assert all(lost_share(best * k, save, restart, mtbf) > loss for k in (0.5, 0.9, 1.1, 2))
    advice = advise(save, 64, every_steps=2000, step_s=2 * best / 2000)
    assert advice.ratio == pytest.approx(2) and advice.excess == pytest.approx(1.25) and not advice.far
    assert advise(save, 64, every_steps=2001, step_s=2 * best / 2000).far
    assert advise(save, 64, every_steps=2000, step_s=None).ratio is None
    assert advise(0.0, 64, every_steps=10, step_s=0.1).interval_s == pytest.approx(daly_interval_s(1e-3, mtbf))


def test_a_save_is_estimated_from_its_bytes_at_the_measured_rates() -> None:
    assert estimated_save_s(2_000_000_000, async_save=True) == pytest.approx(0.05 + 1.0)
    assert estimated_save_s(350_000_000, async_save=False) == pytest.approx(0.05 + 1.0)


def test_dry_run_advises_from_the_model_size_and_the_job_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 ranks of the tiny model (8,784 parameters: 105,408 bytes, written blocking at 0.35 GB/s + 0.05 s
    = 0.0503 s); a 64-GPU job fails every 7.9 h x 1,024 / 64 = 126 h 24 min; Daly: 213.9 s."""
    with monkeypatch.context() as env:
        env.setenv("WORLD_SIZE", "64")
        env.setenv("RANK", "0")
        report = run_in_process("train", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", "--dry-run").stdout
    first = field(report, "checkpoint interval (Young/Daly)")
    assert first.startswith(
        "checkpoint interval (Young/Daly): a save blocks training ~0.0503 s (estimated: 0.1 MB (8,784 parameters x "
        "12 B) at 0.35 GB/s writing (checkpoint.async_save=false), + 0.05 s); a job of 64 GPU(s) fails every ~126h24m "
        "(scaled per GPU from 7.9 h at 1,024 GPUs: Kokolis et al. 2024"
    )
    assert field(report, "  least work lost") == (
        "  least work lost saving every ~3m34s of training; checkpoint.every=10 in time unknown until the run has "
        "logged a step"
    )
    assert not (tmp_path / "run").exists()


def test_dry_run_reads_the_save_cost_and_step_time_a_run_logged(tmp_path: Path) -> None:
    """Saves logged blocking 0.4, 0.5 and 2.0 s: the median, 0.5 s; 8 GPUs: 1,011 h; Daly: 1,907.6 s =
    19,076 steps of 100 ms, against checkpoint.every=10: far off."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "stats.jsonl").write_text(json.dumps({"step": 10, "step_time_ms": 100.0}) + "\n")
    (run / "train.log").write_text(
        "".join(
            f"12:00:0{i} INFO dcgan.run.checkpoint: checkpoint of step {10 * i} complete: {run}/checkpoints/"
            f"step_{10 * i:09d} (its save blocked training {blocked:.3f} s)\n"
            for i, blocked in enumerate((0.4, 2.0, 0.5), start=1)
        )
    )
    config = tiny_config(run)
    from dcgan.train.plan import checkpoint_advice

    first, second = checkpoint_advice(config, world_size=8, step_ms=100.0, newest=None)
    assert first.startswith(
        f"checkpoint interval (Young/Daly): a save blocks training ~0.5 s (measured: the median of the saves logged "
        f"in {run / 'train.log'}); a job of 8 GPU(s) fails every ~1011h12m"
    )
    assert second == (
        "  least work lost saving every ~31m48s of training = ~19076 steps; checkpoint.every=10 is 0.00052x that: "
        "far from it, losing 953.8x the least: checkpoint.every=19076 is the advice"
    )


def test_a_trained_run_logs_what_its_saves_blocked_and_the_dry_run_uses_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(run, "train.steps=10")) == EXIT_OK
    assert "(its save blocked training " in (run / "train.log").read_text()
    report = run_in_process("train", "configs/tiny.yaml", f"run.dir={run}", "--dry-run").stdout
    assert f"(measured: the median of the saves logged in {run / 'train.log'})" in field(report, "checkpoint interval")
    assert field(report, "  least work lost").startswith("  least work lost saving every ~")
    assert " steps; checkpoint.every=10 is " in field(report, "  least work lost")
