"""A dask-jobqueue SLURMCluster from the config: one Dask worker process per SLURM job slot."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from .config import ClusterConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


def worker_env_prologue(env: Mapping[str, str]) -> list[str]:
    """Job-script lines that give the workers `env` and drop the nanny's MALLOC_TRIM_THRESHOLD_.

    The client's dask config does not reach SLURM jobs, so the nanny's pre-spawn environment is
    set through dask's environment-variable config; None unsets a default (docs/RUNNING.md).
    """
    spawn: dict[str, str | None] = {"MALLOC_TRIM_THRESHOLD_": None, **env}
    # A Python dict literal (dask reads it with ast.literal_eval); JSON strings are valid ones.
    literal = (
        "{"
        + ", ".join(
            f"{json.dumps(k)}: {'None' if v is None else json.dumps(v)}" for k, v in spawn.items()
        )
        + "}"
    )
    return [f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON={shlex.quote(literal)}"]


def slurm_kwargs(cluster: ClusterConfig, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """SLURMCluster arguments; GPUs go through `--gres`, walltime kills are survived via lifetime."""
    s = cluster.slurm
    extra = list(s.job_extra_directives)
    if s.gpus:
        extra.append(f"--gres=gpu:{s.gpus}")
    worker_extra: list[str] = []
    if s.worker_lifetime:
        # Workers retire before the walltime kill, staggered so they do not all leave at once;
        # the scheduler moves their work and adapt() starts replacements.
        worker_extra += [
            "--lifetime",
            s.worker_lifetime,
            "--lifetime-stagger",
            s.worker_lifetime_stagger,
        ]
    prologue = worker_env_prologue(env) if env is not None else []
    kwargs: dict[str, Any] = {
        "queue": s.queue,
        "account": s.account,
        # jobqueue gives each worker cores/processes Dask threads: batches_per_worker threads
        # per worker process (one session each, inference one batch at a time), while SLURM
        # still allocates all cores via job_cpu.
        "cores": s.processes * cluster.batches_per_worker,
        "processes": s.processes,
        "memory": s.memory,
        "walltime": s.walltime,
        "job_extra_directives": extra,
        "job_script_prologue": prologue + list(s.job_script_prologue),
        "worker_extra_args": worker_extra,
        "job_cpu": s.cores,
    }
    for key in ("interface", "local_directory", "log_directory", "python"):
        value = getattr(s, key)
        if value is not None:
            kwargs[key] = value
    return {k: v for k, v in kwargs.items() if v is not None}


def _slurm_cluster_class() -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "cluster.kind is slurm but dask-jobqueue is not installed: pip install 'vit-attn[slurm]'"
        ) from None
    return SLURMCluster


def check_slurm_reachable(timeout: float = 30.0) -> None:
    """Before any job is submitted: sbatch exists and the SLURM controller answers (`squeue`).

    Without this, a machine with no SLURM (or no configuration for it) printed dask-jobqueue's
    submission tracebacks and then waited for workers that could never come.
    """
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"cluster.kind is slurm but {tool} is not on PATH; run on a SLURM login node "
                "(or pick another cluster.kind)"
            )
    try:
        done = subprocess.run(
            ["squeue", "--noheader", "--user", str(os.getuid())],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:  # a busy controller may still take jobs: go on
        log.warning("squeue did not answer within %g s; submitting the worker jobs anyway", timeout)
        return
    said = (done.stderr or done.stdout).strip().splitlines()
    unreachable = (
        "unable to contact",
        "could not establish",
        "unable to process",
        "cannot open",
        "no such file",
    )
    if done.returncode != 0 and any(w in " ".join(said).lower() for w in unreachable):
        raise ConfigError(
            f"cluster.kind is slurm but SLURM cannot be reached here ("
            f"{said[-1] if said else 'squeue: exit ' + str(done.returncode)}); run on a SLURM login "
            "node (or pick another cluster.kind)"
        )


def job_script(cluster: ClusterConfig, env: Mapping[str, str] | None = None) -> str:
    """The batch script every worker job would run; submits nothing (for review and tests)."""
    with _slurm_cluster_class()(
        **slurm_kwargs(cluster, env), scheduler_options={"dashboard_address": None}
    ) as sc:
        return sc.job_script()


@contextlib.contextmanager
def slurm_cluster(cluster: ClusterConfig, env: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start SLURM jobs for workers (scaled or adaptive) and cancel them on exit."""
    s = cluster.slurm
    cls = _slurm_cluster_class()
    check_slurm_reachable()
    with cls(**slurm_kwargs(cluster, env)) as sc:
        if s.adapt:
            sc.adapt(minimum_jobs=s.minimum_jobs, maximum_jobs=s.jobs)
        elif s.worker_lifetime:
            # Only adaptive scaling replaces workers that retired at their lifetime.
            sc.adapt(minimum_jobs=s.jobs, maximum_jobs=s.jobs)
        else:
            sc.scale(jobs=s.jobs)
        yield sc
