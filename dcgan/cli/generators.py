"""The commands that use a trained generator: `dcgan sample`, `export`, `score`, `eval`, `interpolate`
and `arithmetic`, each reading a run directory's newest checkpoint or an exported generator."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dcgan.cli.common import positive_int
from dcgan.config import BN_STATS, ConfigError
from dcgan.console import table


def loaded_generator(args: argparse.Namespace) -> Any:
    """The generator a command's SOURCE names, with its --raw/--bn choices (see add_generator_options)."""
    from dcgan.evaluation.generators import load_generator

    return load_generator(Path(args.source), weights="raw" if args.raw else None, bn=args.bn)


def described(loaded: Any) -> str:
    return f"step {loaded.step}, {loaded.weights} weights, {loaded.bn} BatchNorm statistics"


def _sample(args: argparse.Namespace) -> int:
    import secrets

    from dcgan.evaluation.generators import sample_grid

    loaded = loaded_generator(args)
    if args.fixed_noise:
        out = sample_grid(loaded, args.num, Path(args.out), seed=None)
        print(f"{out} (the training's fixed noise; {described(loaded)})")
        return 0
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    out = sample_grid(loaded, args.num, Path(args.out), seed)
    print(f"{out} (seed {seed}: --seed {seed} draws the same grid again; {described(loaded)})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dcgan.evaluation.generators import export_generator

    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a directory: give a file name, e.g. {Path(args.out) / 'generator.pt'}")
    if not Path(args.source).is_dir():
        raise ConfigError(f"{args.source} is not a run directory")
    loaded = loaded_generator(args)
    export_generator(loaded, Path(args.out))
    print(f"{args.out}: generator of {described(loaded)}")
    return 0


def _score(args: argparse.Namespace) -> int:
    import torch

    from dcgan.evaluation.digits_score import DigitsScorer

    loaded = loaded_generator(args)
    if loaded.model.channels != 1:
        raise ConfigError("dcgan score: the digits score needs a 1-channel generator")
    noise = torch.randn(args.num, loaded.model.nz, generator=torch.Generator().manual_seed(args.seed))
    score = DigitsScorer(loaded.model.resolution).score(loaded.images(noise))
    print(table([(key, f"{value:.4f}") for key, value in score.as_dict().items()]))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from dcgan.distributed.session import distributed_session
    from dcgan.evaluation.evaluate import evaluate

    with distributed_session(args.device, 600) as info:
        loaded = loaded_generator(args)
        loaded.generator.to(info.device)
        evaluation = evaluate(loaded, args.data, args.num, args.metrics.split(","), info, args.inception)
    if info.is_main:
        print(f"{described(loaded)}; reference: {evaluation.protocol['reference']['selection']} of {args.data}")
        rows = [("metric", "value"), *((key, f"{value:.5f}") for key, value in evaluation.results.items())]
        print(table(rows, right=frozenset({1})))
        source = Path(args.source)
        default = source / f"eval-step{loaded.step}.json" if source.is_dir() else Path("eval.json")
        out = Path(args.out) if args.out else first_free(default)
        record = {
            "source": args.source,
            "step": loaded.step,
            "data": args.data,
            "num": args.num,
            **evaluation.results,
            "protocol": evaluation.protocol,
        }
        out.write_text(json.dumps(record, indent=1))
        print(f"written to {out}")
    return 0


def first_free(path: Path) -> Path:
    """`path`, or the first of path.2, path.3, ... (before the suffix) that does not exist yet: a second
    eval of the same step adds a file instead of overwriting the first."""
    candidate, index = path, 1
    while candidate.exists():
        index += 1
        candidate = path.with_name(f"{path.stem}.{index}{path.suffix}")
    return candidate


def _interpolate(args: argparse.Namespace) -> int:
    import secrets

    from dcgan.evaluation.latent import interpolate, save_walks

    loaded = loaded_generator(args)
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    out = save_walks(interpolate(loaded, args.rows, args.steps, seed, args.path), Path(args.out))
    print(f"{out}: {args.rows} {args.path} walk(s) of {args.steps} steps (seed {seed}; {described(loaded)})")
    return 0


def _arithmetic(args: argparse.Namespace) -> int:
    from dcgan.evaluation.latent import arithmetic, parse_indices, save_arithmetic

    loaded = loaded_generator(args)
    a, b, c = (
        parse_indices(text, option, args.num) for text, option in ((args.a, "--a"), (args.b, "--b"), (args.c, "--c"))
    )
    out = save_arithmetic(arithmetic(loaded, args.seed, args.num, a, b, c), Path(args.out))
    print(
        f"{out}: rows a, b, c (each ending with its average), then a - b + c and 7 jittered copies ({described(loaded)})"
    )
    return 0


def add_generator_options(parser: argparse.ArgumentParser) -> None:
    """Which of a run's generators a command uses, and its BatchNorm statistics."""

    parser.add_argument(
        "--raw",
        action="store_true",
        help="the trained G's own weights, not their average (runs trained with train.ema > 0 use the average by default)",
    )
    parser.add_argument(
        "--bn",
        choices=BN_STATS,
        default=None,
        help="BatchNorm statistics: running (eval mode), batch (each batch's own) or standing (re-estimated from G's own outputs on fixed latents first); default: the run's sample.bn",
    )


def add_generator_commands(commands: argparse._SubParsersAction) -> None:
    """The commands that use a trained generator: sample, export, score, eval, interpolate, arithmetic."""
    add_sample_command(commands)
    add_export_command(commands)
    add_score_command(commands)
    add_eval_command(commands)
    add_interpolate_command(commands)
    add_arithmetic_command(commands)


def add_sample_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan sample SOURCE --out PNG`: a grid of generated images."""
    sample = commands.add_parser("sample", help="write a PNG grid of generated images")
    sample.add_argument("source", help="run directory (newest checkpoint) or generator file from `dcgan export`")
    sample.add_argument("--num", type=positive_int, default=64, help="number of images")
    sample.add_argument("--out", required=True, help="output PNG path")
    noise = sample.add_mutually_exclusive_group()
    noise.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the noise (default: a fresh one, printed so that it can be repeated)",
    )
    noise.add_argument(
        "--fixed-noise",
        action="store_true",
        help="the training's own fixed noise: the run's sample grid of that step, pixel for pixel",
    )
    add_generator_options(sample)
    sample.set_defaults(func=_sample)


def add_export_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan export RUN_DIR --out FILE`: the generator as one file."""
    export = commands.add_parser("export", help="save the newest checkpoint's generator as one torch.load-able file")
    export.add_argument("source", metavar="run_dir", help="run directory: its newest complete checkpoint is exported")
    export.add_argument("--out", required=True, help="output file, e.g. generator.pt")
    add_generator_options(export)
    export.set_defaults(func=_export)


def add_score_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan score SOURCE`: the digits quality score."""
    score = commands.add_parser("score", help="digits quality score (Frechet distance at 8x8, confidence, balance)")
    score.add_argument("source", help="run directory or exported generator (1 channel)")
    score.add_argument("--num", type=positive_int, default=1000, help="generated images to score")
    score.add_argument(
        "--seed", type=int, default=0, help="seed of the noise (fixed, so that scores compare across runs)"
    )
    add_generator_options(score)
    score.set_defaults(func=_score)


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan eval SOURCE --data DATA`: FID, KID, SWD and the digits score."""
    evaluate = commands.add_parser(
        "eval",
        help="FID, KID, SWD and the digits score of a generator against real data (torchrun: ranks share the work)",
    )
    evaluate.add_argument("source", help="run directory (newest checkpoint) or generator file from `dcgan export`")
    evaluate.add_argument("--data", required=True, help="shard directory with manifest.json, or 'digits'")
    evaluate.add_argument(
        "-n",
        "--num",
        type=positive_int,
        default=10000,
        help="generated and real images (default 10000; under torchrun write -n, since torchrun takes --num for its --numa-binding)",
    )
    evaluate.add_argument("--metrics", default="swd", help="comma-separated from fid,kid,swd,digits (default swd)")
    evaluate.add_argument("--inception", default="", help="TorchScript Inception for fid/kid (or env DCGAN_INCEPTION)")
    evaluate.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where G and Inception run (auto = cuda when available; one GPU per rank under torchrun)",
    )
    evaluate.add_argument(
        "--out", default="", help="JSON output with the protocol (default RUN_DIR/eval-stepN.json or eval.json)"
    )
    add_generator_options(evaluate)
    evaluate.set_defaults(func=_eval)


def add_interpolate_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan interpolate SOURCE --out walk.gif`: latent walks (the paper's figure 4)."""
    from dcgan.evaluation.latent import WALKS

    walk = commands.add_parser(
        "interpolate",
        help="walks through latent space between random latents (the paper's figure 4)",
        description="Each row walks from one seeded random latent to another; the first and last images are "
        "G(z0) and G(z1). A smooth walk (no sudden changes) is the paper's sign that G has not memorized images.",
    )
    walk.add_argument("source", help="run directory or generator file from `dcgan export`")
    walk.add_argument(
        "--out", required=True, help="walk.png (one walk per row) or walk.gif (an animation of all walks)"
    )
    walk.add_argument("--rows", type=positive_int, default=8, help="walks")
    walk.add_argument("--steps", type=positive_int, default=10, help="images per walk, endpoints included")
    walk.add_argument("--path", choices=WALKS, default="slerp", help="spherical (keeps the latent norm) or straight")
    walk.add_argument("--seed", type=int, default=None, help="seed of the endpoints (default: a fresh one, printed)")
    add_generator_options(walk)
    walk.set_defaults(func=_interpolate)


def add_arithmetic_command(commands: argparse._SubParsersAction) -> None:
    """`dcgan arithmetic SOURCE --seed S --a .. --b .. --c ..`: latent vector arithmetic."""
    arith = commands.add_parser(
        "arithmetic",
        help="vector arithmetic on averaged latents: a - b + c (the paper's section 6.3)",
        description="Pick images by index (row-major, from 0) in a grid drawn with `dcgan sample SOURCE --seed S "
        "--num N`, e.g. smiling women for --a, neutral women for --b, neutral men for --c; the same --seed and "
        "--num here use the same latents. The grid shows each group and its average, then a - b + c.",
    )
    arith.add_argument("source", help="run directory or generator file from `dcgan export`")
    arith.add_argument(
        "--seed", type=int, required=True, help="the seed of the `dcgan sample` grid the indices refer to"
    )
    arith.add_argument("--num", type=positive_int, default=64, help="the --num of that grid")
    for name in ("a", "b", "c"):
        arith.add_argument(
            f"--{name}", required=True, help=f"comma-separated indices of the {name} images, e.g. 3,17,22"
        )
    arith.add_argument("--out", required=True, help="output PNG grid")
    add_generator_options(arith)
    arith.set_defaults(func=_arithmetic)
