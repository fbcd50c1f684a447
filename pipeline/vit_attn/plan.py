"""Planning a run: from a validated config to a store template and a list of batch tasks.

Pure bookkeeping apart from model loading and export: nothing here runs inference, so the
plan is cheap to test and the executors stay thin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .cachedir import cache_root
from .config import ClusterConfig, Config
from .datasource import listing_changes, open_source
from .decode import Preprocess
from .errors import ConfigError, StoreError, describe_os_error
from .executor import choose_executor
from .graphcache import ModelFacts, model_source, package_version
from .graphcache import resolve as resolve_model
from .identity import Identities, changed_images, describe_change, identify
from .layout import class_attention_refusal
from .outputs import (
    batches_missing_pngs,
    check_output_locations,
    check_png_owner,
    check_png_targets,
    claim_png_dir,
    listed_folder,
    remove_our_pngs,
    remove_pngs_of,
    remove_temp_pngs,
)
from .remote import is_url, location, redact, zarr_store
from .runtime import RuntimeOptions, available_threads
from .sources import ImageList
from .specs import OutputSpec
from .stats import STAT_NAMES, STAT_UNITS
from .store import (
    FORMAT_VERSION,
    READER_ARRAYS,
    STATUS_FAILED,
    StoreSpec,
    array,
    batches_missing_files,
    check_arrays_present,
    config_differences,
    create_store,
    drop_arrays,
    is_store,
    missing_arrays,
    open_store_for_resume,
    pending_batches,
    read_status,
    readable_attrs,
    remove_stale_templates,
    run_status,
    store_counts,
    stored_batch_size,
)
from .task import BatchTask, RunPlan

if TYPE_CHECKING:
    import zarr

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
    lay = loaded.layout
    layers = lay.resolve_layers(cfg.attention.layers)
    topk = cfg.attention.topk if lay.num_classes > 0 else 0
    att = cfg.attention
    if lay.class_queries_only and (att.full or att.rollout or att.stats):
        raise ConfigError(class_attention_refusal(cfg.model.name))
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
        **overlay_fields(cfg),
    )


def overlay_fields(cfg: Config) -> dict[str, Any]:
    """The graph's overlay outputs (vit_attn.overlay_graph); alpha and colormap only when on,
    so that they never change a graph that does not blend."""
    out = cfg.output
    if out.overlays == "none":
        return {}
    return {"overlays": out.overlays, "overlay_alpha": out.overlay_alpha, "colormap": out.colormap}


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
        stats=outputs.stat_names,
        compression=cfg.output.compression,
        attention_dtype=cfg.output.attention_dtype,
        identity=cfg.data.verify,
        maps=lay.maps,
        pool_latents=max(lay.pool_latents, 1),
        pool_heads=lay.pool_heads,
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
            **({"stats": list(outputs.stat_names)} if outputs.stats else {}),
            # Only when not the plain CLS map, so the fingerprints of CLS stores stay valid.
            **({"maps": list(loaded.layout.maps)} if not outputs.cls_attention else {}),
            # Only when not the default, so the fingerprints of float16 stores stay valid.
            **(
                {"attention_dtype": cfg.output.attention_dtype}
                if cfg.output.attention_dtype != "float16"
                else {}
            ),
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
            "root": str(images.root) if is_url(str(images.root)) else os.path.realpath(images.root),
            "verify": cfg.data.verify if images.reader is None else "none",
        },
        # Only for shards and Parquet: what else identifies their images.
        **({"source": images.identity} if images.identity else {}),
    }


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata: importing torch to ask costs seconds."""
    names = ("torch", "timm", "onnxruntime", "zarr")
    return {"vit_attn": __version__, **{name: package_version(name) for name in names}}


