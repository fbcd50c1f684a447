"""One writer per store on object storage: the lease object, against a real S3 server (moto)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from vit_attn.lock import ObjectLease, StoreLockedError, lock_for

from .s3server import make_bucket, s3_endpoint, s3fs_client  # noqa: F401 (fixtures)


@pytest.fixture()
def store_url(s3_endpoint) -> str:  # noqa: F811
    return f"s3://{make_bucket('lease')}/runs/val.zarr"


def test_a_second_run_is_refused_naming_the_first_and_release_frees_the_store(store_url):
    first = lock_for(store_url, "run-one", stale_after=60)
    assert isinstance(first, ObjectLease)
    first.acquire()
    try:
        second = lock_for(store_url, "run-two", stale_after=60)
        with pytest.raises(StoreLockedError, match="in use by run run-one"):
            second.acquire()
        record = json.loads(s3fs_client().cat(store_url.removeprefix("s3://") + ".lock"))
        assert record["run_id"] == "run-one" and record["heartbeat"] > 0
    finally:
        first.release()
    assert not s3fs_client().exists(store_url.removeprefix("s3://") + ".lock")
    again = lock_for(store_url, "run-two", stale_after=60)
    again.acquire()
    again.release()


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it_lost(store_url):
    fs = s3fs_client()
    key = store_url.removeprefix("s3://") + ".lock"
    old = lock_for(store_url, "stalled", stale_after=0.6)
    old.acquire()
    old._stop.set()  # the holder stalls: no more heartbeats
    old._thread.join()
    old._thread = None
    time.sleep(1.0)  # older than both runs' stale_after
    new = lock_for(store_url, "fresh", stale_after=0.6)
    new.acquire()
    try:
        assert json.loads(fs.cat(key))["run_id"] == "fresh"
        # The stalled run wakes: its next heartbeat finds a foreign record and gives up.
        old._stop.clear()
        beat = threading.Thread(target=old._beat)
        beat.start()
        beat.join(timeout=5)
        assert old.lost
        assert json.loads(fs.cat(key))["run_id"] == "fresh"  # never overwritten by the loser
    finally:
        new.release()


def _dead_pid() -> int:
    """A pid that no process has: a child that has exited and been reaped."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("same_host", [True, False], ids=["this-host", "other-host"])
def test_a_killed_runs_fresh_lease_is_taken_over_only_when_its_death_is_known(store_url, same_host):
    # SIGKILL leaves a lease whose heartbeat is seconds old. On this host the missing pid
    # proves the run dead, so a rerun takes over at once; from another host nothing proves
    # it, so the rerun is refused until the heartbeat is stale.
    import socket

    fs = s3fs_client()
    key = store_url.removeprefix("s3://") + ".lock"
    record = {
        "run_id": "killed",
        "user": "someone",
        "host": socket.gethostname() if same_host else "another-node",
        "pid": _dead_pid(),
        "started": "2026-12-01T00:00:00+0000",
        "stale_after": 120.0,
        "heartbeat": time.time(),
    }
    fs.pipe(key, json.dumps(record).encode())
    rerun = lock_for(store_url, "rerun", stale_after=60)
    if not same_host:
        with pytest.raises(
            StoreLockedError, match="in use by run killed of someone on another-node"
        ):
            rerun.acquire()
        assert json.loads(fs.cat(key))["run_id"] == "killed"
        return
    rerun.acquire()
    try:
        assert json.loads(fs.cat(key))["run_id"] == "rerun"
    finally:
        rerun.release()
