"""Nightly batch denoising of an S3 prefix (or local folder) of images and .tar/.tar.gz/.zip archives.

    python jobs/denoise.py INPUT OUTPUT [--model models:/denoiser@champion] [--reference REF]
                           [--sampler improved|origin|direct] [--steps K] [--tile N] [--batch-size N]
                           [--workers N] [--gpus-per-worker F] [--date YYYY-MM-DD|today] [--experiment NAME]

Writes OUTPUT[/DATE]/images/<key>.png (PNG whatever the input format; 16-bit inputs give
16-bit PNGs), OUTPUT[/DATE]/manifest.parquet and errors.parquet, and one MLflow run
``batch-denoise-<date>``. Running again skips every item already done (same key and
same bytes), so a killed run is finished by simply running it again.

Exit status: 0 when the run completed (items that failed are listed in errors.parquet),
2 when it could not run (bad arguments, missing or empty INPUT, unknown model,
unreachable S3/MLflow/Ray).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.infer import DEFAULT_MODEL_URI, DenoiseConfig, run_batch_denoise  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.storage import check_storage  # noqa: E402
from pipeline.tracking import check_mlflow  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", metavar="INPUT", help="s3://bucket/prefix or local folder of images/archives")
    parser.add_argument("output", metavar="OUTPUT", help="s3://bucket/prefix or local folder for the results")
    parser.add_argument("--model", default=DEFAULT_MODEL_URI,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint folder (default %(default)s)")
    parser.add_argument("--reference", default=None,
                        help="clean references at REF/<key> (archive members: REF/<archive>/<member>)")
    parser.add_argument("--sampler", choices=("improved", "origin", "direct"), default="improved")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps K (default %(default)s)")
    parser.add_argument("--tile", type=int, default=512, help="tile side for large images (default %(default)s)")
    parser.add_argument("--overlap", type=int, default=32, help="overlap of neighbouring tiles (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per model call (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="model actors (default %(default)s)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per model actor (default 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="CPUs and torch threads per model actor (default %(default)s)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0,
                        help="CPUs per read/decode and write/score task (default %(default)s)")
    parser.add_argument("--task-memory-mb", type=int, default=1024,
                        help="memory reserved per read/decode and write/score task (default %(default)s)")
    parser.add_argument("--date", default=None, help="YYYY-MM-DD or 'today' (UTC): write under OUTPUT/DATE/")
    parser.add_argument("--experiment", default="batch-denoise", help="MLflow experiment (default %(default)s)")
    parser.add_argument("--max-megapixels", type=float, default=100.0,
                        help="larger images are rejected (smaller ones are tiled) (default %(default)s)")
    parser.add_argument("--max-image-mb", type=float, default=1024.0,
                        help="largest image file or archive member, in MiB (default %(default)s)")
    parser.add_argument("--samples", type=int, default=3, help="before/after crops logged to MLflow")
    return parser.parse_args(argv)


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = DenoiseConfig.build(**{k: v for k, v in vars(args).items()})
    settings = load_settings()
    check_storage(settings)
    check_mlflow(settings.mlflow_uri)
    result = run_batch_denoise(config, settings)
    print(f"manifest: {result['manifest']} ({result['manifest_rows']} rows)")
    print(f"errors: {result['errors']} ({result['error_rows']} rows)")
    print(f"mlflow run: {result['mlflow_run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
