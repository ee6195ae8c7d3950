"""What each rank runs: build its tower, train with the paper's recipe, evaluate, checkpoint.

Rank 0 alone reads and decodes the data and broadcasts every batch, so both
towers see the identical images and augmentation and no image is decoded twice.
Rank 0 alone writes files; the other rank ships its half of the state to it.
The functions ``train_one_epoch``, ``evaluate`` and ``main`` follow torchvision's
classification reference.
"""

import dataclasses
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from towers import Tower, build_reference, shard_state_dict, unshard_state_dicts

from . import data as data_module
from .checkpoint import FILENAME, checkpoint_payload, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .step import paper_optimizer, train_step

log = logging.getLogger(__name__)
IMAGE_SHAPE = (3, 224, 224)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Plan:
    """What both ranks must know about the data; rank 0 reads it and tells rank 1."""
    classes: list
    batches_per_epoch: int
    val_images: int


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of it already done
    global_step: int = 0
    lr: float = 0.0  # base rate of the schedule, before warm-up
    best_error: float = math.inf
    bad_epochs: int = 0
    reductions: int = 0


# ---------------------------------------------------------------- data on rank 0, broadcast to rank 1

def _next_quietly(iterator: Iterator):
    """next() that leaves the global RNG alone (a DataLoader draws its seed from it), so
    that dropout masks depend only on the training steps taken, and a resumed run
    matches an uninterrupted one exactly."""
    with torch.random.fork_rng(devices=[]):
        return next(iterator, None)


def shared_batches(source: Optional[Iterable], sizes: Iterable[int], device, group, views: int = 1) -> Iterator:
    """Yields (images, labels) on both ranks: rank 0 draws them from ``source`` and
    broadcasts them; rank 1 passes ``source=None`` and receives. ``sizes`` (known to
    both ranks) gives each batch's number of labelled items, each ``views`` images
    (10 for the ten-patch test), and so how many batches there are."""
    iterator = iter(source) if source is not None else None
    for size in sizes:
        if iterator is not None:
            item = _next_quietly(iterator)
            assert item is not None and len(item[1]) == size, "the data does not match the plan of batches"
            images = item[0].to(device, non_blocking=True).reshape(size * views, *IMAGE_SHAPE)
            labels = item[1].to(device, non_blocking=True)
        else:
            images = torch.empty((size * views, *IMAGE_SHAPE), device=device)
            labels = torch.empty((size,), dtype=torch.int64, device=device)
        dist.broadcast(images, src=0, group=group)
        dist.broadcast(labels, src=0, group=group)
        yield images, labels


