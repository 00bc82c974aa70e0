"""Distributed training: Ray Data patches -> Ray Train DDP workers -> checkpoints in S3; rank 0 -> MLflow.

The driver checks everything it can before touching the cluster (config, dataset card,
storage, MLflow), opens the MLflow run itself so that every worker-group attempt logs to
the same run, and at the end registers the EMA weights of the last checkpoint.
Each worker reads only its Ray Data shard; rank 0 alone validates, on fixed crops of
the validation split, and logs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import CONFIG_FILE, WEIGHTS_FILE, checkpoint_files, load_checkpoint
from pipeline.config import TrainConfig
from pipeline.diffusion import sample, time_weights
from pipeline.errors import PipelineError
from pipeline.images import to_uint8
from pipeline.metrics import psnr, ssim
from pipeline.model import UNet
from pipeline.settings import Settings
from pipeline.step import train_step
from pipeline.version import git_commit

TRAIN_STATE = "train_state.pt"
TRAIN_META = "train_state.json"
CHECKPOINT_PREFIX = "step-"
RESUME_FILES = (TRAIN_STATE, TRAIN_META, WEIGHTS_FILE, CONFIG_FILE)
METRIC_KEYS = ["train_loss", "lr", "samples_per_s", "val_psnr", "val_ssim", "val_psnr_direct", "val_ssim_direct",
               "val_psnr_noisy", "val_ssim_noisy"]


class TrainingError(PipelineError):
    """Training could not finish, or its result could not be recorded."""


# ---------------------------------------------------------------- the math of one run (no Ray)
# (the step itself and the EMA it updates: pipeline.step)

def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then a cosine down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: UNet, pairs: list[dict], *, T: int, sampler: str, steps: int,
             device: torch.device | str = "cpu") -> tuple[dict[str, float], np.ndarray]:
    """Mean PSNR/SSIM of the noisy input, the one-step ``direct`` output and the configured sampler,
    plus a strip (noisy | direct | sampler | clean) of the first pair."""
    model.eval()
    scores: dict[str, list[float]] = {}
    strip = None
    for pair in pairs:
        clean, noisy = pair["clean"], pair["noisy"]
        y = torch.from_numpy(np.ascontiguousarray(noisy.transpose(2, 0, 1)))[None].to(device)
        outputs = {"noisy": noisy}
        for name, kind, k in (("direct", "direct", 1), ("", sampler, steps)):
            out = sample(model, y, T=T, steps=k, sampler=kind).clamp(0, 1)
            outputs[name] = out[0].float().cpu().numpy().transpose(1, 2, 0)
        for name, image in outputs.items():
            suffix = f"_{name}" if name else ""
            scores.setdefault(f"val_psnr{suffix}", []).append(psnr(clean, image))
            scores.setdefault(f"val_ssim{suffix}", []).append(ssim(clean, image))
        if strip is None:
            strip = to_uint8(np.concatenate([noisy, outputs["direct"], outputs[""], clean], axis=1))
    return {k: float(np.mean(v)) for k, v in scores.items()}, strip


def nonempty_epoch(batches, *, rank: int, batch_size: int):
    """``batches``, then a TrainingError if there were none: with drop_last, a shard smaller than
    one batch gives empty epochs, and the loop would start one after another forever."""
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        raise TrainingError(f"rank {rank}: an epoch of its training shard gave no batch of {batch_size} patches "
                            f"(the shard holds fewer); lower train.batch_size or train on more data")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": [version, list(state), gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))


# ---------------------------------------------------------------- one worker

def say(message: str) -> None:
    """One line on the driver: Ray Train tees patched prints when a library wraps stdout, so bypass that."""
    print(message, file=sys.__stdout__, flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: DDP over its dataset shard; rank 0 validates, logs and writes the state."""
    import ray.train
    import ray.train.torch

    from pipeline.cluster import verbose
    from pipeline.shards import validation_pairs
    from pipeline.tracking import RunLogger

    if not verbose():  # DENOISE_VERBOSE reaches the workers in their env (pipeline.cluster)
        _quiet_worker_logs()
    config = TrainConfig.model_validate(loop_config["config"])
    settings: Settings = loop_config["settings"]
    total: int = loop_config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = config.train.threads_per_worker or max(1, int(config.scaling.resources_per_worker.get("CPU", 1)))
    torch.set_num_threads(threads)
    seed_everything(config.train.seed + 1000 * rank)

    model = UNet(config.model.unet_config()).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=opt.warmup_steps, total=total, min_ratio=opt.min_lr_ratio))

    step, run_id = 0, loop_config["run_id"]
    checkpoint, unregistered = _resume_point(ray.train.get_checkpoint(), loop_config.get("stored_checkpoint"),
                                             settings)
    if checkpoint is not None:
        # Each worker downloads its own copy: workers on one node must not share a download folder.
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(checkpoint.to_directory(tmp))
            state = torch.load(folder / TRAIN_STATE, map_location=device, weights_only=True)
            meta = json.loads((folder / TRAIN_META).read_text())
            rng_file = folder / "rng" / f"rank-{rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, run_id = int(meta["step"]), meta.get("mlflow_run_id") or run_id
        if rng is not None:
            set_rng_state(rng)
        else:  # a different world size than before: fresh, distinct streams per rank
            seed_everything(config.train.seed + 1000 * rank + step)
        if rank == 0:
            note = " (found complete in storage; Ray had not registered it)" if unregistered else ""
            say(f"resumed from checkpoint at step {step}/{total}{note}")

    ddp_model = ray.train.torch.prepare_model(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and config.train.bf16)
    shard = ray.train.get_dataset_shard("train")
    ema_decay = opt.ema_decay_for(total)
    t_weights = time_weights(config.diffusion.T, at_T=config.diffusion.time_mass_at_T)

    nodes = worker_nodes(world)
    logger = val_pairs = None
    if rank == 0:
        settings.apply_mlflow_env()  # an authenticated MLflow: its credentials came in the settings
        logger = RunLogger(loop_config["mlflow_uri"], run_id)
        logger.start(METRIC_KEYS)
        logger.tags({"worker_nodes": ",".join(ip for ip, _ in nodes),
                     "worker_node_ids": ",".join(node for _, node in nodes)})
        say(f"workers on nodes {', '.join(f'rank {r}: {ip}' for r, (ip, _) in enumerate(nodes))}")
        val = config.validation
        val_pairs = validation_pairs(config.dataset, settings, crop=val.crop, limit=val.limit)
    kill_at = config.fault_injection.kill_at_step if checkpoint is None else None

    losses: list[torch.Tensor] = []
    clock = Clock(step, samples_per_step=config.train.batch_size * world, steady_after=config.train.log_every)
    while step < total:
        batches = shard.iter_torch_batches(batch_size=config.train.batch_size, dtypes=torch.float32,
                                           device=device, drop_last=True,
                                           local_shuffle_buffer_size=config.data.shuffle_buffer or None)
        for batch in clock.waiting(nonempty_epoch(batches, rank=rank, batch_size=config.train.batch_size)):
            loss = train_step(model=ddp_model, bare_model=model, optimizer=optimizer, clean=batch["clean"],
                              noisy=batch["noisy"], T=config.diffusion.T, kind=config.diffusion.loss,
                              weights=t_weights, grad_clip=opt.grad_clip, scheduler=scheduler, ema=ema,
                              ema_decay=ema_decay, step=step, autocast=autocast)
            step += 1
            losses.append(loss)
            clock.stepped(step)

            if step % config.train.log_every == 0 or step == total:
                if rank == 0:
                    rate, lr = clock.window_rate(step), optimizer.param_groups[0]["lr"]
                    values = torch.stack(losses).float().cpu().tolist()
                    for i, value in enumerate(values):
                        logger.log({"train_loss": value}, step - len(values) + 1 + i)
                    logger.log({"lr": lr, "samples_per_s": rate}, step)
                    logger.flush()
                    say(f"step {step}/{total} | loss {np.mean(values):.4f} | lr {lr:.2e} | {rate:.1f} samples/s | "
                        f"data wait {clock.window_wait_share():.0%} | ETA {clock.eta(step, total)}")
                losses = []

            if kill_at is not None and step == kill_at:
                # A report blocks until the controller took the previous one; after two, the
                # controller has finished the poll that registered the last checkpoint, so the
                # crash comes after it, as it would in a longer run.
                ray.train.report({"step": step})
                ray.train.report({"step": step})
                if rank == 0:
                    say(f"fault injection: rank 0 kills its own process at step {step}")
                    logger.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

            metrics = {"step": step}
            if rank == 0 and (step % config.validation.every_steps == 0 or step == total):
                with clock.paused():
                    scores, strip = evaluate(ema, val_pairs, T=config.diffusion.T, sampler=config.validation.sampler,
                                             steps=config.validation.sampler_steps, device=device)
                    logger.log(scores, step)
                    logger.image(strip, "val_strip", step)
                    logger.flush()
                metrics |= scores
                say(f"validation at step {step}: PSNR noisy {scores['val_psnr_noisy']:.2f} dB, direct "
                    f"{scores['val_psnr_direct']:.2f} dB, {config.validation.sampler} {scores['val_psnr']:.2f} dB")
            if step % config.checkpoint.every_steps == 0 or step == total:
                if rank == 0:
                    metrics |= clock.summary(step) | {"mlflow_failures": logger.failures,
                                                      "mlflow_dropped": logger.dropped,
                                                      "mlflow_error": logger.first_error or ""}
                with clock.paused():
                    _report_checkpoint(metrics, step=step, rank=rank, model=model, ema=ema, optimizer=optimizer,
                                       scheduler=scheduler, config=config, run_id=run_id, total=total)
            if step >= total:
                break
        else:
            clock.epoch_done()
    if unregistered and clock.start_step >= total:
        # Resumed at the end from a checkpoint Ray never registered: report it, or the run has no result.
        _report_checkpoint({"step": step, "val_psnr": meta.get("val_psnr")}, step=step, rank=rank, model=model,
                           ema=ema, optimizer=optimizer, scheduler=scheduler, config=config, run_id=run_id,
                           total=total)
    if logger is not None:
        logger.close()


