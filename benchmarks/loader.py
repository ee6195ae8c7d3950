"""The data path alone: how many training images per second the loader hands out, by
number of DataLoader worker processes, and what the device-side augmentation costs.

The loader is the one training uses (``launch.data.Loader``): decode the JPEG,
bring it to the 256 base image, cut the 224 crop, collate uint8 batches. The rest of
section 4.1 (mean, reflection, colour shift) runs on the rank's device
(``launch.data.augment``) and is timed there on its own. Default data: the built-in
set, pre-resized 256x256 JPEGs as ``launch.prepare`` makes of ImageNet. On a GPU the
same batches are also made by torchvision's JPEG decoder there (nvJPEG), alone on the
GPU: what decoding on the GPU could deliver, against the worker processes, before it
would share the GPU with the training step.
"""

import math
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from launch import data as data_module
from launch.images import BASE_SIZE
from launch.ranks import RankFailure, error_line, run_ranks
from towers.reference import INPUT_SIZE


NO_GPU_DECODING = "not measured: the loader's device is the CPU"
DECODING_TIMEOUT_S = 300.0  # the most its process may take where no --time-limit comes sooner
DECODING_START_S = 60.0  # of which its start (a process, CUDA, torchvision) and its warm-up batch may take


def _stopped(deadline) -> bool:
    return deadline is not None and deadline.left() <= 0


def _images_per_s(bundle, batch: int, batches: int, workers: int, deadline=None) -> dict:
    """The loader's rate over ``batches`` timed batches of epoch 0 (where they are more than
    the ``workers`` worker processes, the most that gives each worker as many), taken as
    training takes them: from one Loader, whose workers have each made a batch of epoch 1 (a
    warm-up) and wait.
    The clock starts as the timed batches are asked for and stops as the last arrives: every
    decode it times began within it. (Started at the batch after a warm-up one, it counted the
    batches that the other workers made alongside the warm-up as made in no time: with 2
    workers over 5 batches, up to 25 % too fast.) Past the ``deadline`` no further batch is timed
    (one always is), and ``batches`` says how many were."""
    total = data_module.batches_per_epoch(bundle, batch)
    planned = min(batches, total)
    if 0 < workers < planned:
        planned -= planned % workers  # each worker makes as many: none waits at the end while the clock runs
    with data_module.Loader(bundle, workers) as loader:
        warm_up = min(total, max(1, workers))  # one each, then nothing left asked for
        for _ in loader.train(batch, seed=0, epoch=1, start_batch=total - warm_up):
            pass
        started, timed = time.perf_counter(), 0
        for _ in loader.train(batch, seed=0, epoch=0):
            timed += 1
            if timed == planned or _stopped(deadline):
                break
        seconds = time.perf_counter() - started
    return {"workers": workers, "batches": timed, "planned_batches": planned, "batch": batch, "seconds": seconds,
            "images_per_s": timed * batch / seconds}


def batch_paths(bundle, batch: int, count: int) -> list:
    """The files of the first ``count`` training batches of epoch 0 (seed 0), in the loader's order."""
    order = data_module.epoch_order(len(bundle.train), 0, 0)
    return [[bundle.train.samples[i][0] for i in order[b * batch:(b + 1) * batch].tolist()] for b in range(count)]


