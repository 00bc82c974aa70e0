"""Architecture and recipe ablation on CPU: which denoiser gives the most PSNR per CPU-minute?

A plain torch loop (no Ray), one thread per run, so several runs can share a
machine and their numbers stay comparable. Every run gets the same budget of
*process CPU time* (``--cpu-minutes``), which is what a busy machine cannot
inflate much, and the learning rate follows its cosine over that budget.

Data: the project's split of the bundled photos (``pipeline.demo_data``). Training:
random crops of the training photos with noise from the training camera
(``pipeline.noise.synthesize_pair``; a pool of draws per photo, one redrawn every
few steps). Validation: blocks of the validation photos at three fixed noise
levels, training camera (``noise_blocks``). Test: blocks of the test photos with
the held-out test camera, which no run trains on. Scores are the mean PSNR over
the blocks, with its standard error, of ``direct`` (one call at t = T) and
``improved`` with K = 5. Choose by validation; the test column shows whether
the choice carries over to a camera never seen.

    python benchmarks/ablation.py --runs naf16 res16 --cpu-minutes 5 --out reports/ablation
    python benchmarks/ablation.py --runs naf16:time_mass=0.3 ...   # a recipe variant of a preset

Recipe keys (``RECIPE``): lr, warmup, batch, patch, time_mass, T, loss, clip; data (``pool``
or ``fresh``), colors (``keep``, ``shuffle``: channel order per crop, ``recolor``: new scene
colours per pool draw), photo_size (long side of the training photos), leaves (pool slots
holding a new procedural dead-leaves image at every draw). Runs differ a lot between seeds at
short budgets (docs/evaluation.md): compare several ``--seed`` values before trusting a gap.

Results go to OUT/<run>.json, one file per run, and ``--table`` prints a
Markdown table of every JSON file in OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo_data import (TEST_PHOTOS, TRAIN_PHOTOS, VAL_PHOTOS, dead_leaves, demo_image,  # noqa: E402
                                noise_blocks)
from pipeline.diffusion import sample, time_weights  # noqa: E402
from pipeline.images import to_float  # noqa: E402
from pipeline.metrics import psnr  # noqa: E402
from pipeline.model import ModelConfig, UNet, model_stats  # noqa: E402
from pipeline.noise import TEST_CAMERA, TRAIN_CAMERA, synthesize_pair  # noqa: E402
from pipeline.shards import fresh_noise_crops  # noqa: E402
from pipeline.step import train_step  # noqa: E402

CANDIDATES: dict[str, ModelConfig] = {
    "res16": ModelConfig(width=16, channel_mults=(1, 2, 4, 8), block="res"),  # the old tiny
    "res24-3": ModelConfig(width=24, channel_mults=(1, 2, 4), block="res"),
    "naf16": ModelConfig(width=16, channel_mults=(1, 2, 4, 8), block="naf"),
    "naf24": ModelConfig(width=24, channel_mults=(1, 2, 4, 8), block="naf"),
    "naf32": ModelConfig(width=32, channel_mults=(1, 2, 4, 8), block="naf"),
    "naf16x2": ModelConfig(width=16, channel_mults=(1, 2, 4, 8), blocks_per_level=2, block="naf"),
    "naf24-3": ModelConfig(width=24, channel_mults=(1, 2, 4), block="naf"),
    "naf16-5": ModelConfig(width=16, channel_mults=(1, 2, 4, 8, 16), block="naf"),
}
# data: "pool" (a few stored draws per photo, one redrawn now and then) or "fresh" (new camera
# noise on every crop, as the reader gives clean photos).
# colors: "keep", or "shuffle" (a random order of the RGB channels per crop, the same on both sides).
RECIPE = {"lr": 2e-3, "warmup": 100, "batch": 16, "patch": 64, "time_mass": 0.3, "T": 1000, "loss": "charbonnier",
          "clip": 1.0, "data": "pool", "colors": "keep", "photo_size": 384, "leaves": 0}


def parse_run(spec: str) -> tuple[str, ModelConfig, dict]:
    """``naf16`` or ``naf16:time_mass=0.3,lr=1e-3``: a candidate plus recipe (or ModelConfig) overrides."""
    name, _, rest = spec.partition(":")
    if name not in CANDIDATES:
        raise SystemExit(f"unknown candidate {name!r}; choose from {sorted(CANDIDATES)}")
    config, recipe = CANDIDATES[name], dict(RECIPE)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in recipe:
            recipe[key] = type(recipe[key])(value)
        else:
            config = replace(config, **{key: type(getattr(config, key))(value)})
    return spec.replace(":", "_").replace(",", "_").replace("=", ""), config, recipe


def recolor(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scene colours the few training photos lack: channel order, saturation, a tint."""
    out = rgb[:, :, rng.permutation(3)]
    luma = out @ np.array([0.299, 0.587, 0.114], np.float32)
    out = luma[..., None] + rng.uniform(0.6, 1.6) * (out - luma[..., None])
    tint = np.exp(rng.uniform(-0.35, 0.35, 3)).astype(np.float32)
    out = out * (tint / (tint @ np.array([0.299, 0.587, 0.114], np.float32)))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def eval_blocks(photos: tuple[str, ...], *, camera, blocks: int = 8) -> list[tuple]:
    """(clean, noisy) float blocks: ``blocks`` 64x64 tiles per photo and noise level."""
    return [(to_float(b["clean"]), to_float(b["noisy"]), b["meta"]["photo"])
            for b in noise_blocks(photos, model=camera, block=64, blocks=blocks)]


