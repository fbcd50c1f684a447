"""Executing a plan: in-process, or on a Dask cluster (local, an address, or SLURM).

The executors only move `BatchTask`s and `BatchSummary`s; `task.run_batch` does the work,
so every executor produces the same store.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .config import ClusterConfig
from .errors import (
    LIBRARY_LOGGERS,
    ConfigError,
    PipelineError,
    first_line,
    hide_library_tracebacks,
)
from .nosigint import spawning_without_sigint
from .task import BatchSummary, BatchTask, RunPlan, expect_batches, run_batch

log = logging.getLogger(__name__)

# Replaces the nanny's pre-spawn environment. Its default MALLOC_TRIM_THRESHOLD_=65536 also
# switches off glibc's dynamic mmap threshold, so every multi-MB batch array is mmapped and
# faulted in afresh; leaving it out gives the glibc defaults back (docs/RUNNING.md, "Use an existing Dask scheduler").
WORKER_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


@dataclass
class RunSummary:
    """How a run ended: counts, time, and the batches that could not be done."""

    batches_done: int = 0
    batches_overlapped: int = 0
    images_ok: int = 0
    images_failed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failed_batches: dict[int, str] = field(default_factory=dict)

    def add(self, s: BatchSummary) -> None:
        self.batches_done += 1
        self.batches_overlapped += s.overlapped
        self.images_ok += s.ok
        self.images_failed += s.failed
        for k, v in s.seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v

    @property
    def images_per_second(self) -> float:
        return (self.images_ok + self.images_failed) / self.seconds if self.seconds > 0 else 0.0


class Progress:
    """A one-line progress bar on a terminal; a line every few seconds in a log file."""

    def __init__(
        self,
        total_images: int,
        total_batches: int,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.total_images, self.total_batches = total_images, total_batches
        self.stream = stream or sys.stderr
        self.enabled = enabled and total_batches > 0
        self.tty = self.enabled and self.stream.isatty()
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.images = self.batches = 0

    def update(self, summary: BatchSummary) -> None:
        self.images += summary.ok + summary.failed
        self.batches += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        done = self.batches == self.total_batches
        if not self.tty and not done and now - self.last_print < 10:
            return
        self.last_print = now
        elapsed = now - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        left = (self.total_images - self.images) / rate if rate > 0 else 0.0
        line = (
            f"batches {self.batches}/{self.total_batches}  images {self.images}/{self.total_images}  "
            f"{rate:.1f} img/s  ETA {int(left) // 60}:{int(left) % 60:02d}"
        )
        self.stream.write(("\r" + line + ("\n" if done else "")) if self.tty else line + "\n")
        self.stream.flush()


def batch_failure(exc: BaseException) -> str:
    """How a batch that could not be done is reported, whichever executor ran it.

    distributed's KilledWorker text runs past one line's length; and every batch that was on
    a dying worker gets it, so it says what happened, not which batch did it."""
    if type(exc).__name__ == "KilledWorker" and len(exc.args) == 3:
        task, worker, allowed = exc.args
        return (
            f"KilledWorker: the worker running it died {allowed + 1} times "
            f"(last {getattr(worker, 'address', worker)}), with it or a batch beside it; see "
            "that worker's log (out of memory? a crash in a native library?)"
        )
    return f"{type(exc).__name__}: {first_line(exc)}"


def failed_batches_line(failed: Mapping[int, str]) -> str:
    """The failed batches for the run's last line: the first reason, with every batch that
    failed the same way (a dying worker takes the batches beside the one that killed it)."""
    if not failed:
        return ""
    reason = next(iter(failed.values()))
    kind = reason.split(":", 1)[0]
    same = sorted(b for b, r in failed.items() if r.split(":", 1)[0] == kind)
    named = ", ".join(map(str, same[:6])) + (", ..." if len(same) > 6 else "")
    return f" (batch{'es' if len(same) > 1 else ''} {named}: {reason})"


# Executors (a thread pool, a Dask client and its cluster) whose batches may still be
# writing: entered and not yet fully closed. A second Ctrl-C that cuts a close short leaves
# one counted, and the CLI then keeps the store's lock until this process ends.
_open_executors = 0
_open_lock = threading.Lock()


def writers_may_run() -> bool:
    """Whether batches this process started may still be writing to a store."""
    return _open_executors > 0


class _Closing:
    """Enter a context manager; count it open until its exit has run to the end."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def __enter__(self) -> Any:
        global _open_executors
        value = self.manager.__enter__()
        with _open_lock:
            _open_executors += 1
        return value

    def __exit__(self, *exc: Any) -> Any:
        global _open_executors
        suppress = self.manager.__exit__(*exc)  # a second interrupt here leaves it counted
        with _open_lock:
            _open_executors -= 1
        return suppress


