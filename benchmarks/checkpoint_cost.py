"""What a checkpoint costs: how long a save blocks training, how long it takes to be complete on disk, and
how long a restart takes, per model width and number of ranks (docs/performance.md, "Checkpoints").

    python benchmarks/checkpoint_cost.py                  # widths 64,256 x ranks 1,2,4: ~2.5 min on 2 cores
    python benchmarks/checkpoint_cost.py --widths 64,128,256 --restarts all --json

Not a test (pytest does not collect it): it prints the command line, the machine and one table, and with
--json one JSON line per (width, ranks). Everything it times is the project's own code path:
- the model is configs/celeba64.yaml (64x64, DCGAN of the paper) with model.ngf = model.ndf = WIDTH, one
  channel (the built-in digits are the data, no shards needed; only G's last and D's first layer change:
  0.07% fewer parameters than RGB), on the CPU in fp32, after one training step (Adam's moments exist);
- a save is `Trainer.save` (what the loop calls: replica check, state dict, `Checkpointer.save` through
  torch.distributed.checkpoint into a real directory), with checkpoint.async_save on: "blocks" is the
  time until it returns (for an async save: DCP's staging copy), of which the part in `Checkpointer.save`
  is what it logs as blocking training; "complete" is until `.metadata` is on disk (`Checkpointer.wait`);
  blocking=True is the same save with async_save off;
- the load is `resume` on a new Trainer (what a restarted process runs), timed in the process;
- the restart is a fresh `python -m dcgan train` (under torchrun --standalone for 2+ ranks) on that run
  directory with train.steps at the saved step: process start, imports, process group, models, load, and
  exit with "nothing to do"; the load's share is read from its "resumed from ... in X s" line. By
  default only the largest width restarts (--restarts all: every width).
Every time is the slowest rank's; the median of --repeats saves. Ranks are gloo processes on this
machine's cores, so with more ranks than cores the ranks' copies compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the orchestrator imports no torch: only the workers do
    from dcgan.distributed.env import DistInfo
    from dcgan.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "celeba64.yaml"
RESUMED = re.compile(r"resumed from \S+ at step \d+ .* in ([0-9.]+) s")


def overrides(width: int, run_dir: Path) -> list[str]:
    """The benchmark's config: celeba64 at `width`, on the CPU, the built-in digits, no tracking."""
    return [
        f"model.ngf={width}",
        f"model.ndf={width}",
        "model.channels=1",
        "data.shards=",
        "data.workers=0",
        "train.device=cpu",
        "train.compile=false",
        "train.precision=fp32",
        "train.batch_size=2",
        "log.wandb=disabled",
        "checkpoint.async_save=true",
        "checkpoint.keep=2",
        f"run.dir={run_dir}",
    ]


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def slowest(seconds: list[float], info: DistInfo) -> list[float]:
    """Each of `seconds` as the maximum over ranks: the loop waits for the slowest rank's save."""
    if not info.distributed:
        return seconds
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def timed_saves(trainer: Trainer, repeats: int) -> dict[str, float]:
    """`repeats` saves each way, alternated; each at a new step, as the loop would make them. The part
    spent in `Checkpointer.save` (its `blocked_s`) is kept apart from the trainer's replica check before it."""
    import torch.distributed as dist

    kinds = ("sync_s", "sync_checkpointer_s", "async_blocks_s", "async_checkpointer_s", "async_complete_s")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for blocking in (True, False):
            trainer.step += 1
            if trainer.info.distributed:
                dist.barrier()
            started = time.perf_counter()
            trainer.save(blocking=blocking)
            returned = time.perf_counter()
            trainer.checkpointer.wait()
            complete = time.perf_counter()
            measured = [returned - started, trainer.checkpointer.blocked_s, complete - started]
            blocked, in_checkpointer, done = slowest(measured, trainer.info)
            if blocking:
                times["sync_s"].append(blocked)
                times["sync_checkpointer_s"].append(in_checkpointer)
            else:
                times["async_blocks_s"].append(blocked)
                times["async_checkpointer_s"].append(in_checkpointer)
                times["async_complete_s"].append(done)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_width(width: int, work: Path, repeats: int, info: DistInfo) -> dict[str, float | int]:
    """Saves and a load of the `width` model in this process (one rank of the group)."""
    import gc

    import torch.distributed as dist

    from dcgan.cluster.bench import synthetic_batch
    from dcgan.config import load_config
    from dcgan.gan.models import count_parameters
    from dcgan.run.checkpoint import latest_checkpoint
    from dcgan.train.trainer import build_trainer, resume

    config = load_config(CONFIG, overrides(width, work / f"w{width}_r{info.world_size}"))
    trainer = build_trainer(config, info)
    trainer.checkpointer.prepare()
    trainer.step_fn(synthetic_batch(config, info.device))  # Adam's moments exist from the first step on
    result: dict[str, float | int] = {
        "width": width,
        "ranks": info.world_size,
        "parameters": count_parameters(trainer.g_bare) + count_parameters(trainer.d_bare),
        **timed_saves(trainer, repeats),
        "step": trainer.step,
    }
    trainer.checkpointer.close()
    path = latest_checkpoint(trainer.checkpointer.root)
    assert path is not None, "the saves above completed"
    result["bytes"] = directory_bytes(path)
    del trainer
    gc.collect()
    fresh = build_trainer(config, info)
    if info.distributed:
        dist.barrier()
    started = time.perf_counter()
    resume(fresh)
    (result["load_s"],) = slowest([time.perf_counter() - started], info)
    fresh.checkpointer.close()
    return result


