"""Head fusion, mass-threshold masks and rollout (vit_attn.maps) against float64 references."""

from __future__ import annotations

import numpy as np
import pytest

from vit_attn.export import export_onnx
from vit_attn.maps import fuse_heads, mass_threshold_mask, rollout
from vit_attn.runtime import OrtRunner, RuntimeOptions
from vit_attn.specs import OutputSpec
from vit_attn.stats import attention_stats

from .conftest import sharpened_model


def mask_reference(m: np.ndarray, t: float) -> np.ndarray:
    """Plain loop: take the largest values until their share reaches t, then every tie of the last."""
    flat = m.ravel() / m.sum()
    keep = np.zeros(flat.size, bool)
    taken, last = 0.0, None
    for j in sorted(range(flat.size), key=lambda j: -flat[j]):
        if taken >= t:
            break
        taken += flat[j]
        keep[j], last = True, flat[j]
    keep |= flat == last
    return keep.reshape(m.shape)


def test_fuse_heads():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 4, 5))  # [B, heads, gh, gw]
    np.testing.assert_array_equal(fuse_heads(maps, "mean"), maps.mean(axis=1))
    np.testing.assert_array_equal(fuse_heads(maps, "max"), maps.max(axis=1))
    np.testing.assert_array_equal(fuse_heads(maps, "min"), maps.min(axis=1))
    with pytest.raises(ValueError, match="fusion"):
        fuse_heads(maps, "median")


def test_mass_threshold_known_answers():
    m = np.array([[0.4, 0.1], [0.3, 0.2]])
    np.testing.assert_array_equal(mass_threshold_mask(m, 0.6), [[True, False], [True, False]])
    np.testing.assert_array_equal(mass_threshold_mask(m, 0.35), [[True, False], [False, False]])
    np.testing.assert_array_equal(mass_threshold_mask(m, 0.71), [[True, False], [True, True]])
    np.testing.assert_array_equal(
        mass_threshold_mask(m * 7.0, 0.6), mass_threshold_mask(m, 0.6)
    )  # scale-free
    assert mass_threshold_mask(np.full((3, 4), 0.5), 0.6).all()  # ties are never split
    assert not mass_threshold_mask(np.zeros((3, 4)), 0.6).any()
    assert (
        mass_threshold_mask(np.array([[0.0, 1.0], [0.0, 0.0]]), 1.0).sum() == 1
    )  # zeros never kept


def test_mass_threshold_equals_loop_reference_per_head():
    rng = np.random.default_rng(1)
    maps = rng.dirichlet(np.full(24, 0.3), size=(3, 4)).reshape(3, 4, 4, 6)  # [B, heads, gh, gw]
    for t in (0.3, 0.6, 0.9):
        got = mass_threshold_mask(maps, t)
        assert got.shape == maps.shape and got.dtype == bool
        for b, h in np.ndindex(3, 4):
            np.testing.assert_array_equal(
                got[b, h], mask_reference(maps[b, h], t), err_msg=f"{t} {b} {h}"
            )


def test_mask_at_tiny_and_full_thresholds():
    # The 1e-4 tolerance took every patch for t <= 1e-4, and dropped the last 1e-4 at t = 1.
    m = np.array([[0.5, 0.3], [0.15, 0.05]])
    np.testing.assert_array_equal(mass_threshold_mask(m, 1e-4), [[True, False], [False, False]])
    np.testing.assert_array_equal(mass_threshold_mask(m, 1e-9), [[True, False], [False, False]])
    tail = np.array([[0.7, 0.29995], [4e-5, 1e-5]])
    assert mass_threshold_mask(tail, 1.0).all()
    assert mass_threshold_mask(np.array([[0.0, 1.0], [0.0, 0.0]]), 1.0).sum() == 1


def test_concentration_stat_is_the_mask_size():
    rng = np.random.default_rng(2)
    p, grid = 1, (3, 5)
    t = p + 15
    a = rng.dirichlet(np.full(t, 0.3), size=(6, t))
    conc = attention_stats(a, p, grid, (16, 16))["concentration_60"]
    masks = mass_threshold_mask(a[:, 0, p:].reshape(6, *grid), 0.6)
    np.testing.assert_allclose(conc, masks.sum(axis=(1, 2)) / 15)


