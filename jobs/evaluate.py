"""Evaluate a denoiser against classic methods on a paired dataset; write a report and an MLflow run.

    python jobs/evaluate.py s3://denoise/datasets/demo --model models:/denoiser@candidate --report reports/demo

Every method sees exactly the same pairs (the first --limit keys of the split, centre-cropped
to --crop). The report folder (local or s3://) holds results.parquet (one row per pair x
method x K), summary.md and PNG plots; the same goes to an MLflow run tagged with the model
version and the dataset hash. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.evaluate import DEFAULT_METHODS, DEFAULT_STEPS, EvalConfig, evaluate  # noqa: E402
from pipeline.modelstore import DEFAULT_MODEL_URI  # noqa: E402


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


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="paired dataset written by jobs/ingest.py (s3://... or a local folder)")
    parser.add_argument("--model", default=DEFAULT_MODEL_URI,
                        help=f"models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint folder "
                             f"(default {DEFAULT_MODEL_URI})")
    parser.add_argument("--methods", type=_csv, default=DEFAULT_METHODS,
                        help=f"comma-separated (default {','.join(DEFAULT_METHODS)}; "
                             f"bm3d is skipped when not installed)")
    parser.add_argument("--steps", type=_steps, default=DEFAULT_STEPS,
                        help=f"sampling steps K for origin/improved, clipped to the model's T "
                             f"(default {','.join(map(str, DEFAULT_STEPS))})")
    parser.add_argument("--split", default="val", help="dataset split (default val)")
    parser.add_argument("--limit", type=_optional_int, default=EvalConfig.model_fields["limit"].default,
                        help="evaluate the first N pairs by key; 'none' for all (default %(default)s)")
    parser.add_argument("--crop", type=_optional_int, default=EvalConfig.model_fields["crop"].default,
                        help="centre crop side in pixels; 'none' for full images (default %(default)s)")
    parser.add_argument("--report", default="reports/eval", help="report folder, local or s3:// (default %(default)s)")
    parser.add_argument("--experiment", default="evaluation", help="MLflow experiment (default %(default)s)")
    parser.add_argument("--local", action="store_true", help="run in this process without Ray (quick checks)")
    parser.add_argument("--actors", type=int, default=EvalConfig.model_fields["actors"].default,
                        help="model actors on Ray (default %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per model actor")
    args = parser.parse_args(argv)

    config = EvalConfig.of(dataset=args.dataset, model=args.model, methods=args.methods, steps=args.steps,
                           split=args.split, limit=args.limit, crop=args.crop, report=args.report,
                           experiment=args.experiment, local=args.local, actors=args.actors, gpu=args.gpu)

    from pipeline.settings import load_settings
    from pipeline.storage import check_storage, is_s3
    from pipeline.tracking import check_mlflow

    settings = load_settings()
    if is_s3(config.dataset) or is_s3(config.report) or config.model.startswith(("models:/", "s3://")):
        check_storage(settings)
    check_mlflow(settings.mlflow_uri)
    evaluate(config, settings, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
