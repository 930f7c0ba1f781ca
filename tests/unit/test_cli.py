"""The command lines as a user meets them: help texts with defaults, and what `dcgan sample` draws."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, TINY, read_stats, run_in_process
from PIL import Image

from dcgan.cli.main import build_parser
from dcgan.cli.main import main as dcgan_main
from dcgan.cli.submit import build_parser as slurm_parser
from dcgan.cluster.slurm_job import rendezvous_port
from dcgan.config import load_config


def every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """A parser and all its subcommands' parsers, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += every_parser(sub)
    return found


@pytest.mark.parametrize("top", [build_parser, slurm_parser], ids=["dcgan", "launch.slurm alias"])
def test_every_option_has_help_and_shows_its_default(top: object) -> None:
    parsers = every_parser(top())  # type: ignore[operator]
    assert len(parsers) > 1 or top is slurm_parser
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            meaningful = action.default not in (None, False, "", [], argparse.SUPPRESS)
            if meaningful and (action.option_strings or action.nargs in ("?", "*")):
                assert "default" in formatter._get_help_string(action), (
                    f"{where} does not show its default {action.default!r}"
                )  # type: ignore[operator]


def test_top_level_help_is_about_the_tool_and_names_every_command() -> None:
    text = build_parser().format_help()
    assert "Train DCGANs" in text and "thin layer" not in text
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in commands:
        assert re.search(rf"^  dcgan {command}\b", text, re.MULTILINE), f"`dcgan {command}` is not described"


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_draws_fresh_noise_repeatable_by_seed(trained_digits_run: Path, tmp_path: Path) -> None:
    """(That `--fixed-noise` draws the training grid again: test_generators, on a run with an average.)"""
    run = trained_digits_run
    num = load_config(run / "config.yaml").sample.num
    fresh = run_in_process("sample", str(run), "--num", str(num), "--out", str(tmp_path / "fresh.png")).stdout
    seed = int(re.search(r"--seed (\d+) draws the same grid again", fresh).group(1))
    run_in_process("sample", str(run), "--num", str(num), "--seed", str(seed), "--out", str(tmp_path / "again.png"))
    training_grid = pixels(sorted((run / "samples").glob("step_*.png"))[-1])
    assert np.array_equal(pixels(tmp_path / "fresh.png"), pixels(tmp_path / "again.png"))
    assert not np.array_equal(pixels(tmp_path / "fresh.png"), training_grid)


def test_report_is_one_offline_page_with_the_runs_numbers_and_sample_strip(
    trained_digits_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    printed = run_in_process("report", str(trained_digits_run), "--out", str(out)).stdout
    assert f"file://{out.resolve()}" in printed
    page = out.read_text()
    data = json.loads(
        re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S).group(1)
    )
    logged = [row for row in read_stats(trained_digits_run) if "loss_D" in row]
    assert data["charts"]["Losses"]["loss_D"] == [[row["images_seen"], row["loss_D"]] for row in logged]
    assert data["charts"]["D(x) and D(G(z))"]["D_x"] == [[row["images_seen"], row["D_x"]] for row in logged]
    assert [x for x, _ in data["charts"]["Training rate (img/s, eval time excluded)"]["img_per_s"]] == [
        row["images_seen"] for row in logged
    ]
    grids = sorted((trained_digits_run / "samples").glob("step_*.png"))
    assert page.count("<img ") == min(len(grids), 8) >= 1
    assert page.count("<polyline ") >= 5 and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_report_of_a_directory_that_is_not_a_run_is_one_line(tmp_path: Path) -> None:
    result = run_in_process("report", str(tmp_path), check=False)
    assert (
        result.returncode == 2
        and result.stderr.strip()
        == f"dcgan: error: {tmp_path} has neither stats.jsonl nor samples/ nor compare.json: is it a run or comparison directory?"
    )


def test_a_second_eval_of_the_same_step_adds_a_file_instead_of_overwriting(
    trained_digits_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_digits_run, run)
    for _ in range(2):
        run_in_process("eval", str(run), "--data", "digits", "-n", "64", "--metrics", "digits")
    written = sorted(p.name for p in run.glob("eval-step*.json"))
    assert written == ["eval-step300.2.json", "eval-step300.json"]
    assert json.loads((run / "eval-step300.json").read_text())["num"] == 64


