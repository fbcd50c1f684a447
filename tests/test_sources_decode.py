"""pipeline.data: sources and their order, decoding of odd and broken files, and
preprocessing checked against timm's own eval transform."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from vit_attn import decode
from vit_attn.decode import CROP_MODES, Preprocess, load_batch, load_image, normalize
from vit_attn.errors import ConfigError, DataSourceError, ImageDecodeError
from vit_attn.sources import list_images

from . import imagefactory as factory

timm = pytest.importorskip("timm")


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


# --------------------------------------------------------------------------- sources


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    _touch(
        tmp_path,
        "b.png",
        "a10.jpg",
        "a2.JPEG",
        "sub/z.webp",
        "sub/deep/c.TIF",
        ".hidden.png",
        ".cache/x.png",
        "sub/.git/y.jpg",
        "notes.txt",
        "labels.csv",
        "d.pgm",
    )
    listed = list_images(tmp_path)
    assert listed.paths == ("a10.jpg", "a2.JPEG", "b.png", "d.pgm", "sub/deep/c.TIF", "sub/z.webp")
    assert listed.root == tmp_path and listed.root.is_absolute()
    assert listed.absolute(4) == tmp_path / "sub" / "deep" / "c.TIF"
    assert len(listed) == 6


def test_relative_source_gets_an_absolute_root(tmp_path, monkeypatch):
    _touch(tmp_path, "imgs/a.png")
    monkeypatch.chdir(tmp_path)
    listed = list_images("imgs")
    assert listed.root == tmp_path / "imgs"
    assert list_images("imgs/*.png").root == tmp_path / "imgs"


@pytest.mark.parametrize("kind", ["missing", "empty_folder", "no_images", "unknown_file"])
def test_unusable_sources_raise_one_line_errors(tmp_path, kind):
    source = {
        "missing": tmp_path / "nope",
        "empty_folder": tmp_path / "empty",
        "no_images": tmp_path / "docs",
        "unknown_file": tmp_path / "a.json",
    }[kind]
    (tmp_path / "empty").mkdir()
    _touch(tmp_path, "docs/readme.md", "a.json")
    with pytest.raises(DataSourceError) as err:
        list_images(source)
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert str(source) in message and "\n" not in message


def test_glob_matches_files_relative_to_its_fixed_prefix(tmp_path):
    _touch(
        tmp_path,
        "data/x/b.png",
        "data/x/a.png",
        "data/x/n.jpg",
        "data/x/sub/c.png",
        "data/x/.h.png",
        "data/x/dir.png/inner.png",
    )
    flat = list_images(str(tmp_path / "data/x/*.png"))
    assert flat.root == tmp_path / "data/x"
    assert flat.paths == ("a.png", "b.png")  # the folder dir.png is no file; hidden skipped
    deep = list_images(str(tmp_path / "data/*/**/*.png"))
    assert deep.root == tmp_path / "data"
    assert deep.paths == ("x/a.png", "x/b.png", "x/dir.png/inner.png", "x/sub/c.png")


def test_symlinked_folders_are_followed_and_loops_listed_once(tmp_path):
    # A folder source followed no symlinked folder (its images vanished without a word),
    # while a glob followed a link to "." forty levels deep (each image listed 41 times).
    _touch(tmp_path, "outside/o1.png", "outside/o2.png", "data/a.png", "data/sub/b.png")
    data = tmp_path / "data"
    (data / "linked").symlink_to(tmp_path / "outside")  # a folder kept elsewhere
    (data / "self").symlink_to(".")  # a loop to the root
    (data / "sub" / "up").symlink_to("..")  # a loop to a parent
    (data / "again").symlink_to("sub")  # a second way into a folder listed anyway
    (data / "one.png").symlink_to(data / "a.png")  # a second name of a file: the user's
    want = ("a.png", "linked/o1.png", "linked/o2.png", "one.png", "sub/b.png")
    folder = list_images(data)
    assert folder.paths == want
    assert folder.repeated == 1 and folder.repeated_examples == ("again/b.png",)
    deep = list_images(str(data / "**" / "*.png"))
    assert deep.paths == want
    assert deep.repeated == 1 and deep.repeated_examples == ("again/b.png",)
    # Without **, the pattern says how deep: a link on the way is one folder like another.
    assert list_images(str(data / "s*" / "*.png")).paths == (
        "self/a.png",
        "self/one.png",
        "sub/b.png",
    )
    # A loop between two folders, each linking to the other.
    _touch(tmp_path, "p/x.png", "q/y.png")
    (tmp_path / "p" / "to_q").symlink_to(tmp_path / "q")
    (tmp_path / "q" / "to_p").symlink_to(tmp_path / "p")
    assert list_images(tmp_path / "p").paths == ("to_q/y.png", "x.png")


def test_list_files_that_are_not_utf8_or_lack_a_path_are_one_line(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"a.png\n\xe9t\xe9.png\n")
    with pytest.raises(DataSourceError, match="not UTF-8 text; save it as UTF-8"):
        list_images(tmp_path / "latin.txt")
    # A row with a label but no path: its image vanished without a word.
    (tmp_path / "l.csv").write_text("path,label\na.png,1\n,2\nb.png,3\n")
    with pytest.raises(DataSourceError, match="line 3 has no path in column 1"):
        list_images(tmp_path / "l.csv")
    # A URL in a local list failed per image as "file not found": refused up front.
    (tmp_path / "u.txt").write_text("a.png\ns3://bucket/b.png\n")
    with pytest.raises(DataSourceError, match="line 2 is a URL"):
        list_images(tmp_path / "u.txt")
    # A file whose name starts with "#" is listed as ./#name (a bare "#" starts a comment).
    (tmp_path / "h.txt").write_text("# my images\n./#1.png\na.png\n")
    assert list_images(tmp_path / "h.txt").paths == ("./#1.png", "a.png")


def test_names_that_are_not_utf8_are_passed_over_and_counted(tmp_path):
    folder = tmp_path / "d"
    _touch(tmp_path, "d/a.png")
    bad = os.fsencode(str(folder)) + b"/\xe9t\xe9.png"
    with open(bad, "wb"):
        pass
    listed = list_images(folder)
    assert listed.paths == ("a.png",) and listed.skipped == 1
    assert listed.skipped_examples[0].endswith(".png")
    globbed = list_images(str(folder / "*.png"))
    assert globbed.paths == ("a.png",) and globbed.skipped == 1


def test_glob_without_matches_or_prefix_folder_fails(tmp_path):
    _touch(tmp_path, "a.png")
    with pytest.raises(DataSourceError, match="matches no files"):
        list_images(str(tmp_path / "*.jpg"))
    with pytest.raises(DataSourceError, match="does not exist"):
        list_images(str(tmp_path / "nope" / "*.jpg"))


def test_folder_with_glob_characters_in_its_name_is_a_folder(tmp_path):
    _touch(tmp_path, "set[1]/a.png")
    assert list_images(tmp_path / "set[1]").paths == ("a.png",)


def test_text_list_keeps_order_comments_and_missing_files(tmp_path):
    _touch(tmp_path, "imgs/b.png", "imgs/a.png")
    outside = tmp_path / "elsewhere.png"
    _touch(tmp_path, "elsewhere.png")
    (tmp_path / "imgs/list.txt").write_text(
        f"# my order\nb.png\n\n  a.png  \ngone.png\n{outside}\n"
    )
    listed = list_images(tmp_path / "imgs/list.txt")
    assert listed.root == tmp_path / "imgs"
    assert listed.paths == ("b.png", "a.png", "gone.png", str(outside))
    assert listed.absolute(3) == outside
    assert not listed.absolute(2).exists()  # kept: it fails per image later


def test_list_duplicates_name_the_line(tmp_path):
    (tmp_path / "list.txt").write_text("a.png\nb.png\n# c\n./a.png\n")
    with pytest.raises(DataSourceError, match=r"line 4 repeats './a.png' \(first on line 1\)"):
        list_images(tmp_path / "list.txt")


@pytest.mark.parametrize(
    "name, text", [("list.txt", "# only a comment\n\n"), ("list.csv", "path\n")]
)
def test_list_without_entries_fails(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataSourceError, match="names no images"):
        list_images(tmp_path / name)


def test_csv_uses_the_path_column(tmp_path):
    (tmp_path / "l.csv").write_text('\ufefflabel,Path\ncat,z.png\ndog,"sub/a,b.png"\n\n')
    assert list_images(tmp_path / "l.csv").paths == ("z.png", "sub/a,b.png")


def test_csv_without_path_header_uses_the_first_column(tmp_path):
    (tmp_path / "plain.csv").write_text("z.png,1\na.jpg,0\n")
    assert list_images(tmp_path / "plain.csv").paths == ("z.png", "a.jpg")
    (tmp_path / "named.csv").write_text("filename,label\nz.png,1\n")
    assert list_images(tmp_path / "named.csv").paths == ("z.png",)


def test_csv_duplicate_reports_its_line(tmp_path):
    (tmp_path / "l.csv").write_text("path,label\na.png,1\nb.png,2\na.png,3\n")
    with pytest.raises(DataSourceError, match="line 4 repeats 'a.png'"):
        list_images(tmp_path / "l.csv")


# --------------------------------------------------------------------------- preprocess spec


@pytest.fixture(scope="module")
def vit_tiny():
    """vit_tiny_patch16_224 (crop_pct 0.9, bicubic, mean/std 0.5) built at 160 x 224: the data
    config must come from the size passed in, never from the pretrained 224 x 224."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(160, 224))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The timm reference transforms are tiny: torch's thread pool only slows them down."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_preprocess_round_trips_through_json():
    prep = Preprocess(
        (160, 224),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        crop_pct=0.95,
        crop_mode="border",
    )
    back = Preprocess.from_dict(json.loads(json.dumps(prep.to_dict())))
    assert back == prep and hash(back) == hash(prep)
    assert prep.to_dict()["input_size"] == [160, 224]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": (0, 224)},
        {"input_size": (224,)},
        {"interpolation": "cubic"},
        {"crop_mode": "pad"},
        {"crop_pct": 0},
        {"std": (0.5, 0.0, 0.5)},
        {"mean": (0.5,)},
    ],
)
def test_preprocess_rejects_invalid_values(kwargs):
    with pytest.raises(ConfigError):
        Preprocess(**{"input_size": (224, 224), **kwargs})


