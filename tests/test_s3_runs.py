"""Whole runs from object storage, shards and Parquet, into stores on object storage.

The reference is the plain run: local folder in, local store out. Every other run reads the
same images in another form (S3 folder, WebDataset shards, Parquet; local or on S3, in
process or on Dask workers) and must give the same arrays, bit for bit. The S3 server is
moto's, started on 127.0.0.1 by tests/s3server.py; the code under test finds it through the
AWS environment only.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from s3fs import S3FileSystem

import vit_attn
from vit_attn.cli import main as cli_main
from vit_attn.config import load_config
from vit_attn.decode import Preprocess, load_image
from vit_attn.identity import IDENTITY_ARRAYS
from vit_attn.plan import prepare
from vit_attn.render import model_input_image
from vit_attn.store import is_store

from . import imagefactory
from .helpers import MODEL, save_config, save_sharpened_checkpoint
from .packing import folder_files, write_parquet, write_shards
from .s3server import (  # noqa: F401 (fixtures)
    env_without_credentials,
    free_port,
    make_bucket,
    s3_endpoint,
    s3fs_client,
)

pytestmark = pytest.mark.slow

BATCH = 4  # 25 images: 7 batches, so shard and row-group boundaries fall inside batches
VIT_ATTN = Path(sys.executable).parent / "vit-attn"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """24 synthetic images in two folders and one truncated JPEG."""
    root = tmp_path_factory.mktemp("s3-data") / "images"
    imagefactory.write_rgb_set(root / "a", [(48 + 5 * i, 40 + 9 * (i % 5)) for i in range(14)])
    imagefactory.write_rgb_set(root / "b", [(60 + 3 * i, 52) for i in range(10)], ext="jpg")
    imagefactory.write_truncated_jpeg(root / "b")
    return root


@pytest.fixture(scope="module")
def labels(dataset) -> dict[str, int]:
    return {n: (7 * i) % 5 for i, n in enumerate(folder_files(dataset))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_sharpened_checkpoint(tmp_path_factory.mktemp("s3-weights"))


def config(
    folder: Path, source: str, store: str, checkpoint: Path, cache: Path, **sections
) -> Path:
    cfg = {
        "model": {**MODEL, "checkpoint": str(checkpoint)},
        "data": {"source": source},
        "attention": {"layers": [0, -1], "rollout": True},
        "inference": {"batch_size": BATCH, "threads": 1, "cache_dir": str(cache)},
        "output": {"store": store, "overlays": "mean"},
        "cluster": {"kind": "none"},
    }
    return save_config(folder, cfg, **sections)


def run(path: Path, *args: str) -> int:
    return cli_main(["run", str(path), "--no-progress", *args])


def arrays(store: str | Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")  # a URL is opened through the environment
    # Local files carry per-file identity (size, mtime); sources behind URLs, shards and
    # Parquet are identified through the fingerprint instead: compare the results only.
    return {name: a[:] for name, a in group.arrays() if name not in IDENTITY_ARRAYS}


def assert_show_finds_the_image(store: str | Path, dataset: Path, index: int) -> None:
    """`vit-attn show` draws on the picture the model saw, read again from the source."""
    group = zarr.open_group(str(store), mode="r")
    prep = Preprocess.from_dict(group.attrs["preprocess"])
    expected = load_image(dataset / folder_files(dataset)[index], prep)
    np.testing.assert_array_equal(model_input_image(group, index), expected)


def assert_same_results(reference: dict[str, np.ndarray], store: str | Path, paths=None) -> None:
    """Every array equal to the reference's; image_path as given (default: the same)."""
    got = arrays(store)
    assert sorted(set(got) - {"label"}) == sorted(reference)
    for name, values in reference.items():
        if name != "image_path":
            np.testing.assert_array_equal(got[name], values, err_msg=name)
    expected = reference["image_path"] if paths is None else np.asarray(paths, dtype=object)
    assert got["image_path"].tolist() == list(expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, checkpoint, export_cache) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("s3-reference")
    assert run(config(folder, str(dataset), "run.zarr", checkpoint, export_cache)) == 0
    got = arrays(folder / "run.zarr")
    status = dict(zip(got["image_path"].tolist(), got["status"].tolist()))
    assert status.pop("b/truncated.jpg") == 2 and set(status.values()) == {1}
    return got


