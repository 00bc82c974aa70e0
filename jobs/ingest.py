"""Ingest paired photos (or clean photos plus synthetic camera noise) into Parquet shards.

    python jobs/ingest.py SOURCE DEST --layout {sidd,sidd-mat,mirrored,manifest,clean} [options]
    python jobs/ingest.py demo: s3://denoise/datasets/demo --overwrite
    python jobs/ingest.py demo-test: s3://denoise/datasets/demo-test --overwrite
    python jobs/ingest.py leaves: s3://denoise/datasets/leaves --overwrite

SOURCE is a local folder or an s3:// prefix ('demo:' = scikit-image's training photos, kept
clean for fresh noise, plus validation blocks with camera noise; 'demo-test:' = the test
blocks, other photos and a held-out camera, in split test; 'leaves:' = 24 procedural
dead-leaves images with camera noise, all in train, to mix into training with data.synthetic);
DEST is an s3:// prefix or a local folder. Writes DEST/<split>/part-*.parquet,
DEST/quarantine.json (what was rejected and why) and, last, DEST/dataset.json. Exit status 2 when no valid pair is left, or when
--strict is given and anything was rejected; 75 when S3 or Ray did not answer (the README's "Exit codes").
See docs/ingest.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import field_option  # noqa: E402
from pipeline.errors import exit_on_error  # noqa: E402
from pipeline.ingest import IngestConfig, ingest, make_config  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults stay None here: the config fills in its own (the demo sources have their own).
    option = functools.partial(field_option, parser, IngestConfig, default=None)
    for name in ("source", "dest"):
        option(name)
    option("layout", "--layout", help="how SOURCE is organised (demo sources: clean)")
    option("name")
    option("val_fraction", help="share of keys hashed to val")
    option("seed", help="split hash and noise seed")
    for name in ("noise", "variants", "recolor", "photo_sizes"):
        option(name)
    option("clean_template", help="mirrored: clean file name, e.g. '{key}_mean.JPG'")
    option("noisy_template", help="mirrored: noisy file name, e.g. '{key}_real.JPG'")
    for name in ("min_size", "pairs_per_shard", "task_cpus"):
        option(name)
    option("strict", help="fail, writing no dataset, if anything is rejected")
    option("overwrite", help="replace a dataset already at DEST")
    args = parser.parse_args(argv)

    config = make_config(**vars(args))
    ingest(config, load_settings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
