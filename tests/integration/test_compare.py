"""`dcgan compare`: seeded comparisons with intervals, shared runs, resumable."""

from __future__ import annotations

import html
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CPU, ROOT, TINY, completed_steps, read_stats, run_in_process, subprocess_env
from hosts import wait_for
from scipy import stats

from dcgan.config import ConfigError, load_config
from dcgan.evaluation.compare import compare, describe_settings, training_identity, write_comparison
from dcgan.evaluation.spread import Spread


def test_spread_is_the_mean_std_and_t_interval() -> None:
    values = [4.40, 4.56, 6.05]
    spread = Spread.of(values)
    sem = stats.sem(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem)
    assert spread.mean == pytest.approx(np.mean(values)) and spread.std == pytest.approx(np.std(values, ddof=1))
    assert spread.mean - spread.half_width == pytest.approx(low) and spread.mean + spread.half_width == pytest.approx(
        high
    )
    assert not spread.excludes_zero() or low > 0
    assert math.isnan(Spread.of([1.0]).half_width)


def test_runs_are_shared_exactly_when_training_does_not_differ() -> None:
    base = training_identity(load_config(TINY))
    for same in (["sample.bn=batch"], ["sample.ema=false"], ["eval.every=5"], ["log.every=7", "run.dir=/elsewhere"]):
        assert training_identity(load_config(TINY, same)) == base, same
    assert base == "b50533730832"  # as before the options beyond the paper existed: older comparisons find their runs
    for other in (
        ["train.ema=0.9"],
        ["seed=1"],
        ["data.shuffle_buffer=10"],
        ["optim.lr=1e-3"],
        ["optim.lr_d=4e-4"],
        ["optim.beta1_g=0"],
        ["loss.kind=hinge"],
        ["model.spectral_norm=d"],
        ["loss.r1=1"],
    ):
        assert training_identity(load_config(TINY, other)) != base, other
    assert describe_settings(str(TINY), [], ["train.ema=0"], ["train.ema=0.99"]) == "train.ema: 0.0 -> 0.99"
    with pytest.raises(ConfigError, match="describe the same config"):
        describe_settings(str(TINY), [], ["sample.bn=standing"], [])


@pytest.mark.slow
def test_a_comparison_trains_each_run_once_scores_it_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "compare"
    common = ["train.steps=20"]
    first = compare(str(TINY), common, ["sample.bn=running"], ["sample.bn=batch"], [0, 1], root, num=300, info=CPU)
    assert first.runs["A"] == first.runs["B"] and len(set(first.runs["A"])) == 2  # bn only: the same two runs
    out = tmp_path / "e.json"
    run_in_process(
        "eval",
        first.runs["B"][1],
        "--data",
        "digits",
        "-n",
        "300",
        "--metrics",
        "digits",
        "--bn",
        "batch",
        "--out",
        str(out),
    )
    assert json.loads(out.read_text())["digits_frechet"] == pytest.approx(first.values["B"][1], rel=1e-12)
    diffs = [b - a for a, b in zip(first.values["A"], first.values["B"], strict=True)]
    assert first.difference.mean == pytest.approx(np.mean(diffs)) and first.difference.std == pytest.approx(
        np.std(diffs, ddof=1)
    )
    logs = {run: (Path(run) / "stats.jsonl").read_text() for run in first.runs["A"]}
    again = compare(str(TINY), common, ["sample.bn=running"], ["sample.bn=batch"], [0, 1], root, num=300, info=CPU)
    assert again.values == first.values  # finished runs are reused: same numbers, nothing retrained
    assert {run: (Path(run) / "stats.jsonl").read_text() for run in again.runs["A"]} == logs
    record = json.loads(write_comparison(first, root).read_text())
    assert record["metric"] == "digits_frechet" and record["lower_is_better"] and "verdict" in record
    assert record["values"]["A"] == first.values["A"]


