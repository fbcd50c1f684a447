"""`cluster.kind: auto`: run in this process or on a LocalCluster, whichever fits the job.

A LocalCluster costs a scheduler, a nanny and worker processes that each import the package
and onnxruntime (~3-5 s before the first batch on 2 cores) and then share the cores with the
work. In-process, one session holds two batches (one decodes, maps and writes while the other
infers), which on a few cores is as fast as one Dask worker (docs/PERFORMANCE.md) without
that start-up. A cluster pays where there are many cores for several worker processes (the
host work of one process is bound by its GIL) and enough batches to amortise the start-up.
"""

from __future__ import annotations

from .config import ClusterConfig
from .runtime import available_threads

# Fewer batches than this: a cluster's start-up costs more than it could save.
AUTO_MIN_BATCHES = 8
# Up to this many cores, one process with two batches in flight keeps them busy.
AUTO_MAX_INPROCESS_CORES = 4
# Cores per worker process when auto starts a LocalCluster and n_workers is not given.
AUTO_CORES_PER_WORKER = 8


def choose_executor(
    cluster: ClusterConfig, n_batches: int, cores: int | None = None
) -> tuple[ClusterConfig, str]:
    """The cluster to run on, and why; explicit kinds come back unchanged with no reason."""
    if cluster.kind != "auto":
        return cluster, ""
    cores = cores or available_threads()
    if n_batches < AUTO_MIN_BATCHES:
        why = f"{n_batches} batches: a cluster's start-up would cost more than it saves"
        return cluster.model_copy(update={"kind": "none"}), f"in-process ({why})"
    if cores <= AUTO_MAX_INPROCESS_CORES:
        why = (
            f"{cores} cores: one process with {cluster.batches_per_worker} batches in flight "
            "keeps them busy; a scheduler and worker processes would compete for them"
        )
        return cluster.model_copy(update={"kind": "none"}), f"in-process ({why})"
    if "n_workers" in cluster.model_fields_set:
        workers = cluster.n_workers
    else:
        workers = max(1, cores // AUTO_CORES_PER_WORKER)
        if workers < 2:  # one worker process is this process plus a scheduler's start-up
            why = (
                f"{cores} cores: one worker process would run as this one does, after a "
                "scheduler's start-up"
            )
            return cluster.model_copy(update={"kind": "none"}), f"in-process ({why})"
    why = (
        f"{cores} cores, {n_batches} batches: {workers} worker processes x "
        f"{max(1, cores // workers)} threads"
    )
    return cluster.model_copy(update={"kind": "local", "n_workers": workers}), f"local ({why})"
