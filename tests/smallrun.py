"""A small end-to-end run shared by the cluster tests (SLURM, an existing scheduler).

25 images (two batches of 16, one broken file) through the same sharpened tiny ViT and config
as tests/test_pipeline.py (tests/helpers.py), so the ONNX export is a cache hit when both run in one session.
Import the fixtures into a test module to use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vit_attn.cli import main as cli_main

from . import imagefactory
from .helpers import MODEL, assert_stores_equal, save_sharpened_checkpoint, write_config  # noqa: F401


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """24 synthetic images and one broken file: two batches of 16."""
    root = tmp_path_factory.mktemp("small-data")
    imagefactory.write_rgb_set(
        root / "images", [(50 + 9 * i, 40 + 11 * (i % 7)) for i in range(24)]
    )
    imagefactory.write_truncated_jpeg(root / "images")
    return root


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    return save_sharpened_checkpoint(tmp_path_factory.mktemp("small-weights"))


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, small_dataset, small_checkpoint, export_cache) -> Path:
    """The in-process run every cluster run must reproduce bit for bit."""
    folder = tmp_path_factory.mktemp("small-reference")
    config = write_config(folder, small_dataset, small_checkpoint, export_cache)
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    return folder / "run.zarr"
