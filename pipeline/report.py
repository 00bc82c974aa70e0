"""The evaluation report: the per-(method, K) summary, its Markdown, the plots, and publishing.

Plain functions of the result rows and the run's facts: no Ray and no model, so they test alone.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.diffusion import SAMPLERS
from pipeline.images import decode_png_float
from pipeline.settings import Settings
from pipeline.storage import fsspec_for, is_s3, join, write_atomic


# ---------------------------------------------------------------- summary

def summarize(rows: list[dict], methods: Iterable[str]) -> list[dict]:
    """One row per (method, K): mean PSNR/SSIM with their standard errors and median seconds per megapixel
    over the ok cells. The standard error (sample std / sqrt(n)) says how far a mean moves with other
    pairs of the same kind: gaps well beyond twice it are real."""
    order = {m: i for i, m in enumerate(methods)}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["steps"]), []).append(row)
    summary = []
    for method, steps in sorted(groups, key=lambda g: (order[g[0]], g[1] or 0)):
        ok = [r for r in groups[method, steps] if r["status"] == "ok"]
        summary.append({"method": method, "steps": steps, "ok": len(ok), "failed": len(groups[method, steps]) - len(ok),
                        "psnr": float(np.mean([r["psnr"] for r in ok])) if ok else math.nan,
                        "ssim": float(np.mean([r["ssim"] for r in ok])) if ok else math.nan,
                        "psnr_se": _standard_error([r["psnr"] for r in ok]),
                        "ssim_se": _standard_error([r["ssim"] for r in ok]),
                        "sec_per_mp": float(np.median([r["sec_per_mp"] for r in ok])) if ok else math.nan})
    return summary


def _standard_error(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def best_steps(summary: list[dict]) -> dict[str, dict]:
    """Per sampler, the summary row with the highest mean PSNR."""
    best: dict[str, dict] = {}
    for row in summary:
        if row["method"] in SAMPLERS and not math.isnan(row["psnr"]):
            if row["method"] not in best or row["psnr"] > best[row["method"]]["psnr"]:
                best[row["method"]] = row
    return best


def headline(summary: list[dict]) -> dict[str, dict]:
    """One row per method: classic methods as they are, samplers at their best K."""
    best = best_steps(summary)
    out = {}
    for row in summary:
        if row["method"] in SAMPLERS:
            out[row["method"]] = best.get(row["method"], row)
        else:
            out[row["method"]] = row
    return out


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary_markdown(summary: list[dict], *, facts: dict, notes: list[str], failures: list[dict]) -> str:
    lines = ["# Denoising evaluation", "",
             "| method | K | pairs ok | failed | PSNR (dB) | ± s.e. | SSIM | ± s.e. | s/MP (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['method']} | {row['steps'] if row['steps'] is not None else '-'} | {row['ok']} | "
                     f"{row['failed']} | {_fmt(row['psnr'], 2)} | {_fmt(row.get('psnr_se'), 2)} | "
                     f"{_fmt(row['ssim'], 4)} | {_fmt(row.get('ssim_se'), 4)} | {_fmt(row['sec_per_mp'], 3)} |")
    best = best_steps(summary)
    if best:
        lines += ["", "## Best K per sampler", ""]
        lines += [f"- {name}: K = {row['steps']} ({_fmt(row['psnr'], 2)} dB)" for name, row in best.items()]
    lines += ["", "## Measured on", ""] + [f"- {name}: {value}" for name, value in facts.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    if failures:
        lines += ["", "## Failed cells", "", "| key | method | K | reason |", "|---|---|---|---|"]
        for row in failures[:20]:
            lines.append(f"| {row['key']} | {row['method']} | {row['steps'] if row['steps'] is not None else '-'} | "
                         f"{row['reason']} |")
        if len(failures) > 20:
            lines.append(f"\n{len(failures) - 20} more in results.parquet")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots

def _plain_log_axis(axis, ticks=None) -> None:
    """Log scale with plain numbers (1, 2, 5, 10) instead of 2x10^0."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter() if ticks else FuncFormatter(lambda value, _: f"{value:g}"))
    if ticks:
        axis.set_ticks(ticks)


