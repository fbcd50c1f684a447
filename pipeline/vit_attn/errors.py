"""The pipeline's exceptions: one base class the CLI turns into a one-line message.

Each subclass also derives from the builtin that fits, so callers can catch either.
"""

from __future__ import annotations

import errno
import logging
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class PipelineError(Exception):
    """Base of every error caused by input, config or environment (not by a bug)."""


class ConfigError(PipelineError, ValueError):
    """The config file or an override is invalid."""


class DataSourceError(PipelineError, FileNotFoundError):
    """The data source (folder, glob, list file) is missing or holds no images."""


class ImageDecodeError(PipelineError, ValueError):
    """One image cannot be decoded; recorded per image, never fatal for a run."""


class ModelError(PipelineError, ValueError):
    """The model cannot be built or has no attention blocks to expose."""


class CheckpointError(ModelError):
    """A checkpoint file is missing, corrupt or does not match the model."""


class ExportError(PipelineError, RuntimeError):
    """The ONNX export or its precision conversion failed."""


class BackendError(PipelineError, RuntimeError):
    """The inference backend cannot run as configured (e.g. CUDA requested but not loaded)."""


class StoreError(PipelineError, OSError):
    """The output store is unusable: wrong format, fingerprint mismatch, or would be overwritten."""


class ImageSelectionError(PipelineError, IndexError, KeyError):
    """An image asked for by index or path is not in the store (an IndexError and a KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SourceChangedError(PipelineError):
    """An input file differs from the one the store's attention was computed from."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes.

    Library errors (torch's exporter, onnxruntime) carry pages of detail; a user gets one line
    and the full text goes to the debug log. Falls back to the exception's type name.
    """
    for line in _ANSI.sub("", str(exc)).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """One line for an OS error: the path and the cause (`/out/run.zarr/x: No space left ...`)."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {cause}" if where else cause


# OS errors that no retry fixes: the disk or quota is full, the file system is read-only, or
# permission is denied. A task hitting one reports it instead of raising, so Dask does not
# retry it on every worker (a retry storm of tracebacks), and the run stops with one line.
UNRECOVERABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)


def unrecoverable(exc: BaseException, where: str = "") -> str | None:
    """The one-line reason when `exc` is an OS error that retrying cannot fix, else None.

    `where` names the place when the error carries no file name (zarr's writes do not)."""
    if isinstance(exc, OSError) and exc.errno in UNRECOVERABLE_ERRNOS:
        line = describe_os_error(exc)
        return line if exc.filename is not None or not where else f"{where}: {line}"
    return None


# Loggers of the libraries a run drives (Dask's scheduler and client, their event loop).
LIBRARY_LOGGERS = ("distributed", "tornado", "dask_jobqueue")


# distributed's words for a worker process that died mid-run (the nanny starts another),
# and ours: the task keys, stimulus ids and nanny status mean nothing to a user.
_LOST_WORKER = re.compile(
    r"Removing worker '([^']*)' caused the cluster to lose already computed task\(s\), "
    r"which will be recomputed elsewhere: (\{.*\}|set\(\))"
)
_RESTARTING = "Restarting worker (status="
# The client's retries of results a lost worker held: done without a word (the loss is said).
_SILENT = ("Couldn't gather keys: ", "Couldn't gather ")


class LibraryTracebackFilter(logging.Filter):
    """Without -v, the libraries' own tracebacks (a client reconnecting to a scheduler that
    died) are not printed: the run's error line says what happened and what to do. Their
    message stays, where there is one; a worker lost mid-run is said in our words."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] not in LIBRARY_LOGGERS:
            return True
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
            return bool(str(record.getMessage()).strip())
        text = str(record.getMessage())
        if lost := _LOST_WORKER.match(text):
            count = lost.group(2).count("vit-attn-batch-")
            batches = f"{count} batch{'es' if count != 1 else ''}" if count else "work"
            record.msg = (
                "a worker process (%s) died; %s it had finished but not yet handed over "
                "will be done again by the others (the store is not affected)"
            )
            record.args = (lost.group(1), batches)
        elif text.startswith(_RESTARTING):
            record.msg, record.args = "starting a worker in place of the one that died", ()
        elif text.startswith(_SILENT) and "vit-attn-batch-" in text:
            return False
        return True


def hide_library_tracebacks(*handlers: logging.Handler) -> None:
    """Attach one LibraryTracebackFilter to each handler (once)."""
    for handler in handlers:
        if not any(isinstance(f, LibraryTracebackFilter) for f in handler.filters):
            handler.addFilter(LibraryTracebackFilter())
