"""The edges a careless or hostile user hits (issue 13): outputs that must stay where they are
configured, PNGs inside the resume guarantee, config mistakes, two runs on one store, changed
data, dead workers, full disks and signals.

Runs use a one-block ViT at 32 px with 8 px patches on the torch backend, in-process, so most
tests take a second or two once the modules are imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from vit_attn.cli import main as cli_main
from vit_attn.errors import StoreError

from . import imagefactory
from .helpers import assert_stores_equal, logged, save_config

TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "kwargs": {"depth": 1, "patch_size": 8}}


def write_config(folder: Path, source: str | Path, **sections) -> Path:
    cfg = {
        "model": dict(TINY),
        "data": {"source": str(source)},
        "inference": {"backend": "torch", "batch_size": 4, "threads": 1},
        "output": {"store": str(folder / "out" / "run.zarr")},
        "cluster": {"kind": "none"},
    }
    return save_config(folder, cfg, **sections)


def run(config: Path, *args: str) -> int:
    return cli_main(["run", str(config), "--no-progress", *args])


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("vit-attn: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def status_of(store: Path) -> np.ndarray:
    return zarr.open_group(str(store), mode="r")["status"][:]


@pytest.fixture()
def data(tmp_path) -> Path:
    """Six small images in tmp_path/data."""
    imagefactory.write_rgb_set(tmp_path / "data", [(40 + i, 30 + i) for i in range(6)])
    return tmp_path / "data"


# --------------------------------------------------------------------- 1. outputs stay in place


def test_climbing_list_entries_write_their_pngs_inside_png_dir(tmp_path, data):
    """`../data/x.png` and a path with many `..` once wrote next to the user's files."""
    names = sorted(p.name for p in data.iterdir())
    user_file = data / (names[0] + ".png")
    user_file.write_bytes(b"the user's own file")
    lists = tmp_path / "lists" / "deep"
    lists.mkdir(parents=True)
    climb = "../" * 12 + str(data / names[1]).lstrip("/")
    (lists / "images.txt").write_text(f"../../data/{names[0]}\n{climb}\n{data / names[2]}\n")
    config = write_config(
        tmp_path, lists / "images.txt", output={"png_dir": str(tmp_path / "png"), "png_heads": True}
    )
    before = files_under(data)
    assert run(config) == 0
    assert files_under(data) == before  # nothing written into, or replaced in, the data folder
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert len(pngs) == 6
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - set(before)
    outside = [
        p
        for p in written
        if not p.is_relative_to(tmp_path / "png")
        and not p.is_relative_to(tmp_path / "out")
        and p.parent != lists
        and p.name != "config.yaml"
    ]
    assert outside == []


def test_png_dir_or_store_inside_the_listed_folder_is_refused(tmp_path, data, capsys):
    before = files_under(data)
    config = write_config(tmp_path, data, output={"png_dir": str(data)})
    assert run(config) == 2
    assert "inside the data folder" in one_error_line(capsys)
    config = write_config(tmp_path, data, output={"store": str(data / "sub" / "run.zarr")})
    assert run(config) == 2
    assert "output.store" in one_error_line(capsys)
    assert files_under(data) == before


def test_a_store_name_too_long_for_its_lock_is_named_as_the_store(tmp_path, data, capsys):
    store = tmp_path / ("s" * 248 + ".zarr")  # a legal name; "<name>.lock" is not
    assert run(write_config(tmp_path, data, output={"store": str(store)})) == 2
    line = one_error_line(capsys)
    assert "output.store" in line and "too long for the lock file" in line, line


def test_files_a_folder_listing_passes_over_are_counted(tmp_path, data, capsys):
    (data / "notes.txt").write_text("labels")
    (data / ".hidden.png").write_bytes((data / sorted(os.listdir(data))[0]).read_bytes())
    (data / "noext").write_bytes(b"?")
    assert run(write_config(tmp_path, data)) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "skipped" in x)
    assert line.startswith("vit-attn: skipped 3 files of") and "notes.txt" in line, line
    assert "6 of 6 images" in err  # the six images, not the three others


def test_a_symlinked_folder_is_listed_and_a_loop_once(tmp_path, data, capsys):
    outside = tmp_path / "kept_elsewhere"
    imagefactory.write_rgb_set(outside, [(36, 28), (30, 44)])
    (data / "linked").symlink_to(outside)
    (data / "loop").symlink_to(".")
    (data / "twice").symlink_to(outside)
    assert run(write_config(tmp_path, data)) == 0
    err = capsys.readouterr().err
    assert "8 of 8 images" in err, err  # six here, two behind the link; the loop not walked
    line = next(x for x in err.splitlines() if "once only" in x)
    assert line.startswith("vit-attn: listed 2 paths of") and "twice/" in line, line


def test_two_stores_never_share_a_png_dir(tmp_path, data, capsys):
    # Each would replace the other's PNGs under the same names and call them its own on
    # resume (the marker in a PNG names the image, not the store).
    png = tmp_path / "shared_png"
    first = write_config(tmp_path, data, output={"png_dir": str(png)})
    assert run(first) == 0
    capsys.readouterr()
    before = files_under(png)
    second = write_config(
        tmp_path / "b", data, output={"png_dir": str(png), "store": str(tmp_path / "b.zarr")}
    )
    assert run(second) == 2
    line = one_error_line(capsys)
    assert "holds the PNGs of another store" in line and str(tmp_path / "out" / "run.zarr") in line
    assert files_under(png) == before and not (tmp_path / "b.zarr").exists()
    assert run(first) == 0 and run(first, "--overwrite") == 0  # its own store: fine


@pytest.mark.parametrize("where", ["store", "inside", "link"])
def test_png_dir_in_another_store_is_refused(tmp_path, data, capsys, where):
    # PNGs went into another run's store, with a claim file; that store's --overwrite then
    # deleted them.
    other = write_config(tmp_path / "other", data)
    assert run(other) == 0
    store = tmp_path / "other" / "out" / "run.zarr"
    before = files_under(store)
    png = {"store": store, "inside": store / "pngs", "link": tmp_path / "link"}[where]
    if where == "link":
        png.symlink_to(store)
    config = write_config(
        tmp_path / "b", data, output={"png_dir": str(png), "store": str(tmp_path / "b.zarr")}
    )
    capsys.readouterr()
    assert run(config) == 2
    line = one_error_line(capsys)
    assert f"lies in the store {store}; give the PNGs a folder of their own" in line, line
    assert files_under(store) == before and not (tmp_path / "b.zarr").exists()


def test_another_users_lock_it_cannot_read_is_never_taken_over(tmp_path, monkeypatch):
    # An unreadable lock was treated as an empty one and taken over after 10 s, while its
    # run (another user's, umask 077) was alive. (Root reads every file: os.access stands in.)
    from vit_attn import lock as lock_mod
    from vit_attn.lock import FileLock, StoreLockedError

    path = tmp_path / "run.zarr.lock"
    path.write_text("{}")  # content this user would not see
    old = time.time() - 3600
    os.utime(path, (old, old))
    monkeypatch.setattr(lock_mod, "read_holder", lambda p: None)
    monkeypatch.setattr(lock_mod.os, "access", lambda p, mode: False)
    with pytest.raises(StoreLockedError, match="held by another user .* cannot be read here"):
        FileLock(path, "mine").acquire()
    assert path.read_text() == "{}"


def test_a_short_stale_limit_never_takes_over_a_live_lock_that_beats_slower(tmp_path):
    # A run with --set output.lock_stale_seconds=5 took over a live run's lock (default 120 s,
    # a heartbeat every 20 s) 10 s after its last beat; the live run then stopped, saying it
    # had stalled. The holder's own cadence (its record says it) bounds the limit from below.
    from vit_attn.lock import FileLock, StoreLockedError

    path = tmp_path / "run.zarr.lock"
    live = FileLock(path, "live", stale_after=120)
    live.acquire()
    try:
        ten_ago = time.time() - 10
        os.utime(path, (ten_ago, ten_ago))
        with pytest.raises(StoreLockedError, match=r"taken over after 60 s without heartbeat"):
            FileLock(tmp_path / "run.zarr.lock", "hasty", stale_after=5).acquire()
        assert json.loads(path.read_text())["run_id"] == "live"
        # Quiet for longer than three of its beats: stale, whatever it asked for itself.
        live._stop.set()
        live._thread.join()
        long_ago = time.time() - 70
        os.utime(path, (long_ago, long_ago))
        taker = FileLock(path, "taker", stale_after=5)
        taker.acquire()
        assert json.loads(path.read_text())["run_id"] == "taker"
        taker.release()
    finally:
        live._stop.set()


def test_two_runs_that_both_found_a_png_dir_unclaimed_cannot_both_claim_it(tmp_path):
    # Both passed the up-front check, then each wrote its marker (the last won) and their
    # PNGs mixed under one folder: the claim is exclusive now.
    from vit_attn.outputs import OutputError, check_png_owner, claim_png_dir, png_dir_owner

    png = tmp_path / "png"
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    check_png_owner(png, a)
    check_png_owner(png, b)  # neither sees the other yet
    claim_png_dir(png, a)
    with pytest.raises(OutputError, match="holds the PNGs of another store"):
        claim_png_dir(png, b)
    assert png_dir_owner(png) == str(a.resolve()) or png_dir_owner(png).endswith("a.zarr")
    claim_png_dir(png, a)  # the owner's resume
    assert sorted(p.name for p in png.iterdir()) == [".vit-attn-store"]  # no temporary left
    # A marker left empty (a kill between create and write) is not "unclaimed".
    (png / ".vit-attn-store").write_text("")
    with pytest.raises(OutputError, match="owner record .* is empty"):
        check_png_owner(png, b)


def test_an_empty_lock_file_never_blocks_a_store_for_good(tmp_path, data, capsys):
    # A disk that filled while the lock was written left a 0-byte lock: every later run said
    # "other runs keep taking it", forever, and the store could not be resumed.
    from vit_attn.lock import FileLock, lock_path

    config = write_config(tmp_path, data)
    store = tmp_path / "out" / "run.zarr"
    lock = lock_path(store)
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    capsys.readouterr()
    assert run(config) == 2  # just written (as a live run's would be): not taken
    assert "not stale yet); if no run uses the store, delete it" in one_error_line(capsys)
    old = time.time() - 119  # younger than output.lock_stale_seconds (120): still not taken
    os.utime(lock, (old, old))
    assert run(config) == 2
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert run(config) == 0 and (status_of(store) == 1).all()
    assert not lock.exists()
    # Writing the lock fails (a full disk: os.write raises ENOSPC): no empty lock file is
    # left behind, and the error names the lock.
    probe = FileLock(tmp_path / "x.lock", "r")
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", full_disk)
        with pytest.raises(StoreError, match=r"cannot write the lock file .*x\.lock: No space"):
            probe.acquire()
    assert os.write is real_write and not (tmp_path / "x.lock").exists()


