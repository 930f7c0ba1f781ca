"""The command lines as a user meets them: help texts with defaults, and what `dcgan sample` draws."""

from __future__ import annotations

import argparse
import json
import shutil
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcgan.cli import build_parser
from dcgan.config import load_config
from launch.slurm import build_parser as slurm_parser

from helpers import ROOT, read_stats, run_in_process


def every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """A parser and all its subcommands' parsers, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += every_parser(sub)
    return found


@pytest.mark.parametrize("top", [build_parser, slurm_parser], ids=["dcgan", "launch.slurm"])
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
                assert "default" in formatter._get_help_string(action), f"{where} does not show its default {action.default!r}"  # type: ignore[operator]


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


def test_report_is_one_offline_page_with_the_runs_numbers_and_sample_strip(trained_digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    printed = run_in_process("report", str(trained_digits_run), "--out", str(out)).stdout
    assert f"file://{out.resolve()}" in printed
    page = out.read_text()
    data = json.loads(re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S).group(1))
    logged = [row for row in read_stats(trained_digits_run) if "loss_D" in row]
    assert data["charts"]["Losses"]["loss_D"] == [[row["images_seen"], row["loss_D"]] for row in logged]
    assert data["charts"]["D(x) and D(G(z))"]["D_x"] == [[row["images_seen"], row["D_x"]] for row in logged]
    assert [x for x, _ in data["charts"]["Training rate (img/s, eval time excluded)"]["img_per_s"]] == [row["images_seen"] for row in logged]
    grids = sorted((trained_digits_run / "samples").glob("step_*.png"))
    assert page.count("<img ") == min(len(grids), 8) >= 1
    assert page.count("<polyline ") >= 5 and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_report_of_a_directory_that_is_not_a_run_is_one_line(tmp_path: Path) -> None:
    result = run_in_process("report", str(tmp_path), check=False)
    assert result.returncode == 2 and result.stderr.strip() == f"dcgan: error: {tmp_path} has neither stats.jsonl nor samples/: is it a run directory?"


def test_a_second_eval_of_the_same_step_adds_a_file_instead_of_overwriting(trained_digits_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_digits_run, run)
    for _ in range(2):
        run_in_process("eval", str(run), "--data", "digits", "-n", "64", "--metrics", "digits")
    written = sorted(p.name for p in run.glob("eval-step*.json"))
    assert written == ["eval-step300.2.json", "eval-step300.json"]
    assert json.loads((run / "eval-step300.json").read_text())["num"] == 64


def readme_commands() -> list[list[str]]:
    """Every `dcgan ...` and `python -m launch.slurm ...` command of the README's bash blocks, as argv
    after the program name (continuation lines joined, comments and environment assignments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words[:1] in (["dcgan"], [".venv/bin/dcgan"]):
                    commands.append(["dcgan", *words[1:]])
                elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] in (["dcgan"], ["launch.slurm"]):
                    at = words.index("-m")
                    commands.append([words[at + 1], *words[at + 2 :]])
    return commands


def test_every_readme_command_parses_and_its_config_loads() -> None:
    """The README's commands, as written: options that exist, config keys that exist, values that are valid."""
    commands = readme_commands()
    assert sum(c[0] == "dcgan" for c in commands) >= 12 and sum(c[0] == "launch.slurm" for c in commands) >= 4
    for program, *argv in commands:
        parser = build_parser() if program == "dcgan" else slurm_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README: `{program} {shlex.join(argv)}` does not parse")
        if getattr(args, "config", None) and getattr(args, "command", "train") == "train" and hasattr(args, "overrides"):
            load_config(args.config, args.overrides)