def documented_commands() -> list[list[str]]:
    """Every `dcgan ...` command of the bash blocks of README.md and docs/*.md, as argv after the program
    name (continuation lines joined, comments and environment assignments dropped)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words[:1] in (["dcgan"], [".venv/bin/dcgan"]):
                    commands.append(["dcgan", *words[1:]])
                elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["dcgan"]:
                    at = words.index("-m")
                    commands.append([words[at + 1], *words[at + 2 :]])
    return commands


def test_every_documented_command_parses_and_its_config_loads() -> None:
    """The commands of the README and docs, as written: options that exist, config keys that exist, values
    that are valid."""
    commands = documented_commands()
    assert len(commands) >= 12 and sum(c[1:2] == ["submit"] for c in commands) >= 4
    for program, *argv in commands:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README: `{program} {shlex.join(argv)}` does not parse")
        if (
            getattr(args, "config", None)
            and getattr(args, "command", "train") in ("train", "submit")
            and hasattr(args, "overrides")
        ):
            load_config(args.config, args.overrides)


def test_a_batch_larger_than_the_digits_is_one_line_before_the_run_directory_exists(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_in_process(
        "train", str(ROOT / "configs" / "digits.yaml"), "train.batch_size=4000", f"run.dir={run}", check=False
    )
    assert (result.returncode, result.stderr) == (
        2,
        "dcgan: error: the global batch of 4000 images is larger than the built-in digits (1797): "
        "use a smaller train.global_batch or train.batch_size, or shards of a larger data set\n",
    )
    assert not run.exists()


def test_a_batch_larger_than_the_shards_is_the_same_line_before_the_run_directory_exists(
    digits_shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = run_in_process(
        "train", str(TINY), f"data.shards={digits_shards}", "train.batch_size=4000", f"run.dir={run}", check=False
    )
    assert not run.exists()
    assert (result.returncode, result.stderr) == (
        2,
        "dcgan: error: the global batch of 4000 images is larger than the shards (1797 images): "
        "use a smaller train.global_batch or train.batch_size\n",
    )


def test_overrides_may_follow_an_option(tmp_path: Path) -> None:
    run = tmp_path / "run"
    printed = run_in_process("train", str(TINY), "--dry-run", "train.steps=5", f"run.dir={run}").stdout
    assert "  steps: 5\n" in printed and f"run.dir: {run} (starts fresh)" in printed and not run.exists()
    args = build_parser().parse_args(
        ["bench", "step", "configs/celeba64.yaml", "--batch-sizes", "128", "train.compile=true"]
    )
    assert (args.config, args.batch_sizes, args.overrides) == ("configs/celeba64.yaml", "128", ["train.compile=true"])
    # the override after the options reaches the config (an invalid value: refused before any benchmark runs)
    bench = run_in_process(
        "bench", "step", str(TINY), "--batch-sizes", "8", "--iters", "1", "train.precision=fp17", check=False
    )
    assert (bench.returncode, bench.stderr) == (
        2,
        "dcgan: error: train.precision: expected auto | fp32 | bf16 | fp16, got 'fp17'\n",
    )
    args = build_parser().parse_args(
        ["compare", str(TINY), "--b", "train.ema=0.9", "train.steps=5", "--seeds", "1", "seed=3"]
    )
    assert (args.b, args.seeds, args.overrides) == ("train.ema=0.9", 1, ["train.steps=5", "seed=3"])
    with contextlib.redirect_stdout(io.StringIO()) as slurm_out:  # dcgan submit parses the same way
        assert dcgan_main(["submit", str(TINY), "--nodes", "2", "--dry-run", "train.steps=5", f"run.dir={run}"]) == 0
    assert "  steps: 5\n" in slurm_out.getvalue() and not run.exists()


def test_compare_reports_a_failed_training_as_that_arm_and_seeds_failure(tmp_path: Path) -> None:
    """A valid setting whose training fails at run time (a learning rate that makes the loss non-finite)."""
    out = tmp_path / "compare"
    result = run_in_process(
        "compare",
        str(TINY),
        "train.steps=5",
        "--a",
        "optim.lr=1e38",
        "--b",
        "",
        "--seeds",
        "1",
        "--out",
        str(out),
        check=False,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    run = next(out.glob("seed0-*"))
    assert lines[0] == (
        f"dcgan: error: seed 0 A: training {run} failed (exit status 3): non-finite loss at or before step 5: stopping; "
        f"no checkpoint was completed; log: {run / 'train.log'}"
    )


def test_both_launchers_rendezvous_on_a_new_port_per_requeue_below_the_ephemeral_range() -> None:
    """dcgan submit and slurm/train.sbatch spell one rule in two languages: they must agree, move a
    requeued job off its previous attempt's port, and stay out of 32768-60999."""
    line = next(x for x in (ROOT / "slurm/train.sbatch").read_text().splitlines() if x.startswith("RDZV_PORT="))
    for job_id, restart in [("7", 0), ("7", 1), ("123456", 0), ("123456", 3), ("99999999", 2)]:
        env = {"SLURM_JOB_ID": job_id, "SLURM_RESTART_COUNT": str(restart), "PATH": "/usr/bin:/bin"}
        shell = subprocess.run(["bash", "-c", f"{line}; echo $RDZV_PORT"], env=env, capture_output=True, text=True)
        port = rendezvous_port(job_id, restart)
        assert int(shell.stdout) == port
        assert 20000 <= port < 32768
        assert rendezvous_port(job_id, restart + 1) != port


