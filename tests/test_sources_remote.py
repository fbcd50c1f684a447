"""Listing and reading the source kinds beyond local folders, without a model.

WebDataset shards and Parquet files are packed independently (tests/packing.py: tarfile,
pyarrow); every read is compared with the original file's bytes. URL sources are served by
a real S3 server (moto) and a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import io
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from vit_attn.datasource import listing_changes, open_source, read_listed_image, source_kind
from vit_attn.decode import Preprocess, load_batch, load_image
from vit_attn.errors import ConfigError, DataSourceError, ImageDecodeError
from vit_attn.sources import list_images

from . import imagefactory
from .packing import folder_files, write_parquet, write_shards
from .s3server import env_without_credentials, free_port, make_bucket, s3_endpoint, s3fs_client  # noqa: F401

PREP = Preprocess(input_size=(32, 32))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Twelve small images in two folders, one of them a JPEG."""
    root = tmp_path_factory.mktemp("src") / "images"
    imagefactory.write_rgb_set(root / "a", [(30 + 3 * i, 20 + i) for i in range(7)])
    imagefactory.write_rgb_set(root / "b", [(25 + 2 * i, 40) for i in range(4)])
    imagefactory.write_rgb(root / "b", "photo.jpg", (64, 48), quality=90)
    return root


def read_all(images) -> list:
    return images.reader.read(images.paths, images.locators)


# --------------------------------------------------------------------------- shards


def test_shards_list_images_by_key_in_order_and_read_their_bytes(folder, tmp_path):
    names = folder_files(folder)
    labels = {n: i % 4 for i, n in enumerate(names)}
    write_shards(folder, names, tmp_path / "s", per_shard=5, labels=labels, extras=True)
    src = str(tmp_path / "s" / "train-{000000..000002}.tar")
    assert source_kind(src) == "webdataset"
    images = open_source(src, label_key="cls")
    expected = [f"train-{i // 5:06d}.tar/{n}" for i, n in enumerate(names)]
    assert list(images.paths) == expected  # .json and .cls members are no images
    read = read_all(images)
    assert [bytes(b) for b in read.items] == [(folder / n).read_bytes() for n in names]
    np.testing.assert_array_equal(read.labels, [labels[n] for n in names])
    # a glob lists the same shards in the same (sorted) order
    assert open_source(str(tmp_path / "s" / "train-*.tar")).paths == images.paths