def worker_nodes(world: int) -> list[tuple[str, str]]:
    """(node address, node id) of every rank, in rank order: a collective, so every rank calls it."""
    import ray

    here = (ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id())
    if world == 1:
        return [here]
    found: list = [None] * world
    torch.distributed.all_gather_object(found, here)
    return found


def _resume_point(registered, stored_uri: str | None, settings: Settings):
    """The newer of Ray's registered checkpoint and the newest complete one in storage, and whether it is the latter.

    Ray registers a checkpoint only after its upload; an outage in between leaves a whole
    folder that Ray does not know about, and resuming from Ray's alone would repeat that work.
    """
    import ray.train

    from pipeline.storage import arrow_fs_for

    if stored_uri is None or (registered is not None and
                              checkpoint_step(registered.path) >= checkpoint_step(stored_uri)):
        return registered, False
    fs, path = arrow_fs_for(stored_uri, settings)
    return ray.train.Checkpoint(path, filesystem=fs), True


class Clock:
    """Training time without validation and checkpoint pauses: progress windows, ETA, steady rate, epochs,
    and the share of it spent waiting for the next batch (high means the run is input-bound).

    The steady rate starts after the first ``steady_after`` steps of an attempt, so worker
    start-up and the first Ray Data blocks do not count; epoch times include Ray Data's
    start of each epoch, which is part of the real cost of an epoch.
    """

    def __init__(self, step: int, *, samples_per_step: int, steady_after: int):
        now = time.perf_counter()
        self.samples_per_step = samples_per_step
        self.start_step, self.window_step, self.steady_step = step, step, step + steady_after
        self.start = self.window_start = self.epoch_start = now
        self.last_window_s = 0.0
        self.steady_start: float | None = None
        self.pause_total = self.pause_at_steady = 0.0
        self.wait_total = self.wait_at_steady = self.wait_at_window = 0.0
        self.epochs: list[float] = []

    def waiting(self, batches):
        """``batches``, timing how long each one took to arrive."""
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait_total += time.perf_counter() - started
            yield batch

    def window_wait_share(self) -> float:
        """Share of the last progress window spent waiting for data (call after ``window_rate``)."""
        waited, self.wait_at_window = self.wait_total - self.wait_at_window, self.wait_total
        return waited / max(self.last_window_s, 1e-9)

    def stepped(self, step: int) -> None:
        if step == self.steady_step:
            self.steady_start, self.pause_at_steady = time.perf_counter(), self.pause_total
            self.wait_at_steady = self.wait_total

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.pause_total += spent
            self.window_start += spent
            self.epoch_start += spent

    def window_rate(self, step: int) -> float:
        now = time.perf_counter()
        self.last_window_s = now - self.window_start
        rate = (step - self.window_step) * self.samples_per_step / max(self.last_window_s, 1e-9)
        self.window_start, self.window_step = now, step
        return rate

    def eta(self, step: int, total: int) -> str:
        busy = time.perf_counter() - self.start - self.pause_total
        seconds = int((total - step) * busy / max(step - self.start_step, 1))
        return f"{seconds // 60}:{seconds % 60:02d}"

    def epoch_done(self) -> None:
        now = time.perf_counter()
        self.epochs.append(now - self.epoch_start)
        self.epoch_start = now

    def summary(self, step: int) -> dict:
        out = {"epoch_seconds": list(self.epochs)}
        if self.steady_start is not None and step > self.steady_step:
            busy = time.perf_counter() - self.steady_start - (self.pause_total - self.pause_at_steady)
            out["steady_samples_per_s"] = (step - self.steady_step) * self.samples_per_step / busy
            out["steady_data_wait_share"] = (self.wait_total - self.wait_at_steady) / busy
        return out


