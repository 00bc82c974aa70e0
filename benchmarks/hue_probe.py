"""Does a model denoise a block less well only because of its colours? The same noise on recoloured blocks.

A blind denoiser trained on a few photos can learn their hues along with the noise. This takes
test blocks, keeps each block's noise (noisy - clean) and adds it to recoloured versions of the
clean block (gray, channels reversed, twice as bright, moved to mid-gray), then prints the noisy
and denoised PSNR of each (direct prediction, one pass). A model that denoises by structure gives
about the same gain on every version; docs/evaluation.md "Colour" has the numbers for rocket's sky.

    python benchmarks/hue_probe.py models:/denoiser-cpu/4 models:/denoiser-cpu/6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo_data import test_blocks  # noqa: E402
from pipeline.images import to_float  # noqa: E402
from pipeline.metrics import psnr  # noqa: E402

BLOCKS = ("rocket_l1_b04", "rocket_l0_b24", "rocket_l2_b16")   # flat, dark blue sky at three noise levels
RECOLOURS = {
    "as is": lambda c: c,
    "gray": lambda c: np.repeat(c.mean(axis=2, keepdims=True), 3, axis=2),
    "channels reversed": lambda c: c[..., ::-1].copy(),
    "twice as bright": lambda c: np.clip(2 * c, 0, 1),
    "mid-gray mean": lambda c: np.clip(c - c.mean(axis=(0, 1)) + 0.5, 0, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model URIs (models:/NAME/VERSION, runs:/..., a local folder)")
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS), help="test block keys")
    args = parser.parse_args()

    from pipeline.modelstore import load_denoiser

    blocks = {b["key"]: b for b in test_blocks()}
    unknown = sorted(set(args.blocks) - set(blocks))
    if unknown:
        raise SystemExit(f"unknown test blocks {unknown}; keys look like {next(iter(blocks))}")
    print("| model | block | " + " | ".join(RECOLOURS) + " |")
    print("|---|---|" + "---:|" * len(RECOLOURS))
    for uri in args.models:
        denoiser = load_denoiser(uri)
        for key in args.blocks:
            clean, noisy = to_float(blocks[key]["clean"]), to_float(blocks[key]["noisy"])
            cells = []
            for recolour in RECOLOURS.values():
                target = recolour(clean)
                degraded = np.clip(target + (noisy - clean), 0, 1).astype(np.float32)
                out = denoiser.denoise(degraded, sampler="direct", steps=1)
                cells.append(f"{psnr(target, degraded):.1f} -> {psnr(target, out):.1f}")
            print(f"| {uri} | {key} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
