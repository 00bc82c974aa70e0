"""Train the denoiser on a Ray cluster: Ray Data patches, Ray Train DDP, checkpoints in S3, MLflow.

    python jobs/train.py --config configs/demo.yaml [--set optimizer.lr=3e-4 ...] [--name RUN] [--promote]
    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml

Rerunning with the same --name resumes from the run's last checkpoint and logs to the same
MLflow run. At the end the EMA model is registered with alias `candidate`; --promote also
moves `champion` to it when its validation PSNR beats the current champion's. Exit status: the
README's "Exit codes" (75 when S3, MLflow or Ray did not answer: rerun with the same --name).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import field_option  # noqa: E402
from pipeline.config import TrainConfig, load_config  # noqa: E402
from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config, e.g. configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for sections, value parsed as YAML); repeatable")
    field_option(parser, TrainConfig, "run_name", "--name", metavar="RUN")
    parser.add_argument("--promote", action="store_true",
                        help="move alias `champion` to the new version if its val_psnr beats the champion's")
    args = parser.parse_args(argv)

    overrides = args.overrides + ([f"run_name={args.run_name}"] if args.run_name else [])
    config = load_config(args.config, overrides)
    settings = load_settings()
    settings.apply_mlflow_env()  # MLflow credentials from DENOISE_SETTINGS too

    from pipeline.train import train

    train(config, settings, promote=args.promote)
    return 0


if __name__ == "__main__":
    sys.exit(main())
