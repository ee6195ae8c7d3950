"""The data path alone: how many training images per second the loader hands out, by
number of DataLoader worker processes, and what the device-side augmentation costs.

The loader is the one training uses (``launch.data.train_batches``): decode the JPEG,
bring it to the 256 base image, cut the 224 crop, collate uint8 batches. The rest of
section 4.1 (mean, reflection, colour shift) runs on the rank's device
(``launch.data.augment``) and is timed there on its own. Default data: the built-in
set, pre-resized 256x256 JPEGs as ``launch.prepare`` makes of ImageNet.
"""

import time
from typing import Optional

import torch

from launch import data as data_module
from launch.ranks import error_line
from towers.reference import INPUT_SIZE


def _stopped(deadline) -> bool:
    return deadline is not None and deadline.left() <= 0


def _images_per_s(bundle, batch: int, batches: int, workers: int, deadline=None) -> dict:
    """The loader's rate over ``batches`` timed batches after a warm-up one; past the
    ``deadline`` no further batch is timed (one always is), and ``batches`` says how many were."""
    total = data_module.batches_per_epoch(bundle, batch)
    planned = min(batches, total - 1)  # one more is the warm-up (workers starting, first decode)
    iterator = iter(data_module.train_batches(bundle, batch, seed=0, epoch=0, workers=workers))
    next(iterator)
    started, timed = time.perf_counter(), 0
    while timed < planned and not (timed and _stopped(deadline)):
        next(iterator)
        timed += 1
    seconds = time.perf_counter() - started
    del iterator  # stops the workers
    return {"workers": workers, "batches": timed, "planned_batches": planned, "batch": batch, "seconds": seconds,
            "images_per_s": timed * batch / seconds}


def _augment_ms(bundle, batch: int, device: torch.device, repeats: int = 5, deadline=None) -> float:
    """The median of ``repeats`` timed augmentations of a batch after a warm-up one, fewer
    (one at least) past the ``deadline``."""
    crops = torch.randint(0, 256, (batch, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8, device=device)
    choices = data_module.train_augmentation(seed=0, epoch=0, first=0, count=batch)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if len(times) > 1 and _stopped(deadline):
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        data_module.augment(crops, choices, bundle.stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    timed = sorted(times[1:])
    return 1000 * timed[len(timed) // 2]


def open_loader_data(data: Optional[str], batch: int) -> data_module.DataBundle:
    """The loader benchmark's data, which must hold a warm-up batch and a timed one of
    ``batch`` training images; raises ValueError (DataError) naming the fix."""
    bundle = data_module.open_data(data)
    if data_module.batches_per_epoch(bundle, batch) < 2:
        raise ValueError(f"the data-loader benchmark needs two batches of {batch} training images (a warm-up and a "
                         f"timed one) and {bundle.root} has {len(bundle.train)}: give a larger --loader-data or a "
                         f"smaller --batch")
    return bundle


def measure_loader(workers: tuple, batch: int, batches: int, device: str, bundle: data_module.DataBundle,
                   deadline=None) -> dict:
    """images/s of the loader on ``bundle`` (see open_loader_data) for each number of
    ``workers``, and the device-side augmentation's ms per batch on ``device``. At the
    ``deadline`` (benchmarks.run.Deadline) the batch being timed is the last (the first
    number of workers times one at least), and the numbers of workers left are not measured.
    A number of workers whose worker dies (a /dev/shm too small for their batches) is recorded
    as failed, and the others are measured; where every one fails, its error is raised."""
    by_workers, skipped, failed, first_error = [], [], [], None
    for count in workers:
        if by_workers and _stopped(deadline):  # one measured at least, past failures
            skipped.append(count)
            continue
        try:
            by_workers.append(_images_per_s(bundle, batch, batches, count, deadline))
        except (RuntimeError, OSError) as error:
            failed.append({"workers": count, "reason": f"failed: {error_line(error)}"})
            first_error = first_error or error
    if not by_workers:
        raise first_error
    cut = skipped or any(w["batches"] < w["planned_batches"] for w in by_workers)
    return {
        "data": str(bundle.root), "train_images": len(bundle.train), "device": device,
        "by_workers": by_workers, "failed_workers": failed, "not_measured_workers": skipped,
        "not_measured_reason": deadline.reason if cut else None,
        "augment_ms_per_batch": _augment_ms(bundle, batch, torch.device(device), deadline=deadline),
        # what one rank broadcasts per image: uint8 crop (and an int64 label), against float32 images
        "input_bytes_per_image": 3 * INPUT_SIZE * INPUT_SIZE + 8,
        "float32_bytes_per_image": 4 * 3 * INPUT_SIZE * INPUT_SIZE + 8,
    }