def test_every_image_member_of_a_sample_is_an_image(tmp_path):
    shard = tmp_path / "one.tar"
    png = imagefactory.write_rgb(tmp_path, "x.png", (20, 20)).read_bytes()
    with tarfile.open(shard, "w") as tf:
        for name, data in (
            ("k1.jpg.txt", b"t"),
            ("k1.seg.png", png),
            ("k1.png", png),
            ("k1.cls", b"7"),
            ("dir/k2.png", png),
            ("dir/k2.cls", b"x"),
            ("k3.png", png),
            ("k3.cls", b"2.0"),
            ("k4.png", png),
            ("k4.cls", b"99999999999999999999999"),  # beyond int64
            ("k5.png", png),
            ("k5.cls", b" 12\n"),
            (".hidden.png", png),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    images = open_source(str(shard), label_key="cls")
    assert images.paths == (
        "one.tar/k1.seg.png",
        "one.tar/k1.png",
        "one.tar/dir/k2.png",
        "one.tar/k3.png",
        "one.tar/k4.png",
        "one.tar/k5.png",
    )
    read = read_all(images)
    np.testing.assert_array_equal(read.labels[[0, 1, 5]], [7, 7, 12])
    # A label that is not an int64 fails its sample with the reason (as -1 it would read as
    # "no label"); the other samples of the batch are unaffected.
    for k in (2, 3, 4):
        assert isinstance(read.items[k], ImageDecodeError), k
        assert "label member is not an integer" in str(read.items[k])
    assert all(isinstance(read.items[k], bytes) for k in (0, 1, 5))


def _damaged_shards(folder: Path, out: Path) -> list[str]:
    names = folder_files(folder)
    write_shards(folder, names, out, per_shard=4)  # train-000000..000002
    good = (out / "train-000000.tar").read_bytes()
    (out / "cut.tar").write_bytes(good[: len(good) // 2])  # cut inside member data
    with tarfile.open(out / "train-000000.tar") as tf:
        members = tf.getmembers()
    (out / "nomarker.tar").write_bytes(good[: members[1].offset])  # cut on a header: no end marker
    bad = bytearray(good)
    bad[members[2].offset : members[2].offset + 100] = b"\xff" * 100
    (out / "badheader.tar").write_bytes(bytes(bad))
    with tarfile.open(out / "garbage.tar", "w") as tf:
        for name, data in (
            ("g1.png", b"not a png" * 20),
            ("g2.png", (folder / names[0]).read_bytes()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (out / "empty.tar").write_bytes(b"")
    (out / "text.tar").write_text("hello, not a tar\n" * 100)
    return names


def test_damaged_shards_become_failed_rows_and_the_rest_is_read(folder, tmp_path):
    out = tmp_path / "s"
    names = _damaged_shards(folder, out)
    src = str(out / "{train-000000,cut,missing,nomarker,badheader,garbage,empty,text}.tar")
    images = open_source(src)
    read = read_all(images)
    got = dict(zip(images.paths, read.items))
    errors = {p: str(v) for p, v in got.items() if isinstance(v, ImageDecodeError)}
    assert errors.pop("missing.tar/<missing>").startswith("shard not found:")
    assert "no end-of-archive marker" in errors.pop("nomarker.tar/<truncated>")
    assert "corrupt tar header" in errors.pop("badheader.tar/<unreadable>")
    assert "shard truncated after" in errors.pop("cut.tar/<truncated>")
    cut = [p for p in errors if p.startswith("cut.tar/")]
    assert len(cut) == 1 and "the shard ends at" in errors.pop(cut[0])
    assert "empty file" in errors.pop("empty.tar/<truncated>")
    assert "not an uncompressed tar" in errors.pop("text.tar/<unreadable>")
    assert errors == {}, errors
    # images before the damage are read whole; the corrupt member is read and fails to decode
    assert bytes(got["nomarker.tar/" + names[0]]) == (folder / names[0]).read_bytes()
    assert [p for p in images.paths if p.startswith("badheader.tar/") and "<" not in p] == [
        f"badheader.tar/{n}" for n in names[:2]
    ]
    _, errs = load_batch([got["garbage.tar/g1.png"], got["garbage.tar/g2.png"]], PREP)
    assert errs[0] and "not an image" in errs[0] and errs[1] is None


def test_a_shard_deleted_after_listing_fails_its_images_only(folder, tmp_path):
    names = folder_files(folder)
    shards = write_shards(folder, names, tmp_path / "s", per_shard=6)
    images = open_source(str(tmp_path / "s" / "train-{000000..000001}.tar"))
    shards[1].unlink()
    read = read_all(images)
    assert all(isinstance(b, bytes) for b in read.items[:6])
    assert all("shard not found" in str(e) for e in read.items[6:])


@pytest.mark.parametrize(
    "source, message",
    [
        ("nothing-{0..3}.tar", "no shard exists"),
        ("*.tar", "pattern matches no files"),
        ("x-{0..2.tar", "cannot expand braces"),
    ],
)
def test_shard_sources_that_name_nothing_are_refused(tmp_path, source, message):
    with pytest.raises(DataSourceError, match=message):
        open_source(str(tmp_path / source))


def test_a_shard_holding_a_member_name_twice_is_refused(folder, tmp_path):
    # A tar appended to: a.png, b.png, a.png. Two images under one name shared one PNG file
    # and `show` drew the second's maps over the first's picture.
    png = [(folder / n).read_bytes() for n in folder_files(folder)[:2]]
    with tarfile.open(tmp_path / "dup.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("a.png", png[0]), ("b.png", png[1]), ("a.png", png[1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataSourceError, match=r"dup.tar holds the member 'a.png' twice"):
        open_source(str(tmp_path / "dup.tar"))


class CountingFS(LocalFileSystem):
    """The local file system under its own protocol, counting what workers ask of it."""

    protocol = "counting"
    calls: list[tuple[str, int | None, int | None]] = []

    def cat_file(self, path, start=None, end=None, **kwargs):
        CountingFS.calls.append((path, start, end))
        return super().cat_file(path, start=start, end=end, **kwargs)


def test_a_batch_reads_one_contiguous_range_per_shard_through_any_fsspec_protocol(folder, tmp_path):
    fsspec.register_implementation("counting", CountingFS, clobber=True)
    names = folder_files(folder)
    write_shards(folder, names, tmp_path / "s", per_shard=5, labels=dict.fromkeys(names, 1))
    images = open_source(f"counting://{tmp_path}/s/train-{{000000..000002}}.tar", label_key="cls")
    assert str(images.root).startswith("counting://")
    CountingFS.calls.clear()
    batch = slice(3, 9)  # the tail of shard 0 and most of shard 1
    read = images.reader.read(images.paths[batch], images.locators[batch])
    assert [bytes(b) for b in read.items] == [(folder / n).read_bytes() for n in names[batch]]
    assert [Path(c[0]).name for c in CountingFS.calls] == ["train-000000.tar", "train-000001.tar"]
    first = images.locators[3]
    assert CountingFS.calls[0][1] == first[1]  # starts at the batch's first member, not at 0


# --------------------------------------------------------------------------- parquet


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_rows_are_images_read_by_row_group(folder, tmp_path, struct):
    names = folder_files(folder)
    labels = {n: 10 + i for i, n in enumerate(names)}
    write_parquet(folder, names[:7], tmp_path / "p" / "part-0.parquet", struct, 3, labels)
    write_parquet(folder, names[7:], tmp_path / "p" / "part-1.parquet", struct, 3, labels)
    src = str(tmp_path / "p" / "*.parquet")
    assert source_kind(src) == "parquet"
    by_id = open_source(src, id_column="id", label_key="label")
    assert list(by_id.paths) == names
    read = read_all(by_id)
    assert [bytes(b) for b in read.items] == [(folder / n).read_bytes() for n in names]
    np.testing.assert_array_equal(read.labels, [labels[n] for n in names])
    by_row = open_source(src)
    assert by_row.paths[:2] == ("part-0.parquet/0", "part-0.parquet/1")
    assert by_row.paths[7] == "part-1.parquet/0"


def test_a_rewritten_parquet_file_is_read_anew_by_a_process_that_read_it_before(folder, tmp_path):
    # Row groups are cached per process; a Dask worker that outlives a run served a later
    # run (the file rewritten, same row count) the old file's images.
    names = folder_files(folder)[:4]
    path = tmp_path / "d.parquet"
    write_parquet(folder, names, path)
    first = read_all(open_source(str(path)))
    write_parquet(folder, names[::-1], path)  # the same rows, reversed
    again = read_all(open_source(str(path)))
    assert [bytes(b) for b in again.items] == [bytes(b) for b in first.items][::-1]


def test_parquet_rows_without_bytes_fail_alone(folder, tmp_path):
    png = (folder / folder_files(folder)[0]).read_bytes()
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"bytes": png, "path": "a"},
        {"bytes": None, "path": "elsewhere.jpg"},
        None,
        {"bytes": b"\x89PNG broken", "path": "d"},
    ]
    pq.write_table(pa.table({"image": pa.array(rows, kind)}), tmp_path / "d.parquet")
    images = open_source(str(tmp_path / "d.parquet"))
    _, errors = load_batch(read_all(images).items, PREP)
    assert errors[0] is None
    assert "no image bytes, only the path 'elsewhere.jpg'" in errors[1]
    assert "no image bytes (null)" in errors[2]
    assert "not an image" in errors[3]


def test_parquet_schema_mistakes_name_the_column(folder, tmp_path):
    names = folder_files(folder)[:3]
    path = write_parquet(folder, names, tmp_path / "d.parquet")
    with pytest.raises(
        DataSourceError, match=r"no column 'img' for data.image_column; the columns are image, id"
    ):
        open_source(str(path), image_column="img")
    with pytest.raises(
        DataSourceError, match=r"column 'id' is string; data.image_column needs image bytes"
    ):
        open_source(str(path), image_column="id")
    with pytest.raises(DataSourceError, match="data.label_key needs integers"):
        open_source(str(path), label_key="id")
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"image": pa.array([b"a", b"b"]), "id": ["x", "x"]}), dup)
    with pytest.raises(DataSourceError, match="'x' repeats"):
        open_source(str(dup), id_column="id")
    for bad in (None, "", "  "):  # would be image_path 'None' / '' and a PNG named '..png'
        holes = tmp_path / "holes.parquet"
        pq.write_table(pa.table({"image": pa.array([b"a", b"b"]), "id": ["x", bad]}), holes)
        with pytest.raises(DataSourceError, match=r"'id' is empty in row 1"):
            open_source(str(holes), id_column="id")


def test_unreadable_parquet_files_become_failed_rows(folder, tmp_path):
    write_parquet(folder, folder_files(folder)[:3], tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    images = open_source(str(tmp_path / "{a,b,c}.parquet"))
    assert images.paths[3:] == ("b.parquet/<unreadable>", "c.parquet/<missing>")
    items = read_all(images).items
    assert "not a readable Parquet file" in str(items[3]) and "file not found" in str(items[4])


# --------------------------------------------------------------------------- kinds and decode


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_column": "image"}, "data.image_column: only for Parquet sources"),
        ({"label_key": "cls"}, "data.label_key: only for shard or Parquet sources"),
        ({"storage_options": {"anon": True}}, "options apply to URLs only"),
    ],
)
def test_keys_that_do_not_fit_the_source_are_refused(folder, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        open_source(str(folder), **kwargs)


def test_decoding_bytes_equals_decoding_the_file(folder):
    for name in folder_files(folder)[::4]:
        np.testing.assert_array_equal(
            load_image((folder / name).read_bytes(), PREP), load_image(folder / name, PREP)
        )
        with fsspec.open(str(folder / name), "rb") as f:  # a file object, as fsspec opens it
            np.testing.assert_array_equal(load_image(f, PREP), load_image(folder / name, PREP))
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_image(b"", PREP)
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(io.BytesIO(b"plain text, no image"), PREP)


# --------------------------------------------------------------------------- S3 and HTTP


@pytest.fixture(scope="module")
def bucket(s3_endpoint, folder) -> str:  # noqa: F811
    name = make_bucket("sources")
    fs = s3fs_client()
    fs.put(str(folder), f"{name}/images", recursive=True)
    fs.pipe(f"{name}/images/.hidden/x.png", (folder / folder_files(folder)[0]).read_bytes())
    return name


def test_s3_keys_with_glob_characters_are_names_not_patterns(s3_endpoint, folder):  # noqa: F811
    name = make_bucket("globchars")
    fs = s3fs_client()
    data = (folder / folder_files(folder)[0]).read_bytes()
    other = (folder / folder_files(folder)[1]).read_bytes()
    for key, body in (("[x]*.png", data), ("x1.png", other), ("a?b.png", data)):
        fs.pipe(f"{name}/images/{key}", body)
    images = open_source(f"s3://{name}/images")
    assert sorted(images.paths) == ["[x]*.png", "a?b.png", "x1.png"]
    read = read_all(images)
    got = dict(zip(images.paths, read.items, strict=True))
    # Each key read as itself: "[x]*.png" once matched "x1.png" as a pattern, or nothing.
    assert got["[x]*.png"] == data and got["a?b.png"] == data and got["x1.png"] == other


def test_s3_folder_glob_and_list_files_list_like_local_ones(bucket, folder):
    local = list_images(folder)
    remote = open_source(f"s3://{bucket}/images")  # the AWS environment only: no options
    assert remote.paths == local.paths and remote.root == f"s3://{bucket}/images"
    # and what it passed over is counted for the start line, as for a local folder
    assert remote.skipped == local.skipped + 1 and ".hidden/x.png" in remote.skipped_examples
    read = read_all(remote)
    assert [bytes(b) for b in read.items] == [(folder / p).read_bytes() for p in local.paths]
    assert open_source(f"s3://{bucket}/images/a/*.png").paths == tuple(
        p.removeprefix("a/") for p in local.paths if p.startswith("a/")
    )
    fs = s3fs_client()
    fs.pipe(f"{bucket}/images/list.txt", b"# two\nb/photo.jpg\nmissing.png\n")
    listed = open_source(f"s3://{bucket}/images/list.txt")
    assert listed.paths == ("b/photo.jpg", "missing.png")
    items = read_all(listed).items
    assert bytes(items[0]) == (folder / "b/photo.jpg").read_bytes()
    assert str(items[1]) == "file not found"
    # `..` and `.` as in a local list file (an object store would read them as key names),
    # never above the bucket.
    fs.pipe(
        f"{bucket}/images/lists/up.txt", b"../b/photo.jpg\n./../b/photo.jpg.x\n../../../x.png\n"
    )
    items = read_all(open_source(f"s3://{bucket}/images/lists/up.txt")).items
    assert bytes(items[0]) == (folder / "b/photo.jpg").read_bytes()
    assert str(items[1]) == str(items[2]) == "file not found"
    fs.pipe(f"{bucket}/images/list.csv", b"path,label\nb/photo.jpg,1\nb/photo.jpg,2\n")
    with pytest.raises(DataSourceError, match="line 3 repeats 'b/photo.jpg'"):
        open_source(f"s3://{bucket}/images/list.csv")


@pytest.mark.parametrize("folder_listing_from", [2, 10**6])
def test_s3_listings_identify_each_object_as_its_own_info_does(
    bucket, folder, monkeypatch, http_root, tmp_path, folder_listing_from
):
    # A resume compares the listing's identities; `show` compares one object's `info()`:
    # they must agree, or show refuses an unchanged image (or passes a changed one).
    from vit_attn import sources_remote
    from vit_attn.identity import MISSING, fs_stat

    monkeypatch.setattr(sources_remote, "_LIST_FOLDER_FROM", folder_listing_from)
    fs = s3fs_client()

    def info_of(root: str, paths) -> list[tuple[int, int]]:
        fs.invalidate_cache()
        return [fs_stat(fs, f"{root}/{p}") for p in paths]

    def ids(images) -> list[tuple[int, int]]:
        got = images.identities
        return list(zip(got.size.tolist(), got.mtime_ns.tolist(), strict=True))

    listed = open_source(f"s3://{bucket}/images")
    assert ids(listed) == info_of(f"{bucket}/images", listed.paths)
    assert MISSING not in np.asarray(ids(listed))
    globbed = open_source(f"s3://{bucket}/images/a/*.png")
    assert ids(globbed) == info_of(f"{bucket}/images/a", globbed.paths)
    names = folder_files(folder)
    fs.pipe(f"{bucket}/images/ids.txt", "\n".join([*names, "missing.png"]).encode())
    from_file = open_source(f"s3://{bucket}/images/ids.txt")
    assert ids(from_file)[:-1] == info_of(f"{bucket}/images", names)
    assert ids(from_file)[-1] == (MISSING, MISSING)  # fails as "file not found" when read
    # A rewrite of one object changes its identity only, even within the same second and
    # at the same size.
    first = names[0]
    body = (folder / first).read_bytes()
    fs.pipe(f"{bucket}/images/{first}", body[:-1] + bytes([body[-1] ^ 1]))
    again = open_source(f"s3://{bucket}/images/ids.txt")
    fs.pipe(f"{bucket}/images/{first}", body)
    assert ids(again)[1:] == ids(from_file)[1:] and ids(again)[0] != ids(from_file)[0]
    assert ids(again)[0][0] == ids(from_file)[0][0]  # same size: the ETag tells them apart
    # HTTP(S) images have no listing: no identity, and no request spent looking for one.
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "one.jpg").write_bytes((folder / "b/photo.jpg").read_bytes())
    (tmp_path / "pics" / "list.txt").write_text(f"one.jpg\ns3://{bucket}/images/{first}\n")
    mixed = open_source(f"{http_root}/pics/list.txt")
    assert ids(mixed) == [(MISSING, MISSING), *info_of(f"{bucket}/images", [first])]


