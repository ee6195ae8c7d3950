"""What each rank runs: build its tower (or, with --layout single, the reference), train
with the paper's recipe, evaluate, checkpoint.

The ranks form D replicas of the towers (:mod:`launch.mesh`; D = 1 unless asked for).
Each replica's first tower reads and decodes its share of every batch (a D-th) and
broadcasts it to the other tower, so both towers see the identical images and
augmentation and no image is decoded twice. Each tower's gradients are averaged
over the replicas by DistributedDataParallel on the replica group, bucket by bucket
while the backward pass goes on; the step line and evaluations sum over replicas.
Rank 0 alone writes files; the other tower of replica 0 ships its half of the state to it.
The functions ``train_one_epoch``, ``evaluate`` and ``run_rank`` follow torchvision's
classification reference (its ``main``).
"""

import contextlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from towers import (TOWERS, AlexNet, Architecture, ExchangeLog, Tower, allocate, build_reference, compile_blocks,
                    shard_state_dict)
from towers.reference import INPUT_SIZE

from . import data as data_module
from .images import BASE_SIZE
from .checkpoint import (FILENAME, damaged_record, finite, read_as_saved, resolve_path, restore_training_state,
                         save_training_state)
from .cli import home_path, shell_word, usable_cores, write_whole
from .config import TrainConfig, update_config_json
from .mesh import Mesh, build_mesh, coordinates, loading_ranks, machine_ranks
from .ranks import ADVICE_FROM_RANK0, PREPARATION_WAIT_S, Placement, error_line, patient_group
from .meter import (Metrics, ProgressBar, RunFolderGone, StepMeter, console_handler, duration, log_warnings,
                    peak_memory, writing_in_run_folder)
from .schedule import Progress, base_rate, end_of_epoch_schedule, learning_rate
from .step import AUTOCAST, paper_optimizer, train_step

log = logging.getLogger(__name__)
IMAGE_SHAPE = (3, INPUT_SIZE, INPUT_SIZE)


# A training loss this many times ln(classes) (the loss of a uniform guess) has run away.
DIVERGED_LOSS_FACTOR = 10


class NonFiniteLoss(RuntimeError):
    pass


class NonFiniteOutputs(NonFiniteLoss):
    """The net's outputs for validation images are not finite numbers: weights that ran away
    after the last finite loss. Their top-k would be arbitrary classes, scored as guesses."""


@dataclass
class Plan:
    """What every rank must know about the data; rank 0 reads it and tells the others."""
    classes: list
    batches_per_epoch: int
    val_images: int
    train_images: int
    stats: data_module.DataStats  # for the augmentation on each rank's device
    # DataBundle.digests: a resumed run checks that its epoch goes on over the same images, and
    # that it evaluates the same ones; each replica under torchrun, that it sees rank 0's
    digests: Optional[dict] = None


@dataclass
class TimeBeyondSteps:
    """What a run spends outside its training steps, as last measured (none until the first
    epoch's end): for the ETA, whose steps alone would leave it out."""
    epoch_end_s: float = 0.0  # an epoch's end: its centre evaluation, metrics and checkpoint
    evaluation_s: float = 0.0  # a centre evaluation alone (the ten-patch test evaluates ten patches an image)

    def ahead(self, step: int, last_step: int, batches_per_epoch: int, ten_patch: bool) -> float:
        """The seconds after training step ``step`` that are not steps, to ``last_step``: each
        epoch end from ``step``'s on; a run stopped by --max-steps within an epoch also saves
        and evaluates after its last step; and the final ten-patch test."""
        ends = last_step // batches_per_epoch - (step - 1) // batches_per_epoch
        ends += last_step % batches_per_epoch > 0
        return ends * self.epoch_end_s + (10 * self.evaluation_s if ten_patch else 0.0)


# ---------------------------------------------------- data on a replica's first tower, broadcast to the other

def _next_quietly(iterator: Iterator):
    """next() that leaves the global RNG alone, so that dropout masks depend only on the
    training steps taken, and a resumed run matches an uninterrupted one exactly: a
    DataLoader without a generator of its own draws its seed from it (``data.Loader``'s
    has one; a source of batches other than it may not)."""
    with torch.random.fork_rng(devices=[]):
        return next(iterator, None)


class InputBytes:
    """Bytes of input each rank sends (rank 0) or receives (the other) per batch."""

    def __init__(self):
        self.bytes, self.batches = 0, 0

    def add(self, *tensors) -> None:
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.batches += 1

    @property
    def per_batch(self) -> float:
        return self.bytes / max(1, self.batches)


