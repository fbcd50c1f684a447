"""Maps from attention: head fusion, DINO's mass-threshold masks and attention rollout.

numpy only, float64 where it matters, and every function works per sample: nothing here
mixes images of a batch. The widely copied rollout of jacobgil/vit-explain has three bugs
this version avoids (docs/ANALYSIS.md has the details):

1. it renormalises with ``a / a.sum(dim=-1)`` (no keepdim): the row sums broadcast along the
   last axis, so entry (i, j) is divided by row j's sum; invisible with head-mean fusion
   and no discard (rows then sum to 1 already), wrong with max/min fusion or discarding,
   and a shape error for batches larger than one;
2. it discards with ``flat[0, indices] = 0`` after a top-k over the whole batch: only
   sample 0 loses entries, and it loses the union of every sample's lowest entries;
3. it reads ``result[0, 0, 1:]`` and ``sqrt`` of its length: sample 0 only, one prefix
   token (distillation or register tokens end up in the map), square grids only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(maps: np.ndarray, mode: str = "mean", axis: int = -3) -> np.ndarray:
    """Fuse the head axis of maps (default ``[..., heads, gh, gw]``) by mean, max or min."""
    if mode not in HEAD_FUSIONS:
        raise ValueError(f"head fusion must be one of {HEAD_FUSIONS}, got {mode!r}")
    return getattr(np, mode)(np.asarray(maps), axis=axis)


# A cumulative mass within this of the threshold has reached it: with 0.6 N patches of a
# uniform map (an integer), float rounding put the sum either side of 0.6, one patch more or
# less, and float32 (the graph) and float64 (numpy) disagreed.
MASS_TOLERANCE = 1e-4


def mass_threshold_mask(maps: np.ndarray, t: float = 0.6) -> np.ndarray:
    """DINO's mask: per map, the smallest set of patches holding a fraction `t` of its mass.

    Each map ``[..., gh, gw]`` is normalised to sum 1; its values are taken largest first
    until their sum reaches `t` (within `MASS_TOLERANCE`). Patches equal to the last value taken are all kept (ties are
    never split by index order), so a uniform map keeps every patch. A map with no mass
    keeps none.

    Args:
        maps: non-negative maps ``[..., gh, gw]`` (e.g. CLS attention of every head).
        t: mass fraction in (0, 1].

    Returns:
        bool array of the same shape.
    """
    if not 0.0 < t <= 1.0:
        raise ValueError(f"mass threshold t must be in (0, 1], got {t}")
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2:
        raise ValueError(f"maps must be [..., gh, gw], got shape {maps.shape}")
    flat = maps.reshape(*maps.shape[:-2], -1)
    total = flat.sum(-1, keepdims=True)
    q = flat / np.where(total > 0, total, 1.0)
    if t >= 1.0:  # all the mass: every patch that has some
        return ((q > 0) & (total > 0)).reshape(maps.shape)
    ordered = -np.sort(-q, axis=-1)
    before = np.cumsum(ordered, axis=-1) - ordered
    # the tolerance never reaches t itself: a tiny t still takes the largest patch
    reached = before < t - min(MASS_TOLERANCE, t / 2)
    count = np.maximum(reached.sum(-1, keepdims=True), 1)
    cutoff = np.take_along_axis(ordered, count - 1, axis=-1)
    mask = (q >= cutoff) & (q > 0)
    return mask.reshape(maps.shape)


def _discard_lowest(fused: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the lowest `ratio` of each sample's entries, never ``[cls, cls]`` (flat index 0)."""
    batch, tokens, _ = fused.shape
    flat = fused.reshape(batch, tokens * tokens).copy()
    k = int(ratio * (tokens * tokens - 1))
    if k:
        # Stable sort: ties are dropped in token order, the same for every run.
        lowest = np.argsort(flat[:, 1:], axis=1, kind="stable")[:, :k] + 1
        np.put_along_axis(flat, lowest, 0.0, axis=1)
    return flat.reshape(fused.shape)


def rollout(
    attentions: Sequence[np.ndarray],
    num_prefix: int,
    grid: tuple[int, int],
    discard_ratio: float = 0.0,
    head_fusion: str = "mean",
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020), per sample, in float64.

    For each block in order: fuse heads, optionally zero the lowest entries, add the
    identity (the residual path), renormalise every row to sum 1, and multiply onto the
    product of the earlier blocks. The result is the CLS row over the patch keys.

    Args:
        attentions: every block's softmax ``[B, H, T, T]``, first block first (a list, or
            one stacked ``[L, B, H, T, T]`` array).
        num_prefix: prefix tokens (CLS first); they are left out of the map.
        grid: (gh, gw) patches, row-major.
        discard_ratio: fraction in [0, 1) of each sample's fused entries (all T*T but the
            CLS->CLS one) set to 0 before the identity is added, lowest first.
        head_fusion: "mean", "max" or "min" over heads.

    Returns:
        ``[B, gh, gw]`` float64, raw (not rescaled to a maximum of 1).
    """
    if len(attentions) == 0:  # a stacked [L, B, H, T, T] array is a sequence of blocks too
        raise ValueError("rollout needs the attention of at least one block")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    batch, _, tokens, _ = np.shape(attentions[0])
    if tokens != num_prefix + grid[0] * grid[1]:
        raise ValueError(
            f"{tokens} tokens do not match {num_prefix} prefix + {grid[0]}x{grid[1]} patches"
        )
    eye = np.eye(tokens)
    joint = np.broadcast_to(eye, (batch, tokens, tokens))
    for attn in attentions:
        a = np.asarray(attn, dtype=np.float64)
        if a.shape != (batch, a.shape[1], tokens, tokens):
            raise ValueError(
                f"every block's attention must be [{batch}, H, {tokens}, {tokens}], got {a.shape}"
            )
        fused = fuse_heads(a, head_fusion, axis=1)
        if discard_ratio > 0:
            fused = _discard_lowest(fused, discard_ratio)
        fused = fused + eye
        fused /= fused.sum(-1, keepdims=True)
        joint = fused @ joint
    return joint[:, 0, num_prefix:].reshape(batch, *grid)
