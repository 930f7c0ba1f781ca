"""`dcgan bench`: the loader's rate from shards, and the training step's rate against the reference step."""

from __future__ import annotations

import argparse


def _bench_data(args: argparse.Namespace) -> int:
    from dcgan.cluster.bench import run_bench_data

    run_bench_data(
        args.data,
        [int(w) for w in args.workers.split(",")],
        args.batch_size,
        args.batches,
        [int(p) for p in args.partitions_per_worker.split(",")],
    )
    return 0


def _bench_step(args: argparse.Namespace) -> int:
    from dcgan.cluster.bench import run_bench_step

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    run_bench_step(
        args.config, args.overrides, sizes, args.precision, args.warmup, args.iters, args.data, args.distributed
    )
    return 0


def add_bench_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    data = bench.add_parser(
        "data", help="images/s the loader delivers from shards (on disk or over HTTP), per worker count"
    )
    data.add_argument("data", help="shard directory with manifest.json, or its http(s) URL")
    data.add_argument("--workers", default="0,1,2,4", help="comma-separated worker counts")
    data.add_argument("--batch-size", type=int, default=128, help="images per batch")
    data.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    data.add_argument(
        "--partitions-per-worker",
        default="1,4",
        help="comma-separated data.partitions per worker to time (the first is the baseline of the ratio column)",
    )
    data.set_defaults(func=_bench_data)

    step = bench.add_parser(
        "step",
        intermixed=True,
        help="img/s of the training step vs the pytorch/examples reference step (same process, same batch)",
        description="Times the pytorch/examples dcgan step (fp32, eager, NCHW, Sigmoid+BCELoss) and this "
        "project's configured step on one synthetic batch already on the device, and prints the ratio.",
    )
    step.add_argument("config", nargs="?", default="configs/celeba64.yaml", help="config whose step is timed")
    step.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.compile=false")
    step.add_argument("--batch-sizes", default="128,1024", help="comma-separated per-process batch sizes")
    step.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None, help="override train.precision"
    )
    step.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    step.add_argument("--iters", type=int, default=50, help="timed steps")
    step.add_argument("--data", default="", help="also time training end to end from these shards")
    step.add_argument(
        "--distributed",
        action="store_true",
        help="also time the multi-rank code path (DDP or the graph's own all-reduce, cross-rank BatchNorm) "
        "run by one process in a process group of one",
    )
    step.set_defaults(func=_bench_step)
