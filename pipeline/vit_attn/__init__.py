"""Exact Vision Transformer attention maps over whole image datasets."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open_store", "select_image"]


def open_store(path, storage_options=None):  # noqa: ANN001,ANN201 - re-exported lazily to keep `import vit_attn` light
    """Open a store (a folder, or a URL such as s3://bucket/run.zarr) as a lazy
    xarray.Dataset (see `vit_attn.store.open_dataset`)."""
    from .store import open_dataset

    return open_dataset(path, storage_options=storage_options)


def select_image(ds, image):  # noqa: ANN001,ANN201 - re-exported lazily, like open_store
    """One image of an opened store, by index or by its listed path (see `vit_attn.analysis.select_image`)."""
    from .analysis import select_image as _select

    return _select(ds, image)
