"""Is the training reader ever the bottleneck? Patches/s of the reader against what a training step eats.

For each dataset kind, stored pairs (noise made at ingest) and clean photos (fresh noise
synthesized in the reader's tasks, a new camera per crop):

1. the Ray Data reader (``shards.training_patches``) iterated as a train worker does it,
   with ``iter_torch_batches``; timed per epoch, start-up included (its time to the first
   batch is printed too);
2. a plain single-process loop over the same shards: pyarrow read, PNG decode, crops (and,
   for clean photos, the noise synthesis), i.e. ``shards.random_crops``;

and 3. what the training step eats: forward + backward + AdamW step of the model preset on the
same batch and patch size, in patches/s.

Every figure is the median of ``--repeats`` runs; ratios are printed at the end, with the
machine's load average before and after (the reader and the step share its cores). Not a test.

    python benchmarks/bench_reader.py [--repeats 5] [--crops-per-image 32] [--preset tiny]

Without ``--stored``/``--fresh`` it ingests the demo photos once into s3://<bucket>/bench/:
``reader-demo-camera`` (``demo: --noise camera --variants 8``: 72 stored pairs) and
``reader-demo-fresh`` (``demo:``: the 9 training photos, clean), and reuses them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow.parquet as pq  # noqa: E402

from pipeline.settings import Settings, load_settings  # noqa: E402
from pipeline.shards import DatasetError, random_crops, read_card, split_files, training_patches  # noqa: E402
from pipeline.storage import arrow_fs_for  # noqa: E402


def ensure_dataset(uri: str | None, settings: Settings, *, name: str, **ingest_options) -> str:
    from pipeline.ingest import ingest, make_config

    uri = uri or settings.uri("bench", name)
    try:
        read_card(uri, settings)
    except DatasetError:
        ingest(make_config(source="demo:", dest=uri, task_cpus=0.5, **ingest_options), settings)
    return uri


def ray_reader(uri: str, settings: Settings, *, patch: int, crops: int, batch: int) -> tuple[float, float, int]:
    """(seconds for the epoch, seconds to its first batch, patches) of one epoch as a train worker reads it."""
    import torch

    start = time.perf_counter()
    first = None
    patches = 0
    dataset = training_patches(uri, settings, patch_size=patch, crops_per_image=crops)
    for item in dataset.iter_torch_batches(batch_size=batch, dtypes=torch.float32):
        patches += len(item["clean"])
        first = first or time.perf_counter()
    end = time.perf_counter()
    return end - start, (first or end) - start, patches


def plain_loop(uri: str, settings: Settings, *, patch: int, crops: int) -> tuple[float, int]:
    """(seconds, patches) of the same work in one process: read, decode, crop (and synthesize)."""
    fs, _ = arrow_fs_for(uri, settings)
    start = time.perf_counter()
    patches = 0
    for path in split_files(uri, "train", settings):
        table = pq.read_table(path, filesystem=fs, columns=["key", "clean", "noisy"])
        out = random_crops(table.to_pydict(), patch_size=patch, crops_per_image=crops, seed=None)
        patches += len(out["clean"])
    return time.perf_counter() - start, patches


def train_step_seconds(preset: str, *, patch: int, batch: int, repeats: int) -> float:
    """Median seconds of one optimizer step of the diffusion objective."""
    import torch

    from pipeline.model import build_model
    from pipeline.step import train_step

    model = build_model(preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean, noisy = torch.rand(batch, 3, patch, patch), torch.rand(batch, 3, patch, patch)

    def step() -> None:  # the shipped step without clipping and EMA, as the recorded rates measured it
        train_step(model=model, optimizer=optimizer, clean=clean, noisy=noisy, T=1000)

    step()  # warm-up
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--stored", help="dataset of stored pairs (default: the demo photos, camera noise)")
    parser.add_argument("--fresh", help="dataset of clean photos (default: the demo training photos)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--crops-per-image", type=int, default=32)
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
    datasets = {
        "stored pairs": ensure_dataset(args.stored, settings, name="reader-demo-camera", noise="camera", variants=8),
        "clean photos, fresh noise": ensure_dataset(args.fresh, settings, name="reader-demo-fresh"),
    }
    shape = dict(patch=args.patch_size, crops=args.crops_per_image)
    cpus = ray.cluster_resources().get("CPU", 0)
    before = load()
    print(f"patch {args.patch_size}, {args.crops_per_image} crops/pair, batch {args.batch_size}; Ray cluster "
          f"{cpus:g} CPUs; medians of {args.repeats} runs; before: {before}")

    rates = {}
    for kind, uri in datasets.items():
        pairs = read_card(uri, settings)["counts"]["train"]
        reader = [ray_reader(uri, settings, batch=args.batch_size, **shape) for _ in range(args.repeats + 1)][1:]
        plain = [plain_loop(uri, settings, **shape) for _ in range(args.repeats)]
        rates[kind] = {"reader": reader[0][2] / statistics.median(r[0] for r in reader),
                       "first": statistics.median(r[1] for r in reader),
                       "plain": plain[0][1] / statistics.median(p[0] for p in plain), "pairs": pairs, "uri": uri}
    torch.set_num_threads(args.threads)
    step = train_step_seconds(args.preset, patch=args.patch_size, batch=args.batch_size, repeats=args.repeats)
    train_rate = args.batch_size / step
    after = load()

    print(f"{'consumer':58s} {'patches/s':>10s}")
    for kind, r in rates.items():
        print(f"{'Ray Data reader, ' + kind + ', epoch incl. start-up':58s} {r['reader']:10.0f}   "
              f"({r['pairs']} pairs in {r['uri']}; {r['first']:.1f} s to the first batch)")
        print(f"{'plain loop, one process, ' + kind:58s} {r['plain']:10.0f}")
    print(f"{f'training step, {args.preset}, {args.threads} threads':58s} {train_rate:10.0f}")
    for kind, r in rates.items():
        print(f"reader / training step, {kind}: {r['reader'] / train_rate:6.2f}x (goal >= 3x); "
              f"reader / plain loop {r['reader'] / r['plain']:.2f}x")
    print(f"after: {after}")


if __name__ == "__main__":
    main()
