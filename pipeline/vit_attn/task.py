"""The unit of work: one batch, decoded, run, turned into maps and overlays, and written.

The same function runs in-process and on Dask workers. It receives a small picklable plan
and the batch's own paths; the inference session is created once per process and reused.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .decode import Preprocess, load_batch
from .errors import BackendError, PipelineError, unrecoverable
from .graphinput import GraphInput
from .outputs import OutputError, is_per_image_os_error, png_path, write_png
from .overlap import OVERLAP, OverlapGate
from .overlay import blend, head_grid, head_labels, tile_grid
from .roles import MAP_ARRAYS, default_map
from .runtime import OrtRunner, Runner, RuntimeOptions, TorchRunner, available_threads
from .specs import ModelSource, OutputSpec
from .stats import STAT_NAMES
from .store import (
    STATUS_FAILED,
    STATUS_OK,
    BatchResult,
    StoreSpec,
    StoreTakenError,
    empty_batch,
    write_batch,
)
from .variant import for_device


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
    # Sources other than local files: reads a batch's bytes in the worker (vit_attn.datasource).
    reader: Any = None
    store_options: dict[str, Any] | None = None  # fsspec options of a store behind a URL
    run_id: str | None = None  # the store's run id: write_batch refuses a store of another run
    # sha256 of the model's parameters: a worker that outlives a run (a Dask worker of an
    # existing scheduler) must not reuse a model built from a checkpoint since replaced.
    weights_digest: str | None = None
    # Images per inference call: the store's batch size unless a resume asked for smaller
    # ones (inference.batch_size changed); each batch is then inferred in pieces. 0: whole.
    infer_batch: int = 0
    # Where images are decoded: None decodes JPEGs on the inference device when it is cuda
    # (vit_attn.gpu_decode), else on the host; "cpu" runs the device path on the CPU (tests).
    decode_device: str | None = None


@dataclass(frozen=True)
class BatchTask:
    """One batch: its index in the store and the paths of its images (as listed by the source)."""

    batch_index: int
    paths: tuple[str, ...]
    locators: tuple[Any, ...] | None = None  # where each image lies in a shard or Parquet file


@dataclass(frozen=True)
class BatchSummary:
    """What a finished task reports back: counts and where the time went."""

    batch_index: int
    ok: int
    failed: int
    seconds: dict[str, float]
    worker_pid: int
    overlapped: bool = False  # ran while another batch of the process was in flight
    fatal: str | None = None  # why the run must stop (disk full, store taken): never retried


_runners: dict[tuple, Runner] = {}
_runner_lock = threading.Lock()
# One inference at a time per process. A worker that holds two batches (Dask threads, or the
# in-process pool) then overlaps one batch's decoding, maps and writing with the other's
# inference, and inference still has all its threads (docs/PERFORMANCE.md, "Pipeline end to
# end vs the bare session").
_infer_lock = threading.Lock()
# Whether those two batches overlap at all is measured per process (overlap.py): overlapping
# must never make a run slower than one batch at a time.
_gate = OverlapGate()


def expect_batches(batches: int) -> None:
    """This process is about to run `batches` batches of one run (the in-process executor
    knows; a Dask worker does not, and measures as its batches come)."""
    _gate.expect(batches)


def get_runner(plan: RunPlan) -> Runner:
    """This process's session for the plan, created on first use and then reused."""
    key = (
        plan.backend,
        plan.onnx_path,
        plan.runtime,
        repr(plan.model_source),
        plan.weights_digest,
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
    pixels = GraphInput.pixels(plan.preprocess.mean, plan.preprocess.std)
    graph = AttentionGraph(loaded, plan.outputs, pixels, for_device(plan.runtime.device))
    return TorchRunner(graph, plan.runtime, plan.precision)


def run_batch(plan: RunPlan, task: BatchTask) -> BatchSummary:
    """Decode, infer, build maps and overlays, then write the batch (status last)."""
    with _gate.batch(len(task.paths)) as mode:
        summary = _run_batch(plan, task)
    return dataclasses.replace(summary, overlapped=mode == OVERLAP)


def _run_batch(plan: RunPlan, task: BatchTask) -> BatchSummary:
    clock = _Clock()
    result = empty_batch(plan.spec, task.batch_index)
    if len(task.paths) != result.stop - result.start:
        raise PipelineError(
            f"batch {task.batch_index} carries {len(task.paths)} paths for {result.stop - result.start} images"
        )
    labels = None
    pixels = None  # the batch on the device, when decoded there
    if plan.reader is not None:  # bytes from object storage, a shard or a Parquet file
        read = plan.reader.read(task.paths, task.locators)
        files, labels = read.items, read.labels
        images, errors = load_batch(files, plan.preprocess, threads=plan.decode_threads)
    else:
        root = Path(plan.image_root)
        files = [p if os.path.isabs(p) else root / p for p in task.paths]
        device = plan.decode_device or ("cuda" if plan.runtime.device == "cuda" else None)
        if device is not None:
            from . import gpu_decode

            device = device if gpu_decode.available(device) else None
        if device is None:
            images, errors = load_batch(files, plan.preprocess, threads=plan.decode_threads)
        else:
            from .gpu_decode import load_batch as device_load_batch

            images, errors, pixels = device_load_batch(
                files, plan.preprocess, device, threads=plan.decode_threads
            )
    if labels is not None and "label" in result.arrays:
        result.arrays["label"][:] = labels
    clock.lap("decode")
    ok = np.array([e is None for e in errors])
    for i, err in enumerate(errors):
        result.error[i] = err or ""
    if ok.any():
        batch = images[ok]  # uint8 NHWC: the graph normalises (vit_attn.graphinput)
        clock.lap("decode")
        try:
            runner = get_runner(plan)  # the process's first batch builds the session
        except BackendError as exc:  # the same for every batch: stop, do not retry
            return BatchSummary(task.batch_index, 0, 0, clock.laps, os.getpid(), fatal=str(exc))
        clock.lap("session")
        with _infer_lock:
            clock.lap("wait")
            outputs = _infer(runner, batch if pixels is None else pixels[ok], plan.infer_batch)
            clock.lap("infer")
        outputs = _drop_non_finite(result, outputs, ok, plan.precision)
        if ok.any():
            _fill(result, outputs, ok)
            _add_overlays(plan, result, images, ok, outputs)
            result.status[ok] = STATUS_OK
        clock.lap("maps")
    try:
        if plan.png_dir and ok.any():
            # Before the store write, whose status comes last: status 1 means the PNGs are there.
            _write_pngs(plan, task, result, images, ok)
            clock.lap("png")
        write_batch(plan.store_path, result, run_id=plan.run_id, storage_options=plan.store_options)
    except OSError as exc:
        fatal = (
            str(exc)
            if isinstance(exc, StoreTakenError | OutputError)
            else unrecoverable(exc, plan.store_path)
        )
        if fatal is None:
            raise
        return BatchSummary(task.batch_index, 0, 0, clock.laps, os.getpid(), fatal=fatal)
    clock.lap("write")
    n_ok = int((result.status == STATUS_OK).sum())
    return BatchSummary(task.batch_index, n_ok, len(ok) - n_ok, clock.laps, os.getpid())


def _infer(runner: Runner, batch: Any, size: int) -> dict[str, np.ndarray]:
    """The runner's outputs for `batch` (numpy pixels, or a device tensor), `size` images per
    call when the batch is larger: the same values per image, in less memory."""
    run = runner.run if isinstance(batch, np.ndarray) else runner.run_tensor
    if size <= 0 or len(batch) <= size:
        return run(batch)
    parts = [run(batch[i : i + size]) for i in range(0, len(batch), size)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _drop_non_finite(
    result: BatchResult, outputs: dict[str, np.ndarray], ok: np.ndarray, precision: str
) -> dict[str, np.ndarray]:
    """Images whose outputs hold NaN or inf fail with the reason (never status 1 over NaN
    maps): `ok` loses them, and the outputs, one row per ok image, drop their rows."""
    rows = int(ok.sum())
    finite = np.ones(rows, bool)
    for value in outputs.values():
        if value.dtype.kind == "f" and len(value) == rows:
            # a float64 sum is finite exactly when every value is (no bool copy of the
            # batch's full attention)
            finite &= np.isfinite(value.reshape(rows, -1).sum(axis=1, dtype=np.float64))
    if finite.all():
        return outputs
    hint = (
        "a value beyond float16's range under precision: mixed; try precision: fp32"
        if precision == "mixed"
        else "check the model's weights"
    )
    for i in np.flatnonzero(ok)[~finite]:
        result.error[i] = f"the model's output for this image is not finite (NaN or inf): {hint}"
    ok[np.flatnonzero(ok)[~finite]] = False
    return {name: value[finite] if len(value) == rows else value for name, value in outputs.items()}


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


def _add_overlays(
    plan: RunPlan,
    result: BatchResult,
    images: np.ndarray,
    ok: np.ndarray,
    outputs: dict[str, np.ndarray] | None = None,
) -> None:
    """The batch's overlays: the graph's own (vit_attn.overlay_graph) when it returned them,
    else blended here from the stored maps (graphs without overlay outputs). Failed rows stay 0."""
    arrays = result.arrays
    outputs = outputs or {}
    todo = [name for name in ("overlay", "overlay_heads") if name in arrays]
    for name in todo:
        if name in outputs:
            arrays[name][ok] = outputs[name]
    todo = [name for name in todo if name not in outputs]
    if not todo:
        return
    heads = overlay_maps(arrays)[ok]  # [n, H, gh, gw]
    if "overlay" in todo:
        arrays["overlay"][ok] = blend(
            images[ok], heads.mean(axis=1), alpha=plan.overlay_alpha, cmap=plan.colormap
        )
    if "overlay_heads" in todo:
        n, nh = heads.shape[:2]
        tiled = np.repeat(images[ok], nh, axis=0)
        blended = blend(
            tiled,
            heads.reshape(n * nh, *heads.shape[2:]),
            alpha=plan.overlay_alpha,
            cmap=plan.colormap,
        )
        arrays["overlay_heads"][ok] = blended.reshape(n, nh, *blended.shape[1:])


def _write_pngs(
    plan: RunPlan, task: BatchTask, result: BatchResult, images: np.ndarray, ok: np.ndarray
) -> None:
    """Write each ok image's PNGs; an image whose PNG name the file system refuses fails alone.

    Encoding is most of a picture's cost and releases the GIL (numpy's filter, zlib), so the
    batch's images are written on the worker's share of cores: during this stage the
    batch's own inference is over.
    """
    assert plan.png_dir is not None
    png_dir = plan.png_dir
    arrays = result.arrays
    heads_all = overlay_maps(arrays)

    def one(i: int) -> str | None:
        path = task.paths[i]
        if "overlay" in arrays:
            overlay = arrays["overlay"][i]
        else:
            mean = heads_all[i : i + 1].mean(axis=1)
            overlay = blend(images[i : i + 1], mean, plan.overlay_alpha, plan.colormap)[0]
        pngs = [(png_path(png_dir, plan.image_root, path), overlay)]
        if plan.png_heads:
            if "overlay_heads" in arrays:  # the same tiles, already blended (by the graph)
                tiles = np.concatenate([overlay[None], arrays["overlay_heads"][i]])
                grid = tile_grid(tiles, head_labels(heads_all.shape[1]))
            else:
                grid = head_grid(images[i], heads_all[i], plan.overlay_alpha, plan.colormap)
            pngs.append((png_path(png_dir, plan.image_root, path, ".heads.png"), grid))
        for target, pixels in pngs:
            try:
                write_png(pixels, target, png_dir, path)
            except OSError as exc:
                if isinstance(exc, PipelineError) or not is_per_image_os_error(exc):
                    raise
                return f"PNG {target} not written: {exc.strerror or exc}"
        return None

    todo = np.flatnonzero(ok).tolist()
    threads = min(len(todo), plan.runtime.threads or available_threads())
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="vit-attn-png") as pool:
            errors = list(pool.map(one, todo))  # the first exception is raised here
    else:
        errors = [one(i) for i in todo]
    for i, err in zip(todo, errors, strict=True):
        if err is not None:
            result.status[i] = STATUS_FAILED
            result.error[i] = err


class _Clock:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now
