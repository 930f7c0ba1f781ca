"""`dcgan report RUN_DIR`: one self-contained HTML page of a run, from its files alone.

It reads only `stats.jsonl`, `samples/` and `config.yaml`, so it works offline, on an air-gapped
cluster and for a run still in progress (a half-written last line of stats.jsonl is skipped). Charts
are inline SVG with images seen on the x axis (the axis that lines up runs on 1 and 64 GPUs); the
numbers behind every chart are embedded as JSON (`<script id="report-data">`) for anyone who wants
them back. No JavaScript, no network, nothing to install.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from dcgan.distributed.stragglers import bound_kind
from dcgan.evaluation.charts import STYLE, Series, svg_chart
from dcgan.run.rundir import RunDir
from dcgan.run.stats import read_stats

CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Losses", ("loss_D", "loss_G")),
    ("D(x) and D(G(z))", ("D_x", "D_G_z_before", "D_G_z_after")),
    ("Training rate (img/s, eval time excluded)", ("img_per_s",)),
    ("Share of step time waiting for data and for other ranks", ("data_wait_share", "collective_wait_share")),
    ("Slowest rank's own time over the others' median (0.5 = 50% slower)", ("slowest_rank_excess",)),
    ("Gradient norms", ("grad_norm_G", "grad_norm_D")),
    ("D memorising its training set: ADA's r_v on held-out reals (data.holdout; 0 = none)", ("D_overfit",)),
    ("R1 penalty, E|grad_x D(x)|^2 on reals (loss.r1)", ("r1_penalty",)),
)
"""The training charts: title and the stats.jsonl keys drawn in it. Eval metrics (`eval/*`) get one chart each."""

X_AXIS = "images_seen"
STRIP_LENGTH = 8
"""Sample grids shown in the strip: evenly spaced over the run, always including the newest."""


def drawn(series: Series) -> bool:
    """Whether a chart says anything: a series with a value other than 0 (r1_penalty is 0 without loss.r1)."""
    return any(value != 0 for points in series.values() for _, value in points)


def collect(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> Series:
    """The finite values of `keys` against images seen; keys that never occur are left out."""
    found: Series = {}
    for row in rows:
        x = row.get(X_AXIS)
        if x is None:
            continue
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                found.setdefault(key, []).append((float(x), float(value)))
    return found


def eval_keys(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(sorted({key for row in rows for key in row if key.startswith("eval/")}))


def sample_strip(samples: Path, length: int = STRIP_LENGTH) -> list[tuple[int, str]]:
    """(step, base64 PNG) of up to `length` sample grids, evenly spaced over the run, newest included."""
    grids = sorted(samples.glob("step_*.png")) if samples.is_dir() else []
    if len(grids) > length:
        grids = [grids[round(i * (len(grids) - 1) / (length - 1))] for i in range(length)]
    return [(int(path.stem.split("_")[1]), base64.b64encode(path.read_bytes()).decode()) for path in grids]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The newest value of every metric, as a two-column table."""
    latest: dict[str, Any] = {}
    for row in rows:
        latest.update(row)
    cells = "".join(
        f"<tr><td>{html.escape(key)}</td><td>{value:.5g}</td></tr>"
        if isinstance(value, float)
        else f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>"
        for key, value in latest.items()
        if key != "time"
    )
    return f"<table>{cells}</table>"


def rank_table(rows: list[dict[str, Any]]) -> str:
    """Which ranks were the slowest, and how often: one row per rank that ever was (dcgan.distributed.stragglers)."""
    windows = [row for row in rows if isinstance(row.get("slowest_rank"), int)]
    if not windows:
        return "<p>One rank (or no metric line yet): nothing to compare.</p>"
    by_rank: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in windows:
        by_rank.setdefault((row["slowest_rank"], str(row.get("slowest_host", "?"))), []).append(row)
    cells = []
    for (rank, host), slow in sorted(by_rank.items(), key=lambda item: -len(item[1])):
        excess = sorted(float(row["slowest_rank_excess"]) for row in slow)
        data_bound = sum(int(row.get("slowest_rank_data_bound", 0)) for row in slow)
        cells.append(
            f"<tr><td>rank {rank} on {html.escape(host)}</td><td>slowest in {len(slow)} of {len(windows)} windows</td>"
            f"<td>median excess {100 * excess[len(excess) // 2]:.0f}%</td>"
            f"<td>{bound_kind(2 * data_bound > len(slow))} ({data_bound} {bound_kind(True)})</td></tr>"
        )
    return f"<table>{''.join(cells)}</table>"


def render(run_dir: Path) -> str:
    """The report page of `run_dir` as one HTML string."""
    layout = RunDir(run_dir)
    rows = read_stats(layout.stats)
    charts = [(title, collect(rows, keys)) for title, keys in CHARTS]
    charts += [(key.removeprefix("eval/"), collect(rows, (key,))) for key in eval_keys(rows)]
    charts = [(title, series) for title, series in charts if drawn(series)]
    strip = sample_strip(layout.samples)
    config = layout.config
    last = rows[-1] if rows else {}
    data = {"run_dir": str(run_dir), "x_axis": X_AXIS, "charts": {title: series for title, series in charts}}
    body = [
        f"<h1>{html.escape(run_dir.name)}</h1>",
        f"<p>{html.escape(str(run_dir.resolve()))}: step {last.get('step', 0)}, "
        f"{last.get(X_AXIS, 0):,} images seen, {len(rows)} lines of stats.jsonl, {len(strip)} sample grid(s) shown.</p>",
        "<h2>Training</h2><div class='charts'>",
        *(f"<div class='chart'><h3>{html.escape(title)}</h3>{svg_chart(series)}</div>" for title, series in charts),
        "</div>" if charts else "</div><p>No metrics logged yet.</p>",
        "<h2>Samples (fixed noise) over time</h2><div class='strip'>",
        *(
            f"<figure><img alt='step {step}' src='data:image/png;base64,{png}'><figcaption>step {step}</figcaption></figure>"
            for step, png in strip
        ),
        "</div>",
        "<h2>Ranks: the slowest of each metric window</h2>",
        rank_table(rows),
        "<h2>Latest values</h2>",
        summary_table(rows),
    ]
    if config.is_file():
        body.append(
            f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{html.escape(config.read_text())}</pre></details>"
        )
    embedded = json.dumps(data).replace("</", "<\\/")  # a JSON escape: no "</script>" can end the block early
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dcgan report: {html.escape(run_dir.name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}"
        f"<script type='application/json' id='report-data'>{embedded}</script>"
        "</body></html>"
    )


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report (default RUN_DIR/report.html) and return its path. (`dcgan report` hands the
    directory of a comparison to dcgan.evaluation.compare_report instead.)"""
    from dcgan.config import ConfigError

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not RunDir(run_dir).stats.is_file() and not RunDir(run_dir).samples.is_dir():
        raise ConfigError(
            f"{run_dir} has neither stats.jsonl nor samples/ nor compare.json: is it a run or comparison directory?"
        )
    target = out or run_dir / "report.html"
    target.write_text(render(run_dir))
    return target
