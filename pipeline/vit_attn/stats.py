"""Per-(image, layer, head) attention statistics: the one place where they are defined.

Two implementations of the same definitions:

- `graph_stats` (torch) runs inside `AttentionGraph`, so the statistics are computed in the
  exported ONNX graph from each block's ``[B, H, T, T]`` softmax and the full matrices never
  leave the runtime;
- `attention_stats` (numpy, float64) computes them from stored full ``attention`` matrices.

Both are tested against an independent float64 loop implementation (tests/test_stats.py).
Tokens are in model order: ``num_prefix`` prefix tokens (CLS first, then distillation or
register tokens), then ``gh * gw`` patches row-major. Patch positions are the patch centres
in model-input pixels, ``((r + 0.5) * ph, (c + 0.5) * pw)`` for patch row ``r``, column ``c``.

Definitions (A is one head's attention, rows are queries, P the patch tokens, N = gh * gw):

- ``cls_entropy``: entropy, natural log, of the CLS row over patch keys renormalised to sum 1,
  ``-sum_j q_j ln q_j`` with ``q = A[cls, P] / sum A[cls, P]``; in [0, ln N].
- ``attention_distance``: for each patch query i, the mean Euclidean distance in pixels from
  its centre to the key patch centres, weighted by ``A[i, P]`` renormalised over patch keys;
  averaged over the N patch queries. In [0, the centre-to-centre grid diagonal]. The mass a
  query puts on prefix tokens (which have no position) is reported in ``prefix_mass``.
- ``prefix_mass``: mass on all prefix tokens, ``sum_{k < num_prefix} A[i, k]``, averaged over
  patch queries; a patch row's patch mass is ``1 - prefix_mass`` for that row.
- ``cls_self``: ``A[cls, cls]``.
- ``patch_self``: the diagonal ``A[i, i]`` averaged over patch tokens.
- ``concentration_60``: the smallest fraction of patches whose share of the CLS row's patch
  mass reaches 0.6 (the patches of `maps.mass_threshold_mask` at t = 0.6, divided by N; a
  mass within `maps.MASS_TOLERANCE` = 1e-4 of 0.6 has reached it, so float32 and float64
  agree where 0.6 N is a whole number).
- ``cls_max``: the largest raw ``A[cls, P]`` value (not renormalised): the peak of the stored
  CLS map, whose dataset-wide percentiles give `vit-attn show --normalize dataset` its scale.

Models without a class token (average- or attention-pooled, `roles`) get only the statistics
that do not read a CLS row: ``attention_distance``, ``prefix_mass`` and ``patch_self``
(`stat_names_for`); their prefix tokens, if any, are registers.

Degenerate rows (no patch mass at all, e.g. a head that puts everything on prefix tokens)
give 0 for the renormalised statistics, except ``concentration_60``, which is 1 (no subset
reaches 60%). Images that are not ok are not computed: they hold 0, as in every array.

torch is imported only inside the torch function, so workers that merely read the names
(`specs.OutputSpec`, `task`) do not import it. The export cache keys graphs by their
`OutputSpec`, not by this code: bump `export.EXPORT_FORMAT_VERSION` when `graph_stats` changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .maps import MASS_TOLERANCE

if TYPE_CHECKING:
    import torch

STAT_NAMES: tuple[str, ...] = (
    "cls_entropy",
    "attention_distance",
    "prefix_mass",
    "cls_self",
    "patch_self",
    "concentration_60",
    "cls_max",
)
STAT_UNITS: dict[str, str] = {
    "cls_entropy": "nats",
    "attention_distance": "pixels",
    "prefix_mass": "probability",
    "cls_self": "probability",
    "patch_self": "probability",
    "concentration_60": "fraction of patches",
    "cls_max": "probability",
}
# The statistics that read the class token's row or column: absent for models without one.
CLS_STAT_NAMES: tuple[str, ...] = ("cls_entropy", "cls_self", "concentration_60", "cls_max")
CONCENTRATION_MASS = 0.6
# Guards divisions by a row's patch mass: a row with no patch mass gives 0, never NaN.
_TINY = 1e-30


def patch_centres(grid: tuple[int, int], patch_size: tuple[int, int]) -> np.ndarray:
    """[N, 2] (y, x) pixel centres of the patches, row-major, float64."""
    gh, gw = grid
    ph, pw = patch_size
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([(rows.ravel() + 0.5) * ph, (cols.ravel() + 0.5) * pw], axis=1).astype(
        np.float64
    )


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> np.ndarray:
    """[N, N] Euclidean distances in pixels between patch centres, float64."""
    c = patch_centres(grid, patch_size)
    return np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))


def max_distance(grid: tuple[int, int], patch_size: tuple[int, int]) -> float:
    """The largest centre-to-centre distance: the upper bound of `attention_distance`."""
    return math.hypot((grid[0] - 1) * patch_size[0], (grid[1] - 1) * patch_size[1])


def stat_names_for(class_token: bool) -> tuple[str, ...]:
    """The statistics defined for a model with or without a class token, in `STAT_NAMES` order."""
    return STAT_NAMES if class_token else tuple(s for s in STAT_NAMES if s not in CLS_STAT_NAMES)


def _check_shape(
    shape: tuple[int, ...], num_prefix: int, grid: tuple[int, int], class_token: bool = True
) -> None:
    tokens = num_prefix + grid[0] * grid[1]
    if len(shape) < 2 or shape[-1] != tokens or shape[-2] != tokens:
        raise ValueError(
            f"attention must be [..., T, T] with T = {num_prefix} prefix + {grid[0]}x{grid[1]} patches "
            f"= {tokens}, got shape {tuple(shape)}"
        )
    if class_token and num_prefix < 1:
        raise ValueError(
            "class_token=True needs num_prefix >= 1 (the class token is the first prefix token)"
        )


def attention_stats(
    attention: np.ndarray,
    num_prefix: int,
    grid: tuple[int, int],
    patch_size: tuple[int, int],
    class_token: bool = True,
) -> dict[str, np.ndarray]:
    """Every statistic of attention matrices ``[..., T, T]`` in float64 (module docstring).

    Args:
        attention: softmax probabilities, tokens in model order; any leading dims, e.g.
            ``[image, layer, head]``.
        num_prefix: prefix tokens (CLS first).
        grid: (gh, gw) patches.
        patch_size: (ph, pw) pixels.
        class_token: whether the first prefix token is a class token; without one only
            `stat_names_for(False)` are returned.

    Returns:
        Name -> float64 array of the leading shape, in `STAT_NAMES` order.
    """
    a = np.asarray(attention, dtype=np.float64)
    _check_shape(a.shape, num_prefix, grid, class_token)
    p, n = num_prefix, grid[0] * grid[1]
    patches = a[..., p:, p:]
    row_mass = patches.sum(-1)
    weighted = (patches * patch_distances(grid, patch_size)).sum(-1)
    distance = (weighted / np.maximum(row_mass, _TINY)).mean(-1)
    patch_stats = {
        "attention_distance": distance,
        "prefix_mass": a[..., p:, :p].sum(-1).mean(-1),
        "patch_self": np.diagonal(patches, axis1=-2, axis2=-1).mean(-1),
    }
    if not class_token:
        return patch_stats
    cls = a[..., 0, p:]
    q = cls / np.maximum(cls.sum(-1, keepdims=True), _TINY)
    entropy = -(q * np.log(np.maximum(q, _TINY))).sum(-1)

    ordered = -np.sort(-q, axis=-1)
    before = np.cumsum(ordered, axis=-1) - ordered  # mass of the larger entries before each
    concentration = (before < CONCENTRATION_MASS - MASS_TOLERANCE).sum(-1) / n
    return {
        "cls_entropy": entropy,
        "attention_distance": patch_stats["attention_distance"],
        "prefix_mass": patch_stats["prefix_mass"],
        "cls_self": a[..., 0, 0],
        "patch_self": patch_stats["patch_self"],
        "concentration_60": concentration.astype(np.float64),
        "cls_max": cls.max(-1),
    }


def graph_stats(
    attention: torch.Tensor,
    num_prefix: int,
    grid: tuple[int, int],
    patch_size: tuple[int, int],
    class_token: bool = True,
) -> dict[str, torch.Tensor]:
    """The same statistics as `attention_stats` as torch ops, for the exported graph.

    Args:
        attention: one block's softmax probabilities ``[B, H, T, T]`` (float32).
        num_prefix, grid, patch_size: the model's token layout.
        class_token: as in `attention_stats`.

    Returns:
        Name -> ``[B, H]`` tensor in the attention's dtype, in `STAT_NAMES` order.
    """
    import torch

    _check_shape(tuple(attention.shape), num_prefix, grid, class_token)
    p, n = num_prefix, grid[0] * grid[1]
    tiny = torch.tensor(_TINY, dtype=attention.dtype, device=attention.device)

    # Constants over all T keys, zero where they do not apply: the [B, H, T, T] tensor is read
    # whole, since slicing it first would copy it (onnxruntime's Slice materialises).
    t = attention.shape[-1]
    dist = np.zeros((t, t))
    dist[p:, p:] = patch_distances(grid, patch_size)
    keys = np.zeros((t, 2))
    keys[:p, 0] = 1.0  # column 0: prefix keys, column 1: patch keys
    keys[p:, 1] = 1.0
    weighted = (attention * _const(dist, attention)).sum(-1)[:, :, p:]
    masses = torch.matmul(attention, _const(keys, attention))[
        :, :, p:
    ]  # [B, H, N, 2] per patch query
    distance = (weighted / torch.maximum(masses[..., 1], tiny)).mean(-1)
    patch_stats = {
        "attention_distance": distance,
        "prefix_mass": masses[..., 0].mean(-1),
        # Every (T+1)-th entry of the flattened matrix is the diagonal: one strided Slice.
        "patch_self": attention.flatten(-2)[:, :, :: t + 1][:, :, p:].mean(-1),
    }
    if not class_token:
        return patch_stats

    cls = attention[:, :, 0, p:]
    q = cls / torch.maximum(cls.sum(-1, keepdim=True), tiny)
    entropy = -(q * torch.log(torch.maximum(q, tiny))).sum(-1)
    ordered, _ = torch.sort(q, dim=-1, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered
    reached = before < CONCENTRATION_MASS - MASS_TOLERANCE
    concentration = reached.to(attention.dtype).sum(-1) / n
    return {
        "cls_entropy": entropy,
        "attention_distance": patch_stats["attention_distance"],
        "prefix_mass": patch_stats["prefix_mass"],
        "cls_self": attention[:, :, 0, 0],
        "patch_self": patch_stats["patch_self"],
        "concentration_60": concentration,
        "cls_max": cls.amax(-1),
    }


def _const(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.from_numpy(values).to(like.device, like.dtype)
