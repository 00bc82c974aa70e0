"""GPU throughput of the model itself: training samples/s and inference MP/s, fp32 vs bf16.

    python benchmarks/bench_gpu.py [--presets tiny,base] [--patch 128] [--batch 16]

Only torch is needed, so this runs on a bare GPU box. It measures the training step the
per-worker loop of pipeline/train.py runs, ``pipeline.step.train_step`` (interpolation loss,
AdamW, gradient clipping, the EMA update, bf16 autocast), and the tiled sampler the
batch-denoise job runs; Ray's overhead on top is measured on CPU by bench_train.py and
bench_denoise.py as a ratio against plain loops.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipeline.diffusion import sample  # noqa: E402
from pipeline.tiling import denoise_tiled  # noqa: E402
from pipeline.model import build_model, model_stats  # noqa: E402
from pipeline.step import train_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_rate(preset: str, device, *, dtype, patch: int, batch: int, steps: int, repeats: int) -> float:
    model = build_model(preset).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean = torch.rand(batch, 3, patch, patch, device=device)
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run():
        # The shipped step with its EMA (one more pass over the weights); the LR schedule is left
        # out, its step is host arithmetic only.
        for step in range(steps):
            train_step(model=model, optimizer=optim, clean=clean, noisy=noisy, T=1000, grad_clip=1.0, ema=ema,
                       ema_decay=0.999, step=step, autocast=autocast)

    return batch * steps / timed(run, device, repeats)


def infer_rate(preset: str, device, *, dtype, size: int, steps: int, tile: int, repeats: int) -> float:
    model = build_model(preset).to(device).eval()
    image = torch.rand(3, size, size, device=device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            denoise_tiled(lambda y: sample(model, y, T=1000, steps=steps, sampler="improved"), image,
                          tile=tile, overlap=32, batch=4)

    return size * size / 1e6 / timed(run, device, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--patch", type=int, default=128, help="training patch side")
    parser.add_argument("--batch", type=int, default=16, help="training batch")
    parser.add_argument("--size", type=int, default=2048, help="inference image side")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps K")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.backends.cudnn.benchmark = True
    print(f"device: {name}, torch {torch.__version__}; median of {args.repeats} runs")
    print(f"{'preset':6s} {'MAC/px':>8s} {'train fp32':>11s} {'train bf16':>11s} {'x':>5s} "
          f"{'infer fp32':>11s} {'infer bf16':>11s} {'x':>5s}")
    for preset in args.presets.split(","):
        macs = model_stats(build_model(preset))["macs_per_pixel"]
        train = {dt: train_rate(preset, device, dtype=dt, patch=args.patch, batch=args.batch, steps=10,
                                repeats=args.repeats) for dt in (torch.float32, torch.bfloat16)}
        infer = {dt: infer_rate(preset, device, dtype=dt, size=args.size, steps=args.steps, tile=512,
                                repeats=args.repeats) for dt in (torch.float32, torch.bfloat16)}
        f32, b16 = torch.float32, torch.bfloat16
        print(f"{preset:6s} {macs / 1e3:7.0f}k {train[f32]:8.1f} s/s {train[b16]:8.1f} s/s "
              f"{train[b16] / train[f32]:5.2f} {infer[f32]:7.2f} MP/s {infer[b16]:7.2f} MP/s "
              f"{infer[b16] / infer[f32]:5.2f}")
    print(f"train: {args.patch}x{args.patch} patches, batch {args.batch}, AdamW + clipping + EMA; "
          f"infer: {args.size}x{args.size} image, tiles 512 (overlap 32), improved sampler K={args.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