def test_s3_shards_and_parquet_read_like_local_ones(bucket, folder, tmp_path):
    names = folder_files(folder)
    shards = write_shards(folder, names, tmp_path / "s", per_shard=5)
    part = write_parquet(folder, names, tmp_path / "p.parquet", row_group_size=4)
    fs = s3fs_client()
    for f in (*shards, part):
        fs.put(str(f), f"{bucket}/packed/{f.name}")
    remote = open_source(f"s3://{bucket}/packed/train-{{000000..000002}}.tar")
    assert remote.paths == open_source(str(tmp_path / "s" / "train-{000000..000002}.tar")).paths
    assert [bytes(b) for b in read_all(remote).items] == [(folder / n).read_bytes() for n in names]
    rows = open_source(f"s3://{bucket}/packed/*.parquet", id_column="id")
    assert list(rows.paths) == names
    assert [bytes(b) for b in read_all(rows).items] == [(folder / n).read_bytes() for n in names]


def test_s3_source_that_is_missing_is_one_line(bucket):
    with pytest.raises(DataSourceError, match=rf"s3://{bucket}/nope: no such folder"):
        open_source(f"s3://{bucket}/nope")


def test_unreachable_endpoint_names_the_url(s3_endpoint):  # noqa: F811
    dead = f"http://127.0.0.1:{free_port()}"
    options = {"endpoint_url": dead, "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(DataSourceError) as info:
        open_source("s3://sources/images", storage_options=options)
    assert str(info.value).startswith("s3://sources/images: cannot list: endpoint unreachable")
    assert "\n" not in str(info.value)


def test_missing_credentials_name_the_url(bucket):
    code = "from vit_attn.datasource import open_source; open_source('s3://sources/images')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env_without_credentials(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert "DataSourceError: s3://sources/images: cannot list: no credentials found" in last


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_https_list_file_names_images_beside_it_and_on_s3(bucket, folder, tmp_path, http_root):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "one.jpg").write_bytes((folder / "b/photo.jpg").read_bytes())
    (tmp_path / "pics" / "list.txt").write_text(
        f"one.jpg\ns3://{bucket}/images/a/{folder_files(folder)[0].split('/')[1]}\n"
    )
    images = open_source(f"{http_root}/pics/list.txt")
    items = read_all(images).items
    assert bytes(items[0]) == (folder / "b/photo.jpg").read_bytes()
    assert bytes(items[1]) == (folder / folder_files(folder)[0]).read_bytes()