def eval_sizes(val_images: int, batch_size: int) -> list:
    full, rest = divmod(val_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


# ---------------------------------------------------------------- model, optimizer and their state

def build_tower(config: TrainConfig, num_classes: int, group, device) -> Tower:
    """This rank's half of the reference built from the seed: a two-tower run starts
    from exactly the weights of a single-device run with the same seed."""
    reference = build_reference(num_classes, seed=config.seed, dropout=config.dropout, init=config.init)
    tower = Tower(group, num_classes, config.dropout, config.fc8_placement)
    tower.load_state_dict(shard_state_dict(reference.state_dict(), dist.get_rank(group), config.fc8_placement))
    return tower.to(device)


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(path: Path, tower: Tower, optimizer, progress: Progress, config: TrainConfig,
                        classes: list, group) -> None:
    """Collective: rank 1 ships its half to rank 0, which writes one unsharded checkpoint."""
    rank = dist.get_rank(group)
    momentum = {name: optimizer.state[p]["momentum_buffer"].cpu()
                for name, p in tower.named_parameters() if optimizer.state[p].get("momentum_buffer") is not None}
    mine = {"model": {k: v.cpu() for k, v in tower.state_dict().items()}, "momentum": momentum,
            "rng": _rng_state(next(tower.parameters()).device)}
    gathered = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(mine, gathered, dst=dist.get_global_rank(group, 0), group=group)
    if rank != 0:
        return
    placement = config.fc8_placement
    extra = {
        "momentum_buffer": unshard_state_dicts([g["momentum"] for g in gathered], placement) if momentum else {},
        "progress": dataclasses.asdict(progress),
        "rng": {f"rank{r}": g["rng"] for r, g in enumerate(gathered)},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "classes": list(classes),
    }
    model = unshard_state_dicts([g["model"] for g in gathered], placement)
    save_checkpoint(path, checkpoint_payload(model, num_classes=len(classes), **extra))


def restore_training_state(path, tower: Tower, optimizer, num_classes: int, group, with_training: bool) -> Optional[Progress]:
    """Collective: rank 0 loads an unsharded checkpoint and sends each rank its half.
    With ``with_training`` also the momentum, the RNG states and the progress."""
    rank, device = dist.get_rank(group), next(tower.parameters()).device
    placement = tower.fc8_placement
    shards = None
    if rank == 0:
        payload = load_checkpoint(path, num_classes)
        momentum = payload.get("momentum_buffer", {}) if with_training else {}
        shards = [{"model": shard_state_dict(payload["model"], r, placement),
                   "momentum": shard_state_dict(momentum, r, placement) if momentum else {},
                   "rng": payload.get("rng", {}).get(f"rank{r}") if with_training else None,
                   "progress": payload.get("progress") if with_training else None} for r in range(2)]
    received = [None]
    dist.scatter_object_list(received, shards, src=dist.get_global_rank(group, 0), group=group)
    mine = received[0]
    tower.load_state_dict(mine["model"])
    for name, p in tower.named_parameters():
        if name in mine["momentum"]:
            optimizer.state[p]["momentum_buffer"] = mine["momentum"][name].to(device)
    if mine["rng"] is not None:
        _set_rng_state(mine["rng"], device)
    return Progress(**mine["progress"]) if mine["progress"] else None


# ---------------------------------------------------------------- what rank 0 shows and writes

class StepMeter:
    """Rolling numbers for the step line: loss, top-1, images/s, ms/step, ETA."""

    def __init__(self, window: int = 20):
        self.window, self.times, self.losses, self.hits, self.images = window, [], [], [], []
        self.last = time.perf_counter()

    def update(self, loss: float, correct: int, images: int) -> None:
        now = time.perf_counter()
        for series, value in ((self.times, now - self.last), (self.losses, loss), (self.hits, correct), (self.images, images)):
            series.append(value)
            del series[:-self.window]
        self.last = now

    def restart_clock(self) -> None:
        self.last = time.perf_counter()

    @property
    def ms_per_step(self) -> float:
        return 1000 * sum(self.times) / max(1, len(self.times))

    @property
    def images_per_s(self) -> float:
        return sum(self.images) / max(1e-9, sum(self.times))

    @property
    def loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    @property
    def top1(self) -> float:
        return sum(self.hits) / max(1, sum(self.images))


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS of this rank's process


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressBar:
    """A one-line bar on a terminal (rank 0 only); nothing when stderr is not a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.shown = False

    def show(self, done: int, total: int, text: str) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / max(1, total))
        sys.stderr.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


class Metrics:
    """metrics.jsonl: one JSON object per line, appended (a resumed run continues the file)."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")


# ---------------------------------------------------------------- evaluation and training

