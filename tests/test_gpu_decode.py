"""The device decode path (torchvision decode_jpeg, resize/crop in torch) against Pillow's.

Runs with device "cpu": the same code as on a GPU, minus nvJPEG itself (not run here).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vit_attn.decode import CROP_MODES, Preprocess, load_batch, load_image
from vit_attn.gpu_decode import load_batch as device_load_batch
from vit_attn.gpu_decode import supports

from . import imagefactory as factory


def assert_close_to_pillow(got: np.ndarray, expected: np.ndarray, name: str) -> None:
    """The tolerance of the reduced-scale JPEG draft (tests/test_sources_decode.py)."""
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (name, diff.mean(), diff.max())


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    paths = factory.copy_skimage_photos(folder)
    paths += [
        factory.write_rgb(folder, "big.jpg", (1600, 1200), seed=3, quality=90),
        factory.write_rgb(folder, "tall.jpg", (300, 700), seed=4, quality=90),
        factory.write_rgb(folder, "small.jpg", (100, 60), seed=5, quality=95),  # upsampled
        factory.write_exif_rotated(folder, 6),
        factory.write_exif_rotated(folder, 8),
    ]
    gray = folder / "gray.jpg"
    Image.fromarray(factory.synthetic_pixels(200, 150, channels=1)).save(gray, quality=95)
    return [*paths, gray]


@pytest.mark.parametrize("mode", CROP_MODES)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_path_matches_pillow(jpegs, mode, interpolation):
    prep = Preprocess((112, 96), crop_pct=0.875, crop_mode=mode, interpolation=interpolation)
    host, errors, tensor = device_load_batch(jpegs, prep, "cpu")
    assert errors == [None] * len(jpegs)
    assert tuple(tensor.shape) == (len(jpegs), 112, 96, 3) and str(tensor.dtype) == "torch.uint8"
    np.testing.assert_array_equal(host, tensor.numpy())
    for i, path in enumerate(jpegs):
        assert_close_to_pillow(host[i], load_image(path, prep, draft=False), path.name)


def test_exif_orientation_is_applied(jpegs):
    prep = Preprocess((64, 64), crop_mode="squash")
    for path in [p for p in jpegs if p.name.startswith("exif")]:
        host, errors, _ = device_load_batch([path], prep, "cpu")
        expected = load_image(path, prep)
        # a rotation the wrong way would swap whole quadrants (differences of ~255)
        assert np.abs(host[0].astype(int) - expected).max() < 40, path.name


def test_failures_and_other_formats_fall_back_per_image(tmp_path, jpegs):
    for sub in ("broken", "odd"):
        (tmp_path / sub).mkdir()
    broken = factory.write_broken(tmp_path / "broken")
    odd = factory.write_odd_valid(tmp_path / "odd")
    paths = [jpegs[1], broken["truncated_jpeg"], odd["cmyk"], broken["empty"], odd["palette"]]
    paths += [broken["missing"], broken["text"], odd["png16"], jpegs[0]]
    prep = Preprocess((64, 64))
    host, errors, tensor = device_load_batch(paths, prep, "cpu")
    expected, expected_errors = load_batch(paths, prep)
    assert errors == expected_errors  # the same reasons, image by image
    assert [e is None for e in errors] == [True, False, True, False, True, False, False, True, True]
    for i, path in enumerate(paths):
        if errors[i] is not None:
            assert not host[i].any()  # failed rows stay zeros
        else:
            assert_close_to_pillow(host[i], expected[i], path.name)


def test_interpolations_without_a_torch_equivalent_take_the_pillow_path(jpegs):
    prep = Preprocess((64, 64), interpolation="lanczos")
    assert not supports(prep)
    host, errors, _ = device_load_batch(jpegs[:2], prep, "cpu")
    np.testing.assert_array_equal(host, load_batch(jpegs[:2], prep)[0])


def test_empty_batch():
    host, errors, tensor = device_load_batch([], Preprocess((8, 8)), "cpu")
    assert host.shape == (0, 8, 8, 3) and errors == []


@pytest.mark.slow  # two small runs through task.run_batch (one export)
def test_task_with_device_decode_matches_the_host_path(tmp_path, export_cache):
    """task.py's device-decode hook, on the CPU: same statuses and reasons, maps within the
    pixel tolerance, and the graph fed by IO binding of the decoded tensor."""
    import dataclasses

    import zarr

    from vit_attn.config import load_config
    from vit_attn.plan import prepare
    from vit_attn.task import run_batch

    from .helpers import save_sharpened_checkpoint, write_config

    data = tmp_path / "data"
    images = data / "images"
    images.mkdir(parents=True)
    for i, size in enumerate([(640, 480), (300, 500), (128, 96), (200, 200)]):
        factory.write_rgb(images, f"p{i}.jpg", size, seed=i, quality=92)
    factory.write_rgb(images, "q.png", (150, 120), seed=9)
    factory.write_truncated_jpeg(images)
    ckpt = save_sharpened_checkpoint(tmp_path)
    stores = {}
    for name, decode_device in (("host", None), ("device", "cpu")):
        config = write_config(
            tmp_path / name,
            data,
            ckpt,
            export_cache,
            output={"store": "run.zarr", "overlays": "mean"},
        )
        prepared = prepare(load_config(config))
        plan = dataclasses.replace(prepared.plan, decode_device=decode_device)
        for task in prepared.tasks:
            run_batch(plan, task)
        stores[name] = zarr.open_group(str(tmp_path / name / "run.zarr"), mode="r")
    host, device = stores["host"], stores["device"]
    np.testing.assert_array_equal(host["status"][:], device["status"][:])
    assert list(host["error"][:]) == list(device["error"][:])
    assert (host["status"][:] == 2).sum() == 1
    ok = host["status"][:] == 1
    a, b = host["cls_attention"][:][ok], device["cls_attention"][:][ok]
    assert a.max() > 0.2 and np.abs(a.astype(float) - b).max() < 0.05
    assert_close_to_pillow(device["overlay"][:][ok], host["overlay"][:][ok], "overlay")


def test_no_cuda_torch_means_host_decoding_with_one_warning():
    import torch

    from vit_attn.gpu_decode import available

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    available.cache_clear()
    with pytest.warns(UserWarning, match="JPEG decoding on cuda is not available.*on the host"):
        assert not available("cuda")
    assert available("cpu")
