"""The scaling model of docs/performance.md against a network: gloo all-reduces and the paper model's
step on 2 emulated hosts (tests/support/hosts.py) at several link rates, each beside the model's prediction.

    sudo .ci/venv/bin/python benchmarks/multihost.py --rates 0,1000,100 --batch 8

Not a test (pytest does not collect it): it prints one table and writes JSON lines. Each rate is set
with `tc tbf` on both ends of host B's link (0 = the bare bridge); these kernels have no netem, so no
delay is added. Per rate, under torchrun on 2 hosts x 1 process (c10d rendezvous on host A):
- gloo all-reduce of the model's fp32 gradients (25,369,088 B) and of one BatchNorm packet (3,072 B:
  3 x 128 float64, a 128-channel layer), median over repeats, the maximum over ranks;
- the paper model's training step (configs/celeba64.yaml, CPU, fp32, eager, DDP + cross-rank BatchNorm)
  at --batch per rank; one process alone on host A (no process group) is timed first, for scale.
The model (docs/performance.md) predicts the gradient all-reduce at S bytes / rate (a 2-rank ring sends
S bytes each way) and a step's communication as that plus 26 small all-reduces, none hidden; a limited
link's step is compared with the bare bridge's, where the same two processes share the same cores.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

GRADIENT_BYTES = 25_369_088
"""fp32 gradients of the celeba64 model: G 3,576,704 + D 2,765,568 parameters."""
BN_PACKET_BYTES = 3_072
SMALL_ALL_REDUCES_PER_STEP = 26
"""13 BatchNorm forwards + 13 backwards exchange per-channel sums (docs/performance.md)."""

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(run_once, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run_once()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def worker(batch: int, steps: int, grad_repeats: int) -> None:
    """One rank (under torchrun): time the all-reduces and the step; rank 0 prints one JSON line."""
    import torch
    import torch.distributed as dist

    from dcgan.cluster.bench import synthetic_batch
    from dcgan.config import load_config
    from dcgan.distributed.session import destroy_distributed, init_distributed
    from dcgan.gan.step import build_step

    torch.set_num_threads(1)
    config = load_config(
        ROOT / "configs" / "celeba64.yaml",
        [
            "train.device=cpu",
            "train.compile=false",
            "train.precision=fp32",
            f"train.batch_size={batch}",
        ],
    )
    info = init_distributed("cpu", 600, liveness_s=0)
    result: dict[str, float | int] = {"world": info.world_size}
    if info.distributed:
        for name, size, repeats in (("grad", GRADIENT_BYTES, grad_repeats), ("bn", BN_PACKET_BYTES, 200)):
            tensor = torch.ones(size // 4)
            local = torch.tensor([median_seconds(lambda t=tensor: dist.all_reduce(t), repeats)], dtype=torch.float64)
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
            result[f"{name}_ms"] = local.item() * 1e3
    step = build_step(config, info)[2]
    images = synthetic_batch(config, info.device)
    result["step_ms"] = median_seconds(lambda: step(images), steps) * 1e3
    if info.distributed:
        slowest = torch.tensor([result["step_ms"]], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        result["step_ms"] = slowest.item()
    if info.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    destroy_distributed()


def launch(hosts, names: list[str], args: argparse.Namespace, tag: str) -> dict[str, float]:
    """torchrun on each of `names` running this file in worker mode; rank 0's result."""
    from helpers import subprocess_env

    env = subprocess_env()
    procs = []
    for name in names:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(names)}",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={names[0]}:29450",
            f"--rdzv-id={tag}",
            __file__,
            "--worker",
            f"--batch={args.batch}",
            f"--steps={args.steps}",
            f"--grad-repeats={args.grad_repeats}",
        ]
        procs.append(hosts.popen(name, argv, log=hosts.workdir / f"{tag}.{name}.log", env=env, cwd=ROOT))
    for proc in procs:
        if proc.wait(timeout=900) != 0:
            raise SystemExit(f"{tag} failed: see {hosts.workdir}/{tag}.*.log")
    for name in names:
        for line in (hosts.workdir / f"{tag}.{name}.log").read_text().splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"{tag}: no result in {hosts.workdir}")


def orchestrate(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from hosts import emulated_hosts, missing_requirements

    if (reason := missing_requirements()) is not None:
        raise SystemExit(reason)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the hosts are removed on the way out
    with tempfile.TemporaryDirectory() as work, emulated_hosts(["hosta", "hostb"], Path(work)) as hosts:
        alone = launch(hosts, ["hosta"], args, "alone")
        print(f"one process alone, batch {args.batch}: step {alone['step_ms']:.0f} ms", flush=True)
        results = {}
        for rate in args.rates:
            if rate:
                hosts.limit_rate("hostb", rate)
            results[rate] = launch(hosts, ["hosta", "hostb"], args, f"rate{rate}")
            print(json.dumps({"rate_mbit": rate, **results[rate], "alone_step_ms": alone["step_ms"]}), flush=True)
        print(table(results, alone["step_ms"]))


def table(results: dict[int, dict[str, float]], alone_ms: float) -> str:
    """Markdown rows; a limited link's step is compared with the bare bridge's (same two processes on
    the same cores: only the network differs), the model's extra being the no-overlap prediction."""
    bridge = results.get(0)
    rows = [
        "| link (tbf, each way) | gradient all-reduce 25.4 MB: measured / model | BatchNorm packet 3 KB | "
        f"step, 2 hosts x 1 rank (1 process alone: {alone_ms:.0f} ms) | step's extra over the bridge: measured / model |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rate, result in results.items():
        link = f"{rate} Mbit/s" if rate else "bridge, no limit"
        model = f"{GRADIENT_BYTES * 8 / (rate * 1e6) * 1e3:.0f} ms" if rate else "-"
        extra = "-"
        if rate and bridge is not None:
            predicted = (result["grad_ms"] - bridge["grad_ms"]) + SMALL_ALL_REDUCES_PER_STEP * (
                result["bn_ms"] - bridge["bn_ms"]
            )
            extra = f"{result['step_ms'] - bridge['step_ms']:.0f} ms / {predicted:.0f} ms"
        rows.append(
            f"| {link} | {result['grad_ms']:.0f} ms / {model} | {result['bn_ms']:.2f} ms | "
            f"{result['step_ms']:.0f} ms | {extra} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rates",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[0, 1000, 100],
        help="link rates in Mbit/s, comma-separated (0 = the bare bridge)",
    )
    parser.add_argument("--batch", type=int, default=8, help="images per rank per step (the paper model on CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 untimed)")
    parser.add_argument("--grad-repeats", type=int, default=5, help="timed gradient all-reduces (after 2 untimed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.batch, args.steps, args.grad_repeats)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
