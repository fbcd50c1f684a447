"""Shared fixtures: tiny seeded timm models with sharpened attention, and a shared export cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vit_attn.model import LoadedModel, ModelSource, attention_modules, load_model


def sharpen(model: torch.nn.Module, factor: float) -> None:
    """Multiply every block's attention logits by `factor` (q and k weights by its square root).

    Random-init ViTs attend almost uniformly, which hides index and precision errors.
    """
    root = factor**0.5
    with torch.no_grad():
        for attn in attention_modules(model):
            dim = attn.qkv.weight.shape[0] // 3
            attn.qkv.weight[: 2 * dim] *= root
            if attn.qkv.bias is not None:
                attn.qkv.bias[: 2 * dim] *= root


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
        "reference_store",  # test_pipeline / smallrun: end-to-end runs
        "slurm",
        "external_cluster",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
