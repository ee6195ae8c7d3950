"""Checkpoints in the single-device layout: what the towers save loads into the
reference ``AlexNet`` and the other way round, whatever the FC8 placement.

A checkpoint is a dict of tensors and plain data only (no pickled objects), saved
with ``torch.save`` and loaded with ``weights_only=True``, so that loading one
never runs code from it. It is written to a temporary file in the same folder,
synced, and renamed over the old one: a crash during the save leaves the
previous checkpoint whole.

The towers save and restore through the collectives at the end of this module: the
other rank ships its half to rank 0, which writes one unsharded checkpoint, and on
restore rank 0 sends each rank its half.
"""

import dataclasses
import errno
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from towers import AlexNet, Architecture, Tower, shard_state_dict, unshard_state_dicts

from .config import TrainConfig
from .schedule import Progress

FORMAT = "alexnet-towers/checkpoint"
VERSION = 1
ARCH = "alexnet-2012"
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def checkpoint_payload(model_state: dict, *, num_classes: int, architecture: Architecture = Architecture(),
                       **extra) -> dict:
    """A checkpoint dict from a reference-layout state_dict (plus optimizer state, schedule, ...).
    ``arch`` records what rebuilds the net: the classes and the ``Architecture``'s fields."""
    arch = {"name": ARCH, "num_classes": num_classes, **dataclasses.asdict(architecture)}
    return {"format": FORMAT, "version": VERSION, "arch": arch,
            "model": {k: v.detach().cpu() for k, v in model_state.items()}, **extra}


def checkpoint_architecture(payload: dict) -> Architecture:
    """The net a loaded checkpoint holds (see ``load_checkpoint``)."""
    return Architecture(**{f.name: payload["arch"][f.name] for f in dataclasses.fields(Architecture)})


def save_checkpoint(path: Path, payload: dict) -> None:
    """Writes ``payload`` with torch.save atomically: a temporary file, synced, renamed over ``path``.

    The payload is serialised in memory first, so its size is known before the disk is
    touched: a disk too full for it raises ``OSError(ENOSPC)`` saying how much is needed,
    and the previous file at ``path`` stays whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    if len(data) > shutil.disk_usage(path.parent).free:
        raise _disk_full(path, len(data))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the space went between the check and the write
            raise _disk_full(path, len(data)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _disk_full(path: Path, needed: int) -> OSError:
    free = shutil.disk_usage(path.parent).free
    kept = "the previous one is whole" if path.exists() else "nothing was written"
    return OSError(errno.ENOSPC, f"no space left for {path}: it needs {needed / 1e6:.1f} MB and the disk holding "
                                 f"{path.parent} has {free / 1e6:.1f} MB free ({kept}); free some space there")


def resolve_path(path) -> Path:
    """A checkpoint file, or a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give a checkpoint file or a run folder that holds {FILENAME}")
    return path


def _expected_shapes(num_classes: int, architecture: Architecture) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in AlexNet(num_classes, architecture=architecture).state_dict().items()}


def load_checkpoint(path, classes: Optional[list] = None) -> dict:
    """Loads and checks a checkpoint, and that it was trained on ``classes`` (the data's class
    names, in order) if given; raises CheckpointError naming the problem and the fix."""
    path = resolve_path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        culprit = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "an unsupported object")
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain data, and "
            f"unpickling them could run code ({culprit}). Only checkpoints written by this project load") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); resume from an earlier one") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}; this program reads version {VERSION}")
    arch = payload.get("arch", {})
    if arch.get("name") != ARCH:
        raise CheckpointError(f"{path} holds architecture {arch.get('name')!r}, not {ARCH!r}")
    try:  # a checkpoint saved before the architecture was recorded holds the paper's net: the defaults
        architecture = Architecture(**{f.name: arch.get(f.name, f.default) for f in dataclasses.fields(Architecture)})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} records an architecture this program cannot build ({exc})") from None
    payload["arch"] = {**arch, **dataclasses.asdict(architecture)}
    saved_classes = arch.get("num_classes")
    if classes is not None:
        check_classes(payload, path, classes)
    expected = _expected_shapes(saved_classes, architecture)
    got = {k: tuple(v.shape) for k, v in payload["model"].items()}
    if got != expected:
        wrong = sorted(set(expected) ^ set(got)) + sorted(k for k in expected if k in got and got[k] != expected[k])
        raise CheckpointError(f"{path} does not hold the 2012 AlexNet's weights for the architecture it records "
                              f"({architecture.describe()}): these entries differ: {', '.join(wrong[:6])}")
    return payload


