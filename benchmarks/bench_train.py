"""Training throughput: Ray Train (Ray Data -> DDP workers) vs a plain PyTorch loop, on the same work.

    python benchmarks/bench_train.py [--repeats 3] [--steps 120] [--out results.json]

Every Ray arm is one TrainConfig, and its plain arm is built from that same config: the same
model, optimizer and schedule, loss, T, time weights, clipping, EMA, patch size and global batch
(batch x workers), and as many torch threads in all; both arms run ``pipeline.step.train_step``.
Arms are interleaved and repeated, medians reported:

- ray-1w:  jobs' trainer with 1 worker (0.5 CPU reserved, 2 torch threads), data streamed by Ray Data,
           batch 16; plain-1w: its plain loop;
- ray-2w:  2 workers (0.5 CPU each, 1 thread each), DDP over gloo, global batch 32; plain-2w: its plain
           loop (one process, batch 32, 2 threads);
- epochs:  ray-1w on the dataset and on the dataset doubled: seconds of the second epoch.

A plain loop runs in one process at a Ray worker's niceness, on patches decoded once into memory
(so it measures the step alone, without data loading).

Rates are steady-state (the first 25 steps of each run are start-up and not counted), with
validation and checkpoint pauses excluded; epoch times include Ray Data's start of each epoch.
Needs the local stack (S3, MLflow, Ray).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.demo_data import DEMO_IMAGES, demo_pairs  # noqa: E402
from pipeline.diffusion import time_weights  # noqa: E402
from pipeline.images import encode_png, to_float  # noqa: E402
from pipeline.model import UNet  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.shards import aligned_crops, write_json, write_split  # noqa: E402
from pipeline.step import train_step  # noqa: E402
from pipeline.train import lr_factor, train  # noqa: E402

PATCH, CROPS, BATCH, WARMUP_STEPS = 64, 32, 16, 25


def make_dataset(settings, uri: str, pairs, copies: int) -> int:
    """The demo pairs (``copies`` times, under distinct keys) as a dataset; returns train pairs."""
    rows = {"train": [], "val": []}
    for replica in range(copies):
        for i, (key, clean, noisy) in enumerate(pairs):
            split = "val" if i < 2 else "train"
            if split == "val" and replica:
                continue
            rows[split].append({"key": f"{key}-{replica}", "split": split, "clean": encode_png(clean),
                                "noisy": encode_png(noisy), "height": clean.shape[0], "width": clean.shape[1]})
    for split, split_rows in rows.items():
        write_split(split_rows, uri, split, settings)
    write_json(uri, "dataset.json", {"counts": {k: len(v) for k, v in rows.items()}, "dataset_hash": uri}, settings)
    return len(rows["train"])


def config_for(dataset: str, storage: str, *, workers: int, steps: int | None = None, epochs: int | None = None,
               threads: int) -> TrainConfig:
    total = steps or 10**6
    return TrainConfig.model_validate({
        "dataset": dataset, "storage_path": storage, "run_name": f"bench-{uuid.uuid4().hex[:8]}",
        "data": {"patch_size": PATCH, "crops_per_image": CROPS},
        "model": {"preset": "tiny"}, "optimizer": {"lr": 1e-3, "warmup_steps": 50},
        "train": {"batch_size": BATCH, "steps": steps, "epochs": epochs, "log_every": WARMUP_STEPS,
                  "threads_per_worker": threads},
        # one validation + checkpoint, at the end: the measured window is pure training
        "validation": {"every_steps": total, "sampler_steps": 2, "crop": 64, "limit": 1},
        "checkpoint": {"every_steps": total, "num_to_keep": 1},
        "scaling": {"num_workers": workers, "resources_per_worker": {"CPU": 0.5}, "max_failures": 0},
        "mlflow": {"experiment": "bench-train"},
    })


RAY_WORKER_NICENESS = 15  # Ray starts its worker processes at this niceness


def plain_loop_process(pairs, config: TrainConfig) -> float:
    """The plain loop in a fresh process at the niceness of a Ray worker, so both arms get the same
    share of a busy machine."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, initializer=os.nice, initargs=(RAY_WORKER_NICENESS,)) as pool:
        return pool.apply(plain_loop, (pairs, config))