def test_listing_changes_name_what_came_and_went():
    assert listing_changes(["a", "b", "c"], ["a", "c", "d"]) == (
        "the source changed: 1 image added (d), 1 removed (b)"
    )
    assert (
        listing_changes(["a", "b"], ["b", "a"])
        == "the source lists the same images in another order"
    )
    many = listing_changes([], [f"x{i}" for i in range(5)])
    assert many == "the source changed: 5 images added (x0, x1, x2, ... 2 more), 0 removed"


def test_one_image_is_found_again_from_what_a_store_records(folder, tmp_path):
    names = folder_files(folder)
    write_shards(folder, names, tmp_path / "s", per_shard=5)
    write_parquet(folder, names, tmp_path / "p" / "d.parquet", row_group_size=4)
    for src, kwargs in (
        (str(tmp_path / "s" / "train-{000000..000002}.tar"), {}),
        (str(tmp_path / "p" / "*.parquet"), {"id_column": "id"}),
        (str(tmp_path / "p" / "*.parquet"), {}),
    ):
        images = open_source(src, **kwargs)
        attrs = {  # what plan.prepare writes into a store's attributes
            "image_root": str(images.root),
            "fingerprint_inputs": {"source": images.identity},
            "config": {"data": {"source": src, **kwargs}},
        }
        for i in (0, 6, len(names) - 1):
            assert read_listed_image(attrs, images.paths[i]) == (folder / names[i]).read_bytes()
        with pytest.raises(ImageDecodeError):  # with its reason, not "an empty file"
            read_listed_image(attrs, "train-000009.tar/nope.png")
    assert read_listed_image({"image_root": str(folder)}, names[0]) is None  # read by path