def shared_batches(source: Optional[Iterable], batches: int, item_shape: tuple, device, group,
                   counter: Optional[InputBytes] = None, stopped: Optional[list] = None) -> Iterator:
    """Yields ``batches`` (uint8 images, labels) on ``device`` on every rank of ``group``: its
    first rank draws them from ``source`` and broadcasts each batch's number of items, then
    the batch; the others pass ``source=None`` and receive. Items are ``item_shape`` uint8
    images. A batch may be short, even empty (evaluation leaves out unusable images).
    Over gloo the batch crosses in host memory (pinned where a GPU is to receive it) and
    is then copied to the device without waiting; over NCCL it crosses on the device.
    The next batch starts crossing, without waiting, before a batch is yielded: the
    hand-over runs while the caller computes on the batch (both ranks start the same
    collectives in the same order, so they pair up whatever runs between them).
    With ``stopped`` (a list), a DataError of ``source`` (no image left to load: the folder
    gone) ends the batches on both ranks, after the one already crossing: each appends to
    ``stopped`` the error's line (None on a rank that does not load), which the caller sees
    before the step of that last batch ends. Without it, the error is raised."""
    src = dist.get_global_rank(group, 0)
    via = device if dist.get_backend(group) == dist.Backend.NCCL else torch.device("cpu")
    pinned = via.type == "cpu" and device.type == "cuda"
    iterator = iter(source) if source is not None else None

    def start_next() -> tuple:
        """(images, labels, their broadcasts under way) of the next batch; its size crosses first."""
        count, failed = torch.zeros(1, dtype=torch.int64, device=via), None
        if iterator is not None:
            try:
                item = _next_quietly(iterator)
            except data_module.DataError as exc:
                if stopped is None:
                    raise
                failed = exc
                count -= 1  # no batch: the batches end here, on both ranks
            else:
                assert item is not None, "the data ran out before the plan of batches"
                count += len(item[1])
        dist.broadcast(count, src=src, group=group)
        size = int(count.item())
        if size < 0:
            line = error_line(failed) if failed is not None else None  # the worker's, where one loaded it
            stopped.append((line.partition("DataError: ")[2] or line) if line else None)
            return None
        if iterator is not None:
            images, labels = item[0].to(via, non_blocking=True), item[1].to(via, non_blocking=True)
        else:
            images = torch.empty((size, *item_shape), dtype=torch.uint8, device=via, pin_memory=pinned)
            labels = torch.empty((size,), dtype=torch.int64, device=via, pin_memory=pinned)
        if counter is not None:
            counter.add(count, images, labels)
        return images, labels, [dist.broadcast(t, src=src, group=group, async_op=True) for t in (images, labels)]

    following = start_next() if batches > 0 else None
    for index in range(batches):
        if following is None:  # stopped
            return
        images, labels, crossing = following
        for work in crossing:
            work.wait()
        following = start_next() if index + 1 < batches else None
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ---------------------------------------------------------------- model, optimizer and their state

def architecture(config: TrainConfig) -> Architecture:
    """The net the options ask for: --layout one-tower builds section 3.2's one-GPU net,
    the other layouts the paper's two-tower net; --lrn, --pooling and --activation apply to both."""
    return Architecture(net="one-tower" if config.layout == "one-tower" else "two-tower", lrn=config.lrn,
                        pooling=config.pooling, activation=config.activation)


def build_model(config: TrainConfig, num_classes: int, group, device, draw: bool = True) -> torch.nn.Module:
    """The reference built from the seed (``--layout single`` and ``one-tower``), or this
    rank's tower cut out of it: a two-tower run starts from exactly the weights of a
    single-device run. Tower 0 draws the whole net and hands the other tower its half over
    ``group`` (a draw takes seconds of a core; the half crosses in a fraction of one). With
    ``draw`` False the weights are left undrawn for a rank that receives them: from a
    checkpoint, or from another replica."""
    net = architecture(config)
    towers = config.layout == "towers"
    tower = dist.get_rank(group) if towers else 0
    reference = (build_reference(num_classes, seed=config.seed, dropout=config.dropout, init=config.init,
                                 architecture=net) if draw and tower == 0 else None)
    if not towers and reference is not None:
        return reference.to(device)
    with torch.device("meta"):  # storage only, filled below, from a checkpoint, by tower 0 or another replica
        model = (AlexNet(num_classes, config.dropout, net) if not towers else
                 Tower(group, num_classes, config.dropout, config.fc8_placement, net))
    model = allocate(model)
    if reference is not None:
        model.load_state_dict(shard_state_dict(reference.state_dict(), tower, config.fc8_placement))
    model = model.to(device)
    if towers and draw:
        _hand_out_the_other_half(model, reference, group, device, config.fc8_placement)
    return model


def _hand_out_the_other_half(model: torch.nn.Module, reference: Optional[torch.nn.Module], group, device,
                             fc8_placement: str) -> None:
    """Tower 1's weights, cut by tower 0 out of the ``reference`` it drew, broadcast into
    tower 1's ``model`` (called by both towers, tower 0 with the reference), tensor by tensor
    in the order of their names, on the towers' devices (NCCL's tensors are a GPU's)."""
    assert dist.get_world_size(group) == TOWERS == 2, "one receiving tower"
    source = dist.get_global_rank(group, 0)
    if reference is not None:  # tower 0
        half = shard_state_dict(reference.state_dict(), 1, fc8_placement)
        for name in sorted(half):
            dist.broadcast(half[name].to(device), src=source, group=group)
    else:
        received = model.state_dict()
        for name in sorted(received):
            dist.broadcast(received[name], src=source, group=group)


