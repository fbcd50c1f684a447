"""Procedural demo data (vit_attn.demo.shapes): determinism, masks, layout, labels."""

from __future__ import annotations

import ast
import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_attn.demo import shapes as demo_data
from vit_attn.demo.shapes import CLASSES, DEFAULT_SIZES, generate, render_index

N = 24


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, generate(out, N, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes(generated, tmp_path):
    out, _ = generated
    again = generate(tmp_path / "again", N, seed=7)
    assert len(again) == N
    assert _files(out) == _files(tmp_path / "again")


def test_other_seed_differs_and_prefix_is_stable(generated, tmp_path):
    out, items = generated
    other = generate(tmp_path / "other", 4, seed=8)
    assert any(o.path.read_bytes() != i.path.read_bytes() for o, i in zip(other, items))
    # Image i depends only on (seed, i), not on n.
    few = generate(tmp_path / "few", 3, seed=7)
    for f, i in zip(few, items):
        assert f.path.read_bytes() == i.path.read_bytes()
        assert f.mask_path.read_bytes() == i.mask_path.read_bytes()


def test_layout_and_listing_excludes_masks(generated):
    out, items = generated
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels.csv", "masks"]
    listed = sorted(p for p in (out / "images").rglob("*") if p.is_file())
    assert listed == sorted(it.path for it in items)
    assert not any("mask" in str(p.relative_to(out / "images")) for p in listed)
    for it in items:
        assert it.path == out / "images" / it.name
        assert it.mask_path == out / "masks" / it.name


def test_labels_csv(generated):
    out, items = generated
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "class_name"]
    assert [r["path"] for r in rows] == [it.name for it in items]
    for r, it in zip(rows, items):
        assert int(r["label"]) == it.label
        assert r["class_name"] == CLASSES[it.label] == it.class_name
        assert (out / "images" / r["path"]).is_file()


def test_masks_match_objects(generated):
    _, items = generated
    for it in items:
        img = np.asarray(Image.open(it.path))
        mimg = Image.open(it.mask_path)
        assert mimg.mode == "L"
        mask = np.asarray(mimg)
        assert img.shape == (it.size[1], it.size[0], 3)
        assert mask.shape == img.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        obj = mask == 255
        assert obj.any()
        # Object pixels carry exactly the object's flat colour (drawn last, not antialiased).
        assert (img[obj] == np.array(it.color, np.uint8)).all()
        ys, xs = np.nonzero(obj)
        assert it.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # Strictly inside the image, and inside the centred square that timm's centre crop
        # (crop_pct 0.9) keeps, whatever the aspect ratio.
        w, h = it.size
        keep = 0.9 * min(w, h)
        x0, y0 = (w - keep) / 2, (h - keep) / 2
        assert x0 < xs.min() and xs.max() + 1 < x0 + keep, it
        assert y0 < ys.min() and ys.max() + 1 < y0 + keep, it
        # Not a speck: a few percent of the kept square at least.
        assert obj.sum() > 0.01 * keep * keep


def test_object_survives_timm_eval_crop(generated):
    """The whole mask survives timm's eval resize + centre crop at the demo model's size."""
    timm = pytest.importorskip("timm")
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=4,
        img_size=64,
        patch_size=8,
        embed_dim=48,
        depth=1,
        num_heads=1,
    )
    cfg = timm.data.resolve_data_config(args={"input_size": (3, 64, 64)}, model=m)
    geo = timm.data.create_transform(**cfg).transforms[:-2]
    for it in generated[1][:12]:
        mimg = Image.open(it.mask_path)
        full = np.asarray(mimg, np.float64).sum() / 255.0
        factor = int(64 / cfg["crop_pct"]) / min(it.size)  # shorter side -> floor(S / crop_pct)
        for t in geo:
            mimg = t(mimg)
        kept = np.asarray(mimg, np.float64).clip(0, 255).sum() / 255.0
        assert kept == pytest.approx(full * factor**2, rel=0.1), it


def test_sizes_include_non_square(generated):
    _, items = generated
    sizes = Counter(it.size for it in items)
    assert any(w != h for w, h in sizes)
    assert any(w == h for w, h in sizes)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert set(sizes) <= set(DEFAULT_SIZES)
    assert all(64 <= min(s) and max(s) <= 128 for s in sizes)


def test_custom_sizes(tmp_path):
    items = generate(tmp_path, 6, seed=1, sizes=[(120, 72)])
    assert {it.size for it in items} == {(120, 72)}
    assert Image.open(items[0].path).size == (120, 72)


def test_classes_balanced():
    labels = Counter(render_index(3, i).label for i in range(200))
    assert set(labels) == set(range(len(CLASSES)))
    assert all(25 <= c <= 75 for c in labels.values()), labels


def test_cli(tmp_path, capsys):
    assert demo_data.main([str(tmp_path / "cli"), "--n", "5", "--seed", "2"]) == 0
    assert len(list((tmp_path / "cli" / "images").glob("*.png"))) == 5
    assert len(list((tmp_path / "cli" / "masks").glob("*.png"))) == 5
    assert "wrote 5 images" in capsys.readouterr().out


def test_no_torch_import():
    tree = ast.parse(Path(demo_data.__file__).read_text())
    mods = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    mods |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not mods & {"torch", "torchvision", "timm"}
