"""Sources behind fsspec URLs: folders, globs and list files on object storage or HTTP.

The client only lists; workers read their own images (`FileReader.read`, one concurrent
``cat`` per batch), so no image bytes pass through the client. Also the pieces the shard
and Parquet sources share: brace expansion and globbing of file sets, local or remote.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import DataSourceError, ImageDecodeError
from .identity import MISSING, Identities, fs_stats, info_stat
from .remote import access_error, is_url, join, unreachable_host, url_fs
from .sources import IMAGE_EXTENSIONS, ImageList, csv_entries, text_entries

__all__ = ["FileReader", "ReadBatch", "expand_files", "list_remote"]

_GLOB_CHARS = frozenset("*?[")
# Errors of a listing call that mean "the service or the credentials", never "no such file".
_FATAL = (PermissionError, ConnectionError, TimeoutError)
# A list file's images in one folder: from this many on, a listing of the folder tells their
# sizes and times instead of a request per image. A listing costs a request per 1,000 objects
# of the folder (sequential), whatever the list names: below 1,000 names, one concurrent
# request each is never much slower, and a subset of a huge folder stays cheap.
_LIST_FOLDER_FROM = 1000
# Protocols whose files have no listing and often no size or time: no identity recorded.
_UNIDENTIFIED = frozenset({"http", "https"})


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
            root, infos, passed_over = _glob(fs, path)
            if not infos:  # every regular file: the pattern is the user's filter
                raise DataSourceError(f"{source}: pattern matches no files; check data.source")
            rels = sorted(infos)
            stats = [info_stat(infos[r]) for r in rels]
            listed = _image_list(fs, root, rels, storage_options, stats)
            return replace(
                listed, skipped=len(passed_over), skipped_examples=tuple(sorted(passed_over)[:3])
            )
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
        unreachable = unreachable_host(source)  # fsspec's HTTP says "not found" for either
        if unreachable is not None:
            raise DataSourceError(
                f"{source}: cannot list: host unreachable ({unreachable}); check the URL and "
                "the network"
            ) from None
        raise DataSourceError(f"{source}: no such folder or list file; check data.source") from None
    except Exception as e:  # botocore/aiohttp errors have no common base; name the URL
        raise _listing_error(source, e) from None


def _image_list(
    fs: Any,
    root: str,
    rels: Sequence[str],
    storage_options: Mapping[str, Any] | None,
    stats: Sequence[tuple[int, int]],
) -> ImageList:
    """The listing, with each image's size and time as the listing saw them (a resume
    notices an object rewritten since, as it does a local file)."""
    root_url = fs.unstrip_protocol(root).rstrip("/")
    pairs = np.array(stats, dtype=np.int64).reshape(len(rels), 2)
    return ImageList(
        root_url,
        tuple(rels),
        reader=FileReader(root_url, dict(storage_options or {})),
        identities=Identities(pairs[:, 0].copy(), pairs[:, 1].copy()),
    )


def _list_folder(
    fs: Any, source: str, path: str, storage_options: Mapping[str, Any] | None
) -> ImageList:
    root = path.rstrip("/")
    found: dict[str, tuple[int, int]] = {}
    passed_over: list[str] = []  # hidden or not images: counted, as for a local folder
    for name, info in fs.find(root, detail=True).items():
        # A key such as `ds//x.png` cannot be named under the root: passed over.
        rel = _under(name, root)
        hidden = any(part.startswith(".") or not part for part in rel.split("/"))
        if not hidden and _is_image_name(rel):
            found[rel] = info_stat(info)
        else:
            passed_over.append(rel)
    if not found:
        raise DataSourceError(
            f"{source}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); check data.source"
        )
    rels = sorted(found)
    listed = _image_list(fs, root, rels, storage_options, [found[r] for r in rels])
    return replace(
        listed, skipped=len(passed_over), skipped_examples=tuple(sorted(passed_over)[:3])
    )


def _glob(fs: Any, pattern: str) -> tuple[str, dict[str, dict[str, Any]], list[str]]:
    """Every regular file the pattern matches, by its path relative to the pattern's fixed
    folder, with its listing entry; and the keys passed over: one with an empty folder such
    as `ds//x.png` has no relative path that names it (relpath would name `ds/x.png`)."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = "/".join(parts[:fixed])
    found: dict[str, dict[str, Any]] = {}
    passed_over: list[str] = []
    for name, info in fs.glob(pattern, detail=True).items():
        if info.get("type") != "file":
            continue
        rel = _under(name, root)
        if rel.startswith("../") or not all(rel.split("/")):
            passed_over.append(rel)
        else:
            found[rel] = info
    return root, found, passed_over


