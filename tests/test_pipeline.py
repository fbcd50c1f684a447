"""End to end: config -> store, in-process, on a LocalCluster and on a real external Dask cluster.

Every run writes the same ~100 images (synthetic, bundled photographs and every bad-input kind)
with a seeded tiny ViT whose attention is sharpened and saved as a checkpoint, so the stored
maps are far from uniform and comparable with an eager timm reference.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from timm.utils import AttentionExtract

from vit_attn.cli import main as cli_main
from vit_attn.decode import Preprocess, load_image, normalize
from vit_attn.store import open_dataset

from . import imagefactory
from .conftest import sharpened_model
from .helpers import (
    BATCH,
    MODEL,
    assert_stores_equal,
    save_sharpened_checkpoint,
    stop_process_group,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    images = root / "images"
    sizes = [(40 + 7 * i, 30 + 23 * (i % 13)) for i in range(84)]  # unique names: width differs
    imagefactory.write_rgb_set(images / "synthetic", sizes)
    imagefactory.copy_skimage_photos(images / "photos")
    for sub in ("odd", "broken"):
        (images / sub).mkdir()
    imagefactory.write_odd_valid(images / "odd")
    broken = imagefactory.write_broken(images / "broken")
    broken["missing"].unlink(missing_ok=True)  # a folder source lists only existing files
    imagefactory.write_bomb(images / "broken")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_sharpened_checkpoint(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, dataset, checkpoint, export_cache) -> Path:
    folder = tmp_path_factory.mktemp("inprocess")
    config = write_config(
        folder, dataset, checkpoint, export_cache, output={"png_dir": "png", "png_heads": True}
    )
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    return folder / "run.zarr"


def test_store_opens_with_xarray_and_names_failures(local_run):
    ds = open_dataset(local_run)
    assert ds["cls_attention"].dims == ("image", "layer", "head", "y", "x")
    assert ds["attention"].dims == ("image", "layer", "head", "query", "key")
    assert list(ds["layer"].values) == [0, 2]
    paths = [str(p) for p in ds["image_path"].values]
    status = dict(zip(paths, ds["status"].values.tolist()))
    errors = dict(zip(paths, [str(e) for e in ds["error"].values]))
    assert len(paths) >= 100
    broken = [p for p in paths if p.startswith("broken/")]
    assert len(broken) == 5
    for p in broken:
        assert status[p] == 2 and errors[p], p
    for p in paths:
        if not p.startswith("broken/"):
            assert status[p] == 1 and errors[p] == "", (p, errors[p])
    assert re.search("large|bomb", " ".join(errors[p] for p in broken))
    # failed images hold the fill value, never NaN
    failed = np.flatnonzero(ds["status"].values == 2)
    assert not np.any(ds["cls_attention"].values[failed])


def test_cls_attention_equals_eager_timm_reference(local_run, checkpoint):
    group = zarr.open_group(str(local_run), mode="r")
    prep = Preprocess.from_dict(group.attrs["preprocess"])
    root = Path(group.attrs["image_root"])
    paths = group["image_path"][:]
    ok = np.flatnonzero(group["status"][:] == 1)[::7]
    images = np.stack([load_image(root / paths[i], prep) for i in ok])
    model = sharpened_model(
        MODEL["name"], factor=1.0, img_size=tuple(MODEL["img_size"]), **MODEL["kwargs"]
    )
    from safetensors.torch import load_file

    model.model.load_state_dict(load_file(str(checkpoint)))
    with torch.no_grad():
        maps = list(
            AttentionExtract(model.model, method="hook")(
                torch.from_numpy(normalize(images, prep))
            ).values()
        )
    gh, gw = model.layout.grid
    stored = group["cls_attention"][:][ok].astype(np.float64)
    for j, block in enumerate((0, 2)):
        expected = maps[block][:, :, 0, 1:].reshape(len(ok), -1, gh, gw).double().numpy()
        assert expected.max() > 0.1  # sharpened: a wrong index or transposition would show
        np.testing.assert_allclose(stored[:, j], expected, atol=2e-4, rtol=2e-3)
    full = group["attention"][:][ok].astype(np.float64)
    np.testing.assert_allclose(full[:, 1], maps[2].double().numpy(), atol=2e-4, rtol=2e-3)


def test_overlays_and_pngs_written(local_run):
    group = zarr.open_group(str(local_run), mode="r")
    ok = np.flatnonzero(group["status"][:] == 1)
    overlay = group["overlay"][int(ok[0])]
    assert overlay.shape == (96, 128, 3) and overlay.std() > 5
    assert group["overlay_heads"].shape[1:] == (3, 96, 128, 3)
    pngs = sorted((local_run.parent / "png").rglob("*.png"))
    assert len(pngs) == 2 * len(ok)


def test_local_cluster_gives_identical_store(
    tmp_path, dataset, checkpoint, export_cache, local_run
):
    config = write_config(
        tmp_path, dataset, checkpoint, export_cache, cluster={"kind": "local", "n_workers": 2}
    )
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    assert_stores_equal(local_run, tmp_path / "run.zarr")


@pytest.fixture()
def external_cluster(tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "pipeline")}
    dask = str(VENV_BIN / "dask")
    procs = [
        subprocess.Popen(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        dask,
                        "worker",
                        "--scheduler-file",
                        str(sched_file),
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=tmp_path,
                )
            )
        from distributed import Client

        with Client(scheduler_file=str(sched_file), timeout="60s") as client:
            client.wait_for_workers(2, timeout=90)
        yield sched_file
    finally:
        for p in reversed(procs):
            stop_process_group(p)


def test_external_dask_cluster_gives_identical_store(
    tmp_path, dataset, checkpoint, export_cache, local_run, external_cluster
):
    config = write_config(
        tmp_path / "run",
        dataset,
        checkpoint,
        export_cache,
        cluster={"kind": "address", "scheduler_file": str(external_cluster)},
    )
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    assert_stores_equal(local_run, tmp_path / "run" / "run.zarr")


def _vit_attn(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "vit-attn"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def test_sigkill_then_resume_gives_identical_store(
    tmp_path, dataset, checkpoint, export_cache, local_run
):
    # PNG output slows each batch down enough to kill the run in the middle.
    config = write_config(
        tmp_path, dataset, checkpoint, export_cache, output={"png_dir": "png", "png_heads": True}
    )
    store = tmp_path / "run.zarr"
    proc = _vit_attn("run", str(config), "--no-progress", cwd=tmp_path)
    n_batches = -(-zarr_len(local_run) // BATCH)
    done = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (store / "zarr.json").exists():
            status = zarr.open_group(str(store), mode="r")["status"][:]
            done = sum(bool(status[i : i + BATCH].any()) for i in range(0, status.size, BATCH))
            if done >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= done < n_batches
    resumed = _vit_attn("run", str(config), "--no-progress", cwd=tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    match = re.search(r"resuming .*: (\d+) of (\d+) images in (\d+) batches", err)
    assert match, err
    assert int(match.group(3)) <= n_batches - 2
    assert_stores_equal(local_run, store)


def zarr_len(path: Path) -> int:
    return zarr.open_group(str(path), mode="r")["status"].shape[0]


def test_rerun_of_a_finished_store_does_nothing(local_run, tmp_path):
    config = local_run.parent / "config.yaml"
    before = {
        p: p.stat().st_mtime_ns for p in (local_run / "cls_attention").rglob("*") if p.is_file()
    }
    proc = _vit_attn("run", str(config), cwd=local_run.parent)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "0 of" in err and "in 0 batches" in err
    after = {
        p: p.stat().st_mtime_ns for p in (local_run / "cls_attention").rglob("*") if p.is_file()
    }
    assert before == after


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["attention"].update(layerz=[1]), r"attention\.layerz: unknown key"),
        (lambda c: c["inference"].update(batch_size="many"), r"inference\.batch_size: .*integer"),
        (lambda c: c["data"].update(source="/no/such/folder"), r"/no/such/folder"),
        (
            lambda c: c["attention"].update(layers=[0]),
            r"holds a different run \(attention\.layers: \[0, 2\] -> \[0\]",
        ),
        (
            lambda c: c["model"].update(name="resnet18", checkpoint=None, img_size=None, kwargs={}),
            r"no transformer blocks",
        ),
    ],
    ids=["unknown-key", "wrong-type", "missing-data", "fingerprint-mismatch", "no-attention"],
)
def test_user_errors_are_one_line_and_nonzero(local_run, tmp_path, mutate, message):
    cfg = yaml.safe_load((local_run.parent / "config.yaml").read_text())
    cfg["output"]["store"] = str(local_run)
    mutate(cfg)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(cfg))
    before = zarr.open_group(str(local_run), mode="r")["status"][:]
    proc = _vit_attn("run", str(config), cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vit-attn: error: "), err
    assert re.search(message, lines[0]), lines[0]
    np.testing.assert_array_equal(zarr.open_group(str(local_run), mode="r")["status"][:], before)


def test_overwrite_replaces_a_store_of_another_run(
    local_run, tmp_path, dataset, checkpoint, export_cache
):
    folder = tmp_path / "over"
    shutil.copytree(local_run, folder / "run.zarr")
    config = write_config(
        folder,
        dataset,
        checkpoint,
        export_cache,
        attention={"layers": [1], "full": False, "rollout": False},
        output={"overlays": "none"},
    )
    assert cli_main(["run", str(config), "--no-progress"]) == 2
    assert cli_main(["run", str(config), "--no-progress", "--overwrite"]) == 0
    group = zarr.open_group(str(folder / "run.zarr"), mode="r")
    assert group["layer"][:].tolist() == [1] and "attention" not in dict(group.arrays())


def test_refuses_to_write_into_a_folder_that_is_not_a_store(
    tmp_path, dataset, checkpoint, export_cache
):
    config = write_config(tmp_path, dataset, checkpoint, export_cache, output={"store": "precious"})
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("keep me")
    assert cli_main(["run", str(config), "--no-progress", "--overwrite"]) == 2
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "keep me"


def test_inspect_and_show(local_run, tmp_path, capsys):
    assert cli_main(["inspect", str(local_run)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+ ok, 5 failed, 0 pending", out)
    assert "broken/empty.jpg" in out and "cls_attention" in out
    for head in ("mean", "0", "max", "grid"):
        png = tmp_path / f"show-{head}.png"
        assert (
            cli_main(
                [
                    "show",
                    str(local_run),
                    "--image",
                    "photos/astronaut.png",
                    "--layer",
                    "0",
                    "--head",
                    head,
                    "-o",
                    str(png),
                ]
            )
            == 0
        )
        assert png.stat().st_size > 1000
    assert (
        cli_main(
            ["show", str(local_run), "--image", "broken/empty.jpg", "-o", str(tmp_path / "x.png")]
        )
        == 2
    )
    assert "failed" in capsys.readouterr().err