def plain_loop(pairs, config: TrainConfig) -> float:
    """The trainer's step (``train_step``) for ``config`` in one process, on its global batch, over
    patches decoded once into memory; steady samples/s. Needs ``train.steps``."""
    workers, train_section, opt = config.scaling.num_workers, config.train, config.optimizer
    batch, steps = train_section.batch_size * workers, train_section.steps
    torch.set_num_threads((train_section.threads_per_worker or 1) * workers)
    rng = np.random.default_rng(train_section.seed)
    cleans, noisies = [], []
    for _, clean, noisy in pairs[2:]:
        c, n = aligned_crops(to_float(clean), to_float(noisy), patch_size=config.data.patch_size,
                             crops=config.data.crops_per_image, rng=rng)
        cleans.append(c)
        noisies.append(n)
    clean, noisy = torch.from_numpy(np.concatenate(cleans)), torch.from_numpy(np.concatenate(noisies))
    torch.manual_seed(train_section.seed)
    model = UNet(config.model.unet_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=opt.warmup_steps, total=steps, min_ratio=opt.min_lr_ratio))
    t_weights = time_weights(config.diffusion.T, at_T=config.diffusion.time_mass_at_T)
    ema_decay = opt.ema_decay_for(steps)
    started = None
    for step in range(steps):
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        index = torch.randint(0, len(clean), (batch,))
        train_step(model=model, optimizer=optimizer, clean=clean[index], noisy=noisy[index], T=config.diffusion.T,
                   kind=config.diffusion.loss, weights=t_weights, grad_clip=opt.grad_clip, scheduler=scheduler,
                   ema=ema, ema_decay=ema_decay, step=step).item()
    return (steps - WARMUP_STEPS) * batch / (time.perf_counter() - started)


def ray_run(settings, config: TrainConfig) -> dict:
    started = time.perf_counter()
    metrics = train(config, settings, register_model=False, log=lambda line: None)["metrics"]
    return {"samples_per_s": metrics["steady_samples_per_s"], "epoch_seconds": metrics["epoch_seconds"],
            "data_wait_share": metrics["steady_data_wait_share"], "wall_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="steps per throughput run")
    parser.add_argument("--photos", type=int, default=5, help="demo photos (x2 noise variants; 2 pairs go to val)")
    parser.add_argument("--out", default=None, help="write the raw and summarised results as JSON here")
    args = parser.parse_args()

    settings = load_settings()
    root = settings.uri("bench", f"train-{uuid.uuid4().hex[:8]}")
    pairs = demo_pairs(variants=2, size=256, names=DEMO_IMAGES[:args.photos])
    train_pairs = {1: make_dataset(settings, f"{root}/data-1x", pairs, 1),
                   2: make_dataset(settings, f"{root}/data-2x", pairs, 2)}
    print(f"datasets: {train_pairs[1]} / {train_pairs[2]} train pairs of <=256 px, {CROPS} crops each, "
          f"patch {PATCH}, batch {BATCH}", flush=True)
    storage = f"{root}/checkpoints"
    results: dict[str, list] = {"plain-1w": [], "ray-1w": [], "plain-2w": [], "ray-2w": [], "epoch-1x": [],
                                "epoch-2x": []}
    waits: dict[str, list] = {"ray-1w": [], "ray-2w": []}  # share of training time spent waiting for data
    for repeat in range(args.repeats):
        for arm, workers, threads in (("1w", 1, 2), ("2w", 2, 1)):
            config = config_for(f"{root}/data-1x", storage, workers=workers, steps=args.steps, threads=threads)
            results[f"plain-{arm}"].append(plain_loop_process(pairs, config))
            run = ray_run(settings, config)
            results[f"ray-{arm}"].append(run["samples_per_s"])
            waits[f"ray-{arm}"].append(run["data_wait_share"])
        for copies in (1, 2):
            # three epochs: the loop stops inside the last one, so two are timed; the second is steady
            run = ray_run(settings, config_for(f"{root}/data-{copies}x", storage, workers=1, epochs=3, threads=2))
            results[f"epoch-{copies}x"].append(run["epoch_seconds"][-1])
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
              flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "plain_1w_samples_per_s": med["plain-1w"], "ray_1w_samples_per_s": med["ray-1w"],
        "plain_2w_samples_per_s": med["plain-2w"], "ray_2w_samples_per_s": med["ray-2w"],
        "ratio_ray_1w_vs_plain": med["ray-1w"] / med["plain-1w"],
        "ratio_ray_2w_vs_plain": med["ray-2w"] / med["plain-2w"],
        "ratio_ray_2w_vs_1w": med["ray-2w"] / med["ray-1w"], "epoch_s_1x": med["epoch-1x"],
        "epoch_s_2x": med["epoch-2x"], "ratio_epoch_2x_vs_1x": med["epoch-2x"] / med["epoch-1x"],
        "data_wait_share_1w": statistics.median(waits["ray-1w"]),
        "data_wait_share_2w": statistics.median(waits["ray-2w"]),
        "repeats": args.repeats, "steps": args.steps, "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "runs": results, "data_wait_share": waits}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
