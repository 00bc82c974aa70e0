"""Nightly batch denoising of an S3 prefix (or local folder) of images and .tar/.tar.gz/.zip archives.

    python jobs/denoise.py INPUT OUTPUT [--model models:/denoiser@champion] [--reference REF]
                           [--sampler improved|origin|direct] [--steps K] [--tile N] [--batch-size N]
                           [--workers N] [--gpus-per-worker F] [--date YYYY-MM-DD|today] [--experiment NAME]

Writes OUTPUT[/DATE]/images/<key>.png (PNG whatever the input format; 16-bit inputs give
16-bit PNGs), OUTPUT[/DATE]/manifest.parquet and errors.parquet, and one MLflow run
``batch-denoise-<date>``. Running again skips every item already done (same key, same
bytes, same model version, sampler and steps), so a killed run is finished by simply
running it again. One run at a time per OUTPUT: a second one refuses while the first
holds OUTPUT/_state/lease.json.

Exit status (the README's "Exit codes"): 0 when the run completed (items that failed are listed
in errors.parquet; an MLflow outage after the merge is a warning); 2 when it cannot succeed as
given (bad arguments, missing or empty INPUT, a missing bucket, unknown model, OUTPUT in use by
another run, the cluster failing the run); 75 when S3, MLflow or Ray did not answer or the lease
was lost before the merge (run it again later: finished items are skipped); 143 when stopped by
SIGTERM (the lease is released; only SIGKILL leaves it to expire).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import field_option  # noqa: E402
from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.infer import DenoiseConfig, run_batch_denoise  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.storage import check_storage  # noqa: E402
from pipeline.tracking import check_mlflow  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options, defaults and help are DenoiseConfig's fields; an option not given stays None (the default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in DenoiseConfig.model_fields:
        field_option(parser, DenoiseConfig, name, default=None)
    return parser.parse_args(argv)


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = DenoiseConfig.build(**vars(args))
    settings = load_settings()
    settings.apply_mlflow_env()  # MLflow credentials from DENOISE_SETTINGS too
    for bucket in config.buckets():  # before any work: a night of inference must not end in a missing bucket
        check_storage(settings, bucket)
    check_mlflow(settings.mlflow_uri)
    # SIGTERM (what ``ray job stop`` sends first) unwinds like an error (exit_on_error), so OUTPUT's lease
    # is still released.
    result = run_batch_denoise(config, settings)
    print(f"manifest: {result['manifest']} ({result['manifest_rows']} rows)")
    print(f"errors: {result['errors']} ({result['error_rows']} rows)")
    print(f"mlflow run: {result['mlflow_run'] or 'not logged (see the warning above)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
