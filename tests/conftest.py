"""Shared fixtures: tiny seeded timm models with sharpened attention, and a shared export cache."""

from __future__ import annotations

import os
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
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the whole session: exporting costs ~15 s per graph here."""
    path = tmp_path_factory.mktemp("export-cache")
    os.environ["VIT_ATTN_CACHE"] = str(path)
    return path
