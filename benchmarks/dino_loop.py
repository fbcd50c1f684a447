"""A DINO-style per-image attention loop, as a user writes it: the comparison for `vit-attn run`.

Like facebookresearch/dino's `visualize_attention.py`: eager timm, one image per forward, a
forward hook on the last block's attention (fused attention off), the CLS row per head
upsampled to pixels, one matplotlib PNG per head (`plt.imsave`), plus the DINO mass-threshold
mask (the smallest set of patches holding 60% of the head-mean map) as one more PNG. Timed as
a whole process by the caller (imports included).

    python benchmarks/dino_loop.py IMAGES_FOLDER OUT_FOLDER --model vit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("images", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--threshold", type=float, default=0.6)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    for module in model.modules():  # the explicit softmax path, so the hook sees probabilities
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    captured: dict[str, torch.Tensor] = {}
    model.blocks[-1].attn.attn_drop.register_forward_hook(
        lambda m, i, o: captured.__setitem__("attn", i[0])
    )
    transform = create_transform(**resolve_data_config({}, model=model))
    patch = model.patch_embed.patch_size[0]
    gh, gw = model.patch_embed.grid_size
    prefix = model.num_prefix_tokens
    args.out.mkdir(parents=True, exist_ok=True)
    paths = sorted(q for q in args.images.iterdir() if q.suffix.lower() in (".png", ".jpg"))
    for path in paths:
        img = transform(Image.open(path).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            model(img)
        attn = captured["attn"][0, :, 0, prefix:].reshape(-1, gh, gw)  # [heads, gh, gw]
        pixels = torch.nn.functional.interpolate(attn[None], scale_factor=patch, mode="nearest")[0]
        pixels = pixels.numpy()
        for head in range(pixels.shape[0]):
            plt.imsave(args.out / f"{path.stem}_attn-head{head}.png", pixels[head], format="png")
        # DINO's threshold: keep the largest patches until they hold `threshold` of the mass.
        mean = attn.mean(0).flatten()
        val, idx = torch.sort(mean / mean.sum())
        keep = torch.cumsum(val, 0) > 1 - args.threshold
        mask = torch.zeros_like(mean, dtype=torch.bool)
        mask[idx] = keep
        mask_px = np.kron(mask.reshape(gh, gw).numpy(), np.ones((patch, patch)))
        plt.imsave(args.out / f"{path.stem}_mask.png", mask_px, cmap="gray", format="png")
    print(f"{len(paths)} images", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