def test_a_node_range_is_one_line_when_malformed_or_when_a_node_count_cannot_share_the_global_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = f"run.dir={tmp_path / 'run'}"
    assert dcgan_main(["submit", str(TINY), run, "--nodes", "2-1", "--dry-run"]) == 2
    assert (
        capsys.readouterr().err == "dcgan submit: error: --nodes 2-1: needs N >= 1, or 1 <= MIN <= MAX, e.g. 2 or 1-4\n"
    )
    assert dcgan_main(["submit", str(TINY), run, "train.global_batch=16", "--nodes", "1-3", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "dcgan submit: error: --nodes 1-3 x 1 task(s) may give world size 3: train.global_batch: 16 images cannot "
        "be split over 3 ranks: run on a number of ranks that divides it (1, 2, 4, 8, 16) or change "
        "train.global_batch\n"
    )
    assert dcgan_main(["submit", str(TINY), run, "train.global_batch=16", "--nodes", "1-2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--nodes 1-2: the plan above is for the fewest (1 node(s), world size 1); an attempt may get any of " in out
    assert "world sizes 1, 2, global batch 16 on each" in out
    assert not (tmp_path / "run").exists()


def test_a_node_range_on_shards_gets_partitions_every_node_count_can_share(
    digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [str(TINY), f"run.dir={tmp_path / 'run'}", f"data.shards={digits_shards}", "train.global_batch=24"]
    assert dcgan_main(["submit", *common, "--nodes", "2-3", "--dry-run"]) == 0  # world sizes 2 and 3: lcm 6
    assert "\n    partitions: 6\n" in capsys.readouterr().out
    assert dcgan_main(["submit", *common, "data.partitions=4", "--nodes", "2-3", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "dcgan submit: error: --nodes 2-3 x 1 task(s) may give world size 3, which data.partitions=4 does not "
        "suit: use a multiple of 6 that divides the global batch\n"
    )


def test_the_old_launch_slurm_name_still_finds_what_queued_jobs_pickled() -> None:
    """A job queued before `dcgan submit` holds a pickled `launch.slurm.TrainJob`: unpickling looks the class
    up by that name, and `python -m launch.slurm` is `dcgan submit` under its old name."""
    import pickle

    import launch.slurm
    from dcgan.cli.submit import main as submit_main
    from dcgan.cluster.slurm_job import TrainJob

    unpickler = pickle.Unpickler(io.BytesIO(b""))
    assert unpickler.find_class("launch.slurm", "TrainJob") is TrainJob
    assert launch.slurm.main is submit_main
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        launch.slurm.main(["--help"])
    assert out.getvalue().startswith("usage: dcgan submit [-h] [--nodes N|MIN-MAX]")


def test_a_sweep_value_in_brackets_is_one_value_commas_and_all() -> None:
    """`--sweep loss.augment=[color,translation],cutout`: a key whose value is a list can be swept; every
    point's config loads with the value meant."""
    from dcgan.cluster.sweep import parse_sweep, point_name
    from dcgan.config import ConfigError, load_config

    points = parse_sweep(["loss.augment=[color,translation],cutout", "seed=0,1"])
    assert points == [
        {"loss.augment": "color,translation", "seed": "0"},
        {"loss.augment": "color,translation", "seed": "1"},
        {"loss.augment": "cutout", "seed": "0"},
        {"loss.augment": "cutout", "seed": "1"},
    ]
    assert point_name(points[0]) == "augment=color,translation_seed=0"
    configs = [load_config(str(TINY), [f"{k}={v}" for k, v in p.items()]) for p in points]
    assert [c.loss.augment for c in configs] == ["color,translation", "color,translation", "cutout", "cutout"]
    assert parse_sweep(["optim.lr=1e-4, 2e-4"]) == [{"optim.lr": "1e-4"}, {"optim.lr": "2e-4"}]
    off_and_on = parse_sweep(["loss.augment=[], [color,translation]"])  # the empty setting is a value too
    assert [load_config(str(TINY), [f"loss.augment={p['loss.augment']}"]).loss.augment for p in off_and_on] == [
        "",
        "color,translation",
    ]
    with pytest.raises(ConfigError, match="write key=value1,value2"):
        parse_sweep(["loss.augment="])
