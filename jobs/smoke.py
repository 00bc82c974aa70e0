"""Spine check: Ray Data <-> S3, Ray Train (2 gloo workers) -> S3 checkpoints, rank 0 -> MLflow.

    python jobs/smoke.py [--prefix smoke/NAME] [--epochs 2] [--workers 2]

Proves the stack is wired before any real job runs; prints the MLflow run URL and the
S3 paths it wrote. Exit status: the README's "Exit codes" (75 when a service did not answer).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cluster import init_ray, train_data_config  # noqa: E402
from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.storage import arrow_filesystem, check_storage  # noqa: E402
from pipeline.tracking import check_mlflow  # noqa: E402


def train_loop(config: dict) -> None:
    """Fit y = 3x + 1 on this worker's shard; one checkpoint per epoch, metrics from rank 0."""
    import mlflow
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model = prepare_model(torch.nn.Linear(1, 1))
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = ray.train.get_dataset_shard("train")
    run = None
    if rank == 0:
        config["settings"].apply_mlflow_env()  # an authenticated MLflow: its credentials came in the settings
        mlflow.set_tracking_uri(config["mlflow_uri"])
        mlflow.set_experiment(config["experiment"])
        run = mlflow.start_run(run_name=config["run_name"])
        mlflow.log_params({"epochs": config["epochs"], "workers": ctx.get_world_size(), "lr": 0.1})
    step = 0
    for epoch in range(config["epochs"]):
        for batch in shard.iter_torch_batches(batch_size=16, dtypes=torch.float32):
            x, y = batch["x"].unsqueeze(1), batch["y"].unsqueeze(1)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            if rank == 0:
                mlflow.log_metric("loss", loss.item(), step=step)
            step += 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"epoch": epoch, "loss": loss.item(), "step": step}, checkpoint=checkpoint)
    if run is not None:
        mlflow.end_run()


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", default=None, help="S3 prefix in the bucket (default smoke/<random>)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--experiment", default="smoke")
    args = parser.parse_args(argv)

    settings = load_settings()
    settings.apply_mlflow_env()  # MLflow credentials from DENOISE_SETTINGS too
    check_storage(settings)
    check_mlflow(settings.mlflow_uri)
    init_ray(settings)

    import numpy as np
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    prefix = args.prefix or f"smoke/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    fs = arrow_filesystem(settings)
    data_path = f"{settings.bucket}/{prefix}/data"
    x = np.linspace(-1, 1, args.rows, dtype=np.float32)
    ray.data.from_items([{"x": float(v), "y": float(3 * v + 1)} for v in x]) \
        .repartition(4).write_parquet(data_path, filesystem=fs)
    # Read before the workers start: Ray Data's file listing asks a whole CPU, which no node keeps
    # free beside the workers on a cluster of 1-CPU nodes; the workers then stream the blocks read.
    dataset = ray.data.read_parquet(data_path, filesystem=fs, num_cpus=0.5).materialize()
    rows = dataset.count()
    if rows != args.rows:
        raise RuntimeError(f"wrote {args.rows} rows to s3://{data_path} but read back {rows}")
    print(f"ray data: wrote and read back {rows} rows at s3://{data_path}")

    run_name = prefix.rsplit("/", 1)[-1]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"epochs": args.epochs, "mlflow_uri": settings.mlflow_uri, "settings": settings,
                           "experiment": args.experiment, "run_name": run_name},
        # Fractional CPUs, one worker per node, leave room for Ray Data's read tasks on every node.
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=False,
                                               resources_per_worker={"CPU": 0.5}, placement_strategy="SPREAD"),
        run_config=ray.train.RunConfig(name=run_name, storage_path=f"{settings.bucket}/{prefix}/checkpoints",
                                       storage_filesystem=fs),
        datasets={"train": dataset},
        dataset_config=train_data_config(),
    )
    result = trainer.fit()
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    print(f"ray train: {args.epochs} epochs on {args.workers} workers, final loss {result.metrics['loss']:.4f}")
    print(f"checkpoints: s3://{result.checkpoint.path}")
    if runs:
        print(f"mlflow run: {settings.mlflow_uri}/#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