@torch.no_grad()
def evaluate(tower: Tower, bundle, plan: Plan, batch_size: int, device, group, ten_crop: bool = False,
             workers: int = 0) -> dict:
    """Top-1 and top-5 error on the validation images: the centre patch, or the ten-patch
    test (four corners and centre and their reflections, softmax averaged)."""
    views = 10 if ten_crop else 1
    if ten_crop:
        batch_size = max(1, batch_size // 4)  # ten images per item
    source = None
    if bundle is not None:
        source = data_module.eval_batches(bundle, batch_size, ten_crop=ten_crop, workers=workers, limit=plan.val_images)
    was_training = tower.training
    tower.eval()
    top1 = top5 = seen = 0
    for images, labels in shared_batches(source, eval_sizes(plan.val_images, batch_size), device, group, views):
        probs = F.softmax(tower(images).float(), dim=1)
        probs = probs.view(len(labels), views, -1).mean(dim=1)
        best = probs.topk(min(5, probs.shape[1]), dim=1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=1).sum().item()
        seen += len(labels)
    tower.train(was_training)
    return {"top1_error": 1 - top1 / seen, "top5_error": 1 - top5 / seen, "images": seen,
            "test": "ten-patch" if ten_crop else "centre patch"}


def learning_rate(config: TrainConfig, progress: Progress) -> float:
    """The schedule's rate with linear warm-up over the first ``warmup_steps`` steps."""
    if config.warmup_steps and progress.global_step < config.warmup_steps:
        return progress.lr * (progress.global_step + 1) / config.warmup_steps
    return progress.lr


def end_of_epoch_schedule(config: TrainConfig, progress: Progress, val_error: float) -> None:
    """Section 5: divide the rate by 10 when the validation error stops improving
    ('plateau'), or at fixed epochs ('fixed', the authors' released run)."""
    if config.schedule == "fixed":
        progress.lr = config.lr * 0.1 ** sum(progress.epoch >= m for m in config.lr_milestones)
        return
    if val_error < progress.best_error:
        progress.best_error, progress.bad_epochs = val_error, 0
        return
    progress.bad_epochs += 1
    if progress.bad_epochs >= config.patience and progress.reductions < config.max_reductions:
        progress.lr /= 10
        progress.reductions += 1
        progress.bad_epochs = 0
        log.info("validation error stopped improving: learning rate now %.g", progress.lr)


def train_one_epoch(tower, optimizer, bundle, plan: Plan, config: TrainConfig, progress: Progress, device, group,
                    run_dir: Optional[Path], metrics: Metrics, bar: ProgressBar, workers: int) -> bool:
    """Trains from ``progress.batch`` to the end of the epoch; returns False when
    ``max_steps`` stopped it early."""
    steps_left = plan.batches_per_epoch - progress.batch
    if config.max_steps is not None:
        steps_left = min(steps_left, config.max_steps - progress.global_step)
    source = None
    if bundle is not None:
        source = data_module.train_batches(bundle, config.batch_size, config.seed, progress.epoch,
                                           start_batch=progress.batch, workers=workers)
    meter = StepMeter()
    total_steps = config.epochs * plan.batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    tower.train()
    for images, labels in shared_batches(source, [config.batch_size] * steps_left, device, group):
        lr = learning_rate(config, progress)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        result = train_step(tower, optimizer, images, labels)
        loss = result.loss.item()
        progress.batch += 1
        progress.global_step += 1
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"the loss became {loss} at epoch {progress.epoch + 1}, step {progress.global_step}; the run stops "
                f"and keeps its last good checkpoint{' in ' + str(run_dir) if run_dir else ''}. Lower --lr or "
                f"lengthen --warmup-steps, and resume or start again")
        meter.update(loss, int(result.correct), len(labels))
        eta = (total_steps - progress.global_step) * meter.ms_per_step / 1000
        line = (f"epoch {progress.epoch + 1}/{config.epochs} step {progress.batch}/{plan.batches_per_epoch} "
                f"loss {meter.loss:.4f} top-1 {100 * meter.top1:5.1f}% | {meter.images_per_s:6.1f} img/s "
                f"{meter.ms_per_step:7.0f} ms/step lr {lr:.2g} mem {peak_memory_bytes(device) / 2**30:.2f} GiB "
                f"| ETA {_duration(eta)}")
        bar.show(progress.global_step, total_steps, line)
        if progress.global_step % config.log_every == 0 or progress.batch == plan.batches_per_epoch:
            bar.clear()
            log.info(line)
            metrics.write(event="train", epoch=progress.epoch + 1, step=progress.global_step, loss=meter.loss,
                          top1=meter.top1, images_per_s=meter.images_per_s, ms_per_step=meter.ms_per_step, lr=lr,
                          peak_memory_bytes=peak_memory_bytes(device))
        if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0 \
                and progress.batch < plan.batches_per_epoch:
            save_training_state(run_dir / FILENAME if run_dir else None, tower, optimizer, progress, config,
                                plan.classes, group)
        meter.restart_clock()  # the step line and checkpoints are not the step's time
    bar.clear()
    return progress.batch == plan.batches_per_epoch


# ---------------------------------------------------------------- one rank's whole run

