"""Planning a run: from a validated config to a store template and a list of batch tasks.

Pure bookkeeping apart from model loading and export: nothing here runs inference, so the
plan is cheap to test and the executors stay thin.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import Config
from .decode import preprocess_for_model
from .errors import StoreError
from .export import OutputSpec, export_onnx, weights_digest
from .identity import Identities, changed_images, describe_change, identify
from .model import LoadedModel, ModelSource, describe, load_model
from .outputs import batches_missing_pngs, check_output_locations, check_png_targets
from .runtime import RuntimeOptions, available_threads
from .sources import ImageList, list_images
from .stats import STAT_NAMES, STAT_UNITS
from .store import (
    FORMAT_VERSION,
    StoreSpec,
    config_differences,
    create_store,
    is_store,
    open_store_for_resume,
    pending_batches,
    read_status,
)
from .task import BatchTask, RunPlan

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A store ready to be filled and the batches that still need doing."""

    plan: RunPlan
    tasks: list[BatchTask]
    images: ImageList
    loaded: LoadedModel
    resumed: bool

    @property
    def n_images(self) -> int:
        return self.plan.spec.n_images


def model_source(cfg: Config) -> ModelSource:
    m = cfg.model
    return ModelSource(
        name=m.name,
        pretrained=m.pretrained,
        checkpoint=m.checkpoint,
        seed=m.seed,
        img_size=m.img_size_pair,
        kwargs=dict(m.kwargs),
    )


def output_spec(cfg: Config, loaded: LoadedModel) -> OutputSpec:
    layers = loaded.layout.resolve_layers(cfg.attention.layers)
    topk = cfg.attention.topk if loaded.layout.num_classes > 0 else 0
    return OutputSpec(
        layers=layers,
        logits=False,
        topk=min(topk, loaded.layout.num_classes),
        cls_attention=True,
        attention=cfg.attention.full,
        rollout=cfg.attention.rollout,
        stats=cfg.attention.stats,
    )


def store_spec(cfg: Config, loaded: LoadedModel, outputs: OutputSpec, n_images: int) -> StoreSpec:
    lay = loaded.layout
    return StoreSpec(
        n_images=n_images,
        batch_size=cfg.inference.batch_size,
        layers=outputs.layers,
        num_heads=lay.num_heads,
        grid=lay.grid,
        input_size=lay.input_size,
        num_tokens=lay.num_tokens,
        topk=outputs.topk or None,
        full_attention=outputs.attention,
        rollout=outputs.rollout,
        overlays=cfg.output.overlays,
        stats=STAT_NAMES if outputs.stats else (),
        compression=cfg.output.compression,
        identity=cfg.data.verify,
    )


