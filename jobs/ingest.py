"""Ingest paired photos (or clean photos plus synthetic camera noise) into Parquet shards.

    python jobs/ingest.py SOURCE DEST --layout {sidd,sidd-mat,mirrored,manifest,clean} [options]
    python jobs/ingest.py demo: s3://denoise/datasets/demo --overwrite

SOURCE is a local folder or an s3:// prefix ('demo:' = the photos bundled with scikit-image,
made into pairs with camera noise); DEST is an s3:// prefix or a local folder. Writes
DEST/train/part-*.parquet, DEST/val/part-*.parquet, DEST/quarantine.json (what was rejected
and why) and, last, DEST/dataset.json. Exit status 2 when no valid pair is left, or when
--strict is given and anything was rejected. See docs/ingest.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.ingest import DEMO_SOURCE, ingest, make_config  # noqa: E402
from pipeline.pairs import LAYOUTS  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help=f"local folder, s3:// prefix, or {DEMO_SOURCE}")
    parser.add_argument("dest", metavar="DEST", help="s3:// prefix (or local folder) for the dataset")
    parser.add_argument("--layout", choices=LAYOUTS, help="how SOURCE is organised (demo: clean)")
    parser.add_argument("--name", help="dataset name in the card (default: last part of DEST)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of keys hashed to val (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="split hash and noise seed (0)")
    parser.add_argument("--noise", choices=["camera"], help="synthesize the noisy side (layout clean)")
    parser.add_argument("--variants", type=int, help="noisy variants per clean photo (1; demo: 2)")
    parser.add_argument("--clean-template", help="mirrored: clean file name, e.g. '{key}_mean.JPG'")
    parser.add_argument("--noisy-template", help="mirrored: noisy file name, e.g. '{key}_real.JPG'")
    parser.add_argument("--min-size", type=int, default=64, help="reject images with a side below this (64)")
    parser.add_argument("--pairs-per-shard", type=int, default=8, help="pairs per shard and Ray task (8)")
    parser.add_argument("--task-cpus", type=float, default=1.0,
                        help="CPUs per shard task (1; 0.5 shares a busy cluster)")
    parser.add_argument("--strict", action="store_true", help="fail, writing no dataset, if anything is rejected")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at DEST")
    args = parser.parse_args(argv)

    config = make_config(**{name: value for name, value in vars(args).items()})
    ingest(config, load_settings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
