"""The pipeline's exceptions: one base class the CLI turns into a one-line message.

Each subclass also derives from the builtin that fits, so callers can catch either.
"""

from __future__ import annotations

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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes.

    Library errors (torch's exporter, onnxruntime) carry pages of detail; a user gets one line
    and the full text goes to the debug log. Falls back to the exception's type name.
    """
    for line in _ANSI.sub("", str(exc)).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
