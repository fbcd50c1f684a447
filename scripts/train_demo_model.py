"""Train the demo ViT shipped in ``pipeline/vit_attn/demo/assets/`` on procedural images (CPU, a few minutes).

``make demo`` has to show believable attention offline, where pretrained timm weights cannot be
downloaded and a random-init ViT attends uniformly. This script trains a small timm ViT on the
images of :mod:`vit_attn.demo.shapes` (one disc/square/triangle/cross on a cluttered background)
with cross-entropy on the CLS token plus an auxiliary per-patch class probe on the final patch
tokens (``--seg-weight``; the probe is discarded and attention is never supervised), then
measures, with an independent eager model, how much of the last block's head-mean CLS
attention lands on the object. ``--init`` continues from an earlier checkpoint (a warm
restart), so the shipped model can be the last of a chain of runs; each json records its
parent's command and history.

Writes ``.../assets/demo_vit.safetensors`` (fp32 state dict) and ``.../assets/demo_vit.json`` (recipe,
metrics, versions, the command to reproduce). The recipe is deterministic for a given torch
build and thread count (``torch.set_num_threads(2)``; ``--threads`` changes it).

Inputs are exactly what timm's eval transform makes of each generated image: the geometric part
(resize the shorter side to ``floor(S / crop_pct)``, centre crop ``S``) is applied with timm's
own transform objects and cached as uint8; ToTensor + Normalize are applied per batch (checked
equal to the full transform at start). Training augments only with flips and 90-degree
rotations of those inputs (the classes are invariant to them).

Attention metric ("object attention ratio"): per held-out image, the head-mean CLS row of the
last block over the patch tokens, renormalised to sum 1 over patches; the object weight of a
patch is the fraction of its pixels that are object (the mask put through the same resize/crop,
then averaged per patch). ``attn_on_object = sum(a * w)``, ``area_fraction = mean(w)``; the
ratio is ``mean(attn_on_object) / mean(area_fraction)`` over the held-out set. The json also
holds the mean of per-image ratios, the raw (not renormalised) variant, and the binary variant
(a patch is object when >= 50% of its pixels are).

Usage: ``.venv/bin/python scripts/train_demo_model.py`` (the defaults are the first stage of the
shipped recipe); ``.../assets/demo_vit.json`` holds the exact commands of every stage
(``command``, then ``init.parent.command`` and so on).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

import timm  # noqa: E402
import timm.layers  # noqa: E402
from PIL import Image  # noqa: E402

from vit_attn.demo.shapes import CLASSES, DEFAULT_SIZES, RADIUS_FRAC, render_index  # noqa: E402

MODEL_NAME = "vit_tiny_patch16_224"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument(
        "--radius-frac",
        type=float,
        nargs=2,
        default=RADIUS_FRAC,
        metavar=("LO", "HI"),
        help="object size range of the generated images (vit_attn.demo.shapes.RADIUS_FRAC)",
    )
    p.add_argument("--n-train", type=int, default=32000, help="distinct training images")
    p.add_argument("--n-val", type=int, default=1000, help="held-out images (another seed)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument(
        "--seg-weight",
        type=float,
        default=1.0,
        help="weight of an auxiliary per-patch loss on the final patch tokens: a linear "
        "probe (used only in training, not shipped) predicts background or the "
        "object's class for each patch; 0 = off",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint (a .safetensors written by this script, with its "
        ".json beside it) instead of random init: a warm restart with a new warmup and "
        "cosine schedule; the json records the chain of commands",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed (data stream seed*2+1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", type=Path, default=ROOT / "pipeline" / "vit_attn" / "demo" / "assets" / "demo_vit"
    )
    return p.parse_args(argv)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_kwargs(a) -> dict:
    return dict(
        patch_size=a.patch_size,
        embed_dim=a.embed_dim,
        depth=a.depth,
        num_heads=a.num_heads,
        global_pool="token",
    )


def build_model(a, fused: bool):
    timm.layers.set_fused_attn(fused)
    try:
        m = timm.create_model(
            MODEL_NAME,
            pretrained=False,
            num_classes=len(CLASSES),
            img_size=a.img_size,
            **model_kwargs(a),
        )
    finally:
        timm.layers.set_fused_attn(True)
    return m


def eval_transform(model, img_size: int):
    cfg = timm.data.resolve_data_config(args={"input_size": (3, img_size, img_size)}, model=model)
    return cfg, timm.data.create_transform(**cfg)


# ------------------------------------------------------------------------------ data

_WORKER = {}


def _init_worker(img_size: int, patch: int, radius_frac=RADIUS_FRAC):
    torch.set_num_threads(1)
    _WORKER["radius_frac"] = tuple(radius_frac)
    m = timm.create_model(
        MODEL_NAME,
        pretrained=False,
        num_classes=len(CLASSES),
        img_size=img_size,
        patch_size=patch,
        embed_dim=48,
        depth=1,
        num_heads=1,
    )
    cfg, tf = eval_transform(m, img_size)
    _WORKER["geo"] = tf.transforms[:-2]  # Resize / ResizeKeepRatio + CenterCrop
    _WORKER["patch"] = patch


def _make(args):
    seed, idx = args
    s = render_index(seed, idx, DEFAULT_SIZES, radius_frac=_WORKER["radius_frac"])
    img = s.image
    mimg = Image.fromarray(s.mask.astype(np.uint8) * 255, "L")
    for t in _WORKER["geo"]:
        img = t(img)
        mimg = t(mimg)
    x = np.asarray(img, np.uint8)
    m = np.asarray(mimg, np.float32) / 255.0
    p = _WORKER["patch"]
    gh, gw = m.shape[0] // p, m.shape[1] // p
    w = np.clip(m, 0, 1).reshape(gh, p, gw, p).mean((1, 3))
    return x, w.astype(np.float32), s.label


def make_set(seed: int, n: int, img_size: int, patch: int, workers: int, radius_frac=RADIUS_FRAC):
    jobs = [(seed, i) for i in range(n)]
    with mp.get_context("fork").Pool(workers, _init_worker, (img_size, patch, radius_frac)) as pool:
        out = pool.map(_make, jobs, chunksize=64)
    x = torch.from_numpy(np.stack([o[0] for o in out]))  # (n, S, S, 3) uint8
    w = torch.from_numpy(np.stack([o[1] for o in out]))  # (n, gh, gw) object weight per patch
    y = torch.tensor([o[2] for o in out], dtype=torch.long)
    return x, w, y


def to_input(xu8: torch.Tensor, mean, std) -> torch.Tensor:
    x = xu8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


# ------------------------------------------------------------------------------ metrics


@torch.no_grad()
def evaluate(model, x, w, y, mean, std, bs=250):
    """Accuracy and the CLS-attention-on-object statistics of the last block (eager softmax)."""
    model.eval()
    caught = []
    h = model.blocks[-1].attn.attn_drop.register_forward_hook(
        lambda mod, inp, out: caught.append(inp[0].detach())
    )
    npt = model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size
    correct = 0
    on, on_raw, on_bin, area, area_bin, ratios = [], [], [], [], [], []
    try:
        for i in range(0, len(x), bs):
            caught.clear()
            logits = model(to_input(x[i : i + bs], mean, std))
            correct += (logits.argmax(1) == y[i : i + bs]).sum().item()
            assert len(caught) == 1, "no softmax captured: build the model with fused attention off"
            att = caught[0]  # (B, heads, N, N)
            cls_raw = att[:, :, 0, npt:].mean(1)  # head mean, CLS query, patch keys
            assert cls_raw.shape[1] == gh * gw
            cls = cls_raw / cls_raw.sum(1, keepdim=True)
            ww = w[i : i + bs].reshape(len(cls), -1)
            wb = (ww >= 0.5).float()
            on.append((cls * ww).sum(1))
            on_raw.append((cls_raw * ww).sum(1))
            on_bin.append((cls * wb).sum(1))
            area.append(ww.mean(1))
            area_bin.append(wb.mean(1))
            ratios.append((cls * ww).sum(1) / ww.mean(1))
    finally:
        h.remove()
    on, on_raw, on_bin = torch.cat(on), torch.cat(on_raw), torch.cat(on_bin)
    area, area_bin, ratios = torch.cat(area), torch.cat(area_bin), torch.cat(ratios)
    return {
        "accuracy": correct / len(x),
        "attn_on_object": on.mean().item(),
        "area_fraction": area.mean().item(),
        "ratio": (on.mean() / area.mean()).item(),
        "ratio_mean_per_image": ratios.mean().item(),
        "ratio_median_per_image": ratios.median().item(),
        "ratio_raw_cls_row": (on_raw.mean() / area.mean()).item(),
        "attn_on_object_binary": on_bin.mean().item(),
        "area_fraction_binary": area_bin.mean().item(),
        "ratio_binary": (on_bin.mean() / area_bin.mean()).item(),
    }


# ------------------------------------------------------------------------------ main


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    train_seed, val_seed = 2 * a.seed + 1, 2 * a.seed + 2

    model = build_model(a, fused=True)
    init_info = None
    if a.init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(a.init)))
        parent = json.loads(a.init.with_suffix(".json").read_text())
        init_info = {
            "checkpoint": a.init.name,
            "sha256": _sha256(a.init),
            "parent": {
                k: parent.get(k)
                for k in (
                    "command",
                    "init",
                    "data",
                    "epochs",
                    "steps",
                    "heldout_accuracy",
                    "heldout_history",
                )
            },
        }
        print(f"initialised from {a.init} (held-out accuracy {parent.get('heldout_accuracy')})")
    cfg, tf = eval_transform(model, a.img_size)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    print(
        f"model {MODEL_NAME} {model_kwargs(a)} img_size={a.img_size} "
        f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
    )
    print(f"data config {cfg}")

    # The cached uint8 + per-batch normalisation must equal timm's full eval transform.
    _init_worker(a.img_size, a.patch_size, a.radius_frac)
    for i in range(4):
        s = render_index(train_seed, i, DEFAULT_SIZES, radius_frac=a.radius_frac)
        ref = tf(s.image)
        ours = to_input(torch.from_numpy(_make((train_seed, i))[0].copy())[None], mean, std)[0]
        assert torch.allclose(ref, ours, atol=1e-6), (
            "preprocessing differs from timm's eval transform"
        )

    t0 = time.time()
    xtr, wtr, ytr = make_set(
        train_seed, a.n_train, a.img_size, a.patch_size, a.threads, a.radius_frac
    )
    xva, wva, yva = make_set(val_seed, a.n_val, a.img_size, a.patch_size, a.threads, a.radius_frac)
    t_data = time.time() - t0
    print(
        f"generated {len(xtr)} train + {len(xva)} held-out images in {t_data:.1f}s; "
        f"train class counts {torch.bincount(ytr).tolist()}"
    )

    # Optional auxiliary loss: a linear probe on the final patch tokens predicts, per patch,
    # "background" or the object's class (soft target: the patch's object fraction). Dense labels
    # shorten the long plateau at chance that a ViT trained from scratch on shapes otherwise
    # shows. Attention itself is never supervised: where CLS looks is learnt from the class loss.
    seg_head = torch.nn.Linear(a.embed_dim, len(CLASSES) + 1) if a.seg_weight > 0 else None
    npt = model.num_prefix_tokens

    steps_per_epoch = len(xtr) // a.batch_size
    total = steps_per_epoch * a.epochs
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n_ in ("pos_embed", "cls_token") else decay).append(p)
    if seg_head is not None:
        no_decay += list(seg_head.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": a.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=a.lr,
    )

    def lr_at(step):
        if step < a.warmup_steps:
            return a.lr * (step + 1) / a.warmup_steps
        t = (step - a.warmup_steps) / max(1, total - a.warmup_steps)
        return a.lr * 0.5 * (1 + math.cos(math.pi * t))

    g = torch.Generator().manual_seed(a.seed)
    step = 0
    history = []
    t0 = time.time()
    for ep in range(a.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        tot_loss, tot_ok = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * a.batch_size : (b + 1) * a.batch_size]
            x = to_input(xtr[idx], mean, std)
            yb = ytr[idx]
            # Dihedral augmentation of the model inputs (classes are invariant).
            k = int(torch.randint(4, (1,), generator=g))
            x = torch.rot90(x, k, dims=(2, 3))
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            for gr in opt.param_groups:
                gr["lr"] = lr_at(step)
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
            loss = F.cross_entropy(logits, yb)
            if seg_head is not None:
                wb = torch.rot90(wtr[idx], k, dims=(1, 2))
                wb = torch.where(flip[:, None, None], wb.flip(2), wb)
                wb = wb.reshape(len(wb), -1)  # [B, N] object fraction per patch
                target = torch.zeros(*wb.shape, len(CLASSES) + 1)
                target[..., 0] = 1 - wb
                target.scatter_(
                    2, (yb + 1)[:, None, None].expand(-1, wb.shape[1], 1), wb[..., None]
                )
                pred = seg_head(feats[:, npt:])  # [B, N, 1 + classes]
                seg = F.cross_entropy(
                    pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
                )
                loss = loss + a.seg_weight * seg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tot_loss += loss.item() * len(yb)
            tot_ok += (logits.argmax(1) == yb).sum().item()
            if step % 50 == 0:
                print(f"  step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        n_seen = steps_per_epoch * a.batch_size
        msg = (
            f"epoch {ep + 1}/{a.epochs} step {step} loss {tot_loss / n_seen:.4f} "
            f"train acc {tot_ok / n_seen:.4f} ({time.time() - t0:.0f}s)"
        )
        # Held-out accuracy after every epoch (1000 images, ~2 s).
        model.eval()
        with torch.no_grad():
            acc = sum(
                (model(to_input(xva[i : i + 500], mean, std)).argmax(1) == yva[i : i + 500])
                .sum()
                .item()
                for i in range(0, len(xva), 500)
            ) / len(xva)
        msg += f" held-out acc {acc:.4f}"
        history.append(round(acc, 4))
        print(msg, flush=True)
    t_train = time.time() - t0

    # Independent eager measurement: a fresh model built with fused attention off.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    eager = build_model(a, fused=False)
    eager.load_state_dict(state)
    metrics = evaluate(eager, xva, wva, yva, mean, std)
    wall = time.time() - t_start
    print(f"held-out accuracy {metrics['accuracy']:.4f}")
    print(
        f"last-block head-mean CLS attention on object {metrics['attn_on_object']:.3f} vs area "
        f"{metrics['area_fraction']:.3f}: ratio {metrics['ratio']:.2f}x "
        f"(per-image mean {metrics['ratio_mean_per_image']:.2f}x, "
        f"binary {metrics['ratio_binary']:.2f}x)"
    )

    a.out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    weights = a.out.with_suffix(".safetensors")
    save_file(state, str(weights), metadata={"format": "pt", "timm_name": MODEL_NAME})
    cmd = "python scripts/train_demo_model.py " + " ".join(
        shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:])
    )
    info = {
        "timm_name": MODEL_NAME,
        "kwargs": model_kwargs(a),
        "num_classes": len(CLASSES),
        "img_size": a.img_size,
        "class_names": list(CLASSES),
        "create_model": (
            f"timm.create_model({MODEL_NAME!r}, pretrained=False, num_classes={len(CLASSES)}, "
            f"img_size={a.img_size}, "
            + ", ".join(f"{k}={v!r}" for k, v in model_kwargs(a).items())
            + ")"
        ),
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "preprocessing_note": (
            "timm.data.create_transform(**timm.data.resolve_data_config("
            f"args={{'input_size': (3, {a.img_size}, {a.img_size})}}, model=m))"
        ),
        "grid": list(model.patch_embed.grid_size),
        "num_prefix_tokens": model.num_prefix_tokens,
        "seed": a.seed,
        "data": {
            "generator": "vit_attn.demo.shapes.render_index",
            "train_seed": train_seed,
            "heldout_seed": val_seed,
            "sizes": [list(s) for s in DEFAULT_SIZES],
            "radius_frac": list(a.radius_frac),
            "augmentation": "random 90-degree rotation (per batch) and horizontal flip (per image) of the model input",
        },
        "train_images": len(xtr),
        "heldout_images": len(xva),
        "epochs": a.epochs,
        "steps": step,
        "batch_size": a.batch_size,
        "optimizer": {
            "name": "AdamW",
            "lr": a.lr,
            "weight_decay": a.weight_decay,
            "warmup_steps": a.warmup_steps,
            "schedule": "linear warmup, cosine to 0",
            "grad_clip": 1.0,
            "loss": "cross_entropy on the CLS token logits",
            "aux_objectness_loss_weight": a.seg_weight,
            "aux_objectness_loss": (
                "cross-entropy of a linear probe on the final patch "
                "tokens against a soft per-patch label (background: "
                "1 - object fraction, the image's class: object "
                "fraction); the probe is discarded, attention is "
                "not supervised"
            ),
        },
        "heldout_accuracy": metrics["accuracy"],
        "heldout_history": history,
        "init": init_info,
        "attention": {
            "definition": (
                "last block, head-mean softmax(q k^T * scale) row of CLS over patch tokens, "
                "renormalised over patches; patch object weight = fraction of its pixels "
                "that are object (mask through the same resize/crop); ratio = "
                "mean(sum(a*w)) / mean(mean(w)) over held-out images; *_binary: patch is "
                "object when >= 50% of its pixels are; measured on a model built with "
                "timm.layers.set_fused_attn(False), hook on blocks[-1].attn.attn_drop"
            ),
            **{k: v for k, v in metrics.items() if k != "accuracy"},
        },
        "time_s": {
            "data_generation": round(t_data, 1),
            "training": round(t_train, 1),
            "total_wall": round(wall, 1),
        },
        "threads": a.threads,
        "command": cmd.strip(),
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "weights_file": weights.name,
        "weights_dtype": "float32",
    }
    a.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {a.out.with_suffix('.json')}; "
        f"total {wall:.0f}s"
    )
    return info


if __name__ == "__main__":
    main()
