"""Where vit-attn keeps what it can rebuild: exported graphs, their records, TensorRT engines.

One rule for every cache: `inference.cache_dir` when the config gives one, else
`$VIT_ATTN_CACHE`, else `~/.cache/vit-attn`. No imports beyond the standard library, so
onnxruntime-only workers can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: the configured one, else `$VIT_ATTN_CACHE`, else ~/.cache/vit-attn."""
    if configured is not None:
        return Path(configured)
    env = os.environ.get("VIT_ATTN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vit-attn"