def test_an_s3_image_is_found_again_with_the_runs_endpoint(
    bucket,
    folder,
    s3_endpoint,  # noqa: F811
    monkeypatch,
):
    # `show` on a store whose source was on S3 with `endpoint_url` in data.storage_options
    # (the README's way) did not pass them: "empty file (0 bytes)", drawn on grey.
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint is known from the store only
    names = folder_files(folder)
    options = {"endpoint_url": s3_endpoint, "secret": "***"}  # as the store records them
    attrs = {
        "image_root": f"s3://{bucket}/images",
        "config": {"data": {"source": f"s3://{bucket}/images", "storage_options": options}},
    }
    assert read_listed_image(attrs, names[0]) == (folder / names[0]).read_bytes()
    with pytest.raises(ImageDecodeError, match="not found"):
        read_listed_image(attrs, "nope.png")


@pytest.mark.parametrize(
    "source, message",
    [
        (
            "zzz://bucket/images",
            r"zzz://bucket/images: cannot open this URL \(Protocol not known: zzz\)",
        ),
        ("zzz://bucket/train-{0..3}.tar", r"cannot open this URL \(Protocol not known: zzz\)"),
    ],
)
def test_unknown_protocols_are_one_line(source, message):
    with pytest.raises(DataSourceError, match=message):
        open_source(source)


