"""The same denoise and training work on 1 and 2 worker nodes of the local stack, against plain loops.

Each worker node offers one CPU (``DENOISE_RAY_CPUS=1``), so 2 nodes have twice the CPUs of 1;
on a 2-core machine the head, the driver, S3 and MLflow share those two cores with them, so the
ceiling of the 2-node ratio is well under 2. Per round, for 1 then 2 nodes:

1. denoise: ``run_batch_denoise`` on ``--images`` photos with one model actor per node; items/s
   over the job's graph time, and how many items each node's actor denoised (the manifest's node
   column);
2. training: ``train`` with one DDP worker per node at a per-worker batch of 16; steady samples/s,
   and the nodes its workers ran on (the run's ``worker_nodes`` tag).

Plain PyTorch loops measured in the same run on the same work give the per-core baseline: the
images denoised one after the other by the same model and sampler with one thread, and the
training step on one worker's batch with one thread. Medians of ``--repeats`` rounds; ratios
against the 1-node job and against the plain loops. Not a test: it only measures. Needs the local
stack (``make up``); it restarts the stack's worker nodes and leaves ``--restore`` of them running.

    python benchmarks/bench_cluster.py [--images 8] [--size 256] [--steps 2] [--train-steps 120] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_denoise import plain_loop_seconds, prepare_inputs, prepare_model  # noqa: E402
from bench_train import config_for, make_dataset, plain_loop_process, ray_run  # noqa: E402

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.demo_data import DEMO_IMAGES, demo_pairs  # noqa: E402
from pipeline.infer import DenoiseConfig, run_batch_denoise  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.storage import fsspec_for, join  # noqa: E402

STACK = [sys.executable, str(HERE.parent / "infra" / "local" / "stack.py")]


def use_nodes(count: int) -> None:
    """Worker nodes of one CPU each: the stack's nodes stopped or started until ``count`` run."""
    env = {**os.environ, "DENOISE_RAY_CPUS": "1"}
    subprocess.run([*STACK, "up", "ray", "--workers", str(count)], env=env, check=True, capture_output=True,
                   timeout=300)
    import ray

    deadline = time.monotonic() + 60
    while sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")) != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not settle at {count} worker node(s)")
        time.sleep(1)


def denoise_round(settings, prefix: str, model: str, root: str, args, nodes: int) -> dict:
    output = join(root, "out", uuid.uuid4().hex[:10])
    config = DenoiseConfig.build(input=prefix, output=output, model=model, sampler="improved", steps=args.steps,
                                 workers=nodes, cpus_per_worker=0.5, cpus_per_task=0.25, task_memory_mb=512,
                                 experiment="bench-cluster", samples=0)
    result = run_batch_denoise(config, settings, log=lambda line: None)
    summary = result["summary"]
    assert summary.failed == 0 and summary.skipped == 0, summary.line()
    fs, path = fsspec_for(result["manifest"], settings)
    import pandas as pd

    with fs.open(path, "rb") as handle:
        per_node = pd.read_parquet(handle)["node"].value_counts().sort_index().to_dict()
    fs.rm(fsspec_for(output, settings)[1], recursive=True)
    return {"items_per_s": summary.done / summary.seconds, "per_node": per_node}


def train_round(settings, dataset: str, root: str, args, nodes: int) -> dict:
    import mlflow

    config = config_for(dataset, join(root, "checkpoints"), workers=nodes, steps=args.train_steps, threads=1)
    config = config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"experiment": "bench-cluster"})})
    run = ray_run(settings, config)
    client = mlflow.MlflowClient(settings.mlflow_uri)
    found = client.search_runs([client.get_experiment_by_name("bench-cluster").experiment_id],
                               filter_string=f"attributes.run_name = '{config.run_name}'")
    return {"samples_per_s": run["samples_per_s"], "worker_nodes": found[0].data.tags.get("worker_nodes", "")}


def median_of(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="photos per denoise round")
    parser.add_argument("--size", type=int, default=256, help="their side in pixels")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps K")
    parser.add_argument("--train-steps", type=int, default=120, help="training steps per round")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per configuration (medians reported)")
    parser.add_argument("--restore", type=int, default=2, help="worker nodes left running at the end")
    args = parser.parse_args()

    settings = load_settings()
    if not settings.ray_address:
        parser.error("needs the local stack's cluster: `make up`, then `source .local/stack.env`")
    root = settings.uri("bench", "cluster")
    prefix = prepare_inputs(settings, root, [args.images], args.size)[args.images]
    model = prepare_model(settings, root)
    pairs = demo_pairs(variants=1, size=128, names=DEMO_IMAGES[:6])
    dataset = join(root, "train-data")
    make_dataset(settings, dataset, pairs, copies=2)

    args.sampler, args.tile, args.batch_size, args.threads = "improved", 512, 4, 1
    plain_s, megapixels = plain_loop_seconds(settings, prefix, model, args, args.repeats)
    plain_denoise = args.images / plain_s
    plain_train = plain_loop_process(pairs, config_for(dataset, "", workers=1, steps=args.train_steps, threads=1))
    print(f"plain loops (1 thread): denoise {plain_denoise:.3f} items/s, train {plain_train:.1f} samples/s", flush=True)

    init_ray(settings)
    results: dict[int, dict] = {}
    try:
        for nodes in (1, 2):
            use_nodes(nodes)
            denoise = [denoise_round(settings, prefix, model, root, args, nodes) for _ in range(args.repeats)]
            train = [train_round(settings, dataset, root, args, nodes) for _ in range(args.repeats)]
            results[nodes] = {"denoise_items_per_s": median_of(denoise, "items_per_s"),
                              "denoise_per_node": denoise[-1]["per_node"],
                              "train_samples_per_s": median_of(train, "samples_per_s"),
                              "train_worker_nodes": train[-1]["worker_nodes"]}
            print(f"{nodes} node(s): denoise {results[nodes]['denoise_items_per_s']:.3f} items/s "
                  f"(items per node {results[nodes]['denoise_per_node']}), train "
                  f"{results[nodes]['train_samples_per_s']:.1f} samples/s (workers on "
                  f"{results[nodes]['train_worker_nodes']})", flush=True)
    finally:
        use_nodes(args.restore)
    one, two = results[1], results[2]
    summary = {
        "images": args.images, "size": args.size, "steps": args.steps, "train_steps": args.train_steps,
        "repeats": args.repeats, "plain_denoise_items_per_s": plain_denoise, "plain_train_samples_per_s": plain_train,
        "nodes": results,
        "ratio_denoise_2n_vs_1n": two["denoise_items_per_s"] / one["denoise_items_per_s"],
        "ratio_train_2n_vs_1n": two["train_samples_per_s"] / one["train_samples_per_s"],
        "ratio_denoise_1n_vs_plain": one["denoise_items_per_s"] / plain_denoise,
        "ratio_denoise_2n_vs_plain": two["denoise_items_per_s"] / plain_denoise,
        "ratio_train_1n_vs_plain": one["train_samples_per_s"] / plain_train,
        "ratio_train_2n_vs_plain": two["train_samples_per_s"] / plain_train,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