def check_classes(payload: dict, path, classes: list) -> None:
    """Raises CheckpointError when the checkpoint at ``path`` was trained on other classes
    than ``classes`` (the data's class names, in order)."""
    saved_classes = payload["arch"]["num_classes"]
    if saved_classes != len(classes):
        raise CheckpointError(f"{path} was trained for {saved_classes} classes but the data has {len(classes)}: "
                              f"use the dataset it was trained on, or start a new run")
    saved_names = payload.get("classes")  # absent from a checkpoint saved from the reference
    if saved_names is not None and list(saved_names) != list(classes):
        changed = [f"{a} -> {b}" for a, b in zip(saved_names, classes) if a != b]
        raise CheckpointError(f"{path} was trained on other classes than the data's ({len(changed)} differ: "
                              f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}): use the dataset it "
                              f"was trained on, or start a new run")


def load_reference(path, dropout: float = 0.5) -> AlexNet:
    """The single-device net with a checkpoint's weights (from the towers or from a single
    process), built with the architecture the checkpoint records (``model.architecture``)."""
    payload = load_checkpoint(path)
    model = AlexNet(payload["arch"]["num_classes"], dropout, checkpoint_architecture(payload))
    model.load_state_dict(payload["model"])
    return model


def save_reference(path, model: AlexNet, **extra) -> None:
    """Saves a reference model as a checkpoint that the towers can evaluate or resume from
    (the one-tower net's, only in one process)."""
    save_checkpoint(path, checkpoint_payload(model.state_dict(), num_classes=model.num_classes,
                                             architecture=model.architecture, **extra))


# ---------------------------------------------------------------- across the towers

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
                        classes: list, train_images: int, group, data_mean: Optional[torch.Tensor] = None) -> None:
    """Collective: rank 1 ships its half to rank 0, which writes one unsharded checkpoint
    (in a group of one, ``tower`` is the reference and its state is saved as it is).
    ``classes`` and ``train_images`` let a resumed run check that its data is the same;
    ``data_mean`` (3 x 256 x 256, the training set's mean image) lets the checkpoint
    classify new images on its own."""
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
    unshard = (lambda states: states[0]) if len(gathered) == 1 else (lambda states: unshard_state_dicts(states, placement))
    extra = {
        "momentum_buffer": unshard([g["momentum"] for g in gathered]) if momentum else {},
        "progress": dataclasses.asdict(progress),
        "rng": {f"rank{r}": g["rng"] for r, g in enumerate(gathered)},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "classes": list(classes),
        "train_images": train_images,
    }
    if data_mean is not None:
        extra["data_mean"] = data_mean.detach().to("cpu", torch.float32)
    model = unshard([g["model"] for g in gathered])
    save_checkpoint(path, checkpoint_payload(model, num_classes=len(classes), architecture=tower.architecture, **extra))


def restore_training_state(path, tower: Tower, optimizer, classes: list, group, with_training: bool) -> Optional[Progress]:
    """Collective: rank 0 loads an unsharded checkpoint and sends each rank its half (in a
    group of one, the whole to the reference). With ``with_training`` also the momentum,
    the RNG states and the progress."""
    rank, device = dist.get_rank(group), next(tower.parameters()).device
    ranks = dist.get_world_size(group)
    shard = (lambda state, r: dict(state)) if ranks == 1 else (lambda state, r: shard_state_dict(state, r, tower.fc8_placement))
    shards = None
    if rank == 0:
        payload = load_checkpoint(path, classes)
        momentum = payload.get("momentum_buffer", {}) if with_training else {}
        shards = [{"model": shard(payload["model"], r),
                   "momentum": shard(momentum, r) if momentum else {},
                   "rng": payload.get("rng", {}).get(f"rank{r}") if with_training else None,
                   "progress": payload.get("progress") if with_training else None} for r in range(ranks)]
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