def worker(args: argparse.Namespace) -> None:
    """One rank (alone, or under torchrun): every width in turn; rank 0 prints a RESULT line each."""
    import logging

    import torch

    from dcgan.distributed.session import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    info = init_distributed("cpu", 600, liveness_s=0)
    for width in args.widths:
        result = measure_width(width, Path(args.dir), args.repeats, info)
        if info.is_main:
            print("RESULT " + json.dumps(result), flush=True)
    destroy_distributed()


def launcher(ranks: int) -> list[str]:
    """How `ranks` processes start: a plain process for one (as `dcgan train` alone), else torchrun."""
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_workers(ranks: int, args: argparse.Namespace) -> list[dict]:
    """Every width at `ranks` ranks, in one launch."""
    argv = [*launcher(ranks), __file__, "--worker", "--dir", args.dir, "--repeats", str(args.repeats)]
    argv += ["--widths", ",".join(map(str, args.widths))]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(line[len("RESULT ") :]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]


def restart(result: dict, args: argparse.Namespace) -> dict[str, float]:
    """A fresh `dcgan train` on the run directory the worker saved: start to exit, and the load in it."""
    ranks, width = int(result["ranks"]), int(result["width"])
    run_dir = Path(args.dir) / f"w{width}_r{ranks}"
    argv = [*launcher(ranks), "-m", "dcgan", "train", str(CONFIG), *overrides(width, run_dir)]
    argv += [f"train.steps={result['step']}"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=600)
    wall = time.perf_counter() - started
    found = RESUMED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{shlex.join(argv)} did not resume ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"restart_s": wall, "restart_load_s": float(found.group(1))}


def machine() -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{platform.node()}: {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, load average {load}"
    )


def table(results: list[dict]) -> str:
    """Markdown rows: sizes, then each cost in seconds and as a rate where one makes sense."""
    rows = [
        "| width (ngf=ndf) | ranks | parameters | checkpoint | save, async off: blocks (of it, in the "
        "Checkpointer) | async save: blocks (of it, in the Checkpointer: staging) | async save: complete on "
        "disk | load (resume) | fresh `dcgan train` to resumed and out (its load) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        megabytes = r["bytes"] / 1e6
        restart = f"{r['restart_s']:.1f} s ({r['restart_load_s']:.1f} s)" if "restart_s" in r else "-"
        rows.append(
            f"| {r['width']} | {r['ranks']} | {r['parameters'] / 1e6:.1f}M | {megabytes:.0f} MB | "
            f"{r['sync_s']:.2f} s ({r['sync_checkpointer_s']:.2f} s: {megabytes / r['sync_checkpointer_s']:.0f} MB/s) | "
            f"{r['async_blocks_s']:.2f} s = {r['async_blocks_s'] / r['sync_s']:.2f}x "
            f"({r['async_checkpointer_s']:.2f} s: {megabytes / r['async_checkpointer_s']:.0f} MB/s) | "
            f"{r['async_complete_s']:.2f} s | {r['load_s']:.2f} s | {restart} |"
        )
    return "\n".join(rows)


def orchestrate(args: argparse.Namespace) -> None:
    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)
    print("machine: " + machine(), flush=True)
    began = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="checkpoint_cost.", dir=args.under) as work:
        args.dir = work
        print(f"checkpoints written under {work}", flush=True)
        for ranks in args.ranks:
            print(f"{ranks} rank(s): saves and loads ({time.perf_counter() - began:.0f} s so far)", file=sys.stderr)
            for result in run_workers(ranks, args):
                if args.restarts == "all" or (args.restarts == "largest" and result["width"] == max(args.widths)):
                    result.update(restart(result, args))
                results.append(result)
                if args.json:
                    print(json.dumps(result), flush=True)
    print(table(results))
    print(f"took {time.perf_counter() - began:.0f} s", flush=True)


def integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=integers, default=[64, 256], help="model.ngf = model.ndf values")
    parser.add_argument("--ranks", type=integers, default=[1, 2, 4], help="numbers of gloo processes")
    parser.add_argument("--repeats", type=int, default=2, help="saves of each kind per width (median)")
    parser.add_argument("--under", default=None, help="where the checkpoints go (default: the temp directory)")
    parser.add_argument(
        "--restarts",
        choices=("largest", "all", "none"),
        default="largest",
        help="which widths a fresh process restarts from (start-up besides the load hardly depends on the width)",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON line per width and ranks")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else orchestrate(args)


if __name__ == "__main__":
    main()
