"""Dataset-scale analysis of a store: select images, compute and summarise per-head statistics.

Everything reads the store lazily through xarray/dask (`store.open_dataset`), one dask chunk
per batch, so summaries of a million-image store stream through memory. The statistics are
defined in `vit_attn.stats`; this module only moves them around. Plots use matplotlib's
Agg backend, imported when a plot is asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import StoreError
from .remote import zarr_store
from .stats import (
    STAT_NAMES,
    STAT_UNITS,
    attention_stats,
    max_distance,
    patch_distances,
    stat_names_for,
)
from .store import (
    STATUS_OK,
    STATUS_PENDING,
    array,
    consolidate,
    find_image,
    is_consolidated,
    open_dataset,
)

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

PathLike = str | os.PathLike[str]
SUMMARY_PERCENTILES = (5, 50, 95)
# `vit-attn show --normalize dataset`: the colour scale's top is this percentile over images
# of each (layer, head)'s CLS-map peak, so a few outliers do not wash every image out.
DATASET_SCALE_PERCENTILE = 99


# --------------------------------------------------------------------------- images


def image_index(ds: xr.Dataset, image: str | int) -> int:
    """The position of an image given by its index or its path as listed in the store."""
    return find_image(ds.sizes["image"], image, lambda: np.asarray(ds["image_path"].values))


def select_image(ds: xr.Dataset, image: str | int) -> xr.Dataset:
    """One image of the store (by index or listed path) as a Dataset without the image dim."""
    return ds.isel(image=image_index(ds, image))


def ok_images(ds: xr.Dataset) -> np.ndarray:
    """Indices of the images with status 1 (their data is real)."""
    return np.flatnonzero(np.asarray(ds["status"].values) == STATUS_OK)


# --------------------------------------------------------------------------- statistics


def _layout(ds: xr.Dataset) -> tuple[int, tuple[int, int], tuple[int, int]]:
    model = ds.attrs.get("model", {})
    try:
        grid, patch = model["grid"], model["patch_size"]
        return int(model["num_prefix_tokens"]), (grid[0], grid[1]), (patch[0], patch[1])
    except KeyError as exc:
        raise StoreError(
            f"the store's `model` attribute lacks {exc}; is it a vit-attention-store?"
        ) from None


def has_class_token(ds: xr.Dataset) -> bool:
    """Whether the store's model has a class token (stores before `token_roles`: any prefix)."""
    roles = ds.attrs.get("token_roles")
    if isinstance(roles, dict) and "has_class_token" in roles:
        return bool(roles["has_class_token"])
    return _layout(ds)[0] >= 1


def stat_names(ds: xr.Dataset) -> list[str]:
    """The statistics present in a Dataset, in `STAT_NAMES` order."""
    return [s for s in STAT_NAMES if s in ds.data_vars]


