"""Optional CUDA-graph mode (`train.cuda_graph`): the whole GAN step captured once, then replayed.

At batch 128 a DCGAN step is a few hundred short kernels, and launching them one by one from Python
takes longer than running them; replaying a captured graph launches the whole step — both forwards,
both backwards, both Adam updates, the statistics — at once. Capture records device addresses, so the
step must touch the same tensors every time: the batch and the noise are copied into static buffers
outside the graph (the noise is drawn as in eager mode, by step: dcgan.gan.step.latent_noise, so checkpoints
and resumes are unchanged), gradients and activations live in the graph's private memory pool, and Adam keeps its
step counter on the device (`capturable=True`).

Several processes: the models are not wrapped in DDP (whose all-reduce is launched from autograd hooks
on a bucket schedule that a capture would freeze mid-way); instead the step averages each model's
gradients with one flat NCCL all-reduce of its own (`distributed.average_gradients`), and the cross-rank
BatchNorm's all-reduces are plain collectives too, so the capture holds every collective of the step in
order (NCCL >= 2.9.6). Replicas start equal by a broadcast of rank 0's weights. A captured collective
is invisible to the NCCL watchdog: a rank that dies during a replay stalls the others until the job's
time limit or `dist.timeout_s` of the next host-side collective (the stop agreement, every 10 steps).

Where it does not apply (refused with one line):
- fp16 and `train.nonfinite=skip`: both need GradScaler, whose skip/backoff decision is not captured
  here; refused by config validation (`dcgan.config.validate`), as is `train.device=cpu`;
- a process that runs on the CPU all the same (`train.device=auto` without a GPU): CUDA graphs are a
  CUDA feature; refused when the step is built (`unsupported_reason`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from dcgan.config import Config
from dcgan.distributed.env import DistInfo
from dcgan.errors import LaunchError
from dcgan.gan.step import GANStep

WARMUP_STEPS = 3
"""Eager steps before capture: cuDNN autotuning, compilation and lazy allocations happen here, not in
the graph."""

StepRunner = Callable[[torch.Tensor], torch.Tensor]


def unsupported_reason(config: Config, info: DistInfo) -> str | None:
    """Why `train.cuda_graph` cannot run in this setup, or None when it can."""
    if info.device.type != "cuda":
        return f"train.cuda_graph needs a CUDA device (this process runs on {info.device})"
    return None


def make_runner(step: GANStep, config: Config, info: DistInfo) -> StepRunner:
    """The callable the loop runs each step: the eager step, or its CUDA-graph replay."""
    if not config.train.cuda_graph:
        return step
    reason = unsupported_reason(config, info)
    if reason:
        raise LaunchError(reason)
    return GraphedStep(step)


class GraphedStep:
    """Runs WARMUP_STEPS eager steps on a side stream, captures the next one, then replays it.

    Same call and same result as GANStep: one uint8 batch in, the stats vector out (a copy, so the next
    replay cannot overwrite a vector the loop still holds).
    """

    def __init__(self, step: GANStep, warmup: int = WARMUP_STEPS) -> None:
        self.step = step
        self.warmup_left = warmup
        step.autocast_cache = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_images: torch.Tensor | None = None
        self.static_z: torch.Tensor | None = None
        self.static_uniforms: torch.Tensor | None = None
        self.static_stats: torch.Tensor | None = None
        self.side_stream: torch.cuda.Stream | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        z, uniforms = self.step.noise.draw(), self.step.draw_augmentation()
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self._eager_on_side_stream(images, z, uniforms)
        if self.graph is None:
            self._capture(images, z, uniforms)
        assert self.graph is not None and self.static_images is not None and self.static_z is not None
        if images.shape != self.static_images.shape:
            raise RuntimeError(
                f"train.cuda_graph: batch of shape {tuple(images.shape)} after capturing "
                f"{tuple(self.static_images.shape)}; the loader must deliver full batches"
            )
        self.static_images.copy_(images, non_blocking=True)
        self.static_z.copy_(z)
        if uniforms is not None:
            assert self.static_uniforms is not None
            self.static_uniforms.copy_(uniforms)
        self.graph.replay()
        assert self.static_stats is not None
        return self.static_stats.clone()

    def _eager_on_side_stream(
        self, images: torch.Tensor, z: torch.Tensor, uniforms: torch.Tensor | None
    ) -> torch.Tensor:
        """Warm-up as the CUDA-graph docs prescribe: on one side stream, joined back before returning.
        The side stream first waits for the main one, so memory it reuses is no longer being read."""
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(device=images.device)
        side = self.side_stream
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")  # Adam: "not capturing yet"
            stats = self.step.train(images, z, uniforms)
        torch.cuda.current_stream(images.device).wait_stream(side)
        return stats

    def _capture(self, images: torch.Tensor, z: torch.Tensor, uniforms: torch.Tensor | None) -> None:
        """Record one step on static buffers. Gradients are set to None first so that backward
        allocates them from the graph's pool, at addresses that every replay reuses."""
        self.static_images = images.clone()
        self.static_z = z.clone()
        self.static_uniforms = None if uniforms is None else uniforms.clone()
        self.step.opt_g.zero_grad(set_to_none=True)
        self.step.opt_d.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may allocate pinned memory during the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_stats = self.step.train(self.static_images, self.static_z, self.static_uniforms)
        self.graph = graph
