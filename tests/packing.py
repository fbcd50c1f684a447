"""The same images as WebDataset shards or as a Parquet file (the Hugging Face layout).

Written with the standard library's tarfile and with pyarrow, independently of the readers
under test, so a run from the packed form can be compared with a run from the folder.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def folder_files(root: Path) -> list[str]:
    """The images of a folder in the order a folder source lists them (sorted POSIX paths)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_shards(
    root: Path,
    names: Sequence[str],
    out: Path,
    per_shard: int,
    labels: Mapping[str, int] | None = None,
    extras: bool = False,
) -> list[Path]:
    """``out/train-000000.tar``, ...: each image a member named by its relative path; with
    ``labels`` a ``<key>.cls`` member after it, with ``extras`` a ``<key>.json`` before it."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(names), per_shard):
        path = out / f"train-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for name in names[s : s + per_shard]:
                key = name.split("/")[-1].split(".")[0]
                prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
                members = [(name, (root / name).read_bytes())]
                if extras:
                    members.insert(0, (f"{prefix}{key}.json", b'{"source": "test"}'))
                if labels is not None:
                    members.append((f"{prefix}{key}.cls", f"{labels[name]}\n".encode()))
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def write_parquet(
    root: Path,
    names: Sequence[str],
    path: Path,
    struct: bool = True,
    row_group_size: int = 8,
    labels: Mapping[str, int] | None = None,
) -> Path:
    """One row an image: ``image`` as the {bytes, path} struct (or plain binary), ``id``
    the relative path, and ``label`` when given."""
    data = [(root / n).read_bytes() for n in names]
    image = (
        pa.array(
            [{"bytes": d, "path": n} for d, n in zip(data, names)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        if struct
        else pa.array(data, pa.binary())
    )
    columns = {"image": image, "id": pa.array(list(names))}
    if labels is not None:
        columns["label"] = pa.array([labels[n] for n in names], pa.int64())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path