def decoded_batch(paths: list, first: int, device: torch.device) -> torch.Tensor:
    """The uint8 crops that the loader hands out for the training samples at positions
    ``first`` onwards of epoch 0 (seed 0), of the files ``paths``, made instead by torchvision
    on ``device`` (nvJPEG on a GPU): each file's bytes read on this thread, the batch decoded
    in one call, the crops cut on the device. For pre-resized 256x256 JPEGs (the built-in
    set's, launch.prepare's), which need no resize; raises ValueError for another size, and
    torchvision's RuntimeError for a file it cannot decode (where the loader puts the next
    usable image in its place)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    encoded = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path in paths]
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    odd = next((path for path, image in zip(paths, images) if tuple(image.shape) != (3, BASE_SIZE, BASE_SIZE)), None)
    if odd is not None:
        raise ValueError(f"{odd} is not a {BASE_SIZE}x{BASE_SIZE} image, which decoding on the device is measured "
                         f"on (the pre-resized JPEGs of launch.prepare)")
    choices = data_module.train_augmentation(seed=0, epoch=0, first=first, count=len(paths))
    return torch.stack([image[:, top:top + INPUT_SIZE, left:left + INPUT_SIZE]  # one copy on the device
                        for image, top, left in zip(images, choices.top.tolist(), choices.left.tolist())])


def decoding_worker(rank: int, batches: list, device: str, end: float) -> dict:
    """In a process of its own: the rate of ``decoded_batch`` over ``batches`` (lists of files)
    after the first, a warm-up; past ``end`` (time.monotonic's, which every process of the
    machine shares) no further batch is timed (one always is)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    decoded_batch(batches[0], 0, device)
    sync(device)
    started, timed, planned = time.perf_counter(), 0, len(batches) - 1
    while timed < planned and not (timed and time.monotonic() >= end):
        decoded_batch(batches[1 + timed], (1 + timed) * len(batches[0]), device)
        # nvJPEG decodes on a stream of its own, into memory that the last batch's crops, still
        # queued on this one, may have just given back: each batch's work ends before the next
        sync(device)
        timed += 1
    seconds = time.perf_counter() - started
    return {"device": str(device), "batches": timed, "planned_batches": planned, "batch": len(batches[0]),
            "seconds": seconds, "images_per_s": timed * len(batches[0]) / seconds, "stopped": timed < planned}


def decoding(bundle, batch: int, batches: int, device: torch.device, deadline=None) -> dict:
    """``decoding_worker``'s figures over the loader's first batches of epoch 0, in a process of
    its own (the GPU's decoder is native code: a fault or a hang of it costs none of the
    benchmark's figures), or why it was not measured: the --time-limit reached, or its failure."""
    if _stopped(deadline):
        return {"reason": deadline.reason}
    paths = batch_paths(bundle, batch, 1 + min(batches, data_module.batches_per_epoch(bundle, batch) - 1))
    most = max(0.0, DECODING_TIMEOUT_S - DECODING_START_S)  # the longest it is timed
    left = math.inf if deadline is None else deadline.left()
    by_deadline = left < most
    left = max(0.0, left) if by_deadline else most
    try:
        [result] = run_ranks(decoding_worker, (paths, str(device), time.monotonic() + left), world_size=1,
                             timeout_s=min(DECODING_TIMEOUT_S, left + DECODING_START_S))
    except RankFailure as failure:  # its process failed, or ran past its bound
        return {"reason": f"failed: {failure.failures[failure.first]}"}
    except Exception as error:  # its process could not be started
        return {"reason": f"failed: {error_line(error)}"}
    stopped = result.pop("stopped")
    result["cut"] = None if not stopped else deadline.reason if by_deadline else \
        f"not measured: the {most:g} s that decoding is timed at most were over"
    return result


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
    return 1000 * statistics.median(times[1:])


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
    augment_ms = _augment_ms(bundle, batch, torch.device(device), deadline=deadline)
    on_gpu = torch.device(device).type == "cuda"  # last: a fault of the GPU's decoder must not cost the figures above
    if on_gpu:
        torch.cuda.empty_cache()  # the augmentation's batches, cached here, back to the GPU for the runs after it
    decoded = decoding(bundle, batch, batches, torch.device(device), deadline) if on_gpu else {"reason": NO_GPU_DECODING}
    return {
        "data": str(bundle.root), "train_images": len(bundle.train), "device": device,
        "by_workers": by_workers, "failed_workers": failed, "not_measured_workers": skipped,
        "not_measured_reason": deadline.reason if cut else None,
        "augment_ms_per_batch": augment_ms,
        "decoded_on_device": decoded,  # the loader's batches decoded by torchvision on the GPU instead
        # what one rank broadcasts per image: uint8 crop (and an int64 label), against float32 images
        "input_bytes_per_image": 3 * INPUT_SIZE * INPUT_SIZE + 8,
        "float32_bytes_per_image": 4 * 3 * INPUT_SIZE * INPUT_SIZE + 8,
    }
