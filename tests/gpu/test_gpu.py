"""What only a CUDA machine can check: CUDA-graph replay against eager steps, bf16 + channels-last +
fused Adam, training and resuming through the CLI on the GPU, the multi-rank step run by one GPU (NCCL
group of one: no synchronizing call in eager, compiled and graph modes, each matching eager), and
cross-rank BatchNorm against BatchNorm on the doubled batch. Skipped where torch sees no GPU (the
two-rank BatchNorm test needs two)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn_ranks
from helpers import BEYOND_THE_PAPER, TINY, run_cli

from dcgan.config import load_config
from dcgan.distributed.env import DistInfo
from dcgan.distributed.parallelize import prepare_module
from dcgan.distributed.session import destroy_distributed, init_distributed
from dcgan.gan.cuda_graph import GraphedStep, make_runner
from dcgan.gan.models import Discriminator
from dcgan.gan.step import STAT_NAMES, build_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = DistInfo.single("cuda:0")
LOSSES = [STAT_NAMES.index("loss_D"), STAT_NAMES.index("loss_G")]


def batches(count: int, size: int = 32) -> list[torch.Tensor]:
    """Distinct uint8 batches at the tiny config's shape, made on the host with fixed seeds."""
    return [
        torch.randint(0, 256, (size, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)).cuda()
        for i in range(count)
    ]


