"""Planning a run: from a validated config to a store template and a list of batch tasks.

Pure bookkeeping apart from model loading and export: nothing here runs inference, so the
plan is cheap to test and the executors stay thin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .config import ClusterConfig, Config
from .datasource import listing_changes, open_source
from .decode import Preprocess
from .errors import StoreError
from .executor import choose_executor
from .graphcache import ModelFacts, model_source, package_version
from .graphcache import resolve as resolve_model
from .remote import is_url, location, redact, zarr_store
from .runtime import RuntimeOptions, available_threads
from .sources import ImageList
from .specs import OutputSpec
from .stats import STAT_NAMES, STAT_UNITS
from .store import (
    FORMAT_VERSION,
    StoreSpec,
    array,
    config_differences,
    create_store,
    is_store,
    open_store_for_resume,
    pending_batches,
)
from .task import BatchTask, RunPlan

if TYPE_CHECKING:
    from .model import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A store ready to be filled and the batches that still need doing."""

    plan: RunPlan
    tasks: list[BatchTask]
    images: ImageList
    model: ModelFacts
    resumed: bool
    cluster: ClusterConfig | None = None  # the executor to use (`auto` resolved)
    cluster_reason: str = ""  # why `auto` chose it

    @property
    def n_images(self) -> int:
        return self.plan.spec.n_images


def output_spec(cfg: Config, loaded: LoadedModel | ModelFacts) -> OutputSpec:
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


def store_spec(
    cfg: Config, loaded: LoadedModel | ModelFacts, outputs: OutputSpec, n_images: int
) -> StoreSpec:
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
    cfg: Config, loaded: ModelFacts, outputs: OutputSpec, prep: dict, images: ImageList
) -> dict[str, Any]:
    """Everything that changes the stored values or their layout, and nothing else."""
    listing = hashlib.sha256("\n".join(images.paths).encode()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "model": {**loaded.description, "weights_digest": loaded.weights_digest},
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
        "images": {"count": len(images.paths), "sha256": listing},
        # Only for shards and Parquet, so the fingerprints of folder stores stay valid.
        **({"source": images.identity} if images.identity else {}),
    }


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata: importing torch to ask costs seconds."""
    names = ("torch", "timm", "onnxruntime", "zarr")
    return {"vit_attn": __version__, **{name: package_version(name) for name in names}}


def prepare(cfg: Config, overwrite: bool = False) -> PreparedRun:
    """List images, learn the model (cached facts, or build and export it), create or reopen
    the store, list pending batches."""
    data = cfg.data
    if is_url(cfg.output.store):  # fail fast on an unreachable store, before any work
        from .store_remote import probe_store

        probe_store(str(cfg.output.store), cfg.output.storage_options)
    images = open_source(
        data.source, data.storage_options, data.image_column, data.id_column, data.label_key
    )
    # Exported before the store is touched: a failed export leaves nothing half-made.
    loaded = resolve_model(cfg)
    outputs = loaded.outputs
    prep = Preprocess.from_dict(loaded.preprocess)
    spec = store_spec(cfg, loaded, outputs, len(images.paths))
    if data.label_key is not None:
        spec = dataclasses.replace(spec, labels=True)
    inputs = fingerprint_inputs(cfg, loaded, outputs, prep.to_dict(), images)
    fingerprint = digest(inputs)
    store_path = location(cfg.output.store)
    store_options = dict(cfg.output.storage_options)
    overwrite = overwrite or cfg.output.overwrite

    resumed = is_store(store_path, store_options) and not overwrite
    if resumed:
        _check_same_run(store_path, fingerprint, inputs, store_options, images.paths)
    onnx_path = loaded.onnx_path if cfg.inference.backend == "onnxruntime" else None
    if resumed:
        group = open_store_for_resume(store_path, fingerprint, storage_options=store_options)
    else:
        attrs = {
            "model": loaded.description,
            "config": _redacted(cfg.to_dict()),
            "fingerprint": fingerprint,
            "fingerprint_inputs": inputs,
            "preprocess": prep.to_dict(),
            "image_root": str(images.root),
            "attention_dtype": spec.attention_dtype,
            **({"stat_units": dict(STAT_UNITS)} if outputs.stats else {}),
            "versions": versions(),
        }
        group = create_store(
            store_path,
            spec,
            images.paths,
            attrs,
            overwrite=overwrite,
            storage_options=store_options,
        )
    pending = pending_batches(group, spec)
    cluster, cluster_reason = choose_executor(cfg.cluster, len(pending))
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
            threads=worker_threads(cfg.model_copy(update={"cluster": cluster})),
            allow_cpu_fallback=cfg.inference.allow_cpu_fallback,
            tensorrt=cfg.inference.tensorrt,
        ),
        overlay_alpha=cfg.output.overlay_alpha,
        colormap=cfg.output.colormap,
        png_dir=str(cfg.output.png_dir) if cfg.output.png_dir else None,
        png_heads=cfg.output.png_heads,
        decode_threads=cfg.data.decode_threads,
        reader=images.reader,
        store_options=store_options,
    )
    tasks = []
    for b in pending:
        start, stop = spec.batch_bounds(b)
        locators = images.locators[start:stop] if images.locators is not None else None
        tasks.append(BatchTask(b, images.paths[start:stop], locators))
    return PreparedRun(
        plan=plan,
        tasks=tasks,
        images=images,
        model=loaded,
        resumed=resumed,
        cluster=cluster,
        cluster_reason=cluster_reason,
    )


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The config as stored in the store's attributes: no secrets of storage options."""
    for section in ("data", "output"):
        options = config.get(section, {}).get("storage_options")
        if options:
            config[section]["storage_options"] = redact(options)
    return config


def _check_same_run(
    path: Path | str,
    fingerprint: str,
    inputs: dict[str, Any],
    storage_options: Any = None,
    paths: tuple[str, ...] | None = None,
) -> None:
    import zarr

    group = zarr.open_group(zarr_store(path, storage_options, read_only=True), mode="r")
    attrs = dict(group.attrs)
    if attrs.get("fingerprint") == fingerprint:
        return
    changes = config_differences(attrs.get("fingerprint_inputs", {}), inputs)
    if paths is not None and any(c.startswith("images.") for c in changes):
        # Name the images that came or went rather than two listing digests.
        listing = listing_changes(list(np.asarray(array(group, "image_path")[:])), paths)
        changes = [listing] + [c for c in changes if not c.startswith("images.")]
    what = "; ".join(changes) if changes else "fingerprint differs"
    raise StoreError(
        f"{path} holds a different run ({what}); use the config it was made with to resume, "
        "a new output.store, or --overwrite to replace it"
    )
