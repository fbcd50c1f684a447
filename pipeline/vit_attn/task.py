"""The unit of work: one batch, decoded, run, turned into maps and overlays, and written.

The same function runs in-process and on Dask workers. It receives a small picklable plan
and the batch's own paths; the inference session is created once per process and reused.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import Preprocess, load_batch, normalize
from .errors import PipelineError
from .overlay import blend, head_grid, save_png
from .roles import MAP_ARRAYS, default_map
from .runtime import OrtRunner, Runner, RuntimeOptions, TorchRunner
from .specs import ModelSource, OutputSpec
from .stats import STAT_NAMES
from .store import STATUS_OK, BatchResult, StoreSpec, empty_batch, write_batch


@dataclass(frozen=True)
class RunPlan:
    """Everything a task needs besides its batch; small, picklable, the same for all tasks."""

    store_path: str
    image_root: str
    spec: StoreSpec
    preprocess: Preprocess
    outputs: OutputSpec
    backend: str
    onnx_path: str | None
    model_source: ModelSource | None
    precision: str
    runtime: RuntimeOptions
    overlay_alpha: float = 0.5
    colormap: str = "inferno"
    png_dir: str | None = None
    png_heads: bool = False
    decode_threads: int = 1


@dataclass(frozen=True)
class BatchTask:
    """One batch: its index in the store and the paths of its images (as listed by the source)."""

    batch_index: int
    paths: tuple[str, ...]


@dataclass(frozen=True)
class BatchSummary:
    """What a finished task reports back: counts and where the time went."""

    batch_index: int
    ok: int
    failed: int
    seconds: dict[str, float]
    worker_pid: int


_runners: dict[tuple, Runner] = {}
_runner_lock = threading.Lock()
# One inference at a time per process. A worker that holds two batches (Dask threads, or the
# in-process pool) then overlaps one batch's decoding, maps and writing with the other's
# inference, and inference still has all its threads (docs/PERFORMANCE.md, "Pipelining").
_infer_lock = threading.Lock()


def get_runner(plan: RunPlan) -> Runner:
    """This process's session for the plan, created on first use and then reused."""
    key = (
        plan.backend,
        plan.onnx_path,
        plan.runtime,
        repr(plan.model_source),
        plan.outputs,
        plan.precision,
    )
    with _runner_lock:
        runner = _runners.get(key)
        if runner is None:
            runner = _make_runner(plan)
            _runners.clear()  # one live session per process: a new plan replaces the old one
            _runners[key] = runner
        return runner


def _make_runner(plan: RunPlan) -> Runner:
    if plan.backend == "onnxruntime":
        assert plan.onnx_path is not None
        return OrtRunner(Path(plan.onnx_path), plan.runtime)
    from .export import AttentionGraph
    from .model import load_model

    assert plan.model_source is not None
    loaded = load_model(plan.model_source)
    return TorchRunner(AttentionGraph(loaded, plan.outputs), plan.runtime, plan.precision)


def run_batch(plan: RunPlan, task: BatchTask) -> BatchSummary:
    """Decode, infer, build maps and overlays, then write the batch (status last)."""
    clock = _Clock()
    result = empty_batch(plan.spec, task.batch_index)
    if len(task.paths) != result.stop - result.start:
        raise PipelineError(
            f"batch {task.batch_index} carries {len(task.paths)} paths for {result.stop - result.start} images"
        )
    root = Path(plan.image_root)
    files = [p if os.path.isabs(p) else root / p for p in task.paths]
    images, errors = load_batch(files, plan.preprocess, threads=plan.decode_threads)
    clock.lap("decode")
    ok = np.array([e is None for e in errors])
    for i, err in enumerate(errors):
        result.error[i] = err or ""
    if ok.any():
        batch = normalize(images[ok], plan.preprocess)
        runner = get_runner(plan)
        clock.lap("decode")
        with _infer_lock:
            clock.lap("wait")
            outputs = runner.run(batch)
            clock.lap("infer")
        _fill(result, outputs, ok)
        _add_overlays(plan, result, images, ok)
        clock.lap("maps")
        result.status[ok] = STATUS_OK
    write_batch(plan.store_path, result)
    clock.lap("write")
    if plan.png_dir and ok.any():
        _write_pngs(plan, task, result, images, ok)
        clock.lap("png")
    n_ok = int(ok.sum())
    return BatchSummary(task.batch_index, n_ok, len(ok) - n_ok, clock.laps, os.getpid())


def _fill(result: BatchResult, outputs: dict[str, np.ndarray], ok: np.ndarray) -> None:
    """Copy graph outputs into the batch's store arrays (store dtypes; failed rows stay 0)."""
    for name in (*MAP_ARRAYS, "attention", "rollout", "topk_index", "topk_prob", *STAT_NAMES):
        if name in result.arrays and name in outputs:
            target = result.arrays[name]
            target[ok] = outputs[name].astype(target.dtype, copy=False)


def overlay_maps(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """[n, heads, gh, gw] float32: the maps overlays show, from the store's default map.

    The last stored layer of `cls_attention` or `received_attention`; `pool_attention` has
    no layer (several latent queries are averaged).
    """
    name = default_map(arrays)
    maps = arrays[name].astype(np.float32)
    if name != "pool_attention":
        return maps[:, -1]
    return maps if maps.ndim == 4 else maps.mean(axis=1)


def _head_mean_last_layer(result: BatchResult) -> np.ndarray:
    return overlay_maps(result.arrays).mean(axis=1)


def _add_overlays(plan: RunPlan, result: BatchResult, images: np.ndarray, ok: np.ndarray) -> None:
    arrays = result.arrays
    if "overlay" in arrays:
        maps = _head_mean_last_layer(result)[ok]
        arrays["overlay"][ok] = blend(
            images[ok], maps, alpha=plan.overlay_alpha, cmap=plan.colormap
        )
    if "overlay_heads" in arrays:
        heads = overlay_maps(arrays)[ok]  # [n, H, gh, gw]
        n, nh = heads.shape[:2]
        tiled = np.repeat(images[ok], nh, axis=0)
        blended = blend(
            tiled,
            heads.reshape(n * nh, *heads.shape[2:]),
            alpha=plan.overlay_alpha,
            cmap=plan.colormap,
        )
        arrays["overlay_heads"][ok] = blended.reshape(n, nh, *blended.shape[1:])


def png_path(png_dir: str | Path, image_path: str, suffix: str = ".png") -> Path:
    """Where the PNG of one image goes: its listed path, mirrored under `png_dir`."""
    rel = Path(image_path)
    if rel.is_absolute():
        rel = Path(*rel.parts[1:])
    return Path(png_dir) / rel.with_name(rel.name + suffix)


def _write_pngs(
    plan: RunPlan, task: BatchTask, result: BatchResult, images: np.ndarray, ok: np.ndarray
) -> None:
    assert plan.png_dir is not None
    heads_all = overlay_maps(result.arrays)
    means = heads_all.mean(axis=1)
    for i in np.flatnonzero(ok):
        path = task.paths[i]
        if "overlay" in result.arrays:
            save_png(result.arrays["overlay"][i], png_path(plan.png_dir, path))
        else:
            save_png(
                blend(images[i : i + 1], means[i : i + 1], plan.overlay_alpha, plan.colormap)[0],
                png_path(plan.png_dir, path),
            )
        if plan.png_heads:
            heads = heads_all[i]
            save_png(
                head_grid(images[i], heads, plan.overlay_alpha, plan.colormap),
                png_path(plan.png_dir, path, ".heads.png"),
            )


class _Clock:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now
