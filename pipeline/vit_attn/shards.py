"""WebDataset shards as a source: uncompressed tar files, local or behind a URL.

Members are grouped into samples by key as WebDataset does (the key is the member's path up
to the first dot of its file name, consecutive members with one key form a sample). Every
member with an image extension is one image, listed as ``shard.tar/key.ext`` in tar order,
shard by shard in the order the pattern expands to: the order is deterministic, so a resumed
run maps each image to the same index.

The client reads tar headers only (Python's ``tarfile`` seeks over member data); it records
each member's byte range, so a worker reads one contiguous range per shard its batch
touches (one ranged GET on object storage) and never seeks around a shard.
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DataSourceError, ImageDecodeError
from .identity import container_identities, fs_stats
from .numbers import INT64_MAX, INT64_MIN, parse_int
from .remote import access_error, url_fs
from .sources import IMAGE_EXTENSIONS, ImageList
from .sources_remote import ReadBatch, expand_files, file_url, is_fatal, runs

__all__ = ["ShardReader", "is_shard_source", "list_shards"]

log = logging.getLogger(__name__)

# WebDataset's split of a member name into key and extension (webdataset.tariterators).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
# Remote tar headers are read through a read-ahead cache of this many bytes: one request
# covers the headers of all members that fit in it.
_LIST_BLOCK = 1 << 20
_LIST_THREADS = 8
# Python and GNU tar end an archive with two zero blocks, padded to a 10 KiB record.
_END_MARKER = 1024
_MAX_TRAILER = 64 * 1024


def is_shard_source(source: str) -> bool:
    """``*.tar`` files: a pattern or a single shard (brace expansion included)."""
    return source.lower().rstrip("/").endswith(".tar")


@dataclass(frozen=True)
class _Shard:
    """What listing one shard found: (member name, locator) per image, and a problem."""

    images: list[tuple[str, tuple[int, ...]]]
    problem: str | None = None  # a placeholder row with this error follows the images


def list_shards(
    source: str, storage_options: Mapping[str, Any] | None = None, label_key: str | None = None
) -> ImageList:
    """Every image member of the shards, with the byte ranges workers read.

    A missing shard, or one that ends early or holds an unreadable header, keeps the images
    before the damage and gets one placeholder row (``shard.tar/<missing>``,
    ``shard.tar/<truncated>``) that the run records as failed with the reason.

    Raises:
        DataSourceError: no shard exists at all, the pattern is malformed, or the storage
            cannot be reached (endpoint, credentials).
    """
    fs, root, rels = expand_files(source, storage_options)
    # Before reading them: a shard rewritten meanwhile is recorded as the new one, not as
    # the old one's identity over the new one's members.
    stats = fs_stats(fs, [posixpath.join(root, r) for r in rels])
    urls = [file_url(fs, posixpath.join(root, r)) for r in rels]

    def scan(i: int) -> _Shard:
        return _scan(fs, posixpath.join(root, rels[i]), urls[i], i, label_key)

    with ThreadPoolExecutor(min(_LIST_THREADS, len(rels))) as pool:
        shards = list(pool.map(scan, range(len(rels))))
    paths: list[str] = []
    locators: list[tuple[Any, ...]] = []
    for i, (rel, shard) in enumerate(zip(rels, shards)):
        for name, loc in shard.images:
            paths.append(f"{rel}/{name}")
            locators.append(loc)
        if shard.problem is not None:
            kind = next(
                k
                for prefix, k in (("shard not found", "missing"), ("shard truncated", "truncated"))
                + (("", "unreadable"),)
                if shard.problem.startswith(prefix)
            )
            paths.append(f"{rel}/<{kind}>")
            locators.append((i, shard.problem))
    if all(s.problem and s.problem.startswith("shard not found") for s in shards):
        raise DataSourceError(
            f"{source}: no shard exists ({urls[0]} and the rest); check data.source"
        )
    if not any(s.images for s in shards):
        why = next((f"{rels[i]}: {s.problem}" for i, s in enumerate(shards) if s.problem), None)
        raise DataSourceError(
            f"{source}: the shards hold no image members ({', '.join(sorted(_IMAGE_EXTS))})"
            + (f"; the first that could not be read: {why}" if why else "")
            + "; check data.source"
        )
    _refuse_repeated_members(paths)
    root_url = file_url(fs, root)
    reader = ShardReader(tuple(urls), dict(storage_options or {}), label_key is not None)
    identity = {"kind": "webdataset", "label_key": label_key}
    held = container_identities(stats, [loc[0] for loc in locators])
    return ImageList(root_url, tuple(paths), reader, tuple(locators), identity, identities=held)


def _refuse_repeated_members(paths: list[str]) -> None:
    """Two members of one shard under the same name (a tar appended to, keys not unique)
    would be two images with one name: one PNG overwriting the other, and `show` or
    `select_image` finding the first for both. Refused, as list files and Parquet ids are."""
    seen: dict[str, int] = {}
    for i, path in enumerate(paths):
        j = seen.setdefault(path, i)
        if j != i:
            shard, _, member = path.rpartition("/")
            raise DataSourceError(
                f"shard {shard} holds the member {member!r} twice (images {j} and {i} of the "
                "listing); webdataset keys must be unique within a shard: repack it"
            )


def _scan(fs: Any, path: str, url: str, index: int, label_key: str | None) -> _Shard:
    try:
        size = fs.size(path)
        with fs.open(path, "rb", block_size=_LIST_BLOCK, cache_type="readahead") as f:
            return _members(f, size, url, index, label_key)
    except DataSourceError:
        raise
    except FileNotFoundError:
        return _Shard([], f"shard not found: {url}")
    except Exception as e:
        if is_fatal(e) or not isinstance(e, OSError | tarfile.TarError | EOFError):
            raise DataSourceError(access_error(url, e, "cannot read shard")) from None
        return _Shard([], f"shard unreadable: {type(e).__name__}: {str(e)[:200]}")


def _members(f: Any, size: int, url: str, index: int, label_key: str | None) -> _Shard:
    images: list[tuple[str, tuple[int, ...]]] = []
    sample: list[tuple[str, str, tarfile.TarInfo]] = []  # (key, ext, member) of one key
    key = None

    def flush() -> None:
        label = next((m for _, ext, m in sample if ext == label_key), None)
        loff, lsize = (label.offset_data, label.size) if label is not None else (-1, 0)
        for _, ext, m in sample:
            if ext.rsplit(".", 1)[-1].lower() in _IMAGE_EXTS:
                images.append((m.name, (index, m.offset_data, m.size, loff, lsize)))

    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
        if size == 0:
            return _Shard([], "shard truncated: empty file (0 bytes)")
        return _Shard([], f"shard is not an uncompressed tar ({e})")
    last_end, broken = 0, None
    with tf:
        members = iter(tf)
        while True:
            try:
                m = next(members)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError, OSError) as e:  # cut inside member data
                broken = str(e)
                break
            if not m.isfile():
                continue
            found = _KEY_EXT.match(m.name)
            if not found or posixpath.basename(m.name).startswith("."):
                continue
            if found[1] != key:
                flush()
                sample, key = [], found[1]
            sample.append((found[1], found[2], m))
            last_end = max(last_end, m.offset_data + m.size)
        flush()
        stopped = tf.offset  # where tarfile found the end (or gave up on a bad header)
    last = images[-1][0] if images else "the start"
    if broken is not None or last_end > size:
        # A member cut short also fails on its own when a worker reads it, with the reason.
        return _Shard(
            images, f"shard truncated after {last} ({broken or 'unexpected end of data'})"
        )
    trailer = size - stopped
    if trailer < _END_MARKER:
        return _Shard(images, f"shard truncated after {last}: no end-of-archive marker")
    f.seek(stopped)
    tail = f.read(min(trailer, _MAX_TRAILER))
    if trailer > _MAX_TRAILER or tail.count(0) != len(tail):
        return _Shard(
            images,
            f"shard unreadable from byte {stopped} (corrupt tar header); members after it are skipped",
        )
    return _Shard(images)


@dataclass(frozen=True)
class ShardReader:
    """Reads a batch's members: one contiguous byte range per shard it touches."""

    shards: tuple[str, ...]
    storage_options: dict[str, Any] = field(default_factory=dict)
    labels: bool = False

    def read(self, paths: Sequence[str], locators: Sequence[Any] | None) -> ReadBatch:
        assert locators is not None and len(locators) == len(paths)
        n = len(paths)
        items: list[bytes | ImageDecodeError] = [ImageDecodeError("not read")] * n
        labels = np.full(n, -1, np.int64) if self.labels else None
        for idx in runs([loc[0] for loc in locators]):  # one shard each
            self._read_shard(locators, idx, items, labels)
        return ReadBatch(items, labels)

    def _read_shard(
        self,
        locators: Sequence[Any],
        idx: range,
        items: list[bytes | ImageDecodeError],
        labels: np.ndarray | None,
    ) -> None:
        url = self.shards[locators[idx[0]][0]]
        spans = []
        for i in idx:
            loc = locators[i]
            if len(loc) == 2:  # a placeholder: the listing already knows why
                items[i] = ImageDecodeError(loc[1])
            else:
                spans.append(i)
        if not spans:
            return
        ranges = [(locators[i][1], locators[i][2]) for i in spans]
        if labels is not None:
            ranges += [(locators[i][3], locators[i][4]) for i in spans if locators[i][3] >= 0]
        first = min(off for off, _ in ranges)
        end = max(off + size for off, size in ranges)
        try:
            fs, path = url_fs(url, self.storage_options)
            data = fs.cat_file(path, start=first, end=end)
        except FileNotFoundError:
            for i in spans:
                items[i] = ImageDecodeError(f"shard not found: {url}")
            return
        except Exception as e:
            for i in spans:
                items[i] = ImageDecodeError(access_error(url, e, "cannot read shard"))
            return
        if len(data) > end - first:
            # A server that ignores range requests sends the whole file (HTTP 200): the
            # bytes asked for are where they lie in it, not at its start.
            data = data[first:end]
        have = first + len(data)
        for i in spans:
            _, off, size, loff, lsize = locators[i]
            if off + size > have:
                items[i] = ImageDecodeError(
                    f"shard truncated: the member needs bytes {off}..{off + size}, the shard ends at {have}"
                )
                continue
            items[i] = bytes(data[off - first : off - first + size])
            if labels is None or loff < 0:
                continue
            try:
                if loff + lsize > have:
                    raise ImageDecodeError(
                        f"shard truncated: the label member needs bytes {loff}..{loff + lsize}, "
                        f"the shard ends at {have}"
                    )
                labels[i] = _label(data[loff - first : loff - first + lsize])
            except ImageDecodeError as exc:  # the sample fails alone, with the reason
                items[i] = exc


def _label(raw: bytes) -> int:
    """A WebDataset class label: the member's text as an int64.

    Anything else fails its sample (ImageDecodeError): stored as -1 it would read as "no label".
    """
    text = raw.decode("utf-8", errors="replace").strip()
    value = parse_int(text)
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        raise ImageDecodeError(
            f"label member is not an integer (int64): {text[:40]!r}; fix the shard or leave "
            "data.label_key out"
        )
    return value
