"""The pipeline's exceptions: one base class the CLI turns into a one-line message.

Each subclass also derives from the builtin that fits, so callers can catch either.
"""

from __future__ import annotations


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


def describe_os_error(exc: OSError) -> str:
    """One line for an OS error: the path and the cause (`/out/run.zarr/x: No space left ...`)."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {cause}" if where else cause
