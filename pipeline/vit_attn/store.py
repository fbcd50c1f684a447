"""The Zarr v3 output store (format in docs/STORE.md): template, batch writes, status, resume.

The layout is one fact kept in one place, `StoreSpec.layout()`: every array's name, dims,
dtype, shape, chunks and shards. `create_store` builds the template from it, `write_batch`
checks batch results against the arrays on disk, and the contract test reads it back.

Concurrency model: a batch is one shard of every per-image data array and one chunk of
`status` and `error`, so each task is the only writer of the files it touches, and can
open the store by path in any process (Dask workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import operator
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.errors import ZarrUserWarning

from vit_attn.errors import ConfigError, ImageSelectionError, StoreError, first_line
from vit_attn.numbers import parse_int
from vit_attn.rawshard import raw_shard_writer
from vit_attn.remote import is_url, zarr_store
from vit_attn.roles import MAP_ARRAYS

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import xarray as xr

FORMAT = "vit-attention-store"
FORMAT_VERSION = 1
READABLE_FORMAT_VERSIONS = (1,)  # what readers accept (docs/STORE.md, "Versioning")
READER_ARRAYS = ("status", "image_path")  # what every reader needs before anything else
COORD_ARRAYS = ("layer", "head")  # what labels every map's block and head
OVERLAY_MODES = ("none", "mean", "heads")
COMPRESSIONS = ("default", "none", "zstd", "lz4")
DEFAULT_COMPRESSION = "zstd"
ATTENTION_DTYPES = ("float16", "float32")
# Arrays with an `image` dim that are not batch outputs: written at creation or by write_batch
# itself, never passed in BatchResult.arrays.
BOOKKEEPING = ("image_path", "status", "error", "image_bytes", "image_mtime_ns", "image_sha256")
IDENTITY_MODES = ("none", "stat", "hash")
STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
# image_path is written once, at creation: shards of many batches keep the file count low
# (reading every path is one read per ~64k images), chunks of one batch keep dask aligned.
_PATH_SHARD_TARGET = 65536
# A per-image array of at most this many bytes per image is one plain chunk per batch, not a
# shard of per-image chunks: zarr spends ~1-3 ms per inner chunk, far more than such a chunk's
# bytes cost (cls_attention of ViT-Ti: 1.2 KB per image; ViT-B, 12 layers: 56 KB), and reading
# one image reads at most batch x this. Larger records (full attention, overlays) keep
# per-image chunks in shards, for single-image reads.
SMALL_IMAGE_BYTES = 64 << 10
_CONSOLIDATED_WARNING = "Consolidated metadata is currently not part in the Zarr format 3"

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ArrayLayout:
    """One array of the store: what `create_store` makes and the contract test checks."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    per_batch: bool = True  # a data array written by write_batch from BatchResult.arrays