@pytest.mark.slow
def test_the_recipe_is_an_arm_trained_on_the_same_images_and_scored_by_the_same_metric(tmp_path: Path) -> None:
    """`dcgan compare tiny.yaml --b recipe`: the pytorch/examples recipe against the project, two seeds;
    the recipe's run holds its G (batch statistics) and is reused, not retrained, by a second comparison."""
    from dcgan.evaluation.generators import load_export
    from dcgan.evaluation.recipe import EXPORT, permuted_batches

    root = tmp_path / "compare"
    common = ["train.steps=30"]
    found = compare(str(TINY), common, [], ["recipe"], [0, 1], root, num=300, info=CPU)
    assert all(0 < value < 100 for value in found.values["A"] + found.values["B"])
    recipe_runs = [Path(run) for run in found.runs["B"]]
    assert [run.name.split("-")[1] for run in recipe_runs] == ["recipe", "recipe"]
    for run in recipe_runs:
        loaded = load_export(run / EXPORT)
        assert (loaded.bn, loaded.step) == ("batch", 30)
        assert not (run / "checkpoints").exists()  # not a project run
    assert found.values["B"][0] != found.values["B"][1]  # seeds differ
    stamp = (recipe_runs[0] / EXPORT).stat().st_mtime_ns
    again = compare(str(TINY), common, ["sample.bn=batch"], ["recipe"], [0], root, num=300, info=CPU)
    assert (recipe_runs[0] / EXPORT).stat().st_mtime_ns == stamp and again.values["B"] == found.values["B"][:1]
    assert describe_settings(str(TINY), common, [], ["recipe"]).startswith("the pytorch/examples recipe")
    run_in_process("report", str(root))  # the project's arm drawn, the recipe's said to log no curves
    page = (root / "report.html").read_text()
    assert "A (mean of 1 seed)" in page and "B: the pytorch/examples recipe logs no curves" in page
    # its data order: a permutation of every image each epoch, the last batch smaller
    images = torch.arange(10).view(10, 1, 1, 1)
    batches = permuted_batches(images, 4, torch.Generator().manual_seed(0))
    epoch = [next(batches) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(torch.cat(epoch).flatten().tolist()) == list(range(10))


@pytest.mark.slow  # wandb runs in processes of their own
def test_a_comparisons_report_draws_each_setting_as_its_mean_over_seeds_and_wandb_groups_its_runs(
    tmp_path: Path,
) -> None:
    """`dcgan report COMPARE_DIR`: per metric, each setting's mean over seeds with the band from its lowest
    seed to its highest, computed here again from the runs' stats.jsonl; each setting's runs share one wandb
    group (wandb draws a group as the same mean and band) that no other setting or comparison has."""
    from dcgan.evaluation.compare import COMPARISON
    from dcgan.run.stats import read_stats
    from dcgan.run.wandb_files import records

    root = tmp_path / "study"
    common = ["train.steps=20", "log.every=5", "log.wandb=offline", "eval.every=10", "eval.num=64"]
    found = compare(str(TINY), common, [], ["loss.kind=hinge"], [0, 1], root, num=300, info=CPU)  # writes compare.json
    moved = tmp_path / "moved"
    root.rename(moved)  # the page finds the runs inside the directory, wherever it now is
    result = run_in_process("report", str(moved))
    page = (moved / "report.html").read_text()
    assert str(moved / "report.html") in result.stdout and html.escape(found.table()) in page
    data = json.loads(page.split("id='report-data'>")[1].split("</script>")[0])
    for setting, runs in found.runs.items():
        stats = [read_stats(moved / Path(run).name / "stats.jsonl") for run in runs]
        for key in ("loss_D", "eval/swd"):
            per_seed = [{row["images_seen"]: row[key] for row in rows if key in row} for rows in stats]
            xs = sorted(per_seed[0])
            assert xs == sorted(per_seed[1]) and len(xs) >= 2, key
            band = data["bands"][key][setting]
            assert band["x"] == xs and band["seeds"] == 2
            values = np.array([[seed[x] for seed in per_seed] for x in xs])
            assert band["mean"] == pytest.approx(values.mean(axis=1).tolist(), rel=1e-12)
            assert band["low"] == values.min(axis=1).tolist() and band["high"] == values.max(axis=1).tolist()
            assert any(low < high for low, high in zip(band["low"], band["high"], strict=True))  # the seeds differ
    assert data["bands"]["loss_D"]["A"]["mean"] != data["bands"]["loss_D"]["B"]["mean"]  # BCE vs hinge
    assert "r1_penalty" not in data["bands"]  # zero in every run: no chart
    assert page.count("<polygon ") == 2 * len(data["bands"])  # a band under each setting's line, every chart
    groups = {
        setting: {
            record.run.run_group
            for run in runs
            for record in records(next((moved / Path(run).name / "wandb").glob("offline-run-*/run-*.wandb")))
            if record.WhichOneof("record_type") == "run"
        }
        for setting, runs in found.runs.items()
    }
    (group_a,), (group_b,) = groups["A"], groups["B"]  # one group per setting, both seeds in it
    assert group_a.startswith("study/A-") and group_b.startswith("study/B-") and group_a[-8:] != group_b[-8:]
    assert json.loads((moved / COMPARISON).read_text())["table"] == found.table()


def training_pids(run_dir_prefix: str) -> list[int]:
    """Processes whose command line names a run directory under `run_dir_prefix` (a comparison's runs)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"run.dir={run_dir_prefix}".encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


STEPS = 100
"""The comparison's run is stopped at its first metric line (step 5): it always lands mid-run."""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, prctl's parent-death signal)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_comparison_leaves_no_run_training_and_the_same_command_resumes_it(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM (a `kill`, a `timeout`) reaches the run through the comparison; SIGKILL cannot be passed
    on, and the kernel's parent-death signal stops the run instead. Either way the run checkpoints at its
    next step and ends, nothing trains on, and the same command carries on from that checkpoint."""
    root = tmp_path / "compare"
    args = [
        str(TINY),
        f"train.steps={STEPS}",
        f"checkpoint.every={STEPS}",
        "log.every=5",
        "--a",
        "",
        "--b",
        "sample.bn=running",
    ]
    args += ["--seeds", "1", "-n", "64", "--out", str(root)]
    comparison = subprocess.Popen(
        [sys.executable, "-m", "dcgan", "compare", *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(p.stat().st_size for p in root.glob("seed0-*/stats.jsonl")), 300, "a metric line")
        run = next(root.glob("seed0-*"))
        [child] = training_pids(str(root))
        comparison.send_signal(signum)
        _, stderr = comparison.communicate(timeout=120)
    finally:
        comparison.kill()
    wait_for(lambda: not training_pids(str(root)), 120, "the run to end")
    [kept] = completed_steps(run)
    logged = [line["step"] for line in read_stats(run)]
    assert 0 < kept < STEPS and max(logged) <= kept, (kept, logged, stderr)
    if signum == signal.SIGTERM:
        assert comparison.returncode == 143  # the run's: checkpointed after SIGTERM
        assert stderr.splitlines()[-1] == (
            f"dcgan: error: stopped by SIGTERM while seed 0 A trained: its run kept step {kept} of {STEPS} ({run}); "
            "the same command resumes the comparison"
        )
    else:
        assert comparison.returncode == -signal.SIGKILL
    assert f"stop signal received: checkpointing step {kept}" in (run / "train.log").read_text()
    assert child not in training_pids("")
    resumed = run_in_process("compare", *args)
    assert f"seed 0 A: training {run}" in resumed.stdout and completed_steps(run) == [kept, STEPS]
    steps = [line["step"] for line in read_stats(run)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # carried on from the checkpoint, nothing repeated