# ---------------------------------------------------------------- evaluation and training

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Optional[data_module.Loader], plan: Plan, batch_size: int, device,
             mesh: Mesh, ten_crop: bool = False, autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """Top-1 and top-5 error on the validation images: the centre patch, or the ten-patch
    test (four corners and centre and their reflections, softmax averaged). Each replica
    evaluates every D-th image; the counts are summed over the replicas. ``loader``: on
    the ranks that load (None on the others)."""
    views = 10 if ten_crop else 1
    if ten_crop:
        batch_size = max(1, batch_size // 4)  # ten views of each item: a forward pass of 2.5 batches' images
    share = (mesh.replica, mesh.replicas)
    images_here = len(data_module.eval_share(plan.val_images, None, share))
    source = None
    if mesh.loads_data:
        source = loader.eval(batch_size, ten_crop=ten_crop, limit=plan.val_images, share=share)
    item_shape = (3, BASE_SIZE, BASE_SIZE) if ten_crop else IMAGE_SHAPE  # the ten views are cut on the device
    was_training = model.training
    model.eval()
    top1 = top5 = seen = broken = 0
    for images, labels in shared_batches(source, math.ceil(images_here / batch_size), item_shape, device,
                                         mesh.tower_group):
        if not len(labels):
            continue
        inputs = data_module.eval_views(images, plan.stats, ten_crop).reshape(-1, *IMAGE_SHAPE)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
        probs = F.softmax(logits.float(), dim=1)
        probs = probs.view(len(labels), views, -1).mean(dim=1)
        broken += (~torch.isfinite(probs).all(dim=1)).sum().item()
        best = probs.topk(min(5, probs.shape[1]), dim=1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=1).sum().item()
        seen += len(labels)
    model.train(was_training)
    counts = mesh.replica_sum(torch.tensor([top1, top5, seen, broken], dtype=torch.int64, device=device))
    top1, top5, seen, broken = counts.tolist()
    if seen == 0:
        raise data_module.DataError(f"none of the {plan.val_images} validation images could be used (each one "
                                    f"skipped is logged above): replace them")
    if broken:  # on every rank (the counts are summed)
        raise NonFiniteOutputs(f"the net's outputs for {broken} of the {seen} validation images are not finite "
                               f"numbers (NaN or infinite)")
    return {"top1_error": 1 - top1 / seen, "top5_error": 1 - top5 / seen, "images": seen,
            "skipped": plan.val_images - seen, "test": "ten-patch" if ten_crop else "centre patch"}


def describe_evaluation(result: dict) -> str:
    skipped = f", {result['skipped']} unusable left out" if result["skipped"] else ""
    return f"{result['test']}, {result['images']} images{skipped}"


def first_batch(batches: Iterator, mesh: Mesh, device) -> Optional[tuple]:
    """The first of ``batches``, or None where a replica has none (it could not be loaded):
    then no replica takes a step. (Where the batch after it cannot be loaded, the step on it
    is taken, and every replica stops after it, as after any step.) Collective."""
    first = next(batches, None)
    lacking = mesh.replica_sum(torch.tensor([float(first is None)], dtype=torch.float64, device=device)).item()
    return None if lacking else first


def train_one_epoch(model, optimizer, loader: Optional[data_module.Loader], plan: Plan, config: TrainConfig,
                    progress: Progress, device, mesh: Mesh, run_dir: Optional[Path], metrics: Metrics, bar: ProgressBar,
                    input_bytes: InputBytes, trainer: torch.nn.Module,
                    beyond: Optional[TimeBeyondSteps] = None) -> Tuple[bool, float]:
    """Trains from ``progress.batch`` to the end of the epoch. Returns whether it got there
    (False when ``max_steps`` stopped it early) and the seconds its steps took, each from
    the wait for its batch to its loss: not the step lines, metrics or checkpoints between
    them. ``trainer`` is ``model`` as the step runs it (under DistributedDataParallel when
    there are replicas); ``model`` is what is saved. The ETA adds ``beyond``'s time ahead."""
    share_first, share_size = data_module.share_of_batch(config.batch_size, (mesh.replica, mesh.replicas))
    steps_left = plan.batches_per_epoch - progress.batch
    if config.max_steps is not None:
        steps_left = min(steps_left, config.max_steps - progress.global_step)
    source = skipped_before = None
    if mesh.loads_data:
        source = loader.train(config.batch_size, config.seed, progress.epoch, start_batch=progress.batch,
                              share=(mesh.replica, mesh.replicas))
        skipped_before = set(loader.bundle.train.corrupt)
    meter, beyond = StepMeter(), beyond or TimeBeyondSteps()
    total_steps = config.epochs * plan.batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    model.train()
    stopped = []  # by the data, gone while the run trains (see shared_batches)
    batches = shared_batches(source, steps_left, IMAGE_SHAPE, device, mesh.tower_group, input_bytes, stopped)
    first = first_batch(batches, mesh, device)
    for crops, labels in itertools.chain([first], batches) if first is not None else ():
        # The wait for this batch (loading, the hand-over between ranks, its copy queued to the device, and
        # the next batch's taking from the loader and its size's hand-over, which begin before this one is
        # yielded): on a GPU, time in which the device has nothing to do, as each step ends by reading its loss.
        input_ms = 1000 * (time.perf_counter() - meter.last)
        # Both towers draw the same choices for the batch's positions: nothing more crosses.
        choices = data_module.train_augmentation(config.seed, progress.epoch,
                                                 progress.batch * config.batch_size + share_first, share_size)
        images = data_module.augment(crops, choices, plan.stats)
        lr = learning_rate(config, progress)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        result = train_step(trainer, optimizer, images, labels, autocast_dtype=AUTOCAST[config.precision])
        # The whole batch's loss and hits: summed over the replicas' shares (a no-op for one).
        # With whether a replica's next batch could not be loaded: then every replica stops after this step.
        totals = mesh.replica_sum(torch.stack([result.loss.double() * len(labels), result.correct.double(),
                                               torch.tensor(len(labels), dtype=torch.float64, device=device),
                                               torch.tensor(float(bool(stopped)), dtype=torch.float64,
                                                            device=device)]))
        loss_sum, correct, images_seen, stopping = totals.tolist()
        loss = loss_sum / images_seen
        progress.batch += 1
        progress.global_step += 1
        progress.loss = loss
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss} at epoch {progress.epoch + 1}, step {progress.global_step}; "
                                f"the run stops. {_after_divergence(config, run_dir, len(plan.classes))}")
        meter.update(loss, int(correct), int(images_seen))
        eta = (total_steps - progress.global_step) * meter.ms_per_step / 1000 + beyond.ahead(
            progress.global_step, total_steps, plan.batches_per_epoch, config.ten_crop)
        line = (f"epoch {progress.epoch + 1}/{config.epochs} step {progress.batch}/{plan.batches_per_epoch} "
                f"loss {meter.loss:.4f} top-1 {100 * meter.top1:5.1f}% | {meter.images_per_s:6.1f} img/s "
                f"{meter.ms_per_step:7.0f} ms/step lr {lr:.2g} mem {peak_memory(device)[0] / 2**30:.2f} GiB "
                f"| ETA {duration(eta)}")
        bar.show(progress.global_step, total_steps, line)
        if progress.global_step % config.log_every == 0 or progress.batch == plan.batches_per_epoch \
                or progress.global_step == total_steps:  # the last step of a run stopped by --max-steps too
            bar.clear()
            log.info(line)
            # loss and top1: means over the last steps, as on the step line; step_loss, step_ms and input_ms:
            # this step's alone (its time: the wait for its batch, input_ms, and the step)
            metrics.write(event="train", epoch=progress.epoch + 1, step=progress.global_step, loss=meter.loss,
                          step_loss=loss, step_ms=1000 * meter.times[-1], input_ms=input_ms, top1=meter.top1,
                          images_per_s=meter.images_per_s, ms_per_step=meter.ms_per_step, lr=lr,
                          peak_memory_bytes=peak_memory(device)[0])
        # the end of an epoch, and the last step of a run stopped by --max-steps, are saved by the caller
        if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0 \
                and progress.batch < plan.batches_per_epoch and progress.global_step < total_steps:
            bar.clear()
            save_now(run_dir, model, optimizer, progress, config, plan, mesh)
        meter.restart_clock()  # the step line and checkpoints are not the step's time
        if stopping:
            break
    bar.clear()
    said = [None] * dist.get_world_size()
    dist.all_gather_object(said, _data_lost(loader, stopped, skipped_before))  # a rank's reason stops every rank
    found = next((rank for rank, line in enumerate(said) if line is not None), None)
    if found is not None:  # the steps taken are kept, as where the validation images are gone
        save_before_stopping(run_dir, model, optimizer, progress, config, plan, mesh)
        where = f" (on rank {found}, which loads replica {coordinates(found, mesh.towers)[0]}'s images)" \
            if mesh.replicas > 1 else ""  # each replica loads its own share, from its own machine's copy
        raise data_module.DataError(said[found] + where)  # the same on each rank: named once (run_ranks)
    return progress.batch == plan.batches_per_epoch, meter.seconds


