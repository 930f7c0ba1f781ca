"""`dcgan shards` and `dcgan bench data|step`: conversion and benchmark commands."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dcgan.config import ConfigError


def _shards(args: argparse.Namespace) -> int:
    from dcgan.data.writer import write_shards

    try:
        manifest = write_shards(
            args.kind, Path(args.source), Path(args.out_dir), fmt=args.format, resolution=args.resolution,
            channels=args.channels, crop=args.crop, shard_size=args.shard_size, block_size=args.block_size,
            workers=args.workers, overwrite=args.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(
        f"{args.out_dir}: {manifest.total_samples} images in {len(manifest.shards)} shards "
        f"({manifest.format}, {manifest.resolution}x{manifest.resolution}, {manifest.channels} channel(s)); "
        f"{manifest.skipped_inputs} unreadable inputs skipped"
    )
    return 0


def measure_loader(shards: str, workers: int, batch_size: int, batches: int, seed: int = 0) -> float:
    """Images per second the shard loader delivers to the training process (after a warm-up batch)."""
    from dcgan.config import load_config
    from dcgan.data.stream import ShardSource, resolve_shards
    from dcgan.distributed import DistInfo

    import torch

    manifest = resolve_shards(shards).manifest
    if manifest is None:
        raise ConfigError("dcgan bench data: point DATA at a shard directory with manifest.json")
    config = load_config(
        None,
        [f"data.shards={shards}", f"data.workers={workers}", f"train.batch_size={batch_size}", f"seed={seed}",
         f"model.resolution={manifest.resolution}", f"model.channels={manifest.channels}",
         f"data.epoch_samples={batch_size * (batches + 1)}"],
    )
    source = ShardSource(config, DistInfo(0, 1, 0, torch.device("cpu")), pin_memory=False)
    stream = iter(source)
    next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch_size / (time.perf_counter() - started)
    source.close()
    return rate


def _bench_data(args: argparse.Namespace) -> int:
    print(f"{'workers':>8} {'img/s':>10}")
    for workers in (int(w) for w in args.workers.split(",")):
        rate = measure_loader(args.data, workers, args.batch_size, args.batches)
        print(f"{workers:>8} {rate:>10.0f}", flush=True)
    return 0


def _bench_step(args: argparse.Namespace) -> int:
    from dcgan.bench import run_bench_step

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    run_bench_step(args.config, args.overrides, sizes, args.precision, args.warmup, args.iters, args.data)
    return 0


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    from dcgan.data.formats import FORMATS
    from dcgan.data.writer import KINDS

    shards = commands.add_parser(
        "shards",
        help="convert images into WebDataset tar shards (once per data set)",
        description="Convert an image folder (e.g. CelebA's img_align_celeba), MNIST idx files or the built-in "
        "digits into WebDataset shards with a manifest. Images are center-cropped and resized once, here.",
    )
    shards.add_argument("kind", choices=KINDS, help="folder: any folder of images (recursive); mnist: idx files; digits: built-in")
    shards.add_argument("source", help="the folder (folder, mnist); ignored for digits (use .)")
    shards.add_argument("out_dir")
    shards.add_argument("--resolution", type=int, default=64, help="output side in pixels (default 64)")
    shards.add_argument("--channels", type=int, choices=(1, 3), default=3, help="folder only: 3 = RGB, 1 = grey")
    shards.add_argument("--crop", type=int, default=0, help="centered square crop before resizing (0 = shorter side)")
    shards.add_argument("--format", choices=FORMATS, default="blocks", help="blocks (fast, lossless; default), png, jpeg")
    shards.add_argument("--shard-size", type=int, default=10000, help="images per shard (default 10000)")
    shards.add_argument("--block-size", type=int, default=256, help="images per tar member in the blocks format")
    shards.add_argument("--workers", type=int, default=0, help="writer processes (default: one per core)")
    shards.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty OUT_DIR")
    shards.set_defaults(func=_shards)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    data = bench.add_parser("data", help="images/s the loader delivers from shards on disk, per worker count")
    data.add_argument("data", help="shard directory with manifest.json")
    data.add_argument("--workers", default="0,1,2,4", help="comma-separated worker counts (default 0,1,2,4)")
    data.add_argument("--batch-size", type=int, default=128)
    data.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    data.set_defaults(func=_bench_data)

    step = bench.add_parser(
        "step",
        help="img/s of the training step vs the pytorch/examples reference step (same process, same batch)",
        description="Times the pytorch/examples dcgan step (fp32, eager, NCHW, Sigmoid+BCELoss) and this "
        "project's configured step on one synthetic batch already on the device, and prints the ratio.",
    )
    step.add_argument("config", nargs="?", default="configs/celeba64.yaml", help="config (default configs/celeba64.yaml)")
    step.add_argument("overrides", nargs="*", metavar="key=value")
    step.add_argument("--batch-sizes", default="128,1024", help="comma-separated (default 128,1024)")
    step.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None, help="override train.precision")
    step.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    step.add_argument("--iters", type=int, default=50, help="timed steps")
    step.add_argument("--data", default="", help="also time training end to end from these shards")
    step.set_defaults(func=_bench_step)
