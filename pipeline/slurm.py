"""A dask-jobqueue SLURMCluster from the config: one Dask worker process per SLURM job slot."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import ClusterConfig
from .errors import ConfigError


def slurm_kwargs(cluster: ClusterConfig) -> dict[str, Any]:
    """SLURMCluster arguments; GPUs go through `--gres`, walltime kills are survived via lifetime."""
    s = cluster.slurm
    extra = list(s.job_extra_directives)
    if s.gpus:
        extra.append(f"--gres=gpu:{s.gpus}")
    worker_extra: list[str] = []
    if s.worker_lifetime:
        # Workers retire before the walltime kill, staggered so they do not all leave at once;
        # the scheduler moves their work and adapt() starts replacements.
        worker_extra += ["--lifetime", s.worker_lifetime, "--lifetime-stagger", s.worker_lifetime_stagger]
    kwargs: dict[str, Any] = {
        "queue": s.queue,
        "account": s.account,
        # jobqueue gives each worker cores/processes Dask threads; one thread per worker
        # process (one session each) while SLURM still allocates all cores via job_cpu.
        "cores": s.processes,
        "processes": s.processes,
        "memory": s.memory,
        "walltime": s.walltime,
        "job_extra_directives": extra,
        "job_script_prologue": list(s.job_script_prologue),
        "worker_extra_args": worker_extra,
        "job_cpu": s.cores,
    }
    for key in ("interface", "local_directory", "log_directory", "python"):
        value = getattr(s, key)
        if value is not None:
            kwargs[key] = value
    return {k: v for k, v in kwargs.items() if v is not None}


@contextlib.contextmanager
def slurm_cluster(cluster: ClusterConfig) -> Iterator[Any]:
    """Start SLURM jobs for workers (scaled or adaptive) and cancel them on exit."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "cluster.kind is slurm but dask-jobqueue is not installed: pip install 'vit-attention-pipeline[slurm]'"
        ) from None
    s = cluster.slurm
    with SLURMCluster(**slurm_kwargs(cluster)) as sc:
        if s.adapt:
            sc.adapt(minimum_jobs=s.minimum_jobs, maximum_jobs=s.jobs)
        else:
            sc.scale(jobs=s.jobs)
        yield sc