def rollout_reference(attentions, prefix, grid, discard_ratio=0.0, fusion="mean"):
    """Per sample, per block, in float64 with explicit loops over samples."""
    batch, _, tokens, _ = attentions[0].shape
    out = np.zeros((batch, *grid))
    for b in range(batch):
        joint = np.eye(tokens)
        for a in attentions:
            fused = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](a[b], axis=0).astype(
                np.float64
            )
            if discard_ratio:
                k = int(discard_ratio * (tokens * tokens - 1))
                candidates = sorted(range(1, tokens * tokens), key=lambda j: (fused.flat[j], j))[:k]
                for j in candidates:
                    fused.flat[j] = 0.0
            fused = fused + np.eye(tokens)
            for i in range(tokens):
                fused[i] /= fused[i].sum()
            joint = fused @ joint
        out[b] = joint[0, prefix:].reshape(grid)
    return out


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
def test_rollout_equals_float64_reference(fusion, discard):
    rng = np.random.default_rng(3)
    prefix, grid = 2, (2, 3)
    tokens = prefix + 6
    atts = [
        rng.dirichlet(np.full(tokens, 0.4), size=(3, 4, tokens)) for _ in range(3)
    ]  # [B, H, T, T]
    got = rollout(atts, prefix, grid, discard_ratio=discard, head_fusion=fusion)
    assert got.shape == (3, *grid) and got.dtype == np.float64
    np.testing.assert_allclose(
        got, rollout_reference(atts, prefix, grid, discard, fusion), rtol=1e-12, atol=1e-14
    )
    # the blocks stacked in one array, as `ds.attention` gives them, are the same sequence
    stacked = rollout(np.stack(atts), prefix, grid, discard_ratio=discard, head_fusion=fusion)
    np.testing.assert_array_equal(stacked, got)
    with pytest.raises(ValueError, match="do not match"):
        rollout(np.stack(atts), prefix, (3, 3))
    with pytest.raises(ValueError, match="at least one block"):
        rollout(np.zeros((0, 3, 4, tokens, tokens)), prefix, grid)


def test_rollout_is_per_sample():
    """vit-explain discards sample 0's entries using the whole batch: here each sample stands alone."""
    rng = np.random.default_rng(4)
    tokens = 1 + 9
    atts = [rng.dirichlet(np.full(tokens, 0.4), size=(4, 2, tokens)) for _ in range(2)]
    batch = rollout(atts, 1, (3, 3), discard_ratio=0.6, head_fusion="max")
    for b in range(4):
        alone = rollout(
            [a[b : b + 1] for a in atts], 1, (3, 3), discard_ratio=0.6, head_fusion="max"
        )
        np.testing.assert_array_equal(batch[b], alone[0])
    # each normalised factor keeps rows summing to 1, so the CLS row is a distribution
    assert (batch >= 0).all() and (batch.sum(axis=(1, 2)) <= 1 + 1e-12).all()


def test_rollout_never_discards_cls_to_cls():
    tokens = 1 + 4
    a = np.full((1, 1, tokens, tokens), 0.2)
    a[0, 0, 0, 0] = 1e-9  # the lowest entry of all
    a[0, 0, 0] /= a[0, 0, 0].sum()
    kept = rollout([a], 1, (2, 2), discard_ratio=0.04)  # exactly one entry goes: not [cls, cls]
    want = a[0, 0].copy()
    flat = want.ravel()
    flat[1 + int(np.argmin(flat[1:]))] = 0.0
    want = want + np.eye(tokens)
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(kept[0], want[0, 1:].reshape(2, 2), rtol=1e-12)


def test_rollout_rejects_bad_arguments():
    a = np.full((1, 1, 5, 5), 0.2)
    with pytest.raises(ValueError, match="discard"):
        rollout([a], 1, (2, 2), discard_ratio=1.0)
    with pytest.raises(ValueError, match="tokens"):
        rollout([a], 2, (2, 2))


def test_in_graph_rollout_equals_maps_rollout(export_cache):
    """The exported graph's rollout (discard 0, mean) against maps.rollout on its own attention."""
    loaded = sharpened_model(
        "deit_tiny_distilled_patch16_224", factor=16.0, seed=2, depth=2, img_size=(64, 96)
    )
    spec = OutputSpec(layers=(0, 1), logits=False, topk=0, attention=True, rollout=True, stats=True)
    runner = OrtRunner(export_onnx(loaded, spec, "fp32", export_cache), RuntimeOptions(threads=2))
    x = np.random.default_rng(5).standard_normal((3, 3, 64, 96)).astype(np.float32)
    outs = runner.run(x)
    att = outs["attention"]
    lay = loaded.layout
    want = rollout([att[:, 0], att[:, 1]], lay.num_prefix_tokens, lay.grid)
    np.testing.assert_allclose(outs["rollout"], want, atol=1e-6, rtol=1e-5)
    assert want.std() > 1e-3  # not a flat map
