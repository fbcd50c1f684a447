"""The store contract (docs/STORE.md): layout, batch writes, status, resume, xarray."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

import vit_attn.store as store_mod
from vit_attn.errors import ConfigError, StoreError
from vit_attn.store import (
    BatchResult,
    StoreSpec,
    consolidate,
    create_store,
    empty_batch,
    is_consolidated,
    open_dataset,
    open_store_for_resume,
    pending_batches,
    write_batch,
)

FULL = StoreSpec(
    n_images=10,
    batch_size=4,
    layers=(2, 5),
    num_heads=3,
    grid=(2, 3),
    input_size=(8, 12),
    num_tokens=7,
    topk=5,
    full_attention=True,
    rollout=True,
    overlays="heads",
    stats=("entropy",),
)
MINIMAL = StoreSpec(
    n_images=3,
    batch_size=8,
    layers=(11,),
    num_heads=2,
    grid=(3, 2),
    input_size=(6, 4),
    num_tokens=8,
    topk=None,
    full_attention=False,
    rollout=False,
    overlays="none",
)
CONFIG = {"model": {"name": "vit_tiny"}, "attention": {"layers": [11], "full": False}}
ATTRS = {"model": {"name": "vit_tiny", "grid": [2, 3]}, "config": CONFIG, "fingerprint": "abc123"}


def _image_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape[1:])) * np.dtype(dtype).itemsize


def test_large_cls_maps_and_overlays_keep_per_image_chunks_in_shards(tmp_path: Path) -> None:
    # ViT-L/14 at 448, 24 layers x 16 heads x 32 x 32 float16: 786 KB per image
    spec = StoreSpec(
        **{**MINIMAL.__dict__, "overlays": "mean"}
        | {"layers": tuple(range(24)), "num_heads": 16, "grid": (32, 32), "num_tokens": 1025}
        | {"input_size": (448, 448), "batch_size": 32, "n_images": 40}
    )
    group = create_store(tmp_path / "s.zarr", spec, _paths(spec), ATTRS)
    for name in ("cls_attention", "overlay"):
        assert group[name].shards == (32, *group[name].shape[1:]), name
        assert group[name].chunks == (1, *group[name].shape[1:]), name


def _paths(spec: StoreSpec) -> list[str]:
    return [f"img/{i:03d}.jpg" for i in range(spec.n_images)]


def _contract(spec: StoreSpec) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """Name -> (dims, dtype, shape) written out from docs/STORE.md, independent of store.py."""
    n = spec.n_images
    nl, nh, (gh, gw), (h, w), t = (
        len(spec.layers),
        spec.num_heads,
        spec.grid,
        spec.input_size,
        spec.num_tokens,
    )
    out = {
        "image_path": (("image",), "str", (n,)),
        "status": (("image",), "int8", (n,)),
        "error": (("image",), "str", (n,)),
        "layer": (("layer",), "int32", (nl,)),
        "head": (("head",), "int32", (nh,)),
        "cls_attention": (("image", "layer", "head", "y", "x"), "float16", (n, nl, nh, gh, gw)),
    }
    if spec.topk:
        out["topk_index"] = (("image", "k"), "int32", (n, spec.topk))
        out["topk_prob"] = (("image", "k"), "float32", (n, spec.topk))
    if spec.full_attention:
        out["attention"] = (
            ("image", "layer", "head", "query", "key"),
            "float16",
            (n, nl, nh, t, t),
        )
    if spec.rollout:
        out["rollout"] = (("image", "y", "x"), "float32", (n, gh, gw))
    if spec.overlays != "none":
        out["overlay"] = (("image", "pixel_y", "pixel_x", "channel"), "uint8", (n, h, w, 3))
    if spec.overlays == "heads":
        out["overlay_heads"] = (
            ("image", "head", "pixel_y", "pixel_x", "channel"),
            "uint8",
            (n, nh, h, w, 3),
        )
    for s in spec.stats:
        out[s] = (("image", "layer", "head"), "float32", (n, nl, nh))
    return out


def _batch(spec: StoreSpec, index: int, seed: int = 0, failed: tuple[int, ...] = ()) -> BatchResult:
    """Deterministic non-zero data for one batch (recomputable in any process)."""
    result = empty_batch(spec, index)
    rng = np.random.default_rng(seed * 1000 + index)
    for values in result.arrays.values():
        values[...] = rng.integers(1, 100, size=values.shape).astype(values.dtype)
    result.status[:] = 1
    for i in failed:
        result.status[i] = 2
        result.error[i] = f"cannot decode image {result.start + i}"
    return result


@pytest.mark.parametrize("spec", [FULL, MINIMAL], ids=["full", "minimal"])
def test_contract_layout(tmp_path: Path, spec: StoreSpec) -> None:
    group = create_store(tmp_path / "s.zarr", spec, _paths(spec), ATTRS)
    contract = _contract(spec)
    assert sorted(name for name, _ in group.arrays()) == sorted(contract)
    assert group.attrs["format"] == "vit-attention-store" and group.attrs["format_version"] == 1
    assert group.attrs["fingerprint"] == "abc123" and group.attrs["config"] == CONFIG
    small = {
        "image_path",
        "status",
        "error",
        "layer",
        "head",
        "topk_index",
        "topk_prob",
        *spec.stats,
    }
    for name, (dims, dtype, shape) in contract.items():
        arr = group[name]
        assert arr.metadata.dimension_names == dims, name
        assert arr.shape == shape, name
        if dtype == "str":
            assert arr.dtype.kind in "OTU", name
            assert arr.fill_value == ""
        else:
            assert arr.dtype == np.dtype(dtype), name
            assert arr.fill_value == 0, name
        if dims[0] != "image":
            assert arr.chunks == shape and arr.shards is None, name
        elif name == "image_path":  # written once: chunks of one batch in shards of many
            assert arr.chunks == (spec.batch_size,) and arr.shards[0] % spec.batch_size == 0
        elif name in small or _image_bytes(shape, dtype) <= 64 << 10:
            # one plain chunk per batch: one writer per chunk, no per-image chunk overhead
            assert arr.shards is None, name
            assert arr.chunks == (spec.batch_size, *shape[1:]), name
        else:  # one shard per batch, one inner chunk per image
            assert arr.shards == (spec.batch_size, *shape[1:]), name
            assert arr.chunks == (1, *shape[1:]), name
    assert group["layer"][:].tolist() == list(spec.layers)
    assert group["head"][:].tolist() == list(range(spec.num_heads))
    assert list(group["image_path"][:]) == _paths(spec)
    assert not group["status"][:].any()
    assert list(group["error"][:]) == [""] * spec.n_images
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no temp folder left


def test_spec_validation() -> None:
    base = dict(
        n_images=4,
        batch_size=2,
        layers=(1,),
        num_heads=2,
        grid=(2, 2),
        input_size=(4, 4),
        num_tokens=5,
        topk=None,
        full_attention=False,
        rollout=False,
        overlays="none",
    )
    assert StoreSpec(**{**base, "layers": [0, 3]}).layers == (0, 3)  # lists from YAML
    for bad in (
        {"layers": (3, 1)},
        {"layers": (1, 1)},
        {"layers": (-1,)},
        {"layers": ()},
        {"overlays": "all"},
        {"compression": "gzip"},
        {"num_tokens": 3},
        {"topk": 0},
        {"stats": ("status",)},
        {"stats": ("a b",)},
        {"batch_size": 0},
    ):
        with pytest.raises(ConfigError):
            StoreSpec(**{**base, **bad})
    spec = StoreSpec(**{**base, "n_images": 5})
    assert spec.n_batches == 3 and spec.batch_bounds(2) == (4, 5)


def test_xarray_reads_named_dims_and_coordinates(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    create_store(path, FULL, _paths(FULL), ATTRS)
    write_batch(path, _batch(FULL, 1))
    ds = open_dataset(path)
    assert ds["cls_attention"].dims == ("image", "layer", "head", "y", "x")
    assert ds["attention"].dims == ("image", "layer", "head", "query", "key")
    assert ds["overlay_heads"].dims == ("image", "head", "pixel_y", "pixel_x", "channel")
    assert ds["entropy"].dims == ("image", "layer", "head")
    assert ds["layer"].values.tolist() == [2, 5] and ds["head"].values.tolist() == [0, 1, 2]
    assert set(ds.coords) >= {"layer", "head"}
    for name in ("cls_attention", "status", "image_path", "topk_prob"):  # lazy: one chunk a batch
        assert ds[name].chunks[0] == (4, 4, 2), name
    assert [str(p) for p in ds["image_path"].values] == _paths(FULL)
    assert ds.attrs["fingerprint"] == "abc123"
    # the fill value is data, not a mask: unprocessed images read as 0, never NaN
    cls = ds["cls_attention"].values
    assert cls.dtype == np.float16 and not np.isnan(cls).any()
    assert not cls[:4].any() and cls[4:8].all()
    np.testing.assert_array_equal(
        ds["cls_attention"].sel(layer=5).values[4:8], _batch(FULL, 1).arrays["cls_attention"][:, 1]
    )


def _spawned_write(path: str, index: int) -> None:
    write_batch(path, _batch(FULL, index, seed=7))


def test_write_batch_from_separate_processes(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    create_store(path, FULL, _paths(FULL), ATTRS)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spawned_write, args=(str(path), i)) for i in (0, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    group = zarr.open_group(str(path), mode="r")
    for i in (0, 2):
        want = _batch(FULL, i, seed=7)
        for name, values in want.arrays.items():
            np.testing.assert_array_equal(group[name][want.start : want.stop], values, err_msg=name)
    status = group["status"][:]
    assert status.tolist() == [1] * 4 + [0] * 4 + [1] * 2
    for name, (_, _, shape) in _contract(FULL).items():
        if shape[0] == FULL.n_images and name not in ("image_path", "status", "error"):
            assert not group[name][4:8].any(), name  # batch 1 untouched: fill value 0


def test_status_written_last_and_not_on_failure(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.zarr"
    create_store(path, FULL, _paths(FULL), ATTRS)
    real_one, real_many = store_mod._write_region, store_mod._write_regions
    order: list[list[str]] = []

    def one(array, start, stop, data):
        order.append([array.basename])
        real_one(array, start, stop, data)

    def many(regions, start, stop):
        order.append(sorted(a.basename for a, _ in regions))
        real_many(regions, start, stop)

    monkeypatch.setattr(store_mod, "_write_region", one)
    monkeypatch.setattr(store_mod, "_write_regions", many)
    write_batch(path, _batch(FULL, 0))
    # data and error first (together), status alone and last
    assert order == [sorted([*FULL.data_arrays(), "error"]), ["status"]]

    began: list[str] = []

    def crashing(regions, start, stop):
        real_one(regions[0][0], start, stop, regions[0][1])  # the write began ...
        began.append(regions[0][0].basename)
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_write_regions", crashing)
    with pytest.raises(OSError, match="disk full"):
        write_batch(path, _batch(FULL, 1, failed=(0,)))
    group = zarr.open_group(str(path), mode="r")
    assert group[began[0]][4:8].any()
    assert group["status"][4:8].tolist() == [0, 0, 0, 0]  # ... but the batch is still pending
    assert pending_batches(group, FULL) == [1, 2]


def test_failed_images_hold_zeros_and_pending(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    group = create_store(path, FULL, _paths(FULL), ATTRS)
    assert pending_batches(group, FULL) == [0, 1, 2]
    result = _batch(FULL, 2, failed=(1,))  # the partial last batch: images 8, 9
    assert (result.start, result.stop) == (8, 10)
    write_batch(group, result)
    assert result.arrays["overlay"][1].any()  # the caller's buffer is not modified
    assert group["status"][:].tolist() == [0] * 8 + [1, 2]
    assert list(group["error"][8:]) == ["", "cannot decode image 9"]
    for name in FULL.data_arrays():
        np.testing.assert_array_equal(group[name][8], result.arrays[name][0], err_msg=name)
        assert not group[name][9].any(), name
    assert pending_batches(group, FULL) == [0, 1]  # failed images are done, not pending
    write_batch(group, _batch(FULL, 0))
    write_batch(group, _batch(FULL, 1))
    assert pending_batches(zarr.open_group(str(path), mode="r"), FULL) == []


def test_write_batch_rejects_mismatched_results(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    create_store(path, FULL, _paths(FULL), ATTRS)
    shifted = _batch(FULL, 1)
    shifted.start, shifted.stop = 2, 6  # straddles two shards: would lose data
    with pytest.raises(StoreError, match="match the store's shards"):
        write_batch(path, shifted)
    missing = _batch(FULL, 1)
    del missing.arrays["rollout"]
    with pytest.raises(StoreError, match=r"the store has arrays the batch lacks \[.rollout.\]"):
        write_batch(path, missing)
    wrong = _batch(FULL, 1)
    wrong.arrays["overlay"] = wrong.arrays["overlay"][:, :4]
    with pytest.raises(StoreError, match="shape"):
        write_batch(path, wrong)
    pending = _batch(FULL, 1)
    pending.status[0] = 0
    with pytest.raises(StoreError, match="status"):
        write_batch(path, pending)
    assert not zarr.open_group(str(path), mode="r")["status"][:].any()


def test_refuses_what_is_not_ours(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not ours"):
            create_store(folder, MINIMAL, _paths(MINIMAL), ATTRS, overwrite=overwrite)
    assert (folder / "keep.jpg").exists()
    other = tmp_path / "other.zarr"
    zarr.create_group(str(other), attributes={"format": "something-else"})
    with pytest.raises(StoreError, match="not ours"):
        create_store(other, MINIMAL, _paths(MINIMAL), ATTRS, overwrite=True)
    assert (other / "zarr.json").exists()
    a_file = tmp_path / "file.zarr"
    a_file.write_text("{}")
    with pytest.raises(StoreError, match="not ours"):
        create_store(a_file, MINIMAL, _paths(MINIMAL), ATTRS, overwrite=True)
    with pytest.raises(StoreError, match="not a vit-attention-store"):
        open_store_for_resume(other, "abc123")
    with pytest.raises(StoreError, match="does not exist"):
        open_store_for_resume(tmp_path / "nothing.zarr", "abc123")
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    create_store(empty, MINIMAL, _paths(MINIMAL), ATTRS)  # an empty folder is fine


def test_existing_store_overwrite_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    create_store(path, MINIMAL, _paths(MINIMAL), ATTRS)
    write_batch(path, _batch(MINIMAL, 0))
    with pytest.raises(StoreError, match="already holds"):
        create_store(path, MINIMAL, _paths(MINIMAL), ATTRS)

    group = open_store_for_resume(path, "abc123")
    assert group["status"][:].tolist() == [1, 1, 1]
    assert pending_batches(group, MINIMAL) == []

    new_config = {"model": {"name": "vit_tiny"}, "attention": {"layers": [10, 11], "full": False}}
    with pytest.raises(StoreError, match=r"attention\.layers: \[11\] -> \[10, 11\]"):
        open_store_for_resume(path, "def456", new_config)
    with pytest.raises(StoreError, match="fingerprint abc123 -> def456"):
        open_store_for_resume(path, "def456")

    group = create_store(
        path, MINIMAL, _paths(MINIMAL), {**ATTRS, "fingerprint": "def456"}, overwrite=True
    )
    assert not group["status"][:].any() and not group["cls_attention"][:].any()
    assert open_store_for_resume(path, "def456").attrs["fingerprint"] == "def456"


def test_config_differences() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "gone": 1}
    new = {"a": {"b": 1, "c": (1, 3)}, "d": "x", "added": {"e": True}}
    assert store_mod.config_differences(old, new) == [
        "a.c: [1, 2] -> [1, 3]",
        "gone: 1 -> (absent)",
        'added: (absent) -> {"e": true}',
    ]
    assert store_mod.config_differences(old, new, limit=1) == ["a.c: [1, 2] -> [1, 3]"]
    assert store_mod.config_differences({"a": (1, 2)}, {"a": [1, 2]}) == []


def test_consolidated_store_opens_in_xarray_and_accepts_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    create_store(path, FULL, _paths(FULL), ATTRS)
    write_batch(path, _batch(FULL, 0))
    assert not is_consolidated(path)
    consolidate(path)
    assert is_consolidated(path)
    meta = json.loads((path / "zarr.json").read_text())
    assert set(meta["consolidated_metadata"]["metadata"]) >= set(_contract(FULL))
    write_batch(path, _batch(FULL, 1))  # resuming after a consolidated run still works
    ds = open_dataset(path)
    assert ds["status"].values.tolist() == [1] * 8 + [0] * 2
    assert ds["layer"].values.tolist() == [2, 5]
    np.testing.assert_array_equal(ds["rollout"].values[4:8], _batch(FULL, 1).arrays["rollout"])
    assert os.path.isdir(path)


@pytest.mark.parametrize(
    ("compression", "codec"),
    [("default", None), ("zstd", "zstd"), ("lz4", "blosc"), ("none", None)],
)
def test_compression_options(tmp_path: Path, compression: str, codec: str | None) -> None:
    # overlays of 256 x 256 pixels: 196 KB per image, a shard of per-image chunks
    spec = StoreSpec(
        **{**MINIMAL.__dict__, "overlays": "mean", "compression": compression}
        | {"input_size": (256, 256), "batch_size": 32, "n_images": 40}
    )
    group = create_store(tmp_path / "s.zarr", spec, _paths(spec), ATTRS)
    inner = group["overlay"].metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes"] + ([codec] if codec else [])
    # Attention keeps zstd under the default: only the uint8 overlays are stored raw.
    cls = group["cls_attention"].metadata.to_dict()["codecs"]
    expect = {"default": "zstd", "none": None}.get(compression, codec)
    assert [c["name"] for c in cls] == ["bytes"] + ([expect] if expect else [])
    result = _batch(spec, 0)
    write_batch(group, result)
    np.testing.assert_array_equal(group["overlay"][:32], result.arrays["overlay"])
