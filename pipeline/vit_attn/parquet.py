"""Parquet files as a source (the Hugging Face ``datasets`` layout), local or behind a URL.

Each row is one image: ``data.image_column`` holds its encoded bytes, either as a binary
column or as the ``{bytes, path}`` struct that ``datasets`` writes for an ``Image``
feature. Rows are listed file by file in file order, so the order is deterministic. The
client reads only footers (and the ``data.id_column`` when given); workers read whole row
groups with pyarrow, only the image (and label) columns, and keep the last ones they read,
so neighbouring batches of one row group do not read it twice.
"""

from __future__ import annotations

import posixpath
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DataSourceError, ImageDecodeError
from .identity import container_identities, fs_stats
from .numbers import INT64_MAX, INT64_MIN
from .remote import access_error, url_fs
from .sources import ImageList
from .sources_remote import ReadBatch, expand_files, file_url, is_fatal, runs

__all__ = ["ParquetReader", "is_parquet_source", "list_parquet"]

DEFAULT_IMAGE_COLUMN = "image"
_LIST_THREADS = 8
_CACHED_ROW_GROUPS = 2
_cache: OrderedDict[tuple[str, str, int, tuple[str, ...]], Any] = OrderedDict()
_cache_lock = threading.Lock()


def is_parquet_source(source: str) -> bool:
    return source.lower().rstrip("/").endswith((".parquet", ".pq"))


@dataclass(frozen=True)
class _File:
    rows: list[tuple[int, int]]  # (row group, row in it) per row
    ids: list[str] | None = None
    problem: str | None = None


def list_parquet(
    source: str,
    storage_options: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    label_key: str | None = None,
) -> ImageList:
    """Every row of the Parquet files; ``image_path`` is the id column's value, else
    ``file.parquet/<row>``. A missing or unreadable file gets one failed placeholder row.

    Raises:
        DataSourceError: no file exists, a named column is missing or of the wrong type,
            ids repeat, or the storage cannot be reached.
    """
    column = image_column or DEFAULT_IMAGE_COLUMN
    fs, root, rels = expand_files(source, storage_options)
    stats = fs_stats(fs, [posixpath.join(root, r) for r in rels])  # before reading them
    urls = [file_url(fs, posixpath.join(root, r)) for r in rels]

    def scan(i: int) -> _File:
        return _scan(fs, posixpath.join(root, rels[i]), urls[i], column, id_column, label_key)

    with ThreadPoolExecutor(min(_LIST_THREADS, len(rels))) as pool:
        files = list(pool.map(scan, range(len(rels))))
    if all(f.problem and f.problem.startswith("file not found") for f in files):
        raise DataSourceError(
            f"{source}: no Parquet file exists ({urls[0]} and the rest); check data.source"
        )
    paths: list[str] = []
    locators: list[tuple[Any, ...]] = []
    first: dict[str, str] = {}
    for i, (rel, f) in enumerate(zip(rels, files)):
        for row, (rg, r) in enumerate(f.rows):
            path = f.ids[row] if f.ids is not None else f"{rel}/{row}"
            if path in first:
                raise DataSourceError(
                    f"{urls[i]}: {id_column} {path!r} repeats (first in {first[path]}); "
                    "data.id_column must be unique, or leave it out"
                )
            first[path] = rel
            paths.append(path)
            locators.append((i, rg, r))
        if f.problem is not None:
            kind = "missing" if f.problem.startswith("file not found") else "unreadable"
            paths.append(f"{rel}/<{kind}>")
            locators.append((i, f.problem))
    if not any(f.rows for f in files):
        why = next((f"{rels[i]}: {f.problem}" for i, f in enumerate(files) if f.problem), None)
        raise DataSourceError(
            f"{source}: the Parquet files hold no rows"
            + (f"; the first that could not be read: {why}" if why else "")
            + "; check data.source"
        )
    reader = ParquetReader(tuple(urls), dict(storage_options or {}), column, label_key)
    identity = {
        "kind": "parquet",
        "image_column": column,
        "id_column": id_column,
        "label_key": label_key,
    }
    held = container_identities(stats, [loc[0] for loc in locators])
    return ImageList(
        file_url(fs, root), tuple(paths), reader, tuple(locators), identity, identities=held
    )