def _quiet_worker_logs() -> None:
    """Keep the driver's output to our progress lines: no per-report dumps or MLflow chatter."""
    import logging

    import mlflow  # noqa: F401 - configures its loggers on import; set the level after that

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:  # Ray Train logs every report under this module's file name, at INFO
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _report_checkpoint(metrics: dict, *, step: int, rank: int, model, ema, optimizer, scheduler,
                       config: TrainConfig, run_id: str, total: int) -> None:
    """Every rank adds its RNG state; rank 0 adds weights, EMA, optimizer and schedule. Ray merges them."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "rng").mkdir()
        torch.save(rng_state(), folder / "rng" / f"rank-{rank}.pt")
        if rank == 0:
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, folder / TRAIN_STATE)
            meta = {"step": step, "total_steps": total, "mlflow_run_id": run_id, "val_psnr": metrics.get("val_psnr"),
                    "run_name": config.run_name}
            (folder / TRAIN_META).write_text(json.dumps(meta, indent=2))
            # The EMA weights in the plain checkpoint format, so the folder is also a loadable model.
            ema_cpu = copy.deepcopy(ema).cpu()
            for name, data in checkpoint_files(ema_cpu, T=config.diffusion.T, extra=meta).items():
                (folder / name).write_bytes(data)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:08d}")


def checkpoint_step(path: str) -> int:
    """The step in a checkpoint folder's name (``.../step-00000040`` -> 40)."""
    return int(path.rstrip("/").rsplit("/", 1)[-1].removeprefix(CHECKPOINT_PREFIX))