def _passed_over(loader: Optional[data_module.Loader]) -> set:
    """The training images, by name in train/, that this rank's batches met and could not use."""
    if loader is None:
        return set()
    folder = str(loader.bundle.root / "train")
    return {data_module.relative_path(path, folder) for path in loader.bundle.train.replaced}


def _data_lost(loader: Optional[data_module.Loader], stopped: list, skipped_before: Optional[set]) -> Optional[str]:
    """On a rank that loads, why the training cannot go on with the images as they are now:
    the error that ended its batches (``stopped``: the training folder gone), or a class none
    of whose training images can be used any longer (another class's would stand in for each
    of them: a class folder gone), checked where the epoch skipped images of it. Else None."""
    if loader is None:
        return None
    if stopped:
        return stopped[0]
    split = loader.bundle.train
    skipped = split.corrupt - skipped_before
    if not skipped:
        return None
    try:
        split.check_usable(each_class=True, labels={label for path, label in split.samples if path in skipped})
    except data_module.DataError as exc:
        return str(exc)
    return None


def save_before_stopping(run_dir: Optional[Path], model, optimizer, progress: Progress, config: TrainConfig,
                         plan: Plan, mesh: Mesh) -> None:
    """save_now, by a run that then stops on every rank: the ranks wait for rank 0's file to be
    written (a save is collective only to the hand-over of the halves), as a launcher ends the
    ranks still running once one has ended (this program's after seconds, torchrun's at once)."""
    try:
        save_now(run_dir, model, optimizer, progress, config, plan, mesh)
    finally:  # reached by every rank, rank 0's write failed or not: each then raises its own error
        dist.barrier()