@dataclass(frozen=True)
class StoreSpec:
    """What the store holds: sizes and switches derived from the model and the config.

    Attributes:
        n_images: images in the dataset (the `image` dim).
        batch_size: images per task; fixes the shard boundaries.
        layers: stored block indices, 0-based, ascending, unique.
        num_heads, grid (gh, gw), input_size (H, W), num_tokens (prefix + gh*gw).
        topk: classes kept per image, or None when the model has no classifier.
        full_attention, rollout: optional outputs.
        overlays: 'none', 'mean' (`overlay`) or 'heads' (`overlay` and `overlay_heads`).
        stats: names of float32 per-(image, layer, head) statistic arrays.
        compression: 'default' (= 'zstd'), 'zstd', 'lz4' or 'none'.
        attention_dtype: dtype of the attention maps and `attention` ('float16' or 'float32').
        maps: which attention maps the store holds (`roles.MAP_ARRAYS`): `cls_attention`
            only for models with a class token, `pool_attention` for attention-pooled
            models, `received_attention` for the others.
        pool_latents: latent queries of the attention pool; above 1, `pool_attention` gets
            a `latent` dim.
        pool_heads: the attention pool's heads; 0, or equal to `num_heads`: `pool_attention`
            uses the `head` dim. Otherwise its own `pool_head` dim (a dataset has one length
            per dim), as do the per-head overlays when the pool's map is the default.
    """

    n_images: int
    batch_size: int
    layers: tuple[int, ...]
    num_heads: int
    grid: tuple[int, int]
    input_size: tuple[int, int]
    num_tokens: int
    topk: int | None
    full_attention: bool
    rollout: bool
    overlays: str
    stats: tuple[str, ...] = ()
    compression: str = "default"
    attention_dtype: str = "float16"
    labels: bool = False  # a `label` array (data.label_key of shard and Parquet sources)
    identity: str = "none"  # per-image input identity: 'stat' (size, mtime) or 'hash' (+ sha256)
    maps: tuple[str, ...] = ("cls_attention",)
    pool_latents: int = 1
    pool_heads: int = 0

    def __post_init__(self) -> None:
        # Sequences from YAML arrive as lists: store tuples so the spec stays hashable.
        for name in ("layers", "grid", "input_size"):
            object.__setattr__(self, name, tuple(operator.index(i) for i in getattr(self, name)))
        object.__setattr__(self, "stats", tuple(self.stats))
        object.__setattr__(self, "maps", tuple(self.maps))
        _check(
            bool(self.maps) and set(self.maps) <= set(MAP_ARRAYS),
            f"maps must be a non-empty subset of {MAP_ARRAYS}, got {list(self.maps)}",
        )
        _check(self.pool_latents >= 1, f"pool_latents must be >= 1, got {self.pool_latents}")
        _check(self.pool_heads >= 0, f"pool_heads must be >= 0, got {self.pool_heads}")
        _check(self.n_images >= 1, f"n_images must be >= 1, got {self.n_images}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(
            len(self.layers) >= 1
            and all(i >= 0 for i in self.layers)
            and all(a < b for a, b in zip(self.layers, self.layers[1:])),
            "layers must be non-negative block indices, ascending and unique, "
            f"got {list(self.layers)}",
        )
        _check(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        for name in ("grid", "input_size"):
            value = getattr(self, name)
            _check(len(value) == 2 and min(value) >= 1, f"{name} must be 2 positive ints: {value}")
        gh, gw = self.grid
        _check(self.num_tokens >= gh * gw, f"num_tokens {self.num_tokens} < {gh * gw} patches")
        _check(self.topk is None or self.topk >= 1, f"topk must be None or >= 1, got {self.topk}")
        for name, allowed in (
            ("overlays", OVERLAY_MODES),
            ("compression", COMPRESSIONS),
            ("attention_dtype", ATTENTION_DTYPES),
            ("identity", IDENTITY_MODES),
        ):
            value = getattr(self, name)
            _check(value in allowed, f"{name} must be one of {allowed}, got {value!r}")
        taken = {a.name for a in self._fixed_layout()}
        for stat in self.stats:
            _check(stat.isidentifier(), f"stat name {stat!r} is not an identifier")
            _check(stat not in taken, f"stat name {stat!r} clashes with an array of the store")
        _check(len(set(self.stats)) == len(self.stats), f"stat names repeat: {list(self.stats)}")

    @property
    def pool_head_dim(self) -> str:
        """The head dim of `pool_attention`: `pool_head` when the pool has its own count."""
        own = "pool_attention" in self.maps and self.pool_heads not in (0, self.num_heads)
        return "pool_head" if own else "head"

    @property
    def overlay_head_dim(self) -> str:
        """The head dim of `overlay_heads`: that of the default map (the first of `maps`)."""
        return self.pool_head_dim if self.maps[0] == "pool_attention" else "head"

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_images / self.batch_size)

    def batch_bounds(self, batch_index: int) -> tuple[int, int]:
        """[start, stop) of batch `batch_index`: the last batch may be shorter."""
        if not 0 <= batch_index < self.n_batches:
            raise IndexError(f"batch {batch_index} out of range 0..{self.n_batches - 1}")
        start = batch_index * self.batch_size
        return start, min(start + self.batch_size, self.n_images)

    def layout(self) -> tuple[ArrayLayout, ...]:
        """Every array of the store, in a stable order."""
        stats = tuple(self._per_image(s, ("layer", "head"), "float32", False) for s in self.stats)
        return self._fixed_layout() + stats

    def data_arrays(self) -> tuple[str, ...]:
        """Names a BatchResult must carry."""
        return tuple(a.name for a in self.layout() if a.per_batch)

    def dim_sizes(self) -> dict[str, int]:
        """The length of every named dimension of the store."""
        gh, gw = self.grid
        h, w = self.input_size
        sizes = {
            "image": self.n_images,
            "layer": len(self.layers),
            "head": self.num_heads,
            "y": gh,
            "x": gw,
            "query": self.num_tokens,
            "key": self.num_tokens,
            "pixel_y": h,
            "pixel_x": w,
            "channel": 3,
        }
        if self.pool_latents > 1:
            sizes["latent"] = self.pool_latents
        if self.pool_head_dim == "pool_head":
            sizes["pool_head"] = self.pool_heads
        if self.topk is not None:
            sizes["k"] = self.topk
        return sizes

    def _per_image(self, name: str, dims: tuple[str, ...], dtype: str, shard: bool) -> ArrayLayout:
        """A data array over (image, *dims): one shard per batch, one chunk per image inside.

        Small per-image records (top-k, stats, and CLS maps or rollout up to SMALL_IMAGE_BYTES
        per image) are not sharded: one plain chunk per batch has the same single writer and
        the same boundary, with one file instead of an index and per-image chunks.
        """
        sizes = self.dim_sizes()
        inner = tuple(sizes[d] for d in dims)
        shape, batch = (self.n_images, *inner), (self.batch_size, *inner)
        image_bytes = math.prod(inner) * np.dtype(dtype).itemsize
        if shard and image_bytes > SMALL_IMAGE_BYTES:
            return ArrayLayout(name, ("image", *dims), dtype, shape, (1, *inner), batch)
        return ArrayLayout(name, ("image", *dims), dtype, shape, batch, None)

    def _fixed_layout(self) -> tuple[ArrayLayout, ...]:
        n, bs, nl, nh = self.n_images, self.batch_size, len(self.layers), self.num_heads
        path_shard = bs * min(max(1, _PATH_SHARD_TARGET // bs), self.n_batches)
        arrays = [
            ArrayLayout("image_path", ("image",), "str", (n,), (bs,), (path_shard,), False),
            *([self._per_image("label", (), "int64", False)] if self.labels else []),
            # Written per batch by different processes: the chunk is exactly one batch.
            ArrayLayout("status", ("image",), "int8", (n,), (bs,), None, False),
            ArrayLayout("error", ("image",), "str", (n,), (bs,), None, False),
            ArrayLayout("layer", ("layer",), "int32", (nl,), (nl,), None, False),
            ArrayLayout("head", ("head",), "int32", (nh,), (nh,), None, False),
        ]
        if self.pool_head_dim == "pool_head":
            ph = self.pool_heads
            arrays.append(
                ArrayLayout("pool_head", ("pool_head",), "int32", (ph,), (ph,), None, False)
            )
        # The input files' identity, written at creation (and by a resume that redoes changed
        # images, before any task runs): laid out like image_path.
        if self.identity != "none":
            for name, dtype in (("image_bytes", "int64"), ("image_mtime_ns", "int64")):
                arrays.append(
                    ArrayLayout(name, ("image",), dtype, (n,), (bs,), (path_shard,), False)
                )
        if self.identity == "hash":
            arrays.append(
                ArrayLayout("image_sha256", ("image",), "str", (n,), (bs,), (path_shard,), False)
            )
        # (wanted, name, dims after `image`, dtype, sharded)
        per_image: list[tuple[bool, str, tuple[str, ...], str, bool]] = [
            (self.topk is not None, "topk_index", ("k",), "int32", False),
            (self.topk is not None, "topk_prob", ("k",), "float32", False),
            (
                "cls_attention" in self.maps,
                "cls_attention",
                ("layer", "head", "y", "x"),
                self.attention_dtype,
                True,
            ),
            (
                "pool_attention" in self.maps,
                "pool_attention",
                (("latent",) if self.pool_latents > 1 else ()) + (self.pool_head_dim, "y", "x"),
                self.attention_dtype,
                True,
            ),
            (
                "received_attention" in self.maps,
                "received_attention",
                ("layer", "head", "y", "x"),
                self.attention_dtype,
                True,
            ),
            (
                self.full_attention,
                "attention",
                ("layer", "head", "query", "key"),
                self.attention_dtype,
                True,
            ),
            (self.rollout, "rollout", ("y", "x"), "float32", True),
            (self.overlays != "none", "overlay", ("pixel_y", "pixel_x", "channel"), "uint8", True),
            (
                self.overlays == "heads",
                "overlay_heads",
                (self.overlay_head_dim, "pixel_y", "pixel_x", "channel"),
                "uint8",
                True,
            ),
        ]
        arrays += [
            self._per_image(name, dims, dtype, shard)
            for wanted, name, dims, dtype, shard in per_image
            if wanted
        ]
        return tuple(arrays)


def array(group: zarr.Group, name: str) -> zarr.Array:
    """`group[name]` as an array; a store missing it (or holding a group there) is not ours."""
    try:
        node = group[name]
    except KeyError:
        raise StoreError(
            f"{group.store} has no array {name!r}; is it a vit-attention-store?"
        ) from None
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.store}: {name!r} is not an array; is it a vit-attention-store?")
    return node


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid store spec: {message}")


@dataclass
class BatchResult:
    """One task's output: data for images [start, stop), already in store dtypes and dims.

    `status` holds 1 (ok) or 2 (failed) per image; a failed image's data is zeros (write_batch
    enforces it) and its `error` says why.
    """

    batch_index: int
    start: int
    stop: int
    status: np.ndarray
    error: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def empty_batch(spec: StoreSpec, batch_index: int) -> BatchResult:
    """A zero-filled BatchResult for one batch, every image marked failed with no message.

    Tasks fill it in place: the shapes and dtypes are the store's, so nothing is cast twice.
    """
    start, stop = spec.batch_bounds(batch_index)
    n = stop - start
    arrays = {
        a.name: np.zeros((n, *a.shape[1:]), dtype=a.dtype) for a in spec.layout() if a.per_batch
    }
    return BatchResult(
        batch_index, start, stop, np.full(n, STATUS_FAILED, np.int8), [""] * n, arrays
    )


# --------------------------------------------------------------------------- codecs


def _compressors(compression: str, dtype: str) -> list[Any] | None:
    """The compressors of one array (inside the shard for sharded arrays).

    zstd level 1 is the measured default (benchmarks/compression.py, docs/STORE.md): ~1.3x smaller
    than raw at ~60% of its write speed, and a core Zarr v3 codec that every reader has.
    lz4 with bitshuffle (Blosc) is the faster, weaker alternative. By default the uint8
    overlays are stored raw: they are pictures re-made from the maps, zstd gains them 1.2-1.35x
    for ~10 ms per image of per-head overlays, the largest write cost of a run
    (benchmarks/write.py); `zstd` compresses them too.
    """
    if compression == "default":
        if dtype == "uint8":
            return None
        compression = DEFAULT_COMPRESSION
    if compression == "none":
        return None
    if compression == "lz4" and dtype != "str":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    return [ZstdCodec(level=1)]


# --------------------------------------------------------------------------- create / open


def _read_root_metadata(
    path: PathLike, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The root zarr.json of `path` as a dict, or None when it is not a Zarr v3 group."""
    if is_url(path):
        from vit_attn.store_remote import read_root_text

        text = read_root_text(str(path), storage_options)
    else:
        try:
            text = (Path(path) / "zarr.json").read_text()
        except OSError:
            return None
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    if isinstance(meta, dict) and meta.get("node_type") == "group" and meta.get("zarr_format") == 3:
        return meta
    return None


def is_store(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether `path` holds a store of this format (any version): only those may be deleted."""
    meta = _read_root_metadata(path, storage_options)
    return meta is not None and meta.get("attributes", {}).get("format") == FORMAT


def stored_batch_size(
    path: PathLike, storage_options: Mapping[str, Any] | None = None
) -> int | None:
    """The batch size an existing store was made with (its chunking: from the config it keeps),
    or None if there is no such store (or it does not say)."""
    meta = _read_root_metadata(path, storage_options)
    attrs = (meta or {}).get("attributes", {})
    if attrs.get("format") != FORMAT:
        return None
    size = ((attrs.get("config") or {}).get("inference") or {}).get("batch_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def missing_arrays(
    path: PathLike, names: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Those of `names` whose array metadata is absent at `path` (a damaged store).

    Looks at the files themselves: consolidated metadata would still list a deleted array.
    """
    store = zarr_store(path, storage_options, read_only=True)
    return [n for n in names if _metadata_readable(store, f"{n}/zarr.json") is False]


def _metadata_readable(store: Any, key: str) -> bool | None:
    """Whether `key` is there and parses as JSON (a cut-short zarr.json is damage too: the
    consolidated copy hides it from readers, but a run's closing consolidation fails on it).
    None where the store cannot say."""
    if isinstance(store, str | os.PathLike):
        try:
            json.loads((Path(store) / key).read_bytes())
        except (OSError, ValueError):
            return False
        return True
    get = getattr(store, "get", None)
    if get is None:
        return _key_exists(store, key)
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        found = sync(get(key, prototype=default_buffer_prototype()))
    except Exception:  # noqa: BLE001 - a store that cannot answer: cannot tell
        return None
    if found is None:
        return False
    try:
        json.loads(found.to_bytes())
    except ValueError:
        return False
    return True


def check_arrays_present(
    path: PathLike, names: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> None:
    """StoreError naming the arrays of `names` that are missing from the store at `path`."""
    missing = missing_arrays(path, names, storage_options)
    if missing:
        raise StoreError(
            f"{path} is damaged: its array{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing (or "
            f"{'their' if len(missing) > 1 else 'its'} zarr.json unreadable); rebuild it "
            "with `vit-attn run CONFIG --overwrite` (or restore the missing folders)"
        )


def readable_attrs(
    path: PathLike, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The root attributes of a store this version can read; else one-line StoreError.

    Every reader (the API, inspect, show, stats, the viewer) opens through this check, so a
    folder that is not a store, or a store written in a format_version this code does not
    know (a newer vit-attn's), is refused instead of read with the wrong meaning.
    """
    meta = _read_root_metadata(path, storage_options)
    attrs = (meta or {}).get("attributes", {})
    if meta is None or attrs.get("format") != FORMAT:
        damaged = _unreadable_root(path)
        if damaged:
            raise StoreError(
                f"{path} looks like a store whose root metadata is damaged ({damaged}); "
                "restore its zarr.json from a copy"
            )
        raise StoreError(
            f"{path} is not a vit-attention store (no such folder, or not made by vit-attn run)"
        )
    version = attrs.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise StoreError(
            f"{path} has format_version {version!r}; this vit-attn reads "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}: open it with the vit-attn "
            "version that wrote it (its `versions` attribute names it), or a newer one"
        )
    # The coordinates too, where the consolidated metadata lists them: without their own
    # metadata zarr reads them as fill values (block 0 for every stored layer), not an error.
    listed = ((meta or {}).get("consolidated_metadata") or {}).get("metadata") or {}
    coords = [name for name in COORD_ARRAYS if name in listed]
    check_arrays_present(path, (*READER_ARRAYS, *coords), storage_options)
    return dict(attrs)


def create_store(
    path: PathLike,
    spec: StoreSpec,
    image_paths: Sequence[str],
    attrs: Mapping[str, Any],
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    initial: Mapping[str, np.ndarray] | None = None,
) -> zarr.Group:
    """Create the empty store template at `path` and return it open for writing.

    `initial` fills bookkeeping arrays (e.g. the input identity) in the template itself.

    Built in a hidden sibling folder and renamed into place, so an interrupted creation never
    leaves a half-made store that looks like ours. Refuses to touch anything that is not a
    store of this format, and an existing store unless `overwrite` (use
    `open_store_for_resume` to continue one). A URL is written through fsspec instead
    (`vit_attn.store_remote`), where a rename is no atomic step.
    """
    if len(image_paths) != spec.n_images:
        raise ValueError(f"{len(image_paths)} image paths for a spec of {spec.n_images} images")
    reserved = {"format", "format_version"} & set(attrs)
    if reserved:
        raise ValueError(f"attrs must not set {sorted(reserved)}: the store sets them")
    if is_url(path):
        from vit_attn.store_remote import create_remote

        group = create_remote(str(path), spec, image_paths, attrs, overwrite, storage_options)
        for name, values in (initial or {}).items():
            array(group, name)[:] = values
        return group
    path = Path(os.path.realpath(path))  # a symlinked store path: work on the real folder
    replace = _check_target(path, overwrite)
    try:
        return _create(path, spec, image_paths, attrs, replace, initial or {})
    except OSError as exc:
        if isinstance(exc, StoreError):
            raise
        where = exc.filename or path
        raise StoreError(
            f"cannot create the store {path}: {where}: {exc.strerror or exc}; nothing was kept"
        ) from None


def _create(
    path: Path,
    spec: StoreSpec,
    image_paths: Sequence[str],
    attrs: Mapping[str, Any],
    replace: bool,
    initial: Mapping[str, np.ndarray],
) -> zarr.Group:
    path.parent.mkdir(parents=True, exist_ok=True)
    # An existing empty folder (possibly a mount point, which cannot be replaced by a rename)
    # is filled in place: the template is built inside it and moved up, zarr.json last.
    in_place = not replace and path.is_dir()
    tmp = (path if in_place else path.parent) / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        group = zarr.create_group(
            str(tmp), attributes={"format": FORMAT, "format_version": FORMAT_VERSION, **attrs}
        )
        populate(group, spec, image_paths)
        for name, values in initial.items():
            array(group, name)[:] = values
        if in_place:
            names = sorted(os.listdir(tmp), key=lambda n: n == "zarr.json")
            for name in names:
                os.replace(tmp / name, path / name)
            tmp.rmdir()
        else:
            if replace:
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if in_place and not is_store(path):
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return zarr.open_group(str(path), mode="r+")


def remove_stale_templates(path: PathLike, older_than: float) -> None:
    """Templates a creation killed before its rename left (`.NAME.tmp-XXXXXXXX` beside the
    store, or inside an empty folder filled in place), untouched for `older_than` seconds.

    For runs, which call it holding the store's lock with the lock's `stale_after`: a
    template that old belongs to a run whose lock would have been taken over anyway.
    """
    if is_url(path):
        return
    path = Path(path)
    name = re.compile(rf"\.{re.escape(path.name)}\.tmp-[0-9a-f]{{8}}")
    now = time.time()
    for folder in (path.parent, path):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not (name.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if age > older_than:
                shutil.rmtree(entry.path, ignore_errors=True)
                log.info("removed %s, a store template a stopped run left", entry.path)


def populate(group: zarr.Group, spec: StoreSpec, image_paths: Sequence[str]) -> None:
    """Create every array of the layout in `group`, with coordinates and image paths."""
    for a in spec.layout():
        group.create_array(
            a.name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=a.chunks,
            shards=a.shards,
            compressors=_compressors(spec.compression, a.dtype),
            fill_value="" if a.dtype == "str" else 0,
            dimension_names=a.dims,
        )
    array(group, "layer")[:] = np.asarray(spec.layers, dtype=np.int32)
    array(group, "head")[:] = np.arange(spec.num_heads, dtype=np.int32)
    if spec.pool_head_dim == "pool_head":
        array(group, "pool_head")[:] = np.arange(spec.pool_heads, dtype=np.int32)
    array(group, "image_path")[:] = np.asarray([str(p) for p in image_paths], dtype=object)


def _check_target(path: Path, overwrite: bool) -> bool:
    """Whether an existing store must be replaced; raises when `path` may not be used."""
    if not path.exists():
        return False
    if is_store(path):
        if overwrite:
            return True
        raise StoreError(
            f"{path} already holds a {FORMAT}; resume it with the same config, "
            "or pass overwrite to replace it"
        )
    if path.is_dir() and not any(path.iterdir()):
        return False
    damaged = _unreadable_root(path)
    if damaged:
        raise StoreError(
            f"{path} looks like a store whose root metadata is damaged ({damaged}); nothing "
            "was changed: restore zarr.json from a copy, or delete the folder yourself and run "
            "again"
        )
    raise StoreError(
        f"{path} exists and is not a {FORMAT}; refusing to overwrite what is not ours: if it "
        "is the remains of a deleted store, delete it yourself; else choose another output.store"
    )


def _unreadable_root(path: PathLike) -> str | None:
    """Why a local folder with a `zarr.json` and a `status` array cannot be read as a store
    (its root zarr.json cut short or overwritten), else None."""
    if is_url(path):
        return None
    root = Path(path) / "zarr.json"
    if not root.is_file() or not (Path(path) / "status" / "zarr.json").is_file():
        return None
    try:
        meta = json.loads(root.read_bytes())
    except (OSError, ValueError) as exc:
        return f"{root}: {first_line(exc)}"
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return f"{root} is not a Zarr group's metadata"
    return None


def open_store_for_resume(
    path: PathLike,
    fingerprint: str,
    config: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Open an existing store to continue it: only with the fingerprint it was created with.

    `config` (the new run's resolved config) lets the refusal name what changed, e.g.
    "attention.layers: [11] -> [10, 11]", instead of two opaque digests.
    """
    path = path if is_url(path) else Path(path)
    meta = _read_root_metadata(path, storage_options)
    attrs = (meta or {}).get("attributes", {})
    if meta is None or attrs.get("format") != FORMAT:
        gone = meta is None if isinstance(path, str) else not Path(path).exists()
        what = "does not exist" if gone else f"is not a {FORMAT}"
        raise StoreError(f"cannot resume {path}: it {what}")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"cannot resume {path}: format_version {attrs.get('format_version')}, "
            f"this version writes {FORMAT_VERSION}"
        )
    old = attrs.get("fingerprint")
    if old != fingerprint:
        changes = config_differences(attrs.get("config"), config) if config is not None else []
        what = "; ".join(changes) if changes else f"fingerprint {old} -> {fingerprint}"
        raise StoreError(
            f"{path} was written with a different configuration ({what}); "
            "use the same config to resume, or overwrite"
        )
    return zarr.open_group(zarr_store(path, storage_options), mode="r+")


def config_differences(old: Any, new: Any, limit: int = 3, _prefix: str = "") -> list[str]:
    """The first `limit` differing keys of two nested config dicts, as 'a.b: old -> new'."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            if len(out) >= limit:
                break
            name = f"{_prefix}.{key}" if _prefix else str(key)
            if key not in new:
                out.append(f"{name}: {_show(old[key])} -> (absent)")
            elif key not in old:
                out.append(f"{name}: (absent) -> {_show(new[key])}")
            else:
                out += config_differences(old[key], new[key], limit - len(out), name)
        return out
    if _normalise(old) == _normalise(new):
        return []
    return [f"{_prefix or '(config)'}: {_show(old)} -> {_show(new)}"]


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal: the stored config went through JSON."""
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


# --------------------------------------------------------------------------- batches


def pending_batches(group: zarr.Group, spec: StoreSpec) -> list[int]:
    """Indices of the batches that still have an image with status 0 (not processed)."""
    status = array(group, "status")
    if status.shape != (spec.n_images,) or status.chunks != (spec.batch_size,):
        raise StoreError(
            f"store status has shape {status.shape} and chunks {status.chunks}; "
            f"the spec expects ({spec.n_images},) in batches of {spec.batch_size}"
        )
    values = np.ones(spec.n_batches * spec.batch_size, dtype=np.int8)
    values[: spec.n_images] = run_status(status)
    pending = (values.reshape(spec.n_batches, spec.batch_size) == STATUS_PENDING).any(axis=1)
    return np.flatnonzero(pending).tolist()


def read_status(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """The whole `status` array of a store, as a run resumes it (`run_status`)."""
    store = zarr_store(path, storage_options, read_only=True)
    return run_status(zarr.open_array(store, path="status", mode="r"))


def _status_chunks(arr: Any) -> tuple[np.ndarray, list[int]]:
    """`status` read whole, or chunk by chunk when a file cannot be decoded (garbage, cut
    short): those chunks' images read as pending. Returns the values and the bad chunks."""
    try:
        return np.asarray(arr[:]), []
    except Exception:  # noqa: BLE001 - codecs and checksums raise unrelated types
        pass
    per = int(arr.chunks[0])
    values = np.zeros(arr.shape, dtype=np.int8)
    bad: list[int] = []
    for c in range(math.ceil(arr.shape[0] / per)):
        try:
            values[c * per : (c + 1) * per] = arr[c * per : (c + 1) * per]
        except Exception:  # noqa: BLE001 - as above
            bad.append(c)
    return values, bad


def run_status(arr: Any) -> np.ndarray:
    """`status` for a run: an unreadable chunk's images are pending, so the resume redoes
    their batch (and rewrites the file) instead of failing on it, and says so."""
    values, bad = _status_chunks(arr)
    if bad:
        log.warning(
            "the status file of %d batch%s (first: %s) cannot be read; doing %s again",
            len(bad),
            "es" if len(bad) > 1 else "",
            arr.metadata.encode_chunk_key((bad[0],)),
            "them" if len(bad) > 1 else "it",
        )
    return values


def reader_status(arr: Any, store: PathLike) -> np.ndarray:
    """`status` for a reader: an unreadable chunk is one StoreError naming its file."""
    values, bad = _status_chunks(arr)
    if bad:
        key = arr.metadata.encode_chunk_key((bad[0],))
        raise StoreError(
            f"{store} is damaged: its status file {key} (of {len(bad)} unreadable) cannot be "
            "decoded; `vit-attn run CONFIG` redoes the batches whose status is lost"
        )
    return values


def store_counts(
    path: PathLike, storage_options: Mapping[str, Any] | None = None
) -> tuple[int, int, int]:
    """Images at status ok, failed and pending, as the store holds them."""
    status = read_status(path, storage_options)
    ok, failed, pending = (
        int((status == s).sum()) for s in (STATUS_OK, STATUS_FAILED, STATUS_PENDING)
    )
    return ok, failed, pending


def _write_region(array: zarr.Array, start: int, stop: int, data: np.ndarray) -> None:
    """Write rows [start, stop) of one array (one whole shard or chunk)."""
    writer = raw_shard_writer(array)
    if writer is not None and writer.write(start, stop, data):
        return  # the same bytes zarr would write, without its per-chunk pipeline (rawshard.py)
    array[start:stop] = data


def write_batch(
    group_or_path: zarr.Group | PathLike,
    result: BatchResult,
    run_id: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write one batch: data arrays, then `error`, then `status` last.

    A crash before the final status write leaves status 0, so the batch is redone on resume:
    status 1 always means the data is there. Accepts a path so a worker process opens the
    store itself (a Group does not travel between processes cheaply). With `run_id`, the
    store must still belong to that run, checked before the data and again before `status`:
    a writer of a stalled run whose store was replaced (or taken over) never writes into it.
    """
    group: zarr.Group | None = None
    if isinstance(group_or_path, zarr.Group):
        group = group_or_path
        arrays = {n: _for_writing(a) for n, a in group.arrays()}
    elif is_url(group_or_path):
        group = zarr.open_group(zarr_store(group_or_path, storage_options), mode="r+")
        arrays = {n: _for_writing(a) for n, a in group.arrays()}
    else:
        arrays = _arrays_for_writing(group_or_path)
    if run_id is not None:
        _check_run(_current_run_id(group_or_path, group), run_id, group_or_path, result.batch_index)
    status, data = _checked_batch(arrays, result)  # everything checked before any write
    regions = [(arrays[name], values) for name, values in data.items()]
    regions.append((arrays["error"], np.asarray(result.error, dtype=object)))
    _write_regions(regions, result.start, result.stop)
    if run_id is not None:
        try:
            _check_run(
                _current_run_id(group_or_path, group),
                run_id,
                group_or_path,
                result.batch_index,
                outcome="may have left its data over that run's; its status is now 0, so a "
                "resume redoes it",
            )
        except StoreTakenError:
            # Taken over while this writer was stalled between its first check and its data:
            # that data may now sit under the other run's status 1. Status 0 makes a resume
            # redo these images; the other run's own later write of them is right either way.
            _reset_status(arrays["status"], result.start, result.stop)
            raise
    _write_region(arrays["status"], result.start, result.stop, status)


def _reset_status(status: zarr.Array, start: int, stop: int) -> None:
    """Best effort: status 0 for rows [start, stop) of a store this writer no longer owns."""
    with contextlib.suppress(Exception):  # a replaced store may not even have these rows
        if stop <= status.shape[0]:
            _write_region(status, start, stop, np.zeros(stop - start, dtype=np.int8))


def _current_run_id(path: Any, group: zarr.Group | None) -> Any:
    """The store's `run_id` as it is now on disk (another run may have replaced the store)."""
    if group is not None:
        return zarr.open_group(group.store, path=group.path, mode="r").attrs.get("run_id")
    try:
        with open(os.path.join(os.fspath(path), "zarr.json"), "rb") as f:
            return json.loads(f.read()).get("attributes", {}).get("run_id")
    except (OSError, ValueError):
        return None


class StoreTakenError(StoreError):
    """The store now belongs to another run: this run's writers must stop."""


def _check_run(
    current: Any, run_id: str, where: Any, batch: int, outcome: str = "was not written"
) -> None:
    if current != run_id:
        raise StoreTakenError(
            f"{where} now belongs to run {current}, not to this run {run_id} (replaced or taken "
            f"over while this run was stalled); batch {batch} {outcome}"
        )


def _write_regions(regions: list[tuple[zarr.Array, np.ndarray]], start: int, stop: int) -> None:
    """Write rows [start, stop) of several arrays; the ones zarr writes in one event-loop trip.

    Each synchronous zarr write is a round trip to zarr's event-loop thread (~1 ms of CPU
    here); a batch writes five or more small arrays, which made small batches cost several
    times more per image than large ones.
    """
    rest = []
    for array, values in regions:
        writer = raw_shard_writer(array)
        if writer is None or not writer.write(start, stop, values):
            rest.append((array, values))
    if len(rest) <= 1:
        for array, values in rest:
            array[start:stop] = values
        return
    from zarr.core.sync import sync

    async def write_all() -> None:
        await asyncio.gather(*(a.async_array.setitem(slice(start, stop), v) for a, v in rest))

    sync(write_all())


def _for_writing(array: zarr.Array) -> zarr.Array:
    # zarr's default skips chunks equal to the fill value, which means comparing every element
    # of every chunk: a third of the write time of an overlay batch. Writing them is cheaper.
    return array.with_config({"write_empty_chunks": True})


_open_arrays: dict[str, tuple[tuple[int, int, int], dict[str, zarr.Array]]] = {}
_open_lock = threading.Lock()


def _arrays_for_writing(path: PathLike) -> dict[str, zarr.Array]:
    """The store's arrays, opened once per process and store (opening and reading every
    array's metadata costs more than writing a small batch), reopened when the root metadata
    file changes: a store replaced by `--overwrite` is a new file."""
    key = os.path.abspath(path)
    try:
        st = os.stat(os.path.join(key, "zarr.json"))
    except OSError:
        st = None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else None
    with _open_lock:
        hit = _open_arrays.get(key)
        if stamp is not None and hit is not None and hit[0] == stamp:
            return hit[1]
    group = zarr.open_group(str(path), mode="r+")
    arrays = {n: _for_writing(a) for n, a in group.arrays()}
    if stamp is not None:
        with _open_lock:
            _open_arrays.clear()  # one store per process at a time
            _open_arrays[key] = (stamp, arrays)
    return arrays


def _checked_batch(
    arrays: Mapping[str, zarr.Array], result: BatchResult
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Status and data of `result` validated against the store; failed images zeroed."""
    where = f"batch {result.batch_index}"
    n_images, batch_size = arrays["status"].shape[0], arrays["status"].chunks[0]
    start = result.batch_index * batch_size
    stop = min(start + batch_size, n_images)
    if (result.start, result.stop) != (start, stop) or start >= stop:
        raise StoreError(
            f"{where} must cover images [{start}, {stop}) to match the store's shards, "
            f"got [{result.start}, {result.stop})"
        )
    n = stop - start
    status = np.asarray(result.status, dtype=np.int8)
    if status.shape != (n,) or len(result.error) != n:
        raise StoreError(f"{where}: status and error need {n} entries each")
    if not np.isin(status, (STATUS_OK, STATUS_FAILED)).all():
        raise StoreError(f"{where}: status must be 1 (ok) or 2 (failed)")

    names = sorted(k for k, a in arrays.items() if _is_data_array(k, a))
    missing = sorted(set(names) - set(result.arrays))
    unknown = sorted(set(result.arrays) - set(names))
    if missing or unknown:
        raise StoreError(
            f"{where} does not match the store: the store has arrays the batch lacks {missing}, "
            f"the batch has arrays the store lacks {unknown}"
        )
    failed = status == STATUS_FAILED
    data = {}
    for name in names:
        values = np.asarray(result.arrays[name], dtype=arrays[name].dtype)
        want = (n, *arrays[name].shape[1:])
        if values.shape != want:
            raise StoreError(f"{where}: {name} has shape {values.shape}, the store needs {want}")
        if failed.any() and values[failed].any():
            values = values.copy()  # the caller's buffer stays as it was
            values[failed] = 0
        data[name] = values
    return status, data


def _is_data_array(name: str, arr: zarr.Array) -> bool:
    dims: tuple[str | None, ...] = getattr(arr.metadata, "dimension_names", None) or ()
    return bool(dims) and dims[0] == "image" and name not in BOOKKEEPING


# --------------------------------------------------------------------------- finish / read


def consolidate(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write consolidated metadata, so readers open the store with one small read.

    zarr warns that consolidated metadata is not (yet) in the v3 spec; zarr-python and xarray
    read it, and readers without it fall back to the per-array metadata, which stays valid.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONSOLIDATED_WARNING, category=ZarrUserWarning)
        zarr.consolidate_metadata(zarr_store(path, storage_options))


def drop_arrays(
    group: zarr.Group,
    names: Sequence[str],
    path: PathLike,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Delete arrays from a store, and from its consolidated metadata where it has some (a
    reader of that metadata would otherwise still open them)."""
    for name in names:
        del group[name]
    if is_consolidated(path, storage_options):
        consolidate(path, storage_options)


def is_consolidated(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the root metadata carries consolidated metadata."""
    meta = _read_root_metadata(path, storage_options)
    return bool(meta and meta.get("consolidated_metadata"))


def open_dataset(
    path: PathLike,
    chunks: str | Mapping[str, int] | None = "batch",
    storage_options: Mapping[str, Any] | None = None,
    check_files: bool = True,
) -> xr.Dataset:
    """The store as a lazy xarray.Dataset with named dims and `layer`/`head` coordinates;
    finished images whose store files are gone read as failed, with a StoreDamageWarning
    (`check_files=False`: for a caller that makes that check itself).

    chunks="batch" gives one dask chunk per batch (= one shard): xarray's default would be
    one task per image per array, too many for a large dataset. Other values go to xarray.
    Consolidated metadata is asked for only where it exists: xarray's consolidated=None
    falls back with a RuntimeWarning on a store that is not (yet) consolidated.
    """
    import xarray as xr  # only readers need it: workers that write never import it

    readable_attrs(path, storage_options)
    store = zarr_store(path, storage_options, read_only=True)
    dask_chunks: Any = chunks
    if chunks == "batch":
        status = zarr.open_array(store, path="status", mode="r")
        dask_chunks = {"image": status.chunks[0]}
    consolidated = is_consolidated(path, storage_options)
    ds = xr.open_zarr(store, consolidated=consolidated, zarr_format=3, chunks=dask_chunks)
    if not check_files:
        return ds
    return _damaged_as_failed(ds, zarr.open_group(store, mode="r"), path)


class StoreDamageWarning(UserWarning):
    """Finished images of an opened store have lost store files (see `open_dataset`)."""


def _damaged_as_failed(ds: xr.Dataset, group: zarr.Group, path: PathLike) -> xr.Dataset:
    """`ds` with finished images whose store files are gone at status 2 (failed), and a
    warning naming them: their data would read as zarr's fill values, zeros that
    `ok_images` and `summarise` would take for results. Costs a read of `status` and one
    listing per array."""
    import xarray as xr

    if "status" not in group:
        return ds
    status = reader_status(group["status"], path)
    found = images_missing_files(group, status)
    if not found:
        return ds
    warnings.warn(
        StoreDamageWarning(
            f"{path} is damaged: finished images have lost their store files "
            f"({describe_missing_files(found)}); they read as status 2 (failed) here, their "
            "data as fill values; `vit-attn run CONFIG` redoes them"
        ),
        stacklevel=3,
    )
    shown = status.copy()
    shown[list(arrays_lost_by_image(found))] = STATUS_FAILED
    return ds.assign(status=xr.DataArray(shown, dims=ds["status"].dims, attrs=ds["status"].attrs))


def read_rows(
    arr: Any, selection: Any, name: str, image: int | str, written: bool = False
) -> np.ndarray:
    """`arr[selection]` as numpy; a chunk that cannot be decoded (a damaged or truncated store
    file: codec and checksum errors have no common base class) is one StoreError naming the
    array and the image, not a codec traceback.

    `written`: the caller knows the image's status is 1, so its chunk must exist; a missing
    file (zarr would read it as fill values: zeros that look like data) is refused too.
    """
    if written and _chunk_missing(arr, selection):
        raise StoreError(
            f"cannot read {name} of image {image}: its store file is missing although the "
            "image's status is 1; the store is damaged (restore the file, or rebuild the store "
            "with `vit-attn run CONFIG --overwrite`)"
        )
    try:
        return np.asarray(arr[selection])
    except Exception as exc:  # noqa: BLE001 - numcodecs, crc32c and zarr raise unrelated types
        raise StoreError(
            f"cannot read {name} of image {image}: {first_line(exc)}; the store file holding it "
            "is damaged (restore it, or rebuild the store with `vit-attn run CONFIG --overwrite`)"
        ) from None


def batches_missing_files(group: zarr.Group, spec: StoreSpec, status: np.ndarray) -> list[int]:
    """Batches that were written (an image at status 1 or 2) but whose file is gone from one
    of their data arrays: deleted by hand, or lost with a disk. zarr would read its fill value
    there, zeros that look like results; a resume redoes these batches instead.

    Every batch write stores each data array's file, fill values included
    (`write_empty_chunks`), so an absent one is damage. One listing per array; arrays whose
    storage cannot be listed are not checked."""
    n, size = spec.n_images, spec.batch_size
    written = np.zeros(spec.n_batches * size, dtype=bool)
    written[:n] = np.asarray(status)[:n] != STATUS_PENDING
    done = np.flatnonzero(written.reshape(spec.n_batches, size).any(axis=1))
    missing: set[int] = set()
    if not done.size:
        return []
    for layout in spec.layout():
        if not layout.per_batch or layout.name not in group:
            continue
        arr: Any = group[layout.name]
        rows = np.concatenate([np.arange(int(b) * size, min((int(b) + 1) * size, n)) for b in done])
        gone = _images_without_files(arr, rows)
        missing.update((gone // size).tolist())
    return sorted(missing)


def images_missing_files(group: zarr.Group, status: np.ndarray) -> dict[str, np.ndarray]:
    """Per array with an `image` dim first: the written images (status 1 or 2) whose store
    file is gone, which zarr would read as fill values; empty for an intact store. What
    `inspect` reports and dataset-wide readers refuse (a resume redoes these batches)."""
    rows = np.flatnonzero(np.asarray(status) != STATUS_PENDING)
    found: dict[str, np.ndarray] = {}
    if not rows.size:
        return found
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        dims = getattr(arr.metadata, "dimension_names", None) or ()
        if dims[:1] == ("image",):
            gone = _images_without_files(arr, rows)
            if gone.size:
                found[name] = gone
    return found


def arrays_lost_by_image(found: Mapping[str, np.ndarray]) -> dict[int, list[str]]:
    """`images_missing_files`'s result by image: each damaged image and its arrays."""
    lost: dict[int, list[str]] = {}
    for name, rows in found.items():
        for i in rows.tolist():
            lost.setdefault(int(i), []).append(name)
    return lost


def describe_missing_files(found: Mapping[str, np.ndarray]) -> str:
    """`images_missing_files`'s result as one phrase: `cls_attention (images 2, 3)`, ..."""

    def images(rows: np.ndarray) -> str:
        shown = ", ".join(map(str, rows[:4].tolist())) + (", ..." if rows.size > 4 else "")
        return f"{rows.size} image{'s' if rows.size > 1 else ''}: {shown}"

    return "; ".join(f"{name} ({images(rows)})" for name, rows in found.items())


def _images_without_files(arr: Any, rows: np.ndarray) -> np.ndarray:
    """Those of `rows` (image indices, ascending) in an image-axis chunk of which a stored
    file is absent (any chunk along the other axes). One listing of the array; nothing
    where the storage cannot be listed or the layout is unexpected."""
    keys = _stored_keys(arr)
    if keys is None:
        return rows[:0]
    try:
        outer = tuple(int(c) for c in arr.metadata.chunk_grid.chunk_shape)
    except (AttributeError, TypeError):
        return rows[:0]
    rest = [range(math.ceil(d / c)) for d, c in zip(arr.shape[1:], outer[1:], strict=True)]
    gone = [
        c0
        for c0 in np.unique(rows // outer[0]).tolist()
        if any(
            arr.metadata.encode_chunk_key((c0, *others)) not in keys
            for others in itertools.product(*rest)
        )
    ]
    return rows[np.isin(rows // outer[0], gone)]


def _stored_keys(arr: Any) -> set[str] | None:
    """The chunk keys stored for `arr` (relative to the array), asked of the storage itself
    (consolidated metadata still lists what was deleted); None where it cannot be listed.

    An empty file is not stored: zarr never writes one (every chunk is encoded, fill values
    included), so it is a write cut short or a disk that lost it, and counts as missing."""
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore, LocalStore

    store, path = arr.store_path.store, arr.store_path.path
    prefix = f"{path}/" if path else ""
    try:
        if isinstance(store, LocalStore):
            root = Path(store.root) / path
            return {
                p.relative_to(root).as_posix()
                for p in root.rglob("*")
                if p.is_file() and p.stat().st_size > 0
            }
        if isinstance(store, FsspecStore):
            base = f"{store.path.rstrip('/')}/{path}".rstrip("/")
            store.fs.invalidate_cache(base)  # the storage as it is now, not a cached listing
            found = store.fs.find(base, detail=True)
            return {
                name[len(base) + 1 :]
                for name, info in found.items()
                if info.get("type", "file") == "file" and (info.get("size") or 0) > 0
            }
    except Exception:  # noqa: BLE001 - fall back to the store's own listing
        pass

    async def collect() -> set[str]:
        return {key[len(prefix) :] async for key in store.list_prefix(prefix)}

    try:
        return sync(collect())
    except Exception:  # noqa: BLE001 - a store that cannot list: cannot tell, so do not redo
        return None


def rows_without_chunk(arr: Any, images: Sequence[int]) -> set[int]:
    """Those of `images` whose chunk (or shard) along the image axis is absent: one look per
    chunk, however many of the images it holds (a page of thumbnails is a few chunks)."""
    try:
        per = int(arr.metadata.chunk_grid.chunk_shape[0])
    except (AttributeError, IndexError, TypeError):
        return set()
    missing: set[int] = set()
    looked: dict[int, bool] = {}
    for i in images:
        c = int(i) // per
        if c not in looked:
            looked[c] = _chunk_missing(arr, c * per)
        if looked[c]:
            missing.add(int(i))
    return missing


def _chunk_missing(arr: Any, selection: Any) -> bool:
    """Whether the stored chunk (or shard) holding `selection`'s first element is absent.

    Only where absence can be told cheaply (a local folder, or an fsspec store); False when
    it cannot be told, so this never refuses a readable store.
    """
    index = selection if isinstance(selection, tuple) else (selection,)
    try:
        grid = arr.metadata.chunk_grid.chunk_shape
        coords = tuple(
            int(index[d]) // grid[d]
            if d < len(index) and isinstance(index[d], int | np.integer)
            else 0
            for d in range(len(grid))
        )
        key = arr.metadata.encode_chunk_key(coords)
        path = arr.store_path.path
        return _key_exists(arr.store_path.store, f"{path}/{key}" if path else key) is False
    except Exception:  # noqa: BLE001 - an unexpected store layout: cannot tell, so do not refuse
        return False


def _key_exists(store: Any, key: str) -> bool | None:
    """Whether `key` is in a zarr store (a local folder given as a path, or a zarr Store such
    as a LocalStore or an FsspecStore), asked of the storage itself: consolidated metadata
    still lists what was deleted. None where the store cannot say."""
    if isinstance(store, str | os.PathLike):
        return (Path(store) / key).is_file()
    exists = getattr(store, "exists", None)
    if exists is None:
        return None
    from zarr.core.sync import sync  # zarr stores are async; their own loop answers

    return bool(sync(exists(key)))


def find_image(n_images: int, image: str | int, paths: Callable[[], np.ndarray]) -> int:
    """The position of an image given as an index (negatives count from the end) or as its
    path as listed in the store.

    An int is always an index. A string is the image listed under exactly that path if there
    is one (a Parquet `id_column` of numbers lists images as "7", "3", ...), else, if it is
    a whole number, an index. A path is matched exactly, spaces included. `paths` loads the
    `image_path` array only when a string must be looked up. Every reader (the API,
    `vit-attn show`, the viewer) selects images through
    this one rule.
    """
    if isinstance(image, bool):
        raise ImageSelectionError(f"image {image!r}: give an index or a listed path")
    if isinstance(image, (int, np.integer)):
        i = int(image)
    else:
        text = str(image)  # as given: " b.png" and "b.png" may both be listed
        hits = np.flatnonzero(np.asarray(paths()) == text)
        if hits.size:
            return int(hits[0])
        number = parse_int(text.strip())
        if number is None:
            raise ImageSelectionError(
                f"image {text!r} is not in the store; give an index or a path as "
                "`vit-attn inspect` lists them (as the data source listed them)"
            )
        i = number
    if not -n_images <= i < n_images:
        raise ImageSelectionError(f"image {i} is out of range: the store holds {n_images} images")
    return i % n_images
