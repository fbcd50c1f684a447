"""`cluster.kind: address`: a run on an existing Dask scheduler given by its tcp:// address.

(The scheduler-file variant runs in tests/test_pipeline.py.) The scheduler and worker are
real `dask scheduler` / `dask worker` processes; the run is the CLI command docs/RUNNING.md shows.
"""

# ruff: noqa: F811 (the smallrun fixtures are imported and then requested by name)
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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


@pytest.fixture()
def scheduler_address(tmp_path):
    """`dask scheduler` on a fixed 127.0.0.1 port and one `dask worker` started with that address."""
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
                ],
                **quiet,
            )
        )
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=90)
        yield address
    finally:
        for p in reversed(procs):
            stop_process_group(p)


@pytest.mark.timeout(300)
def test_run_on_a_scheduler_address_gives_the_in_process_store(
    tmp_path, scheduler_address, small_dataset, small_checkpoint, export_cache, reference_store
):
    config = write_config(tmp_path, small_dataset, small_checkpoint, export_cache)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(VENV_BIN / "vit-attn"),
            "run",
            str(config),
            "--no-progress",
            "--set",
            "cluster.kind=address",
            "--set",
            f"cluster.address={scheduler_address}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cluster address" in proc.stderr and "24 ok, 1 failed" in proc.stderr, proc.stderr
    assert_stores_equal(reference_store, tmp_path / "run.zarr")
    print(f"address run: {time.perf_counter() - t0:.1f} s")