def save_now(run_dir: Optional[Path], model, optimizer, progress: Progress, config: TrainConfig, plan: Plan,
             mesh: Mesh) -> None:
    """save_training_state into the run folder (rank 0's; None elsewhere), logged with its time."""
    started = time.perf_counter()
    save_training_state(run_dir / FILENAME if run_dir else None, model, optimizer, progress, config, plan.classes,
                        plan.train_images, mesh, plan.stats.mean, digests=plan.digests)
    if run_dir is not None and config.resume:
        with writing_in_run_folder(run_dir):  # still the run's own after the save, which took seconds
            update_config_json(run_dir, config)
    log.info("checkpoint of step %d saved in %.1f s", progress.global_step, time.perf_counter() - started)


def elsewhere_than(run_dir: Path, config: Optional[TrainConfig] = None) -> str:
    """Where a run that stopped before its first checkpoint starts again: its folder keeps the
    stopped run's log and metrics, and a new run never writes over another's files. A resume
    (of a checkpoint of another name, in a folder without its own yet) from that checkpoint."""
    if config is not None and config.resume:
        return f"from the checkpoint it resumed (--resume {shell_word(config.resume)})"
    return f"under another --run-name (or after removing {run_dir})"


def _after_divergence(config: TrainConfig, run_dir: Optional[Path], num_classes: int,
                      weights_of: Optional[int] = None) -> str:
    """Advice that works. A resumed run may lower --lr, but only a checkpoint saved before
    the loss ran away is worth resuming: its loss is compared with that of guessing
    uniformly, ln(classes), and where the weights of step ``weights_of`` ran away (their
    outputs), a checkpoint of that step or later holds them. Given by rank 0, which writes
    the checkpoints."""
    if run_dir is None:
        return ADVICE_FROM_RANK0
    lower = f"{config.lr / 10:g}"
    start_again = f"start again with a lower --lr (such as {lower}) or a longer --warmup-steps"
    if not (run_dir / FILENAME).exists():
        return f"No checkpoint was written yet: {start_again}, {elsewhere_than(run_dir, config)}"
    try:  # read as it is: load_checkpoint refuses the weights that ran away which this advice is about
        if damaged_record(run_dir / FILENAME) is not None:
            raise ValueError("its checksum does not match")
        payload = read_as_saved(run_dir / FILENAME)
        saved = payload["progress"]
        weights_finite = all(finite(v) for v in payload["model"].values() if v.is_floating_point())
    except Exception:  # damaged since it was written: not worth resuming either
        return f"The last checkpoint cannot be read: {start_again}"
    if not weights_finite or (weights_of is not None and saved["global_step"] >= weights_of):
        what = "these weights" if weights_finite else "weights that are not finite numbers"
        return (f"The last checkpoint (step {saved['global_step']}) holds {what}, so resuming it would not help: "
                f"{start_again}")
    loss = saved.get("loss")  # older checkpoints hold none
    if loss is not None and not loss < DIVERGED_LOSS_FACTOR * math.log(num_classes):
        return (f"The loss had already run away by the last checkpoint (step {saved['global_step']}, loss "
                f"{loss:.3g}), so resuming it would not help: {start_again}")
    at = f"step {saved['global_step']}" + (f", loss {loss:.3g}" if loss is not None else "")
    # (not a longer --warmup-steps: the warm-up counts from the run's first step, which the checkpoint is past)
    return f"Go on from the last checkpoint ({at}) at a lower rate: --resume {shell_word(run_dir)} --lr {lower}"


# ---------------------------------------------------------------- one rank's whole run

def _sent_bytes(exchange_log: ExchangeLog) -> dict:
    """'name/direction' -> the bytes this tower has sent there so far."""
    return {key: stats["sent_bytes"] for key, stats in exchange_log.as_dict().items()}


