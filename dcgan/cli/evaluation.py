"""`dcgan probe`, `dcgan compare` and `dcgan report`: the commands that judge trained runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcgan.cli.common import positive_int


def probe_command(args: argparse.Namespace) -> int:
    import json

    from dcgan.evaluation.probe import run_probe

    result = run_probe(Path(args.run_dir), args.data, args.labels, args.draws)
    print(result.summary())
    if args.out:
        Path(args.out).write_text(json.dumps(result.__dict__, indent=1))
        print(f"written to {args.out}")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from dcgan.evaluation.compare import COMPARISON, compare, describe_settings, split_overrides

    a, b = split_overrides(args.a), split_overrides(args.b)
    print(f"A vs B: {describe_settings(args.config, args.overrides, a, b)}", flush=True)
    root = Path(args.out)
    comparison = compare(
        args.config,
        args.overrides,
        a,
        b,
        list(range(args.first_seed, args.first_seed + args.seeds)),
        root,
        args.metric,
        args.num,
    )
    print(comparison.table())
    print(f"written to {root / COMPARISON}; `dcgan report {root}` draws each setting's curves")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from dcgan.evaluation.compare_report import is_comparison, write_comparison_report
    from dcgan.evaluation.report import write_report

    directory, target = Path(args.run_dir), Path(args.out) if args.out else None
    out = write_comparison_report(directory, target) if is_comparison(directory) else write_report(directory, target)
    print(f"{out}: open it in a browser (file://{out.resolve()})")
    return 0


def add_probe_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan probe RUN_DIR`: the paper's linear probe on D's features."""
    probe = commands.add_parser(
        "probe",
        help="linear probe on D's features with N labels per class, vs an untrained D (the paper's section 5.1)",
        description="Every hidden layer of D, max-pooled to 4x4 and concatenated, feeds an L2-regularized logistic "
        "regression fitted on --labels images per class and tested on all others; the same probe on D as the run "
        "initialized it is the baseline. Shards written by `dcgan shards digits|mnist` carry labels.",
    )
    probe.add_argument("run_dir", help="run directory (D is read from its newest complete checkpoint)")
    probe.add_argument("--data", default="digits", help="labelled images: 'digits' or a shard directory with labels")
    probe.add_argument("--labels", type=positive_int, default=10, help="labelled training images per class")
    probe.add_argument(
        "--draws", type=positive_int, default=3, help="seeded draws of the labelled images (mean +- std)"
    )
    probe.add_argument("--out", default="", help="also write the accuracies as JSON here")
    probe.set_defaults(func=probe_command)


def add_compare_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan compare CONFIG --a .. --b ..`: two settings over seeds."""
    comp = commands.add_parser(
        "compare",
        intermixed=True,
        help="train two settings over several seeds; mean, spread, 95%% intervals and a paired verdict",
        description="Trains CONFIG with the overrides of --a and of --b at each seed (seed s of both starts from the same "
        "weights, noise and data order), scores each run's generator, and prints per setting the mean, standard "
        "deviation and 95% t-interval, then the paired difference B - A with its interval. Runs live in --out, one "
        "directory per seed and training config: settings that differ only in sample.bn or sample.ema share "
        "training runs, and a rerun resumes or reuses finished runs. A stop signal (Ctrl-C, SIGTERM, SLURM's USR1/USR2) "
        "reaches the run in training, which checkpoints; the comparison then exits with the run's status and one line, "
        "and the same command resumes it.",
    )
    comp.add_argument("config", help="YAML config both settings start from")
    comp.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides for both settings, e.g. train.steps=2000"
    )
    comp.add_argument(
        "--a", default="", help="overrides of setting A, space-separated in one argument (empty: the config as is)"
    )
    comp.add_argument(
        "--b",
        required=True,
        help="overrides of setting B, e.g. 'train.ema=0.999'; 'recipe' (for --a or --b) trains the pytorch/examples "
        "recipe instead: its G and D, BCE with Sigmoid, Adam, a permutation of all images per epoch, images with "
        "batch statistics, on the same images, seeds, steps and batch size",
    )
    comp.add_argument("--seeds", type=positive_int, default=3, help="seeds per setting (3 or more give an interval)")
    comp.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    comp.add_argument("--metric", default="", help="result to compare (default: digits_frechet on digits, else swd)")
    comp.add_argument("-n", "--num", type=int, default=0, help="images per evaluation (default: eval.num)")
    comp.add_argument("--out", default="runs/compare", help="directory of the runs and compare.json")
    comp.set_defaults(func=compare_command)


def add_report_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan report RUN_DIR`: one HTML page of a run, or of a comparison."""
    report = commands.add_parser(
        "report",
        help="one HTML page of a run (curves over images seen, eval metrics, sample grids over time) or of a "
        "`dcgan compare` directory (each setting's curves: mean over seeds, band from lowest to highest seed)",
        description="Reads only RUN_DIR's stats.jsonl, samples/ and config.yaml: works offline and on a run in progress. "
        "Given the --out directory of `dcgan compare` (it holds compare.json), draws every metric the runs log "
        "(losses, D's outputs, D_overfit, eval/* with eval.every) as each setting's mean over seeds with a band from "
        "its lowest seed to its highest, under the comparison's table.",
    )
    report.add_argument("run_dir", help="run directory, or a `dcgan compare --out` directory")
    report.add_argument("--out", default="", help="HTML file to write (default: RUN_DIR/report.html)")
    report.set_defaults(func=report_command)