def worker_threads(cfg: Config) -> int:
    """Inference threads per worker: workers x threads never exceed this machine's cores."""
    if cfg.inference.threads:
        return cfg.inference.threads
    if cfg.cluster.kind in ("local", "none"):
        workers = cfg.cluster.n_workers if cfg.cluster.kind == "local" else 1
        return max(1, available_threads() // workers)
    if cfg.cluster.kind == "slurm":
        return max(1, cfg.cluster.slurm.cores // cfg.cluster.slurm.processes)
    return 0  # workers of an existing scheduler use their own share of cores (affinity-aware)


def fingerprint_inputs(
    cfg: Config, loaded: LoadedModel, outputs: OutputSpec, prep: dict, images: ImageList
) -> dict[str, Any]:
    """Everything that changes the stored values or their layout, and nothing else."""
    listing = hashlib.sha256("\n".join(images.paths).encode()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "model": {**describe(loaded), "weights_digest": weights_digest(loaded.model)},
        "preprocess": prep,
        "outputs": {
            "layers": list(outputs.layers),
            "topk": outputs.topk,
            "attention": outputs.attention,
            "rollout": outputs.rollout,
            "overlays": cfg.output.overlays,
            "overlay_alpha": cfg.output.overlay_alpha,
            "colormap": cfg.output.colormap,
            # Only when on, so the fingerprints of stores made without statistics stay valid.
            **({"stats": list(STAT_NAMES)} if outputs.stats else {}),
        },
        "inference": {
            "backend": cfg.inference.backend,
            "device": cfg.inference.device,
            "precision": cfg.inference.precision,
            "batch_size": cfg.inference.batch_size,
        },
        "images": {
            "count": len(images.paths),
            "sha256": listing,
            "root": os.path.realpath(images.root),
            "verify": cfg.data.verify,
        },
    }


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str]:
    import onnxruntime
    import timm
    import torch
    import zarr

    return {
        "pipeline": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "zarr": zarr.__version__,
    }


def prepare(
    cfg: Config, overwrite: bool = False, run_id: str | None = None, redo_changed: bool = False
) -> PreparedRun:
    """List images, load and export the model, create or reopen the store, list pending batches.

    `run_id` (a fresh one by default) is written into the store: every batch write checks it.
    A resume whose input files changed is refused naming them, or with `redo_changed` redoes
    exactly the changed images.
    """
    run_id = run_id or uuid.uuid4().hex
    images = list_images(cfg.data.source)
    ids = identify(images.root, images.paths, cfg.data.verify)
    loaded = load_model(model_source(cfg))
    outputs = output_spec(cfg, loaded)
    prep = preprocess_for_model(loaded.model, loaded.layout.input_size)
    spec = store_spec(cfg, loaded, outputs, len(images.paths))
    inputs = fingerprint_inputs(cfg, loaded, outputs, prep.to_dict(), images)
    fingerprint = digest(inputs)
    store_path = Path(cfg.output.store)
    overwrite = overwrite or cfg.output.overwrite

    check_output_locations(cfg.data.source, store_path, cfg.output.png_dir)
    if cfg.output.png_dir:
        check_png_targets(cfg.output.png_dir, str(images.root), images.paths, cfg.output.png_heads)
    resumed = is_store(store_path) and not overwrite
    changed: list[int] = []
    if resumed:
        _check_same_run(store_path, fingerprint, inputs)
        changed = _changed_inputs(store_path, images, ids, redo_changed)
    onnx_path = None
    if cfg.inference.backend == "onnxruntime":
        # Exported before the store is touched: a failed export leaves nothing half-made.
        onnx_path = str(
            export_onnx(loaded, outputs, cfg.inference.precision, cfg.inference.cache_dir)
        )
    if resumed:
        group = open_store_for_resume(store_path, fingerprint)
        group.attrs["run_id"] = run_id  # from now on, writers of an earlier run are refused
        if changed:
            _mark_for_redo(group, changed, ids)
    else:
        attrs = {
            "model": describe(loaded),
            "config": cfg.to_dict(),
            "fingerprint": fingerprint,
            "fingerprint_inputs": inputs,
            "preprocess": prep.to_dict(),
            "image_root": str(images.root),
            "attention_dtype": spec.attention_dtype,
            **({"stat_units": dict(STAT_UNITS)} if outputs.stats else {}),
            "versions": versions(),
            "run_id": run_id,
        }
        group = create_store(
            store_path, spec, images.paths, attrs, overwrite=overwrite, initial=ids.arrays()
        )
    pending = pending_batches(group, spec)
    if resumed and cfg.output.png_dir:
        redo = batches_missing_pngs(
            read_status(store_path),
            spec.batch_size,
            cfg.output.png_dir,
            str(images.root),
            images.paths,
            cfg.output.png_heads,
        )
        pending = sorted(set(pending) | set(redo))
    plan = RunPlan(
        store_path=str(store_path),
        image_root=str(images.root),
        spec=spec,
        preprocess=prep,
        outputs=outputs,
        backend=cfg.inference.backend,
        onnx_path=onnx_path,
        model_source=model_source(cfg),
        precision=cfg.inference.precision,
        runtime=RuntimeOptions(
            device=cfg.inference.device,
            threads=worker_threads(cfg),
            allow_cpu_fallback=cfg.inference.allow_cpu_fallback,
            tensorrt=cfg.inference.tensorrt,
        ),
        overlay_alpha=cfg.output.overlay_alpha,
        colormap=cfg.output.colormap,
        png_dir=str(cfg.output.png_dir) if cfg.output.png_dir else None,
        png_heads=cfg.output.png_heads,
        decode_threads=cfg.data.decode_threads,
        run_id=run_id,
    )
    tasks = []
    for b in pending:
        start, stop = spec.batch_bounds(b)
        tasks.append(BatchTask(b, images.paths[start:stop]))
    return PreparedRun(plan=plan, tasks=tasks, images=images, loaded=loaded, resumed=resumed)


def _stored_identities(group: Any) -> Identities | None:
    names = {name for name, _ in group.arrays()}
    if not {"image_bytes", "image_mtime_ns"} <= names:
        return None
    sha = list(group["image_sha256"][:]) if "image_sha256" in names else None
    return Identities(
        np.asarray(group["image_bytes"][:]),
        np.asarray(group["image_mtime_ns"][:]),
        [str(s) for s in sha] if sha is not None else None,
    )


def _changed_inputs(path: Path, images: ImageList, ids: Identities, redo: bool) -> list[int]:
    """Indices of images that changed since the store recorded them; refused unless `redo`."""
    import zarr

    old = _stored_identities(zarr.open_group(str(path), mode="r"))
    if old is None:
        return []
    changed = changed_images(old, ids).tolist()
    if changed and not redo:
        shown = "; ".join(describe_change(images.paths[i], i, old, ids) for i in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise StoreError(
            f"{path}: {len(changed)} input images changed since the store recorded them "
            f"({shown}{more}); rerun with --redo-changed to redo exactly these images, "
            "or --overwrite to start over"
        )
    if changed:
        log.warning("redoing %d changed images", len(changed))
    return changed


def _mark_for_redo(group: Any, changed: list[int], ids: Identities) -> None:
    """Status 0 first, then the new identity: a crash in between only redoes them again."""
    idx = np.asarray(changed)
    group["status"].set_orthogonal_selection((idx,), np.zeros(idx.size, dtype=np.int8))
    group["error"].set_orthogonal_selection((idx,), np.asarray([""] * idx.size, dtype=object))
    for name, values in ids.arrays().items():
        if name in group:
            group[name].set_orthogonal_selection((idx,), np.asarray(values)[idx])


def _check_same_run(path: Path, fingerprint: str, inputs: dict[str, Any]) -> None:
    import zarr

    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    if attrs.get("fingerprint") == fingerprint:
        return
    changes = config_differences(attrs.get("fingerprint_inputs", {}), inputs)
    what = "; ".join(changes) if changes else "fingerprint differs"
    raise StoreError(
        f"{path} holds a different run ({what}); use the config it was made with to resume, "
        "a new output.store, or --overwrite to replace it"
    )
