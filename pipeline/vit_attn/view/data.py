"""What the viewer reads from a store: layout, the filtered image list and one map at a time.

Everything is read lazily and by index: the first page of a 50,000-image store reads the
page's chunks of `image_path`, `status` and `topk_index` only. Whole-dataset columns
(`status`, top-1 class, one statistic) are read the first time a filter or sort needs them,
then kept (a few bytes per image). Per-image arrays are read one inner chunk at a time.
The store is opened read-only; nothing here writes.

A finished image whose store files are gone (deleted, lost with a disk) would read as zarr's
fill values, zeros that look like statistics and class 0: the viewer shows it as failed, with
the reason, wherever it knows (the whole status column is read with one listing per array;
a page before that checks the chunks it shows).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import PipelineError, StoreError
from ..maps import HEAD_FUSIONS, fuse_heads
from ..numbers import parse_int
from ..remote import is_url
from ..stats import STAT_NAMES, STAT_UNITS, max_distance, patch_distances
from ..store import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    arrays_lost_by_image,
    images_missing_files,
    read_rows,
    readable_attrs,
    reader_status,
    rows_without_chunk,
)

STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_OK: "ok", STATUS_FAILED: "failed"}
STATUS_FILTERS = ("all", "ok", "failed", "pending")
# Map arrays the viewer knows by name; any other array with dims (image, [layer,] [head,] y, x)
# is offered too, under its own name.
MAP_LABELS = {
    "cls_attention": "CLS → patches",
    "pool_attention": "attention pool → patches",
    "received_attention": "attention received by each patch",
    "rollout": "rollout",
}
FULL_ATTENTION = "attention"
FULL_ATTENTION_HINT = (
    "full attention is not stored: run with `attention.full: true` to see any token's row"
)
MAX_PAGE = 500
HEAD_CHOICES = ("mean", "max", "min")
# How often the viewer re-reads `status` (a run may still be writing the store), at least.
STATUS_RECHECK_SECONDS = 2.0


class ViewError(PipelineError):
    """A request the store cannot answer (bad parameter, image out of range): HTTP 400/404."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MapSource:
    """A stored array that gives one [gh, gw] map per image (and per layer / head if it has them)."""

    name: str
    label: str
    has_layer: bool
    has_head: bool
    # Its own head count when it differs from the blocks' (an attention pool with its own
    # heads: the `pool_head` dim); 0: the store's `head` coordinate.
    head_count: int = 0


@dataclass(frozen=True)
class Selection:
    """Which map: a source (array name, or `row` / `diag` of full attention), layer, head, token."""

    source: str
    layer_index: int  # index into the store's `layer` coordinate (ignored without a layer dim)
    head: str  # a head index as text, or one of HEAD_CHOICES
    token: int = 0  # the query token of a `row` (model order: prefix tokens first)


@dataclass(frozen=True)
class ListQuery:
    """A filter and an order over the whole store; a page of it is what the grid shows."""

    status: str = "all"
    top1: int | None = None
    stat: str | None = None
    stat_layer: int = -1  # index into `layer`
    stat_head: str = "mean"
    vmin: float | None = None
    vmax: float | None = None
    sort: str = "index"  # "index" or "stat"
    descending: bool = False


def open_group(store: str | Path) -> zarr.Group:
    """Open a vit-attention store read-only; one clear error when it is not one."""
    text = str(store)
    # Not a store, a format_version this code does not know, or status / image_path missing.
    readable_attrs(text)
    try:
        return zarr.open_group(text, mode="r")
    except (FileNotFoundError, OSError, ValueError, KeyError, zarr.errors.BaseZarrError):
        raise StoreError(f"{text}: the store cannot be opened (removed meanwhile?)") from None