def test_a_resume_removes_the_unfinished_pngs_a_killed_run_left(tmp_path, data):
    # A run killed while writing a PNG leaves its temporary file
    # (".NAME.PID.THREAD.vit-attn.tmp"); resumes kept them, and every kill added more.
    png = tmp_path / "png"
    config = write_config(tmp_path, data, output={"png_dir": str(png)})
    assert run(config) == 0
    written = sorted(png.rglob("*.png"))
    assert written
    left = written[0].with_name(f".{written[0].name}.4242.139860534867648.vit-attn.tmp")
    left.write_bytes(written[0].read_bytes()[:100])
    mine = png / ".notes.tmp"  # not a name the run writes: not the run's to remove
    mine.write_text("keep")
    draft = png / ".draft.png.1.2.tmp"  # an editor's temporary file, by chance alike
    draft.write_text("keep")
    assert run(config) == 0
    assert not left.exists() and mine.read_text() == "keep" and draft.read_text() == "keep"
    assert sorted(png.rglob("*.png")) == written


def test_png_dir_never_mixes_pngs_of_two_runs(tmp_path, data, caplog):
    # --overwrite after images were removed left their PNGs from the old run beside the new
    # ones (and with another layer, the folder mixed layer 11 and layer 0); a changed image
    # whose redo failed kept the PNG of its old picture.
    png = tmp_path / "png"
    config = write_config(tmp_path, data, output={"png_dir": str(png), "png_heads": True})
    assert run(config) == 0
    names = sorted(p.name for p in data.iterdir())
    assert len(list(png.rglob("*.png"))) == 2 * len(names)
    mine = png / "notes.png"  # not written by vit-attn: never removed
    mine.write_bytes(b"not a vit-attn png")
    for name in names[:3]:
        (data / name).unlink()
    again = write_config(
        tmp_path,
        data,
        output={"png_dir": str(png), "png_heads": True},
        attention={"layers": [0]},
    )
    assert run(again, "--overwrite") == 0
    assert logged(caplog, "removed 12 PNGs of an earlier run")
    left = sorted(p.relative_to(png).as_posix() for p in png.rglob("*.png") if p != mine)
    assert left == sorted(f"{n}{s}" for n in names[3:] for s in (".png", ".heads.png"))
    assert mine.read_bytes() == b"not a vit-attn png"
    # A changed image that now fails: its old picture's PNGs go with the redo.
    victim = data / names[3]
    victim.write_bytes(b"no longer an image")
    assert run(again, "--redo-changed") == 0
    assert status_of(tmp_path / "out" / "run.zarr").tolist() == [2, 1, 1]
    assert not any(p.name.startswith(names[3]) for p in png.rglob("*.png"))
    assert (png / f"{names[4]}.png").is_file()


def test_a_new_store_leaves_other_stores_pngs_and_its_own_inputs_under_png_dir(
    tmp_path, data, capsys
):
    # Clearing png_dir for a new store walked the whole tree: it deleted the PNGs of a store
    # whose png_dir lies inside this one's, and input images that are overlays of an earlier
    # run kept under png_dir (the run then failed them all).
    png = tmp_path / "png"
    a = write_config(tmp_path / "a", data, output={"png_dir": str(png)})
    b = write_config(tmp_path / "b", data, output={"png_dir": str(png / "layer_b")})
    assert run(b) == 0 and run(a) == 0  # b's folder was there first
    theirs = files_under(png / "layer_b")
    assert run(a, "--overwrite") == 0
    assert files_under(png / "layer_b") == theirs
    # A png_dir inside another store's is refused from now on.
    d = write_config(tmp_path / "d", data, output={"png_dir": str(png / "layer_d")})
    capsys.readouterr()
    assert run(d) == 2
    line = one_error_line(capsys)
    assert f"lies inside {png}, the png_dir of another store" in line, line
    assert not (png / "layer_d").exists()
    # earlier overlays under png_dir, analysed as images by a new store writing into png_dir
    earlier = sorted((png / "layer_b").glob("*.png"))
    c = write_config(tmp_path / "c", png / "layer_b", output={"png_dir": str(png)})
    shutil.rmtree(tmp_path / "a" / "out")  # png_dir is a's: it must be free for c
    (png / ".vit-attn-store").unlink()
    (png / "layer_b" / ".vit-attn-store").unlink()  # only their being inputs protects them
    assert run(c) == 0
    assert (status_of(tmp_path / "c" / "out" / "run.zarr") == 1).all()
    assert all(p.is_file() for p in earlier)


@pytest.mark.parametrize("where", ["a file", "the store", "inside the store", "around the store"])
def test_png_dir_must_be_a_folder_of_its_own(tmp_path, data, capsys, where):
    store = tmp_path / "out" / "run.zarr"
    png = {
        "a file": tmp_path / "afile",
        "the store": store,
        "inside the store": store / "png",
        "around the store": tmp_path / "out",
    }[where]
    if where == "a file":
        png.write_text("not a folder")
    config = write_config(tmp_path, data, output={"png_dir": str(png)})
    assert run(config) == 2  # before any work: no store, no batch
    line = one_error_line(capsys)
    assert ("is a file" if where == "a file" else "overlap") in line, line
    assert not store.exists()


def test_a_file_the_tool_did_not_write_is_never_replaced(tmp_path, data, capsys):
    png = tmp_path / "png"
    png.mkdir()
    name = sorted(p.name for p in data.iterdir())[3]
    (png / f"{name}.png").write_bytes(b"precious")
    config = write_config(tmp_path, data, output={"png_dir": str(png)})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert f"{name}.png" in line and "is not a PNG vit-attn wrote there" in line
    assert (png / f"{name}.png").read_bytes() == b"precious"
    # PNGs the tool wrote itself are replaced on a rerun: move the user's file away first.
    (png / f"{name}.png").unlink()
    assert run(config) == 0
    assert run(config, "--overwrite") == 0


def test_copies_and_edits_of_the_tools_pngs_are_the_users(tmp_path, data, capsys, caplog):
    # A new store (or --overwrite) deleted every PNG under png_dir that carried the marker:
    # a user's copy of an overlay kept for a paper, a renamed one, and one edited and saved
    # with its text kept (that one a redo also replaced without a word).
    from PIL import Image, PngImagePlugin

    png = tmp_path / "png"
    config = write_config(tmp_path, data, output={"png_dir": str(png)})
    assert run(config) == 0
    names = sorted(p.name for p in data.iterdir())
    (png / "Documents" / "thesis").mkdir(parents=True)
    kept = {
        png / "Documents" / "thesis" / "fig3_attention.png": png / f"{names[0]}.png",
        png / f"{names[1]}_copy.png": png / f"{names[1]}.png",
    }
    for copy, original in kept.items():
        shutil.copyfile(original, copy)
    edited = png / f"{names[2]}.png"
    with Image.open(edited) as im:
        info = PngImagePlugin.PngInfo()
        for key, value in im.text.items():
            info.add_text(key, value)
        picture = im.convert("RGB")
    picture.putpixel((0, 0), (255, 0, 0))
    picture.save(edited, pnginfo=info)
    mine = {p: p.read_bytes() for p in [*kept, edited]}
    capsys.readouterr()
    assert run(config, "--overwrite") == 2  # the edited picture would be replaced: refused
    line = one_error_line(capsys)
    assert str(edited) in line and "changed" in line, line
    assert {p: p.read_bytes() for p in mine} == mine
    edited.rename(tmp_path / "edited.png")
    assert run(config, "--overwrite") == 0
    assert logged(caplog, "removed 5 PNGs of an earlier run")
    assert all(p.read_bytes() == b for p, b in mine.items() if p != edited)
    assert sorted(p.name for p in png.glob("*.png") if p not in kept) == sorted(
        f"{n}.png" for n in names
    )


def test_pngs_never_go_into_a_folder_another_store_claimed(tmp_path, data, capsys):
    # A store whose png_dir lies inside this one's, made first: this run's PNGs for the
    # images of that sub-folder replaced that store's, which then called them its own.
    imagefactory.write_rgb_set(data / "b", [(44, 33), (45, 34)])
    png = tmp_path / "png"
    b = write_config(tmp_path / "b", data / "b", output={"png_dir": str(png / "b")})
    assert run(b) == 0
    theirs = files_under(png / "b")
    a = write_config(tmp_path / "a", data, output={"png_dir": str(png)})
    capsys.readouterr()
    assert run(a) == 2
    line = one_error_line(capsys)
    assert f"would go in {png / 'b'}, the png_dir of another store" in line, line
    assert files_under(png / "b") == theirs
    assert not (tmp_path / "a" / "out" / "run.zarr").exists()


def test_a_resume_leaves_the_unfinished_pngs_of_a_store_inside_png_dir(tmp_path, data):
    # Its temporary files belong to a run that may be writing them right now.
    png = tmp_path / "png"
    b = write_config(tmp_path / "b", data, output={"png_dir": str(png / "layer_b")})
    a = write_config(tmp_path / "a", data, output={"png_dir": str(png)})
    assert run(b) == 0 and run(a) == 0
    name = sorted(p.name for p in data.iterdir())[0]
    theirs = png / "layer_b" / f".{name}.png.999.111.vit-attn.tmp"
    ours = png / f".{name}.png.999.111.vit-attn.tmp"
    for tmp in (theirs, ours):
        tmp.write_bytes(b"half a png")
    assert run(a) == 0
    assert theirs.exists() and not ours.exists()


def test_a_full_disk_under_png_dir_names_the_png_not_the_store(tmp_path, data, tmpfs, capsys):
    import subprocess as sp

    disk = tmpfs("pngdisk", "256k")
    png = disk / "png"
    png.mkdir()
    st = os.statvfs(disk)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    # two pages free: the owner record and its temporary twin, no PNG
    sp.run(["mount", "-o", f"remount,size={used + 2 * 4096}", str(disk)], check=True)
    config = write_config(tmp_path, data, output={"png_dir": str(png), "png_heads": True})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(png) in line, line
    assert "run.zarr" not in line, line
    sp.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
    assert run(config) == 0  # nothing lost: the same store resumes
    assert (status_of(tmp_path / "out" / "run.zarr") == 1).all()


def test_a_read_only_png_dir(tmp_path, data, tmpfs, capsys):
    # A finished store reruns against its read-only png_dir (the claim rewrote its record
    # each time); a new store there is one line that names png_dir, not a temporary file.
    import subprocess as sp

    disk = tmpfs("rodisk", "1m")
    png = disk / "png"
    config = write_config(tmp_path, data, output={"png_dir": str(png)})
    assert run(config) == 0
    sp.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert run(config) == 0
    other = write_config(
        tmp_path / "o",
        data,
        output={"png_dir": str(disk / "other"), "store": str(tmp_path / "o.zarr")},
    )
    capsys.readouterr()
    assert run(other) == 2
    line = one_error_line(capsys)
    assert f"output.png_dir {disk / 'other'} cannot be written (" in line, line
    assert "Read-only file system" in line and ".tmp" not in line, line


def test_a_png_dir_below_a_file_is_one_line(tmp_path, data, capsys):
    (tmp_path / "afile").write_text("a file")
    config = write_config(tmp_path, data, output={"png_dir": str(tmp_path / "afile" / "png")})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line, line
    assert not (tmp_path / "out" / "run.zarr").exists()


