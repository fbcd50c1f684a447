"""`cluster.kind: auto`: in-process where a scheduler would cost more than it gives."""

from __future__ import annotations

import pytest
import yaml

from vit_attn.cli import main as cli_main
from vit_attn.config import ClusterConfig, parse_config
from vit_attn.executor import AUTO_MIN_BATCHES, choose_executor

from . import imagefactory


def test_few_batches_run_in_process_whatever_the_cores():
    cluster, why = choose_executor(ClusterConfig(), AUTO_MIN_BATCHES - 1, cores=64)
    assert cluster.kind == "none" and "in-process" in why and "batches" in why


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_few_cores_run_in_process(cores):
    cluster, why = choose_executor(ClusterConfig(), 1000, cores=cores)
    assert cluster.kind == "none" and f"{cores} cores" in why
    assert cluster.batches_per_worker == 2  # the in-process pool still overlaps two batches


def test_many_cores_and_batches_start_a_local_cluster():
    cluster, why = choose_executor(ClusterConfig(), 1000, cores=32)
    assert (cluster.kind, cluster.n_workers) == ("local", 4)
    assert "local" in why and "4 worker processes x 8 threads" in why
    given = ClusterConfig(n_workers=3)  # an explicit n_workers is kept
    assert choose_executor(given, 1000, cores=32)[0].n_workers == 3


@pytest.mark.parametrize("cores", [5, 8, 15])
def test_cores_for_one_worker_process_stay_in_process(cores):
    # One worker (cores // 8) is this process's work after a scheduler's 3-5 s start-up.
    cluster, why = choose_executor(ClusterConfig(), 1000, cores=cores)
    assert cluster.kind == "none" and "one worker process" in why, why


def test_more_workers_than_cores_says_one_thread_each():
    cluster, why = choose_executor(ClusterConfig(n_workers=32), 1000, cores=16)
    assert cluster.n_workers == 32 and "32 worker processes x 1 threads" in why, why


@pytest.mark.parametrize("kind", ["local", "none"])
def test_explicit_kinds_are_kept(kind):
    cluster = ClusterConfig(kind=kind, n_workers=2)
    assert choose_executor(cluster, 1, cores=64) == (cluster, "")


def test_auto_is_the_default_and_unknown_kinds_are_refused(tmp_path):
    base = {"model": {"name": "m"}, "data": {"source": "x"}, "output": {"store": "s"}}
    assert parse_config(base).cluster.kind == "auto"
    with pytest.raises(Exception, match=r"cluster\.kind"):
        parse_config({**base, "cluster": {"kind": "automatic"}})


def tiny_run(folder, export_cache, images: int, **sections) -> object:
    """A config for a 2-block ViT-Ti at 64 px over `images` small images, in batches of 2."""
    imagefactory.write_rgb_set(folder / "images", [(40 + i, 50) for i in range(images)])
    config = folder / "c.yaml"
    cfg = {
        "model": {"name": "vit_tiny_patch16_224", "img_size": 64, "kwargs": {"depth": 2}},
        "data": {"source": "images"},
        "inference": {"batch_size": 2, "cache_dir": str(export_cache)},
        "output": {"store": "run.zarr", "overlays": "none"},
        **sections,
    }
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_start_line_names_the_choice_and_the_reason(tmp_path, export_cache, capsys):
    config = tiny_run(tmp_path, export_cache, 5)
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "cluster auto: in-process (3 batches: a cluster's start-up" in err, err
    assert "5 ok, 0 failed" in err


def test_worker_and_job_counts_beyond_any_machine_are_one_line(tmp_path, export_cache, capsys):
    # cluster.n_workers: 100000 hung the run building worker processes, past Ctrl-C and
    # SIGTERM (held while a LocalCluster starts); the other counts had no bound either.
    from vit_attn.runtime import available_threads

    base = {"model": {"name": "m"}, "data": {"source": "x"}, "output": {"store": "s"}}
    for section, key, value in [
        ("cluster", "n_workers", 100_000),
        ("cluster", "batches_per_worker", 10_000),
        ("cluster", "retries", 1_000),
        ("cluster", "max_in_flight", 10**9),
    ]:
        with pytest.raises(Exception, match=rf"cluster\.{key}: Input should be less than"):
            parse_config({**base, section: {key: value}})
    with pytest.raises(Exception, match=r"cluster\.slurm\.jobs: Input should be less than"):
        parse_config({**base, "cluster": {"slurm": {"jobs": 10**9}}})
    cores = available_threads()
    cluster = {"kind": "local", "n_workers": 4 * cores + 1}
    config = tiny_run(tmp_path, export_cache, 3, cluster=cluster)
    assert cli_main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"vit-attn: error: cluster.n_workers: {4 * cores + 1} worker processes on {cores} cores "
        f"(each holds its own onnxruntime session); give at most {4 * cores}, or use "
        "cluster.kind: slurm / address to spread them over machines"
    ), err


