"""`cluster.kind: address`: a run on an existing Dask scheduler given by its tcp:// address.

(The scheduler-file variant runs in tests/test_pipeline.py.) The scheduler and worker are
real `dask scheduler` / `dask worker` processes; the run is the CLI command docs/RUNNING.md shows.
"""

# ruff: noqa: F811 (the smallrun fixtures are imported and then requested by name)
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import assert_stores_equal, stop_process_group, write_config

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_processes(tmp_path: Path, *worker_args: str) -> Iterator[tuple[str, list]]:
    """`dask scheduler` on a fixed 127.0.0.1 port and one `dask worker` started with that
    address; yields the address and the processes (scheduler first)."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    host_port = address.removeprefix("tcp://")
    env = {**os.environ, "PYTHONPATH": str(REPO / "pipeline")}
    dask = str(VENV_BIN / "dask")
    quiet = {
        "env": env,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "start_new_session": True,
        "cwd": tmp_path,
    }
    procs = [
        subprocess.Popen(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                host_port.split(":")[1],
                "--no-dashboard",
            ],
            **quiet,
        )
    ]
    try:
        procs.append(
            subprocess.Popen(
                [
                    dask,
                    "worker",
                    address,
                    "--nthreads",
                    "2",
                    "--nworkers",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    *worker_args,
                ],
                **quiet,
            )
        )
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=90)
        yield address, procs
    finally:
        for p in reversed(procs):
            stop_process_group(p)


def address_run(config: Path, address: str, *extra: str) -> list[str]:
    """`vit-attn run CONFIG` on the scheduler at `address`."""
    return [
        str(VENV_BIN / "vit-attn"),
        "run",
        str(config),
        "--no-progress",
        "--set",
        "cluster.kind=address",
        "--set",
        f"cluster.address={address}",
        *extra,
    ]


@pytest.fixture()
def scheduler_address(tmp_path):
    with dask_processes(tmp_path) as (address, _):
        yield address


@pytest.mark.timeout(300)
def test_run_on_a_scheduler_address_gives_the_in_process_store(
    tmp_path, scheduler_address, small_dataset, small_checkpoint, export_cache, reference_store
):
    config = write_config(tmp_path, small_dataset, small_checkpoint, export_cache)
    t0 = time.perf_counter()
    proc = subprocess.run(
        address_run(config, scheduler_address),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cluster address" in proc.stderr and "24 ok, 1 failed" in proc.stderr, proc.stderr
    assert_stores_equal(reference_store, tmp_path / "run.zarr")
    print(f"address run: {time.perf_counter() - t0:.1f} s")


# Each batch sleeps a second on the worker, so the scheduler dies while batches are left.
SLOW_BATCHES = """
import time
import vit_attn.task as task

_run_batch = task.run_batch


def run_batch(plan, batch):
    time.sleep(1.0)
    return _run_batch(plan, batch)


task.run_batch = run_batch
"""


@pytest.mark.timeout(300)
def test_a_scheduler_that_dies_mid_run_is_one_line_and_the_store_resumes(
    tmp_path, small_dataset, small_checkpoint, export_cache
):
    # It printed "vit-attn: " then two tracebacks (CommClosedError, FuturesCancelledError)
    # and exited 1.
    preload = tmp_path / "slow_batches.py"
    preload.write_text(SLOW_BATCHES)
    config = write_config(tmp_path, small_dataset, small_checkpoint, export_cache)
    with dask_processes(tmp_path, "--preload", str(preload)) as (address, procs):
        run = subprocess.Popen(
            address_run(config, address, "--set", "inference.batch_size=2"),
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert run.stderr is not None
        for line in run.stderr:
            if "writing" in line:
                break
        time.sleep(2.5)  # a batch or two done
        os.killpg(procs[0].pid, signal.SIGKILL)
        err = run.stderr.read()
        assert run.wait(timeout=120) == 2, err
    assert "Traceback" not in err, err
    assert "lost the connection to the Dask scheduler at tcp://127.0.0.1" in err, err
    assert "rerun to resume" in err

    # The same command in-process finishes the store; it equals an uninterrupted run.
    def vit_attn(*args: str, cwd: Path = tmp_path) -> None:
        done = subprocess.run(
            [str(VENV_BIN / "vit-attn"), "run", *args, "--no-progress"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr
        assert "resuming" in done.stderr or cwd != tmp_path, done.stderr

    vit_attn(str(config), "--set", "inference.batch_size=2")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    vit_attn(
        str(write_config(fresh, small_dataset, small_checkpoint, export_cache)),
        "--set",
        "inference.batch_size=2",
        cwd=fresh,
    )
    assert_stores_equal(fresh / "run.zarr", tmp_path / "run.zarr")
