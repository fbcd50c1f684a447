"""Helpers shared by test modules: the small sharpened model run, store comparison, processes.

Test modules import from here (never from each other), so each test file can be run alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import yaml
import zarr
from safetensors.torch import save_file

from .conftest import sharpened_model

# The tiny ViT of the end-to-end runs: depth 3, a non-square 96 x 128 input (6 x 8 patches).
MODEL = {"name": "vit_tiny_patch16_224", "img_size": [96, 128], "kwargs": {"depth": 3}}
BATCH = 16


def save_sharpened_checkpoint(folder: Path) -> Path:
    """MODEL with attention sharpened 16x, saved as `folder/sharp.safetensors`."""
    loaded = sharpened_model(
        MODEL["name"], factor=16.0, seed=0, img_size=tuple(MODEL["img_size"]), **MODEL["kwargs"]
    )
    path = folder / "sharp.safetensors"
    save_file(loaded.model.state_dict(), str(path))
    return path


def write_config(folder: Path, dataset: Path, checkpoint: Path, cache: Path, **sections) -> Path:
    """A run config for MODEL over `dataset/images` (sections override keys one level deep)."""
    cfg = {
        "model": {**MODEL, "checkpoint": str(checkpoint)},
        "data": {"source": str(dataset / "images")},
        "attention": {"layers": [0, -1], "rollout": True, "full": True},
        "inference": {"batch_size": BATCH, "threads": 1, "cache_dir": str(cache)},
        "output": {"store": "run.zarr", "overlays": "heads"},
        "cluster": {"kind": "none"},
    }
    return save_config(folder, cfg, **sections)


def save_config(folder: Path, cfg: dict, **sections) -> Path:
    """Write `cfg` as `folder/config.yaml`, sections overriding its keys one level deep."""
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_stores_equal(a: Path, b: Path) -> None:
    """The same arrays with bit-identical contents."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(n for n, _ in ga.arrays())
    assert names == sorted(n for n, _ in gb.arrays())
    for name in names:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group started with `start_new_session=True`, SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
