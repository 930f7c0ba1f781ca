"""`--dry-run` of `dcgan train` and `dcgan submit`: the plan, field by field, and nothing run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from helpers import run_in_process, tiny_config

from dcgan.errors import EXIT_OK
from dcgan.train.loop import train


def field(report: str, prefix: str) -> str:
    (line,) = [line for line in report.splitlines() if line.startswith(prefix)]
    return line


def test_train_dry_run_prints_the_plan_and_trains_nothing(
    digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    args = (
        "train",
        "configs/tiny.yaml",
        f"run.dir={run}",
        f"data.shards={digits_shards}",
        "train.steps=300",
        "--dry-run",
    )
    with monkeypatch.context() as env:  # as rank 0 of 2 under torchrun (read by the command, not at import)
        env.setenv("WORLD_SIZE", "2")
        env.setenv("RANK", "0")
        report = run_in_process(*args).stdout
    assert report.startswith("resolved config:\n  seed: 0\n")
    assert f"    shards: {digits_shards}\n" in report
    assert field(report, "world size") == "world size: 2 rank(s); batch 16 per rank, global batch 32"
    assert field(report, "data:") == f"data: {digits_shards}: 8 shard(s), 1797 images"
    assert (
        "  2 partitions (data.partitions) of 16 images a step, each reading its share of a new deal of all 8 shards "
        "every epoch, then further deals (data.resampled=true); each rank reads 1; 1792 images per epoch\n" in report
    )
    assert field(report, "steps per epoch") == "steps per epoch: 56; train.steps 300 = 5.4 epochs, 9600 images"
    assert field(report, "run.dir") == f"run.dir: {run} (starts fresh)"
    assert field(report, "cadence") == "cadence (wall clock unknown until the run has logged a step):"
    assert field(report, "  checkpoint  every") == "  checkpoint  every 10 steps"
    assert not run.exists()  # nothing was created, let alone trained

    assert train(tiny_config(run, "train.steps=10")) == EXIT_OK
    again = run_in_process("train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=300", "--dry-run").stdout
    assert field(again, "run.dir") == f"run.dir: {run} (resumes from step_000000010)"
    assert f"ms/step last measured in {run / 'stats.jsonl'}):" in field(again, "cadence")
    assert field(again, "  checkpoint  every").startswith("  checkpoint  every 10 steps (~")
    assert field(again, "  whole run").startswith("  whole run   ~")
    assert field(again, "world size") == "world size: 1 rank(s); batch 16 per rank, global batch 16"


def test_slurm_dry_run_prints_the_plan_and_the_sbatch_script_and_submits_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    report = run_in_process(
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'run'}",
        "--nodes",
        "2",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--partition",
        "debug",
        "--folder",
        str(folder),
        "--dry-run",
        program="dcgan submit",
    ).stdout
    assert field(report, "world size") == "world size: 4 rank(s); batch 16 per rank, global batch 64"
    script = report.split("sbatch script:\n", 1)[1]
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --partition=debug",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=dcgan-run",
    ):
        assert line in script.splitlines()
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    if shutil.which("sbatch"):  # SLURM's own verdict on the request (2 nodes: refused by a 1-node cluster)
        assert re.search(
            r"^SLURM \(sbatch --test-only\): (accepts|REFUSES): \S", report.split("sbatch script:")[0], re.M
        )
    assert not folder.exists()  # no job, no log folder


def test_slurm_dry_run_fails_like_a_submission_would(tmp_path: Path) -> None:
    """Impossible resources; a bad config value: test_slurm.py, for both."""
    result = run_in_process(
        "configs/tiny.yaml",
        "--nodes",
        "0",
        "--dry-run",
        "--folder",
        str(tmp_path / "f"),
        program="dcgan submit",
        check=False,
    )
    assert result.returncode == 2 and result.stderr.startswith("dcgan submit: error: ")
    assert not (tmp_path / "f").exists()