class StoreData:
    """A read-only view of one store with the caches the server needs (thread-safe)."""

    def __init__(self, store: str | Path) -> None:
        self.path = str(store)
        self._lock = threading.Lock()
        self._columns: dict[str, np.ndarray] = {}
        self._damage: dict[int, str] = {}  # finished images whose store files are gone: why
        self._orders: OrderedDict[ListQuery, np.ndarray] = OrderedDict()
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        # Bumped whenever what was read may be stale (status or root attributes changed):
        # the pictures' and the summary's caches compare it (`Pictures`, `ViewServer`).
        self.generation = 0
        self._load(open_group(store))
        self._next_status_check = time.monotonic() + STATUS_RECHECK_SECONDS
        self._replaced: str | None = None  # why the store on disk is no longer this one
        self._root_seen = self._root_signature()

    def _load(self, group: zarr.Group) -> None:
        """The layout, from the store's metadata: at start, and again when a resume or
        `vit-attn stats --write` changed it (a run id, statistics arrays added or dropped)."""
        arrays: dict[str, zarr.Array] = {
            name: arr for name, arr in group.arrays() if isinstance(arr, zarr.Array)
        }
        if "status" not in arrays or "image_path" not in arrays:
            raise StoreError(f"{self.path} lacks `status` / `image_path`; is it a complete store?")
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.model: dict[str, Any] = dict(self.attrs.get("model", {}))
        self._arrays = arrays
        self.n_images = int(arrays["status"].shape[0])
        self.layers: list[int] = (
            np.asarray(arrays["layer"][:]).tolist() if "layer" in arrays else []
        )
        self.heads: list[int] = np.asarray(arrays["head"][:]).tolist() if "head" in arrays else []
        self.num_prefix = int(self.model.get("num_prefix_tokens", 0))
        grid = self.model.get("grid")
        self.sources = self._find_sources()
        if grid is None and self.sources:
            grid = list(arrays[self.sources[0].name].shape[-2:])
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1])) if grid else (0, 0)
        self.stats = [s for s in STAT_NAMES if s in arrays] + sorted(
            name
            for name, arr in arrays.items()
            if name not in STAT_NAMES and _dims(arr) == ("image", "layer", "head")
        )
        self.has_full = FULL_ATTENTION in arrays
        self._meta_memo: tuple[int, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ layout

    def _find_sources(self) -> list[MapSource]:
        found = []
        for name, arr in self._arrays.items():
            dims = _dims(arr)
            if len(dims) < 3 or dims[0] != "image" or dims[-2:] != ("y", "x"):
                continue
            middle = dims[1:-2]
            if any(d not in ("layer", "head", "pool_head") for d in middle):
                continue
            own = arr.shape[1 + middle.index("pool_head")] if "pool_head" in middle else 0
            found.append(
                MapSource(
                    name,
                    MAP_LABELS.get(name, name),
                    "layer" in middle,
                    "head" in middle or "pool_head" in middle,
                    int(own),
                )
            )
        order = list(MAP_LABELS)
        found.sort(key=lambda s: (order.index(s.name) if s.name in order else len(order), s.name))
        return found

    def token_names(self) -> list[str]:
        """One label per prefix token, in model order, from the store's `token_roles`.

        Stores written before roles were recorded take token 0 to be the class token (what
        readers assumed then, docs/STORE.md)."""
        roles = (self.attrs.get("token_roles") or {}).get("prefix_roles")
        if isinstance(roles, list) and len(roles) == self.num_prefix:
            labels = {"class": "CLS", "distillation": "distillation"}
            count: dict[str, int] = {}
            names = []
            for role in map(str, roles):
                k = count[role] = count.get(role, -1) + 1
                names.append(labels.get(role) or f"{role} {k}")
            return names
        return [
            "CLS" if k == 0 else f"prefix {k} (distillation / register)"
            for k in range(self.num_prefix)
        ]

    def meta(self) -> dict[str, Any]:
        """Everything the page needs to build its controls; reads attributes and shapes only.
        Built once per generation (a reload of the layout builds it again)."""
        memo = self._meta_memo
        if memo is None or memo[0] != self.generation:
            generation = self.generation
            memo = (generation, self._build_meta())
            with self._lock:
                if generation == self.generation:
                    self._meta_memo = memo
        return dict(memo[1])

    def _build_meta(self) -> dict[str, Any]:
        size = self.model.get("input_size") or []
        input_hw = [int(v) for v in size[-2:]] if len(size) >= 2 else None
        overlay = self._arrays.get("overlay")
        if overlay is not None:
            input_hw = [int(overlay.shape[1]), int(overlay.shape[2])]
        topk = self._arrays.get("topk_index")
        patch = self.model.get("patch_size") or [1, 1]
        reference = None
        if self.grid[0] and "attention_distance" in self.stats:
            ps = (int(patch[0]), int(patch[1]))
            reference = {
                "uniform": float(patch_distances(self.grid, ps).mean()),
                "largest": float(max_distance(self.grid, ps)),
            }
        units = dict(STAT_UNITS)
        units.update(self.attrs.get("stat_units") or {})
        return {
            "store": self.path,
            "model": self.model.get("name"),
            "n_images": self.n_images,
            "layers": self.layers,
            "heads": self.heads,
            "grid": list(self.grid),
            "input_size": input_hw,
            "num_prefix_tokens": self.num_prefix,
            "token_names": self.token_names(),
            "sources": [s.__dict__ for s in self.sources],
            "full_attention": self.has_full,
            "full_attention_hint": None if self.has_full else FULL_ATTENTION_HINT,
            "overlays": overlay is not None,
            "num_classes": int(self.model.get("num_classes") or 0) if topk is not None else 0,
            "topk": int(topk.shape[1]) if topk is not None else 0,
            "stats": [{"name": s, "unit": units.get(s, "")} for s in self.stats],
            "distance_reference": reference,
            "overlay_alpha": float(
                (self.attrs.get("config") or {}).get("output", {}).get("overlay_alpha", 0.5)
            ),
            "colormap": str(
                (self.attrs.get("config") or {}).get("output", {}).get("colormap", "inferno")
            ),
        }

    def warm(self) -> None:
        """Open every array's codec pipeline once (first reads pay for it), before serving."""
        if self.n_images == 0:
            return
        for arr in self._arrays.values():
            if _dims(arr)[:1] == ("image",) and arr.size:
                np.asarray(arr[0:1])

    # ------------------------------------------------------------------ whole-store columns

    def _refresh(self) -> None:
        """A run may still be writing the store: every few seconds re-read `status`, and when it
        changed, drop everything built on the old one (columns, list orders, cached chunks).

        The interval grows with the read's own cost (20x), so a store of millions of images on
        object storage is not re-read on every request."""
        if self._replaced:
            raise ViewError(self._replaced, 409)
        root = self._root_signature()
        with self._lock:
            if root != self._root_seen:  # replaced (--overwrite) or rewritten (a resume): now
                self._root_seen = root
                self._next_status_check = 0.0
            if time.monotonic() < self._next_status_check:
                return
            self._next_status_check = math.inf  # this thread re-reads; others use the cache
            cached = self._columns.get("status_raw")
        started = time.monotonic()
        fresh = shown = None
        try:
            attrs = self._check_same_store()  # also when nothing is cached yet: meta is
            if cached is not None:
                fresh = reader_status(self._arrays["status"], self.path)
                if not np.array_equal(fresh, cached):
                    shown = self._status_as_shown(fresh)
        finally:
            took = time.monotonic() - started
            with self._lock:
                self._next_status_check = time.monotonic() + max(STATUS_RECHECK_SECONDS, 20 * took)
        if attrs != self.attrs:
            # A resume started (a new run id: it may redo images whose files changed, and
            # keep the same status) or statistics were written: read the layout again.
            self._reload()
            return
        with self._lock:
            if shown is not None and fresh is not None:
                self._forget()
                self._columns["status_raw"] = fresh
                self._columns["status"], self._damage = shown

    def _root_signature(self) -> tuple[int, int, int] | None:
        """The local root `zarr.json`'s inode, mtime and size: a store replaced by
        `run --overwrite`, or a root rewritten by a resume, is noticed at the next request
        rather than at the next status check (up to STATUS_RECHECK_SECONDS of answers from
        the old layout). None on object storage (a request per answer would cost too much)."""
        if is_url(self.path):
            return None
        try:
            st = os.stat(os.path.join(self.path, "zarr.json"))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _forget(self) -> None:
        """Drop everything read from the store (caller holds the lock)."""
        self._columns.clear()
        self._damage = {}
        self._orders.clear()
        self._chunks.clear()
        self.generation += 1

    def _reload(self) -> None:
        try:
            group = open_group(self.path)
        except StoreError as exc:
            self._replaced = f"{exc}; restart vit-attn view once the store is back"
            raise ViewError(self._replaced, 409) from None
        if group.attrs.get("fingerprint") != self.attrs.get("fingerprint"):
            self._check_same_store()  # replaced between the check and the open: 409
        with self._lock:
            self._load(group)
            self._forget()

    def ensure_current(self, force: bool = False) -> None:
        """Every answer starts here: once the store is known to be replaced, every route says so
        (409), not only those reading `status`; `force` checks the store's identity now (after
        a read failed: the old metadata read against a new store's chunks fails oddly)."""
        if force and not self._replaced:
            self._check_same_store()
        self._refresh()

    def _check_same_store(self) -> dict[str, Any]:
        """`vit-attn run --overwrite` may have replaced the store (other images, other arrays):
        then every answer from the old one's metadata would be wrong; say so instead.
        Returns the root attributes as they are now."""
        try:
            attrs = readable_attrs(self.path)
        except StoreError as exc:
            self._replaced = (
                f"{self.path} cannot be read any more ({exc}); it was moved, deleted or "
                "damaged since the viewer opened it: restart vit-attn view once it is back"
            )
            raise ViewError(self._replaced, 409) from None
        if attrs.get("fingerprint") != self.attrs.get("fingerprint"):
            self._replaced = (
                f"{self.path} was replaced since the viewer opened it (vit-attn run "
                "--overwrite?); restart vit-attn view to see the new store"
            )
            raise ViewError(self._replaced, 409)
        return attrs

    def _column(self, key: str, load: Callable[[], np.ndarray]) -> np.ndarray:
        self._refresh()
        with self._lock:
            if key not in self._columns:
                self._columns[key] = load()
            return self._columns[key]

    def status(self) -> np.ndarray:
        """Every image's status as shown: a finished image whose store files are gone is
        failed (`_status_as_shown`)."""
        self._refresh()
        with self._lock:
            if "status" in self._columns:
                return self._columns["status"]
            generation = self.generation
        raw = reader_status(self._arrays["status"], self.path)
        shown, damage = self._status_as_shown(raw)
        with self._lock:
            if generation == self.generation:  # else built from what was just dropped
                self._columns["status_raw"] = raw
                self._columns["status"], self._damage = shown, damage
        return shown

    def _status_as_shown(self, raw: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """`raw` with finished images whose store files are gone set to failed, and why."""
        gone = arrays_lost_by_image(images_missing_files(self.group, raw))
        shown = raw.copy()
        if gone:
            shown[list(gone)] = STATUS_FAILED
        return shown, {i: _damage_reason(names) for i, names in gone.items()}

    def top1(self) -> np.ndarray | None:
        if "topk_index" not in self._arrays:
            return None
        return self._column("top1", lambda: np.asarray(self._arrays["topk_index"][:, 0]))

    def stat_table(self, stat: str) -> np.ndarray:
        """A statistic for every image [image, layer, head], read once and kept."""
        return self._column(f"stat:{stat}", lambda: np.asarray(self._arrays[stat][:]))

    def stat_values(self, stat: str, layer_index: int, head: str) -> np.ndarray:
        """One value per image: a statistic at one layer, for one head or fused over heads."""
        if stat not in self.stats:
            raise ViewError(
                f"statistic {stat!r} is not stored; this store has {self.stats or 'none'}"
            )
        li = self.layer_index(layer_index)
        table = self.stat_table(stat)
        per_head = table[:, li, :].astype(np.float64)
        if head in HEAD_CHOICES:
            return fuse_heads(per_head, head, axis=-1)
        return per_head[:, self.head_index(head)]

    def counts(self) -> dict[str, Any]:
        """Images per status and per top-1 class (reads both columns once)."""
        status = self.status()
        out: dict[str, Any] = {
            name: int((status == code).sum()) for code, name in STATUS_NAMES.items()
        }
        top1 = self.top1()
        if top1 is not None:
            ok = top1[status == STATUS_OK]
            values, n = np.unique(ok, return_counts=True)
            out["classes"] = {str(int(v)): int(c) for v, c in zip(values, n)}
        return out

    # ------------------------------------------------------------------ the image list

    def order(self, q: ListQuery) -> np.ndarray | None:
        """Image indices matching `q` in its order, or None for "every image by index"."""
        if q.status not in STATUS_FILTERS:
            raise ViewError(f"status must be one of {STATUS_FILTERS}, got {q.status!r}")
        if q.sort not in ("index", "stat"):
            raise ViewError(f"sort must be 'index' or 'stat', got {q.sort!r}")
        filtered = (
            q.status != "all" or q.top1 is not None or q.vmin is not None or q.vmax is not None
        )
        if not filtered and q.sort == "index" and not q.descending:
            return None
        self._refresh()
        with self._lock:
            if q in self._orders:
                self._orders.move_to_end(q)
                return self._orders[q]
            generation = self.generation
        keep = np.ones(self.n_images, bool)
        if q.status != "all":
            code = {v: k for k, v in STATUS_NAMES.items()}[q.status]
            keep &= self.status() == code
        if q.top1 is not None:
            top1 = self.top1()
            if top1 is None:
                raise ViewError("this store has no top-k classes (the model has no classifier)")
            keep &= (top1 == q.top1) & (self.status() == STATUS_OK)
        values = None
        if q.stat is not None and (q.vmin is not None or q.vmax is not None or q.sort == "stat"):
            values = self.stat_values(q.stat, q.stat_layer, q.stat_head)
            if q.vmin is not None or q.vmax is not None or q.sort == "stat":
                keep &= self.status() == STATUS_OK  # failed images hold zeros, not statistics
            if q.vmin is not None:
                keep &= values >= q.vmin
            if q.vmax is not None:
                keep &= values <= q.vmax
        elif q.sort == "stat" or q.vmin is not None or q.vmax is not None:
            raise ViewError("sort=stat, min and max need a statistic (stat=NAME)")
        idx = np.flatnonzero(keep)
        if q.sort == "stat" and values is not None:
            key = -values[idx] if q.descending else values[idx]
            idx = idx[np.argsort(key, kind="stable")]
        elif q.descending:
            idx = idx[::-1]
        with self._lock:
            if generation == self.generation:  # else built from what was just dropped
                self._orders[q] = idx
                while len(self._orders) > 16:
                    self._orders.popitem(last=False)
        return idx

    def page(self, q: ListQuery, offset: int, limit: int) -> dict[str, Any]:
        """A page of the list: per image its index, path, status, error, top-1 and the stat."""
        if offset < 0 or not 0 < limit <= MAX_PAGE:
            raise ViewError(f"offset must be >= 0 and limit in 1..{MAX_PAGE}")
        ids = self.page_ids(q, offset, limit)
        order = self.order(q)
        total = self.n_images if order is None else int(order.size)
        items = self.describe(ids)
        if q.stat is not None and q.stat in self.stats and ids.size:
            values = self.stat_values(q.stat, q.stat_layer, q.stat_head)[ids]
            for item, v in zip(items, values.tolist()):
                item["value"] = v
        return {"total": total, "offset": offset, "items": items}

    def page_ids(self, q: ListQuery, offset: int, limit: int) -> np.ndarray:
        """The image indices of one page of the list of `q`."""
        if offset < 0 or not 0 < limit <= MAX_PAGE:
            raise ViewError(f"offset must be >= 0 and limit in 1..{MAX_PAGE}")
        order = self.order(q)
        if order is None:
            return np.arange(min(offset, self.n_images), min(offset + limit, self.n_images))
        return order[offset : offset + limit]

    def describe(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """Per-image facts for `ids`, read from the chunks that hold them (sorted reads)."""
        if ids.size == 0:
            return []
        paths = self._pick("image_path", ids)
        status = self.statuses(ids)
        errors = self._pick("error", ids)
        top = self._pick("topk_index", ids) if "topk_index" in self._arrays else None
        prob = self._pick("topk_prob", ids) if "topk_prob" in self._arrays else None
        with self._lock:
            damage = dict(self._damage)
        items = []
        for k, i in enumerate(ids.tolist()):
            item: dict[str, Any] = {
                "i": int(i),
                "path": str(paths[k]),
                "status": STATUS_NAMES.get(int(status[k]), str(int(status[k]))),
            }
            if int(status[k]) == STATUS_FAILED:
                item["error"] = damage.get(int(i), str(errors[k]))
            if top is not None and int(status[k]) == STATUS_OK:
                item["top1"] = int(top[k, 0])
                if prob is not None:
                    item["prob"] = float(prob[k, 0])
            items.append(item)
        return items

    def info(self, image: int) -> dict[str, Any]:
        """One image's facts and its top-k classes with probabilities."""
        self.check_image(image)
        item = self.describe(np.asarray([image]))[0]
        if item["status"] == "ok" and "topk_index" in self._arrays:
            top = read_rows(self._arrays["topk_index"], image, "topk_index", image, written=True)
            item["topk"] = top.astype(int).tolist()
            if "topk_prob" in self._arrays:
                prob = read_rows(self._arrays["topk_prob"], image, "topk_prob", image, written=True)
                item["topk_prob"] = prob.astype(np.float64).tolist()
        return item

    def image_stats(self, image: int) -> dict[str, Any]:
        """Per stored statistic, one image's values [layer][head] (zeros unless status is ok)."""
        self.check_image(image)
        written = self._raw_status(image) == STATUS_OK  # its chunks must exist
        shown = self.image_status(image)
        if written and shown != STATUS_OK:  # finished, but its store files are gone
            return {"i": image, "status": "failed", "error": self.damage_of(image), "stats": {}}
        return {
            "i": image,
            "status": STATUS_NAMES.get(shown, "?"),
            "stats": {
                s: read_rows(self._arrays[s], image, s, image, written=written)
                .astype(np.float64)
                .round(6)
                .tolist()
                for s in self.stats
            },
        }

    def _pick(self, name: str, ids: np.ndarray) -> np.ndarray:
        """arr[ids], reading each run of consecutive indices as one slice (a sorted page of a
        filtered list is a few runs; zarr's orthogonal selection is far slower on shards)."""
        arr = self._arrays[name]
        uniq, inverse = np.unique(ids, return_inverse=True)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        parts = [np.asarray(arr[int(run[0]) : int(run[-1]) + 1]) for run in np.split(uniq, breaks)]
        return np.concatenate(parts)[inverse]

    def neighbours(self, q: ListQuery, image: int) -> dict[str, Any]:
        """The images before and after `image` in the list of `q` (prev/next), and its position."""
        self.check_image(image)
        order = self.order(q)
        if order is None:
            pos = image
            total = self.n_images
            prev_i = image - 1 if image > 0 else None
            next_i = image + 1 if image + 1 < total else None
        else:
            hits = np.flatnonzero(order == image)
            total = int(order.size)
            if hits.size == 0:
                return {"position": None, "total": total, "prev": None, "next": None}
            pos = int(hits[0])
            prev_i = int(order[pos - 1]) if pos > 0 else None
            next_i = int(order[pos + 1]) if pos + 1 < total else None
        return {"position": pos, "total": total, "prev": prev_i, "next": next_i}

    # ------------------------------------------------------------------ one image

    def check_image(self, image: int) -> None:
        if not 0 <= image < self.n_images:
            raise ViewError(f"image {image} is out of range: the store holds {self.n_images}", 404)

    def statuses(self, ids: np.ndarray) -> np.ndarray:
        """Status of several images as shown (the cached column; before it is read, the
        chunks that hold them, with a finished image whose top-k file is gone as failed)."""
        self._refresh()
        with self._lock:
            column = self._columns.get("status")
        if column is not None:
            return column[ids]
        status = self._pick("status", ids)
        done = ids[status == STATUS_OK]
        for name in ("topk_index", "topk_prob"):
            if name in self._arrays and done.size:
                gone = rows_without_chunk(self._arrays[name], done.tolist())
                if gone:
                    status = np.where(np.isin(ids, list(gone)), STATUS_FAILED, status)
                    with self._lock:
                        for i in gone:
                            self._damage.setdefault(int(i), _damage_reason([name]))
        return status

    def image_status(self, image: int) -> int:
        """One image's status as shown (see `status`)."""
        self.check_image(image)
        return int(self.statuses(np.array([image]))[0])

    def damage_of(self, image: int) -> str | None:
        """Why a finished image is shown as failed when its store files are gone, else None."""
        with self._lock:
            return self._damage.get(int(image))

    def _raw_status(self, image: int) -> int:
        """One image's status as stored: 1 says its chunks were written."""
        self._refresh()
        with self._lock:
            column = self._columns.get("status_raw")
        if column is not None:
            return int(column[image])
        return int(read_rows(self._arrays["status"], image, "status", image))

    def layer_index(self, layer_index: int) -> int:
        n = len(self.layers)
        if not -n <= layer_index < n:
            raise ViewError(f"layer index {layer_index} is out of range: {n} layers are stored")
        return layer_index % n

    def head_index(self, head: str, count: int | None = None) -> int:
        """A head given as text, checked against `count` heads (default: the blocks')."""
        n = len(self.heads) if count is None else count
        index = parse_int(head)
        if index is None or not 0 <= index < n:
            raise ViewError(f"head must be 0..{n - 1} or one of {HEAD_CHOICES}, got {head!r}")
        return index

    def source(self, name: str) -> MapSource | None:
        return next((s for s in self.sources if s.name == name), None)

    def _chunk(self, name: str, image: int) -> np.ndarray:
        """arr[image] (one inner chunk), kept for a few images: clicking patches re-reads none."""
        key = (name, image)
        self._refresh()
        with self._lock:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                return self._chunks[key]
            generation = self.generation
        written = self._raw_status(image) == STATUS_OK  # its chunk must exist
        value = read_rows(self._arrays[name], image, name, image, written=written)
        with self._lock:
            if generation != self.generation:  # the store changed during the read
                return value
            self._chunks[key] = value
            while len(self._chunks) > 8:
                self._chunks.popitem(last=False)
        return value

    def head_maps(self, image: int, sel: Selection) -> np.ndarray:
        """Every head's map for the selection, float32 [heads, gh, gw] (one head if none)."""
        self.check_image(image)
        gh, gw = self.grid
        if sel.source in ("row", "diag"):
            if not self.has_full:
                raise ViewError(FULL_ATTENTION_HINT)
            att = self._chunk(FULL_ATTENTION, image)[self.layer_index(sel.layer_index)]
            p = self.num_prefix
            if sel.source == "row":
                tokens = att.shape[-1]
                if not 0 <= sel.token < tokens:
                    raise ViewError(
                        f"token {sel.token} is out of range: the model has {tokens} tokens"
                    )
                rows = att[:, sel.token, p:]
            else:
                rows = np.diagonal(att[:, p:, p:], axis1=-2, axis2=-1)
            return rows.astype(np.float32).reshape(-1, gh, gw)
        src = self.source(sel.source)
        if src is None:
            names = [s.name for s in self.sources] + (["row", "diag"] if self.has_full else [])
            raise ViewError(f"map source {sel.source!r} is not in this store; it has {names}")
        data = self._chunk(src.name, image)
        if src.has_layer:
            data = data[self.layer_index(sel.layer_index)]
        data = data.astype(np.float32)
        return data if src.has_head else data[None]

    def chosen_map(self, image: int, sel: Selection) -> np.ndarray:
        """The one map [gh, gw] to draw: a head, or the heads fused by mean / max / min."""
        maps = self.head_maps(image, sel)
        src = self.source(sel.source)
        if src is not None and not src.has_head:
            return maps[0]  # rollout: one map, whichever head is selected elsewhere
        if sel.head in HEAD_FUSIONS:
            return fuse_heads(maps, sel.head, axis=0)
        return maps[self.head_index(sel.head, maps.shape[0])]

    def prefix_mass(self, image: int, sel: Selection) -> float | None:
        """For a row: the mass the query token puts on prefix tokens (not on the map)."""
        if sel.source != "row" or not self.has_full:
            return None
        att = self._chunk(FULL_ATTENTION, image)[self.layer_index(sel.layer_index)]
        mass = att[:, sel.token, : self.num_prefix].astype(np.float64).sum(-1)
        if sel.head in HEAD_FUSIONS:
            return float(getattr(np, sel.head)(mass))
        return float(mass[self.head_index(sel.head)])

    def overlay(self, image: int, head: int | None) -> np.ndarray | None:
        """The stored overlay (head mean, or one head's) of one image, or None if not stored."""
        if head is None:
            return self._chunk("overlay", image) if "overlay" in self._arrays else None
        if "overlay_heads" not in self._arrays:
            return None
        return np.asarray(self._arrays["overlay_heads"][image, head])

    def overlays_array(self) -> zarr.Array:
        return self._arrays["overlay"]

    def overlays(self, ids: np.ndarray) -> np.ndarray:
        """Stored head-mean overlays of several images [n, H, W, 3] (concurrent chunk reads)."""
        return self._pick("overlay", ids)


def _damage_reason(arrays: list[str]) -> str:
    return (
        f"finished, but its store files are missing ({', '.join(arrays)}): the store is "
        "damaged; `vit-attn run CONFIG` redoes its batch"
    )


def _dims(arr: zarr.Array) -> tuple[str, ...]:
    names: Any = getattr(arr.metadata, "dimension_names", None) or ()
    return tuple(str(n) for n in names)


def thumb_factor(input_hw: tuple[int, int], box: int) -> int:
    """The integer factor that brings the input within a `box` square (1: never enlarged)."""
    return max(1, math.ceil(max(input_hw) / box))


def thumb_size(input_hw: tuple[int, int], box: int) -> tuple[int, int]:
    """(h, w) of a thumbnail: the input reduced by `thumb_factor`, rounded up (Pillow's reduce)."""
    f = thumb_factor(input_hw, box)
    return math.ceil(input_hw[0] / f), math.ceil(input_hw[1] / f)


def parse_query(params: Mapping[str, str]) -> ListQuery:
    """A ListQuery from URL parameters; a bad value is a ViewError naming the parameter."""

    def num(key: str) -> float | None:
        text = params.get(key, "")
        if text == "":
            return None
        try:
            value = float(text)
        except ValueError:
            raise ViewError(f"{key} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ViewError(f"{key} must be finite, got {text!r}")
        return value

    top1 = params.get("top1", "")
    top1_index = parse_int(top1)
    if top1 != "" and top1_index is None:
        raise ViewError(f"top1 must be a class index, got {top1!r}")
    stat = params.get("stat") or None
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ViewError(f"order must be asc or desc, got {order!r}")
    return ListQuery(
        status=params.get("status", "all") or "all",
        top1=top1_index,
        stat=stat,
        stat_layer=int_param(params, "slayer", -1),
        stat_head=params.get("shead", "mean") or "mean",
        vmin=num("min"),
        vmax=num("max"),
        sort=params.get("sort", "index") or "index",
        descending=order == "desc",
    )


def int_param(params: Mapping[str, str], key: str, default: int) -> int:
    text = params.get(key, "")
    if text == "":
        return default
    value = parse_int(text)
    if value is None:
        raise ViewError(f"{key} must be an integer, got {text!r}")
    return value


def parse_selection(params: Mapping[str, str], data: StoreData) -> Selection:
    """The map selection from URL parameters (defaults: first source, last layer, head mean)."""
    default = data.sources[0].name if data.sources else ("row" if data.has_full else "")
    source = params.get("source", default) or default
    token = int_param(params, "token", 0)
    return Selection(
        source=source,
        layer_index=int_param(params, "layer", -1),
        head=params.get("head", "mean") or "mean",
        token=token,
    )