def test_runs_group_consecutive_equal_keys_only():
    from vit_attn.sources_remote import runs

    assert list(runs([])) == []
    assert list(runs(["a"])) == [range(0, 1)]
    # a key met again later is a new run: a batch may leave a shard and come back to it
    got = list(runs([0, 0, 1, 0, (2, 1), (2, 1), ("placeholder", 6)]))
    assert got == [range(0, 2), range(2, 3), range(3, 4), range(4, 6), range(6, 7)]


def test_object_store_files_rewritten_within_a_second_are_told_apart():
    # S3's LastModified has whole seconds: a shard rewritten in the same second at the same
    # size looked unchanged. The ETag's digest fills the sub-second part; a listing that
    # says milliseconds where a HEAD says seconds gives the same identity.
    import datetime

    from vit_attn.identity import MISSING, fs_stat, info_stat

    when = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)
    a = info_stat({"size": 1000, "LastModified": when, "ETag": '"aaa"'})
    b = info_stat({"size": 1000, "LastModified": when, "ETag": '"bbb"'})
    assert a[0] == b[0] == 1000 and a != b
    assert a[1] // 10**9 == b[1] // 10**9 == int(when.timestamp())  # the second is kept
    assert info_stat({"size": 1000, "LastModified": when, "ETag": '"aaa"'}) == a
    listed = when + datetime.timedelta(milliseconds=250)
    assert info_stat({"Size": 1000, "size": 1000, "LastModified": listed, "ETag": '"aaa"'}) == a
    # a store with sub-second times (GCS's `updated`) keeps them, as identities recorded
    # before recorded them
    gcs = info_stat({"size": 9, "updated": "2026-12-01T12:00:00.250Z", "generation": "17"})
    assert gcs[0] == 9 and abs(gcs[1] - (int(when.timestamp()) * 10**9 + 250_000_000)) < 1000
    local = info_stat({"size": 5, "mtime": 1700000000.25})
    assert local[0] == 5 and abs(local[1] - 1700000000250000000) < 1000  # kept (float seconds)
    assert info_stat({"name": "x"}) == (MISSING, MISSING)
    assert fs_stat(LocalFileSystem(), "/no/such/file") == (MISSING, MISSING)