def test_library_tracebacks_are_cut_to_their_message_without_verbose():
    import io
    import logging

    from vit_attn.errors import hide_library_tracebacks

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    hide_library_tracebacks(handler)
    hide_library_tracebacks(handler)  # once only
    assert len(handler.filters) == 1
    logger = logging.getLogger("distributed.client.test")
    mine = logging.getLogger("vit_attn.test")
    for log in (logger, mine):
        log.addHandler(handler)
        log.propagate = False
    try:
        try:
            raise ConnectionRefusedError("scheduler gone")
        except ConnectionRefusedError:
            logger.exception("reconnecting failed")
            logger.exception("")  # nothing but a traceback: dropped
            mine.exception("ours keeps its traceback")
    finally:
        for log in (logger, mine):
            log.removeHandler(handler)
            log.propagate = True
    text = out.getvalue()
    assert "reconnecting failed" in text and "ours keeps its traceback" in text
    assert text.count("Traceback") == 1  # ours only


def test_a_lost_worker_is_said_in_our_words_without_verbose():
    # A LocalCluster worker killed mid-run printed distributed's task keys, stimulus id and
    # nanny status. The texts are distributed's (scheduler.py, nanny.py), as it logs them.
    import io
    import logging

    from vit_attn.errors import hide_library_tracebacks

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("vit-attn: %(message)s"))
    hide_library_tracebacks(handler)
    scheduler = logging.getLogger("distributed.scheduler")
    nanny = logging.getLogger("distributed.nanny")
    for log in (scheduler, nanny):
        log.addHandler(handler)
    try:
        keys = {"vit-attn-batch-368-139812358010512", "vit-attn-batch-12-139812358010512"}
        scheduler.warning(
            f"Removing worker {'tcp://127.0.0.1:41281'!r} caused the cluster to lose "
            "already computed task(s), which will be recomputed elsewhere: "
            f"{keys} (stimulus_id='handle-worker-cleanup-1796172432.61494')"
        )
        nanny.warning("Restarting worker (status=%s)", "Status.running")
        scheduler.error(
            "Couldn't gather keys: %s", {"vit-attn-batch-280-139890751240528": "memory"}
        )
        logging.getLogger("distributed.client").addHandler(handler)
        logging.getLogger("distributed.client").warning(
            "Couldn't gather %s keys, rescheduling %s", 1, ("vit-attn-batch-280-13989075",)
        )
        logging.getLogger("distributed.client").removeHandler(handler)
        scheduler.warning("Removing worker 'tcp://x:1' caused the cluster to lose scattered")
    finally:
        for log in (scheduler, nanny):
            log.removeHandler(handler)
    assert out.getvalue().splitlines() == [
        "vit-attn: a worker process (tcp://127.0.0.1:41281) died; 2 batches it had finished "
        "but not yet handed over will be done again by the others (the store is not affected)",
        "vit-attn: starting a worker in place of the one that died",
        "vit-attn: Removing worker 'tcp://x:1' caused the cluster to lose scattered",
    ]


def test_slurm_that_cannot_be_reached_is_one_line_before_any_job(tmp_path, monkeypatch):
    # Without SLURM (or its configuration) the run printed dask-jobqueue's submission
    # tracebacks, then waited up to cluster.stall_minutes for workers that never came.
    import pytest

    from vit_attn.errors import ConfigError
    from vit_attn.slurm import check_slurm_reachable

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ConfigError, match="sbatch is not on PATH"):
        check_slurm_reachable()
    for tool, text in [
        ("sbatch", "exit 0"),
        ("squeue", 'echo "squeue: fatal: Could not establish a configuration source" >&2; exit 1'),
    ]:
        (bin_dir / tool).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / tool).chmod(0o755)
    with pytest.raises(
        ConfigError, match=r"SLURM cannot be reached here \(squeue: fatal: Could not"
    ):
        check_slurm_reachable()
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")  # a controller that answers
    check_slurm_reachable()


def test_a_worker_that_kept_dying_is_said_in_one_whole_line_naming_every_suspect():
    # distributed gives KilledWorker to every batch that was on the dying worker, the one
    # that killed it and the one beside it; its text was cut at "For more information see"
    # and the last line named whichever batch came first, as if it were the culprit.
    from types import SimpleNamespace

    from distributed.scheduler import KilledWorker

    from vit_attn.orchestrate import batch_failure, failed_batches_line

    worker = SimpleNamespace(address="tcp://127.0.0.1:40000")
    failed = {
        4: batch_failure(KilledWorker("vit-attn-batch-4-1", worker, 3)),
        3: batch_failure(KilledWorker("vit-attn-batch-3-1", worker, 3)),
        9: batch_failure(ValueError("x\ny")),
    }
    assert failed[4] == failed[3]
    assert "died 4 times" in failed[4] and "tcp://127.0.0.1:40000" in failed[4]
    assert failed[4].endswith("?)") and "\n" not in failed[4]
    assert failed[9] == "ValueError: x"
    assert failed_batches_line(failed) == f" (batches 3, 4: {failed[4]})"
    assert failed_batches_line({9: failed[9]}) == " (batch 9: ValueError: x)"
    assert failed_batches_line({}) == ""
