"""Paths that are URLs: fsspec file systems for sources and stores on object storage.

A data source or a store given as ``protocol://...`` (``s3://``, ``gs://``, ``https://``,
any protocol fsspec has installed) is read and written through fsspec. Settings come from
``data.storage_options`` / ``output.storage_options`` and, for S3, from the usual AWS
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...), which
botocore reads itself. Access errors become one line that names the URL.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import DataSourceError, PipelineError

__all__ = [
    "access_error",
    "is_url",
    "join",
    "location",
    "redact",
    "url_fs",
    "zarr_store",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Keys of storage options whose values are never written into a store's attributes.
_SECRET = re.compile(r"secret|password|token|key|credential|session", re.IGNORECASE)


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether a path as the user gave it is a URL (``file://`` included), not a local path."""
    return isinstance(text, str) and bool(_URL.match(text))


_HALF_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/?(?!/)")


def half_url(text: str) -> bool:
    """`s3:/bucket/x` or `s3:bucket/x`: a URL missing a slash, which as a local path would
    silently become a folder named `s3:` (a one-letter scheme is a Windows drive)."""
    return bool(_HALF_URL.match(text)) and not is_url(text)


def location(text: str | os.PathLike[str]) -> str | Path:
    """A URL stays a string (``Path`` would fold its ``//``); anything else becomes a Path."""
    return text if isinstance(text, str) and is_url(text) else Path(text)


def join(base: str, rel: str) -> str:
    """``base/rel`` for URLs; a ``rel`` that is itself a URL stands alone. ``.`` and ``..``
    are resolved as in a local list file, never above the URL's bucket or host (object
    stores would otherwise read ``lists/../x.png`` as a key of that name)."""
    if is_url(rel):
        return rel
    joined = base.rstrip("/") + "/" + rel.lstrip("/")
    if "/." not in "/" + rel:
        return joined
    scheme, _, rest = joined.partition("://")
    host, _, path = rest.partition("/")
    normal = posixpath.normpath(path)  # ".." can only remain at its start
    if normal == ".." or normal.startswith("../"):  # climbs out of the bucket
        return joined
    return f"{scheme}://{host}/{'' if normal == '.' else normal}"


def url_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec file system for ``url`` and the path inside it.

    Raises:
        DataSourceError: the protocol is unknown, or its fsspec package is not installed.
    """
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as e:
        raise DataSourceError(
            f"{url}: this protocol needs a package that is not installed ({e}); install it"
        ) from None
    except (ValueError, TypeError) as e:
        raise DataSourceError(
            f"{url}: cannot open this URL ({_short(e)}); check the protocol and storage_options"
        ) from None


def unreachable_host(url: str, timeout: float = 10.0) -> str | None:
    """Why an HTTP(S) URL's host cannot be connected to (name lookup or TCP), or None
    (reachable, or not HTTP). Libraries say "not found" or retry for minutes instead."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:  # ValueError: a port out of range
        return str(exc) or type(exc).__name__


def access_error(url: str, exc: BaseException, what: str = "cannot read") -> str:
    """One line for a failed access: what failed, where, and what to check."""
    name = type(exc).__name__
    text = _short(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        hint = (
            "no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "or storage_options (in the config; `--storage-option` for inspect/show/stats)"
        )
    elif isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        hint = f"access denied ({text}); check the credentials and their permissions"
    elif isinstance(exc, FileNotFoundError):
        hint = "not found; check the bucket and the path"
    elif (
        name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError")
        or "connect" in text.lower()
    ):
        hint = (
            f"endpoint unreachable ({text}); check AWS_ENDPOINT_URL / endpoint_url and the network"
        )
    else:
        hint = f"{name}: {text}"
    return f"{url}: {what}: {hint}"


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


MASK = "***"


def redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options with secret values masked, for a store's attributes and logs."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = redact(value)
        elif _SECRET.search(str(key)):
            out[key] = MASK
        else:
            out[key] = value
    return out


def unmasked(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options as `redact` stored them, without the masked values: what can be used
    again (an endpoint, a region); the secrets then come from the environment."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = unmasked(value)
        elif value != MASK:
            out[key] = value
    return out


def zarr_store(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    read_only: bool = False,
) -> Any:
    """What zarr opens: the local path as a string, or an FsspecStore for a URL."""
    if not is_url(path):
        return os.fspath(path)
    from zarr.storage import FsspecStore

    url = str(path).rstrip("/")
    try:
        return FsspecStore.from_url(
            url, storage_options=dict(storage_options or {}), read_only=read_only
        )
    except (ImportError, ValueError, TypeError) as e:
        raise PipelineError(f"{url}: cannot open as a Zarr store ({_short(e)})") from None