def test_preprocess_for_model_uses_the_real_input_size(vit_tiny):
    prep = decode.preprocess_for_model(vit_tiny, (160, 224))
    assert prep == Preprocess(
        (160, 224),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        crop_pct=0.9,
        crop_mode="center",
    )


# --------------------------------------------------------------------------- equality with timm

CONFIGS = {
    # name: (input_size, extra args for resolve_data_config)
    "default": ((224, 224), {}),
    "wide_input": ((160, 224), {}),
    "tall_input": ((224, 160), {}),
    "squash": ((224, 224), {"crop_mode": "squash"}),
    "squash_nonsquare": ((160, 224), {"crop_mode": "squash", "crop_pct": 0.875}),
    "border": ((160, 224), {"crop_mode": "border"}),
    "bilinear_full": ((224, 224), {"interpolation": "bilinear", "crop_pct": 1.0}),
    "lanczos_upscale": ((96, 96), {"interpolation": "lanczos", "crop_pct": 1.2}),
}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Non-JPEG inputs of many aspect ratios and modes, plus a small JPEG (no draft)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = factory.write_rgb_set(
        folder, [(300, 200), (200, 300), (224, 224), (1000, 120), (120, 1000), (17, 33), (249, 251)]
    )
    paths += [
        factory.write_gray(folder),
        factory.write_tiny(folder),
        factory.write_rgba_png(folder),
        factory.write_palette_png(folder),
        factory.write_rgb(folder, "small.jpg", (320, 240)),
    ]
    paths += [p for p in factory.copy_skimage_photos(folder / "sk") if p.suffix == ".png"]
    return paths


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_timm_eval_transform(vit_tiny, photo_dir, config):
    from timm.data import create_transform, resolve_data_config

    (h, w), extra = CONFIGS[config]
    cfg = resolve_data_config(args={"input_size": (3, h, w), **extra}, model=vit_tiny)
    reference = create_transform(**cfg)
    prep = Preprocess(
        (h, w),
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
    )
    for path in photo_dir:
        with Image.open(path) as img, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # palette transparency in bytes
            expected = reference(img.convert("RGB")).numpy()
        got = normalize(load_image(path, prep)[None], prep)[0]
        assert got.shape == expected.shape == (3, h, w), path.name
        assert np.abs(got - expected).max() <= 1e-3, path.name


