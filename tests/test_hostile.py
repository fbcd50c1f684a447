"""The edges a careless or hostile user hits (issue 13): outputs that must stay where they are
configured, PNGs inside the resume guarantee, config mistakes, two runs on one store, changed
data, dead workers, full disks and signals.

Runs use a one-block ViT at 32 px with 8 px patches on the torch backend, in-process, so most
tests take a second or two once the modules are imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from vit_attn.cli import main as cli_main

from . import imagefactory

TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "kwargs": {"depth": 1, "patch_size": 8}}


def write_config(folder: Path, source: str | Path, **sections) -> Path:
    cfg = {
        "model": dict(TINY),
        "data": {"source": str(source)},
        "inference": {"backend": "torch", "batch_size": 4, "threads": 1},
        "output": {"store": str(folder / "out" / "run.zarr")},
        "cluster": {"kind": "none"},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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


def test_a_file_the_tool_did_not_write_is_never_replaced(tmp_path, data, capsys):
    png = tmp_path / "png"
    png.mkdir()
    name = sorted(p.name for p in data.iterdir())[3]
    (png / f"{name}.png").write_bytes(b"precious")
    config = write_config(tmp_path, data, output={"png_dir": str(png)})
    assert run(config) == 2
    line = one_error_line(capsys)
    assert f"{name}.png" in line and "not written by vit-attn" in line
    assert (png / f"{name}.png").read_bytes() == b"precious"
    # PNGs the tool wrote itself are replaced on a rerun: move the user's file away first.
    (png / f"{name}.png").unlink()
    assert run(config) == 0
    assert run(config, "--overwrite") == 0


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


def test_a_png_that_cannot_be_written_never_leaves_status_ok(tmp_path, capsys):
    """A name the file system accepts for the image but not for its PNG (NAME_MAX)."""
    imagefactory.write_rgb_set(tmp_path / "data", [(40, 30), (41, 31)])
    long = tmp_path / "data" / ("x" * 251 + ".png")
    (tmp_path / "data" / "img_40x30.png").rename(long)
    config = write_config(tmp_path, tmp_path / "data", output={"png_dir": str(tmp_path / "png")})
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