def test_a_symlink_inside_png_dir_does_not_lead_outside(tmp_path, capsys):
    imagefactory.write_rgb_set(tmp_path / "data" / "sub", [(40, 30), (41, 31)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "png").mkdir()
    (tmp_path / "png" / "sub").symlink_to(elsewhere)
    config = write_config(tmp_path, tmp_path / "data", output={"png_dir": str(tmp_path / "png")})
    assert run(config) == 2
    assert "outside output.png_dir" in one_error_line(capsys)
    assert list(elsewhere.iterdir()) == []


def test_two_images_never_share_a_png(tmp_path, data, capsys):
    """`x.jpg` and a listed `x.jpg.heads` would both write `x.jpg.heads.png`."""
    name = sorted(p.name for p in data.iterdir())[0]
    (data / f"{name}.heads").write_bytes((data / name).read_bytes())
    (data / "list.txt").write_text(f"{name}\n{name}.heads\n")
    config = write_config(
        tmp_path,
        data / "list.txt",
        output={"png_dir": str(tmp_path / "png"), "png_heads": True},
    )
    assert run(config) == 2
    assert "would both write" in one_error_line(capsys)
    assert not (tmp_path / "png").exists()


# --------------------------------------------------------------------- 2. PNGs and the summary


@pytest.mark.parametrize("threads", [1, 2])  # PNGs encoded in the worker thread, or a pool
def test_a_png_that_cannot_be_written_never_leaves_status_ok(tmp_path, capsys, threads):
    """A name the file system accepts for the image but not for its PNG (NAME_MAX)."""
    imagefactory.write_rgb_set(tmp_path / "data", [(40, 30), (41, 31)])
    long = tmp_path / "data" / ("x" * 251 + ".png")
    (tmp_path / "data" / "img_40x30.png").rename(long)
    config = write_config(
        tmp_path,
        tmp_path / "data",
        output={"png_dir": str(tmp_path / "png")},
        inference={"threads": threads},
    )
    code = run(config)
    err = capsys.readouterr().err
    store = tmp_path / "out" / "run.zarr"
    group = zarr.open_group(str(store), mode="r")
    paths = list(group["image_path"][:])
    i = paths.index(long.name)
    assert group["status"][i] == 2 and "PNG" in str(group["error"][i])
    assert code == 0 and "1 ok, 1 failed, 0 pending" in err, err
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


def test_pngs_missing_on_resume_are_written(tmp_path, data, capsys):
    """png_dir added after the run, or PNGs deleted: the rerun once said "0 to do"."""
    config = write_config(tmp_path, data)
    assert run(config) == 0
    config = write_config(tmp_path, data, output={"png_dir": str(tmp_path / "png")})
    assert run(config) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 6
    (tmp_path / "png" / "img_42x32.png.png").unlink()
    capsys.readouterr()
    assert run(config) == 0
    assert "4 of 6 images in 1 batches" in capsys.readouterr().err
    assert (tmp_path / "png" / "img_42x32.png.png").is_file()


# --------------------------------------------------------------------- 3. config edge cases


def _bomb(depth: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [x]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines)


@pytest.mark.parametrize(
    "how",
    ["file", "set-value", "set-key", "file-moderate"],
)
def test_deeply_nested_yaml_is_one_line(tmp_path, data, capsys, how):
    # `a: [[[...]]]` 500 deep was a RecursionError traceback from the YAML parser; the same
    # through --set; a dotted --set key 1,200 deep passed validation, then crashed hashing.
    cfg = {
        "model": dict(TINY),
        "data": {"source": str(data)},
        "output": {"store": str(tmp_path / "run.zarr")},
        "cluster": {"kind": "none"},
    }
    config = tmp_path / "deep.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args: list[str] = []
    if how == "file":
        config.write_text(yaml.safe_dump(cfg) + "x: " + "[" * 600 + "]" * 600 + "\n")
    elif how == "file-moderate":  # the parser copes; later steps recurse on it
        config.write_text(
            yaml.safe_dump(cfg).replace("model:", "x: " + "[" * 60 + "]" * 60 + "\nmodel:")
        )
    elif how == "set-value":
        args = ["--set", "model.kwargs=" + "[" * 600 + "]" * 600]
    else:
        args = ["--set", "model.kwargs." + ".".join(["a"] * 1200) + "=1"]
    assert run(config, *args) == 2
    line = one_error_line(capsys)
    assert "nested more than 32 levels" in line and len(line) < 300, line
    assert not (tmp_path / "run.zarr").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["data.source", "attention.layers", "model.kwargs"])
def test_a_yaml_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path, data, capsys, where):
    section, key = where.split(".")
    body = yaml.safe_dump(
        {
            "model": dict(TINY),
            "data": {"source": str(data)},
            "output": {"store": str(tmp_path / "run.zarr")},
            "cluster": {"kind": "none"},
        }
    )
    config = tmp_path / "bomb.yaml"
    cfg = yaml.safe_load(body)
    cfg.setdefault(section, {})[key] = "BOMB"
    config.write_text(_bomb() + "\n" + yaml.safe_dump(cfg).replace("BOMB", "*a8"))
    assert run(config) == 2
    line = one_error_line(capsys)
    assert len(line) < 400 and "aliases" in line, line


@pytest.mark.timeout(30)
def test_a_config_of_megabytes_is_refused_before_it_is_parsed(tmp_path, data, capsys):
    # 4 MB of YAML values took a minute and 1.4 GB to parse before the one-line refusal.
    config = write_config(tmp_path, data)
    config.write_text(config.read_text() + "junk: [" + "1, " * 2_000_000 + "1]\n")
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "more than any config needs" in line and ".txt list file" in line, line


def test_error_messages_show_long_values_shortened(tmp_path, capsys):
    config = write_config(tmp_path, "x" * 100_000, inference={"batch_size": list(range(10_000))})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "inference.batch_size" in line and len(line) < 400, line


def _mount_tmpfs(path: Path, size: str) -> None:
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if done.returncode != 0:
        pytest.skip("mount -t tmpfs is not allowed here (no CAP_SYS_ADMIN)")


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture()
def tmpfs(tmp_path):
    mounts: list[Path] = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, size)
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        _umount(path)


USER_MISTAKES = {
    "config-is-a-list": (
        lambda p: p.write_text("- a\n- b\n"),
        ["--set", "model.seed=1"],
        "mapping",
    ),
    "config-is-a-string": (lambda p: p.write_text("just words\n"), ["--set", "a.b=1"], "mapping"),
    "config-not-utf8": (lambda p: p.write_bytes(b"model:\n  name: vit\xff\xfe\n"), [], "UTF-8"),
    "config-is-a-folder": (lambda p: p.mkdir(), [], "is a folder"),
}


@pytest.mark.parametrize("case", sorted(USER_MISTAKES))
def test_config_file_mistakes_are_one_line(tmp_path, capsys, case):
    make, args, message = USER_MISTAKES[case]
    config = tmp_path / "config.yaml"
    make(config)
    assert run(config, *args) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.seed=18446744073709551616", r"model\.seed"),
        ("model.kwargs={depth: 1, patch_size: 8, num_heads: 5}", r"model\.kwargs"),
        ("cluster.address=notaurl", r"cluster\.address 'notaurl' is not a scheduler address"),
        ("attention.layers=[true]", r"attention: layers: expected integers, got a boolean"),
        ("inference.batch_size=true", r"inference: batch_size: expected integers"),
        ("attention.layers=[1.0]", r"attention: layers: expected integers, got a number with"),
        ("model.img_size=64.0", r"model: img_size: expected integers, got a number with a point"),
        ("attention.layers=[[1]]", r"attention\.layers: \[1\] is not an integer block index; give"),
        ("attention.layers=[]", r"error: [^:]*: attention\.layers: the list is empty; give"),
        ("attention.layers=null", r"attention\.layers: expected a list of block indices or 'all'"),
        ("model.kwargs.img_size=64", r"model: img_size is given twice.*keep model\.img_size"),
        ("model.checkpoint=.", r"checkpoint .* is a folder; give the weights file in it"),
        ("inference.threads=100000", r"inference\.threads: .*less than or equal to 1024"),
        ("a..b=1", r"--set 'a\.\.b=1': the key has an empty part"),
        ("model.img_size=71", r"71.* not a multiple of the patch size \[8, 8\].*64 or 72"),
        ("model.img_size=5", r"5.* not a multiple of the patch size \[8, 8\].*; use 8$"),
        ("model.kwargs={depth: 1, patch_size: 0}", r"model\.kwargs.*ZeroDivisionError"),
    ],
    ids=[
        "seed-65-bits",
        "num-heads-5",
        "address-notaurl",
        "layers-true",
        "batch-true",
        "layers-float",
        "img-size-float",
        "layers-nested",
        "layers-empty",
        "layers-null",
        "img-size-twice",
        "checkpoint-folder",
        "threads-huge",
        "set-empty-part",
        "img-71",
        "img-5",
        "patch-0",
    ],
)
def test_model_and_cluster_mistakes_are_one_line(tmp_path, data, capsys, override, message):
    import re

    config = write_config(tmp_path, data)
    extra = ["--set", "cluster.kind=address"] if override.startswith("cluster") else []
    assert run(config, "--set", override, *extra) == 2
    line = one_error_line(capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out" / "run.zarr").exists()


def test_overwrite_says_what_it_discards(tmp_path, data, caplog):
    # `output.overwrite: true` left in a config made every rerun start over without a word.
    config = write_config(tmp_path, data)
    assert run(config) == 0
    caplog.clear()
    assert run(config, "--set", "output.overwrite=true") == 0
    said = logged(caplog, "replacing it")
    assert len(said) == 1 and "6 finished images discarded" in said[0], said
    assert "without overwrite the run would resume it" in said[0]
    caplog.clear()
    other = write_config(tmp_path, data, attention={"layers": [0], "full": True})  # another run
    assert run(other, "--overwrite") == 0
    said = logged(caplog, "replacing it")
    assert len(said) == 1 and "6 finished images discarded" in said[0], said
    assert "resume" not in said[0]


def test_verify_hash_on_a_source_it_cannot_check_is_refused(tmp_path, data, capsys):
    # It was accepted and ignored: a rewritten Parquet file or S3 object resumed as "done".
    from .packing import write_parquet

    names = sorted(p.name for p in data.iterdir())
    part = write_parquet(data, names, tmp_path / "d.parquet")
    config = write_config(tmp_path, data)
    assert run(config, "--set", f"data.source={part}", "--set", "data.verify=hash") == 2
    line = one_error_line(capsys)
    assert "data.verify: hash checks local image files" in line, line
    assert not (tmp_path / "out" / "run.zarr").exists()


def test_an_error_line_stays_readable_whatever_value_it_echoes(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["name"] = "vit_" + "x" * 200_000  # pasted by mistake
    config.write_text(yaml.safe_dump(cfg))
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "is not a timm model" in line and len(line) < 2100 and "more characters" in line
    assert line.endswith("see timm.list_models('vit_*')"), line[-200:]


def test_verbose_goes_after_the_command_too():
    # `vit-attn run -v CONFIG` said "unrecognized arguments: -v".
    from vit_attn.cli import _parser

    assert _parser().parse_args(["run", "-v", "x.yaml"]).verbose is True
    assert _parser().parse_args(["-v", "run", "x.yaml"]).verbose is True
    assert _parser().parse_args(["run", "x.yaml"]).verbose is False
    assert _parser().parse_args(["inspect", "s.zarr", "--verbose"]).verbose is True


def test_inspect_refuses_a_negative_error_count(tmp_path, data, capsys):
    assert run(write_config(tmp_path, data)) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "out" / "run.zarr"), "--errors", "-1"]) == 2
    assert "--errors must be a count >= 0" in one_error_line(capsys)