def test_preprocess_for_model_matches_timm_for_a_resized_model(vit_tiny, photo_dir):
    from timm.data import create_transform, resolve_data_config

    prep = decode.preprocess_for_model(vit_tiny, (160, 224))
    reference = create_transform(
        **resolve_data_config(args={"input_size": (3, 160, 224)}, model=vit_tiny)
    )
    for path in photo_dir[:3]:
        with Image.open(path) as img:
            expected = reference(img.convert("RGB")).numpy()
        assert np.abs(normalize(load_image(path, prep)[None], prep)[0] - expected).max() <= 1e-3


@pytest.mark.parametrize("size", [(4000, 20), (20, 4000)])
def test_extreme_aspect_ratios_resample_only_the_kept_part(tmp_path, monkeypatch, size):
    """Near-identical to timm's resize-everything-then-crop, at a fraction of the cost."""
    from skimage import data as skdata

    path = tmp_path / "strip.png"
    Image.fromarray(skdata.astronaut()).resize(size, Image.Resampling.BILINEAR).save(path)
    for mode in CROP_MODES:
        prep = Preprocess((224, 224), crop_pct=0.9, crop_mode=mode)
        monkeypatch.setattr(decode, "_BOX_RESIZE_AREA", 0)  # always the kept part only
        part = load_image(path, prep).astype(int)
        monkeypatch.setattr(decode, "_BOX_RESIZE_AREA", 10**9)  # always all, then crop
        full = load_image(path, prep)
        diff = np.abs(part - full)
        assert diff.mean() < 0.3 and np.percentile(diff, 99) <= 2, mode


