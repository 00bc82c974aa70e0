"""Batch denoising: the Ray Data job against a plain PyTorch loop on the same images, and how the
job's time grows with the number of images.

1. plain loop: the images already decoded in memory, denoised one after the other in this process
   by the same model, sampler, steps and tiling (``Denoise.denoise``), with ``--threads`` torch threads;
2. the job (``run_batch_denoise``, in this process, joined to the configured Ray cluster) on the
   same images in S3, one model actor with ``--cpus-per-worker`` CPUs (and as many torch threads),
   from listing to the last PNG, state marker and MLflow log; every repeat writes a fresh OUTPUT,
   so nothing is skipped.

For each input size it prints the median seconds of ``--repeats`` runs and MP/s; then the ratio of
the job's MP/s to the plain loop's at the largest size, and a least-squares line
seconds = fixed + per_image * N through the job's medians: ``per_image`` against the plain loop's
per-image time is the steady-state ratio, ``fixed`` the start-up (actor, model load) that a
nightly run pays once. Not a test: it only measures.

    python benchmarks/bench_denoise.py [--images 8,16,32] [--size 128] [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipeline.archives import iter_items, list_sources  # noqa: E402
from pipeline.checkpoint import checkpoint_files  # noqa: E402
from pipeline.cluster import init_ray  # noqa: E402
from pipeline.demo_data import demo_pairs  # noqa: E402
from pipeline.images import decode_image, encode_png  # noqa: E402
from pipeline.infer import Denoise, DenoiseConfig, run_batch_denoise  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.storage import fsspec_for, join, strip_scheme, write_atomic  # noqa: E402


def prepare_inputs(settings, root: str, counts: list[int], size: int) -> dict[int, str]:
    """One prefix per image count, holding the first N noisy demo photos (written once, reused)."""
    pairs = demo_pairs(variants=math.ceil(max(counts) / 10), size=size)
    fs, _ = fsspec_for(root, settings)
    prefixes = {}
    for n in counts:
        prefix = join(root, f"in-{size}px-{n}")
        if len(fs.find(strip_scheme(prefix))) != n:
            for key, _, noisy in pairs[:n]:
                write_atomic(fs, strip_scheme(join(prefix, f"{key}.png")), encode_png(noisy))
        prefixes[n] = prefix
    return prefixes


def prepare_model(settings, root: str) -> str:
    """A tiny UNet with a non-zero head (a fresh one is the identity), as a checkpoint folder."""
    import torch

    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        model.out_conv.weight.normal_(0, 0.01)
    uri = join(root, "model")
    fs, path = fsspec_for(uri, settings)
    for name, data in checkpoint_files(model, T=100).items():
        write_atomic(fs, join(path, name), data)
    return uri


def plain_loop_seconds(settings, prefix: str, model_uri: str, args, repeats: int) -> tuple[float, float]:
    """(median seconds, megapixels) of denoising the decoded images in a loop."""
    images = [decode_image(item.data) for source in list_sources(prefix, settings)
              for item in iter_items(source, settings)]
    denoiser = Denoise(model_uri=model_uri, settings=settings, sampler=args.sampler, steps=args.steps,
                       tile=args.tile, overlap=32, batch_size=args.batch_size, threads=args.threads)
    denoiser.denoise(images[0])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            denoiser.denoise(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times), sum(i.shape[0] * i.shape[1] for i in images) / 1e6


def job_seconds(settings, prefix: str, model_uri: str, root: str, args, repeats: int) -> tuple[float, float, float]:
    """(median graph seconds, median wall seconds, megapixels) of the job on the prefix."""
    graph, wall, megapixels = [], [], 0.0
    for _ in range(repeats):
        output = join(root, "out", uuid.uuid4().hex[:10])
        config = DenoiseConfig.build(input=prefix, output=output, model=model_uri, sampler=args.sampler,
                                     steps=args.steps, tile=args.tile, batch_size=args.batch_size, workers=1,
                                     cpus_per_worker=args.cpus_per_worker, cpus_per_task=args.cpus_per_task,
                                     task_memory_mb=512, experiment="bench-denoise", samples=0)
        start = time.perf_counter()
        result = run_batch_denoise(config, settings, log=lambda line: None)
        wall.append(time.perf_counter() - start)
        summary = result["summary"]
        assert summary.failed == 0 and summary.skipped == 0, summary.line()
        graph.append(summary.seconds)
        megapixels = summary.megapixels
        fs, path = fsspec_for(output, settings)
        fs.rm(path, recursive=True)
    return statistics.median(graph), statistics.median(wall), megapixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="8,16,32", help="image counts, comma-separated")
    parser.add_argument("--size", type=int, default=128, help="long side of the images")
    parser.add_argument("--sampler", default="improved")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    parser.add_argument("--cpus-per-worker", type=float, default=1.5,
                        help="the job's actor CPUs; its torch threads are this rounded up")
    parser.add_argument("--cpus-per-task", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.images.split(","))

    settings = load_settings()
    root = settings.uri("bench", "denoise")
    prefixes = prepare_inputs(settings, root, counts, args.size)
    model_uri = prepare_model(settings, root)
    init_ray(settings)
    print(f"tiny UNet, {args.sampler} K={args.steps}, images up to {args.size}px, medians of {args.repeats}")
    header = ("images", "plain s", "plain MP/s", "job s", "job wall s", "job MP/s", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (7, 8, 10, 8, 10, 9, 6))))
    rows = []
    for n in counts:
        plain, megapixels = plain_loop_seconds(settings, prefixes[n], model_uri, args, args.repeats)
        graph, wall, job_mp = job_seconds(settings, prefixes[n], model_uri, root, args, args.repeats)
        assert abs(job_mp - megapixels) < 1e-9, (job_mp, megapixels)
        rows.append((n, plain, graph))
        print(f"{n:>7} {plain:>8.2f} {megapixels / plain:>10.4f} {graph:>8.2f} {wall:>10.2f} "
              f"{megapixels / graph:>9.4f} {plain / graph:>6.2f}")
    n, plain, graph = rows[-1]
    slope, fixed = np.polyfit([r[0] for r in rows], [r[2] for r in rows], 1)
    plain_per_image = statistics.median(r[1] / r[0] for r in rows)
    fit = np.poly1d([slope, fixed])
    worst = max(abs(fit(r[0]) - r[2]) / r[2] for r in rows)
    print(f"job / plain MP/s at {n} images: {plain / graph:.2f}")
    print(f"job seconds = {fixed:.1f} + {slope:.3f} * images (worst deviation from the line {worst:.0%}); "
          f"plain loop {plain_per_image:.3f} s/image; steady-state ratio {plain_per_image / slope:.2f}")


if __name__ == "__main__":
    main()
