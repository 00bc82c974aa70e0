"""Validation PSNR and training loss of one training run, drawn from its MLflow metric history.

    python benchmarks/plot_run.py RUN_ID docs/img/cpu_val_psnr.png

MLflow's UI shows the same curves; this writes them as one PNG for a report or the docs.
Settings come from the environment as for every job (MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.settings import load_settings  # noqa: E402

CURVES = (("val_psnr", "sampler"), ("val_psnr_direct", "direct"), ("val_psnr_noisy", "noisy input"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id", help="MLflow run id of a jobs/train.py run")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(load_settings().mlflow_uri)

    def history(key: str) -> tuple[list[int], list[float]]:
        points = sorted((m.step, m.value) for m in client.get_metric_history(args.run_id, key))
        return [s for s, _ in points], [v for _, v in points]

    fig, (psnr_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in CURVES:
        steps, values = history(key)
        psnr_axis.plot(steps, values, marker="o", label=label)
    psnr_axis.set(xlabel="step", ylabel="validation PSNR (dB)")
    psnr_axis.legend()
    steps, values = history("train_loss")
    window = max(1, len(values) // 50)  # a running mean, so the trend shows through the batch noise
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    loss_axis.plot(steps, values, alpha=0.25, label="per step")
    loss_axis.plot(steps, smooth, label=f"mean of {window}")
    loss_axis.set(xlabel="step", ylabel="training loss (Charbonnier)", yscale="log")
    loss_axis.legend()
    fig.suptitle(f"MLflow run {args.run_id}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