def run_in_process(
    plan: RunPlan,
    tasks: list[BatchTask],
    on_done: Callable[[BatchSummary], None],
    concurrency: int = 1,
) -> dict[int, str]:
    """Run batches in this process (debugging, tests, tiny jobs), `concurrency` at a time.

    With 2, one batch decodes and writes while the other infers, as on a Dask worker.
    """
    failed: dict[int, str] = {}

    def finish(task: BatchTask, future: Future) -> None:
        try:
            summary = future.result()
        except Exception as exc:  # as on Dask: the batch stays pending for a rerun
            failed[task.batch_index] = batch_failure(exc)
            return
        if summary.fatal:
            raise FatalBatchError(summary.batch_index, summary.fatal)
        on_done(summary)

    expect_batches(len(tasks))
    threads = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="vit-attn-batch")
    with _Closing(threads) as pool:
        running: dict[Future, BatchTask] = {}
        for task in tasks:
            running[pool.submit(run_batch, plan, task)] = task
            if len(running) >= concurrency:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(running.pop(future), future)
        for future in list(running):
            finish(running.pop(future), future)
    return failed


def run_on_dask(
    client: Any,
    plan: RunPlan,
    tasks: list[BatchTask],
    on_done: Callable[[BatchSummary], None],
    max_in_flight: int,
    retries: int,
    stall_minutes: float = 0.0,
) -> dict[int, str]:
    """Submit batches with at most `max_in_flight` outstanding, so memory stays flat.

    Tasks carry the (small) plan, paths and indices; each worker process keeps its own
    session. The plan travels with every task rather than by a broadcast, which waits on a
    worker that died while receiving it. With `stall_minutes`, a run where no batch finishes
    for that long stops with a StallError instead of waiting for ever.
    """
    from distributed import wait as dask_wait

    failed: dict[int, str] = {}
    pending = iter(tasks)
    timeout = stall_minutes * 60 if stall_minutes > 0 else None

    def submit(task: BatchTask):
        return client.submit(
            run_batch,
            plan,
            task,
            key=f"vit-attn-batch-{task.batch_index}-{id(plan)}",
            pure=False,
            retries=retries,
        )

    futures = {}
    for task in pending:
        futures[submit(task)] = task
        if len(futures) >= max_in_flight:
            break
    last_done = time.monotonic()
    said_no_workers = False
    while futures:
        waited = time.monotonic() - last_done
        poll = WORKER_CHECK_SECONDS
        if timeout is not None:  # a short stall limit is looked at twice before it ends
            poll = min(poll, timeout / 2, timeout - waited)
        try:
            done, _ = dask_wait(
                list(futures), timeout=max(poll, 0.01), return_when="FIRST_COMPLETED"
            )
        except TimeoutError:  # (an OSError: before the clause below)
            workers = len(client.scheduler_info().get("workers", {}))
            if timeout is None or time.monotonic() - last_done < timeout:
                if workers == 0 and not said_no_workers:  # it would wait silently till the stall
                    log.warning(
                        "no worker is connected to the scheduler at %s; the run waits for one (%s)",
                        getattr(client.scheduler, "address", "?"),
                        f"up to cluster.stall_minutes: {stall_minutes:g}"
                        if timeout is not None
                        else "for ever: cluster.stall_minutes is 0",
                    )
                    said_no_workers = True
                continue
            raise StallError(
                f"no batch finished for {stall_minutes:g} minutes ({len(futures)} in flight, "
                f"{workers} workers connected); are the workers alive and able to reach the "
                "store? Finished batches are kept: rerun to resume (cluster.stall_minutes)"
            ) from None
        except (OSError, CancelledError) as exc:  # CommClosedError, FuturesCancelledError
            _raise_scheduler_lost(client, exc)
        last_done = time.monotonic()
        said_no_workers = False
        # finished batches first: a cancelled one ends the loop, and theirs are written
        for future in sorted(done, key=lambda f: f.status == "cancelled"):
            task = futures.pop(future)
            if future.status == "cancelled":  # the scheduler went away: not the batch's fault
                _raise_scheduler_lost(client, None)
            summary = None if future.status != "finished" else future.result()
            if summary is not None and summary.fatal:
                client.cancel(list(futures))
                raise FatalBatchError(summary.batch_index, summary.fatal)
            try:
                on_done(future.result())
            except Exception as exc:  # failed after its retries: left pending for a rerun
                failed[task.batch_index] = batch_failure(exc)
            future.release()
            nxt = next(pending, None)
            if nxt is not None:
                futures[submit(nxt)] = nxt
    return failed