def _list_file(
    fs: Any,
    source: str,
    path: str,
    suffix: str,
    storage_options: Mapping[str, Any] | None,
) -> ImageList:
    """One path a line (``#`` comments), or a CSV's ``path`` column (else its first)."""
    try:
        text = fs.cat_file(path).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataSourceError(f"{source}: the list is not UTF-8 text; save it as UTF-8") from None
    if suffix == ".txt":
        entries = text_entries(text.splitlines())
    else:  # a first cell without an image extension is a header, such as filename,label
        entries = csv_entries(
            source, io.StringIO(text, newline=""), lambda c: not _is_image_name(c)
        )
    if not entries:
        raise DataSourceError(f"{source}: list file names no images; add one path a line")
    root = posixpath.dirname(path)
    root_url = fs.unstrip_protocol(root).rstrip("/")
    first: dict[str, int] = {}
    for no, entry in entries:
        key = join(root_url, entry)  # what is read: `/x.png` and `x.png` are one object
        if key in first:
            raise DataSourceError(
                f"{source}: line {no} repeats {entry!r} (first on line {first[key]}); remove the duplicate"
            )
        first[key] = no
    rels = [e for _, e in entries]
    stats = _listed_stats([join(root_url, e) for e in rels], fs, root_url.split("://", 1)[0])
    return _image_list(fs, root, rels, storage_options, stats)


def _listed_stats(urls: Sequence[str], own_fs: Any, own: str) -> list[tuple[int, int]]:
    """Size and time of each image a list file names, MISSING where unknown (an HTTP URL,
    an object that is not there: it fails as "file not found" when read).

    Images sharing a folder are identified by listing that folder once where enough of them
    do; others by one `info` each, concurrently. A folder that cannot be listed (read-only
    credentials) falls back to `info`. Never raises: an identity is a check, not a read."""
    stats = [(MISSING, MISSING)] * len(urls)
    by_protocol: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        by_protocol.setdefault(url.split("://", 1)[0], []).append(i)
    for protocol, idx in by_protocol.items():
        if protocol in _UNIDENTIFIED:
            continue
        try:
            fs = own_fs if protocol == own else url_fs(urls[idx[0]], {})[0]
            paths = {i: fs._strip_protocol(urls[i]) for i in idx}
        except Exception:  # an unknown protocol: its images fail when read, saying why
            continue
        folders: dict[str, list[int]] = {}
        for i in idx:
            folders.setdefault(posixpath.dirname(paths[i]), []).append(i)
        one_by_one: list[int] = []
        for folder, members in folders.items():
            if len(members) < _LIST_FOLDER_FROM:
                one_by_one += members
                continue
            try:
                entries = {e["name"]: e for e in fs.ls(folder, detail=True)}
            except Exception:
                one_by_one += members
                continue
            for i in members:
                entry = entries.get(paths[i])
                if entry is not None and entry.get("type") == "file":
                    stats[i] = info_stat(entry)
        for i, got in zip(one_by_one, fs_stats(fs, [paths[i] for i in one_by_one]), strict=True):
            stats[i] = got
    return stats


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
    return fs, *_common_root(source, files)


def _common_root(source: str, files: list[str]) -> tuple[str, list[str]]:
    """The files' common folder and each file under it. An HTTP file system keeps whole URLs
    as its paths: their `scheme://host` is set apart (posixpath would fold its `//`), and
    files on different hosts have no common folder."""
    base = ""
    paths = files
    if "://" in files[0]:
        heads = {
            f.split("://", 1)[0] + "://" + f.split("://", 1)[1].split("/", 1)[0] for f in files
        }
        if len(heads) > 1:
            raise DataSourceError(
                f"{source}: the files lie on {len(heads)} hosts ({', '.join(sorted(heads)[:2])}"
                "...); list them in a list file instead"
            )
        base = heads.pop()
        paths = ["/" + f[len(base) :].lstrip("/") for f in files]
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    return base + root, [_under(p, root) for p in paths]


def _under(name: str, root: str) -> str:
    """`name` relative to `root` by plain prefix: relpath would fold the empty folder of a
    key such as `ds//x.png` into `ds/x.png`, another object."""
    prefix = root.rstrip("/") + "/"
    return name[len(prefix) :] if name.startswith(prefix) else posixpath.relpath(name, root)


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
