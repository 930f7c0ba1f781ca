"""Precision, compile and the step benchmark, on CPU (GPU throughput targets are measured by
`dcgan bench step` on a GPU machine, not by timed unit tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CPU, TINY, run_cli, run_in_process

from dcgan.cluster.bench import end_to_end_share, synthetic_batch
from dcgan.config import ConfigError, load_config
from dcgan.distributed.env import DistInfo
from dcgan.distributed.parallelize import gradient_sync
from dcgan.errors import LaunchError
from dcgan.gan.cuda_graph import make_runner, unsupported_reason
from dcgan.gan.step import STAT_NAMES, build_step
from dcgan.train.trainer import build_trainer


def run_steps(n: int, *overrides: str) -> tuple[torch.Tensor, torch.nn.Module]:
    """Losses etc. of n steps on a fixed batch, and the generator afterwards."""
    config = load_config(TINY, ["train.batch_size=8", *overrides])
    g, _, step = build_step(config, CPU)
    images = synthetic_batch(config, CPU.device)
    return torch.stack([step(images) for _ in range(n)]), g


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains(precision: str) -> None:
    stats, g = run_steps(4, f"train.precision={precision}")
    losses = stats[:, [STAT_NAMES.index("loss_D"), STAT_NAMES.index("loss_G")]]
    assert torch.isfinite(losses).all() and stats[:, STAT_NAMES.index("nonfinite")].sum() == 0
    # fp16's GradScaler starts at 2^16 and skips the first steps whose gradients overflow; then finite
    assert torch.isfinite(stats[-1]).all()
    assert all(p.dtype == torch.float32 for p in g.parameters())  # autocast: weights stay fp32
    untrained = build_step(load_config(TINY, ["train.batch_size=8", f"train.precision={precision}"]), CPU)[0]
    changed = [not torch.equal(a, b) for a, b in zip(g.parameters(), untrained.parameters(), strict=True)]
    assert all(changed), "every parameter of G was updated"  # the same seed builds the same initial G


def test_fp16_uses_one_grad_scaler_and_others_none() -> None:
    config = load_config(TINY, ["train.precision=fp16"])
    assert build_step(config, CPU)[2].scaler.is_enabled()
    assert not build_step(load_config(TINY, ["train.precision=bf16"]), CPU)[2].scaler.is_enabled()


def test_bf16_autocast_keeps_the_first_losses_close_to_fp32() -> None:
    fp32, _ = run_steps(5, "train.precision=fp32")
    bf16, _ = run_steps(5, "train.precision=bf16")
    losses = [STAT_NAMES.index("loss_D"), STAT_NAMES.index("loss_G")]
    torch.testing.assert_close(bf16[:, losses], fp32[:, losses], rtol=0.05, atol=0.02)
    assert not torch.equal(bf16[:, losses], fp32[:, losses])  # it really ran in reduced precision


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    eager, g_eager = run_steps(3, "train.compile=false")
    compiled, g_compiled = run_steps(3, "train.compile=true")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_eager.parameters(), g_compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bench_step_prints_both_rates_and_their_ratio_and_its_progress_on_stderr() -> None:
    result = run_in_process(
        "bench", "step", "configs/tiny.yaml", "--batch-sizes", "8,16", "--warmup", "1", "--iters", "3"
    )
    assert [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("... ")] == [
        "... batch 8",
        "... batch 8",
        "... batch 16",
        "... batch 16",
    ]
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["batch", "reference", "img/s", "dcgan", "img/s", "ratio", "peak", "GiB"]
    for row, batch in zip(rows, (8, 16), strict=True):
        size, reference, ours, ratio, _ = row.split()
        assert int(size) == batch and float(reference) > 0 and float(ours) > 0
        # the printed figures are rounded (rates to 1 img/s, the ratio to 0.01): allow exactly that
        implied = float(ours) / float(reference)
        rounding = 0.005 + implied * (0.5 / float(ours) + 0.5 / float(reference)) * 1.01
        assert abs(float(ratio) - implied) <= rounding


def test_an_end_to_end_rate_above_the_synthetic_rate_is_not_printed_as_a_share() -> None:
    assert end_to_end_share(450, 500) == "90% of the synthetic-data rate"
    assert "load changed" in end_to_end_share(453, 53) and "%" not in end_to_end_share(453, 53)


def test_bench_step_times_the_multi_rank_path_of_one_process_beside_the_plain_step() -> None:
    out = run_in_process(
        "bench", "step", "configs/tiny.yaml", "--batch-sizes", "8", "--warmup", "1", "--iters", "3", "--distributed"
    )
    header, row = out.stdout.strip().splitlines()
    assert header.split() == [
        "batch",
        "reference",
        "img/s",
        "dcgan",
        "img/s",
        "ratio",
        "1-rank",
        "dist",
        "img/s",
        "ratio",
        "peak",
        "GiB",
    ]
    size, reference, ours, ratio, distributed, dist_ratio, _ = row.split()
    assert int(size) == 8 and min(float(reference), float(ours), float(distributed)) > 0
    implied = float(distributed) / float(reference)
    assert (
        abs(float(dist_ratio) - implied) <= 0.005 + implied * (0.5 / float(distributed) + 0.5 / float(reference)) * 1.01
    )
    assert "cross-rank BatchNorm" not in out.stderr  # a benchmark builds steps, it does not log a run


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["train.device=cpu"], "CUDA graphs need CUDA"),
        (["train.device=cuda", "train.precision=fp16"], "GradScaler is not captured"),
        (["train.device=cuda", "train.nonfinite=skip"], "GradScaler is not captured"),
    ],
)
def test_cuda_graph_mode_is_refused_in_one_line_where_it_cannot_apply(overrides: list[str], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as refused:
        load_config(TINY, ["train.cuda_graph=true", *overrides])
    assert "\n" not in str(refused.value) and "train.cuda_graph" in str(refused.value)


def test_cuda_graph_mode_needs_cuda_and_averages_gradients_itself_over_ranks() -> None:
    config = load_config(TINY, ["train.cuda_graph=true", "train.device=auto"])
    with pytest.raises(LaunchError, match="needs a CUDA device"):
        build_trainer(config, CPU)  # an auto device that resolved to the CPU
    gpu = torch.device("cuda", 0)
    one, eight = (DistInfo(rank=0, world_size=w, local_rank=0, device=gpu) for w in (1, 8))
    assert unsupported_reason(config, one) is None and unsupported_reason(config, eight) is None
    # a captured step cannot hold DDP's hook-driven all-reduce: it averages gradients with its own
    assert gradient_sync(config, eight) == "explicit" and gradient_sync(config, one) == "ddp"
    assert gradient_sync(load_config(TINY), eight) == "ddp"
    eager = build_step(load_config(TINY), CPU)[2]
    assert make_runner(eager, load_config(TINY), CPU) is eager  # the default: no wrapper at all


@pytest.mark.slow
def test_compiling_on_a_machine_without_cuda_prints_no_cuda_warning(tmp_path: Path) -> None:
    """inductor warns "No CUDA runtime is found" when it compiles C++ kernels on a machine without CUDA;
    the project compiles quietly there."""
    if torch.cuda.is_available():
        pytest.skip("the warning only exists without CUDA")
    result = run_cli(
        "train",
        "configs/tiny.yaml",
        f"run.dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.compile=true",
        "log.wandb=disabled",
    )
    assert "checkpoint of step 2 complete" in result.stderr
    assert "No CUDA runtime" not in result.stderr
