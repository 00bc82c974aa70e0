"""Is the training reader ever the bottleneck? Pairs/s of three consumers of the same shards.

1. the Ray Data reader (``shards.training_patches``) iterated as a train worker does it,
   with ``iter_torch_batches``; timed per epoch, start-up included (its time to the first
   batch is printed too);
2. a plain single-process loop over the same shards: pyarrow read, PNG decode, ``aligned_crops``;
3. what the training step eats: forward + backward + AdamW step of the model preset on the
   same batch size, patches/s turned into pairs/s through ``crops_per_image``.

Every figure is the median of ``--repeats`` runs; ratios are printed at the end. Not a test.

    python benchmarks/bench_reader.py [--dataset s3://denoise/datasets/demo] [--repeats 5]

Without ``--dataset`` it ingests the demo photos (``demo:``) with 8 noise variants each
(112 pairs of about 384x384) to s3://<bucket>/bench/reader-demo once and reuses them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.images import decode_png_float  # noqa: E402
from pipeline.settings import Settings, load_settings  # noqa: E402
from pipeline.shards import DatasetError, aligned_crops, read_card, split_files, training_patches  # noqa: E402
from pipeline.storage import arrow_fs_for  # noqa: E402


def ensure_dataset(uri: str | None, settings: Settings) -> str:
    from pipeline.ingest import ingest, make_config

    uri = uri or settings.uri("bench", "reader-demo")
    try:
        read_card(uri, settings)
    except DatasetError:
        ingest(make_config(source="demo:", dest=uri, variants=8, task_cpus=0.5), settings)
    return uri


def ray_reader(uri: str, settings: Settings, *, patch: int, crops: int, batch: int) -> tuple[float, float, int]:
    """(seconds for the epoch, seconds to its first batch, pairs) of one epoch as a train worker reads it."""
    import torch

    start = time.perf_counter()
    first = None
    patches = 0
    dataset = training_patches(uri, settings, patch_size=patch, crops_per_image=crops)
    for item in dataset.iter_torch_batches(batch_size=batch, dtypes=torch.float32):
        patches += len(item["clean"])
        first = first or time.perf_counter()
    end = time.perf_counter()
    return end - start, (first or end) - start, patches // crops


def plain_loop(uri: str, settings: Settings, *, patch: int, crops: int) -> tuple[float, int]:
    """(seconds, pairs) of the same work in one process: read, decode, crop."""
    fs, _ = arrow_fs_for(uri, settings)
    rng = np.random.default_rng()
    start = time.perf_counter()
    pairs = 0
    for path in split_files(uri, "train", settings):
        for row in pq.read_table(path, filesystem=fs, columns=["clean", "noisy"]).to_pylist():
            aligned_crops(decode_png_float(row["clean"]), decode_png_float(row["noisy"]),
                          patch_size=patch, crops=crops, rng=rng)
            pairs += 1
    return time.perf_counter() - start, pairs


def train_step_seconds(preset: str, *, patch: int, batch: int, repeats: int) -> float:
    """Median seconds of one optimizer step of the diffusion objective."""
    import torch

    from pipeline.diffusion import training_loss
    from pipeline.model import build_model

    model = build_model(preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean, noisy = torch.rand(batch, 3, patch, patch), torch.rand(batch, 3, patch, patch)

    def step() -> None:
        loss = training_loss(model, clean, noisy, T=1000)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dataset", help="dataset URI (default: the demo photos, ingested once)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--crops-per-image", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--preset", default="tiny", help="model preset of the training step (tiny)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the training step")
    args = parser.parse_args()

    import ray.data
    import torch

    from pipeline.cluster import init_ray

    settings = load_settings()
    init_ray(settings)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    uri = ensure_dataset(args.dataset, settings)
    shape = dict(patch=args.patch_size, crops=args.crops_per_image)
    cpus = ray.cluster_resources().get("CPU", 0)
    print(f"dataset {uri}: {read_card(uri, settings)['counts']['train']} train pairs; patch {args.patch_size}, "
          f"{args.crops_per_image} crops/pair, batch {args.batch_size}; Ray cluster {cpus:g} CPUs, "
          f"{os.cpu_count()} cores here; medians of {args.repeats} runs")

    reader = [ray_reader(uri, settings, batch=args.batch_size, **shape) for _ in range(args.repeats + 1)][1:]
    pairs = reader[0][2]
    reader_epoch = pairs / statistics.median(r[0] for r in reader)
    first_batch = statistics.median(r[1] for r in reader)
    plain = [plain_loop(uri, settings, **shape) for _ in range(args.repeats)]
    plain_rate = plain[0][1] / statistics.median(p[0] for p in plain)
    torch.set_num_threads(args.threads)
    step = train_step_seconds(args.preset, patch=args.patch_size, batch=args.batch_size, repeats=args.repeats)
    train_rate = args.batch_size / step / args.crops_per_image

    print(f"{'consumer':48s} {'pairs/s':>9s} {'patches/s':>10s}")
    for name, rate in (("Ray Data reader, epoch incl. start-up", reader_epoch),
                       ("plain loop, one process (read+decode+crop)", plain_rate),
                       (f"training step, {args.preset}, {args.threads} threads", train_rate)):
        print(f"{name:48s} {rate:9.1f} {rate * args.crops_per_image:10.0f}")
    print(f"Ray Data reader: {first_batch:.1f} s to the first batch of an epoch")
    print(f"reader / plain loop:     {reader_epoch / plain_rate:6.2f}x")
    print(f"reader / training step:  {reader_epoch / train_rate:6.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