def setup_logging(rank: int, run_dir: Optional[Path]) -> None:
    """Rank 0 prints the step lines and keeps train.log; the other rank reports only warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root.addHandler(console)
    if run_dir is not None:
        logfile = logging.FileHandler(run_dir / "train.log")
        logfile.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        root.addHandler(logfile)


def default_workers() -> int:
    import os
    return min(4, (os.cpu_count() or 1) // 4)


def run_rank(rank: int, config: TrainConfig, run_dir: Optional[str], backend: str) -> Optional[dict]:
    """The program of one rank (spawned by ``launch.two_gpu`` or started by torchrun).
    Returns the run's summary on rank 0."""
    started = time.time()
    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    run_dir = Path(run_dir) if run_dir is not None and rank == 0 else None
    setup_logging(rank, run_dir)
    torch.manual_seed(config.seed + 1 + rank)  # each tower its own dropout masks, as on two GPUs
    workers = config.workers if config.workers is not None else default_workers()

    bundle = data_module.open_data(config.data) if rank == 0 else None
    plan = [None]
    if rank == 0:
        val_images = len(bundle.val) if config.val_limit is None else min(config.val_limit, len(bundle.val))
        plan = [Plan(list(bundle.classes), data_module.batches_per_epoch(bundle, config.batch_size), val_images)]
    dist.broadcast_object_list(plan, src=dist.get_global_rank(group, 0), group=group)
    plan = plan[0]

    tower = build_tower(config, len(plan.classes), group, device)
    optimizer = paper_optimizer(tower.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    metrics = Metrics(run_dir / "metrics.jsonl" if run_dir else None)
    bar = ProgressBar(enabled=rank == 0)
    evaluate_now = lambda ten_crop=False: evaluate(tower, bundle, plan, config.batch_size, device, group,
                                                   ten_crop, workers)
    summary = {"run_dir": str(run_dir) if run_dir else None, "backend": backend, "device": str(device),
               "fc8_placement": config.fc8_placement, "classes": len(plan.classes),
               "data": str(bundle.root) if bundle else None}

    if config.eval_only:
        restore_training_state(config.eval_only, tower, optimizer, len(plan.classes), group, with_training=False)
        summary["checkpoint"] = config.eval_only
        summary["centre"] = evaluate_now()
        if config.ten_crop:
            summary["ten_patch"] = evaluate_now(ten_crop=True)
        metrics.write(event="eval_only", **summary)
        return summary if rank == 0 else None

    progress = Progress(lr=config.lr)
    if config.resume:
        progress = restore_training_state(config.resume, tower, optimizer, len(plan.classes), group,
                                          with_training=True) or progress
        log.info("resumed from %s at epoch %d, step %d", config.resume, progress.epoch + 1, progress.global_step)
    checkpoint = run_dir / FILENAME if run_dir else None
    steps_at_start, train_seconds = progress.global_step, 0.0
    last_eval = None
    while progress.epoch < config.epochs:
        epoch_started = time.time()
        finished = train_one_epoch(tower, optimizer, bundle, plan, config, progress, device, group, run_dir,
                                   metrics, bar, workers)
        train_seconds += time.time() - epoch_started
        if not finished:  # --max-steps reached within the epoch
            save_training_state(checkpoint, tower, optimizer, progress, config, plan.classes, group)
            last_eval = None
            break
        last_eval = evaluate_now()
        progress.epoch, progress.batch = progress.epoch + 1, 0
        end_of_epoch_schedule(config, progress, last_eval["top1_error"])
        log.info("epoch %d/%d: validation top-1 error %.2f%%, top-5 error %.2f%% (%s, %d images)", progress.epoch,
                 config.epochs, 100 * last_eval["top1_error"], 100 * last_eval["top5_error"], last_eval["test"],
                 last_eval["images"])
        metrics.write(event="eval", epoch=progress.epoch, step=progress.global_step, lr=progress.lr, **last_eval)
        save_training_state(checkpoint, tower, optimizer, progress, config, plan.classes, group)

    summary["centre"] = last_eval or evaluate_now()
    if config.ten_crop:
        summary["ten_patch"] = evaluate_now(ten_crop=True)
    steps = progress.global_step - steps_at_start
    summary.update(epochs=progress.epoch, steps=progress.global_step, checkpoint=str(checkpoint) if checkpoint else None,
                   train_seconds=train_seconds, wall_seconds=time.time() - started,
                   images_per_s=steps * config.batch_size / max(train_seconds, 1e-9),
                   exchanged_bytes_sent=tower.exchange_log.sent_bytes)
    if rank == 0:
        metrics.write(event="summary", **summary)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary if rank == 0 else None
