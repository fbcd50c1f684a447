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

from .errors import ConfigError, ImageDecodeError, PipelineError, SourceChangedError, first_line
from .identity import MISSING, fs_stat, pair_change
from .remote import is_url, join, unmasked, url_fs
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


def read_listed_image(
    attrs: Mapping[str, Any], rel: str, expected: tuple[int, int] | None = None
) -> bytes | None:
    """The bytes of one image of a store, found again from the store's attributes (for
    ``vit-attn show`` and the viewer): None for local files (read by path).

    Reads one shard's headers, one Parquet row group (or, with an id column, the source's
    ids), or one object, with the run's `data.storage_options` as the store recorded them
    (an endpoint, a region); the secrets it masked come from the environment.

    `expected`: the (size, mtime_ns) the store recorded for the object, or the shard or
    Parquet file, holding the image; one that is not that any more is SourceChangedError.

    Raises:
        ImageDecodeError: the image cannot be read from its source, with the reason.
        SourceChangedError: its object, shard or Parquet file changed since the run.
    """
    root = str(attrs.get("image_root", ""))
    source = attrs.get("fingerprint_inputs", {}).get("source") or {}
    kind = source.get("kind")
    config = attrs.get("config", {}).get("data", {})
    options = unmasked(config.get("storage_options") or {})
    try:
        if kind is None:
            if not is_url(root) and not is_url(rel):
                return None
            if expected is not None and MISSING not in expected:  # HTTP: none recorded
                url = join(root, rel)
                same = url.split("://", 1)[0] == root.split("://", 1)[0]
                fs, path = url_fs(url, options if same else {})
                _same_file(rel, expected, fs_stat(fs, path), "it")
            items = _file_reader(root, options).read([rel]).items
        elif kind == "webdataset":
            items = _one_shard_member(root, rel, options, expected)
        else:
            from .parquet import list_parquet

            listed = list_parquet(
                str(config["source"]), options, source.get("image_column"), source.get("id_column")
            )
            locators = listed.locators or ()
            index = listed.paths.index(rel)
            if expected is not None and listed.identities is not None:
                ids = listed.identities
                _same_file(rel, expected, (int(ids.size[index]), int(ids.mtime_ns[index])))
            items = listed.reader.read([rel], [locators[index]]).items
    except SourceChangedError:
        raise
    except (PipelineError, ValueError, KeyError, OSError) as exc:
        raise ImageDecodeError(
            f"cannot read it from its source {root}: {first_line(exc)}"
        ) from None
    item = items[0] if items else ImageDecodeError(f"{rel} is no longer in its source {root}")
    if isinstance(item, ImageDecodeError):
        raise item
    return bytes(item)


def _file_reader(root: str, options: dict[str, Any]) -> Any:
    from .sources_remote import FileReader

    return FileReader(root, options)


def _same_file(
    rel: str, expected: tuple[int, int], now: tuple[int, int], what: str = "the file holding it"
) -> None:
    """Refuse an image whose object, shard or Parquet file is not the one the run read."""
    change = pair_change(expected, now)
    if change is None:
        return
    raise SourceChangedError(
        f"{rel}: {what} changed since the run ({change}): "
        "the stored attention belongs to the old one; rerun `vit-attn run CONFIG "
        "--redo-changed` to recompute it"
    )


def _one_shard_member(
    root: str, rel: str, options: dict[str, Any], expected: tuple[int, int] | None = None
) -> list[Any]:
    from .remote import url_fs
    from .shards import ShardReader, _scan

    shard_rel, sep, member = rel.partition(".tar/")
    if not sep:
        return []
    url = (root.rstrip("/") + "/" if root else "") + shard_rel + ".tar"
    fs, path = url_fs(url, options)
    if expected is not None:
        _same_file(rel, expected, fs_stat(fs, path))
    scanned = _scan(fs, path, url, 0, None)
    for name, loc in scanned.images:
        if name == member:
            return ShardReader((url,), options).read([rel], [loc]).items
    return []
