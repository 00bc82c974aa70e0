"""Train the ``tiny`` preset for a few minutes on CPU and compare the samplers.

Training pairs are random 64x64 crops of images bundled with scikit-image,
with fresh synthetic signal-dependent noise each step (Gaussian read noise
plus a shot-noise term proportional to the signal). The held-out pair is a
different image (chelsea) with fixed noise. Prints the PSNR/SSIM of the noisy
input and of the direct, origin and improved samplers.

    python benchmarks/train_tiny.py --minutes 3 --seed 0
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import numpy as np
import torch
from skimage import data as skdata
from skimage.util import img_as_float32

from pipeline.checkpoint import save_checkpoint
from pipeline.diffusion import sample
from pipeline.tiling import denoise_tiled
from pipeline.metrics import psnr, ssim
from pipeline.model import build_model, model_stats
from pipeline.step import train_step

TRAIN_IMAGES = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
HELD_OUT_IMAGE = "chelsea"


def load_image(name: str) -> torch.Tensor:
    """A bundled scikit-image picture as a (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(img_as_float32(getattr(skdata, name)())).permute(2, 0, 1).contiguous()


def add_noise(clean: torch.Tensor, read_sigma: float, shot_gain: float, generator: torch.Generator) -> torch.Tensor:
    """Variance read_sigma^2 + shot_gain * signal: brighter pixels are noisier, as in real sensors."""
    std = torch.sqrt(read_sigma**2 + shot_gain * clean)
    return (clean + std * torch.randn(clean.shape, generator=generator)).clamp(0, 1)


def random_crops(images: list[torch.Tensor], batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    crops = []
    for _ in range(batch):
        img = images[int(torch.randint(len(images), (1,), generator=generator))]
        y = int(torch.randint(img.shape[1] - size + 1, (1,), generator=generator))
        x = int(torch.randint(img.shape[2] - size + 1, (1,), generator=generator))
        crop = img[:, y : y + size, x : x + size]
        k = int(torch.randint(8, (1,), generator=generator))
        crop = torch.rot90(crop, k % 4, dims=(1, 2))
        crops.append(crop.flip(2) if k >= 4 else crop)
    return torch.stack(crops)


def to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 1).permute(1, 2, 0).double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--T", type=int, default=100, help="training diffusion steps")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps K for origin/improved")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--read-sigma", type=float, default=0.05)
    parser.add_argument("--shot-gain", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="directory to save the trained checkpoint in")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    train_images = [load_image(name) for name in TRAIN_IMAGES]
    held_clean = load_image(HELD_OUT_IMAGE)
    held_noisy = add_noise(held_clean, args.read_sigma, args.shot_gain, torch.Generator().manual_seed(12345))

    model = build_model("tiny")
    stats = model_stats(model)
    print(f"tiny: {stats['params'] / 1e6:.2f}M params, {stats['macs_per_pixel'] / 1e3:.0f}k MACs/pixel")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    budget = args.minutes * 60.0
    start = last_report = time.perf_counter()
    step, recent = 0, []
    while (elapsed := time.perf_counter() - start) < budget:
        # Warm-up by step, then cosine decay over the wall-clock budget.
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        for group in opt.param_groups:
            group["lr"] = lr
        clean = random_crops(train_images, args.batch, args.patch, gen)
        noisy = add_noise(clean, args.read_sigma, args.shot_gain, gen)
        # The shipped step; no scheduler (the learning rate above follows wall-clock time) and no EMA.
        loss = train_step(model=model, optimizer=opt, clean=clean, noisy=noisy, T=args.T, generator=gen,
                          grad_clip=1.0)
        recent.append(loss.item())
        step += 1
        if time.perf_counter() - last_report > 20:
            last_report = time.perf_counter()
            rate = step * args.batch / (last_report - start)
            print(f"step {step:5d}  loss {np.mean(recent):.4f}  lr {lr:.2e}  {rate:.1f} patches/s", flush=True)
            recent = []
    train_s = time.perf_counter() - start
    print(f"trained {step} steps ({step * args.batch} patches) in {train_s:.0f} s, {step * args.batch / train_s:.1f} patches/s")

    model.eval()
    y = held_noisy[None]
    ref = to_hwc(held_clean)
    rows = [("noisy input", held_noisy)]
    rows.append(("direct (1 call)", sample(model, y, T=args.T, sampler="direct")[0]))
    for k in sorted({args.steps // 2, args.steps, 2 * args.steps}):
        if 1 <= k <= args.T:
            rows.append((f"origin K={k}", sample(model, y, T=args.T, steps=k, sampler="origin")[0]))
            rows.append((f"improved K={k}", sample(model, y, T=args.T, steps=k, sampler="improved")[0]))
    print(f"\nheld-out {HELD_OUT_IMAGE} {tuple(held_clean.shape[1:])}, T={args.T}")
    print(f"{'':18s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for name, img in rows:
        print(f"{name:18s} {psnr(ref, to_hwc(img)):8.2f} {ssim(ref, to_hwc(img)):7.4f}")

    denoise = functools.partial(sample, model, T=args.T, steps=args.steps, sampler="improved")
    whole = denoise(y)
    for tile, overlap in ((64, 32), (128, 32)):
        diff = (denoise_tiled(denoise, y, tile=tile, overlap=overlap) - whole).abs()
        print(f"tiled vs whole (tile {tile}, overlap {overlap}): max abs diff {diff.max():.2e}, mean {diff.mean():.2e}")

    if args.out:
        save_checkpoint(args.out, model, T=args.T, extra={"steps_trained": step, "seed": args.seed})
        print(f"checkpoint written to {args.out}")


if __name__ == "__main__":
    main()
