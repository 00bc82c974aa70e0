"""Evaluate a denoiser against classic methods on a paired dataset; write a report and an MLflow run.

    python jobs/evaluate.py s3://denoise/datasets/demo --model models:/denoiser@candidate --report reports/demo

Every method sees exactly the same pairs (the first --limit keys of the split, centre-cropped
to --crop). The report folder (local or s3://) holds results.parquet (one row per pair x
method x K), summary.md and PNG plots; the same goes to an MLflow run tagged with the model
version and the dataset hash. Exit status: the README's "Exit codes". See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import field_option  # noqa: E402
from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.evaluate import EvalConfig, evaluate  # noqa: E402


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


PARSERS = {"methods": _csv, "steps": _steps, "limit": _optional_int, "crop": _optional_int}


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in EvalConfig.model_fields:
        field_option(parser, EvalConfig, name, **({"type": PARSERS[name]} if name in PARSERS else {}))
    args = parser.parse_args(argv)

    config = EvalConfig.of(**vars(args))

    from pipeline.settings import load_settings
    from pipeline.storage import check_storage, is_s3
    from pipeline.tracking import check_mlflow

    settings = load_settings()
    settings.apply_mlflow_env()  # MLflow credentials from DENOISE_SETTINGS too
    if is_s3(config.dataset) or is_s3(config.report) or config.model.startswith(("models:/", "s3://")):
        check_storage(settings)
    check_mlflow(settings.mlflow_uri)
    evaluate(config, settings, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
