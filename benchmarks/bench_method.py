"""Throughput of the method on this machine's CPU.

Reports, for the ``tiny`` and ``base`` presets: training (forward + backward)
samples/s at 64x64 batch 16, inference megapixels/s, MACs per pixel and the
achieved GFLOP/s (2 * MACs * pixels / s) next to what one plain large conv
achieves here, plus the cost of tiled over whole-image inference. Every
number is the median of several repeats. Not a test: it only measures.

    python benchmarks/bench_method.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from pipeline.tiling import denoise_tiled
from pipeline.model import build_model, model_stats
from pipeline.step import train_step


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_conv_gflops(repeats: int) -> float:
    """GFLOP/s of a 3x3 conv 128->128 on 1x128x256x256: what this CPU does on easy work."""
    conv = nn.Conv2d(128, 128, 3, padding=1)
    x = torch.rand(1, 128, 256, 256)
    with torch.no_grad():
        seconds = median_seconds(lambda: conv(x), repeats)
    return 2 * 128 * 128 * 9 * 256 * 256 / seconds / 1e9


def training_rate(model: nn.Module, batch: int, size: int, repeats: int) -> float:
    """Samples/s of forward + backward + optimiser step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean, noisy = torch.rand(batch, 3, size, size), torch.rand(batch, 3, size, size)

    def step() -> None:
        # The shipped step's loss and update, without clipping and EMA: GFLOP/s counts the network's work.
        train_step(model=model, optimizer=opt, clean=clean, noisy=noisy, T=1000)

    return batch / median_seconds(step, repeats)


def inference_seconds(model: nn.Module, image: torch.Tensor, repeats: int) -> float:
    t = torch.ones(image.shape[0])
    with torch.no_grad():
        return median_seconds(lambda: model(image, t), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 5
    infer_size = 128 if args.quick else 256

    ref = reference_conv_gflops(repeats)
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"reference 3x3 conv 128->128 on 1x128x256x256: {ref:.1f} GFLOP/s\n")

    header = f"{'preset':6s} {'params':>8s} {'kMAC/px':>8s} {'train smp/s':>11s} {'train GF/s':>10s} {'infer MP/s':>10s} {'infer GF/s':>10s} {'vs conv':>7s}"
    print(header)
    print("-" * len(header))
    for preset in ("tiny", "base"):
        model = build_model(preset)
        # Random weights everywhere (not the identity start) so no work is trivially skipped.
        with torch.no_grad():
            model.out_conv.weight.normal_(0, 0.01)
        stats = model_stats(model, size=256)
        mpp = stats["macs_per_pixel"]
        train = training_rate(model, batch=16, size=64, repeats=2 if preset == "base" else repeats)  # base: ~10 s/step
        image = torch.rand(1, 3, infer_size, infer_size)
        seconds = inference_seconds(model, image, repeats)
        mpix = infer_size * infer_size / seconds / 1e6
        infer_gflops = 2 * mpp * mpix * 1e6 / 1e9
        # Backward costs about twice the forward pass, hence 3x the forward FLOPs.
        train_gflops = 3 * 2 * mpp * 64 * 64 * train / 1e9
        print(
            f"{preset:6s} {stats['params'] / 1e6:7.2f}M {mpp / 1e3:8.1f} {train:11.1f} {train_gflops:10.1f}"
            f" {mpix:10.3f} {infer_gflops:10.1f} {infer_gflops / ref:6.0%}"
        )

    model = build_model("tiny")
    with torch.no_grad():
        model.out_conv.weight.normal_(0, 0.01)
    size = (384, 512) if args.quick else (768, 1024)
    image = torch.rand(1, 3, *size)
    whole = inference_seconds(model, image, repeats)
    fn = lambda batch: model(batch, torch.ones(batch.shape[0]))  # noqa: E731
    print(f"\ntiled vs whole-image inference, tiny, {size[1]}x{size[0]}, overlap 32 (whole: {whole:.2f} s)")
    print(f"{'tile':>6s} {'seconds':>8s} {'overhead':>9s} {'pixels run':>10s}")
    for tile in (256, 512, 768):
        with torch.no_grad():
            seconds = median_seconds(lambda: denoise_tiled(fn, image, tile=tile, overlap=32, batch=2), repeats)
        calls = []
        denoise_tiled(lambda b: calls.append(b.shape[0] * b.shape[2] * b.shape[3]) or b, image, tile=tile, overlap=32)
        print(f"{tile:6d} {seconds:8.2f} {seconds / whole - 1:+9.1%} {sum(calls) / (size[0] * size[1]):9.2f}x")


if __name__ == "__main__":
    main()
