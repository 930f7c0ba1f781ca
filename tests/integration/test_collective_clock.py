"""The timed gradient all-reduce (dcgan.distributed.collectives' DDP comm hook) gives DDP's own
gradients on 2 and 3 gloo ranks, and counts the time each rank waited in it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn_ranks


def _gradients_with_and_without_the_timed_hook(rank: int, world: int, out: Path) -> None:
    """D's gradients on this rank's slice of one batch: through prepare_module's DDP (the timed hook on
    CPU), and through a DDP of the same weights with DDP's own all-reduce; the collective clock's reading."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dcgan.config import ModelConfig
    from dcgan.distributed.collectives import COLLECTIVE_CLOCK
    from dcgan.distributed.parallelize import prepare_module
    from dcgan.distributed.session import destroy_distributed, init_distributed
    from dcgan.gan.models import Discriminator

    info = init_distributed("cpu", 60, liveness_s=0)
    try:
        model = ModelConfig(resolution=16, channels=1, nz=8, ngf=8, ndf=8)
        torch.manual_seed(0)
        images = torch.randn(4 * world, 1, 16, 16)[rank * 4 : (rank + 1) * 4]
        hooked, bare = prepare_module(Discriminator(model), info, compile=False, channels_last=False, sync_bn=False)
        plain_module = Discriminator(model)
        plain_module.load_state_dict(bare.state_dict())
        plain = DDP(plain_module, broadcast_buffers=False)
        waited = COLLECTIVE_CLOCK.seconds
        hooked(images).sum().backward()
        waited = COLLECTIVE_CLOCK.seconds - waited
        plain(images).sum().backward()
        torch.save(
            {
                "hooked": [p.grad for p in bare.parameters()],
                "plain": [p.grad for p in plain_module.parameters()],
                "waited": waited,
            },
            out / f"rank{rank}.pt",
        )
    finally:
        destroy_distributed()


@pytest.mark.slow  # gloo processes
@pytest.mark.parametrize("world", [2, 3])
def test_the_timed_gradient_all_reduce_gives_ddps_gradients_and_counts_its_wait(world: int, tmp_path: Path) -> None:
    """The hook that times DDP's all-reduce on CPU changes no gradient: equal to DDP's own to float32
    rounding (bit for bit at 2 ranks; at 3 the hook divides before summing, DDP after), on every rank."""
    spawn_ranks(_gradients_with_and_without_the_timed_hook, world, world, tmp_path)
    for rank in range(world):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        for hooked, plain in zip(found["hooked"], found["plain"], strict=True):
            if world == 2:
                assert torch.equal(hooked, plain)
            else:
                torch.testing.assert_close(hooked, plain, rtol=1e-6, atol=1e-7)
        assert found["waited"] > 0
