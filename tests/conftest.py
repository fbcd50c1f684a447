"""Shared fixtures: tiny seeded timm models with sharpened attention, and a shared export cache."""

from __future__ import annotations

import os
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
            if not hasattr(attn, "qkv"):  # separate projections (e.g. EVA with qkv_fused=False)
                for proj in (attn.q_proj, attn.k_proj):
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
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the whole session: exporting costs ~15 s per graph here."""
    path = tmp_path_factory.mktemp("export-cache")
    os.environ["VIT_ATTN_CACHE"] = str(path)
    return path