def test_normalize_layout_and_values():
    batch = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    prep = Preprocess((5, 7), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = normalize(batch, prep)
    assert out.dtype == np.float32 and out.shape == (2, 3, 5, 7) and out.flags.c_contiguous
    expected = (batch / 255.0 - np.array(prep.mean)) / np.array(prep.std)
    np.testing.assert_allclose(out, expected.transpose(0, 3, 1, 2), atol=1e-6)
    with pytest.raises(ValueError):
        normalize(batch[0], prep)


# --------------------------------------------------------------------------- odd and broken files

IDENTITY = Preprocess((64, 64), crop_pct=1.0, crop_mode="squash")


def _identity(h: int, w: int) -> Preprocess:
    """No resize or crop: the decoded pixels come out as they are."""
    return Preprocess((h, w), crop_pct=1.0, crop_mode="squash")


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("truncated_jpeg", "truncated"),
        ("truncated_png", "truncated"),
        ("empty", "empty"),
        ("text", "not an image"),
        ("missing", "not found"),
    ],
)
def test_broken_files_raise_with_a_reason(tmp_path, kind, reason):
    path = factory.write_broken(tmp_path)[kind]
    with pytest.raises(ImageDecodeError, match=reason) as err:
        load_image(path, IDENTITY)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_a_folder_is_no_image(tmp_path):
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        load_image(tmp_path, IDENTITY)


@pytest.mark.parametrize("factor", [1.2, 3.0])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, factor):
    path = factory.write_bomb(tmp_path, factor)
    assert path.stat().st_size < 1_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
            load_image(path, IDENTITY)
    with warnings.catch_warnings():  # where warnings are errors, the reason is the same
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
            load_image(path, IDENTITY)
    with warnings.catch_warnings(record=True) as said:  # and nothing reaches stderr
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
            load_image(path, IDENTITY)
    assert not [w for w in said if issubclass(w.category, Image.DecompressionBombWarning)]