def stored_checkpoint(fs, run_dir: str) -> str | None:
    """The newest ``step-*`` folder under the run that holds every file a resume reads, or None.

    Every file is one S3 object, whole or absent, so presence is completeness.
    """
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    folders = [i.path for i in infos
               if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
               and i.base_name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        files = fs.get_file_info([f"{folder}/{name}" for name in RESUME_FILES])
        if all(f.type == pafs.FileType.File for f in files):
            return folder
    return None


# ---------------------------------------------------------------- the driver

def plan_steps(config: TrainConfig, card: dict) -> int:
    """Total optimizer steps: given, or epochs x the batches one worker sees per epoch.

    Either way an epoch must hold one batch on every worker: the loop drops the last partial
    batch, so a smaller dataset would give empty epochs (``nonempty_epoch``).
    """
    train_pairs = (card.get("counts") or {}).get("train")
    if train_pairs is None:  # an older card: nothing to check here, the loop still refuses an empty epoch
        if config.train.steps is None:
            raise TrainingError(f"{config.dataset}/dataset.json has no train count to plan epochs from; "
                                f"give train.steps")
        return config.train.steps
    patches = int(train_pairs) * config.data.crops_per_image
    per_epoch = patches // (config.train.batch_size * config.scaling.num_workers)
    if per_epoch < 1:
        raise TrainingError(f"{patches} patches per epoch are fewer than one batch on every worker "
                            f"({config.train.batch_size} x {config.scaling.num_workers}); lower train.batch_size")
    if config.train.steps is not None:
        return config.train.steps
    return config.train.epochs * per_epoch


def check_dataset(config: TrainConfig, settings: Settings) -> dict:
    """The dataset card, or a clear error when the dataset is missing or has nothing to train on."""
    from pipeline.shards import DatasetError, read_card, split_files

    card = read_card(config.dataset, settings)
    counts = card.get("counts") or {}
    for split in ("train", "val"):
        if split in counts and not counts[split]:
            raise DatasetError(f"dataset {config.dataset} has no '{split}' pairs (dataset.json counts: {counts}); "
                               f"ingest more pairs")
        split_files(config.dataset, split, settings)
    return card


def train(config: TrainConfig, settings: Settings, *, promote: bool = False, register_model: bool = True,
          log=print) -> dict:
    """Check, train (or resume) on the Ray cluster, register the EMA model; returns a summary."""
    from pipeline.cluster import init_ray, require_shared
    from pipeline.storage import arrow_fs_for, check_storage, is_s3
    from pipeline.tracking import check_mlflow, open_training_run, training_datasets

    if is_s3(config.dataset) or is_s3(config.storage_path or "s3://"):
        check_storage(settings)
    card = check_dataset(config, settings)
    check_mlflow(settings.mlflow_uri)
    total = plan_steps(config, card)
    init_ray(settings)
    # Workers read the dataset and write checkpoints: on a cluster neither may be on this disk.
    require_shared(settings, dataset=config.dataset, storage_path=config.storage_path)
    run_name = config.run_name or time.strftime("train-%Y%m%d-%H%M%S")
    config = config.model_copy(update={"run_name": run_name})
    storage_uri = config.storage_path or settings.uri("checkpoints")
    storage_fs, storage_path = arrow_fs_for(storage_uri, settings)

    commit = git_commit()
    params = {**config.flat(), "dataset_hash": card.get("dataset_hash"), "git_commit": commit, "total_steps": total,
              "train_pairs": (card.get("counts") or {}).get("train"), "val_pairs": (card.get("counts") or {}).get("val")}
    location = f"{storage_uri.rstrip('/')}/{run_name}"
    run_id, resumed, changed = open_training_run(
        settings.mlflow_uri, experiment=config.mlflow.experiment, run_name=run_name, location=location,
        params=params, tags={"dataset": config.dataset, **({"git_commit": commit} if commit else {})},
        datasets=training_datasets(config.dataset, card))
    log(f"run {run_name}: {total} steps on {config.scaling.num_workers} worker(s), checkpoints in {location}, "
        f"MLflow run {run_id}{' (resumed)' if resumed else ''}")
    if changed:
        log(f"warning: the MLflow run keeps its first values of changed params: {', '.join(changed)}")

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    stored = stored_checkpoint(storage_fs, f"{storage_path.rstrip('/')}/{run_name}")
    stored_uri = None if stored is None else (f"s3://{stored}" if is_s3(storage_uri) else stored)
    result = _fit(config, settings, total=total, run_id=run_id, storage_fs=storage_fs, storage_path=storage_path,
                  stored_checkpoint=stored_uri)
    metrics = result.metrics or {}
    if metrics.get("mlflow_failures") or metrics.get("mlflow_dropped"):
        log(f"warning: MLflow logging failed {metrics['mlflow_failures']} time(s) during training "
            f"({metrics.get('mlflow_error')}); {metrics['mlflow_dropped']} value(s) were not logged")
    checkpoint_uri = f"s3://{result.checkpoint.path}" if is_s3(storage_uri) else result.checkpoint.path
    log(f"trained to step {metrics.get('step')}: val PSNR {metrics.get('val_psnr', float('nan')):.2f} dB "
        f"({config.validation.sampler}, K={config.validation.sampler_steps}) vs noisy "
        f"{metrics.get('val_psnr_noisy', float('nan')):.2f} dB; checkpoint {checkpoint_uri}")
    if "steady_samples_per_s" in metrics:
        log(f"throughput {metrics['steady_samples_per_s']:.1f} samples/s after warm-up, "
            f"{metrics['steady_data_wait_share']:.0%} of it waiting for data")
    summary = {"run_name": run_name, "run_id": run_id, "checkpoint": checkpoint_uri, "metrics": metrics,
               "total_steps": total}
    if register_model:
        summary |= register(config, settings, result.checkpoint, run_id=run_id, promote_champion=promote, log=log)
    return summary


def _fit(config: TrainConfig, settings: Settings, *, total: int, run_id: str, storage_fs, storage_path: str,
         stored_checkpoint: str | None = None):
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import train_data_config, verbose
    from pipeline.shards import training_patches

    data_context = ray.data.DataContext.get_current()
    # No bars from the split coordinator, and no "progress bars disabled" warning either: it logs its
    # progress at INFO instead, kept off the console unless DENOISE_VERBOSE is set (pipeline.cluster).
    data_context.use_ray_tqdm = False
    patches = training_patches(config.dataset, settings, patch_size=config.data.patch_size,
                               crops_per_image=config.data.crops_per_image, seed=config.data.seed,
                               noise_seed=config.data.noise.seed, noise_model=config.data.noise.model,
                               synthetic=config.data.synthetic, synthetic_weight=config.data.synthetic_weight,
                               channel_shuffle=config.data.channel_shuffle)
    scaling = config.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "settings": settings, "total_steps": total,
                           "run_id": run_id, "mlflow_uri": settings.mlflow_uri,
                           "stored_checkpoint": stored_checkpoint},
        torch_config=TorchConfig(backend=scaling.torch_backend),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=dict(scaling.resources_per_worker),
                                               placement_strategy=scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=config.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep,
                                                         checkpoint_score_attribute="val_psnr",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets={"train": patches},
        dataset_config=train_data_config(),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training run {config.run_name} failed after {scaling.max_failures} restart(s): "
                            f"{_root_cause(exc)}; rerun with --name {config.run_name} to resume from its last "
                            f"checkpoint") from None
    if result.checkpoint is None:
        raise TrainingError(f"training run {config.run_name} ended without a checkpoint")
    return result


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def register(config: TrainConfig, settings: Settings, checkpoint, *, run_id: str, promote_champion: bool,
             log=print) -> dict:
    """Log the checkpoint's EMA model to the run, register it with alias ``candidate``, maybe promote it."""
    import mlflow

    from pipeline.modelstore import log_denoiser, promote
    from pipeline.tracking import TrackingError, check_mlflow

    name = config.mlflow.registered_model
    try:
        check_mlflow(settings.mlflow_uri)
    except TrackingError as exc:
        raise TrainingError(f"training finished but the model was not registered: {exc}; once MLflow is back, "
                            f"rerun with --name {config.run_name} to register the last checkpoint",
                            transient=exc.transient) from None
    with checkpoint.as_directory() as folder:
        model, meta = load_checkpoint(folder)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    client = mlflow.MlflowClient(settings.mlflow_uri)
    out: dict = {}
    try:
        with mlflow.start_run(run_id=run_id):
            info = log_denoiser(model, T=meta["T"], registered_name=name, sampler=config.validation.sampler,
                                steps=config.validation.sampler_steps, extra=meta["extra"])
            version = str(info.registered_model_version)
            client.set_registered_model_alias(name, "candidate", version)
            out |= {"model_name": name, "model_version": version}
            log(f"registered {name} version {version} (alias candidate) from run {run_id}")
            if promote_champion:
                decision = promote(name, version, metric="val_psnr", alias="champion", settings=settings)
                mlflow.log_dict(decision, "promotion.json")
                mlflow.set_tag("promotion", "champion" if decision["promoted"] else "not promoted")
                scores = {k: v for k, v in (("promotion_candidate_val_psnr", decision["candidate_score"]),
                                            ("promotion_champion_val_psnr", decision["previous_score"]))
                          if v is not None}
                mlflow.log_metrics(scores)
                previous = (f"version {decision['previous_version']} at {decision['previous_score']:.2f} dB"
                            if decision["previous_score"] is not None else "no champion yet")
                verdict = "now champion" if decision["promoted"] else f"champion unchanged: {decision['reason']}"
                log(f"promotion: version {version} at {decision['candidate_score'] or float('nan'):.2f} dB vs "
                    f"{previous}: {verdict}")
                out["promotion"] = decision
    except TrainingError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow and its store raise many types
        raise TrainingError(f"training finished but registering the model failed: {_root_cause(exc)}; rerun with "
                            f"--name {config.run_name} to register the last checkpoint") from None
    return out
