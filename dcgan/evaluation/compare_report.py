"""`dcgan report COMPARE_DIR`: the curves of a comparison's two settings, each with its band over seeds.

A comparison's verdict rests on one number per run, taken at the last step; the curves say how each
setting got there: whether B led all along or crossed A at the end, whether one seed ran away, whether
D began to memorise (D_overfit). For every metric the runs log, each setting's runs are lined up on
images seen and drawn as their mean over seeds with a band from the lowest seed to the highest (what
wandb draws for a group of runs: `dcgan compare` puts each setting's runs in one wandb group). The page
reads only compare.json (which `dcgan compare` writes after every seed) and the runs' stats.jsonl, so it
works offline and while a comparison goes on, drawing the seeds done so far.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan.evaluation.charts import STYLE, Bands, Series, svg_chart
from dcgan.evaluation.compare import COMPARISON
from dcgan.evaluation.recipe import RECIPE
from dcgan.evaluation.report import X_AXIS, collect, eval_keys
from dcgan.run.stats import read_stats

COMPARED = ("loss_D", "loss_G", "D_x", "D_G_z_after", "grad_norm_G", "grad_norm_D", "D_overfit", "r1_penalty")
"""The training metrics drawn per setting (speed and rank metrics say nothing about the settings' quality)."""


@dataclass(frozen=True)
class Band:
    """One setting's curve of one metric: at each x that every seed logged, the mean, lowest and highest."""

    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]
    seeds: int


def band_over_seeds(curves: list[list[tuple[float, float]]]) -> Band | None:
    """The band of `curves` (one per seed) over the x values all of them hold; None if they share none
    (a seed still training is drawn only as far as every seed has come)."""
    if not curves:
        return None
    by_seed = [dict(curve) for curve in curves]
    shared = sorted(set.intersection(*(set(seed) for seed in by_seed)))
    if not shared:
        return None
    values = [[seed[x] for seed in by_seed] for x in shared]
    return Band(
        x=shared,
        mean=[sum(v) / len(v) for v in values],
        low=[min(v) for v in values],
        high=[max(v) for v in values],
        seeds=len(curves),
    )


def setting_rows(root: Path, runs: list[str]) -> list[list[dict[str, Any]]]:
    """stats.jsonl of each run of a setting that has one (the recipe's runs log none). Runs are found by
    name inside the comparison's directory, so a moved or copied directory still draws."""
    stats = [root / Path(run).name / "stats.jsonl" for run in runs]
    return [read_stats(path) for path in stats if path.is_file()]


def bands_of(by_setting: dict[str, list[list[dict[str, Any]]]]) -> dict[str, dict[str, Band]]:
    """Metric -> setting -> its band, for every metric some setting logged with a value other than 0
    (`by_setting`: each setting's runs' stats.jsonl rows, from setting_rows)."""
    found: dict[str, dict[str, Band]] = {}
    for setting, rows in by_setting.items():
        keys = COMPARED + tuple(sorted({key for seed in rows for key in eval_keys(seed)}))
        for key in keys:
            band = band_over_seeds([collect(seed, (key,)).get(key, []) for seed in rows])
            if band is not None:
                found.setdefault(key, {})[setting] = band
    return {key: by for key, by in found.items() if any(v != 0 for band in by.values() for v in band.mean)}


def chart(bands: dict[str, Band]) -> str:
    """One metric's chart: a line and a band per setting, the legend saying over how many seeds."""
    names = {name: f"{name} (mean of {band.seeds} seed{'s' * (band.seeds != 1)})" for name, band in bands.items()}
    series: Series = {names[name]: list(zip(b.x, b.mean, strict=True)) for name, b in bands.items()}
    ranges: Bands = {names[name]: list(zip(b.x, b.low, b.high, strict=True)) for name, b in bands.items()}
    return svg_chart(series, bands=ranges)


def why_silent(overrides: list[str]) -> str:
    """Why a setting has no curves: the recipe's runs log none; a project run has not logged yet."""
    return "the pytorch/examples recipe logs no curves" if overrides == [RECIPE] else "no stats.jsonl in its runs yet"


def render_comparison(root: Path) -> str:
    """The comparison page of `root` (a `dcgan compare --out` directory) as one HTML string."""
    record = json.loads((root / COMPARISON).read_text())
    by_setting = {name: setting_rows(root, runs) for name, runs in record["runs"].items()}
    bands = bands_of(by_setting)
    settings = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(' '.join(overrides) or 'the config as is')}</li>"
        for name, overrides in record["settings"].items()
    )
    silent = [name for name, rows in by_setting.items() if not rows]
    data = {
        "comparison": str(root),
        "x_axis": X_AXIS,
        "bands": {key: {name: band.__dict__ for name, band in by.items()} for key, by in bands.items()},
    }
    body = [
        f"<h1>Comparison: {html.escape(root.name)}</h1>",
        f"<ul>{settings}</ul>",
        f"<pre>{html.escape(record.get('table', record['verdict']))}</pre>",
        "<h2>Curves: each setting's mean over seeds, the band from its lowest seed to its highest</h2>",
        *(f"<p>{html.escape(name)}: {why_silent(record['settings'][name])}.</p>" for name in silent),
        "<div class='charts'>",
        *(f"<div class='chart'><h3>{html.escape(key)}</h3>{chart(by)}</div>" for key, by in bands.items()),
        "</div>",
    ]
    embedded = json.dumps(data).replace("</", "<\\/")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dcgan comparison: {html.escape(root.name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}"
        f"<script type='application/json' id='report-data'>{embedded}</script>"
        "</body></html>"
    )


def is_comparison(directory: Path) -> bool:
    return (directory / COMPARISON).is_file()


def write_comparison_report(root: Path, out: Path | None = None) -> Path:
    """Write the comparison's page (default ROOT/report.html) and return its path."""
    target = out or root / "report.html"
    target.write_text(render_comparison(root))
    return target