# How often a run that waits on its batches looks whether any worker is connected at all.
WORKER_CHECK_SECONDS = 10.0
# Beyond cluster.connect_timeout, what making a Client of a reachable scheduler may take.
CONNECT_MARGIN_SECONDS = 5.0


class SchedulerLostError(PipelineError):
    """The client lost its scheduler mid-run (it died, or the network between them)."""


def _raise_scheduler_lost(client: Any, exc: BaseException | None) -> NoReturn:
    """A closed comm or a future the scheduler cancelled (this client cancels none before it
    stops): the scheduler is gone or unreachable, which no retry of a batch fixes."""
    where = getattr(getattr(client, "scheduler", None), "address", None) or "the scheduler"
    cause = f"{type(exc).__name__}: {first_line(exc)}" if exc is not None else "a batch cancelled"
    raise SchedulerLostError(
        f"lost the connection to the Dask scheduler at {where} ({cause}); finished batches "
        "are kept: restart the scheduler (or pick another cluster.kind) and rerun to resume"
    ) from None


class FatalBatchError(PipelineError):
    """A batch hit an error that no retry fixes (disk full, read-only, store taken over)."""

    def __init__(self, batch_index: int, reason: str) -> None:
        super().__init__(
            f"{reason} (batch {batch_index}); the run stopped without retrying, finished "
            "batches are kept: fix the cause and rerun the same command to resume"
        )


class StallError(PipelineError, TimeoutError):
    """No batch finished within cluster.stall_minutes."""


