"""vit_attn.runtime: the IO-binding path (used on GPUs) gives exactly the plain session's outputs.

No GPU here: onnxruntime's CPU EP binds OrtValues too, so `io_binding=True` runs the very code
the CUDA EP runs (one binding per batch shape, host output buffers reused), minus the device.
"""

from __future__ import annotations

import numpy as np
import pytest

from vit_attn import runtime
from vit_attn.export import export_onnx
from vit_attn.model import ModelSource, load_model
from vit_attn.runtime import OrtRunner, RuntimeOptions
from vit_attn.specs import OutputSpec

SPEC = OutputSpec(
    layers=(0, 1), logits=True, topk=3, cls_attention=True, attention=True, rollout=True
)


@pytest.fixture(scope="module")
def graphs(export_cache):
    loaded = load_model(
        ModelSource("vit_tiny_patch16_224", seed=0, img_size=(32, 48), kwargs={"depth": 2})
    )
    return {p: export_onnx(loaded, SPEC, p, export_cache) for p in ("fp32", "mixed")}


def batches(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 3, 32, 48), dtype=np.float32) for n in sizes]


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_io_binding_equals_plain_run(graphs, precision):
    plain = OrtRunner(graphs[precision], RuntimeOptions(threads=1))
    bound = OrtRunner(graphs[precision], RuntimeOptions(threads=1), io_binding=True)
    assert not plain.io_binding and bound.io_binding and not bound.on_gpu
    for x in batches([4, 4, 3, 4, 1]):  # full batches, the last short one, and back
        expected, got = plain.run(x), bound.run(x)
        assert list(got) == list(expected)
        for name in expected:
            assert (
                got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape
            ), name
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert len(bound._bindings) == 2  # at most two shapes are kept bound


@pytest.mark.parametrize("pattern", [None, True, False])
def test_memory_pattern_off_on_the_cpu_unless_asked_and_results_unchanged(graphs, pattern):
    # The pattern only plans memory: with it on or off the outputs are the same bytes.
    runner = OrtRunner(graphs["fp32"], RuntimeOptions(threads=1, memory_pattern=pattern))
    assert runner.session.get_session_options().enable_mem_pattern is bool(pattern)
    reference = OrtRunner(graphs["fp32"], RuntimeOptions(threads=1, memory_pattern=True))
    for x in batches([4, 3, 4], seed=1):
        got, expected = runner.run(x), reference.run(x)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_io_binding_from_several_threads(graphs):
    """Dask workers with --nthreads > 1 share one runner: each thread binds its own buffers."""
    from concurrent.futures import ThreadPoolExecutor

    plain = OrtRunner(graphs["fp32"], RuntimeOptions(threads=1))
    bound = OrtRunner(graphs["fp32"], RuntimeOptions(threads=1), io_binding=True)
    inputs = batches([3] * 12, seed=1)
    expected = [plain.run(x)["cls_attention"] for x in inputs]

    def run(i: int) -> np.ndarray:
        return bound.run(inputs[i])["cls_attention"].copy()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(len(inputs))))
    for i, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(g, e, err_msg=f"batch {i}")


def test_bound_outputs_are_reused_buffers(graphs):
    """Documented: the next batch of the same shape overwrites them (the task copies at once)."""
    bound = OrtRunner(graphs["fp32"], RuntimeOptions(threads=1), io_binding=True)
    a, b = batches([2, 2])
    first = bound.run(a)
    kept = {k: v.copy() for k, v in first.items()}
    second = bound.run(b)
    assert second["cls_attention"] is first["cls_attention"]
    assert not np.array_equal(second["cls_attention"], kept["cls_attention"])


def test_outputs_without_fixed_shape_are_copied_out(graphs, monkeypatch):
    """Outputs the binding cannot preallocate (here: pretend float32 is unknown) still arrive."""
    monkeypatch.setattr(
        runtime, "_ORT_TYPES", {k: v for k, v in runtime._ORT_TYPES.items() if k != "tensor(float)"}
    )
    plain = OrtRunner(graphs["fp32"], RuntimeOptions(threads=1))
    bound = OrtRunner(graphs["fp32"], RuntimeOptions(threads=1), io_binding=True)
    (x,) = batches([3])
    got, expected = bound.run(x), plain.run(x)
    binding = next(iter(bound._bindings.values()))
    assert "cls_attention" in binding.dynamic and "topk_index" in binding.buffers
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_cache_folder_precedence(monkeypatch, tmp_path):
    """inference.cache_dir, else $VIT_ATTN_CACHE, else ~/.cache/vit-attn: for every cache."""
    from vit_attn.cachedir import cache_root

    monkeypatch.delenv("VIT_ATTN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "vit-attn"
    monkeypatch.setenv("VIT_ATTN_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "cfg") == tmp_path / "cfg"


def test_example_gpu_config_is_valid():
    from pathlib import Path

    from vit_attn.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "imagenet_gpu.yaml")
    assert (cfg.model.name, cfg.model.pretrained) == ("vit_base_patch16_224", True)
    assert (cfg.inference.device, cfg.inference.precision, cfg.inference.batch_size) == (
        "cuda",
        "mixed",
        128,
    )
    assert (cfg.cluster.kind, cfg.cluster.n_workers) == ("local", 1)
