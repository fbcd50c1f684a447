"""Direct shard writes: byte for byte the file zarr writes, and zarr/xarray read them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from vit_attn.filemode import umask
from vit_attn.rawshard import raw_shard_writer


def _pair(tmp_path: Path, dtype: str, shape=(10, 3, 4), shard=4, compressors=None):
    group = zarr.create_group(str(tmp_path / "s.zarr"))
    kw = dict(shape=shape, dtype=dtype, chunks=(1, *shape[1:]), shards=(shard, *shape[1:]))
    kw |= dict(compressors=compressors, fill_value=0, dimension_names=("image", "a", "b"))
    ours, theirs = group.create_array("ours", **kw), group.create_array("theirs", **kw)
    return ours, theirs.with_config({"write_empty_chunks": True})


def _shard_file(array: zarr.Array, index: int) -> bytes:
    key = array.metadata.encode_chunk_key((index, 0, 0))
    return (Path(array.store.root) / array.path / key).read_bytes()


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32", "int32"])
def test_shards_are_byte_identical_to_zarrs_and_read_back(tmp_path, dtype):
    ours, theirs = _pair(tmp_path, dtype)
    writer = raw_shard_writer(ours)
    assert writer is not None
    rng = np.random.default_rng(0)
    data = (rng.random((10, 3, 4)) * 200).astype(dtype)
    data[5] = 0  # an all-zero image (a failed one) is written like any other
    for start, stop in ((0, 4), (4, 8), (8, 10)):  # the last shard runs past the array end
        assert writer.write(start, stop, data[start:stop])
        theirs[start:stop] = data[start:stop]
    for index in range(3):
        assert _shard_file(ours, index) == _shard_file(theirs, index), index
    reopened = zarr.open_array(str(tmp_path / "s.zarr"), path="ours", mode="r")
    np.testing.assert_array_equal(reopened[:], data)
    np.testing.assert_array_equal(reopened[7], data[7])  # one inner chunk alone
    # Readable like zarr's own files (a store shared by a group), not mkstemp's 0600.
    modes = {
        name: {
            p.stat().st_mode & 0o777
            for p in (tmp_path / "s.zarr" / name / "c").rglob("*")
            if p.is_file()
        }
        for name in ("ours", "theirs")
    }
    assert modes["ours"] == modes["theirs"] == {0o666 & ~umask()}


def test_regions_that_are_not_one_whole_shard_are_left_to_zarr(tmp_path):
    ours, _ = _pair(tmp_path, "uint8")
    writer = raw_shard_writer(ours)
    data = np.ones((4, 3, 4), np.uint8)
    assert not writer.write(2, 6, data)  # straddles two shards
    assert not writer.write(0, 3, data[:3])  # part of a shard
    assert not writer.write(0, 4, np.ones((4, 3, 5), np.uint8))  # wrong shape
    assert not ours[:].any()  # nothing was written


def test_compressed_unsharded_and_string_arrays_are_not_taken(tmp_path):
    from zarr.codecs import ZstdCodec

    compressed, _ = _pair(tmp_path / "a", "uint8", compressors=[ZstdCodec(level=1)])
    assert raw_shard_writer(compressed) is None
    group = zarr.create_group(str(tmp_path / "b.zarr"))
    plain = group.create_array("p", shape=(8, 2), dtype="uint8", chunks=(4, 2))
    assert raw_shard_writer(plain) is None
    text = group.create_array("t", shape=(8,), dtype="str", chunks=(1,), shards=(4,))
    assert raw_shard_writer(text) is None
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 2), dtype="uint8",
                               chunks=(1, 2), shards=(4, 2), compressors=None)  # fmt: skip
    assert raw_shard_writer(memory) is None
