"""Cross-rank BatchNorm and the multi-rank step, with real gloo processes: the contract that makes
`torchrun` a pure speed-up is that W ranks at batch b compute what one process computes at batch W*b."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn_ranks
from helpers import BEYOND_THE_PAPER, CPU, flatten, load_checkpoint_tensors, run_in_process, tiny_config
from torch import nn

from dcgan.distributed.batchnorm import CrossRankBatchNorm2d, convert_to_cross_rank
from dcgan.distributed.env import DistInfo
from dcgan.distributed.session import destroy_distributed, init_distributed
from dcgan.gan.step import build_step

pytestmark = pytest.mark.slow

CHANNELS, PER_RANK, OFFSETS = 6, 4, (0.0, 30.0)


def joint_input(world: int, offset: float) -> torch.Tensor:
    """The concatenated batch of all ranks: per-channel means far from zero when `offset` is large."""
    generator = torch.Generator().manual_seed(1)
    spread = torch.rand(1, CHANNELS, 1, 1, generator=generator) * 3 + 0.5
    return torch.randn(world * PER_RANK, CHANNELS, 5, 5, generator=generator) * spread + offset


def output_weights(world: int) -> torch.Tensor:
    """Fixed weights of the scalar loss sum(w * y): every output element gets its own gradient."""
    return torch.randn(world * PER_RANK, CHANNELS, 5, 5, generator=torch.Generator().manual_seed(2))


def affine_batchnorm() -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(CHANNELS)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(CHANNELS, generator=generator) * 0.3 + 1)
        layer.bias.copy_(torch.randn(CHANNELS, generator=generator) * 0.3)
    return layer


def _cross_rank_forward_backward(rank: int, world: int, out: Path) -> None:
    """Two training forwards (so the running statistics are updated twice) and one backward, on this
    rank's slice of the joint batch, for each offset."""
    init_distributed("cpu", 60)
    try:
        results = {}
        for offset in OFFSETS:
            layer = convert_to_cross_rank(affine_batchnorm(), torch.distributed.group.WORLD)
            assert isinstance(layer, CrossRankBatchNorm2d)
            mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            x = joint_input(world, offset)[mine].clone().requires_grad_()
            layer(x.detach() + 1.0)
            y = layer(x)
            (y * output_weights(world)[mine]).sum().backward()
            results[offset] = {
                "y": y.detach(),
                "grad_x": x.grad,
                "grad_weight": layer.weight.grad,
                "grad_bias": layer.bias.grad,
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
            }
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        destroy_distributed()


def reference_float64(world: int, offset: float) -> dict[str, torch.Tensor]:
    """nn.BatchNorm2d on the joint batch, in float64: the exact values both float32 forms approximate."""
    layer = affine_batchnorm().double()
    x = joint_input(world, offset).double().requires_grad_()
    layer(x.detach() + 1.0)
    y = layer(x)
    (y * output_weights(world).double()).sum().backward()
    return {
        "y": y.detach(),
        "grad_x": x.grad,
        "grad_weight": layer.weight.grad,
        "grad_bias": layer.bias.grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    }


