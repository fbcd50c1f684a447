"""SLURM: the generated dask-jobqueue job script, and end-to-end runs on a real one-node SLURM.

The job-script tests need only dask-jobqueue. The rest start munged, slurmctld and slurmd on
localhost (tests/slurm_cluster.py) and skip, saying why, where that cannot run (not root, or
Debian's slurm-wlm/munge packages missing; `.ci/run` installs them).
"""

# ruff: noqa: F811 (the smallrun fixtures are imported and then requested by name)
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vit_attn.cli import main as cli_main
from vit_attn.config import ClusterConfig, load_config
from vit_attn.orchestrate import WORKER_ENV
from vit_attn.slurm import job_script, slurm_kwargs, worker_env_prologue

from . import slurm_cluster
from .helpers import assert_stores_equal, write_config

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SBATCH_SCRIPT = REPO / "scripts" / "slurm" / "run.sbatch"

pytest.importorskip(
    "dask_jobqueue", reason="dask-jobqueue is not installed (pip install '.[slurm]')"
)


def _cluster(**slurm) -> ClusterConfig:
    return ClusterConfig(kind="slurm", slurm=slurm)


def directives(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH").strip()
        for line in script.splitlines()
        if line.startswith("#SBATCH")
    ]


def test_job_script_has_queue_account_resources_gpus_and_lifetime(tmp_path):
    cluster = _cluster(
        queue="gpu",
        account="proj42",
        cores=8,
        processes=2,
        memory="32GB",
        walltime="02:30:00",
        gpus=2,
        worker_lifetime="55m",
        worker_lifetime_stagger="4m",
        job_extra_directives=["--constraint=a100"],
        log_directory=str(tmp_path / "logs"),
    )
    script = job_script(cluster, WORKER_ENV)
    d = directives(script)
    assert "-p gpu" in d and "-A proj42" in d
    assert "-n 1" in d and "--cpus-per-task=8" in d  # all cores allocated to the job ...
    assert "-t 02:30:00" in d
    assert "--gres=gpu:2" in d and "--constraint=a100" in d
    assert any(re.fullmatch(r"--mem=\d+G", x) for x in d), d
    assert any(x.startswith("-e ") and str(tmp_path / "logs") in x for x in d), d
    worker = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    # ... but one session per worker process, holding batches_per_worker (2) batches at once
    assert "--nthreads 2" in worker and "--nworkers 2" in worker
    assert "--lifetime 55m --lifetime-stagger 4m" in worker
    assert worker.startswith(sys.executable)
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_job_script_without_gpus_or_lifetime_has_neither():
    script = job_script(_cluster(cores=1, processes=1, memory="1GB"))
    assert "--gres" not in script and "--lifetime" not in script
    assert "--cpus-per-task=1" in directives(script)
    assert not any(x.startswith("-p ") or x.startswith("-A ") for x in directives(script))


def test_worker_env_prologue_reaches_the_nanny_config(tmp_path):
    """The exported variable makes the nanny spawn workers with our env and without MALLOC_TRIM_THRESHOLD_."""
    env = {**WORKER_ENV, "VIT_ATTN_TEST": "a b'c"}
    script = "\n".join([*worker_env_prologue(env), f'exec {sys.executable} -c "$PROBE"'])
    probe = (
        "from distributed.nanny import _get_env_variables as g; "
        "print(repr(g('distributed.nanny.pre-spawn-environ')))"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DASK_") and k != "MALLOC_TRIM_THRESHOLD_"
    }
    out = subprocess.run(
        ["bash", "-c", script],
        env={**clean, "PROBE": probe},
        capture_output=True,
        text=True,
        check=True,
    )
    spawned = eval(out.stdout)  # a dict literal printed by the probe
    assert "MALLOC_TRIM_THRESHOLD_" not in spawned
    for key, value in env.items():
        assert spawned[key] == value


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)], check=True)
    text = SBATCH_SCRIPT.read_text()
    assert re.search(r"^#SBATCH --signal=B:INT@\d+", text, re.M)
    assert 'exec "$vit_attn" run "$config"' in text


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {"SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "1"},
            "--set cluster.n_workers=1 --set data.decode_threads=16",
        ),
        (
            {"SLURM_CPUS_PER_TASK": "16"},
            "--set cluster.n_workers=8 --set data.decode_threads=2 --set inference.threads=2",
        ),
        (
            {"SLURM_CPUS_PER_TASK": "1"},
            "--set cluster.n_workers=1 --set data.decode_threads=1 --set inference.threads=1",
        ),
        (
            {"SLURM_CPUS_PER_TASK": "8", "VIT_ATTN_WORKERS": "2", "VIT_ATTN_THREADS": "4"},
            "--set cluster.n_workers=2 --set data.decode_threads=4 --set inference.threads=4",
        ),
    ],
    ids=["gpu", "cpu-16", "cpu-1", "explicit"],
)
def test_sbatch_script_sizes_the_local_cluster_from_the_allocation(env, expected):
    """The script's arithmetic, with `echo` standing in for vit-attn (no SLURM needed)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VIT_ATTN"))}
    proc = subprocess.run(
        ["bash", str(SBATCH_SCRIPT), "my.yaml", "--set", "a.b=1"],
        env={**clean, **env, "VIT_ATTN": "echo"},
        capture_output=True,
        text=True,
        check=True,
    )
    command = proc.stdout.strip().splitlines()[-1]
    assert command == f"run my.yaml --set cluster.kind=local {expected} --set a.b=1"


def test_example_slurm_config_is_valid():
    cfg = load_config(REPO / "configs" / "slurm.yaml")
    kwargs = slurm_kwargs(cfg.cluster, WORKER_ENV)
    assert kwargs["job_cpu"] == cfg.cluster.slurm.cores
    assert kwargs["cores"] == cfg.cluster.slurm.processes * cfg.cluster.batches_per_worker


# --- a real one-node SLURM ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    with slurm_cluster.local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture()
def slurm_env(slurm, monkeypatch):
    """sbatch (called by dask-jobqueue in this process) talks to the test cluster."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    return slurm