def compute_stats_from_attention(
    store: PathLike, write: bool = False, storage_options: Mapping[str, Any] | None = None
) -> xr.Dataset:
    """The statistics of a store that holds full `attention`, lazily, one task per batch.

    Computed in float64 from the stored (float16) matrices with `stats.attention_stats`;
    images that are not ok hold 0, like every data array of the store.

    Args:
        store: path of a store made with `attention.full: true`.
        write: also store them as arrays `(image, layer, head)` float32, chunked by batch,
            as a run with `attention.stats: true` would have. Refused while images are
            pending (a resumed run would not write them) or when they exist already.
        storage_options: fsspec options of a store on object storage.

    Returns:
        A Dataset with one (image, layer, head) variable per statistic (dask-backed unless
        written, then read back from the store).
    """
    import dask.array as da
    import xarray as xr

    ds = open_dataset(store, storage_options=storage_options)
    if "attention" not in ds.data_vars:
        raise StoreError(
            f"{store} holds no full `attention`: run with attention.full: true, or attention.stats: true"
        )
    num_prefix, grid, patch_size = _layout(ds)
    class_token = has_class_token(ds)
    names = stat_names_for(class_token)
    att = ds["attention"].data
    status = ds["status"].data.rechunk((att.chunks[0],))
    n_layers, n_heads = att.shape[1], att.shape[2]

    def block(a: np.ndarray, s: np.ndarray) -> np.ndarray:
        out = np.zeros((a.shape[0], n_layers, n_heads, len(names)), np.float32)
        for i in np.flatnonzero(
            s[:, 0, 0, 0, 0] == STATUS_OK
        ):  # one image at a time: float64 copies stay small
            values = attention_stats(a[i], num_prefix, grid, patch_size, class_token)
            out[i] = np.stack([values[k] for k in names], axis=-1)
        return out

    stacked = da.map_blocks(
        block,
        att,
        status[:, None, None, None, None],
        drop_axis=[3, 4],
        new_axis=[3],
        chunks=(att.chunks[0], (n_layers,), (n_heads,), (len(names),)),
        dtype=np.float32,
    )
    dims = ("image", "layer", "head")
    result = xr.Dataset(
        {name: (dims, stacked[..., k]) for k, name in enumerate(names)},
        coords={"layer": ds["layer"], "head": ds["head"]},
    )
    if not write:
        return result
    import uuid

    from .lock import lock_for

    # A run resuming this store meanwhile would have its run id overwritten by the root
    # metadata rewritten here (and its statistics go stale): hold the store's lock, as a run does.
    stale = float(
        ((ds.attrs.get("config") or {}).get("output") or {}).get("lock_stale_seconds", 120)
    )
    lock = lock_for(store, f"stats-{uuid.uuid4().hex}", stale, storage_options)
    lock.acquire()
    try:
        with_lock = open_dataset(store, storage_options=storage_options)  # as it is now
        _write_stats(store, with_lock, result, storage_options)
    finally:
        lock.release()
    return open_dataset(store, storage_options=storage_options)[list(names)]