def _plot_psnr_vs_steps(summary: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ticks = sorted({r["steps"] for r in summary if r["steps"] is not None})
    for name in SAMPLERS:
        rows = [r for r in summary if r["method"] == name and not math.isnan(r["psnr"])]
        if name == "direct" and rows:
            ax.axhline(rows[0]["psnr"], color="tab:green", linestyle="--", label="direct (K-independent)")
        elif rows:
            ax.plot([r["steps"] for r in rows], [r["psnr"] for r in rows], marker="o", label=name)
    noisy = [r for r in summary if r["method"] == "noisy" and not math.isnan(r["psnr"])]
    if noisy:
        ax.axhline(noisy[0]["psnr"], color="gray", linestyle=":", label="noisy input")
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis, ticks)
    ax.set_xlabel("sampling steps K")
    ax.set_ylabel("mean PSNR (dB)")
    ax.set_title("PSNR vs sampling steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_psnr_vs_speed(summary: list[dict], path: Path) -> None:
    """One colour per method; the model's points are labelled with their K."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for index, method in enumerate(dict.fromkeys(r["method"] for r in summary)):
        rows = [r for r in summary if r["method"] == method and not math.isnan(r["psnr"])]
        if not rows:
            continue
        if method == "noisy":
            ax.axhline(rows[0]["psnr"], color="gray", linestyle=":", label="noisy input")
            continue
        speeds = [max(r["sec_per_mp"], 1e-4) for r in rows]
        ax.plot(speeds, [r["psnr"] for r in rows], marker="o", linestyle="-" if len(rows) > 1 else "",
                color=f"C{index}", label=method)
        for speed, row in zip(speeds, rows):
            if row["method"] in SAMPLERS:
                ax.annotate(f"K={row['steps']}", (speed, row["psnr"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("seconds per megapixel (median)")
    ax.set_ylabel("mean PSNR (dB)")
    ax.set_title("Quality vs speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_examples(pairs: list[dict], rows: list[dict], summary: list[dict], path: Path) -> None:
    """Noisy input, each method's output (samplers at their best K) and the reference, per pair."""
    import matplotlib.pyplot as plt

    best = {name: row["steps"] for name, row in best_steps(summary).items()}
    shown = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "noisy"]
    fig, axes = plt.subplots(len(pairs), len(shown) + 2, figsize=(2 * (len(shown) + 2), 2.6 * len(pairs)),
                             squeeze=False)
    for axes_row, pair in zip(axes, pairs):
        panels = [("noisy", pair["noisy"], None)]
        for method in shown:
            hit = next((r for r in rows if r["key"] == pair["key"] and r["method"] == method and r["preview"]
                        and (method not in best or r["steps"] == best[method])), None)
            title = method if method not in best else f"{method} K={best[method]}"
            panels.append((title, decode_png_float(hit["preview"]) if hit else None, hit))
        panels.append(("reference", pair["clean"], None))
        for ax, (title, image, hit) in zip(axes_row, panels):
            ax.axis("off")
            if image is None:
                ax.set_title(f"{title}\nfailed", fontsize=8)
                continue
            ax.imshow(image)
            score = f"\n{hit['psnr']:.2f} dB" if hit else ""
            ax.set_title(f"{title}{score}", fontsize=8)
        axes_row[0].set_ylabel(pair["key"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- files

def write_report(folder: Path, *, rows: list[dict], results: pa.Table, summary: list[dict], facts: dict,
                 notes: list[str], failures: list[dict], previews: list[dict], plot_steps: bool) -> None:
    """results.parquet, the plots and summary.md into one folder."""
    buffer = io.BytesIO()
    pq.write_table(results, buffer)
    (folder / "results.parquet").write_bytes(buffer.getvalue())
    if plot_steps:
        _plot_psnr_vs_steps(summary, folder / "psnr_vs_steps.png")
    _plot_psnr_vs_speed(summary, folder / "psnr_vs_speed.png")
    _plot_examples(previews, rows, summary, folder / "examples.png")
    (folder / "summary.md").write_text(summary_markdown(summary, facts=facts, notes=notes, failures=failures))


def noise_fact(card: dict) -> str:
    """Where the noisy side came from, from the dataset card."""
    noise = card.get("noise")
    if noise:
        return (f"synthetic {noise.get('model', '')} noise made at ingest from clean photos "
                f"({noise.get('variants', 1)} variant(s) each; source {card.get('source', 'unknown')})")
    return f"real noisy photos as ingested (source {card.get('source', 'unknown')})"


def publish(local_dir: Path, report: str, settings: Settings) -> None:
    """Put the finished report in place: a local folder is swapped in whole; on S3 the
    summary goes last, so a report with summary.md is complete."""
    if is_s3(report):
        fs, root = fsspec_for(report, settings)
        names = sorted(p.name for p in local_dir.iterdir())
        for name in sorted(names, key=lambda n: n == "summary.md"):
            write_atomic(fs, join(root, name), (local_dir / name).read_bytes())
        return
    target = Path(report).expanduser().resolve()
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(old)
    local_dir.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(report: str) -> Path:
    """A fresh folder for the report, beside a local target so the final rename is atomic."""
    if is_s3(report):
        return Path(tempfile.mkdtemp(prefix="eval-report-"))
    target = Path(report).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
