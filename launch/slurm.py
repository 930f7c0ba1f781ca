"""Deprecated alias of `dcgan submit`, kept for one release.

SLURM jobs queued or requeued by an earlier version hold a pickled `launch.slurm.TrainJob`: unpickling
looks the class up under that name and finds dcgan.cluster.slurm_job.TrainJob here. New submissions: `dcgan submit CONFIG [options]` (same options).
"""

from __future__ import annotations

from dcgan.cli.submit import main
from dcgan.cluster.slurm_job import TrainJob

__all__ = ["TrainJob", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