def wait_for_job(slurm, job_id: str, timeout: float) -> tuple[str, str]:
    """Poll `scontrol show job` until the job has ended; its JobState and ExitCode."""
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        proc = slurm.run("scontrol", "show", "job", job_id, "--oneliner", check=False, timeout=10)
        fields = dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)
        if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields["JobState"], fields.get("ExitCode", "")
        time.sleep(0.5)
    raise AssertionError(
        f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s\n{slurm.logs()}"
    )


def slurm_section(logs: Path, **extra) -> dict:
    # One core and one worker per job: two jobs fit the 2-core test node side by side.
    return {
        "queue": "debug",
        "cores": 1,
        "processes": 1,
        "memory": "1GB",
        "walltime": "00:10:00",
        "interface": "lo",
        "log_directory": str(logs),
        "local_directory": str(logs),
        **extra,
    }


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_slurm_run_gives_the_in_process_store(
    tmp_path, slurm_env, small_dataset, small_checkpoint, export_cache, reference_store
):
    logs = tmp_path / "logs"
    config = write_config(
        tmp_path / "run",
        small_dataset,
        small_checkpoint,
        export_cache,
        cluster={"kind": "slurm", "slurm": slurm_section(logs, jobs=2)},
    )
    t0 = time.perf_counter()
    assert cli_main(["run", str(config), "--no-progress"]) == 0, slurm_env.logs()
    print(f"SLURM run: {time.perf_counter() - t0:.1f} s")
    assert_stores_equal(reference_store, tmp_path / "run" / "run.zarr")
    # The workers really were SLURM jobs: jobqueue wrote their logs through #SBATCH -e/-o.
    assert list(logs.glob("dask-worker-*.err")), list(logs.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_slurm_workers_retire_at_lifetime_and_are_replaced(tmp_path, slurm_env):
    """--lifetime retires a worker (as before a walltime kill) and a new SLURM job replaces it."""
    from vit_attn.orchestrate import dask_client

    cluster = ClusterConfig(
        kind="slurm",
        slurm=slurm_section(tmp_path, jobs=1, worker_lifetime="6s", worker_lifetime_stagger="1s"),
    )
    with dask_client(cluster) as client:
        client.wait_for_workers(1, timeout=120)
        first = set(client.scheduler_info()["workers"])
        env = client.run(
            lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}
        )
        assert all(
            e == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"} for e in env.values()
        ), env
        deadline = time.monotonic() + 120
        replaced = set()
        while time.monotonic() < deadline and not replaced:
            replaced = set(client.scheduler_info()["workers"]) - first
            time.sleep(0.5)
        assert replaced, f"no replacement worker within 120 s\n{slurm_env.logs()}"
        assert client.submit(lambda x: x + 1, 1, pure=False).result(timeout=60) == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sbatch_script_runs_a_config_in_one_allocation(
    tmp_path, slurm, small_dataset, small_checkpoint, export_cache, reference_store
):
    config = write_config(tmp_path, small_dataset, small_checkpoint, export_cache)
    log = tmp_path / "job.out"
    env = {**slurm.env, "VIT_ATTN": str(VENV_BIN / "vit-attn"), "VIT_ATTN_WORKERS": "1"}
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=1",
            "--mem=1G",
            "--time=10",
            f"--output={log}",
            str(SBATCH_SCRIPT),
            str(config),
            "--no-progress",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # `sbatch --wait` does the same but polls at growing intervals (tens of seconds here).
    state, exit_code = wait_for_job(slurm, proc.stdout.strip().split(";")[0], timeout=200)
    out = log.read_text() if log.exists() else ""
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"{state} {exit_code}\n{out}\n{slurm.logs()}"
    assert re.search(r"1 cpus, gpus 0, 1 worker\(s\), 1 decode thread", out), out
    assert_stores_equal(reference_store, tmp_path / "run.zarr")
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert stored["cluster"]["kind"] == "none"  # the script overrode it on the command line only
