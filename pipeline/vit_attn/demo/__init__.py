"""The demo: a small ViT trained on procedurally drawn shapes, its data generator and driver.

`vit-attn demo` (or `python -m vit_attn.demo`) runs it; the model and config are package data.
"""

from __future__ import annotations

from .driver import ASSETS, CONFIG, main

__all__ = ["ASSETS", "CONFIG", "main"]
