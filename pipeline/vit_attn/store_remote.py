"""Stores behind a URL (``s3://bucket/run.zarr``): creation and the root metadata read.

Object storage has no rename, so the local build-then-rename step cannot make creation
atomic. Instead the root ``zarr.json`` is written first without the ``format`` attribute
(``format_pending`` instead) and rewritten with it after every array and the image paths
exist: a creation cut short is never taken for a store, and the next run may replace it.
What holds on object storage is in docs/STORE.md ("Stores on object storage").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import zarr

from .errors import StoreError
from .remote import access_error, url_fs, zarr_store

__all__ = ["create_remote", "read_root_text"]

PENDING = "format_pending"


def read_root_text(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The root ``zarr.json`` of the store at ``url``; None when there is none.

    Raises:
        StoreError: the storage cannot be reached or refuses access (one line with the URL).
    """
    fs, path = url_fs(url, storage_options)
    try:
        return fs.cat_file(path.rstrip("/") + "/zarr.json").decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return ""
    except Exception as e:  # botocore and aiohttp errors share no base class
        raise StoreError(access_error(url, e, "cannot read the store")) from None


def create_remote(
    url: str,
    spec: Any,
    image_paths: Sequence[str],
    attrs: Mapping[str, Any],
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
) -> zarr.Group:
    """Create the store template at ``url``: refuse or replace what is there, then write
    every array and mark the root as a store last."""
    from .store import FORMAT, FORMAT_VERSION, _read_root_metadata, populate

    fs, path = url_fs(url, storage_options)
    meta = _read_root_metadata(url, storage_options)
    found = (meta or {}).get("attributes", {})
    ours = found.get("format") == FORMAT
    interrupted = found.get(PENDING) == FORMAT
    if ours and not overwrite:
        raise StoreError(
            f"{url} already holds a {FORMAT}; resume it with the same config, "
            "or pass overwrite to replace it"
        )
    try:
        if ours or interrupted:
            fs.rm(path, recursive=True)
        elif found_keys := fs.find(path, maxdepth=None, withdirs=False)[:1]:
            raise StoreError(
                f"{url} exists and is not a {FORMAT} (it holds {found_keys[0]}, ...); refusing "
                "to overwrite what is not ours: if these are the remains of a deleted store, "
                "delete the prefix yourself; else choose another output.store"
            )
        store = zarr_store(url, storage_options)
        group = zarr.create_group(
            store, attributes={PENDING: FORMAT, "format_version": FORMAT_VERSION, **attrs}
        )
        populate(group, spec, image_paths)
        group.attrs.put({"format": FORMAT, "format_version": FORMAT_VERSION, **attrs})
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(access_error(url, e, "cannot write the store")) from None
    return zarr.open_group(zarr_store(url, storage_options), mode="r+")


def probe_store(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail fast, before any model is loaded: the storage answers and the bucket exists.

    Raises:
        StoreError: unreachable endpoint, missing credentials, no such bucket (one line).
    """
    if read_root_text(url, storage_options) is not None:
        return
    fs, path = url_fs(url, storage_options)
    bucket = path.strip("/").split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise StoreError(f"{url}: bucket {bucket!r} does not exist; create it first") from None
    except Exception as e:
        raise StoreError(access_error(url, e, "cannot reach the store's bucket")) from None