def assert_close_to(actual: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    """Within 1e-5 of the exact value, relative to the largest magnitude of that quantity."""
    scale = exact.abs().max().item()
    torch.testing.assert_close(actual.double(), exact, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_cross_rank_batchnorm_equals_batchnorm_on_the_joint_batch(tmp_path: Path, world: int) -> None:
    spawn_ranks(_cross_rank_forward_backward, world, world, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for offset in OFFSETS:
        exact = reference_float64(world, offset)
        per_rank = [r[offset] for r in ranks]
        assert_close_to(torch.cat([r["y"] for r in per_rank]), exact["y"], f"output at offset {offset}")
        assert_close_to(
            torch.cat([r["grad_x"] for r in per_rank]), exact["grad_x"], f"input gradient at offset {offset}"
        )
        # each rank holds the gradient of its own share of the loss; DDP averages them, the sum is the whole
        for name in ("grad_weight", "grad_bias"):
            assert_close_to(sum(r[name] for r in per_rank), exact[name], f"{name} at offset {offset}")
        for name in ("running_mean", "running_var"):
            assert all(torch.equal(r[name], per_rank[0][name]) for r in per_rank), f"{name} differs between ranks"
            assert_close_to(per_rank[0][name], exact[name], f"{name} at offset {offset}")


# --- the whole training step -----------------------------------------------------------------------

STEPS, BATCH = 4, 8


def step_inputs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, z) of each step for the joint batch of 2 ranks at BATCH each."""
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randint(0, 256, (2 * BATCH, 1, 16, 16), dtype=torch.uint8, generator=generator),
            torch.randn(2 * BATCH, 16, generator=generator),
        )
        for _ in range(STEPS)
    ]


def train_state(
    run_dir: Path, info: DistInfo, part: slice, compile: bool = False, options: tuple[str, ...] = (), **build: object
) -> dict[str, torch.Tensor]:
    """G's and D's parameters and buffers after STEPS steps on the `part` of every joint batch (with
    `options`: config overrides)."""
    batch = part.stop - part.start
    config = tiny_config(run_dir, f"train.batch_size={batch}", f"train.compile={str(compile).lower()}", *options)
    g, d, step = build_step(config, info, **build)  # type: ignore[arg-type]
    for images, z in step_inputs():
        step.train(images[part], z[part], step.draw_augmentation())  # a rank draws its own share
    return {f"G.{k}": v.detach().clone() for k, v in g.state_dict().items()} | {
        f"D.{k}": v.detach().clone() for k, v in d.state_dict().items()
    }


def _two_rank_steps(rank: int, out: Path, options: tuple[str, ...]) -> None:
    info = init_distributed("cpu", 60)
    try:
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        states = {sync: train_state(out, info, mine, options=options, sync=sync) for sync in ("ddp", "explicit")}
        torch.save(states, out / f"steps{rank}.pt")
    finally:
        destroy_distributed()


@pytest.mark.parametrize(
    "options",
    [(), BEYOND_THE_PAPER, (*BEYOND_THE_PAPER, "model.d_norm=none")],
    ids=["paper", "options", "options-without-D-batchnorm"],
)
def test_two_ranks_at_batch_b_train_exactly_like_one_process_at_2b(tmp_path: Path, options: tuple[str, ...]) -> None:
    """DDP and the step's own flat all-reduce (what a CUDA graph captures) both match one process; with
    every option beyond the paper too (spectral norm's power iteration beside the cross-rank BatchNorm)."""
    spawn_ranks(_two_rank_steps, 2, tmp_path, options)
    one = CPU
    reference = train_state(tmp_path, one, slice(0, 2 * BATCH), options=options)
    for rank in (0, 1):
        states = torch.load(tmp_path / f"steps{rank}.pt")
        assert sorted(states) == ["ddp", "explicit"]
        for sync, state in states.items():
            assert state.keys() == reference.keys()
            for key, value in reference.items():
                torch.testing.assert_close(
                    state[key], value, rtol=1e-4, atol=2e-6, msg=lambda m, sync=sync, key=key: f"{sync} {key}: {m}"
                )
    # the comparison can tell: one rank's half batch alone (its own statistics and gradients) ends elsewhere
    alone = train_state(tmp_path, one, slice(0, BATCH), options=options)
    differs = [
        k for k in reference if "weight" in k and not torch.allclose(alone[k], reference[k], rtol=1e-4, atol=2e-6)
    ]
    assert len(differs) >= (6 if "model.d_norm=none" not in options else 1)  # without BatchNorm: D's only by its batch


def _compiled_two_rank_steps(rank: int, out: Path, options: tuple[str, ...]) -> None:
    from torch._dynamo.utils import counters

    info = init_distributed("cpu", 120)
    try:
        counters.clear()
        state = train_state(out, info, slice(rank * BATCH, (rank + 1) * BATCH), compile=True, options=options)
        breaks = {reason: count for reason, count in counters["graph_break"].items()}
        torch.save(
            {"state": state, "graph_breaks": breaks, "frames": dict(counters["stats"])}, out / f"compiled{rank}.pt"
        )
    finally:
        destroy_distributed()


@pytest.mark.parametrize("options", [(), BEYOND_THE_PAPER], ids=["paper", "options"])
def test_compiled_multi_rank_step_has_no_graph_break_and_matches_eager(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    """torch.compile traces the cross-rank BatchNorm's all-reduces (forward and backward) into the
    models' graphs: no break, and the same weights as the eager joint-batch reference; with spectral
    norm too, whose power iteration updates its vectors in place inside the compiled forward (the
    gradients through the normalized weights are checked by the weights they lead to)."""
    spawn_ranks(_compiled_two_rank_steps, 2, tmp_path, options)
    one = CPU
    reference = train_state(tmp_path, one, slice(0, 2 * BATCH), options=options)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"compiled{rank}.pt")
        assert result["graph_breaks"] == {}
        assert result["frames"].get("unique_graphs", 0) >= 2  # G and D really were compiled
        for key, value in reference.items():
            torch.testing.assert_close(
                result["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}"
            )


def test_one_process_runs_the_multi_rank_path_with_dist_force(tmp_path: Path) -> None:
    """dist.force: a process group of one (no launcher, no port), DDP and cross-rank BatchNorm; it
    trains what the plain single-process path trains, to float tolerance."""
    runs = {}
    for forced in ("true", "false"):
        run = tmp_path / f"force-{forced}"
        result = run_in_process(
            "train", "configs/tiny.yaml", f"run.dir={run}", "train.steps=10", f"dist.force={forced}"
        )
        mentioned = "cross-rank BatchNorm: batch statistics over all 1 rank(s), 16 images" in result.stderr
        assert mentioned == (forced == "true")
        runs[forced] = flatten(load_checkpoint_tensors(run / "checkpoints" / "step_000000010"))
    forced_state, plain_state = runs["true"], runs["false"]
    weights = [k for k in plain_state if k.startswith("model.") and "num_batches" not in k]
    assert len(weights) >= 10
    for key in weights:
        torch.testing.assert_close(
            forced_state[key], plain_state[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}"
        )