def test_http_brace_patterns_find_their_shards_on_a_server_without_ranges(
    folder, tmp_path, http_root
):
    # `http://host/s-{000..001}.tar` found no shard (posixpath folded `http://` to `http:/`),
    # and a server that ignores Range (this one: http.server answers 200 with the whole
    # file) had every member read from the wrong offset, labels included.
    names = folder_files(folder)
    labels = {n: i % 4 for i, n in enumerate(names)}
    write_shards(folder, names, tmp_path / "s", per_shard=5, labels=labels)
    images = open_source(f"{http_root}/s/train-{{000000..000002}}.tar", label_key="cls")
    assert str(images.root).rstrip("/") == f"{http_root}/s"
    assert list(images.paths) == [f"train-{i // 5:06d}.tar/{n}" for i, n in enumerate(names)]
    batch = slice(3, 9)  # from the middle of one shard into the next
    read = images.reader.read(images.paths[batch], images.locators[batch])
    assert [bytes(b) for b in read.items] == [(folder / n).read_bytes() for n in names[batch]]
    np.testing.assert_array_equal(read.labels, [labels[n] for n in names[batch]])
    write_parquet(folder, names, tmp_path / "p" / "part-0.parquet")
    write_parquet(folder, names[:3], tmp_path / "p" / "part-1.parquet")
    rows = open_source(f"{http_root}/p/part-{{0..1}}.parquet")
    assert len(rows.paths) == len(names) + 3


def test_unreadable_shards_or_parquet_files_say_why(tmp_path):
    # "the shards hold no image members" for a gzip'd tar: the reason was dropped.
    (tmp_path / "a.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    (tmp_path / "a.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataSourceError, match=r"hold no image members.*a\.tar: .+; check"):
        open_source(str(tmp_path / "a.tar"))
    with pytest.raises(DataSourceError, match=r"hold no rows.*a\.parquet: not a readable"):
        open_source(str(tmp_path / "a.parquet"))


