"""Per-head statistics (vit_attn.stats): hand-made matrices with known answers, an independent
float64 loop reference, the torch twin, and the exported graph's in-graph outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vit_attn.export import AttentionGraph, export_onnx
from vit_attn.maps import mass_threshold_mask
from vit_attn.runtime import OrtRunner, RuntimeOptions, TorchRunner
from vit_attn.specs import OutputSpec
from vit_attn.stats import STAT_NAMES, attention_stats, graph_stats, max_distance

from .conftest import sharpened_model
from .helpers import stats_reference

# Two prefix tokens, a 3 x 4 grid and non-square patches (rows 14 px, columns 16 px): a swapped
# axis, a wrong prefix offset or a square-grid assumption changes the numbers.
P, GRID, PATCH = 2, (3, 4), (14, 16)
N = GRID[0] * GRID[1]
T = P + N


def _stats1(a: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in attention_stats(a, P, GRID, PATCH).items()}


def test_uniform_attention():
    a = np.full((T, T), 1.0 / T)
    s = _stats1(a)
    assert s["cls_entropy"] == pytest.approx(math.log(N), abs=1e-12)
    assert s["prefix_mass"] == pytest.approx(P / T)
    assert s["cls_self"] == pytest.approx(1 / T) and s["patch_self"] == pytest.approx(1 / T)
    assert s["concentration_60"] == pytest.approx(math.ceil(0.6 * N) / N)
    assert s["cls_max"] == pytest.approx(1 / T)
    # uniform over patch keys: the mean distance between all pairs of patch centres
    ys, xs = np.divmod(np.arange(N), GRID[1])
    pos = np.stack([(ys + 0.5) * PATCH[0], (xs + 0.5) * PATCH[1]], 1)
    pairs = np.mean([np.hypot(*(pos[i] - pos[j])) for i in range(N) for j in range(N)])
    assert s["attention_distance"] == pytest.approx(pairs, rel=1e-12)


def test_one_hot_attention():
    a = np.zeros((T, T))
    a[0, P + 5] = 1.0  # CLS looks at one patch
    a[1, 1] = 1.0
    for i in range(N):
        a[P + i, P + i] = 1.0  # every patch looks at itself
    s = _stats1(a)
    assert s["cls_entropy"] == 0.0
    assert s["attention_distance"] == 0.0
    assert s["patch_self"] == 1.0 and s["cls_self"] == 0.0 and s["prefix_mass"] == 0.0
    assert s["concentration_60"] == pytest.approx(1 / N)
    assert s["cls_max"] == 1.0


@pytest.mark.parametrize("axis, step", [("x", PATCH[1]), ("y", PATCH[0])])
def test_neighbour_attention_distance_is_one_patch_along_its_axis(axis, step):
    """Each patch attends 0.7 to a neighbour (right/left or down/up) and 0.3 to prefix token 1."""
    a = np.zeros((T, T))
    a[0, P:] = 1.0 / N
    a[1, 1] = 1.0
    gh, gw = GRID
    for i in range(N):
        r, c = divmod(i, gw)
        if axis == "x":
            c = c + 1 if c + 1 < gw else c - 1
        else:
            r = r + 1 if r + 1 < gh else r - 1
        a[P + i, P + r * gw + c] = 0.7
        a[P + i, 1] = 0.3
    s = _stats1(a)
    # the prefix mass is reported, and the distance is over the patch keys only (renormalised)
    assert s["attention_distance"] == pytest.approx(step, abs=1e-12)
    assert s["prefix_mass"] == pytest.approx(0.3)
    assert s["patch_self"] == 0.0


def test_concentration_known_answers():
    a = np.full((T, T), 1.0 / T)
    cls = np.zeros(N)
    cls[[3, 7, 8, 11]] = [0.4, 0.25, 0.2, 0.15]
    a[0] = 0.0
    a[0, 0] = 0.5  # the CLS self mass does not count: shares are of the patch mass
    a[0, P:] = cls * 0.5
    s = _stats1(a)
    assert s["concentration_60"] == pytest.approx(2 / N)  # 0.4 + 0.25 >= 0.6
    assert s["cls_self"] == 0.5 and s["cls_max"] == pytest.approx(0.2)
    assert s["cls_entropy"] == pytest.approx(-sum(v * math.log(v) for v in cls[cls > 0]))


@pytest.mark.parametrize("grid", [(2, 5), (4, 5), (5, 5), (20, 20), (6, 10), (37, 37)])
def test_uniform_concentration_is_ceil_of_60_percent_in_numpy_and_in_the_graph(grid):
    # Where 0.6 N is a whole number the sum of the first 0.6 N shares rounds either side of
    # 0.6: numpy said 0.65 on 4 x 5 and the graph 0.7 on 2 x 5, for ceil(0.6 N) / N = 0.6.
    n = grid[0] * grid[1]
    t = 1 + n
    a = np.full((1, 1, t, t), 1.0 / t)
    expected = math.ceil(round(0.6 * n, 9)) / n
    numpy_value = attention_stats(a[0, 0], 1, grid, (16, 16))["concentration_60"]
    assert float(numpy_value) == pytest.approx(expected, abs=1e-12)
    for dtype in (torch.float32, torch.float64):
        got = graph_stats(torch.tensor(a, dtype=dtype), 1, grid, (16, 16))["concentration_60"]
        assert float(got) == pytest.approx(expected, abs=1e-6), dtype
    mask = mass_threshold_mask(np.full(grid, 1.0 / n), 0.6)
    assert mask.all()  # ties at the cut are kept whole


def random_attention(
    rng: np.random.Generator, shape: tuple[int, ...], sharp: float = 0.2
) -> np.ndarray:
    return rng.dirichlet(np.full(T, sharp), size=(*shape, T))


def test_numpy_stats_equal_loop_reference():
    rng = np.random.default_rng(0)
    a = random_attention(rng, (2, 3, 4))  # [image, layer, head, T, T]
    got = attention_stats(a, P, GRID, PATCH)
    for idx in np.ndindex(2, 3, 4):
        ref = stats_reference(a[idx], P, GRID, PATCH)
        for name in STAT_NAMES:
            assert got[name].shape == (2, 3, 4)
            assert got[name][idx] == pytest.approx(ref[name], rel=1e-10, abs=1e-12), (name, idx)


def test_torch_stats_equal_numpy_in_float64_and_float32():
    rng = np.random.default_rng(1)
    a = random_attention(rng, (3, 5))  # [B, H, T, T]
    want = attention_stats(a, P, GRID, PATCH)
    got64 = graph_stats(torch.from_numpy(a), P, GRID, PATCH)
    got32 = graph_stats(torch.from_numpy(a.astype(np.float32)), P, GRID, PATCH)
    assert list(got64) == list(STAT_NAMES)
    for name in STAT_NAMES:
        np.testing.assert_allclose(
            got64[name].numpy(), want[name], rtol=1e-12, atol=1e-12, err_msg=name
        )
        tol = (
            1.0 / N
            if name == "concentration_60"
            else 1e-5 * max(1.0, float(np.abs(want[name]).max()))
        )
        np.testing.assert_allclose(got32[name].numpy(), want[name], atol=tol, rtol=0, err_msg=name)


def test_rows_without_patch_mass_give_zeros_not_nan():
    a = np.zeros((T, T))
    a[:, 0] = 1.0  # everything on CLS
    s = _stats1(a)
    assert not any(math.isnan(v) for v in s.values())
    assert s["cls_entropy"] == 0.0 and s["attention_distance"] == 0.0 and s["prefix_mass"] == 1.0
    t = graph_stats(torch.from_numpy(a[None, None]).float(), P, GRID, PATCH)
    assert not any(torch.isnan(v).any() for v in t.values())


def test_wrong_token_count_is_refused():
    with pytest.raises(ValueError, match="prefix"):
        attention_stats(np.zeros((T + 1, T + 1)), P, GRID, PATCH)


def test_max_distance_is_the_centre_diagonal():
    assert max_distance(GRID, PATCH) == pytest.approx(math.hypot(2 * 14, 3 * 16))


# ----------------------------------------------------------------------------- in the graph

GRAPH_MODEL = ("deit_tiny_distilled_patch16_224", {"depth": 2, "img_size": (64, 96)})


@pytest.fixture(scope="module")
def graph_run(export_cache):
    """A 2-prefix-token model on a 4 x 6 grid: stats, full attention and rollout from one graph."""
    name, kwargs = GRAPH_MODEL
    loaded = sharpened_model(name, factor=16.0, seed=2, **kwargs)
    spec = OutputSpec(layers=(0, 1), logits=False, topk=0, attention=True, rollout=True, stats=True)
    runner = OrtRunner(export_onnx(loaded, spec, "fp32", export_cache), RuntimeOptions(threads=2))
    x = np.random.default_rng(3).standard_normal((4, 3, 64, 96)).astype(np.float32)
    return loaded, spec, x, runner.run(x)


def test_graph_stats_equal_numpy_stats_of_the_graphs_own_attention(graph_run):
    loaded, spec, _, outs = graph_run
    lay = loaded.layout
    assert lay.num_prefix_tokens == 2 and lay.grid == (4, 6)
    att = outs["attention"].astype(np.float64)
    assert att.max() > 0.3  # sharpened: statistics far from their uniform values
    want = attention_stats(att, lay.num_prefix_tokens, lay.grid, lay.patch_size)
    for name in STAT_NAMES:
        got = outs[name]
        assert got.shape == (4, 2, lay.num_heads) and got.dtype == np.float32, name
        tol = (
            1.0 / (lay.grid[0] * lay.grid[1])
            if name == "concentration_60"
            else 2e-5 * max(1.0, float(np.abs(want[name]).max()))
        )
        np.testing.assert_allclose(got, want[name], atol=tol, rtol=0, err_msg=name)
    # invariants that hold for any model
    n = lay.grid[0] * lay.grid[1]
    assert (outs["cls_entropy"] >= -1e-6).all() and (
        outs["cls_entropy"] <= math.log(n) + 1e-5
    ).all()
    assert (outs["attention_distance"] <= max_distance(lay.grid, lay.patch_size) + 1e-3).all()


def test_torch_backend_stats_equal_onnxruntime(graph_run):
    loaded, spec, x, outs = graph_run
    torch_outs = TorchRunner(AttentionGraph(loaded, spec), RuntimeOptions()).run(x)
    for name in STAT_NAMES:
        np.testing.assert_allclose(
            torch_outs[name],
            outs[name],
            atol=2e-5 * max(1.0, float(np.abs(outs[name]).max())),
            err_msg=name,
        )


def test_stats_change_the_export_cache_key(export_cache):
    from vit_attn.export import export_fingerprint

    loaded = sharpened_model("vit_tiny_patch16_224", factor=1.0, seed=0, depth=1)
    base = OutputSpec(layers=(0,))
    assert export_fingerprint(loaded, base, "fp32") != export_fingerprint(
        loaded, OutputSpec(layers=(0,), stats=True), "fp32"
    )
    assert OutputSpec(layers=(0,), stats=True).names(True)[-len(STAT_NAMES) :] == list(STAT_NAMES)