def setup_logging(rank: int, run_dir: Optional[Path]) -> None:
    """Rank 0 prints the step lines and keeps train.log; the other ranks report only warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console_handler("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    if run_dir is not None:
        root.addHandler(log_file(run_dir / "train.log"))
    log_warnings()


def log_file(path: Path) -> logging.Handler:
    """A handler that appends to ``path`` (train.log), each line after its time."""
    # a file name need not be UTF-8: its undecodable bytes as \udcXX, as the console shows them
    logfile = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    logfile.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    return logfile


def _replica_data(rank: int, config: TrainConfig, plan: Plan, bundle, mesh: Mesh,
                  reading: Optional[contextlib.ExitStack] = None) -> Optional[data_module.DataBundle]:
    """The data of a replica's first tower (None on the other ranks): the launcher's
    (``bundle``), or, under torchrun, the folder opened here with rank 0's statistics,
    checked to be the same set, and held against a launch.prepare into it in ``reading``
    (as the launcher, and rank 0, hold theirs). With replicas, every rank waits for the
    others' scans as long as a first scan of a large folder may take (not --timeout, one
    exchange's bound), and a rank that cannot use the data stops every rank with its one line."""
    splits = ("val",) if config.eval_only else ("train", "val")  # an evaluation reads no training image
    def open_here():
        if bundle is None and config.data is not None and reading is not None:
            held = data_module.hold_for_reading(home_path(config.data))  # a DataError where a prepare writes
            if held is not None:
                reading.enter_context(held)
        opened = bundle if bundle is not None else data_module.open_data(config.data, stats=plan.stats,
                                                                         need_train="train" in splits)
        if list(opened.classes) != plan.classes or ("train" in splits and len(opened.train) != plan.train_images):
            raise data_module.DataError(f"rank {rank} sees other data at {opened.root} ({len(opened.classes)} classes, "
                                        f"{len(opened.train)} training images) than rank 0 ({len(plan.classes)}, "
                                        f"{plan.train_images}): give every machine the same --data")
        for split, words in (("train", "training images"), ("val", "validation images")):  # it loads its shares
            if split in splits and plan.digests is not None and opened.digests[split] != plan.digests[split]:
                # the built-in set, drawn on each machine: as JPEGs of another libjpeg (another Pillow) there
                fix = "a copy of rank 0's built-in set (--data)" if opened.builtin else "the same --data"
                raise data_module.DataError(f"rank {rank} sees other {words} at {opened.root / split} than rank 0 "
                                            f"(by name, class or size): give every machine {fix}")
        return opened

    if mesh.replicas == 1:
        return open_here() if mesh.loads_data else None
    opened = failure = None
    with patient_group(max(PREPARATION_WAIT_S, config.timeout), config.timeout) as group:
        if mesh.loads_data:
            try:
                opened = open_here()
            except Exception as exc:  # raised below, once every rank knows
                failure = exc
        failures = [None] * dist.get_world_size()
        said = str(failure) if isinstance(failure, data_module.DataError) else error_line(failure) if failure else None
        dist.all_gather_object(failures, said, group=group)
    if failure is not None:
        raise failure
    for other, line in enumerate(failures):
        if line is not None:
            raise data_module.DataError(f"{line} (on rank {other})")
    return opened


