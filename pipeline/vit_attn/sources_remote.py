"""Sources behind fsspec URLs: folders, globs and list files on object storage or HTTP.

The client only lists; workers read their own images (`FileReader.read`, one concurrent
``cat`` per batch), so no image bytes pass through the client. Also the pieces the shard
and Parquet sources share: brace expansion and globbing of file sets, local or remote.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import DataSourceError, ImageDecodeError
from .remote import access_error, is_url, join, url_fs
from .sources import IMAGE_EXTENSIONS, ImageList

__all__ = ["FileReader", "ReadBatch", "expand_files", "list_remote"]

_GLOB_CHARS = frozenset("*?[")
# Errors of a listing call that mean "the service or the credentials", never "no such file".
_FATAL = (PermissionError, ConnectionError, TimeoutError)


@dataclass
class ReadBatch:
    """What a reader hands the task: per image its bytes or the reason it has none; labels
    (int64, -1 where a sample has none) when the source has a label key."""

    items: list[bytes | ImageDecodeError]
    labels: np.ndarray | None = None


def runs(keys: Sequence[Hashable]) -> Iterator[range]:
    """Index ranges of consecutive equal keys: a batch's images that one read can serve
    (one shard's byte span, one Parquet row group), in order."""
    start = 0
    while start < len(keys):
        stop = start + 1
        while stop < len(keys) and keys[stop] == keys[start]:
            stop += 1
        yield range(start, stop)
        start = stop


def _listing_error(url: str, exc: BaseException) -> DataSourceError:
    return DataSourceError(access_error(url, exc, "cannot list"))


def _is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_remote(source: str, storage_options: Mapping[str, Any] | None = None) -> ImageList:
    """A folder (recursive), glob or ``.txt``/``.csv`` list file behind a URL, ordered like
    a local one: folders and globs by relative path, list files as written."""
    fs, path = url_fs(source, storage_options)
    fs.invalidate_cache()  # a listing sees the storage as it is now, not as this process saw it
    try:
        if any(c in path for c in _GLOB_CHARS):
            root, rels = _glob(fs, path)
            if not rels:  # every regular file: the pattern is the user's filter
                raise DataSourceError(f"{source}: pattern matches no files; check data.source")
            return _image_list(fs, root, rels, storage_options)
        info = fs.info(path)
        if info.get("type") == "directory":
            return _list_folder(fs, source, path, storage_options)
        suffix = posixpath.splitext(path)[1].lower()
        if suffix in (".txt", ".csv"):
            return _list_file(fs, source, path, suffix, storage_options)
        raise DataSourceError(
            f"{source}: not a folder, glob or list file; give a folder, a pattern, or a .txt/.csv list"
        )
    except DataSourceError:
        raise
    except FileNotFoundError:
        raise DataSourceError(f"{source}: no such folder or list file; check data.source") from None
    except Exception as e:  # botocore/aiohttp errors have no common base; name the URL
        raise _listing_error(source, e) from None


def _image_list(
    fs: Any, root: str, rels: Sequence[str], storage_options: Mapping[str, Any] | None
) -> ImageList:
    root_url = fs.unstrip_protocol(root).rstrip("/")
    return ImageList(
        root_url, tuple(rels), reader=FileReader(root_url, dict(storage_options or {}))
    )


def _list_folder(
    fs: Any, source: str, path: str, storage_options: Mapping[str, Any] | None
) -> ImageList:
    root = path.rstrip("/")
    found: list[str] = []
    passed_over: list[str] = []  # hidden or not images: counted, as for a local folder
    for name in fs.find(root):
        rel = posixpath.relpath(name, root)
        hidden = any(part.startswith(".") for part in rel.split("/"))
        (found if not hidden and _is_image_name(rel) else passed_over).append(rel)
    if not found:
        raise DataSourceError(
            f"{source}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); check data.source"
        )
    listed = _image_list(fs, root, sorted(found), storage_options)
    return replace(
        listed, skipped=len(passed_over), skipped_examples=tuple(sorted(passed_over)[:3])
    )


def _glob(fs: Any, pattern: str) -> tuple[str, list[str]]:
    """Every regular file the pattern matches, relative to the pattern's fixed folder."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = "/".join(parts[:fixed])
    matches = fs.glob(pattern, detail=True)
    rels = sorted(
        posixpath.relpath(name, root)
        for name, info in matches.items()
        if info.get("type") == "file"
    )
    return root, rels


def _list_file(
    fs: Any,
    source: str,
    path: str,
    suffix: str,
    storage_options: Mapping[str, Any] | None,
) -> ImageList:
    """One path a line (``#`` comments), or a CSV's ``path`` column (else its first)."""
    text = fs.cat_file(path).decode("utf-8-sig")
    if suffix == ".txt":
        entries = [
            (no, s)
            for no, line in enumerate(text.splitlines(), 1)
            if (s := line.strip()) and s[0] != "#"
        ]
    else:
        reader = csv.reader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
        column, body = 0, rows
        if rows:
            header = [c.strip().lower() for c in rows[0][1]]
            if "path" in header:
                column, body = header.index("path"), rows[1:]
            elif not _is_image_name(rows[0][1][0].strip()):
                body = rows[1:]  # a header such as filename,label
        entries = [(no, row[column].strip()) for no, row in body if len(row) > column]
        entries = [(no, s) for no, s in entries if s]
    if not entries:
        raise DataSourceError(f"{source}: list file names no images; add one path a line")
    first: dict[str, int] = {}
    for no, entry in entries:
        key = posixpath.normpath(entry) if not is_url(entry) else entry
        if key in first:
            raise DataSourceError(
                f"{source}: line {no} repeats {entry!r} (first on line {first[key]}); remove the duplicate"
            )
        first[key] = no
    root = posixpath.dirname(path)
    return _image_list(fs, root, [e for _, e in entries], storage_options)


@dataclass(frozen=True)
class FileReader:
    """Reads whole image files below a URL, in the worker that decodes them."""

    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def read(self, paths: Sequence[str], locators: Sequence[Any] | None = None) -> ReadBatch:
        urls = [join(self.root, p) for p in paths]
        items: list[bytes | ImageDecodeError] = [ImageDecodeError("not read")] * len(urls)
        by_protocol: dict[str, list[int]] = {}
        for i, url in enumerate(urls):
            by_protocol.setdefault(url.split("://", 1)[0], []).append(i)
        own = self.root.split("://", 1)[0]
        for protocol, idx in by_protocol.items():
            options = self.storage_options if protocol == own else {}
            try:
                fs, _ = url_fs(urls[idx[0]], options)
                # cat_ranges, not cat: cat expands glob characters, and a key such as
                # "[x]*.png" is a name, not a pattern. Whole files, read concurrently.
                got = fs.cat_ranges([urls[i] for i in idx], None, None, on_error="return")
            except Exception as e:  # the whole group failed: each image says why
                for i in idx:
                    items[i] = ImageDecodeError(access_error(urls[i], e))
                continue
            for i, value in zip(idx, got, strict=True):
                items[i] = _one(value)
        return ReadBatch(items)


def _one(value: Any) -> bytes | ImageDecodeError:
    if isinstance(value, bytes):
        return value
    if isinstance(value, FileNotFoundError):
        return ImageDecodeError("file not found")
    if isinstance(value, BaseException):
        return ImageDecodeError(f"cannot read file ({type(value).__name__}: {str(value)[:200]})")
    return ImageDecodeError(f"cannot read file (got {type(value).__name__})")


def expand_files(
    source: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str, list[str]]:
    """The files of a file-set source: brace expansion, then globbing, in the given order.

    Returns the file system, the common parent folder (fs path) and each file relative to
    it. Literal names are kept even when missing: their source turns them into failed rows.
    """
    from braceexpand import braceexpand

    try:
        patterns = list(braceexpand(source)) if "{" in source else [source]
    except Exception as e:  # unbalanced braces and the like
        raise DataSourceError(f"{source}: cannot expand braces ({e}); check data.source") from None
    if is_url(source):
        fs, _ = url_fs(source, storage_options)
        fs.invalidate_cache()
    else:
        fs, _ = url_fs("file:///", {})
        patterns = [os.path.abspath(os.path.expanduser(p)) for p in patterns]
    files: list[str] = []
    for pattern in patterns:
        path = fs._strip_protocol(pattern)
        if any(c in path for c in _GLOB_CHARS):
            try:
                matches = fs.glob(path, detail=True)
            except Exception as e:
                raise _listing_error(pattern, e) from None
            files += sorted(n for n, info in matches.items() if info.get("type") == "file")
        else:
            files.append(path)
    if not files:
        raise DataSourceError(f"{source}: pattern matches no files; check data.source")
    seen: set[str] = set()
    for f in files:
        if f in seen:
            raise DataSourceError(f"{source}: {f} is listed twice; remove the duplicate")
        seen.add(f)
    root = posixpath.dirname(files[0]) if len(files) == 1 else posixpath.commonpath(files)
    return fs, root, [posixpath.relpath(f, root) for f in files]


def file_url(fs: Any, path: str) -> str:
    """A file-set member as workers open it: a URL for remote file systems, else the path."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if "file" in protocols else fs.unstrip_protocol(path)


def is_fatal(exc: BaseException) -> bool:
    """Whether an error reading one file of a set is about access (stop the run), not the file."""
    name = type(exc).__name__
    return isinstance(exc, _FATAL) or name in (
        "NoCredentialsError",
        "PartialCredentialsError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",
    )