def _scan(
    fs: Any, path: str, url: str, column: str, id_column: str | None, label_key: str | None
) -> _File:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb", cache_type="none") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            _check_column(url, schema, column, "data.image_column", _is_image_type)
            if label_key is not None:
                _check_column(url, schema, label_key, "data.label_key", pa.types.is_integer)
            ids = None
            if id_column is not None:
                _check_column(url, schema, id_column, "data.id_column", lambda t: True)
                values = pf.read(columns=[id_column]).column(0).to_pylist()
                ids = [str(v) if v is not None else "" for v in values]
                blank = next((r for r, v in enumerate(ids) if not v.strip()), None)
                if blank is not None:  # would be image_path 'None' or '', and a PNG '..png'
                    raise DataSourceError(
                        f"{url}: data.id_column {id_column!r} is empty in row {blank}; every "
                        "row needs an id, or leave id_column out"
                    )
            meta = pf.metadata
            rows = [
                (rg, r)
                for rg in range(meta.num_row_groups)
                for r in range(meta.row_group(rg).num_rows)
            ]
            return _File(rows, ids)
    except DataSourceError:
        raise
    except FileNotFoundError:
        return _File([], problem=f"file not found: {url}")
    except Exception as e:
        if is_fatal(e) or not isinstance(e, OSError | pa.ArrowException | ValueError):
            raise DataSourceError(access_error(url, e, "cannot read Parquet file")) from None
        return _File(
            [], problem=f"not a readable Parquet file ({type(e).__name__}: {str(e)[:200]})"
        )


def _is_image_type(t: Any) -> bool:
    import pyarrow as pa

    def binary(x: Any) -> bool:
        return pa.types.is_binary(x) or pa.types.is_large_binary(x) or pa.types.is_binary_view(x)

    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and binary(t.field(i).type)
    return binary(t)


def _check_column(url: str, schema: Any, name: str, key: str, ok: Any) -> None:
    if name not in schema.names:
        raise DataSourceError(
            f"{url}: no column {name!r} for {key}; the columns are {', '.join(schema.names)}"
        )
    t = schema.field(name).type
    if not ok(t):
        need = {
            "data.image_column": "image bytes (binary) or the {bytes, path} struct of `datasets`",
            "data.label_key": "integers",
        }.get(key, "another type")
        raise DataSourceError(f"{url}: column {name!r} is {t}; {key} needs {need}")


@dataclass(frozen=True)
class ParquetReader:
    """Reads a batch's rows, one row group at a time (image and label columns only)."""

    files: tuple[str, ...]
    storage_options: dict[str, Any] = field(default_factory=dict)
    image_column: str = DEFAULT_IMAGE_COLUMN
    label_column: str | None = None
    # One per listing: row groups cached in a worker that outlives a run (a Dask worker of an
    # existing scheduler) are never served to a later run, whose file may have been rewritten.
    listing: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    def read(self, paths: Sequence[str], locators: Sequence[Any] | None) -> ReadBatch:
        assert locators is not None and len(locators) == len(paths)
        n = len(paths)
        items: list[bytes | ImageDecodeError] = [ImageDecodeError("not read")] * n
        labels = np.full(n, -1, np.int64) if self.label_column else None
        columns = (self.image_column,) + ((self.label_column,) if self.label_column else ())
        # (file, row group) per image; a placeholder (the listing already knows why it
        # fails) is a run of its own
        keys = [loc[:2] if len(loc) == 3 else ("placeholder", k) for k, loc in enumerate(locators)]
        for idx in runs(keys):
            loc = locators[idx[0]]
            if len(loc) == 2:
                items[idx[0]] = ImageDecodeError(loc[1])
                continue
            url = self.files[loc[0]]
            try:
                table = self._row_group(url, loc[1], columns)
            except FileNotFoundError:
                err = ImageDecodeError(f"file not found: {url}")
                items[idx.start : idx.stop] = [err] * len(idx)
                continue
            except Exception as e:
                err = ImageDecodeError(access_error(url, e, f"cannot read row group {loc[1]}"))
                items[idx.start : idx.stop] = [err] * len(idx)
                continue
            images = table.column(self.image_column)
            for k in idx:
                row = locators[k][2]
                items[k] = _image_bytes(images[row].as_py())
                if labels is not None:
                    value = table.column(self.label_column)[row].as_py()
                    if value is not None and not INT64_MIN <= value <= INT64_MAX:  # uint64
                        items[k] = ImageDecodeError(f"label {value} does not fit an int64")
                    else:
                        labels[k] = -1 if value is None else int(value)
        return ReadBatch(items, labels)

    def _row_group(self, url: str, rg: int, columns: tuple[str, ...]) -> Any:
        import pyarrow.parquet as pq

        key = (self.listing, url, rg, columns)
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
        fs, path = url_fs(url, self.storage_options)
        with fs.open(path, "rb", cache_type="none") as f:
            table = pq.ParquetFile(f).read_row_group(rg, columns=list(columns))
        with _cache_lock:
            _cache[key] = table
            while len(_cache) > _CACHED_ROW_GROUPS:
                _cache.popitem(last=False)
        return table


def _image_bytes(value: Any) -> bytes | ImageDecodeError:
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            where = f", only the path {value['path']!r}" if value.get("path") else ""
            return ImageDecodeError(f"row holds no image bytes{where}")
        value = data
    if value is None:
        return ImageDecodeError("row holds no image bytes (null)")
    return bytes(value)
