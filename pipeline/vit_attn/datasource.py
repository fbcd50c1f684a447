"""Which source kind ``data.source`` names, and its listing.

- ``*.tar`` (a pattern with ``{000..099}`` braces or globs, local or a URL): WebDataset
  shards (`vit_attn.shards`).
- ``*.parquet``: Parquet files with an image column (`vit_attn.parquet`).
- any other URL: a folder, glob or list file on object storage or HTTP
  (`vit_attn.sources_remote`).
- anything else: a local folder, glob or list file (`vit_attn.sources`), read by path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError
from .remote import is_url
from .sources import ImageList, list_images

__all__ = ["listing_changes", "open_source", "source_kind"]


def source_kind(source: str) -> str:
    """'webdataset', 'parquet', 'remote' or 'local'."""
    from .parquet import is_parquet_source
    from .shards import is_shard_source

    if is_shard_source(source):
        return "webdataset"
    if is_parquet_source(source):
        return "parquet"
    return "remote" if is_url(source) else "local"


def open_source(
    source: str,
    storage_options: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    label_key: str | None = None,
) -> ImageList:
    """List the images of a source of any kind, refusing keys that do not apply to it."""
    kind = source_kind(source)
    misplaced = [
        key
        for key, value, kinds in (
            ("data.image_column", image_column, ("parquet",)),
            ("data.id_column", id_column, ("parquet",)),
            ("data.label_key", label_key, ("parquet", "webdataset")),
        )
        if value is not None and kind not in kinds
    ]
    if misplaced:
        raise ConfigError(
            f"{', '.join(misplaced)}: only for {'Parquet' if 'label' not in misplaced[0] else 'shard or Parquet'} "
            f"sources, and data.source {source!r} is a {kind} source"
        )
    if storage_options and not is_url(source):
        raise ConfigError(
            f"data.storage_options: data.source {source!r} is a local path; options apply to URLs only"
        )
    if kind == "webdataset":
        from .shards import list_shards

        return list_shards(source, storage_options, label_key)
    if kind == "parquet":
        from .parquet import list_parquet

        return list_parquet(source, storage_options, image_column, id_column, label_key)
    if kind == "remote":
        from .sources_remote import list_remote

        return list_remote(source, storage_options)
    return list_images(source)


def listing_changes(old: Sequence[str], new: Sequence[str], show: int = 3) -> str:
    """What changed between the images a store was made from and the source now, in words:
    e.g. "the source changed: 2 images added (a.png, b.png), 1 removed (c.png)"."""
    before, after = set(old), set(new)
    added = [p for p in new if p not in before]
    removed = [p for p in old if p not in after]

    def some(paths: list[str]) -> str:
        more = f", ... {len(paths) - show} more" if len(paths) > show else ""
        return f" ({', '.join(paths[:show])}{more})" if paths else ""

    if not added and not removed:
        return "the source lists the same images in another order"
    noun = "image" if len(added) == 1 else "images"
    return f"the source changed: {len(added)} {noun} added{some(added)}, {len(removed)} removed{some(removed)}"