def test_an_s3_list_refuses_one_object_listed_twice_and_rows_without_a_path(bucket):
    # `/x.png` and `x.png` were two images read from one object; a CSV row without a path
    # vanished (a local list refuses both).
    fs = s3fs_client()
    fs.pipe(f"{bucket}/images/twice.txt", b"a/img_30x20.png\n/a/img_30x20.png\n")
    with pytest.raises(DataSourceError, match=r"line 2 repeats '/a/img_30x20.png'"):
        open_source(f"s3://{bucket}/images/twice.txt")
    fs.pipe(f"{bucket}/images/gap.csv", b"path,label\na/img_30x20.png,1\n,2\n")
    with pytest.raises(DataSourceError, match=r"line 3 has no path in column 1"):
        open_source(f"s3://{bucket}/images/gap.csv")
    fs.pipe(f"{bucket}/images/latin.txt", "caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin\.txt: the list is not UTF-8 text"):
        open_source(f"s3://{bucket}/images/latin.txt")


def test_a_quote_left_open_in_a_csv_is_one_line(folder, tmp_path):
    # Everything after it became one image named by several lines, and the run said "done".
    listing = tmp_path / "list.csv"
    listing.write_text(f'path\n"{folder}/a/img_30x20.png\n{folder}/b/photo.jpg\n')
    with pytest.raises(DataSourceError, match=r"spans several lines .*close the quote"):
        open_source(str(listing))


@pytest.mark.parametrize(
    "root, image, expected",
    [
        ("s3://bkt/ds/lists", "../img0.png", "_outside_root/s3/bkt/ds/img0.png"),
        ("s3://bkt/ds", "a/b.png", "a/b.png"),
        ("s3://bkt/ds", "/a/b.png", "a/b.png"),
        ("s3://bkt/ds", "https://h.org/x.png", "_outside_root/https/h.org/x.png"),
        ("s3://bkt/ds", "s3://bkt/ds/a/c.png", "a/c.png"),
    ],
)
def test_pngs_of_a_url_root_lie_where_the_url_says_from_any_folder(
    root, image, expected, monkeypatch, tmp_path
):
    # A `..` entry of a remote list was mirrored under the local working folder's path: a
    # resume from another folder redid the images and left a second set of PNGs.
    from vit_attn.outputs import png_relpath

    for cwd in (tmp_path, Path("/")):
        monkeypatch.chdir(cwd)
        assert png_relpath(root, image) == expected + ".png"


def test_an_s3_key_with_an_empty_folder_is_passed_over_and_counted(bucket, folder):
    # `ds//x.png` beside `ds/x.png`: relpath folded both into `x.png`, one object vanished
    # uncounted; alone, `ds//x.png` was listed as `x.png` and failed "file not found".
    fs = s3fs_client()
    body = (folder / folder_files(folder)[0]).read_bytes()
    for key in ("dbl/x.png", "dbl//x.png", "dbl//y.png"):
        fs.pipe(f"{bucket}/{key}", body)
    images = open_source(f"s3://{bucket}/dbl")
    assert images.paths == ("x.png",)
    assert images.skipped == 2 and "/x.png" in images.skipped_examples


def test_an_http_host_that_cannot_be_reached_is_said_so(http_root):
    # fsspec's HTTP file system answers "not found" for a refused connection too.
    port = free_port()
    with pytest.raises(DataSourceError, match=r"cannot list: host unreachable \(.*\)"):
        open_source(f"http://127.0.0.1:{port}/pics/list.txt")
    with pytest.raises(DataSourceError, match=r"no such folder or list file"):
        open_source(f"{http_root}/nothing/list.txt")


@pytest.mark.parametrize("pattern", ["dblg/**/*.png", "dblg/*/*.png", "dblg/*.png", "dblg/**"])
def test_an_s3_glob_never_lists_a_key_with_an_empty_folder_as_another(bucket, folder, pattern):
    # The glob's paths were made relative with relpath, which folds `dblg//a.png` into
    # `a.png`: a second entry for one object, or one read as an object that is not there.
    fs = s3fs_client()
    body = (folder / folder_files(folder)[0]).read_bytes()
    for key in ("dblg/a.png", "dblg//a.png", "dblg//b.png", "dblg/sub/c.png"):
        fs.pipe(f"{bucket}/{key}", body)
    images = open_source(f"s3://{bucket}/{pattern}")
    assert all("//" not in p and not p.startswith("/") for p in images.paths)
    for path in images.paths:  # each entry is an object that is there, read as listed
        assert fs.cat_file(f"{bucket}/dblg/{path}") == body
    if pattern == "dblg/**":  # matches the keys it cannot name: counted, as a folder's
        assert set(images.paths) == {"a.png", "sub/c.png"}
        assert images.skipped == 2 and "/b.png" in images.skipped_examples