def test_int8_checkpoint_is_refused(tmp_path, data, capsys):
    import torch
    from safetensors.torch import save_file

    from vit_attn.model import ModelSource, load_model

    loaded = load_model(
        ModelSource(TINY["name"], img_size=(32, 32), kwargs=TINY["kwargs"])  # type: ignore[arg-type]
    )
    state = {
        k: v.to(torch.int8) if k.endswith("qkv.weight") else v
        for k, v in loaded.model.state_dict().items()
    }
    save_file(state, str(tmp_path / "w.safetensors"))
    config = write_config(tmp_path, data, model={"checkpoint": str(tmp_path / "w.safetensors")})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "qkv.weight is int8" in line and "float32" in line, line


def tiny_state(**kwargs) -> dict:
    from vit_attn.model import ModelSource, load_model

    loaded = load_model(
        ModelSource(TINY["name"], img_size=(32, 32), kwargs={**TINY["kwargs"], **kwargs})  # type: ignore[arg-type]
    )
    return dict(loaded.model.state_dict())


def test_a_checkpoint_with_nan_weights_is_refused_before_any_work(tmp_path, data, capsys):
    # It ran to "6 ok" with every map, probability and statistic NaN.
    from safetensors.torch import save_file

    state = tiny_state()
    state["blocks.0.attn.qkv.weight"][3, 5] = float("nan")
    save_file(state, str(tmp_path / "w.safetensors"))
    config = write_config(tmp_path, data, model={"checkpoint": str(tmp_path / "w.safetensors")})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "1 values that are NaN or infinite" in line and "blocks.0.attn.qkv.weight" in line
    assert not (tmp_path / "out" / "run.zarr").exists()


def scaled_config(tmp_path: Path, data: Path, scales: dict, precision: str) -> Path:
    """A depth-2 model with some weights multiplied (name -> factor)."""
    from safetensors.torch import save_file

    state = tiny_state(depth=2)
    for name, factor in scales.items():
        state[name] *= factor
    save_file(state, str(tmp_path / "w.safetensors"))
    model = {**TINY, "kwargs": {**TINY["kwargs"], "depth": 2}}
    model["checkpoint"] = str(tmp_path / "w.safetensors")
    inference = {"backend": "onnxruntime", "precision": precision, "batch_size": 4, "threads": 1}
    return write_config(tmp_path, data, model=model, inference=inference)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_images_whose_outputs_overflow_fail_instead_of_storing_nan(tmp_path, data, backend):
    # Finite weights whose q k^T overflows float32: every map was NaN under status 1.
    qkv = tiny_state(depth=2)["blocks.1.attn.qkv.weight"]
    scales = {"blocks.1.attn.qkv.weight": 1e20 / float(qkv.abs().max())}
    config = scaled_config(tmp_path, data, scales, "fp32")
    assert run(config, "--set", f"inference.backend={backend}") == 0  # failures are results
    g = zarr.open_group(str(tmp_path / "out" / "run.zarr"), mode="r")
    assert (np.asarray(g["status"][:]) == 2).all()
    errors = np.asarray(g["error"][:]).tolist()
    assert all("not finite (NaN or inf)" in e and "check the model's weights" in e for e in errors)
    assert not np.isnan(np.asarray(g["cls_attention"][:], np.float32)).any()
    # Moderately sharp weights are fine: every image is ok.
    scales = {"blocks.1.attn.qkv.weight": 1000 / float(qkv.abs().max())}
    config = scaled_config(tmp_path, data, scales, "fp32")
    assert run(config, "--overwrite", "--set", f"inference.backend={backend}") == 0
    assert (status_of(tmp_path / "out" / "run.zarr") == 1).all()


def test_weights_beyond_float16_are_refused_for_mixed_precision(tmp_path, data, capsys):
    fc2 = tiny_state(depth=2)["blocks.0.mlp.fc2.weight"]
    scales = {"blocks.0.mlp.fc2.weight": 1e5 / float(fc2.abs().max())}
    assert run(scaled_config(tmp_path, data, scales, "mixed")) == 2
    line = one_error_line(capsys)
    assert "beyond float16's range" in line and "use precision: fp32" in line, line


def test_only_the_images_with_non_finite_outputs_fail():
    from types import SimpleNamespace

    from vit_attn.task import _drop_non_finite

    ok = np.array([True, False, True, True, True])
    att = np.ones((4, 2, 3), np.float32)
    att[1, 0, 2] = np.nan  # the second ok image: index 2
    att[3, 1, 1] = np.inf  # the fourth: index 4
    top = np.arange(4 * 5).reshape(4, 5)
    result = SimpleNamespace(error=["", "decode failed", "", "", ""])
    out = _drop_non_finite(result, {"cls_attention": att, "topk_index": top}, ok, "fp32")  # type: ignore[arg-type]
    assert ok.tolist() == [True, False, False, True, False]
    np.testing.assert_array_equal(out["topk_index"], top[[0, 2]])
    assert out["cls_attention"].shape == (2, 2, 3)
    assert result.error[1] == "decode failed"
    assert "not finite" in result.error[2] and "check the model's weights" in result.error[4]
    assert result.error[0] == result.error[3] == ""


def test_models_of_other_than_three_channels_are_refused_in_one_line(tmp_path, data, capsys):
    config = write_config(
        tmp_path, data, model={**TINY, "kwargs": {**TINY["kwargs"], "in_chans": 1}}
    )
    assert run(config) == 2
    assert "in_chans 1: vit-attn feeds the model RGB images" in one_error_line(capsys)


def test_overwrite_through_a_symlinked_store_path(tmp_path, data):
    real = tmp_path / "real" / "run.zarr"
    config = write_config(tmp_path, data, output={"store": str(real)})
    assert run(config) == 0
    (tmp_path / "link.zarr").symlink_to(real)
    config = write_config(tmp_path, data, output={"store": str(tmp_path / "link.zarr")})
    assert run(config, "--overwrite") == 0
    assert (tmp_path / "link.zarr").is_symlink() and (status_of(real) == 1).all()


def test_an_empty_mount_point_as_the_store(tmp_path, data, tmpfs):
    store = tmpfs("mnt", "64m")
    config = write_config(tmp_path, data, output={"store": str(store)})
    assert run(config) == 0
    assert (status_of(store) == 1).all()


def test_no_space_while_creating_the_template_is_one_line(tmp_path, data, tmpfs, capsys):
    small = tmpfs("small", "8k")
    config = write_config(tmp_path, data, output={"store": str(small / "run.zarr")})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(small) in line, line
    assert list(small.iterdir()) == []


# --------------------------------------------------------------------- 4. one writer per store


def _hold_lock(store: Path) -> subprocess.Popen:
    """A real process on this host holding the store's lock until it is killed."""
    code = (
        "import sys, time\n"
        "from vit_attn.lock import lock_for\n"
        f"lock = lock_for({str(store)!r}, 'first-run-id', 30)\n"
        "lock.acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(
    tmp_path, data, capsys
):
    store = tmp_path / "out" / "run.zarr"
    config = write_config(tmp_path, data)
    holder = _hold_lock(store)
    try:
        assert run(config) == 2
        line = one_error_line(capsys)
        assert "in use by run first-run-id" in line and f"pid {holder.pid}" in line, line
        assert not store.exists()
    finally:
        holder.kill()
        holder.wait()
    assert run(config) == 0  # the holder's process is gone: its lock is stale
    assert (status_of(store) == 1).all()
    assert not Path(str(store) + ".lock").exists()  # released at the end