def prepare(
    cfg: Config,
    overwrite: bool = False,
    run_id: str | None = None,
    redo_changed: bool = False,
    retry_failed: bool = False,
) -> PreparedRun:
    """List images, learn the model (cached facts, or build and export it), create or reopen
    the store, list pending batches.

    `run_id` (a fresh one by default) is written into the store: every batch write checks it.
    A resume whose input files changed is refused naming them, or with `redo_changed` redoes
    exactly the changed images; `retry_failed` makes the failed images pending again.
    """
    run_id = run_id or uuid.uuid4().hex
    data = cfg.data
    if is_url(cfg.output.store):  # fail fast on an unreachable store, before any work
        from .store_remote import probe_store

        probe_store(str(cfg.output.store), cfg.output.storage_options)
    images = open_source(
        data.source, data.storage_options, data.image_column, data.id_column, data.label_key
    )
    # A content hash only for local image files: elsewhere it would mean reading every
    # image at each start.
    if data.verify == "hash" and images.reader is not None:
        raise ConfigError(
            f"data.verify: hash checks local image files; {data.source} is read through a URL, "
            "shards or Parquet, whose images a resume identifies by the listing only: remove "
            "data.verify (or list local files)"
        )
    # Local image files by their own size and mtime (or hash); images behind a URL by the
    # listing's size and time (none for HTTP); shard and Parquet images by their file's (a
    # rewritten shard redoes or refuses all its images).
    ids = (
        identify(images.root, images.paths, data.verify)
        if images.reader is None
        else images.identities
    )
    # Exported before the store is touched: a failed export leaves nothing half-made.
    loaded = resolve_model(cfg)
    outputs = loaded.outputs
    prep = Preprocess.from_dict(loaded.preprocess)
    store_path = location(cfg.output.store)
    store_options = dict(cfg.output.storage_options)
    overwrite = overwrite or cfg.output.overwrite
    # A store's batches are its chunks, fixed when it was made; inference.batch_size may change
    # on a resume (a smaller one after running out of GPU memory): each store batch is then
    # inferred in pieces of that size (RunPlan.infer_batch).
    infer_batch = cfg.inference.batch_size
    made_with = None if overwrite else stored_batch_size(store_path, store_options)
    if made_with is not None and made_with != infer_batch:
        cfg = cfg.model_copy(
            update={"inference": cfg.inference.model_copy(update={"batch_size": made_with})}
        )
    spec = store_spec(cfg, loaded, outputs, len(images.paths))
    if data.label_key is not None:
        spec = dataclasses.replace(spec, labels=True)
    if ids is None:  # a source that gives no identity
        spec = dataclasses.replace(spec, identity="none")
    inputs = fingerprint_inputs(cfg, loaded, outputs, prep.to_dict(), images)
    fingerprint = digest(inputs)

    check_output_locations(cfg.data.source, store_path, cfg.output.png_dir)
    if cfg.output.png_dir:
        check_png_owner(cfg.output.png_dir, store_path)
        check_png_targets(
            cfg.output.png_dir,
            str(images.root),
            images.paths,
            cfg.output.png_heads,
            store=store_path,
        )
    # (under the store's lock, which the caller holds)
    remove_stale_templates(store_path, cfg.output.lock_stale_seconds)
    if cfg.output.png_dir:  # before the store is made or changed: a loser changes nothing
        claim_png_dir(cfg.output.png_dir, store_path)
    existing = is_store(store_path, store_options)
    resumed = existing and not overwrite
    if resumed and ids is not None and images.reader is not None:
        # A URL, shard or Parquet store made before their files' identity was recorded resumes
        # as it was made: without it.
        if missing_arrays(store_path, ["image_bytes", "image_mtime_ns"], store_options):
            ids = None
            spec = dataclasses.replace(spec, identity="none")
    if existing and overwrite:
        _say_what_overwrite_discards(store_path, store_options, fingerprint)
    changed: list[int] = []
    if resumed:
        check_arrays_present(store_path, READER_ARRAYS, store_options)  # _check_same_run reads
        _check_same_run(store_path, fingerprint, inputs, store_options, images.paths)
        # A finished store with an array deleted would otherwise resume as complete.
        rest = [a.name for a in spec.layout() if a.name not in READER_ARRAYS]
        check_arrays_present(store_path, rest, store_options)
        if ids is not None:
            changed = _changed_inputs(store_path, images, ids, redo_changed, store_options)
    onnx_path = loaded.onnx_path if cfg.inference.backend == "onnxruntime" else None
    if resumed:
        group = open_store_for_resume(store_path, fingerprint, storage_options=store_options)
        with _naming(store_path):
            group.attrs["run_id"] = run_id  # from now on, writers of an earlier run are refused
            if changed and ids is not None:
                _mark_for_redo(group, changed, ids)
            if retry_failed:
                _mark_failed_for_retry(group)
    else:
        attrs = {
            "model": loaded.description,
            "config": _redacted(cfg.to_dict()),
            "fingerprint": fingerprint,
            "fingerprint_inputs": inputs,
            "preprocess": prep.to_dict(),
            "image_root": str(images.root),
            "attention_dtype": spec.attention_dtype,
            "token_roles": loaded.layout.roles(),
            **({"stat_units": dict(STAT_UNITS)} if outputs.stats else {}),
            "versions": versions(),
            "run_id": run_id,
        }
        group = create_store(
            store_path,
            spec,
            images.paths,
            attrs,
            overwrite=overwrite,
            storage_options=store_options,
            initial=ids.arrays() if ids is not None else None,
        )
    if cfg.output.png_dir:
        png_dir = cfg.output.png_dir
        inputs_there = _local_inputs(cfg.data.source, images, png_dir)
        if resumed:
            left = remove_temp_pngs(png_dir, inputs_there)
            if left:
                log.info("removed %d unfinished PNG files a stopped run left", left)
            redone = [images.paths[i] for i in changed]
            gone = remove_pngs_of(png_dir, str(images.root), redone, cfg.output.png_heads)
            if gone:
                log.info("removed %d PNGs of the changed images before redoing them", gone)
        else:  # a new store: no PNG of whatever this png_dir held before may stay
            gone = remove_our_pngs(png_dir, inputs_there)
            if gone:
                log.warning(
                    "output.png_dir %s: removed %d PNGs of an earlier run, so that it holds "
                    "this store's only",
                    png_dir,
                    gone,
                )
    pending = pending_batches(group, spec)
    if resumed:
        lost = batches_missing_files(group, spec, read_status(store_path, store_options))
        if lost:
            log.warning(
                "%s: %d finished batches have store files missing (deleted, or lost with a "
                "disk): doing them again",
                store_path,
                len(lost),
            )
            pending = sorted(set(pending) | set(lost))
    if resumed and cfg.output.png_dir:
        redo = batches_missing_pngs(
            read_status(store_path, store_options),
            spec.batch_size,
            cfg.output.png_dir,
            str(images.root),
            images.paths,
            cfg.output.png_heads,
        )
        pending = sorted(set(pending) | set(redo))
    if resumed and pending:
        with _naming(store_path):
            _drop_stats_written_later(group, spec, store_path, store_options)
    cluster, cluster_reason = choose_executor(cfg.cluster, len(pending))
    plan = RunPlan(
        infer_batch=infer_batch,
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
            trt_cache_dir=cache_root(cfg.inference.cache_dir) / "trt",
        ),
        overlay_alpha=cfg.output.overlay_alpha,
        colormap=cfg.output.colormap,
        png_dir=str(cfg.output.png_dir) if cfg.output.png_dir else None,
        png_heads=cfg.output.png_heads,
        decode_threads=cfg.data.decode_threads,
        reader=images.reader,
        store_options=store_options,
        run_id=run_id,
        weights_digest=loaded.weights_digest,
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


