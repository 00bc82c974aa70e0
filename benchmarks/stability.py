"""Does a model leave the noisy input early, on every seed? The first steps of configs/cpu.yaml's recipe.

Some runs of the first NAF block sat exactly at the identity for a thousand steps: a constant
channel grew in the last decoder block until the output LayerNorm saw nothing else
(docs/method.md "Network"). This trains a block variant for a few hundred steps on several
seeds (plain loop, one thread, the ablation's data: a pool of camera-noise draws of the
training photos) with cpu.yaml's schedule (AdamW 2e-3, 200 warm-up steps, cosine over 2,500,
clipping at 1, batch 8 as each of its two workers) and prints, per seed, validation PSNR of
the direct prediction every 100 steps (45 validation blocks) and the largest channel mean
of the last decoder block at the end (a healthy network keeps it near 1).

    python benchmarks/stability.py --variants naf:shift,linear naf:scale,sigmoid --seeds 0 1 2 --steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation import CANDIDATES, Pool, eval_blocks  # noqa: E402
from pipeline.demo_data import VAL_PHOTOS  # noqa: E402
from pipeline.diffusion import sample  # noqa: E402
from pipeline.metrics import psnr  # noqa: E402
from pipeline.model import UNet  # noqa: E402
from pipeline.noise import TRAIN_CAMERA  # noqa: E402
from pipeline.step import train_step  # noqa: E402

LR, WARMUP, TOTAL, BATCH, T = 2e-3, 200, 2500, 8, 1000


def variant_config(spec: str):
    """``naf:shift,linear`` -> naf16 with that time conditioning and channel attention;
    a third item ``no-out-norm`` drops the LayerNorm before the last conv."""
    _, _, rest = spec.partition(":")
    time_conditioning, attention, *extra = rest.split(",")
    if extra not in ([], ["no-out-norm"]):
        raise SystemExit(f"unknown variant options {extra} in {spec!r}")
    return replace(CANDIDATES["naf16"], time_conditioning=time_conditioning, channel_attention=attention,
                   output_norm=not extra)


def run(spec: str, seed: int, steps: int, batch: int = BATCH) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet(variant_config(spec))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=1e-4)
    pool = Pool(rng)
    blocks = eval_blocks(VAL_PHOTOS, camera=TRAIN_CAMERA, blocks=3)
    clean = np.stack([c for c, _, _ in blocks])
    noisy = torch.from_numpy(np.stack([n for _, n, _ in blocks])).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def val_psnr() -> float:
        model.eval()
        out = sample(model, noisy, T=T, steps=1, sampler="direct").clamp(0, 1)
        model.train()
        return float(np.mean([psnr(c, o) for c, o in zip(clean, out.permute(0, 2, 3, 1).double().numpy())]))

    curve = [val_psnr()]
    for step in range(1, steps + 1):
        lr = LR * min(1.0, step / WARMUP) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / TOTAL)))
        for group in opt.param_groups:
            group["lr"] = lr
        target, degraded = pool.batch(batch, 64)
        # The shipped step; no scheduler (the learning rate is set above) and no EMA (the raw model is probed).
        train_step(model=model, optimizer=opt, clean=target, noisy=degraded, T=T, kind="charbonnier", grad_clip=1.0)
        if step % 100 == 0:
            curve.append(val_psnr())
    last = {}
    model.up_blocks[-1][-1].register_forward_hook(lambda module, args, out: last.update(out=out))
    with torch.no_grad():
        model(noisy, 1.0)
    return {"variant": spec, "seed": seed, "val_direct_every_100": [round(v, 2) for v in curve],
            "noisy": round(float(np.mean([psnr(c, n) for c, n, _ in blocks])), 2),
            "last_block_max_channel_mean": float(last["out"].mean(dim=(0, 2, 3)).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["naf:shift,linear", "naf:scale,sigmoid"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=BATCH, help="16 = the global batch of cpu.yaml's two workers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for spec in args.variants:
        for seed in args.seeds:
            print(json.dumps({**run(spec, seed, args.steps, args.batch), "batch": args.batch}), flush=True)


if __name__ == "__main__":
    main()
