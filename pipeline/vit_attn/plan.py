"""Planning a run: from a validated config to a store template and a list of batch tasks.

Pure bookkeeping apart from model loading and export: nothing here runs inference, so the
plan is cheap to test and the executors stay thin.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config
from .decode import preprocess_for_model
from .errors import ConfigError, StoreError
from .export import OutputSpec, export_onnx, weights_digest
from .model import LoadedModel, ModelSource, describe, load_model
from .runtime import RuntimeOptions, available_threads
from .sources import ImageList, list_images
from .stats import STAT_UNITS
from .store import (
    FORMAT_VERSION,
    StoreSpec,
    config_differences,
    create_store,
    is_store,
    open_store_for_resume,
    pending_batches,
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
    lay = loaded.layout
    layers = lay.resolve_layers(cfg.attention.layers)
    topk = cfg.attention.topk if lay.num_classes > 0 else 0
    if cfg.attention.rollout and not lay.has_class_token:
        raise ConfigError(
            f"attention.rollout: model {cfg.model.name!r} has no class token ({lay.pooling} "
            "pooling), and rollout is the class token's row; set attention.rollout: false"
        )
    return OutputSpec(
        layers=layers,
        logits=False,
        topk=min(topk, lay.num_classes),
        cls_attention="cls_attention" in lay.maps,
        attention=cfg.attention.full,
        rollout=cfg.attention.rollout,
        stats=cfg.attention.stats,
        received_attention="received_attention" in lay.maps,
        pool_attention="pool_attention" in lay.maps,
        class_token=lay.has_class_token,
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
        stats=outputs.stat_names,
        compression=cfg.output.compression,
        maps=lay.maps,
        pool_latents=max(lay.pool_latents, 1),
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
            **({"stats": list(outputs.stat_names)} if outputs.stats else {}),
            # Only when not the plain CLS map, so the fingerprints of CLS stores stay valid.
            **({"maps": list(loaded.layout.maps)} if not outputs.cls_attention else {}),
        },
        "inference": {
            "backend": cfg.inference.backend,
            "device": cfg.inference.device,
            "precision": cfg.inference.precision,
            "batch_size": cfg.inference.batch_size,
        },
        "images": {"count": len(images.paths), "sha256": listing},
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


def prepare(cfg: Config, overwrite: bool = False) -> PreparedRun:
    """List images, load and export the model, create or reopen the store, list pending batches."""
    images = list_images(cfg.data.source)
    loaded = load_model(model_source(cfg))
    outputs = output_spec(cfg, loaded)
    prep = preprocess_for_model(loaded.model, loaded.layout.input_size)
    spec = store_spec(cfg, loaded, outputs, len(images.paths))
    inputs = fingerprint_inputs(cfg, loaded, outputs, prep.to_dict(), images)
    fingerprint = digest(inputs)
    store_path = Path(cfg.output.store)
    overwrite = overwrite or cfg.output.overwrite

    resumed = is_store(store_path) and not overwrite
    if resumed:
        _check_same_run(store_path, fingerprint, inputs)
    onnx_path = None
    if cfg.inference.backend == "onnxruntime":
        # Exported before the store is touched: a failed export leaves nothing half-made.
        onnx_path = str(
            export_onnx(loaded, outputs, cfg.inference.precision, cfg.inference.cache_dir)
        )
    if resumed:
        group = open_store_for_resume(store_path, fingerprint)
    else:
        attrs = {
            "model": describe(loaded),
            "config": cfg.to_dict(),
            "fingerprint": fingerprint,
            "fingerprint_inputs": inputs,
            "preprocess": prep.to_dict(),
            "image_root": str(images.root),
            "attention_dtype": spec.attention_dtype,
            "token_roles": loaded.layout.roles(),
            **({"stat_units": dict(STAT_UNITS)} if outputs.stats else {}),
            "versions": versions(),
        }
        group = create_store(store_path, spec, images.paths, attrs, overwrite=overwrite)
    pending = pending_batches(group, spec)
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
    )
    tasks = []
    for b in pending:
        start, stop = spec.batch_bounds(b)
        tasks.append(BatchTask(b, images.paths[start:stop]))
    return PreparedRun(plan=plan, tasks=tasks, images=images, loaded=loaded, resumed=resumed)


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
