"""Checkpoints in the single-device layout: what the towers save loads into the
reference ``AlexNet`` and the other way round, whatever the FC8 placement.

A checkpoint is a dict of tensors and plain data only (no pickled objects), saved
with ``torch.save`` and loaded with ``weights_only=True``, so that loading one
never runs code from it. It is written to a temporary file in the same folder,
synced, and renamed over the old one: a crash during the save leaves the
previous checkpoint whole.
"""

import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch

from towers.reference import AlexNet

FORMAT = "alexnet-towers/checkpoint"
VERSION = 1
ARCH = "alexnet-2012"
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def checkpoint_payload(model_state: dict, *, num_classes: int, **extra) -> dict:
    """A checkpoint dict from a reference-layout state_dict (plus optimizer state, schedule, ...)."""
    return {"format": FORMAT, "version": VERSION, "arch": {"name": ARCH, "num_classes": num_classes},
            "model": {k: v.detach().cpu() for k, v in model_state.items()}, **extra}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Writes ``payload`` with torch.save atomically: a temporary file, synced, renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def resolve_path(path) -> Path:
    """A checkpoint file, or a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give a checkpoint file or a run folder that holds {FILENAME}")
    return path


def _expected_shapes(num_classes: int) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in AlexNet(num_classes).state_dict().items()}


def load_checkpoint(path, num_classes: Optional[int] = None) -> dict:
    """Loads and checks a checkpoint; raises CheckpointError naming the problem and the fix."""
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
    saved_classes = arch.get("num_classes")
    if num_classes is not None and saved_classes != num_classes:
        raise CheckpointError(f"{path} was trained for {saved_classes} classes but the data has {num_classes}: "
                              f"use the dataset it was trained on, or start a new run")
    expected = _expected_shapes(saved_classes)
    got = {k: tuple(v.shape) for k, v in payload["model"].items()}
    if got != expected:
        wrong = sorted(set(expected) ^ set(got)) + sorted(k for k in expected if k in got and got[k] != expected[k])
        raise CheckpointError(f"{path} does not hold the 2012 AlexNet's weights: these entries differ: "
                              f"{', '.join(wrong[:6])}")
    return payload


def load_reference(path, dropout: float = 0.5) -> AlexNet:
    """The single-device reference with a checkpoint's weights (from the towers or from the reference)."""
    payload = load_checkpoint(path)
    model = AlexNet(payload["arch"]["num_classes"], dropout)
    model.load_state_dict(payload["model"])
    return model


def save_reference(path, model: AlexNet, **extra) -> None:
    """Saves a reference model as a checkpoint that the towers can evaluate or resume from."""
    save_checkpoint(path, checkpoint_payload(model.state_dict(), num_classes=model.num_classes, **extra))