def default_workers(on_gpu: bool, ranks_here: int, loaders_here: int) -> int:
    """DataLoader workers of each rank that loads, when --workers is not given. On a GPU
    the cores are there to feed it: those the ranks' own processes leave, shared by the
    ranks that load, at least 1 and at most 16 (the number torchvision's reference trains
    with). On the CPU the ranks compute on the cores: a quarter of them, at most 4."""
    cores = usable_cores()
    if on_gpu:
        return max(1, min(16, (cores - ranks_here) // loaders_here))
    return min(4, cores // 4)


def fit_shared_memory(workers: int, config: TrainConfig, loaders_here: int, say: bool) -> int:
    """``workers``, or fewer where their batches would not fit in half of /dev/shm's free space
    (the rest for the batches the rank holds, and for other programs): a batch that finds no room
    there stops the run, as in a container's 64 MB /dev/shm. A default is lowered, a --workers
    given is kept; either is said where ``say`` (once for each machine)."""
    free = data_module.shared_memory_free()
    each = data_module.worker_bytes(config.batch_size)
    room = None if free is None else free // 2 // (loaders_here * each)
    if room is None or workers <= room:
        return workers
    shm = data_module.SHARED_MEMORY
    larger = math.ceil(2 * workers * loaders_here * each / 10**9)  # GB; docker's g is a GiB, larger
    fix = f"give {shm} {larger} GB or more (docker run --shm-size={larger}g)"
    if config.workers is None:
        if say:
            log.warning("data: %s has %d MB free, room for the batches of %d DataLoader worker(s) of each rank that loads "
                        "(each holds %d batches of %d images there, %d MB), not of this machine's default %d: %d; %s "
                        "to load faster", shm, free // 10**6, room, data_module.WORKER_PREFETCH, config.batch_size,
                        each // 10**6, workers, room, fix)
        return room
    if say:
        log.warning("data: --workers %d: their batches (%d MB each worker) may not fit in %s, which has %d MB free: "
                    "give --workers %s, or %s", workers, each // 10**6, shm, free // 10**6,
                    f"{room} or fewer" if room else "0", fix)
    return workers


def compile_counts(config: TrainConfig) -> dict:
    """What torch.compile made in this process: graphs (recompilations included) and breaks."""
    if not config.compile:
        return {}
    from torch._dynamo.utils import counters
    return {"compiled_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def run_rank(rank: int, config: TrainConfig, run_dir: Optional[str], placement: Placement,
             bundle: Optional[data_module.DataBundle] = None) -> Optional[dict]:
    """The program of one rank (spawned by ``launch.two_gpu`` or started by torchrun).
    Ranks started by the launcher are handed the data it opened (``bundle``), so the tree
    is scanned once; under torchrun each replica's first tower opens it itself.
    Returns the run's summary on rank 0."""
    started = time.time()
    mesh = build_mesh(placement.towers, config.timeout)
    group = mesh.tower_group
    device = torch.device("cpu")
    if placement.device == "cuda":
        # NCCL: one GPU per rank; gloo: the ranks of this machine take turns on its GPUs.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    run_dir = Path(run_dir) if run_dir is not None and rank == 0 else None
    setup_logging(rank, run_dir)
    torch.manual_seed(config.seed + 1 + rank)  # each tower its own dropout masks, as on two GPUs
    here = machine_ranks(rank)
    ranks_here, loaders_here = len(here), loading_ranks(here, mesh.towers)
    workers = config.workers if config.workers is not None else \
        default_workers(device.type == "cuda", ranks_here, loaders_here)
    workers = fit_shared_memory(workers, config, loaders_here, say=int(os.environ.get("LOCAL_RANK", rank)) == 0)
    log.info("data: %d DataLoader worker processes for each rank that loads%s", workers,
             "" if config.workers is not None else " (the default on this machine; --workers sets it)")

    plan = [None]
    if rank == 0:
        val_images = len(bundle.val) if config.val_limit is None else min(config.val_limit, len(bundle.val))
        plan = [Plan(list(bundle.classes), data_module.batches_per_epoch(bundle, config.batch_size), val_images,
                     len(bundle.train), bundle.stats, bundle.digests)]
    dist.broadcast_object_list(plan, src=0)
    plan = plan[0]
    reading = contextlib.ExitStack()  # the data folder, against a launch.prepare into it, while the run reads it
    try:
        bundle = _replica_data(rank, config, plan, bundle, mesh, reading)
    except BaseException:  # a folder held, then refused
        reading.close()
        raise
    # One loader for the whole run: its worker processes start once, not each epoch and evaluation.
    with reading, (data_module.Loader(bundle, workers, pin_memory=device.type == "cuda") if bundle is not None
                   else contextlib.nullcontext()) as loader:

        # A resumed or evaluated run loads every weight below (restore_training_state: replica 0's are sent on
        # to the others); a new run's replicas after the first receive replica 0's drawn weights when
        # DistributedDataParallel is built below (it broadcasts them).
        model = build_model(config, len(plan.classes), group, device,
                            draw=mesh.replica == 0 and not (config.resume or config.eval_only))
        # the reference: nothing crosses
        exchange_log = model.exchange_log if isinstance(model, Tower) else ExchangeLog()
        if config.compile:  # the weights and their names stay the model's: checkpoints are unchanged
            compile_blocks(model, backend=config.compile)
        optimizer = paper_optimizer(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        metrics = Metrics(run_dir / "metrics.jsonl" if run_dir else None)
        bar = ProgressBar(enabled=rank == 0)

        def evaluate_now(ten_crop=False):
            try:
                return evaluate(model, loader, plan, config.batch_size, device, mesh, ten_crop,
                                AUTOCAST[config.precision])
            except NonFiniteOutputs as exc:  # never top-k errors of NaN outputs: what to do instead
                if config.eval_only:
                    advice = (f": {shell_word(config.eval_only)} holds the weights of a run that diverged: "
                              f"evaluate a checkpoint saved before they ran away")
                else:
                    advice = (f" at epoch {progress.epoch + 1}, step {progress.global_step}: the weights ran away; "
                              f"the run stops. "
                              f"{_after_divergence(config, run_dir, len(plan.classes), progress.global_step)}")
                raise NonFiniteOutputs(f"{exc}{advice}") from None
        summary = {"run_dir": str(run_dir) if run_dir else None, "backend": placement.backend, "device": str(device),
                   "layout": config.layout, "replicas": mesh.replicas, "fc8_placement": config.fc8_placement,
                   "precision": config.precision, "compile": config.compile, "workers": workers,
                   "classes": len(plan.classes), "data": str(bundle.root) if bundle else None}

        if config.eval_only:
            restore_training_state(config.eval_only, model, optimizer, plan.classes, mesh, with_training=False)
            summary["checkpoint"] = config.eval_only
            summary["centre"] = evaluate_now()
            if config.ten_crop:
                summary["ten_patch"] = evaluate_now(ten_crop=True)
            summary.update(compile_counts(config))
            try:
                metrics.write(event="eval_only", **summary)
            except RunFolderGone:  # nothing else of the evaluation is lost
                log.warning("%s is gone (moved, removed or replaced while it evaluated): its metrics.jsonl does not "
                            "have this evaluation, which follows", run_dir)
            return summary if rank == 0 else None

        progress = Progress(lr=config.lr)
        if config.resume:
            progress = restore_training_state(config.resume, model, optimizer, plan.classes, mesh,
                                              with_training=True)  # a checkpoint to resume holds its progress
            progress.lr = base_rate(config, progress)  # --lr may have changed on resume
            # the file resumed, as launch.two_gpu's check_resumed_file reads it back
            metrics.resume_at(progress.global_step, epoch=progress.epoch + 1,
                              checkpoint=str(resolve_path(config.resume).absolute()))
            rate = learning_rate(config, progress)  # of the next step: within the warm-up, a part of the base rate
            warming = f" (warming up to {progress.lr:g})" if rate != progress.lr else ""
            log.info("resumed from %s at epoch %d, step %d, learning rate %g%s", config.resume, progress.epoch + 1,
                     progress.global_step, rate, warming)
        checkpoint = run_dir / FILENAME if run_dir else None
        trainer = model
        if mesh.replica_group is not None:
            # Gradients averaged over the replicas in buckets, each all-reduce started as soon
            # as its gradients are ready, while the backward pass (and the towers' exchanges
            # on the tower group) goes on.
            trainer = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                              process_group=mesh.replica_group)
        steps_at_start, train_seconds = progress.global_step, 0.0
        train_exchanges = {}  # (name, direction) -> bytes this tower sent while training
        input_bytes = InputBytes()
        last_eval = None
        beyond = TimeBeyondSteps()
        # to the last epoch, or to --max-steps (which an epoch's end may reach: no epoch of no steps follows)
        while progress.epoch < config.epochs and progress.global_step < (config.max_steps or math.inf):
            sent_before = _sent_bytes(exchange_log)
            finished, seconds = train_one_epoch(model, optimizer, loader, plan, config, progress, device, mesh,
                                                run_dir, metrics, bar, input_bytes, trainer, beyond)
            train_seconds += seconds
            for key, sent in _sent_bytes(exchange_log).items():
                train_exchanges[key] = train_exchanges.get(key, 0) + sent - sent_before.get(key, 0)
            if not finished:  # --max-steps reached within the epoch
                save_now(run_dir, model, optimizer, progress, config, plan, mesh)
                last_eval = None
                break
            ended = time.perf_counter()
            try:
                last_eval = evaluate_now()
            except data_module.DataError:  # on every rank (the counts are summed): the epoch's training is kept,
                save_before_stopping(run_dir, model, optimizer, progress, config, plan, mesh)  # a resume evaluates it
                raise
            beyond.evaluation_s = time.perf_counter() - ended
            progress.epoch, progress.batch = progress.epoch + 1, 0
            log.info("epoch %d/%d: validation top-1 error %.2f%%, top-5 error %.2f%% (%s)", progress.epoch,
                     config.epochs, 100 * last_eval["top1_error"], 100 * last_eval["top5_error"],
                     describe_evaluation(last_eval))
            end_of_epoch_schedule(config, progress, last_eval)  # the rate of the epochs after it
            metrics.write(event="eval", epoch=progress.epoch, step=progress.global_step, next_lr=progress.lr,
                          **last_eval)
            save_now(run_dir, model, optimizer, progress, config, plan, mesh)
            beyond.epoch_end_s = time.perf_counter() - ended

        summary["centre"] = last_eval or evaluate_now()
        if config.ten_crop:
            summary["ten_patch"] = evaluate_now(ten_crop=True)
        steps = progress.global_step - steps_at_start
        by_tower = [None] * dist.get_world_size(group)
        dist.all_gather_object(by_tower, {key: sent / max(1, steps) for key, sent in train_exchanges.items()},
                               group=group)
        passed_over = [None] * dist.get_world_size()  # by each rank that loads: a replica its own share
        dist.all_gather_object(passed_over, _passed_over(loader))
        summary.update(epochs=progress.epoch, steps=progress.global_step, steps_this_run=steps,
                       checkpoint=str(checkpoint) if checkpoint else None,
                       # training images this run's batches met and could not use, each replaced by the next usable
                       train_skipped=len(set().union(*passed_over)),
                       train_seconds=train_seconds, wall_seconds=time.time() - started,
                       images_per_s=steps * config.batch_size / max(train_seconds, 1e-9),
                       exchanged_bytes_sent=exchange_log.sent_bytes,
                       # per training step and rank: the batch as delivered, and what this tower sent the other
                       input_bytes_per_step=input_bytes.per_batch,
                       exchange_bytes_per_step=sum(train_exchanges.values()) / max(1, steps),
                       # per exchange and direction: the bytes each tower sent per training step, tower 0's first
                       exchanges_per_step={key: [tower.get(key, 0.0) for tower in by_tower]
                                           for key in sorted(set().union(*by_tower))}, **compile_counts(config))
        if rank == 0:
            try:
                metrics.write(event="summary", **summary)
                with writing_in_run_folder(run_dir):
                    write_whole(run_dir / "summary.json",
                                lambda partial: partial.write_text(json.dumps(summary, indent=2) + "\n"))
            except RunFolderGone:  # the run trained to its end, saved: its results follow
                log.warning("%s is gone (moved, removed or replaced after its last checkpoint): the run's summary is "
                            "not written there, and follows", run_dir)
                summary["run_dir"] = None
        return summary if rank == 0 else None
