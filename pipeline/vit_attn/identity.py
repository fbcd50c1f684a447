"""What each listed image file is: size and modification time, optionally a content hash.

The store keeps these per image (`image_bytes`, `image_mtime_ns`, `image_sha256`), so a
resume can tell which inputs changed since they were recorded and refuse, naming them, or
redo exactly those images. Functions work on (root, listed paths); another source kind
(fsspec `info()` gives size and mtime) provides the same arrays through its own `stat`.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

VERIFY_MODES = ("stat", "hash")
MISSING = -1  # size and mtime of a file that does not exist (it fails per image later)
IDENTITY_ARRAYS = ("image_bytes", "image_mtime_ns", "image_sha256")


@dataclass
class Identities:
    """Per-image identity in listing order: int64 sizes and mtimes, hex digests or None."""

    size: np.ndarray
    mtime_ns: np.ndarray
    sha256: list[str] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """As the store's arrays (`image_sha256` only when hashed)."""
        out = {"image_bytes": self.size, "image_mtime_ns": self.mtime_ns}
        if self.sha256 is not None:
            out["image_sha256"] = np.asarray(self.sha256, dtype=object)
        return out


def local_stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a local file; MISSING for both when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return MISSING, MISSING
    return int(st.st_size), int(st.st_mtime_ns)


def local_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def identify(
    root: str | os.PathLike[str],
    paths: Sequence[str],
    verify: str = "stat",
    stat: Callable[[str], tuple[int, int]] = local_stat,
    digest: Callable[[str], str] = local_sha256,
) -> Identities:
    """Identify every listed image (paths as listed, relative to `root` or absolute)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    files = [os.path.join(root, p) for p in paths]
    pairs = np.array([stat(f) for f in files], dtype=np.int64).reshape(len(files), 2)
    hashes = [digest(f) for f in files] if verify == "hash" else None
    return Identities(pairs[:, 0].copy(), pairs[:, 1].copy(), hashes)


def fs_stat(fs: Any, path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file through fsspec; MISSING where the file system does not say.

    Asks the storage, not the file system's listing cache: a long-lived process (the viewer,
    a notebook) may have listed the folder before the file was rewritten."""
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except Exception:  # gone, or no access (botocore's errors are no OSError): the read says
        return MISSING, MISSING
    return info_stat(info)


def info_stat(info: Mapping[str, Any]) -> tuple[int, int]:
    """(size, mtime_ns) from one fsspec info entry, as `info()` or a detailed listing
    (`find`/`glob`/`ls` with ``detail=True``) gives it: the two must agree, since a run
    records a listing's and `show` checks one file's `info()`.

    Local files give `mtime` (seconds), S3 `LastModified`, GCS `updated`, Azure
    `last_modified`: whichever is there. Object stores keep whole seconds (S3's listing may
    say milliseconds where its HEAD says seconds: cut to the second), so a file rewritten
    within a second at the same size would look unchanged: where the store gives an ETag (or
    a generation, a version id), a digest of it fills a whole-second time's sub-second part,
    below what `describe_change` shows."""
    size = info.get("size")
    key = next((k for k in ("mtime", "LastModified", "last_modified", "updated") if k in info), "")
    ns = _ns(info.get(key))
    tag = next(
        (info[k] for k in ("ETag", "etag", "generation", "VersionId", "version_id") if info.get(k)),
        None,
    )
    # S3's LastModified: whole seconds from a HEAD, possibly milliseconds from a listing.
    # Elsewhere a sub-second time is kept as it is (identities recorded before stay valid).
    if key == "LastModified" and ns != MISSING:
        ns -= ns % 1_000_000_000
    if tag is not None and ns != MISSING and ns % 1_000_000_000 == 0:
        ns += zlib.crc32(str(tag).encode()) % 1_000_000_000
    return (int(size) if isinstance(size, int | float) else MISSING), ns


def _ns(when: Any) -> int:
    if isinstance(when, int | float):
        return int(round(float(when) * 1e9))
    if isinstance(when, str):
        try:
            when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            return MISSING
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return int(round(when.timestamp() * 1e9))
    return MISSING


def fs_stats(fs: Any, files: Sequence[str]) -> list[tuple[int, int]]:
    """`fs_stat` of many files at once (one request each on object storage, concurrent)."""
    if len(files) <= 1:
        return [fs_stat(fs, f) for f in files]
    with ThreadPoolExecutor(min(16, len(files))) as pool:
        return list(pool.map(lambda f: fs_stat(fs, f), files))


def container_identities(stats: Sequence[tuple[int, int]], owners: Sequence[int]) -> Identities:
    """Per image, the identity of the file holding it (a WebDataset shard, a Parquet file):
    `owners[i]` is the index in `stats` (taken with `fs_stats` before the files were read) of
    image i's file. A rewritten shard changes the identity of every image in it, so a resume
    refuses it (or redoes them) as it would a changed image file."""
    pairs = np.array([stats[o] for o in owners], dtype=np.int64).reshape(len(owners), 2)
    return Identities(pairs[:, 0].copy(), pairs[:, 1].copy())


def changed_images(old: Identities, new: Identities) -> np.ndarray:
    """Indices whose size, mtime or (when both have it) content hash differ."""
    diff = (old.size != new.size) | (old.mtime_ns != new.mtime_ns)
    if old.sha256 is not None and new.sha256 is not None:
        diff |= np.asarray(old.sha256, dtype=object) != np.asarray(new.sha256, dtype=object)
    return np.flatnonzero(diff)


def describe_change(path: str, i: int, old: Identities, new: Identities) -> str:
    """One image's change in words: `cat.png: 1,204 -> 1,377 bytes, modified 2026-...`."""
    return f"{path}: {_change_words(i, old, new)}"


def pair_change(recorded: tuple[int, int], now: tuple[int, int]) -> str | None:
    """How one file's (size, mtime_ns) changed since it was recorded, in `describe_change`'s
    words; None when it did not, or when either side is unknown (MISSING: gone, or not
    reported by the storage)."""
    if MISSING in recorded or MISSING in now or recorded == now:
        return None
    old = Identities(np.array([recorded[0]]), np.array([recorded[1]]))
    new = Identities(np.array([now[0]]), np.array([now[1]]))
    return _change_words(0, old, new)


def _change_words(i: int, old: Identities, new: Identities) -> str:
    parts = []
    if new.size[i] == MISSING:
        return "removed"
    if old.size[i] == MISSING:
        return "appeared"
    if old.size[i] != new.size[i]:
        parts.append(f"{old.size[i]:,} -> {new.size[i]:,} bytes")
    if old.mtime_ns[i] != new.mtime_ns[i]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(new.mtime_ns[i] / 1e9))
        parts.append(f"modified {when}")
    if old.sha256 is not None and new.sha256 is not None and old.sha256[i] != new.sha256[i]:
        parts.append("content differs")
    return ", ".join(parts) or "changed"
