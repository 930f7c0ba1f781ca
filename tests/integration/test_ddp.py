"""DDP on CPU with real gloo processes: identical replicas, averaged gradients, disjoint data, dead ranks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import _rank_main, free_port, spawn_ranks
from helpers import TorchrunRun, tiny_config

from dcgan.config import ModelConfig
from dcgan.distributed.collectives import replicas_agree
from dcgan.distributed.parallelize import prepare_module, sync_buffers
from dcgan.distributed.session import destroy_distributed, init_distributed
from dcgan.gan.losses import discriminator_loss
from dcgan.gan.models import Discriminator
from dcgan.train.trainer import build_trainer

pytestmark = pytest.mark.slow


def _train_k_steps(rank: int, out: Path, steps: int) -> None:
    info = init_distributed("cpu", 60)
    try:
        trainer = build_trainer(tiny_config(out / "run"), info)
        batches = iter(trainer.data)
        seen = []
        for _ in range(steps):
            images = next(batches)
            seen.append(images.clone())
            trainer.step_fn(images)
        before_sync = replicas_agree(trainer.g_bare, info) + replicas_agree(trainer.d_bare, info)
        sync_buffers(trainer.g_bare, info)
        sync_buffers(trainer.d_bare, info)
        after_sync = replicas_agree(trainer.g_bare, info) + replicas_agree(trainer.d_bare, info)
        g_state = {k: v.clone() for k, v in trainer.g_bare.state_dict().items()}
        d_state = {k: v.clone() for k, v in trainer.d_bare.state_dict().items()}
        with torch.no_grad():
            trainer.d_bare.main[0].weight[0, 0, 0, 0] += rank  # a deliberate divergence on rank 1
        perturbed = replicas_agree(trainer.d_bare, info)
        torch.save(
            {
                "G": g_state,
                "D": d_state,
                "seen": torch.cat(seen),
                "before_sync": before_sync,
                "after_sync": after_sync,
                "perturbed": perturbed,
            },
            out / f"rank{rank}.pt",
        )
    finally:
        destroy_distributed()


def test_two_ranks_keep_identical_replicas_and_consume_disjoint_data(tmp_path: Path) -> None:
    spawn_ranks(_train_k_steps, 2, tmp_path, 6)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    params = [k for k in r0["G"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0["G"][k], r1["G"][k]) for k in params)
    assert all(torch.equal(r0["D"][k], r1["D"][k]) for k in r0["D"] if "running" not in k and "num_batches" not in k)
    # cross-rank BatchNorm: every rank computes the same running statistics, no broadcast needed
    assert r0["before_sync"] == [] and r1["before_sync"] == []
    assert r0["after_sync"] == [] and r1["after_sync"] == []
    assert torch.equal(r0["G"]["main.1.running_mean"], r1["G"]["main.1.running_mean"])
    assert r0["perturbed"] == r1["perturbed"] == ["main.0.weight"]
    # every rank trained on its own slice of each epoch: no image appears on both ranks
    a = {bytes(im.numpy().tobytes()) for im in r0["seen"]}
    b = {bytes(im.numpy().tobytes()) for im in r1["seen"]}
    assert len(a) >= 90 and len(b) >= 90 and not a & b


def _ddp_gradients(rank: int, out: Path) -> None:
    info = init_distributed("cpu", 60)
    try:
        torch.manual_seed(0)
        # per-rank BatchNorm (model.sync_bn=false): each rank's gradient is its own batch's, DDP averages them
        d = Discriminator(ModelConfig(resolution=16, ndf=4, channels=1))
        ddp, bare = prepare_module(d, info, compile=False, channels_last=False, sync_bn=False)
        real = torch.load(out / f"real{rank}.pt")
        fake = torch.load(out / f"fake{rank}.pt")
        discriminator_loss(ddp(real), ddp(fake)).backward()
        torch.save({n: p.grad for n, p in bare.named_parameters()}, out / f"grad{rank}.pt")
    finally:
        destroy_distributed()


def test_applied_gradient_is_the_mean_of_the_per_rank_gradients(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    for rank in (0, 1):
        torch.save(torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1, tmp_path / f"real{rank}.pt")
        torch.save(torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1, tmp_path / f"fake{rank}.pt")
    spawn_ranks(_ddp_gradients, 2, tmp_path)
    by_hand = []
    for rank in (0, 1):  # each rank's gradient computed alone, in this process, from the same init
        torch.manual_seed(0)
        d = Discriminator(ModelConfig(resolution=16, ndf=4, channels=1))
        discriminator_loss(
            d(torch.load(tmp_path / f"real{rank}.pt")), d(torch.load(tmp_path / f"fake{rank}.pt"))
        ).backward()
        by_hand.append({n: p.grad.clone() for n, p in d.named_parameters()})
    for rank in (0, 1):
        applied = torch.load(tmp_path / f"grad{rank}.pt")
        for name, grad in applied.items():
            mean = (by_hand[0][name] + by_hand[1][name]) / 2
            torch.testing.assert_close(grad, mean, rtol=1e-5, atol=1e-7)
            assert not torch.allclose(by_hand[0][name], by_hand[1][name])


def _die_or_wait(rank: int, out: Path) -> None:
    init_distributed("cpu", 5)
    if rank == 1:
        os._exit(17)  # a crashed rank: no clean shutdown, no message
    started = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        outcome = "no error"
    except Exception as exc:  # noqa: BLE001 - any error type is acceptable, a hang is not
        outcome = f"{type(exc).__name__}: {exc}"
    (out / "rank0.txt").write_text(f"{time.monotonic() - started:.1f}\n{outcome}")
    destroy_distributed()


def test_a_dead_rank_makes_the_others_fail_within_the_timeout(tmp_path: Path) -> None:
    context = torch.multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=_rank_main, args=(r, 2, port, _die_or_wait, (tmp_path,))) for r in (0, 1)]
    started = time.monotonic()
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=60)
    assert ranks[1].exitcode == 17
    assert ranks[0].exitcode == 0, "rank 0 hung or crashed instead of reporting the error"
    elapsed, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome != "no error"
    assert float(elapsed) < 5 + 10 and time.monotonic() - started < 60


def test_torchrun_two_ranks_through_the_cli(two_rank_run: TorchrunRun) -> None:
    run = two_rank_run.run
    assert "2 rank(s) on cpu, batch 16 per rank (global 32)" in two_rank_run.stderr
    assert "cross-rank BatchNorm: batch statistics over all 2 rank(s), 32 images" in two_rank_run.stderr
    assert sorted(p.name for p in (run / "checkpoints" / "step_000000010").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    lines = (run / "stats.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"global_batch": 32' in lines[-1]  # written once, by rank 0