def train_steps(count: int, *overrides: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stats of `count` steps on distinct batches and G's state afterwards, all on the host."""
    config = load_config(TINY, ["train.device=cuda", "train.batch_size=32", *overrides])
    g, _, step = build_step(config, GPU)
    runner = make_runner(step, config, GPU)
    stats = torch.stack([runner(images) for images in batches(count)]).cpu()
    return stats, {k: v.detach().cpu() for k, v in g.state_dict().items()}


@pytest.mark.parametrize(
    ("precision", "tolerance", "options"),
    [("fp32", 1e-4, ()), ("bf16", 2e-2, ()), ("fp32", 1e-4, BEYOND_THE_PAPER)],
    ids=["fp32", "bf16", "fp32-options"],
)
def test_cuda_graph_replay_matches_eager_steps(precision: str, tolerance: float, options: tuple[str, ...]) -> None:
    """With the options beyond the paper too: spectral norm's in-place power iteration is replayed."""
    torch.backends.cudnn.deterministic = True
    try:
        eager, g_eager = train_steps(9, f"train.precision={precision}", *options)
        graphed, g_graphed = train_steps(9, f"train.precision={precision}", "train.cuda_graph=true", *options)
    finally:
        torch.backends.cudnn.deterministic = False
    # steps 1-3 eager warm-up, 4 captured, 5-9 replayed: every one must match the eager run
    torch.testing.assert_close(graphed, eager, rtol=tolerance, atol=tolerance)
    for name in g_eager:
        torch.testing.assert_close(g_graphed[name], g_eager[name], rtol=tolerance, atol=tolerance, msg=name)


def test_graphed_step_replays_after_warm_up() -> None:
    config = load_config(TINY, ["train.device=cuda", "train.batch_size=32", "train.cuda_graph=true"])
    runner = make_runner(build_step(config, GPU)[2], config, GPU)
    assert isinstance(runner, GraphedStep)
    stats = [runner(images) for images in batches(6)]
    assert runner.graph is not None and runner.warmup_left == 0
    assert not torch.equal(stats[-1], stats[-2])  # each replay trained on its own batch
    assert all(torch.isfinite(s).all() for s in stats)


@pytest.mark.parametrize(
    ("precision", "options"),
    [("fp32", ()), ("bf16", ()), ("fp16", ()), ("bf16", BEYOND_THE_PAPER)],
    ids=["fp32", "bf16", "fp16", "bf16-options"],
)
def test_the_step_never_waits_for_the_gpu(precision: str, options: tuple[str, ...]) -> None:
    """No .item(), no device-to-host copy, no data-dependent shape: what makes the step capturable and
    lets the host queue work ahead. torch raises on any synchronizing call in "error" mode."""
    config = load_config(TINY, ["train.device=cuda", "train.batch_size=32", f"train.precision={precision}", *options])
    step = build_step(config, GPU)[2]
    inputs = batches(4)
    step(inputs[0])  # lazy initialisation (cuDNN/cuBLAS handles, optimizer state) may synchronize once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for images in inputs[1:]:
            step(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_channels_last_fused_adam_step() -> None:
    config = load_config(TINY, ["train.device=cuda", "train.precision=auto", "train.batch_size=32"])
    g, d, step = build_step(config, GPU)
    assert step.dtype == torch.bfloat16 and step.channels_last
    assert all(group["fused"] for group in step.opt_g.param_groups + step.opt_d.param_groups)
    # a weight with one input channel passes any channels-last check: take one with several
    conv = next(p for p in d.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv.dtype == torch.float32
    bf16, _ = train_steps(5, "train.precision=bf16")
    fp32, _ = train_steps(5, "train.precision=fp32")
    torch.testing.assert_close(bf16[:, LOSSES], fp32[:, LOSSES], rtol=0.05, atol=0.02)


def test_cli_trains_and_resumes_on_the_gpu(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = (
        "train",
        "configs/tiny.yaml",
        f"run.dir={run}",
        "train.device=cuda",
        "checkpoint.every=10",
        "log.every=10",
    )
    run_cli(*common, "train.steps=20")
    resumed = run_cli(*common, "train.steps=30")
    assert f"resumed from {run / 'checkpoints'}/step_000000020" in resumed.stderr
    lines = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30]
    assert all(line["peak_mem_gib"] > 0 for line in lines)


def test_the_weight_average_updates_without_a_host_sync_and_follows_a_graphed_run(tmp_path: Path) -> None:
    from dcgan.evaluation.generators import load_generator
    from dcgan.gan.ema import GeneratorEMA
    from dcgan.gan.models import Generator

    model = load_config(TINY).model
    g = Generator(model).cuda()
    ema = GeneratorEMA(g, model, 0.999)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ema.updates == 3 and next(ema.module.parameters()).is_cuda
    run = tmp_path / "run"
    run_cli(
        "train",
        "configs/tiny.yaml",
        f"run.dir={run}",
        "train.device=cuda",
        "train.cuda_graph=true",
        "train.ema=0.99",
        "train.steps=30",
        "sample.every=30",
    )
    averaged, raw = load_generator(run), load_generator(run, weights="raw")
    assert averaged.weights == "ema"
    assert not torch.equal(next(averaged.generator.parameters()), next(raw.generator.parameters()))


def _cross_rank_bn_on_two_gpus(rank: int, out: Path) -> None:
    """Each of 2 ranks runs D (cross-rank BatchNorm, DDP) on its half of one batch; rank 0 also runs
    plain BatchNorm on the whole batch; both write D's outputs and first conv's gradient. TF32 is off:
    cuDNN's default TF32 convolutions differ from fp32 by ~1e-3, far above the tolerance compared."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    info = init_distributed("cuda", 120)
    model = load_config(TINY).model
    torch.manual_seed(0)
    reference = Discriminator(model).cuda()
    torch.manual_seed(0)
    ddp, _ = prepare_module(Discriminator(model), info, compile=False, channels_last=False)
    images = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
    mine = images[rank * 8 : (rank + 1) * 8]
    logits = ddp(mine)
    logits.sum().backward()  # DDP averages the two ranks' gradients
    gathered = [torch.empty_like(logits) for _ in range(2)]
    torch.distributed.all_gather(gathered, logits.detach())
    if rank == 0:
        full = reference(images)
        (full.sum() / 2).backward()
        torch.save(
            {
                "sync": torch.cat(gathered).cpu(),
                "full": full.detach().cpu(),
                "sync_grad": next(ddp.module.parameters()).grad.cpu(),
                "full_grad": next(reference.parameters()).grad.cpu(),
            },
            out,
        )
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="BatchNorm across ranks on GPUs needs two")
def test_cross_rank_batchnorm_over_two_gpus_equals_batchnorm_on_the_doubled_batch(tmp_path: Path) -> None:
    out = tmp_path / "syncbn.pt"
    spawn_ranks(_cross_rank_bn_on_two_gpus, 2, out)
    result = torch.load(out)
    torch.testing.assert_close(result["sync"], result["full"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result["sync_grad"], result["full_grad"], rtol=1e-4, atol=1e-5)


STEP_MODES = {
    "eager": (),
    # channels-last off: torch 2.11's compile fails on channels-last ConvTranspose2d chains (pytorch#171622),
    # a separate problem (issue #14); this test is about the multi-rank path
    "compiled": ("train.compile=true", "train.channels_last=false"),
    "graph": ("train.cuda_graph=true",),
}


def _distributed_path_of_one_gpu(rank: int, mode: str, out: Path) -> None:
    """The multi-rank step (dist.force: NCCL group of one, cross-rank BatchNorm, DDP or the graph's own
    all-reduce) makes no synchronizing call once warm; its stats match the eager multi-rank step's."""
    torch.backends.cudnn.deterministic = True
    info = init_distributed("cuda", 120, force=True)
    assert info.distributed and info.world_size == 1
    try:
        common = ["train.device=cuda", "train.batch_size=32", "train.precision=fp32", "dist.force=true"]
        inputs = batches(9)
        results = {}
        for name, overrides in (("eager", ()), (mode, STEP_MODES[mode])):
            config = load_config(TINY, [*common, *overrides])
            runner = make_runner(build_step(config, info)[2], config, info)
            stats = [runner(images) for images in inputs[:5]]  # warm-up, compilation, capture happen here
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                stats += [runner(images) for images in inputs[5:]]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            results[name] = torch.stack(stats).cpu()
        torch.save(results, out)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("mode", list(STEP_MODES))
def test_distributed_step_on_one_gpu_never_waits_and_matches_eager(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "stats.pt"
    spawn_ranks(_distributed_path_of_one_gpu, 1, mode, out)
    results = torch.load(out)
    torch.testing.assert_close(results[mode], results["eager"], rtol=1e-3, atol=1e-4)
