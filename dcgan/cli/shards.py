"""`dcgan shards`: converting images into WebDataset shards, once per data set."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcgan.config import ConfigError


def _shards(args: argparse.Namespace) -> int:
    from dcgan.data.writer import HOLDOUT_DIR, write_shards

    try:
        manifest = write_shards(
            args.kind,
            Path(args.source),
            Path(args.out_dir),
            fmt=args.format,
            resolution=args.resolution,
            channels=args.channels,
            crop=args.crop,
            shard_size=args.shard_size,
            block_size=args.block_size,
            workers=args.workers,
            overwrite=args.overwrite,
            permutation_seed=None if args.order == "stored" else args.seed,
            holdout=args.holdout,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(
        f"{args.out_dir}: {manifest.total_samples} images in {len(manifest.shards)} shards "
        f"({manifest.format}, {manifest.resolution}x{manifest.resolution}, {manifest.channels} channel(s)); "
        f"{manifest.skipped_inputs} unreadable inputs skipped; "
        + (
            "in the source's order"
            if manifest.permutation_seed is None
            else f"shuffled (seed {manifest.permutation_seed})"
        )
    )
    if args.holdout:
        held_out = Path(args.out_dir) / HOLDOUT_DIR
        print(f"{held_out}: {args.holdout} images held out of training (train with data.holdout={held_out})")
    return 0


def add_shards_command(commands: argparse._SubParsersAction) -> None:
    from dcgan.data.formats import FORMATS
    from dcgan.data.writer import KINDS

    shards = commands.add_parser(
        "shards",
        help="convert images into WebDataset tar shards (once per data set)",
        description="Convert an image folder (e.g. CelebA's img_align_celeba), MNIST idx files or the built-in "
        "digits into WebDataset shards with a manifest. Images are center-cropped and resized once, here.",
    )
    shards.add_argument(
        "kind", choices=KINDS, help="folder: any folder of images (recursive); mnist: idx files; digits: built-in"
    )
    shards.add_argument("source", help="the folder (folder, mnist); ignored for digits (use .)")
    shards.add_argument("out_dir", help="directory for the shards and their manifest.json (created)")
    shards.add_argument("--resolution", type=int, default=64, help="output side in pixels")
    shards.add_argument("--channels", type=int, choices=(1, 3), default=3, help="folder only: 3 = RGB, 1 = grey")
    shards.add_argument("--crop", type=int, default=0, help="centered square crop before resizing (0 = shorter side)")
    shards.add_argument("--format", choices=FORMATS, default="blocks", help="blocks (fast, lossless), png, jpeg")
    shards.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    shards.add_argument("--block-size", type=int, default=256, help="images per tar member in the blocks format")
    shards.add_argument(
        "--order",
        choices=("shuffled", "stored"),
        default="shuffled",
        help="shuffled: write the images in a seeded random order, so that every block, shard and shuffle window "
        "is a random sample (a folder lists its classes one after another); stored: the source's order",
    )
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    shards.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="keep the last N images of the written order out of the training shards, in OUT_DIR/holdout: reals "
        "D never sees, for data.holdout (D's overfitting in the metric line)",
    )
    shards.add_argument("--workers", type=int, default=0, help="writer processes (default: one per core)")
    shards.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty OUT_DIR")
    shards.set_defaults(func=_shards)