def _say_what_overwrite_discards(
    store_path: Any, store_options: dict[str, Any], fingerprint: str
) -> None:
    """`--overwrite` (or `output.overwrite: true` left in a config) starts over: say what it
    discards, and when the store was this very run's, that a plain rerun would resume it."""
    try:
        ok, failed, _pending = store_counts(store_path, store_options)
        same = readable_attrs(store_path, store_options).get("fingerprint") == fingerprint
    except Exception:  # noqa: BLE001 - a damaged store (no status) is replaced all the same
        log.warning("%s: replacing it (--overwrite / output.overwrite)", store_path)
        return
    log.warning(
        "%s: replacing it (--overwrite / output.overwrite): %d finished images discarded%s",
        store_path,
        ok + failed,
        "; it was made by this same config, so without overwrite the run would resume it"
        if same and ok + failed
        else "",
    )


def _drop_stats_written_later(
    group: zarr.Group, spec: StoreSpec, store_path: Any, store_options: dict[str, Any]
) -> None:
    """Statistics that `vit-attn stats --write` added to a finished store are not outputs of
    the run: its batches cannot write them, and images redone now would leave them stale. They
    are derived from the stored attention, so they are dropped (with a line saying so) and can
    be written again when the run is done."""
    made = {a.name for a in spec.layout()}
    stored = set(group.array_keys())  # one listing (a request on object storage)
    added = [n for n in STAT_NAMES if n in stored and n not in made]
    if not added:
        return
    drop_arrays(group, added, store_path, store_options)
    if made.isdisjoint(STAT_NAMES) and "stat_units" in group.attrs:
        del group.attrs["stat_units"]
    log.warning(
        "%s: dropped the statistics `vit-attn stats --write` added (%s), since images are to "
        "be done again and they would go stale; write them again when the run is done",
        store_path,
        ", ".join(added),
    )


def _local_inputs(source: str, images: ImageList, png_dir: Path) -> list[str]:
    """What of the run's own input lies under png_dir, for `remove_our_pngs` to leave: the
    scanned folder, or the listed files (a list file's entries may lie anywhere)."""
    if images.reader is not None or is_url(source):
        return []
    folder = listed_folder(source)
    if folder is not None:
        return [str(folder)]
    base = os.path.realpath(png_dir)
    files = (os.path.realpath(images.absolute(i)) for i in range(len(images)))
    return [f for f in files if f.startswith(base + os.sep)]