@contextlib.contextmanager
def _start_up_signals() -> Iterator[list[int]]:
    """While a LocalCluster starts, Ctrl-C and SIGTERM are held until the start is over
    (raised in the middle of it, they left a half-made cluster whose close at exit printed
    tracebacks); the caller answers them then. Its worker processes start with SIGINT
    ignored (Ctrl-C reaches the whole process group; this process alone answers it and
    closes them): spawned through `nosigint`'s launcher, or, where that cannot run, by
    ignoring SIGINT here meanwhile, which loses a Ctrl-C in those seconds. Yields the held
    signals."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    with spawning_without_sigint() as launched:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        if not launched:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig, handler in previous.items():
            if callable(handler) and (launched or sig == signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: held.append(signum))
        try:
            yield held
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _start_local_cluster(cluster: ClusterConfig) -> Any:
    """A LocalCluster for the run. A worker process killed while it starts (the OOM killer, a
    node's cleanup) fails the start with distributed's "Nanny failed to start worker process";
    nothing has run yet, so one more start is tried, and a second failure is one line. A
    Ctrl-C or SIGTERM that came during the start is answered once it is over."""
    from distributed import LocalCluster

    from .runtime import available_threads

    cores = available_threads()
    if cluster.n_workers > 4 * cores:
        raise ConfigError(
            f"cluster.n_workers: {cluster.n_workers} worker processes on {cores} cores (each "
            f"holds its own onnxruntime session); give at most {4 * cores}, or use "
            "cluster.kind: slurm / address to spread them over machines"
        )
    for attempt in (1, 2):
        started, failure = None, None
        with _start_up_signals() as held:
            try:
                started = LocalCluster(
                    n_workers=cluster.n_workers,
                    threads_per_worker=cluster.batches_per_worker,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                    preload=["vit_attn.worker_signals"],  # restarted workers too
                )
            except RuntimeError as exc:
                failure = exc
        if held:
            if started is not None:
                with contextlib.suppress(Exception):
                    started.close()
            handler = signal.getsignal(held[0])
            if callable(handler):
                handler(held[0], None)  # the run's own handler: it raises
        if started is not None:
            return started
        if attempt == 2:
            raise PipelineError(
                f"the local Dask cluster could not start its workers, twice "
                f"({first_line(failure) if failure else 'no detail'}); check free memory and "
                "cluster.n_workers, or use cluster.kind: none"
            ) from None
        log.warning("a worker died while the local cluster started; starting it again")
    raise AssertionError("unreachable")


def _wait_for_file(path: Path, seconds: float) -> None:
    """A scheduler file may appear a moment after its scheduler starts; Client would wait on
    a missing one for ever."""
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            raise PipelineError(
                f"cluster.scheduler_file {path} does not exist after {seconds:g} s; start the "
                "scheduler with --scheduler-file pointing there, or fix the path"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def dask_client(cluster: ClusterConfig) -> Iterator[Any]:
    """A distributed Client for the configured cluster; closes what it started."""
    import dask
    from distributed import Client

    # distributed sets its own loggers to INFO when imported; in this process (scheduler,
    # nannies, jobqueue) they follow the CLI's level, so a plain run prints only our lines.
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        for name in ("distributed", "dask_jobqueue"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # distributed may print through handlers of its own (not the root's, which the CLI
        # quiets): their tracebacks go too
        hide_library_tracebacks(
            *(h for name in LIBRARY_LOGGERS for h in logging.getLogger(name).handlers)
        )

    env = {**WORKER_ENV, **cluster.worker_env}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        if cluster.kind == "local":
            lc = _start_local_cluster(cluster)
            with lc, Client(lc) as client:
                yield client
        elif cluster.kind == "address":
            kwargs = (
                {"scheduler_file": str(cluster.scheduler_file)}
                if cluster.scheduler_file
                else {"address": cluster.address}
            )
            if cluster.scheduler_file:
                _wait_for_file(Path(cluster.scheduler_file), cluster.connect_timeout)
            where = str(cluster.scheduler_file or cluster.address)
            client = _connect(kwargs, cluster.connect_timeout, where)
            with client:
                yield client
        elif cluster.kind == "slurm":
            from .slurm import slurm_cluster

            with slurm_cluster(cluster, env) as sc, Client(sc) as client:
                yield client
        else:
            raise ConfigError(f"cluster.kind {cluster.kind!r} has no Dask client")


def _connect(kwargs: dict[str, Any], seconds: float, where: str) -> Any:
    """A Client of an existing scheduler, within `seconds` (plus a margin) in all.

    distributed's own timeout covers the TCP connection, not the handshake read: a listener
    that is not a Dask scheduler hung the run (a silent one) or failed with a MemoryError
    traceback (one that speaks another protocol first, e.g. an SSH banner read as a frame
    length). The client is made on a thread that is left behind if it never answers.
    """
    from distributed import Client

    made: dict[str, Any] = {}

    def connect() -> None:
        try:
            made["client"] = Client(timeout=f"{seconds}s", **kwargs)
        except BaseException as exc:  # handed to the caller's thread below
            made["error"] = exc

    thread = threading.Thread(target=connect, name="vit-attn-connect", daemon=True)
    thread.start()
    thread.join(seconds + CONNECT_MARGIN_SECONDS)
    if thread.is_alive():
        raise PipelineError(
            f"{where} accepted a connection but did not answer as a Dask scheduler within "
            f"{seconds:g} s; check cluster.address (the scheduler's port, usually 8786)"
        )
    error = made.get("error")
    if isinstance(error, OSError | TimeoutError | ValueError | TypeError):  # ValueError: no URL
        raise PipelineError(f"cannot reach the Dask scheduler at {where}: {error}") from None
    if isinstance(error, Exception):
        why = (  # another protocol's first bytes, read as a frame length
            "its first bytes are no Dask message"
            if isinstance(error, MemoryError)
            else f"{type(error).__name__}: {first_line(error) or 'no detail'}"
        )
        raise PipelineError(
            f"{where} does not answer as a Dask scheduler ({why}); check cluster.address"
        ) from None
    if error is not None:
        raise error
    return made["client"]


def execute(
    plan: RunPlan, tasks: list[BatchTask], cluster: ClusterConfig, progress: bool = True
) -> RunSummary:
    """Run every task on the configured executor and summarise the outcome."""
    summary = RunSummary()
    bar = Progress(sum(len(t.paths) for t in tasks), len(tasks), enabled=progress)

    def on_done(s: BatchSummary) -> None:
        summary.add(s)
        bar.update(s)

    if not tasks:
        return summary
    if cluster.kind == "auto":  # callers that did not go through plan.prepare
        from .executor import choose_executor

        cluster, _ = choose_executor(cluster, len(tasks))
    # Throughput counts from the first submission: cluster start-up is reported apart by callers.
    if cluster.kind == "none":
        start = time.perf_counter()
        summary.failed_batches = run_in_process(plan, tasks, on_done, cluster.batches_per_worker)
    else:
        with _Closing(dask_client(cluster)) as client:
            workers = len(client.scheduler_info().get("workers", {})) or cluster.n_workers
            if cluster.kind == "slurm":  # workers arrive as their jobs start: size for all of them
                workers = max(workers, cluster.slurm.jobs * cluster.slurm.processes)
            in_flight = cluster.max_in_flight or (cluster.batches_per_worker + 1) * workers
            start = bar.start = time.perf_counter()
            summary.failed_batches = run_on_dask(
                client, plan, tasks, on_done, in_flight, cluster.retries, cluster.stall_minutes
            )
    summary.seconds = time.perf_counter() - start
    return summary