@pytest.fixture(scope="module")
def bucket(s3_endpoint, dataset) -> str:  # noqa: F811
    name = make_bucket("runs")
    s3fs_client().put(str(dataset), f"{name}/images", recursive=True)
    return name


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory, bucket, checkpoint, export_cache) -> str:
    """S3 folder in, S3 store out; no storage options: the AWS environment is enough."""
    url = f"s3://{bucket}/stores/folder.zarr"
    folder = tmp_path_factory.mktemp("s3-run")
    path = config(folder, f"s3://{bucket}/images", url, checkpoint, export_cache)
    assert run(path) == 0
    return url


def test_s3_folder_into_s3_store_equals_the_local_run(reference, s3_store):
    assert_same_results(reference, s3_store)
    attrs = dict(zarr.open_group(s3_store, mode="r").attrs)
    assert attrs["image_root"] == "s3://runs/images" and "consolidated_metadata" not in attrs


def test_readers_work_on_the_s3_store(s3_store, reference, dataset, tmp_path, capsys):
    ds = vit_attn.open_store(s3_store)
    np.testing.assert_array_equal(ds["cls_attention"].values, reference["cls_attention"])
    assert cli_main(["inspect", s3_store]) == 0
    out = capsys.readouterr().out
    assert "24 ok, 1 failed, 0 pending" in out and "b/truncated.jpg" in out
    assert re.search(r"total\s+\d+\.\d [KM]B", out)
    png = tmp_path / "show.png"
    assert cli_main(["show", s3_store, "--image", "a/img_48x40.png", "-o", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert_show_finds_the_image(s3_store, dataset, 2)
    assert cli_main(["stats", s3_store]) == 2  # no statistics in this store: one line, exit 2
    assert "holds no statistics" in capsys.readouterr().err


def test_readers_take_storage_options_instead_of_the_environment(
    s3_store,
    s3_endpoint,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,  # noqa: F811
):
    # The environment points nowhere and holds no keys: only --storage-option reaches the store.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    # s3fs keeps one file system per set of options, made under the old environment
    S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(S3FileSystem, "cachable", False)  # none made here outlives the test
    options = [
        f"--storage-option=endpoint_url={s3_endpoint}",
        "--storage-option=key=testing",
        "--storage-option=secret=testing",
    ]
    capsys.readouterr()
    assert cli_main(["inspect", s3_store]) == 2
    assert "no credentials found" in capsys.readouterr().err
    assert cli_main(["inspect", s3_store, *options]) == 0
    assert "24 ok, 1 failed, 0 pending" in capsys.readouterr().out
    png = tmp_path / "show.png"
    args = ["--image", "a/img_48x40.png", "--normalize", "dataset", "-o", str(png)]
    assert cli_main(["show", s3_store, *args, *options]) == 0
    assert png.stat().st_size > 1000
    assert cli_main(["stats", s3_store, *options]) == 2
    assert "holds no statistics" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path), "--storage-option", "anon=true"]) == 2
    assert "is a local path; the options apply to URLs only" in capsys.readouterr().err
    assert cli_main(["inspect", s3_store, "--storage-option", "anon"]) == 2
    assert "expected KEY=VALUE, e.g. --storage-option endpoint_url=" in capsys.readouterr().err