def test_png16_is_scaled_not_clipped(tmp_path):
    path = factory.write_png16(tmp_path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    out = load_image(path, _identity(8, 256))
    expected = factory.png16_expected()
    assert (out == expected[None, :, None]).all()
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255


def test_mode_i_and_f_use_full_ranges(tmp_path):
    ramp = np.linspace(0, 65535, 16).astype(np.int32)[None].repeat(2, 0)
    Image.fromarray(ramp, "I").save(tmp_path / "i.tif")
    Image.fromarray((ramp / 65535).astype(np.float32), "F").save(tmp_path / "f.tif")
    expected = np.round(np.linspace(0, 255, 16)).astype(np.uint8)
    for name in ("i.tif", "f.tif"):
        out = load_image(tmp_path / name, _identity(2, 16))
        assert np.abs(out[0, :, 0].astype(int) - expected).max() <= 1, name


def test_palette_with_transparency_keeps_colours_and_drops_alpha(tmp_path):
    path = factory.write_palette_png(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's byte-transparency warning must not fire
        out = load_image(path, _identity(8, 32))
    for i, colour in enumerate(factory.PALETTE):
        assert (out[:, 8 * i : 8 * i + 8] == colour).all()


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    path = factory.write_rgba_png(tmp_path)
    out = load_image(path, _identity(30, 40))
    assert (out == factory.synthetic_pixels(40, 30)).all()


def test_cmyk_becomes_the_expected_rgb(tmp_path):
    out = load_image(factory.write_cmyk_jpeg(tmp_path), IDENTITY).astype(int)
    centres = [(16, 16), (16, 48), (48, 16), (48, 48)]
    for (y, x), (_, rgb) in zip(centres, factory.CMYK_QUADRANTS.values()):
        assert np.abs(out[y, x] - rgb).max() <= 8


def test_gray_becomes_three_equal_channels(tmp_path):
    out = load_image(factory.write_gray(tmp_path), _identity(70, 90))
    assert (out == factory.synthetic_pixels(90, 70, channels=1)[..., None]).all()


def test_one_pixel_image_is_resized_up(tmp_path):
    out = load_image(factory.write_tiny(tmp_path), Preprocess((224, 224), crop_pct=0.9))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out == (200, 30, 90)).all()


def test_very_wide_image_decodes(tmp_path):
    path = factory.write_wide(tmp_path)  # 4000 x 20
    for mode in ("center", "squash"):
        out = load_image(path, Preprocess((224, 224), crop_pct=0.9, crop_mode=mode))
        assert out.shape == (224, 224, 3) and out.std() > 10
    prep = Preprocess((224, 224), crop_pct=0.9, crop_mode="border")
    out = load_image(path, prep)  # the longest edge fits: one row of image, the rest fill
    fill = [round(255 * m) for m in prep.mean]
    rows = np.flatnonzero((out != fill).any(axis=(1, 2)))
    assert rows.tolist() == [111] and out[111].std() > 10


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1)])  # rot90 k: clockwise is -1
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    path = factory.write_exif_rotated(tmp_path, orientation)
    with Image.open(path) as img:
        stored = np.asarray(img.convert("RGB"))  # pixels as stored, orientation ignored
    out = load_image(path, _identity(64, 32))
    assert (out == np.rot90(stored, turns)).all()
    top_left = factory.QUADRANTS["bottom_left" if orientation == 6 else "top_right"]
    assert np.abs(out[4, 4].astype(int) - top_left).max() <= 8


# --------------------------------------------------------------------------- JPEG draft


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    from skimage import data as skdata

    folder = tmp_path_factory.mktemp("big")
    photo = Image.fromarray(skdata.astronaut()).resize((2048, 1536), Image.Resampling.BICUBIC)
    photo.save(folder / "big.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(folder / "big_exif6.jpg", quality=92, exif=exif)
    return folder


@pytest.mark.parametrize("name", ["big.jpg", "big_exif6.jpg"])
def test_draft_decodes_large_jpegs_reduced_and_near_identical(big_jpeg, monkeypatch, name):
    prep = Preprocess((224, 224), crop_pct=0.9)
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = load_image(big_jpeg / name, prep)
    assert scales == [2]  # 1536 / 2 = 768 >= 2 x 248; 1/4 would give 384 < 496
    exact = load_image(big_jpeg / name, prep, draft=False)
    diff = np.abs(fast.astype(int) - exact)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


def test_small_jpegs_are_not_drafted(tmp_path):
    path = factory.write_rgb(tmp_path, "s.jpg", (400, 300))
    prep = Preprocess((224, 224), crop_pct=0.9)
    assert (load_image(path, prep) == load_image(path, prep, draft=False)).all()


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("threads", [1, 3])
def test_load_batch_keeps_order_and_reports_failures(tmp_path, threads):
    good = factory.write_rgb_set(tmp_path, [(50, 40), (40, 50)])
    broken = factory.write_broken(tmp_path)
    paths = [good[0], broken["truncated_jpeg"], good[1], broken["missing"]]
    prep = Preprocess((32, 32), crop_pct=0.9)
    batch, errors = load_batch(paths, prep, threads=threads)
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
    assert errors[0] is None and errors[2] is None
    assert "truncated" in errors[1] and errors[3] == "file not found"
    assert (batch[1] == 0).all() and (batch[3] == 0).all()
    assert (batch[0] == load_image(good[0], prep)).all()
    assert (batch[2] == load_image(good[1], prep)).all()


def test_load_batch_of_nothing():
    batch, errors = load_batch([], Preprocess((8, 8)))
    assert batch.shape == (0, 8, 8, 3) and errors == []