class Pool:
    """Noisy/clean full images of the training photos; one photo gets fresh noise every ``refresh`` draws.

    ``fresh``: no pool; every crop gets a new camera (``shards.fresh_noise_crops``, the reader's path).
    """

    def __init__(self, rng: np.random.Generator, draws: int = 3, refresh: int = 4, fresh: bool = False,
                 colors: str = "keep", photo_size: int = 384, leaves: int = 0) -> None:
        self.rng, self.refresh, self.calls, self.fresh = rng, refresh, 0, fresh
        self.shuffle, self.recolor = colors == "shuffle", colors == "recolor"
        self.photos = [to_float(demo_image(name, photo_size)) for name in TRAIN_PHOTOS] + [None] * leaves
        self.pairs = [] if fresh else [self._draw(i) for i in range(len(self.photos)) for _ in range(draws)]

    def _draw(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        photo = (dead_leaves(self.rng, min_radius=4.0, exponent=2.0, shading=0.3, max_disks=3000)  # a new one each draw
                 if self.photos[index] is None else self.photos[index])
        photo = recolor(photo, self.rng) if self.recolor else photo
        clean, noisy, _ = synthesize_pair(photo, self.rng)
        return (torch.from_numpy(clean).permute(2, 0, 1).contiguous(),
                torch.from_numpy(noisy).permute(2, 0, 1).contiguous())

    def batch(self, size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fresh:
            crops = [fresh_noise_crops(self.photos[int(self.rng.integers(len(self.photos)))], key="", crops=1,
                                       patch_size=patch, rng=self.rng, noise_seed=None) for _ in range(size)]
            return (torch.from_numpy(np.concatenate([c for c, _ in crops])),
                    torch.from_numpy(np.concatenate([n for _, n in crops])))
        self.calls += 1
        if self.calls % self.refresh == 0:
            slot = int(self.rng.integers(len(self.pairs)))
            self.pairs[slot] = self._draw(slot % len(self.photos))
        cleans, noisys = [], []
        for _ in range(size):
            clean, noisy = self.pairs[int(self.rng.integers(len(self.pairs)))]
            y = int(self.rng.integers(clean.shape[1] - patch + 1))
            x = int(self.rng.integers(clean.shape[2] - patch + 1))
            k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
            order = self.rng.permutation(3) if self.shuffle else np.arange(3)
            for out, image in ((cleans, clean), (noisys, noisy)):
                crop = torch.rot90(image[order, y:y + patch, x:x + patch], k, dims=(1, 2))
                out.append(crop.flip(2) if flip else crop)
        return torch.stack(cleans), torch.stack(noisys)


@torch.no_grad()
def score(model: UNet, pairs: list[tuple], *, T: int) -> dict[str, float]:
    """Mean PSNR and its standard error (``<name>_se``) of the input and two samplers, over the blocks."""
    model.eval()
    clean = np.stack([c for c, _, _ in pairs])
    noisy = torch.from_numpy(np.stack([n for _, n, _ in pairs])).permute(0, 3, 1, 2).contiguous()
    outputs = {"noisy": noisy}
    for name, sampler, k in (("direct", "direct", 1), ("improved5", "improved", 5)):
        outputs[name] = torch.cat([sample(model, chunk, T=T, steps=k, sampler=sampler).clamp(0, 1)
                                   for chunk in noisy.split(32)])
    model.train()
    out = {}
    for name, images in outputs.items():
        values = [psnr(c, p) for c, p in zip(clean, images.permute(0, 2, 3, 1).double().numpy())]
        out[name], out[f"{name}_se"] = float(np.mean(values)), float(np.std(values, ddof=1) / len(values) ** 0.5)
        if name == "improved5":
            photos = [photo for _, _, photo in pairs]
            out["improved5_per_photo"] = {p: float(np.mean([v for v, q in zip(values, photos) if q == p]))
                                          for p in dict.fromkeys(photos)}
    return out


def run(name: str, config: ModelConfig, recipe: dict, *, cpu_minutes: float, seed: int, out: Path) -> dict:
    name = f"{name}_seed{seed}" if seed else name  # several seeds of one run side by side in OUT
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet(config)
    stats = model_stats(model)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=(0.9, 0.99), weight_decay=1e-4)
    T = recipe["T"]
    weights = time_weights(T, at_T=recipe["time_mass"])
    if recipe["data"] not in ("pool", "fresh"):
        raise SystemExit(f"data must be pool or fresh, got {recipe['data']!r}")
    if recipe["colors"] not in ("keep", "shuffle", "recolor"):
        raise SystemExit(f"colors must be keep, shuffle or recolor, got {recipe['colors']!r}")
    pool = Pool(rng, fresh=recipe["data"] == "fresh", colors=recipe["colors"],
                photo_size=recipe["photo_size"], leaves=recipe["leaves"])
    val = eval_blocks(VAL_PHOTOS, camera=TRAIN_CAMERA)
    test = eval_blocks(TEST_PHOTOS, camera=TEST_CAMERA)
    budget = cpu_minutes * 60.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    data_cpu, step, losses, curve = 0.0, 0, [], []
    while (used := time.process_time() - cpu0 - data_cpu) < budget:
        progress = used / budget
        lr = recipe["lr"] * min(1.0, (step + 1) / recipe["warmup"]) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        d0 = time.process_time()
        clean, noisy = pool.batch(recipe["batch"], recipe["patch"])
        data_cpu += time.process_time() - d0
        # The shipped step; no scheduler (the learning rate above follows CPU time) and no EMA (scored raw).
        loss = train_step(model=model, optimizer=opt, clean=clean, noisy=noisy, T=T, kind=recipe["loss"],
                          weights=weights, grad_clip=recipe["clip"])
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            curve.append({"step": step, "cpu_s": round(used, 1), "loss": float(np.mean(losses[-100:]))})
            print(f"{name}: step {step} loss {curve[-1]['loss']:.4f} lr {lr:.2e} cpu {used:.0f}/{budget:.0f}s",
                  flush=True)
    train_cpu = time.process_time() - cpu0 - data_cpu
    result = {
        "run": name, "config": config.to_dict(), "recipe": recipe, "params": stats["params"],
        "macs_per_pixel": stats["macs_per_pixel"], "steps": step, "samples": step * recipe["batch"],
        "train_cpu_s": train_cpu, "samples_per_cpu_s": step * recipe["batch"] / train_cpu,
        "wall_s": time.perf_counter() - wall0, "final_loss": float(np.mean(losses[-100:])), "curve": curve,
        "val": score(model, val, T=T), "test": score(model, test, T=T),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    torch.save({"config": config.to_dict(), "state": model.state_dict()}, out / f"{name}.pt")
    print(f"{name}: val {result['val']} test {result['test']}", flush=True)
    return result


def table(folder: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    lines = ["| run | params | MACs/px | samples/CPU-s | steps | val direct | val improved K=5 | "
             "test direct | test improved K=5 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["val"]["improved5"]):
        v, t = r["val"], r["test"]
        lines.append(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['macs_per_pixel'] / 1e3:.0f}k | "
                     f"{r['samples_per_cpu_s']:.1f} | {r['steps']} | {v['direct']:.2f} | {v['improved5']:.2f} | "
                     f"{t['direct']:.2f} | {t['improved5']:.2f} |")
    if rows:
        se = max(max(r["val"]["improved5_se"], r["test"]["improved5_se"]) for r in rows)
        lines.append(f"\nnoisy input: val {rows[0]['val']['noisy']:.2f} dB, test {rows[0]['test']['noisy']:.2f} dB; "
                     f"standard errors of the means <= {se:.2f} dB (the same blocks in every run, so differences "
                     f"between runs are measured more precisely than that)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=[], help="candidates, optionally with :key=value overrides")
    parser.add_argument("--cpu-minutes", type=float, default=5.0, help="process CPU time per run (one thread)")
    parser.add_argument("--seed", type=int, default=0, help="weights, crops and noise; runs of seed N > 0 are "
                                                            "saved as <run>_seedN")
    parser.add_argument("--out", type=Path, default=Path("reports/ablation"))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of OUT and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    torch.set_num_threads(1)
    for spec in args.runs:
        run(*parse_run(spec), cpu_minutes=args.cpu_minutes, seed=args.seed, out=args.out)


if __name__ == "__main__":
    main()