def test_a_damaged_s3_store_is_said_to_be_damaged(s3_store, tmp_path, capsys):
    # On object storage too: a chunk object of an ok image gone is not read as zeros, and a
    # store without its status array is damaged, not a traceback.
    fs = s3fs_client()
    copy = s3_store.replace("folder.zarr", "damaged.zarr")
    fs.cp(s3_store.removeprefix("s3://"), copy.removeprefix("s3://"), recursive=True)
    status = np.asarray(zarr.open_group(copy, mode="r")["status"][:])
    chunks = sorted(fs.find(copy.removeprefix("s3://") + "/cls_attention/c"))
    fs.rm(chunks[0])  # the first batch's
    victim = int(np.flatnonzero(status == 1)[0])
    capsys.readouterr()
    assert cli_main(["show", copy, "--image", str(victim), "-o", str(tmp_path / "x.png")]) == 2
    assert "store file is missing although the image's status is 1" in capsys.readouterr().err
    fs.rm(copy.removeprefix("s3://") + "/status", recursive=True)
    assert cli_main(["inspect", copy]) == 2
    err = capsys.readouterr().err
    assert "is damaged: its array status is missing" in err and "Traceback" not in err


def test_shards_with_labels_equal_the_folder_run(
    reference, dataset, labels, tmp_path, checkpoint, export_cache
):
    names = folder_files(dataset)
    write_shards(dataset, names, tmp_path / "shards", per_shard=9, labels=labels, extras=True)
    source = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    path = config(tmp_path, source, "run.zarr", checkpoint, export_cache, data={"label_key": "cls"})
    assert run(path) == 0
    shard_paths = [f"train-{i // 9:06d}.tar/{n}" for i, n in enumerate(names)]
    assert_same_results(reference, tmp_path / "run.zarr", shard_paths)
    label = arrays(tmp_path / "run.zarr")["label"]
    ok = reference["status"] == 1
    np.testing.assert_array_equal(label[ok], np.array([labels[n] for n in names])[ok])
    assert not label[~ok].any()  # failed images hold 0, like every data array
    assert_show_finds_the_image(tmp_path / "run.zarr", dataset, 11)


def test_parquet_on_s3_into_s3_store_equals_the_folder_run(
    reference, dataset, bucket, tmp_path, checkpoint, export_cache
):
    names = folder_files(dataset)
    part = write_parquet(dataset, names, tmp_path / "train.parquet", row_group_size=6)
    s3fs_client().put(str(part), f"{bucket}/parquet/train-00000-of-00001.parquet")
    url = f"s3://{bucket}/stores/parquet.zarr"
    data = {"id_column": "id", "image_column": "image"}
    path = config(
        tmp_path, f"s3://{bucket}/parquet/*.parquet", url, checkpoint, export_cache, data=data
    )
    assert run(path) == 0
    assert_same_results(reference, url)
    assert_show_finds_the_image(url, dataset, 20)


