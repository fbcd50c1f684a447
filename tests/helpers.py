"""Helpers shared by test modules: the small sharpened model run, store comparison, processes.

Test modules import from here (never from each other), so each test file can be run alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

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


def logged(caplog: Any, text: str) -> list[str]:
    """The log messages (pytest's caplog) that contain `text`. Warnings reach the CLI's
    stderr through logging, whose handler may be bound to an earlier test's stderr: caplog
    sees them whatever capsys does."""
    return [m for m in (r.getMessage() for r in caplog.records) if text in m]


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


# ------------------------------------------------------------------ what an exported graph holds


def block_of(node: Any) -> int | None:
    """The ViT block an ONNX node belongs to (from the exporter's name scopes), or None."""
    from vit_attn.precision import node_scopes

    for s in node_scopes(node):
        parts = s.split(".")
        if len(parts) >= 3 and parts[:2] == ["vit", "blocks"] and parts[2].isdigit():
            return int(parts[2])
    return None


def softmax_shapes(path: Path) -> dict[int | None, list[tuple[int, ...]]]:
    """Per block, the shapes of its Softmax outputs without the batch: (heads, rows, keys)."""
    import onnx

    model = onnx.load(str(path))
    info = {v.name: v for v in model.graph.value_info}
    found: dict[int | None, list[tuple[int, ...]]] = {}
    for node in model.graph.node:
        if node.op_type == "Softmax":
            dims = info[node.output[0]].type.tensor_type.shape.dim
            found.setdefault(block_of(node), []).append(tuple(d.dim_value for d in dims[1:]))
    return found


def block_output_nodes(path: Path, block: int) -> list[str]:
    """Nodes of a block's output path: its attention projection, second norm and MLP."""
    import onnx

    from vit_attn.precision import node_scopes

    prefixes = tuple(f"vit.blocks.{block}.{m}" for m in ("attn.proj", "norm2", "mlp"))
    return [
        n.op_type
        for n in onnx.load(str(path)).graph.node
        if any(s == p or s.startswith(p + ".") for s in node_scopes(n) for p in prefixes)
    ]


def stats_reference(
    a: np.ndarray, p: int, grid: tuple[int, int], patch: tuple[int, int]
) -> dict[str, float]:
    """One head's statistics with plain loops, written from the definitions in docs/ANALYSIS.md."""
    gh, gw = grid
    ph, pw = patch
    n = gh * gw
    centre = [((k // gw + 0.5) * ph, (k % gw + 0.5) * pw) for k in range(n)]
    cls = [float(a[0, p + j]) for j in range(n)]
    total = sum(cls)
    shares = [c / total for c in cls]
    entropy = -sum(s * math.log(s) for s in shares if s > 0)
    distances, prefix = [], []
    for i in range(n):
        row = [float(a[p + i, p + j]) for j in range(n)]
        mass = sum(row)
        distances.append(sum(w * math.dist(centre[i], centre[j]) for j, w in enumerate(row)) / mass)
        prefix.append(sum(float(a[p + i, k]) for k in range(p)))
    taken, count = 0.0, 0
    for s in sorted(shares, reverse=True):
        if taken >= 0.6:
            break
        taken += s
        count += 1
    return {
        "cls_entropy": entropy,
        "attention_distance": sum(distances) / n,
        "prefix_mass": sum(prefix) / n,
        "cls_self": float(a[0, 0]),
        "patch_self": sum(float(a[p + i, p + i]) for i in range(n)) / n,
        "concentration_60": count / n,
        "cls_max": max(cls),
    }
