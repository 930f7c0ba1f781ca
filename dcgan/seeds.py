"""Seeds derived from the run's seed and a position (an epoch, a partition, a step): every random stream
of a run is a pure function of where it is, never of which rank or worker draws it, so that the same
run on another number of ranks or loader workers draws the same numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash of ints is not salted across processes,
    but tuples of them are not promised stable either: this is explicit arithmetic)."""
    seed = 0x9E3779B97F4A7C15
    for value in values:
        seed = (seed * 1_000_003 + value + 0x632BE5AB) & 0x7FFF_FFFF_FFFF_FFFF
    return seed


@dataclass
class StepDraws:
    """The random numbers of each training step as a function of (seed, stream, step) alone: drawn for the
    whole global batch, of which this rank takes its slice of `batch_dim` (positions rank x share ..
    (rank + 1) x share, the positions the data stream gives it). A run on any number of ranks therefore
    draws the same numbers for each image, and a resume needs only the step (`at`), not a generator's
    state per rank. The latent noise and DiffAugment's parameters are two streams of it."""

    seed: int
    stream: int
    """Tags this stream apart from the run's others, which mix the same run seed."""
    shape: tuple[int, ...]
    """The shape of a whole global batch's draw."""
    batch_dim: int
    normal: bool
    """Standard normal numbers, else uniform in [0, 1)."""
    rank: int
    world_size: int
    device: torch.device
    at: int = 0
    """The step whose numbers the next draw returns (the trainer sets it on resume)."""
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device=self.device)

    def global_batch_at(self, step: int) -> torch.Tensor:
        """The whole global batch's numbers of `step` (every rank's slices, in rank order)."""
        self.generator.manual_seed(mix(self.seed, self.stream, step))
        sample = torch.randn if self.normal else torch.rand
        return sample(self.shape, device=self.device, generator=self.generator)

    def draw(self) -> torch.Tensor:
        """This rank's numbers for step `at`, then move on to the next step."""
        share = self.shape[self.batch_dim] // self.world_size
        numbers = self.global_batch_at(self.at).narrow(self.batch_dim, self.rank * share, share)
        self.at += 1
        return numbers