def test_dask_workers_read_shards_from_s3_themselves(
    reference, dataset, bucket, tmp_path, checkpoint, export_cache
):
    names = folder_files(dataset)
    for shard in write_shards(dataset, names, tmp_path / "shards", per_shard=10):
        s3fs_client().put(str(shard), f"{bucket}/shards/{shard.name}")
    url = f"s3://{bucket}/stores/dask.zarr"
    source = f"s3://{bucket}/shards/train-{{000000..000002}}.tar"
    cluster = {"kind": "local", "n_workers": 2, "batches_per_worker": 1}
    path = config(tmp_path, source, url, checkpoint, export_cache, cluster=cluster)
    # What travels to the workers: byte ranges and paths, never image bytes.
    prepared = prepare(load_config(path))
    image_bytes = sum(len((dataset / n).read_bytes()) for n in names[:BATCH])
    assert all(len(pickle.dumps(t)) < min(2048, image_bytes // 4) for t in prepared.tasks)
    assert len(pickle.dumps(prepared.plan)) < 16384
    assert run(path, "--overwrite") == 0
    assert_same_results(
        reference, url, [f"train-{i // 10:06d}.tar/{n}" for i, n in enumerate(names)]
    )


def test_sigkill_then_resume_on_an_s3_store(reference, bucket, tmp_path, checkpoint, export_cache):
    url = f"s3://{bucket}/stores/killed.zarr"
    # PNG output slows each batch down enough to kill the run in the middle.
    path = config(
        tmp_path,
        f"s3://{bucket}/images",
        url,
        checkpoint,
        export_cache,
        output={"png_dir": "png", "png_heads": True},
    )
    proc = subprocess.Popen(
        [str(VIT_ATTN), "run", str(path), "--no-progress"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    fs = s3fs_client()
    done, n_batches = 0, -(-len(reference["status"]) // BATCH)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.exists(f"{bucket}/stores/killed.zarr/zarr.json"):
            try:
                status = zarr.open_group(url, mode="r")["status"][:]
            except (KeyError, FileNotFoundError):
                status = np.zeros(0)  # the template is still being written
            done = sum(bool(status[i : i + BATCH].any()) for i in range(0, status.size, BATCH))
            if done >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= done < n_batches
    resumed = subprocess.run(
        [str(VIT_ATTN), "run", str(path), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    match = re.search(r"resuming .*: (\d+) of (\d+) images in (\d+) batches", resumed.stderr)
    assert match and int(match.group(3)) <= n_batches - 2, resumed.stderr
    assert_same_results(reference, url)


def test_s3_store_refusals_and_overwrite(s3_store, bucket, tmp_path, checkpoint, export_cache):
    other = config(
        tmp_path,
        f"s3://{bucket}/images",
        s3_store,
        checkpoint,
        export_cache,
        attention={"layers": [1]},
    )
    before = arrays(s3_store)["status"]
    proc = subprocess.run(
        [str(VIT_ATTN), "run", str(other)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert re.fullmatch(
        r"vit-attn: error: s3://runs/stores/folder\.zarr holds a different run \(attention\.layers.*\n",
        proc.stderr,
    ), proc.stderr
    np.testing.assert_array_equal(arrays(s3_store)["status"], before)
    # Not ours: refused even with --overwrite, and left as it was.
    fs = s3fs_client()
    fs.pipe(f"{bucket}/precious/thesis.tex", b"keep me")
    mine = config(
        tmp_path / "b", f"s3://{bucket}/images", f"s3://{bucket}/precious", checkpoint, export_cache
    )
    assert run(mine, "--overwrite") == 2
    assert fs.cat(f"{bucket}/precious/thesis.tex") == b"keep me"
    # A creation cut short (root marked pending) is no store, and is replaced by the next run.
    pending = f"s3://{bucket}/stores/pending.zarr"
    zarr.create_group(pending, attributes={"format_pending": "vit-attention-store"})
    fs.pipe(f"{bucket}/stores/pending.zarr/stale/zarr.json", b"{}")
    assert not is_store(pending)
    small = config(
        tmp_path / "c",
        f"s3://{bucket}/images/b",
        pending,
        checkpoint,
        export_cache,
        attention={"layers": [1]},
        output={"overlays": "none"},
    )
    assert run(small) == 0
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/stores/pending.zarr/stale")
    assert is_store(pending)


def test_a_source_that_changed_is_refused_on_resume(
    dataset, bucket, tmp_path, checkpoint, export_cache
):
    fs = s3fs_client()
    fs.put(str(dataset / "a"), f"{bucket}/changing", recursive=True)
    url = f"s3://{bucket}/stores/changing.zarr"
    path = config(
        tmp_path,
        f"s3://{bucket}/changing",
        url,
        checkpoint,
        export_cache,
        attention={"layers": [1]},
        output={"overlays": "none"},
    )
    assert run(path) == 0
    fs.pipe(f"{bucket}/changing/new.png", (dataset / "a" / "img_48x40.png").read_bytes())
    proc = subprocess.run(
        [str(VIT_ATTN), "run", str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert re.fullmatch(
        r"vit-attn: error: s3://runs/stores/changing\.zarr holds a different run \(the source "
        r"changed: 1 image added \(new\.png\), 0 removed\).*\n",
        proc.stderr,
    ), proc.stderr


@pytest.mark.parametrize("listing", ["folder", "list-file"])
def test_an_s3_image_rewritten_between_runs_is_not_mixed_into_a_resume(
    dataset, bucket, tmp_path, checkpoint, export_cache, capsys, listing
):
    # The same key with other pixels: a resume kept the old maps beside new images with no
    # word, `show` drew the old maps over the new picture, and --redo-changed had nothing
    # to redo, since images listed one by one on object storage had no recorded identity.
    fs = s3fs_client()
    prefix = f"{bucket}/rewritten-{listing}"
    fs.put(str(dataset / "a"), prefix, recursive=True)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(prefix))
    source = f"s3://{prefix}"
    if listing == "list-file":
        fs.pipe(f"{prefix}/list.txt", "\n".join(names).encode())
        source += "/list.txt"
    layers = {"attention": {"layers": [1]}, "output": {"overlays": "none"}}
    url = f"s3://{bucket}/stores/rewritten-{listing}.zarr"
    path = config(tmp_path, source, url, checkpoint, export_cache, **layers)
    assert run(path) == 0
    before = arrays(url)
    zarr.open_group(url, mode="r+")["status"][8:] = 0  # stopped half way
    victim = names[2]
    other = dataset / "a" / names[3]
    fs.pipe(f"{prefix}/{victim}", other.read_bytes())
    capsys.readouterr()
    assert run(path) == 2
    line = capsys.readouterr().err.strip()
    assert "1 input images changed since the store recorded them" in line, line
    assert victim in line and "--redo-changed" in line and "shard" not in line, line
    assert (arrays(url)["status"][:8] == 1).all()
    out = tmp_path / "shown.png"
    assert cli_main(["show", url, "--image", "2", "-o", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert f"{victim}: it changed since the run" in line and "--redo-changed" in line, line
    assert cli_main(["show", url, "--image", "3", "-o", str(out)]) == 0
    assert run(path, "--redo-changed") == 0
    assert cli_main(["show", url, "--image", "2", "-o", str(out)]) == 0
    after = arrays(url)
    assert (after["status"] == 1).all()
    # image 2 is now image 3's picture; the others are as before
    np.testing.assert_array_equal(after["cls_attention"][2], before["cls_attention"][3])
    keep = np.arange(len(names)) != 2
    np.testing.assert_array_equal(after["cls_attention"][keep], before["cls_attention"][keep])
    # A store made before object identities were recorded resumes as it was made: without.
    group = zarr.open_group(url, mode="r+")
    group["status"][5:] = 0
    for name in ("image_bytes", "image_mtime_ns"):
        fs.rm(f"{bucket}/stores/rewritten-{listing}.zarr/{name}", recursive=True)
    zarr.consolidate_metadata(url)
    fs.invalidate_cache()
    assert run(path) == 0
    assert (arrays(url)["status"] == 1).all()
    assert "image_bytes" not in zarr.open_group(url, mode="r")


@pytest.mark.parametrize("trouble", ["unreachable-endpoint", "no-credentials"])
def test_access_problems_end_before_any_work(bucket, tmp_path, checkpoint, export_cache, trouble):
    env = dict(os.environ, AWS_MAX_ATTEMPTS="1")
    if trouble == "unreachable-endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        expected = r"cannot read the store: endpoint unreachable"
    else:
        env = {**env_without_credentials(), "AWS_MAX_ATTEMPTS": "1"}
        expected = r"cannot read the store: no credentials found"
    cache = tmp_path / "empty-cache"  # an export would show as files here: nothing may start
    path = config(tmp_path, f"s3://{bucket}/images", f"s3://{bucket}/x.zarr", checkpoint, cache)
    proc = subprocess.run(
        [str(VIT_ATTN), "run", str(path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 2
    assert re.fullmatch(rf"vit-attn: error: s3://runs/x\.zarr: {expected}.*\n", proc.stderr), (
        proc.stderr
    )
    assert not cache.exists()