def test_a_lock_without_heartbeat_from_another_host_is_taken_over(tmp_path, data, capsys):
    import json
    import time

    store = tmp_path / "out" / "run.zarr"
    lock = Path(str(store) + ".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"run_id": "r0", "host": "elsewhere", "pid": 1, "user": "u"}))
    config = write_config(tmp_path, data, output={"lock_stale_seconds": 60})
    assert run(config) == 2  # fresh heartbeat: the other host's run may be alive
    assert "on elsewhere" in one_error_line(capsys)
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert run(config) == 0
    assert (status_of(store) == 1).all()


@pytest.mark.parametrize(
    "record",
    [
        {"stale_after": "soon"},
        {"stale_after": None},
        {"stale_after": float("nan")},
        {"stale_after": 10**400},
        {"pid": "1", "host": "THIS"},
        {"pid": True, "host": "THIS"},
    ],
)
def test_a_lock_record_with_odd_values_is_a_refusal_not_a_traceback(tmp_path, data, capsys, record):
    # A lock written by hand or by another tool: float("soon") raised a ValueError out of
    # the refusal; a pid given as a string counted as a dead process and the lock was taken.
    import json
    import socket

    store = tmp_path / "out" / "run.zarr"
    lock = Path(str(store) + ".lock")
    lock.parent.mkdir(parents=True)
    fields = {"run_id": "r0", "host": "elsewhere", "pid": 5, "user": "u", **record}
    if fields["host"] == "THIS":
        fields["host"] = socket.gethostname()
    lock.write_text(json.dumps(fields))
    config = write_config(tmp_path, data, output={"lock_stale_seconds": 60})
    capsys.readouterr()
    assert run(config) == 2  # fresh: may be a live run's
    line = one_error_line(capsys)
    assert "is in use by run r0" in line and "taken over after 60 s" in line, line
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert run(config) == 0 and (status_of(store) == 1).all()


def test_a_lock_of_a_pid_beyond_any_process_on_this_host_is_taken_over(tmp_path, data):
    # os.kill(10**30, 0) raised OverflowError out of the lock: a traceback, exit 1.
    import json
    import socket

    store = tmp_path / "out" / "run.zarr"
    lock = Path(str(store) + ".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"run_id": "r0", "host": socket.gethostname(), "pid": 10**30}))
    assert run(write_config(tmp_path, data)) == 0 and (status_of(store) == 1).all()


def test_a_stalled_writer_never_writes_into_the_store_that_replaced_its_own(tmp_path, data):
    """Run 1 plans and stalls; run 2 replaces the store (--overwrite); run 1 wakes up."""
    from vit_attn.config import load_config
    from vit_attn.plan import prepare
    from vit_attn.task import run_batch

    config = write_config(tmp_path, data)
    first = prepare(load_config(config))
    second = prepare(load_config(config, ["attention.layers=all"]), overwrite=True)
    store = tmp_path / "out" / "run.zarr"
    assert "belongs to run" in (run_batch(first.plan, first.tasks[0]).fatal or "")
    assert (status_of(store) == 0).all()
    run_batch(second.plan, second.tasks[0])
    assert (status_of(store)[:4] == 1).all()
    # A resume is a new run too: the earlier run's writers are refused from then on.
    third = prepare(load_config(config, ["attention.layers=all"]))
    assert "belongs to run" in (run_batch(second.plan, second.tasks[-1]).fatal or "")
    run_batch(third.plan, third.tasks[-1])
    assert (status_of(store) == 1).all()


@pytest.mark.slow  # two plans and a whole run
def test_a_writer_taken_over_during_its_data_write_leaves_the_batch_to_be_redone(
    tmp_path, data, monkeypatch
):
    """Run 1 passes its ownership check, stalls before its data lands; run 2 resumes the
    store and writes the same batch (status 1); run 1's data then lands over it. Run 1's
    second check fails: it must leave status 0 (redo), never run 2's 1 over its own data."""
    import vit_attn.store as store_module
    from vit_attn.config import load_config
    from vit_attn.plan import prepare
    from vit_attn.task import _run_batch, run_batch

    config = write_config(tmp_path, data)
    first = prepare(load_config(config))
    store = tmp_path / "out" / "run.zarr"
    original = store_module._write_regions
    taken: list[bool] = []

    def stalled(regions, start, stop):
        if not taken:  # run 1's data write: run 2 takes over and finishes the batch first
            taken.append(True)
            second = prepare(load_config(config))
            # the batch body alone: run_batch's per-process gate is held by run 1's call
            assert _run_batch(second.plan, second.tasks[0]).fatal is None
            assert (status_of(store)[start:stop] == 1).all()
        original(regions, start, stop)

    monkeypatch.setattr(store_module, "_write_regions", stalled)
    fatal = run_batch(first.plan, first.tasks[0]).fatal or ""
    assert "belongs to run" in fatal and "a resume redoes it" in fatal
    assert (status_of(store)[:4] == 0).all()
    monkeypatch.setattr(store_module, "_write_regions", original)
    assert run(config) == 0 and (status_of(store) == 1).all()


# --------------------------------------------------------------------- 5. data identity


def _replace_image(path: Path, seed: int) -> None:
    """Another picture under the same name (same size in pixels, different content)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    pixels = imagefactory.synthetic_pixels(w, h, seed=seed)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("array", ["cls_attention", "status", "layer", "head"])
def test_a_store_missing_an_array_is_damaged_not_complete(tmp_path, data, capsys, array):
    # cls_attention gone: "done: 6 ok". layer gone: zarr read its fill value, so inspect
    # said "layers [0]" and show drew the last block's map labelled block 0.
    import shutil

    config = write_config(tmp_path, data)
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    shutil.rmtree(store / array)
    capsys.readouterr()
    assert run(config) == 2
    line = one_error_line(capsys)
    assert f"is damaged: its array {array} is missing" in line and "--overwrite" in line
    for command in (["inspect", str(store)], ["show", str(store), "--image", "0", "-o", "x.png"]):
        if array == "cls_attention":
            continue  # readers need status, image_path and the coordinates; not every map
        assert cli_main(command) == 2, command
        err = capsys.readouterr().err
        assert f"its array {array} is missing" in err and "Traceback" not in err, err
    assert run(config, "--overwrite") == 0 and (store / array / "zarr.json").is_file()


def test_an_unreadable_status_file_is_one_line_for_readers_and_redone_by_a_run(
    tmp_path, data, capsys, caplog
):
    # Garbage in one status chunk: inspect, stats, show and run all ended in a Zstd
    # traceback, and the run could not get past it.
    config = write_config(tmp_path, data, attention={"stats": True})
    fresh = write_config(tmp_path / "fresh", data, attention={"stats": True})
    assert run(config) == 0 and run(fresh) == 0
    store = tmp_path / "out" / "run.zarr"
    chunks = sorted(p for p in (store / "status" / "c").iterdir() if p.is_file())
    chunks[-1].write_bytes(b"\x8f" * 20)
    capsys.readouterr()
    for command in (["inspect", str(store)], ["stats", str(store)]):
        assert cli_main(command) == 2, command
        line = one_error_line(capsys)
        assert f"is damaged: its status file c/{chunks[-1].name} (of 1 unreadable)" in line, line
    last = zarr.open_array(store / "status", mode="r").shape[0] - 1
    assert cli_main(["show", str(store), "--image", str(last), "-o", "x.png"]) == 2
    assert "cannot read status of image" in one_error_line(capsys)
    assert run(config) == 0
    assert logged(caplog, "cannot be read; doing it again")
    fresh_store = tmp_path / "fresh" / "out" / "run.zarr"
    for name in ("status", "cls_attention", "concentration_60", "topk_index"):
        np.testing.assert_array_equal(
            zarr.open_array(store / name, mode="r")[:],
            zarr.open_array(fresh_store / name, mode="r")[:],
        )
    # garbage in a statistics file: stats says the store is damaged, in one line
    stat = sorted(p for p in (store / "concentration_60" / "c").rglob("*") if p.is_file())[0]
    stat.write_bytes(b"\x8f" * 64)
    capsys.readouterr()
    assert cli_main(["stats", str(store)]) == 2
    assert "is damaged: a store file cannot be read (" in one_error_line(capsys)


def test_a_cut_short_array_metadata_file_is_damage_before_the_run_not_after(tmp_path, data, capsys):
    # The consolidated copy hid it: the resume found "0 batches to do", then ended in a
    # JSONDecodeError traceback from the closing consolidation.
    config = write_config(tmp_path, data)
    assert run(config) == 0
    meta = tmp_path / "out" / "run.zarr" / "cls_attention" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:50])
    capsys.readouterr()
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "its array cls_attention is missing (or its zarr.json unreadable)" in line, line


def test_a_store_whose_root_metadata_is_cut_short_is_said_so(tmp_path, data, capsys):
    # It was "not a vit-attention store (no such folder, or not made by vit-attn run)".
    config = write_config(tmp_path, data)
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    (store / "zarr.json").write_bytes((store / "zarr.json").read_bytes()[:100])
    before = files_under(store)
    capsys.readouterr()
    assert cli_main(["inspect", str(store)]) == 2
    assert "looks like a store whose root metadata is damaged" in one_error_line(capsys)
    for args in ((), ("--overwrite",)):
        assert run(config, *args) == 2
        line = one_error_line(capsys)
        assert "root metadata is damaged" in line and "nothing was changed" in line, line
    assert files_under(store) == before


def test_the_root_folder_as_store_is_one_line(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    for root in ("/", "/.."):
        assert run(config, "--set", f"output.store={root}") == 2
        line = one_error_line(capsys)
        assert "the root folder cannot be a store" in line, line


def test_a_resume_redoes_batches_whose_store_files_are_gone(tmp_path, data, caplog):
    # A data file deleted (or lost with a disk) under a finished batch read as zeros with
    # status 1: `run` said "done: 6 ok" and left it, and xarray readers got the zeros.
    overlays = {"output": {"overlays": "heads"}, "attention": {"layers": [0], "full": True}}
    config = write_config(tmp_path, data, **overlays)
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    gone = sorted(p for p in (store / "cls_attention" / "c").rglob("*") if p.is_file())[0]
    gone.unlink()  # the first batch's
    heads = sorted(p for p in (store / "overlay_heads" / "c").rglob("*") if p.is_file())[-1]
    heads.write_bytes(b"")  # the last batch's, emptied (a write cut short): as good as gone
    assert run(config) == 0
    assert logged(caplog, "2 finished batches have store files missing")
    assert gone.is_file() and heads.stat().st_size > 0
    fresh = write_config(tmp_path / "fresh", data, **overlays)
    assert run(fresh) == 0
    assert_stores_equal(store, tmp_path / "fresh" / "out" / "run.zarr")
    caplog.clear()
    assert run(config) == 0 and not logged(caplog, "store files missing")  # whole again


def test_inspect_and_stats_see_finished_images_whose_store_files_are_gone(tmp_path, data, capsys):
    # inspect said "6 ok" and stats summarised zarr's fill values (zeros) as statistics.
    config = write_config(tmp_path, data, attention={"layers": [0, -1], "stats": True})
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    assert cli_main(["stats", str(store)]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(store)]) == 0
    assert "damaged" not in capsys.readouterr().out
    stat = "concentration_60"
    first = sorted(p for p in (store / stat / "c").rglob("*") if p.is_file())[0]
    first.unlink()
    assert cli_main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    rows = zarr.open_array(store / "status", mode="r").chunks[0]
    shown = ", ".join(map(str, range(min(rows, 4)))) + (", ..." if rows > 4 else "")
    assert f"{stat} ({rows} images: {shown})" in out and "vit-attn run CONFIG" in out, out
    assert cli_main(["stats", str(store)]) == 2
    line = one_error_line(capsys)
    assert "is damaged: finished images have lost their store files" in line, line
    assert f"{stat} ({rows} images" in line
    assert run(config) == 0 and first.is_file()  # the resume redoes the batch
    assert cli_main(["stats", str(store)]) == 0


def test_a_resume_may_infer_in_smaller_batches(tmp_path, data, capsys):
    # Out of GPU memory half way: the store's batches are its chunks, but a smaller
    # inference.batch_size must resume it, not demand --overwrite of the finished work.
    reference = write_config(tmp_path / "ref", data)
    assert run(reference) == 0
    config = write_config(tmp_path, data)
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    g = zarr.open_group(str(store), mode="r+")
    g["status"][0:4] = 0  # the first batch (of 4) to do again
    capsys.readouterr()
    for size in ("3", "64"):  # pieces 3 + 1; and larger than a store batch
        assert run(config, "--set", f"inference.batch_size={size}") == 0
        err = capsys.readouterr().err
        assert "holds a different run" not in err and "in 1 batches to do" in err, err
        if size == "3":
            assert "inferred 3 at a time (the store's batches are 4)" in err
        g["status"][0:4] = 0
    assert run(config, "--set", "inference.batch_size=2") == 0
    ref = zarr.open_group(str(tmp_path / "ref" / "out" / "run.zarr"), mode="r")
    got = zarr.open_group(str(store), mode="r")
    assert got["status"].chunks == ref["status"].chunks  # the store's layout is unchanged
    np.testing.assert_array_equal(got["status"][:], ref["status"][:])
    np.testing.assert_allclose(
        got["cls_attention"][:].astype(np.float32),
        ref["cls_attention"][:].astype(np.float32),
        rtol=2e-3,
        atol=1e-6,  # float16 storage: another batch size may round a value the other way
    )


def test_stats_written_into_a_store_do_not_block_redoing_a_changed_image(
    tmp_path, data, capsys, caplog
):
    # `vit-attn stats --write` adds arrays the run's batches do not make; a resume that redoes
    # images failed every batch on them, for ever, and only --overwrite (losing all) got out.
    config = write_config(tmp_path, data, attention={"layers": [0], "full": True})
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    assert cli_main(["stats", str(store), "--write"]) == 0
    assert "cls_entropy" in zarr.open_group(str(store), mode="r")
    _replace_image(data / "img_42x32.png", seed=99)
    caplog.clear()
    assert run(config, "--redo-changed") == 0
    said = logged(caplog, "stats --write")
    assert len(said) == 1 and "cls_entropy" in said[0] and "write them again" in said[0], said
    assert (status_of(store) == 1).all()
    group = zarr.open_group(str(store), mode="r")
    assert "cls_entropy" not in group and "stat_units" not in group.attrs
    # Readers of the consolidated metadata do not see the dropped arrays either.
    from vit_attn.store import open_dataset

    assert "cls_entropy" not in open_dataset(store).data_vars
    # and they can be written again, now from the redone image's attention too.
    assert cli_main(["stats", str(store), "--write"]) == 0
    assert "cls_entropy" in open_dataset(store).data_vars
    # A rerun with nothing to do keeps them.
    assert run(config) == 0
    assert "cls_entropy" in open_dataset(store).data_vars


def test_stats_write_takes_the_stores_lock(tmp_path, data, capsys):
    # Run while a resume ran, it rewrote the root metadata with the old run id: the resume
    # stopped with "now belongs to run ..." and left statistics of the old attention.
    from vit_attn.lock import lock_for

    config = write_config(tmp_path, data, attention={"layers": [0], "full": True})
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    running = lock_for(store, "a-resume-in-progress", 120)
    running.acquire()
    try:
        capsys.readouterr()
        assert cli_main(["stats", str(store), "--write"]) == 2
        line = one_error_line(capsys)
        assert "is in use by run a-resume-in-progress" in line, line
        assert "cls_entropy" not in zarr.open_group(str(store), mode="r")
    finally:
        running.release()
    assert cli_main(["stats", str(store), "--write"]) == 0
    assert "cls_entropy" in zarr.open_group(str(store), mode="r")
    assert not (store.parent / "run.zarr.lock").exists()


@pytest.mark.parametrize("kind", ["shards", "parquet"])
def test_a_rewritten_shard_or_parquet_file_is_not_mixed_into_a_resume(tmp_path, data, capsys, kind):
    # The same member names with other pixels: a resume kept the old images' maps and did
    # the rest from the new file, with no word; --redo-changed did nothing.
    from .packing import folder_files, write_parquet, write_shards

    names = folder_files(data)

    def pack(folder: Path) -> str:
        if kind == "shards":
            write_shards(folder, names, tmp_path / "packed", per_shard=3)
            return str(tmp_path / "packed" / "train-{000000..000001}.tar")
        write_parquet(folder, names, tmp_path / "packed" / "all.parquet", row_group_size=2)
        return str(tmp_path / "packed" / "all.parquet")

    source = pack(data)
    config = write_config(tmp_path, source)
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    before = zarr.open_group(str(store), mode="r")["cls_attention"][:]
    other = tmp_path / "other"
    shutil.copytree(data, other)
    for name in names:
        _replace_image(other / name, seed=7)
    time.sleep(0.01)  # a later mtime even on coarse clocks
    pack(other)  # the same names, other pictures
    capsys.readouterr()
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "6 input images changed" in line and "the shard or Parquet file holding them" in line
    assert "--redo-changed" in line
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["cls_attention"][:], before)
    # show drew the old maps over the new picture: refused like a changed image file
    assert cli_main(["show", str(store), "--image", "0", "-o", str(tmp_path / "x.png")]) == 2
    line = one_error_line(capsys)
    assert "the file holding it changed since the run" in line and "--redo-changed" in line
    assert run(config, "--redo-changed") == 0
    assert cli_main(["show", str(store), "--image", "0", "-o", str(tmp_path / "x.png")]) == 0
    fresh = write_config(tmp_path / "fresh", source)
    assert run(fresh) == 0
    assert_stores_equal(store, tmp_path / "fresh" / "out" / "run.zarr")


def test_a_shard_store_made_before_shard_identities_still_resumes(tmp_path, data, capsys):
    from .packing import folder_files, write_shards

    write_shards(data, folder_files(data), tmp_path / "packed", per_shard=3)
    config = write_config(tmp_path, str(tmp_path / "packed" / "train-{000000..000001}.tar"))
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    g = zarr.open_group(str(store), mode="r+")
    g["status"][3:] = 0  # half done, by an older vit-attn that kept no shard identity
    for name in ("image_bytes", "image_mtime_ns"):
        shutil.rmtree(store / name)
    zarr.consolidate_metadata(str(store))
    capsys.readouterr()
    assert run(config) == 0
    assert (status_of(store) == 1).all()
    assert "image_bytes" not in zarr.open_group(str(store), mode="r")


def test_retry_failed_redoes_images_that_failed_for_a_passing_reason(tmp_path, data, caplog):
    # An image unreadable while the run read it (moved away, a network share's hiccup)
    # failed; once it read fine again under the same size and mtime, nothing could redo it
    # short of --overwrite (the whole dataset). Here: zeros of the same size and mtime.
    config = write_config(tmp_path, data)
    victim = data / "img_42x32.png"
    good, stat = victim.read_bytes(), victim.stat()
    victim.write_bytes(bytes(len(good)))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(config) == 0  # failed images are results
    store = tmp_path / "out" / "run.zarr"
    assert (status_of(store) == 2).sum() == 1
    victim.write_bytes(good)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(config) == 0 and (status_of(store) == 2).sum() == 1  # a plain rerun: as it was
    caplog.clear()
    assert run(config, "--retry-failed") == 0
    assert logged(caplog, "retrying 1 failed images")
    assert (status_of(store) == 1).all()
    assert zarr.open_group(str(store), mode="r")["error"][:].tolist() == [""] * 6
    fresh = write_config(tmp_path / "fresh", data)
    assert run(fresh) == 0
    assert_stores_equal(store, tmp_path / "fresh" / "out" / "run.zarr")
    caplog.clear()
    assert run(config, "--retry-failed") == 0
    assert logged(caplog, "no failed images to retry")


def test_a_template_left_by_a_killed_creation_is_removed_by_the_next_run(tmp_path, data):
    # SIGKILL while the store's template was built left `.run.zarr.tmp-XXXXXXXX/` for good.
    stale = tmp_path / "out" / ".run.zarr.tmp-0123abcd"
    (stale / "cls_attention").mkdir(parents=True)
    (stale / "zarr.json").write_text("{}")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    # Being built right now by another process (through the API, without the lock): kept.
    fresh = tmp_path / "out" / ".run.zarr.tmp-4567cdef"
    fresh.mkdir()
    other = tmp_path / "out" / ".run.zarr.tmp-not-ours"  # not a template name: kept
    other.mkdir()
    os.utime(other, (old, old))
    assert run(write_config(tmp_path, data)) == 0
    assert not stale.exists() and fresh.exists() and other.exists()
    assert (status_of(tmp_path / "out" / "run.zarr") == 1).all()


def test_a_refused_resume_names_the_config_keys_that_differ(tmp_path, data, capsys):
    # It named fingerprint entries ("model.grid", "model.weights_digest ... (model.checkpoint,
    # model.seed)") for a change of model.img_size alone.
    config = write_config(tmp_path, data)
    assert run(config) == 0
    capsys.readouterr()
    assert run(config, "--set", "model.img_size=48") == 2
    line = one_error_line(capsys)
    assert "the patch grid (model.img_size, model.kwargs)" in line, line
    assert "model.checkpoint" not in line and "model.grid" not in line, line


def test_a_changed_image_under_the_same_name_is_not_silently_kept(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    assert run(config) == 0
    store = tmp_path / "out" / "run.zarr"
    before = zarr.open_group(str(store), mode="r")["cls_attention"][:]
    _replace_image(data / "img_42x32.png", seed=99)
    capsys.readouterr()
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "1 input images changed" in line and "img_42x32.png" in line, line
    assert "--redo-changed" in line
    # With the flag, exactly the changed image's batch is redone; the store matches a fresh run.
    assert run(config, "--redo-changed") == 0
    assert "4 of 6 images in 1 batches" in capsys.readouterr().err  # its batch of 4
    after = zarr.open_group(str(store), mode="r")["cls_attention"][:]
    i = list(zarr.open_group(str(store), mode="r")["image_path"][:]).index("img_42x32.png")
    assert not np.array_equal(before[i], after[i])
    fresh = write_config(tmp_path / "fresh", data)
    assert run(fresh) == 0
    np.testing.assert_array_equal(
        after,
        zarr.open_group(str(tmp_path / "fresh" / "out" / "run.zarr"), mode="r")["cls_attention"][:],
    )


def test_an_image_added_since_the_run_gets_advice_about_the_images(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    assert run(config) == 0
    imagefactory.write_rgb(data, "late.png", (41, 33))
    capsys.readouterr()
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "1 image added (late.png)" in line and "list the images it was made from" in line
    assert "use the config it was made with" not in line  # the config did not change


def test_verify_hash_sees_a_change_that_keeps_size_and_mtime(tmp_path, data, capsys):
    config = write_config(tmp_path, data, data={"verify": "hash"})
    assert run(config) == 0
    target = data / "img_41x31.png"
    st = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-20] ^= 0xFF  # inside the IEND/IDAT tail: same size
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run(config) == 2
    assert "content differs" in one_error_line(capsys)


def test_another_folder_with_the_same_names_is_another_run(tmp_path, data, capsys):
    import shutil

    config = write_config(tmp_path, data)
    assert run(config) == 0
    other = tmp_path / "other"
    shutil.copytree(data, other)
    config = write_config(tmp_path, other)
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "data.source (its folder)" in line and str(other) in line, line
    assert zarr.open_group(str(tmp_path / "out" / "run.zarr"), mode="r").attrs["image_root"] == str(
        data
    )


# --------------------------------------------------------------------- 6. no hangs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["scheduler_file", "address"])
def test_a_missing_scheduler_fails_in_bounded_time(tmp_path, data, capsys, where):
    import time

    target = (
        {"scheduler_file": str(tmp_path / "nowhere.json")}
        if where == "scheduler_file"
        else {"address": f"tcp://127.0.0.1:{_free_port()}"}
    )
    config = write_config(
        tmp_path, data, cluster={"kind": "address", "connect_timeout": 2, **target}
    )
    start = time.monotonic()
    assert run(config) == 2
    assert time.monotonic() - start < 60
    line = one_error_line(capsys)
    assert str(next(iter(target.values()))) in line, line


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_without_progress_stops_with_one_line(tmp_path, data, capsys, caplog):
    """A scheduler with no worker at all: nothing finishes; the watchdog says so."""
    import time

    sched_file = tmp_path / "scheduler.json"
    dask = str(Path(sys.executable).parent / "dask")
    proc = subprocess.Popen(
        [
            dask,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(sched_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        config = write_config(
            tmp_path,
            data,
            cluster={"kind": "address", "scheduler_file": str(sched_file), "stall_minutes": 0.05},
        )
        start = time.monotonic()
        caplog.clear()
        assert run(config) == 2
        assert time.monotonic() - start < 120
        line = one_error_line(capsys)
        assert "no batch finished for 0.05 minutes" in line and "0 workers" in line, line
        # It waited without a word until then; with no worker at all it says so at once.
        said = logged(caplog, "no worker is connected to the scheduler")
        assert len(said) == 1 and "cluster.stall_minutes" in said[0], said
        assert (status_of(tmp_path / "out" / "run.zarr") == 0).all()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------- 7. disk full


FULL_DISK = {
    "model": {"img_size": 64},
    "attention": {"full": True},
    "output": {"overlays": "heads", "compression": "none"},
}


def test_disk_full_is_one_line_and_the_store_stays_resumable(tmp_path, tmpfs, capsys):
    import subprocess as sp

    imagefactory.write_rgb_set(tmp_path / "data", [(40 + i, 30 + i) for i in range(16)])
    disk = tmpfs("disk", "256k")  # the template fits, the first batches do not
    store = disk / "run.zarr"
    config = write_config(
        tmp_path,
        tmp_path / "data",
        **{**FULL_DISK, "output": {**FULL_DISK["output"], "store": str(store)}},
    )
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(store) in line, line
    assert (status_of(store) != 1).sum() > 0
    # Still full at the resume, whose first write is the root's new run id: it said only
    # "No space left on device", with no word of where.
    # One free page: room for the lock only. (Filling the disk with a file and cutting one
    # page off it failed when the first run had left less than a page.)
    st = os.statvfs(disk)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    sp.run(["mount", "-o", f"remount,size={used + 4096}", str(disk)], check=True)
    assert run(config) == 2
    line = one_error_line(capsys)
    assert f"{store}: cannot update the store (" in line and "No space left" in line, line
    sp.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    assert run(config) == 0  # resumes: the same store, nothing to redo by hand
    assert (status_of(store) == 1).all()
    reference = write_config(tmp_path / "ref", tmp_path / "data", **FULL_DISK)
    assert run(reference) == 0

    assert_stores_equal(store, tmp_path / "ref" / "out" / "run.zarr")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disk_full_on_a_local_cluster_is_not_retried(tmp_path, tmpfs, capsys):
    imagefactory.write_rgb_set(tmp_path / "data", [(40 + i, 30 + i) for i in range(16)])
    disk = tmpfs("disk", "256k")
    config = write_config(
        tmp_path,
        tmp_path / "data",
        **{**FULL_DISK, "output": {**FULL_DISK["output"], "store": str(disk / "run.zarr")}},
        cluster={"kind": "local", "n_workers": 1, "retries": 2},
    )
    assert run(config) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert len(err) < 2000, err


@pytest.mark.parametrize("cluster", ["none", "local"])
def test_pillow_warnings_that_name_no_file_are_not_printed(tmp_path, data, cluster):
    # A file Pillow half-recognises printed "vit-attn: Corrupt EXIF data. Expecting to read
    # 2 bytes but only got 0." naming no file; the image fails with its reason anyway.
    (data / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    config = write_config(tmp_path, data, cluster={"kind": cluster, "n_workers": 1})
    cmd = [str(Path(sys.executable).parent / "vit-attn"), "run", str(config), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "EXIF" not in proc.stderr and "6 ok, 1 failed" in proc.stderr, proc.stderr
    again = [*cmd[:1], "-v", *cmd[1:], "--overwrite"]
    verbose = subprocess.run(again, capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "Corrupt EXIF data" in verbose.stderr, verbose.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["show", "s.zarr", "--image", "0", "--layer", "x", "-o", "a.png"],
            "show: argument --layer: invalid int value: 'x' (see vit-attn show --help)",
        ),
        (
            ["show", "s.zarr", "--image", "0"],
            "show: the following arguments are required: -o/--output",
        ),
        (["demo", "--n", "x"], "demo: argument --n: invalid int value: 'x'"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
        (["view", "s.zarr", "--host", ""], "view --host is empty; give an address"),
    ],
)
def test_a_usage_mistake_is_one_line(tmp_path, argv, line):
    # argparse printed up to 8 lines of usage, then "vit-attn show: error: ...".
    cmd = [str(Path(sys.executable).parent / "vit-attn"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("vit-attn: error: ") and line in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


_OFFLINE_HUB = """
import logging, sys
from vit_attn import plan
from vit_attn.cli import main
from vit_attn.errors import ModelError

def offline(cfg):
    import timm  # loading a model imports huggingface_hub, whose import sets its own level
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    raise ModelError("pretrained weights for 'x' could not be loaded; offline?")

plan.resolve_model = offline
sys.exit(main(sys.argv[1:]))
"""


def test_hugging_face_download_retries_are_not_printed_without_verbose(tmp_path, data):
    # Offline, pretrained weights printed 44 lines of huggingface_hub's retries (each twice)
    # over ~46 s before the one line saying what to do. The retry is logged here as
    # huggingface_hub logs it, in a fresh process as `vit-attn run` is (the download itself
    # needs a network this test does not have).
    config = write_config(tmp_path, data)
    cmd = [sys.executable, "-c", _OFFLINE_HUB]
    quiet = subprocess.run([*cmd, "run", str(config)], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Retrying in" not in quiet.stderr, quiet.stderr
    assert quiet.stderr.strip().splitlines() == [
        "vit-attn: error: pretrained weights for 'x' could not be loaded; offline?"
    ]
    loud = subprocess.run([*cmd, "-v", "run", str(config)], capture_output=True, text=True)
    assert loud.returncode == 2 and "Retrying in 1s" in loud.stderr, loud.stderr


# --------------------------------------------------------------------- 8. signals, checkpoints


def test_an_empty_checkpoint_is_said_to_be_empty(tmp_path, data, capsys):
    (tmp_path / "w.pth").write_bytes(b"")
    config = write_config(tmp_path, data, model={"checkpoint": str(tmp_path / "w.pth")})
    assert run(config) == 2
    assert "is empty (0 bytes)" in one_error_line(capsys)
    (tmp_path / "w.pth").write_bytes(b"\x80")  # torch.load: EOFError with no message
    assert run(config) == 2
    line = one_error_line(capsys)
    assert "cannot be read (" in line and "EOFError: EOFError" not in line, line


def test_a_pickled_checkpoint_refusal_says_why(tmp_path, data, capsys):
    import torch

    torch.save({"weights": Path("not a tensor")}, tmp_path / "w.pth")  # any non-tensor object
    config = write_config(tmp_path, data, model={"checkpoint": str(tmp_path / "w.pth")})
    assert run(config) == 2
    assert "arbitrary code execution" in one_error_line(capsys)


def _start_run(config: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "vit-attn"),
            "run",
            str(config),
            "--no-progress",
            *extra,
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _worker_pids(parent: int) -> set[int]:
    """The live spawned children (Dask workers) under `parent`: not multiprocessing's
    resource tracker, not zombies."""
    import psutil

    pids = set()
    for child in psutil.Process(parent).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:  # gone, or a zombie, between the listing and the look
            pass
    return pids


def _wait_until_started(proc: subprocess.Popen, store: Path) -> None:
    """Until the run has written its first batch."""
    import time

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (store / "zarr.json").exists() and status_of(store).any():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"


def _signal_when_started(proc: subprocess.Popen, store: Path, sig: int, group: bool) -> None:
    _wait_until_started(proc, store)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    import signal

    imagefactory.write_rgb_set(tmp_path / "data", [(40 + i % 50, 30 + i // 50) for i in range(300)])
    config = write_config(tmp_path, tmp_path / "data", inference={"batch_size": 2})
    store = tmp_path / "out" / "run.zarr"
    proc = _start_run(config, tmp_path)
    _signal_when_started(proc, store, signal.SIGTERM, group=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated; finished batches are kept, rerun the same command to resume" in err, err
    assert "Traceback" not in err
    assert (status_of(store) == 0).any()
    # Stopped with --overwrite: "rerun the same command" would discard what it finished.
    shutil.rmtree(store)  # so that "started" means this run's store
    proc = _start_run(config, tmp_path, "--overwrite")
    _signal_when_started(proc, store, signal.SIGTERM, group=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "finished batches are kept, rerun without --overwrite to resume" in err, err
    assert run(config) == 0 and (status_of(store) == 1).all()


SLOW_WRITES = """
import time
import vit_attn.task as task

_write = task.write_batch


def _slow(*args, **kwargs):
    time.sleep(1.5)
    return _write(*args, **kwargs)


task.write_batch = _slow
"""


@pytest.mark.timeout(300)
def test_a_second_ctrl_c_keeps_the_lock_while_batches_still_write(tmp_path):
    # The first Ctrl-C waits for the batches in flight; a second one cut that wait short and
    # the lock was deleted while they went on writing (a new run could take the store).
    import signal

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_WRITES)  # batches slow to write
    imagefactory.write_rgb_set(tmp_path / "data", [(40 + i, 30) for i in range(24)])
    config = write_config(
        tmp_path,
        tmp_path / "data",
        inference={"batch_size": 2},
        cluster={"kind": "none", "batches_per_worker": 2},
    )
    store = tmp_path / "out" / "run.zarr"
    lock = Path(str(store) + ".lock")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "vit-attn"), "run", str(config), "--no-progress"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_until_started(proc, store)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    held = []
    while proc.poll() is None:
        held.append(lock.exists())
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert held and all(held), err  # never gone while the process (and its writers) lived
    assert "still finishing; the store stays locked until this process ends" in err, err
    assert "Traceback" not in err, err
    assert run(config) == 0  # this host, the holder gone: taken over at once
    assert (status_of(store) == 1).all()


def _report_sigint(queue) -> None:
    import signal

    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_spawned_processes_start_with_sigint_ignored_while_this_one_answers_it():
    # LocalCluster workers must leave Ctrl-C to the client; the client ignored SIGINT
    # while they started (they inherit that), and so lost a Ctrl-C pressed then.
    import multiprocessing
    import multiprocessing.spawn
    import signal

    from vit_attn.nosigint import spawning_without_sigint

    before = signal.getsignal(signal.SIGINT)
    executable = multiprocessing.spawn.get_executable()
    context = multiprocessing.get_context("spawn")
    with spawning_without_sigint() as launched:
        assert launched
        assert signal.getsignal(signal.SIGINT) is before  # untouched here
        queue = context.Queue()
        child = context.Process(target=_report_sigint, args=(queue,))
        child.start()
        ignored = queue.get(timeout=60)
        child.join(timeout=60)
    assert ignored is True
    assert multiprocessing.spawn.get_executable() == executable  # put back as it was


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_signal_while_the_local_cluster_starts_stops_the_run_in_one_line(tmp_path, data, stop):
    # Ctrl-C was ignored while the cluster started (its workers inherit that): lost, the run
    # went on to the end. SIGTERM, raised in the middle of LocalCluster(...), left a half-made
    # cluster whose close at exit printed distributed's AssertionError traceback.
    import signal

    config = write_config(tmp_path, data, cluster={"kind": "local", "n_workers": 2})
    proc = _start_run(config, tmp_path)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # the start line: the cluster starts right after it
        lines.append(line)
        if "cluster local" in line:
            break
    time.sleep(0.3)
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: workers too
    else:
        proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    what = "interrupted" if stop == "ctrl-c" else "terminated"
    assert proc.returncode == (130 if stop == "ctrl-c" else 143), err
    assert f"{what}; finished batches are kept" in err, err
    for noise in ("Traceback", "KeyboardInterrupt", "AssertionError"):
        assert noise not in err, err
    assert run(config) == 0 and (status_of(tmp_path / "out" / "run.zarr") == 1).all()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_to_the_process_group_prints_no_worker_tracebacks(tmp_path):
    import signal

    imagefactory.write_rgb_set(tmp_path / "data", [(40 + i % 50, 30 + i // 50) for i in range(300)])
    config = write_config(
        tmp_path,
        tmp_path / "data",
        inference={"batch_size": 2},
        cluster={"kind": "local", "n_workers": 2},
    )
    proc = _start_run(config, tmp_path)
    _signal_when_started(proc, tmp_path / "out" / "run.zarr", signal.SIGINT, group=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted; finished batches are kept" in err


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_after_a_worker_restart_prints_no_worker_tracebacks(tmp_path):
    """A worker killed mid-run is restarted by its nanny from a process that answers SIGINT;
    Ctrl-C afterwards must still reach only the client."""
    import signal
    import time

    imagefactory.write_rgb_set(
        tmp_path / "data", [(40 + i % 50, 30 + i // 50) for i in range(2000)]
    )
    config = write_config(
        tmp_path,
        tmp_path / "data",
        # 785 tokens on one thread: the run lasts well past the restart on any machine
        model={"img_size": 224, "kwargs": {"depth": 2, "patch_size": 8}},
        inference={"batch_size": 2},
        cluster={"kind": "local", "n_workers": 2},
    )
    proc = _start_run(config, tmp_path)
    _wait_until_started(proc, tmp_path / "out" / "run.zarr")

    def workers() -> set[int]:
        return _worker_pids(proc.pid)

    first = workers()
    assert len(first) >= 2, first
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 120
    while time.time() < deadline and not (workers() - first) and proc.poll() is None:
        time.sleep(0.1)
    assert workers() - first, "the nanny did not restart the killed worker"
    time.sleep(2.0)  # the new worker has started (its preload ran) and taken work
    assert proc.poll() is None, (
        f"the run ended before it could be interrupted: {proc.communicate()}"
    )
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


# distributed's `sync` logs a NameError traceback when Ctrl-C lands before its future exists
# (its cancel callback reads an unbound variable); the loop is kept busy so that it does.
_SYNC_RACE = """
import asyncio, logging, os, signal, sys, threading, time
import distributed  # noqa: F401  (sets tornado.application to ERROR, as in a run)
from distributed.utils import LoopRunner, sync
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
if sys.argv[1] == "cli":
    from vit_attn.cli import _on_signal
    signal.signal(signal.SIGINT, _on_signal)
runner = LoopRunner(asynchronous=False)
runner.start()
runner.loop.add_callback(lambda: time.sleep(1.0))
async def slow():
    await asyncio.sleep(5)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    sync(runner.loop, slow)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
time.sleep(1.5)
runner.stop()
"""


def _sync_race(handler: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _SYNC_RACE, handler],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "interrupted" in done.stderr, done.stderr
    return done.stderr


@pytest.mark.slow  # subprocesses importing the package
def test_ctrl_c_during_a_dask_call_prints_no_teardown_traceback():
    if "NameError" not in _sync_race("python"):
        pytest.skip("this distributed no longer logs the race; nothing to silence")
    err = _sync_race("cli")
    assert "Traceback" not in err and "NameError" not in err, err


@pytest.mark.slow  # subprocesses importing the package
def test_a_reader_that_stops_early_gets_no_error_line(tmp_path, data):
    """`vit-attn inspect STORE | head -1`: the closed pipe ends the command quietly (141)."""
    config = write_config(tmp_path, data)
    assert run(config) == 0
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "vit-attn"),
            "inspect",
            str(tmp_path / "out" / "run.zarr"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before it writes: its first line meets a closed pipe
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=60) == 141, err
    assert err == "", err


def test_identity_arrays_are_laid_out_like_image_path(tmp_path):
    from vit_attn.store import StoreSpec, create_store

    spec = StoreSpec(
        n_images=10,
        batch_size=4,
        layers=(0,),
        num_heads=2,
        grid=(2, 2),
        input_size=(16, 16),
        num_tokens=5,
        topk=None,
        full_attention=False,
        rollout=False,
        overlays="none",
        identity="hash",
    )
    initial = {
        "image_bytes": np.arange(10, dtype=np.int64),
        "image_mtime_ns": np.arange(10, dtype=np.int64) * 7,
        "image_sha256": np.asarray([f"{i:064x}" for i in range(10)], dtype=object),
    }
    paths = [f"{i}.png" for i in range(10)]
    group = create_store(tmp_path / "s.zarr", spec, paths, {"fingerprint": "x"}, initial=initial)
    for name, values in initial.items():
        arr = group[name]
        assert arr.metadata.dimension_names == ("image",)
        assert arr.chunks == group["image_path"].chunks and arr.shards == group["image_path"].shards
        assert [str(v) for v in arr[:]] == [str(v) for v in values], name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_killed_at_start_up_does_not_hang_the_run(tmp_path, data):
    """SIGKILL one LocalCluster worker process the moment the run starts using it.

    A guard, not a reproduction: with this timing the old broadcast of the plan did not hang
    here either (the hang needed the kill in the middle of the replication)."""
    import signal
    import threading
    import time

    config = write_config(tmp_path, data, cluster={"kind": "local", "n_workers": 2})
    killed: list[int] = []

    def kill_first_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            workers = sorted(_worker_pids(os.getpid()))
            if len(workers) >= 2:
                time.sleep(1.0)  # registered, about to receive work
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    assert run(config) == 0
    killer.join(timeout=5)
    assert killed, "no worker process was found to kill"
    assert (status_of(tmp_path / "out" / "run.zarr") == 1).all()


# Python imports `sitecustomize` at start-up from PYTHONPATH: this one SIGKILLs a spawned
# process (a LocalCluster worker) while it starts, once per token file it manages to take.
_DIE_AT_START = """
import os, signal, sys
tokens = os.environ.get("VIT_ATTN_TEST_DIE_TOKENS")
if tokens and any("spawn_main" in arg for arg in sys.orig_argv):
    for name in sorted(os.listdir(tokens)):
        try:
            os.remove(os.path.join(tokens, name))
        except FileNotFoundError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _workers_die_at_start(monkeypatch, tmp_path: Path, deaths: int) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_DIE_AT_START)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for i in range(deaths):
        (tokens / f"{i:03d}").touch()
    monkeypatch.setenv("VIT_ATTN_TEST_DIE_TOKENS", str(tokens))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return tokens


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_dying_while_the_local_cluster_starts_gets_one_more_start(
    tmp_path, data, monkeypatch, capsys, caplog
):
    tokens = _workers_die_at_start(monkeypatch, tmp_path, deaths=1)
    config = write_config(tmp_path, data, cluster={"kind": "local", "n_workers": 2})
    assert run(config) == 0
    assert not any(tokens.iterdir()), "no worker process died at start-up"
    said = [r.getMessage() for r in caplog.records]
    assert "a worker died while the local cluster started; starting it again" in said, said
    assert "Traceback" not in capsys.readouterr().err
    assert (status_of(tmp_path / "out" / "run.zarr") == 1).all()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_dying_at_every_local_cluster_start_are_one_line(
    tmp_path, data, monkeypatch, capsys
):
    _workers_die_at_start(monkeypatch, tmp_path, deaths=100)
    config = write_config(tmp_path, data, cluster={"kind": "local", "n_workers": 2})
    assert run(config) != 0
    line = one_error_line(capsys)
    assert "could not start its workers, twice" in line and "cluster.kind: none" in line


def test_worker_task_tracebacks_are_left_to_the_clients_one_line(monkeypatch, caplog):
    # distributed's worker logs every failed task as "Compute Failed" with its traceback,
    # once per attempt; the client already says which batch failed and why, in one line.
    import logging

    from vit_attn import worker_signals

    worker_log = logging.getLogger("distributed.worker")
    monkeypatch.setattr(worker_signals.signal, "signal", lambda *a: None)  # keep pytest's Ctrl-C
    monkeypatch.setattr(worker_log, "filters", [])
    monkeypatch.delenv(worker_signals.TRACEBACKS_ENV, raising=False)
    worker_signals.dask_setup(None)
    with caplog.at_level(logging.INFO, logger="distributed.worker"):
        worker_log.error("Compute Failed\nKey: %s\nTraceback: %r", "batch-3", "File task.py ...")
        worker_log.error("Worker stream died during communication")  # other errors stay
    assert [r.getMessage() for r in caplog.records] == ["Worker stream died during communication"]
    # `vit-attn -v` keeps them.
    monkeypatch.setattr(worker_log, "filters", [])
    monkeypatch.setenv(worker_signals.TRACEBACKS_ENV, "1")
    worker_signals.dask_setup(None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distributed.worker"):
        worker_log.error("Compute Failed\nKey: %s", "batch-3")
    assert len(caplog.records) == 1


@pytest.mark.parametrize(
    "error", [MemoryError(), RuntimeError("can't start new thread")], ids=["memory", "thread"]
)
def test_a_memory_limit_is_one_line(tmp_path, data, capsys, monkeypatch, error):
    # Under `ulimit -v`, the store's or the pool's threads could not start: a traceback.
    import vit_attn.plan as plan_module

    def starved(*args, **kwargs):
        raise error

    monkeypatch.setattr(plan_module, "prepare", starved)
    assert run(write_config(tmp_path, data)) == 2
    line = one_error_line(capsys)
    assert "out of memory" in line and "inference.batch_size" in line, line


def test_ctrl_c_while_the_command_starts_is_one_line(capsys, monkeypatch):
    import vit_attn.cli as cli_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_parser", interrupted)
    assert cli_main(["run", "x.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "vit-attn: interrupted before anything was done", err


@pytest.mark.parametrize("speaks", [b"", b"SSH-2.0-OpenSSH_9.6\r\n"], ids=["silent", "ssh"])
def test_an_address_that_is_no_dask_scheduler_is_one_line(tmp_path, data, capsys, speaks):
    # A listener that accepts and says nothing hung the run past connect_timeout (the
    # handshake read has no timeout); one that speaks first (an SSH port) gave a 40-line
    # MemoryError traceback: its banner was read as a frame length.
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                accepted.append(conn)
                if speaks:
                    conn.sendall(speaks)

    threading.Thread(target=serve, daemon=True).start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    config = write_config(
        tmp_path, data, cluster={"kind": "address", "address": address, "connect_timeout": 1}
    )
    try:
        start = time.monotonic()
        assert run(config) == 2
        assert time.monotonic() - start < 30
        line = one_error_line(capsys)
        assert address in line and "Dask scheduler" in line and "cluster.address" in line, line
    finally:
        server.close()
        for conn in accepted:
            conn.close()