@contextlib.contextmanager
def _naming(store_path: Path | str) -> Iterator[None]:
    """Name the store in an OS error zarr raised without a file name (a full disk while a
    resume rewrites the root: "No space left on device", and no word of where)."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise StoreError(
            f"{store_path}: cannot update the store ({describe_os_error(exc)}); nothing done "
            "so far is lost: free the space (or fix the permissions) and run again"
        ) from None


def _changed_inputs(
    path: Path | str, images: ImageList, ids: Identities, redo: bool, storage_options: Any = None
) -> list[int]:
    """Indices of images that changed since the store recorded them; refused unless `redo`."""
    import zarr

    old = _stored_identities(
        zarr.open_group(zarr_store(path, storage_options, read_only=True), mode="r")
    )
    if old is None:
        return []
    changed = changed_images(old, ids).tolist()
    if changed and not redo:
        shown = "; ".join(describe_change(images.paths[i], i, old, ids) for i in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        # shards and Parquet (a fingerprint `source` entry) identify an image by its file
        held = " (the shard or Parquet file holding them changed)" if images.identity else ""
        raise StoreError(
            f"{path}: {len(changed)} input images changed since the store recorded them"
            f"{held} ({shown}{more}); rerun with --redo-changed to redo exactly these images, "
            "or --overwrite to start over"
        )
    if changed:
        log.warning("redoing %d changed images", len(changed))
    return changed


def _mark_failed_for_retry(group: Any) -> None:
    """`--retry-failed`: the failed images are pending again (a file that was briefly
    unreadable, a network share that hiccupped); they fail again with their reason if the
    cause is still there."""
    idx = np.flatnonzero(run_status(group["status"]) == STATUS_FAILED)
    if not idx.size:
        log.warning("--retry-failed: no failed images to retry")
        return
    group["status"].set_orthogonal_selection((idx,), np.zeros(idx.size, dtype=np.int8))
    group["error"].set_orthogonal_selection((idx,), np.asarray([""] * idx.size, dtype=object))
    log.warning("retrying %d failed images", idx.size)


def _mark_for_redo(group: Any, changed: list[int], ids: Identities) -> None:
    """Status 0 first, then the new identity: a crash in between only redoes them again."""
    idx = np.asarray(changed)
    group["status"].set_orthogonal_selection((idx,), np.zeros(idx.size, dtype=np.int8))
    group["error"].set_orthogonal_selection((idx,), np.asarray([""] * idx.size, dtype=object))
    for name, values in ids.arrays().items():
        if name in group:
            group[name].set_orthogonal_selection((idx,), np.asarray(values)[idx])


# Fingerprint entries under the config key a user would change (the rest read as they are).
_CONFIG_KEYS = {
    "images.verify": "data.verify",
    "images.root": "data.source (its folder)",
    "outputs.layers": "attention.layers",
    "outputs.topk": "attention.topk",
    "outputs.attention": "attention.full",
    "outputs.rollout": "attention.rollout",
    "outputs.stats": "attention.stats",
    "outputs.overlays": "output.overlays",
    "outputs.overlay_alpha": "output.overlay_alpha",
    "outputs.colormap": "output.colormap",
    "outputs.attention_dtype": "output.attention_dtype",
    "model.weights_digest": "the model's weights",
    "model.grid": "the patch grid (model.img_size, model.kwargs)",
    "model.input_size": "the input size (model.img_size)",
    "source.image_column": "data.image_column",
    "source.id_column": "data.id_column",
    "source.label_key": "data.label_key",
}
# Prefixes whose entries are derived from several config keys.
_CONFIG_PREFIXES = {
    "preprocess.": "preprocessing (model.img_size, the model's pretrained config) ",
}


def _as_config_key(change: str) -> str:
    """'images.verify: "stat" -> "hash"' as 'data.verify: "stat" -> "hash"'."""
    key, sep, rest = change.partition(": ")
    if key in _CONFIG_KEYS:
        return f"{_CONFIG_KEYS[key]}{sep}{rest}"
    for prefix, words in _CONFIG_PREFIXES.items():
        if key.startswith(prefix):
            return f"{words}{key.removeprefix(prefix)}{sep}{rest}"
    return f"{key}{sep}{rest}"


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
    changes = [
        _as_config_key(c) for c in config_differences(attrs.get("fingerprint_inputs", {}), inputs)
    ]
    listed = ("images.count", "images.sha256")
    only_listing = bool(changes) and all(c.startswith(listed) for c in changes)
    if paths is not None and any(c.startswith(listed) for c in changes):
        # Name the images that came or went rather than two listing digests.
        listing = listing_changes(list(np.asarray(array(group, "image_path")[:])), paths)
        changes = [listing] + [c for c in changes if not c.startswith(listed)]
    what = "; ".join(changes) if changes else "fingerprint differs"
    advice = (
        "list the images it was made from to resume it"
        if only_listing
        else "use the config it was made with to resume"
    )
    raise StoreError(
        f"{path} holds a different run ({what}); {advice}, a new output.store, or "
        "--overwrite to replace it"
    )
