"""What the cache holds and what can go: `vit-attn cache [--prune --older-than DAYS]`.

Every change of model, outputs, precision, library versions or the graph-building code writes a
new graph (tens to hundreds of MB) beside the old ones, which nothing else ever deletes. A graph
counts as used when it, or a model record that names it, was last used (records are touched on
every cache hit, `graphcache.resolve`). Pruning removes records and graphs unused for longer
than the given age, graphs no record names once they are that old (the torch backend and
`vit-attn export` can leave those), interrupted exports' temporary files, remembered
checkpoint digests and TensorRT engines of that age. Whatever was used in the last hour stays,
whatever the age asked (`--older-than 0` included): a run plans with a graph (touching its
record) and its workers open it later, so a prune in between would fail that run's batches.
Deleting a graph a job already has open is safe on POSIX (the session holds its copy); the
next run re-exports it.
Standard library only, like `cachedir`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CacheEntry", "prune", "scan"]

log = logging.getLogger(__name__)

DAY = 86400.0
# The names vit-attn (and onnxruntime's TensorRT EP, in trt/) give the files it writes: the
# cache may be any folder (`inference.cache_dir`), and a user's own file there is not ours.
_GRAPH = re.compile(r".+-(fp32|mixed)(-[a-z]+)*-[0-9a-f]{20}\.onnx")
_RECORD = re.compile(r".+-(fp32|mixed)-[0-9a-f]{20}\.facts\.json")
_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}\.(onnx|json)")  # tempfile.mkstemp's names
_DIGEST = re.compile(r"[0-9a-f]{32}\.json")
_TENSORRT = re.compile(r"TensorrtExecutionProvider_.+\.(engine|profile|timing)")
IN_USE_SECONDS = 3600.0  # used this recently: a run may be starting with it; never pruned


@dataclass(frozen=True)
class CacheEntry:
    """One file of the cache: `kind` is graph, record, temporary, digest or tensorrt."""

    kind: str
    path: Path
    size: int
    last_used: float  # epoch seconds
    graph: Path | None = None  # the graph a record names


def scan(root: Path) -> list[CacheEntry]:
    """Every file of the cache at `root`, oldest use first; nothing when it does not exist."""
    entries: list[CacheEntry] = []
    onnx = root / "onnx"
    records: list[CacheEntry] = []
    for path in sorted(p for p in onnx.glob("*.facts.json") if _RECORD.fullmatch(p.name)):
        st = _stat(path)
        if st is None:
            continue
        records.append(CacheEntry("record", path, st.st_size, st.st_mtime, _named_graph(path)))
    used_by_record: dict[Path, float] = {}
    for r in records:
        if r.graph is not None:
            used_by_record[r.graph] = max(used_by_record.get(r.graph, 0.0), r.last_used)
    for path in sorted(onnx.glob("*.onnx")):
        kind = "temporary" if _TEMPORARY.fullmatch(path.name) else "graph"
        st = _stat(path)
        if st is None or (kind == "graph" and not _GRAPH.fullmatch(path.name)):
            continue
        last = max(st.st_mtime, used_by_record.get(path.resolve(), 0.0))
        entries.append(CacheEntry(kind, path, st.st_size, last))
    for path in sorted(p for p in onnx.glob("tmp*.json") if _TEMPORARY.fullmatch(p.name)):
        st = _stat(path)
        if st is not None:
            entries.append(CacheEntry("temporary", path, st.st_size, st.st_mtime))
    for kind, folder, name in (
        ("digest", root / "digests", _DIGEST),
        ("temporary", root / "digests", _TEMPORARY),
        ("tensorrt", root / "trt", _TENSORRT),
    ):
        for path in sorted(p for p in folder.glob("*") if name.fullmatch(p.name)):
            st = _stat(path)
            if st is not None:
                entries.append(CacheEntry(kind, path, st.st_size, st.st_mtime))
    entries.extend(records)
    return sorted(entries, key=lambda e: (e.last_used, str(e.path)))


def prune(
    root: Path, older_than_days: float, dry_run: bool = False, now: float | None = None
) -> list[CacheEntry]:
    """Remove what was last used more than `older_than_days` ago (and over an hour ago), and
    temporary files more than a day old (never younger ones); a record goes with its graph.
    Returns what was (or, dry, would be) removed."""
    if older_than_days < 0:
        raise ValueError("older_than_days must be >= 0")
    now = time.time() if now is None else now
    cutoff = min(now - older_than_days * DAY, now - IN_USE_SECONDS)
    entries = scan(root)
    gone: list[CacheEntry] = []
    removed_graphs: set[Path] = set()
    for e in entries:
        if e.kind == "temporary":
            # Garbage once a day old whatever the age asked; younger, an export may be writing it.
            stale = e.last_used < now - DAY
        elif e.kind == "record":
            continue  # decided below, after the graphs
        else:
            stale = e.last_used < cutoff
        if stale:
            gone.append(e)
            if e.kind == "graph":
                removed_graphs.add(e.path.resolve())
    for e in entries:
        if e.kind == "record" and (
            e.last_used < cutoff or (e.graph is not None and e.graph in removed_graphs)
        ):
            gone.append(e)
    if not dry_run:
        kept: list[CacheEntry] = []
        for e in gone:
            try:
                e.path.unlink()
            except FileNotFoundError:
                pass  # another prune, or the export replaced it
            except OSError as exc:  # one entry that cannot go does not stop the others
                kept.append(e)
                log.warning("cannot remove %s: %s", e.path, exc.strerror or exc)
        gone = [e for e in gone if e not in kept]
    return gone


def _stat(path: Path) -> os.stat_result | None:
    """A plain file's stat; None for anything else (a folder named like a graph is not ours
    to delete) or what cannot be read."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _named_graph(record: Path) -> Path | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    name = data.get("onnx_path") if isinstance(data, dict) else None
    # beside the record, as graphcache.resolve reads it (a copied cache names the old folder)
    return (record.parent / Path(name).name).resolve() if isinstance(name, str) else None
