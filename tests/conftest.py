"""Shared fixtures: tiny seeded timm models with sharpened attention, and a shared export cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vit_attn.model import LoadedModel, ModelSource, attention_modules, load_model


def sharpen(model: torch.nn.Module, factor: float) -> None:
    """Multiply every block's attention logits by `factor` (q and k weights by its square root).

    Random-init ViTs attend almost uniformly, which hides index and precision errors. An
    attention pool (`attn_pool`) is sharpened the same way (its latent and its keys).
    """
    root = factor**0.5
    with torch.no_grad():
        for attn in attention_modules(model):
            if hasattr(attn, "qk"):  # ConViT's GPSA: q and k in one projection
                attn.qk.weight *= root
                if attn.qk.bias is not None:
                    attn.qk.bias *= root
                continue
            if not hasattr(attn, "qkv"):  # separate projections (EVA with qkv_fused=False, CaiT)
                pair = (attn.q_proj, attn.k_proj) if hasattr(attn, "q_proj") else (attn.q, attn.k)
                for proj in pair:
                    proj.weight *= root
                    if proj.bias is not None:
                        proj.bias *= root
                continue
            dim = attn.qkv.weight.shape[0] // 3
            attn.qkv.weight[: 2 * dim] *= root
            if attn.qkv.bias is not None:
                attn.qkv.bias[: 2 * dim] *= root
        pool = getattr(model, "attn_pool", None)  # an attention pool's latent queries and keys
        if pool is not None and hasattr(pool, "latent"):
            dim = pool.kv.weight.shape[0] // 2
            if isinstance(pool.q, torch.nn.Linear):
                pool.q.weight *= root
                if pool.q.bias is not None:
                    pool.q.bias *= root
            else:  # no query projection: the latent is the query
                pool.latent *= root
            pool.kv.weight[:dim] *= root
            if pool.kv.bias is not None:
                pool.kv.bias[:dim] *= root


def sharpened_model(name: str, factor: float = 4.0, seed: int = 0, **kwargs) -> LoadedModel:
    img_size = kwargs.pop("img_size", None)
    loaded = load_model(ModelSource(name, seed=seed, img_size=img_size, kwargs=kwargs))
    sharpen(loaded.model, factor)
    return loaded


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One export cache for the whole session: exporting costs ~15 s per graph here.

    `VIT_ATTN_CACHE` points at it while the session's tests run and is restored afterwards.
    """
    path = tmp_path_factory.mktemp("export-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIT_ATTN_CACHE", str(path))
        yield path


# --------------------------------------------------------------------------- the small run
# 25 images (two batches of 16, one broken file) through the sharpened tiny ViT of
# tests/helpers.py: the cluster tests (SLURM, an existing scheduler) must reproduce the
# in-process store bit for bit. Helpers are imported inside: tests/helpers.py imports this file.


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic images and one broken file: two batches of 16."""
    from . import imagefactory

    root = tmp_path_factory.mktemp("small-data")
    imagefactory.write_rgb_set(
        root / "images", [(50 + 9 * i, 40 + 11 * (i % 7)) for i in range(24)]
    )
    imagefactory.write_truncated_jpeg(root / "images")
    return root


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .helpers import save_sharpened_checkpoint

    return save_sharpened_checkpoint(tmp_path_factory.mktemp("small-weights"))


@pytest.fixture(scope="module")
def reference_store(
    tmp_path_factory: pytest.TempPathFactory,
    small_dataset: Path,
    small_checkpoint: Path,
    export_cache: Path,
) -> Path:
    """The in-process run every cluster run must reproduce bit for bit."""
    from vit_attn.cli import main as cli_main

    from .helpers import write_config

    folder = tmp_path_factory.mktemp("small-reference")
    config = write_config(folder, small_dataset, small_checkpoint, export_cache)
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    return folder / "run.zarr"


# Fixtures that start clusters, run whole pipelines or export several models. A test that uses
# one is slow wherever it lives, so the `slow` marker is applied here, in one place.
SLOW_FIXTURES = frozenset(
    {
        "exported_case",  # test_export: one export per model family
        "demo",  # test_demo: `vit-attn demo` on a LocalCluster
        "demo_run",
        "sharpened_run",
        "any_run",  # test_analysis: whole runs with statistics
        "local_run",
        "reference_store",  # test_pipeline / the small run above: end-to-end runs
        "slurm",
        "external_cluster",
        "demo_store",  # test_view: the demo run with full attention behind the viewer
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
