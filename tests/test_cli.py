"""The command lines as a user meets them: help texts with defaults, and what `dcgan sample` draws."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcgan.cli import build_parser
from dcgan.config import load_config
from launch.slurm import build_parser as slurm_parser

from conftest import run_cli


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


def test_sample_draws_fresh_noise_repeatable_by_seed_and_the_fixed_noise_on_request(trained_digits_run: Path, tmp_path: Path) -> None:
    run = trained_digits_run
    num = load_config(run / "config.yaml").sample.num
    fresh = run_cli("sample", str(run), "--num", str(num), "--out", str(tmp_path / "fresh.png")).stdout
    seed = int(re.search(r"--seed (\d+) draws the same grid again", fresh).group(1))
    run_cli("sample", str(run), "--num", str(num), "--seed", str(seed), "--out", str(tmp_path / "again.png"))
    run_cli("sample", str(run), "--num", str(num), "--fixed-noise", "--out", str(tmp_path / "fixed.png"))
    training_grid = pixels(sorted((run / "samples").glob("step_*.png"))[-1])
    assert np.array_equal(pixels(tmp_path / "fresh.png"), pixels(tmp_path / "again.png"))
    assert np.array_equal(pixels(tmp_path / "fixed.png"), training_grid)
    assert not np.array_equal(pixels(tmp_path / "fresh.png"), training_grid)