def _write_stats(
    store: PathLike,
    ds: xr.Dataset,
    result: xr.Dataset,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    import dask.array as da
    import zarr

    if (np.asarray(ds["status"].values) == STATUS_PENDING).any():
        raise StoreError(
            f"{store} still has pending images; finish the run before writing statistics into it"
        )
    present = stat_names(ds)
    if present:
        raise StoreError(f"{store} already holds statistics {present}")
    group = zarr.open_group(zarr_store(store, storage_options), mode="r+")
    batch = array(group, "status").chunks[0]
    targets: list[Any] = []
    names = [str(n) for n in result.data_vars]
    for name in names:
        targets.append(
            group.create_array(
                name,
                shape=result[name].shape,
                dtype="float32",
                chunks=(batch, *result[name].shape[1:]),
                fill_value=0,
                dimension_names=("image", "layer", "head"),
            )
        )
    # Dask chunks are batches, so every chunk has one writer and needs no lock.
    da.store([result[n].data.rechunk({0: batch}) for n in names], targets, lock=False)
    group.attrs["stat_units"] = dict(STAT_UNITS)
    if is_consolidated(store, storage_options):
        consolidate(store, storage_options)


def summarise(
    ds: xr.Dataset,
    stats: Sequence[str] | None = None,
    percentiles: Sequence[float] = SUMMARY_PERCENTILES,
) -> pd.DataFrame:
    """Per (stat, layer, head): count, mean, std (ddof 0) and percentiles over the ok images.

    Lazy until one `dask.compute` at the end; percentiles are exact (each (layer, head)
    column over all images is one chunk, 4 bytes per image).

    Returns:
        A DataFrame indexed by (stat, layer, head), sorted, with columns n, mean, std, p5,
        p50, p95 (one `p` column per entry of `percentiles`).
    """
    import dask
    import pandas as pd

    names = list(stats) if stats is not None else stat_names(ds)
    if stats is not None and not names:
        raise ValueError("stats: an empty list; give statistic names, or None for all stored")
    not_stats = [s for s in names if s in ds.data_vars and ds[s].dims != ("image", "layer", "head")]
    if not_stats:
        raise ValueError(
            f"stats: {not_stats} are not statistics (dims image, layer, head); "
            f"this store has {stat_names(ds)}"
        )
    bad = [p for p in percentiles if not 0 <= p <= 100]
    if bad:
        raise ValueError(f"percentiles: {bad} are outside 0..100")
    missing = [s for s in names if s not in ds.data_vars]
    if not names or missing:
        raise StoreError(
            f"the store holds no statistics {missing or list(STAT_NAMES)}: run with attention.stats: true, "
            "or compute them from full attention (vit-attn stats does so when `attention` is stored)"
        )
    ok = ok_images(ds)
    if ok.size == 0:
        raise StoreError("the store has no processed images (status 1) to summarise")
    sub = ds[names].isel(image=ok)
    if sub.chunks:  # dask-backed: exact quantiles need the image dim in one chunk
        sub = sub.chunk({"image": -1, "layer": 1, "head": -1})
    q = [p / 100.0 for p in percentiles]
    mean, std, quant = dask.compute(
        sub.mean("image"), sub.std("image"), sub.quantile(q, dim="image")
    )
    rows = []
    for name in names:
        for li, layer in enumerate(ds["layer"].values.tolist()):
            for hi, head in enumerate(ds["head"].values.tolist()):
                row: dict[str, Any] = {
                    "stat": name,
                    "layer": layer,
                    "head": head,
                    "n": int(ok.size),
                }
                row["mean"] = float(mean[name].values[li, hi])
                row["std"] = float(std[name].values[li, hi])
                for k, p in enumerate(percentiles):
                    row[f"p{p:g}"] = float(quant[name].values[k, li, hi])
                rows.append(row)
    # Sorted (stats alphabetically): label lookups on an unsorted MultiIndex are slow and warn.
    return pd.DataFrame(rows).set_index(["stat", "layer", "head"]).sort_index()


def layer_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer: every statistic's mean over heads (and images); rows layers, columns stats."""
    means = table["mean"].groupby(level=["stat", "layer"]).mean().unstack("stat")
    return means[[s for s in STAT_NAMES if s in means.columns]]


def markdown_layer_means(table: pd.DataFrame) -> str:
    """`layer_means` as a Markdown table (units in the header), for docs and reports."""
    means = layer_means(table)
    header = "| block | " + " | ".join(f"{s} [{STAT_UNITS[s]}]" for s in means.columns) + " |"
    lines = [header, "|---" * (len(means.columns) + 1) + "|"]
    for layer, row in means.iterrows():
        lines.append(f"| {layer} | " + " | ".join(_num(float(v)) for v in row) + " |")
    return "\n".join(lines)


def format_table(table: pd.DataFrame) -> str:
    """The summary as text: one row per (layer, head), `mean (p5-p95)` per statistic."""
    names = [s for s in STAT_NAMES if s in table.index.get_level_values("stat")]
    pcols = [c for c in table.columns if c.startswith("p")]
    lo, hi = (pcols[0], pcols[-1]) if pcols else ("mean", "mean")
    cells = {s: table.loc[s] for s in names}
    first = cells[names[0]]
    header = ["layer", "head", *names]
    lines = [header]
    for layer, head in first.index:
        row = [str(layer), str(head)]
        for s in names:
            r = cells[s].loc[(layer, head)]
            row.append(f"{_num(r['mean'])} ({_num(r[lo])}-{_num(r[hi])})")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    units = ", ".join(f"{s} [{STAT_UNITS[s]}]" for s in names)
    n = int(first["n"].iloc[0])
    return "\n".join([f"per (layer, head) over {n} ok images: mean ({lo}-{hi}); {units}", *text])


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def dataset_scale(
    ds: xr.Dataset,
    layer_index: int,
    percentile: float = DATASET_SCALE_PERCENTILE,
    map_name: str = "cls_attention",
    latent: int | None = None,
) -> np.ndarray:
    """[heads] top of a dataset-wide colour scale for one stored layer (position in `layer`).

    The `percentile` over ok images of each head's map peak: for `cls_attention` read from
    the stored `cls_max` statistic when present, else computed from the map array (a full
    read). `pool_attention` has no layer (`layer_index` is ignored); with several latent
    queries the peak is of latent `latent`, or of their mean when None, as `show` draws it.
    """
    n_layers = ds.sizes.get("layer", 0)
    if map_name != "pool_attention" and n_layers and not -n_layers <= layer_index < n_layers:
        raise IndexError(
            f"layer_index {layer_index}: the store holds {n_layers} layers (0..{n_layers - 1}, "
            "positions in `layer`, not block numbers)"
        )
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile {percentile} is outside 0..100")
    ok = ok_images(ds)
    if ok.size == 0:
        raise StoreError("the store has no processed images (status 1) for a dataset-wide scale")
    if map_name == "cls_attention" and "cls_max" in ds.data_vars:
        peaks = ds["cls_max"].isel(layer=layer_index, image=ok)
    else:
        maps = ds[map_name].isel(image=ok)
        if "layer" in maps.dims:
            maps = maps.isel(layer=layer_index)
        if "latent" in maps.dims:
            maps = maps.mean("latent") if latent is None else maps.isel(latent=latent)
        peaks = maps.max(("y", "x"))
    values = np.asarray(peaks.values, dtype=np.float64)  # [images, heads]
    return np.percentile(values, percentile, axis=0)


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention_distance(table: pd.DataFrame, ds: xr.Dataset, path: PathLike) -> Path:
    """Mean attention distance of every head against block index (the ViT paper's Figure 7).

    Dots are heads (dataset means), the line their mean; dashed: the distance under uniform
    attention over patches, and the grid's largest centre-to-centre distance.
    """
    plt = _pyplot()
    _, grid, patch_size = _layout(ds)
    d = table.loc["attention_distance", "mean"].unstack("head")  # rows layers, cols heads
    layers = d.index.to_numpy()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    cmap = plt.get_cmap("tab20", max(d.shape[1], 1))
    for k, head in enumerate(d.columns):
        ax.scatter(layers, d[head].to_numpy(), s=16, color=cmap(k), label=f"head {head}", zorder=3)
    ax.plot(
        layers, d.mean(axis=1).to_numpy(), color="black", lw=1.2, label="mean over heads", zorder=2
    )
    uniform = float(patch_distances(grid, patch_size).mean())
    ax.axhline(uniform, color="grey", ls="--", lw=1, label=f"uniform attention ({uniform:.0f} px)")
    ax.axhline(max_distance(grid, patch_size), color="grey", ls=":", lw=1, label="largest possible")
    ax.set_xlabel("block (network depth)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(layers)
    ax.set_ylim(bottom=0)
    model = ds.attrs.get("model", {})
    n = int(table["n"].iloc[0])
    ax.set_title(f"{model.get('name', '')}: attention distance per head ({n} images)", fontsize=10)
    ax.legend(fontsize=6, ncol=2, loc="best", frameon=False)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_stat_heatmap(
    table: pd.DataFrame, stat: str, path: PathLike, ds: xr.Dataset | None = None
) -> Path:
    """A layer x head heatmap of one statistic's dataset mean (cls_entropy: against ln N)."""
    plt = _pyplot()
    m = table.loc[stat, "mean"].unstack("head")
    fig, ax = plt.subplots(
        figsize=(max(3.6, 1.6 + 0.45 * m.shape[1]), 1.4 + 0.4 * m.shape[0]), dpi=120
    )
    vmax = None
    title = f"{stat} [{STAT_UNITS.get(stat, '')}], dataset mean"
    if stat == "cls_entropy" and ds is not None:
        _, grid, _ = _layout(ds)
        vmax = math.log(grid[0] * grid[1])
        title += f"\n(uniform over patches: ln {grid[0] * grid[1]} = {vmax:.2f})"
    image = ax.imshow(m.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xticks(range(m.shape[1]), [str(h) for h in m.columns])
    ax.set_yticks(range(m.shape[0]), [str(layer) for layer in m.index])
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.85)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(table: pd.DataFrame, ds: xr.Dataset, folder: PathLike) -> list[Path]:
    """Every plot of `vit-attn stats --plots`: the distance figure and one heatmap per stat."""
    folder = Path(folder)
    names = set(table.index.get_level_values("stat"))
    out = []
    if "attention_distance" in names:
        out.append(plot_attention_distance(table, ds, folder / "attention_distance.png"))
    for stat in STAT_NAMES:
        if stat in names:
            out.append(plot_stat_heatmap(table, stat, folder / f"heatmap_{stat}.png", ds))
    return out
