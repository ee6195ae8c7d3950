"""Checkpoints in the single-device layout: what the towers save loads into the
reference ``AlexNet`` and the other way round, whatever the FC8 placement.

A checkpoint is a dict of tensors and plain data only (no pickled objects), saved
with ``torch.save`` and loaded with ``weights_only=True``, so that loading one
never runs code from it. It is written to a temporary file in the same folder,
synced, and renamed over the old one: a crash during the save leaves the
previous checkpoint whole.

The towers save and restore through the collectives at the end of this module: the
other rank ships its half to rank 0, which writes one unsharded checkpoint, and on
restore rank 0 sends each rank its half. With replicas of the towers, replica 0
does this for all of them.
"""

import dataclasses
import errno
import math
import os
import pickle
import re
import shutil
import socket
import unicodedata
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from towers import AlexNet, Architecture, Tower, shard_state_dict, unshard_state_dicts

from .cli import home_path, not_there, prints_plainly, remove_abandoned, values_refused
from .config import TrainConfig
from .images import BASE_SIZE
from .mesh import Mesh
from .ranks import sigterm_as_interrupt
from .meter import writing_in_run_folder
from .schedule import Progress

FORMAT = "alexnet-towers/checkpoint"
VERSION = 1
ARCH = "alexnet-2012"
FILENAME = "checkpoint.pt"
MEAN_SHAPE = (3, BASE_SIZE, BASE_SIZE)  # data_mean: the training set's mean image, at the size images are stored


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


def save_checkpoint(path: Path, payload: dict, make_folder: bool = True) -> None:
    """Writes ``payload`` with torch.save atomically: a temporary file, synced, renamed over ``path``.

    Its size is known before the disk is touched (its tensors' bytes, and a margin for the
    rest): a disk too full for it raises ``OSError(ENOSPC)`` saying how much is needed, and
    the previous file at ``path`` stays whole. It is serialised straight into the file, not
    first into memory, which would hold a second copy of the weights and momentum. Its folder
    is made where there is none, unless ``make_folder`` is False (FileNotFoundError then)."""
    path = Path(path)
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_saves(path)
    needed = _saved_bytes(payload)
    if needed > shutil.disk_usage(path.parent).free:
        raise _disk_full(path, needed)
    tmp = path.with_name(f"{_save_prefix(path)}{socket.gethostname()}-{os.getpid()}")
    try:
        # SIGTERM (a batch system ending the job, a rank's launcher gone) removes the part written, as Ctrl-C does
        with sigterm_as_interrupt(), open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # A write that failed inside torch.save surfaces as torch's RuntimeError from closing
        # the archive, with the write's OSError as its context: that OSError is the error.
        # So does a Ctrl-C there: the run is interrupted, not failed.
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        if not isinstance(cause, OSError):
            raise
        tmp.unlink(missing_ok=True)  # before the free space is measured for the message
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):  # the space went after the check
            raise _disk_full(path, needed) from None
        raise cause from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _save_prefix(path: Path) -> str:
    """The name of a save of ``path`` in progress, less its host and process."""
    return f".{path.name}.tmp-"


def remove_abandoned_saves(path: Path) -> None:
    """Removes the partial files of saves of ``path`` by processes that were killed in them
    (``save_checkpoint`` writes each to a temporary file named by its host and process)."""
    remove_abandoned(path.parent, _save_prefix(path))


def _saved_bytes(payload) -> int:
    """About what torch.save writes of ``payload``: each tensor storage whole and once, 64
    bytes of alignment and a zip record per storage, and 1 MB for the pickled rest."""
    storages, pending = {}, [payload]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return sum(storages.values()) + 256 * len(storages) + (1 << 20)


def training_checkpoint_bytes(num_classes: int, architecture: Architecture) -> int:
    """About what a training run's checkpoint takes: the whole net's float32 weights and as much
    momentum, and _saved_bytes's margin for the rest."""
    numel = sum(math.prod(shape) for shape in _expected_shapes(num_classes, architecture).values())
    return 2 * 4 * numel + (1 << 20)


def _disk_full(path: Path, needed: int) -> OSError:
    free = shutil.disk_usage(path.parent).free
    kept = "the previous one is whole" if path.exists() else "nothing was written"
    return OSError(errno.ENOSPC, f"no space left for {path}: it needs {needed / 1e6:.1f} MB and the disk holding "
                                 f"{path.parent} has {free / 1e6:.1f} MB free ({kept}); free some space there")


def resolve_path(path) -> Path:
    """A checkpoint file, or a run folder holding one (``~`` is the home folder, as the shell
    leaves it in ``--resume=~/run``)."""
    path = home_path(path)
    try:
        if path.is_dir():
            path = path / FILENAME
        found, there = path.is_file(), path.exists()
    except OSError as exc:  # a name too long, a folder on the way that cannot be read, ...
        raise CheckpointError(f"cannot look for a checkpoint at {path} ({exc.strerror or exc}): give a checkpoint "
                              f"file or a run folder you can read") from None
    if there and not found:  # read, a named pipe would be waited on for good
        raise CheckpointError(f"{path} is not a file (a folder, a named pipe, a device): give a checkpoint file or a "
                              f"run folder that holds {FILENAME}")
    if not found and os.path.lexists(path):  # a link that loops or leads nowhere
        raise CheckpointError(f"{path} {not_there(path) or 'is not a file'}: give a checkpoint file or a run folder "
                              f"that holds {FILENAME}")
    if not found:
        raise CheckpointError(f"no checkpoint at {path}: give a checkpoint file or a run folder that holds {FILENAME}")
    return path


def _expected_shapes(num_classes: int, architecture: Architecture) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in AlexNet(num_classes, architecture=architecture).state_dict().items()}


def _starts_as_a_zip(path: Path) -> bool:
    """Whether the file begins as a zip archive does (whole or cut short: its index is at its
    end). Raises the OSError of a file that cannot be read."""
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def damaged_record(path: Path) -> Optional[str]:
    """The first record of the checkpoint ``path`` whose bytes do not match the CRC-32 that
    torch.save wrote with them, or None; torch.load itself never checks them, and loads a
    damaged tensor as it finds it. Read in full, as a load reads the weights anyway. What
    torch.save would not have written is left to torch.load, which names what it is: a
    file that is not a zip archive (or not a regular file, which may never end), a
    compressed or encrypted record; and a record saved without its checksum
    (after torch.serialization.set_crc32_options(False): a CRC of 0) is not checked."""
    if not os.path.isfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.compress_type != zipfile.ZIP_STORED or record.flag_bits & 1:
                    return None
                if record.CRC == 0 and record.file_size:
                    continue
                try:
                    with archive.open(record) as f:
                        while f.read(1 << 24):  # the CRC is checked at the end
                            pass
                except zipfile.BadZipFile:
                    return record.filename
    except Exception:  # anything else wrong with the archive
        return None
    return None


# floating-point types of two numbers a byte, which nothing but a cast of their bytes computes with
PACKED = tuple(getattr(torch, name) for name in ("float4_e2m1fn_x2",) if hasattr(torch, name))


def finite(tensor: torch.Tensor) -> bool:
    """Whether every value of the floating-point ``tensor`` is a finite number: its least and
    greatest value, which are NaN where any value is. A tenth of the time of
    ``torch.isfinite(tensor).all()`` on the CPU, which writes a flag for every value first."""
    if tensor.element_size() == 1:  # a float8, which aminmax does not take: each value is a float32's too
        tensor = tensor.float()
    return tensor.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def read_as_saved(path, mmap: bool = True) -> dict:
    """A checkpoint's contents as torch.load gives them, unchecked and, with ``mmap``, mapped
    (nothing read until used): what load_checkpoint checks, and what advice about a checkpoint
    that it may refuse (weights that ran away) reads. Raises what torch.load raises. torch.load
    hands a mapped file's name to C++ as UTF-8: a name that is not (bytes that Python holds as
    surrogates) is mapped through its descriptor's name in /proc, or else read whole."""
    try:
        os.fspath(path).encode()
    except UnicodeEncodeError:
        with open(path, "rb") as file:
            if mmap and os.path.isdir("/proc/self/fd"):  # the mapping outlives the descriptor
                return torch.load(f"/proc/self/fd/{file.fileno()}", map_location="cpu", weights_only=True, mmap=True)
            return torch.load(file, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_checkpoint(path, classes: Optional[list] = None, mmap: bool = True) -> dict:
    """Loads and checks a checkpoint, and that it was trained on ``classes`` (the data's class
    names, in order) if given; raises CheckpointError naming the problem and the fix. Its
    mean image comes float32, in memory. ``mmap=False`` reads the rest into memory too, for a
    reader that holds it while the file may be written over (launch.predict, launch.show):
    a mapped file cut short under a reader ends it with SIGBUS."""
    path = resolve_path(path)
    damaged = damaged_record(path)
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: its record {damaged} does not match the checksum written with it "
                              f"(a disk or a copy went wrong): give an undamaged copy, or an earlier checkpoint")
    not_whole = f"{path} is truncated or not a checkpoint ({{}}): give a whole checkpoint that this program wrote"
    try:
        zipped = _starts_as_a_zip(path)
        if zipped:  # unmapped, torch.load would read its legacy format unchecked
            payload = read_as_saved(path, mmap)
    except pickle.UnpicklingError as exc:
        culprit = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "an unsupported object")
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain data, and "
            f"unpickling them could run code ({culprit}). Only checkpoints written by this project load") from None
    except PermissionError as exc:  # whole, maybe, but not this user's to read
        raise CheckpointError(f"cannot read {path} ({exc.strerror}): give a checkpoint that this user can read, or "
                              f"let it be read (chmod)") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError,
            KeyError, IndexError, TypeError, AttributeError) as exc:  # the last four: a pickle edited by hand
        first = (str(exc).splitlines() or [""])[0]
        if len(first) > 200:  # torch's long advice, cut at a word and said to be cut
            first = first[:200].rsplit(" ", 1)[0] + " ..."
        raise CheckpointError(not_whole.format(f"{type(exc).__name__}: {first}")) from None
    if not zipped:
        raise CheckpointError(not_whole.format("not a zip archive, as torch.save writes a checkpoint"))
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker): give one that "
                              f"launch.two_gpu or launch.checkpoint.save_reference wrote")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}; this program reads version "
                              f"{VERSION}: read it with the version of this program that wrote it")
    arch, model = payload.get("arch", {}), payload.get("model")
    if not (isinstance(arch, dict) and isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())
            and type(arch.get("num_classes")) is int and arch["num_classes"] >= 2):
        raise CheckpointError(f"{path} is not laid out as this program writes a checkpoint (an 'arch' record with its "
                              f"num_classes, at least 2, a 'model' of tensors): it was not saved by this program")
    if arch.get("name") != ARCH:
        raise CheckpointError(f"{path} holds architecture {arch.get('name')!r}, not {ARCH!r}: it was not saved by this "
                              f"program")
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
    mean = payload.get("data_mean")
    if mean is not None and (not isinstance(mean, torch.Tensor) or tuple(mean.shape) != MEAN_SHAPE):
        shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
        raise CheckpointError(f"{path} holds a mean image of shape {shape}, not {' x '.join(map(str, MEAN_SHAPE))}: "
                              f"it was not saved by this program")
    names = payload.get("classes")
    if names is not None and not (isinstance(names, (list, tuple)) and all(type(name) is str for name in names)
                                  and len(set(names)) == len(names) == saved_classes):
        raise CheckpointError(f"{path} names its classes otherwise than as {saved_classes} distinct class folder "
                              f"names: it was not saved by this program")
    numbers = {**model, **({} if mean is None else {"data_mean": mean})}
    integral = [f"{k} as {str(v.dtype).removeprefix('torch.')}" for k, v in numbers.items()
                if not v.is_floating_point() or v.dtype in PACKED]
    if integral:  # loaded into the net's float weights, they would compute another function without a word
        raise CheckpointError(f"{path} holds values that are not floating-point numbers ({', '.join(integral[:4])}"
                              f"{' ...' if len(integral) > 4 else ''}): it was not saved by this program")
    broken = [k for k, v in numbers.items() if v.is_floating_point() and not finite(v)]
    if broken:  # a net that diverged: its every output would be NaN
        raise CheckpointError(f"{path} holds values that are not finite numbers (NaN or infinite) in "
                              f"{', '.join(broken[:4])}{' ...' if len(broken) > 4 else ''}: the run diverged before "
                              f"it was saved; use an earlier checkpoint, or train again with a lower --lr")
    if mean is not None:
        payload["data_mean"] = mean.to(torch.float32, copy=True)
    return payload


def check_training_state(path, payload: dict) -> None:
    """Raises CheckpointError, before any rank starts, unless the training state of a loaded
    checkpoint is as this program writes it: the run's recipe (options it knows, values it
    accepts, and the architecture its weights record), its progress, momentum for every
    weight or none, and random states that can be set. A checkpoint of another version of
    the program (an option added since, say) is named as such."""
    config, progress, momentum = payload.get("config"), payload.get("progress"), payload.get("momentum_buffer", {})
    fix = "evaluate it with --eval-only, or resume it with the version of this program that saved it"
    if config is None:  # weights alone, which launch.two_gpu.resumed_config names as such
        return
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} records its run's recipe as a {type(config).__name__}, not as this program "
                              f"writes it: {fix}")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"{path} records options this program does not have ({', '.join(map(str, unknown))}): "
                              f"another version of it saved the run; {fix}")
    try:  # a value this program refuses is named with its option where the resumed run's options are checked
        TrainConfig(**config).validate()
    except TypeError as exc:  # such as a number saved as a string
        raise CheckpointError(f"{path} records its run's recipe with values of other types than this program "
                              f"writes ({exc}): {fix}") from None
    except ValueError:
        pass
    refused = values_refused(config, TrainConfig)
    if refused:  # a value no option takes would fail inside a rank, or pass for another without a word
        raise CheckpointError(f"{path} records its run's recipe with values that this program does not write "
                              f"({', '.join(refused[:4])}): {fix}")
    unlike = [f"{name} {config[name]!r} against {payload['arch'][name]!r}"
              for name in sorted(set(config) & set(payload["arch"])) if config[name] != payload["arch"][name]]
    if unlike:  # --eval-only would build the net its weights record, --resume the one its recipe names
        raise CheckpointError(f"{path} records its net otherwise in its recipe than with its weights "
                              f"({', '.join(unlike)}): {fix}")
    counts = ("epoch", "batch", "global_step")
    if not (isinstance(progress, dict) and set(progress) <= {f.name for f in dataclasses.fields(Progress)}
            and all(type(progress.get(name)) is int and progress[name] >= 0 for name in counts)):
        raise CheckpointError(f"{path} records no progress (epoch, batch and step) as this program writes it: {fix}")
    refused = values_refused(progress, Progress) + [
        f"{name}={value!r}" for name, value in progress.items()
        if name in ("bad_epochs", "reductions", "best_error", "lr") and isinstance(value, (int, float))
        and not (value >= 0 and (name == "best_error" or math.isfinite(value)))]
    if refused:
        raise CheckpointError(f"{path} records its progress with values that this program does not write "
                              f"({', '.join(refused[:4])}): {fix}")
    images = payload.get("train_images")
    if images is not None and not (type(images) is int and images > 0):
        raise CheckpointError(f"{path} records its training set's size as {images!r}, not as this program writes it: "
                              f"{fix}")
    weights = payload["model"]
    if not isinstance(momentum, dict) or any(
            not isinstance(v, torch.Tensor) or k not in weights or v.shape != weights[k].shape
            or v.dtype != weights[k].dtype or not finite(v) for k, v in momentum.items()):
        raise CheckpointError(f"{path} holds momentum that does not fit its weights (of their shapes and types, "
                              f"finite): {fix}")
    # Every weight's, or none before the first step or without momentum: a weight's momentum
    # missing would start again from nothing, and the run not go on as it was.
    stepped = progress["global_step"] > 0 and config.get("momentum", 0) > 0
    if set(momentum) != (set(weights) if momentum or stepped else set()):
        missing = sorted(set(weights) - set(momentum))
        raise CheckpointError(f"{path} lacks the momentum of {', '.join(missing[:4])}{' ...' * (len(missing) > 4)} "
                              f"(after {progress['global_step']} steps): {fix}")
    rng = payload.get("rng", {})  # a rank's random states, each one a generator takes (a CUDA one's: where set)
    if not isinstance(rng, dict) or not all(
            re.fullmatch(r"rank\d+", str(rank)) and isinstance(state, dict) and state.get("cpu") is not None
            and set(state) <= {"cpu", "cuda"} and all(_is_state(t, device) for device, t in state.items())
            for rank, state in rng.items()):
        raise CheckpointError(f"{path} holds random states that are not as this program writes them: {fix}")
    replicas, layout = config.get("replicas"), config.get("layout")
    if rng and type(replicas) is int and layout is not None:  # one state per rank of the run that saved it
        ranks = replicas * (2 if layout == "towers" else 1)
        if set(rng) != {f"rank{r}" for r in range(ranks)}:  # a rank without its own would go on from its seed
            raise CheckpointError(f"{path} holds the random states of {len(rng)} ranks, and its run ({layout}, "
                                  f"{replicas} {'replica' if replicas == 1 else 'replicas'}) had {ranks}: {fix}")


def _is_state(value, device: str) -> bool:
    """Whether ``value`` can be a random generator's state: bytes, which the CPU's own generator
    takes; a CUDA generator's state is checked where it is set."""
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
        return False
    if device == "cuda":
        return True
    try:
        torch.Generator().set_state(value)  # its size, and its Mersenne Twister's state
    except RuntimeError:
        return False
    return True


def check_classes(payload: dict, path, classes: list) -> None:
    """Raises CheckpointError when the checkpoint at ``path`` was trained on other classes
    than ``classes`` (the data's class names, in order)."""
    saved_classes = payload["arch"]["num_classes"]
    if saved_classes != len(classes):
        raise CheckpointError(f"{path} was trained for {saved_classes} classes but the data has {len(classes)}: "
                              f"use the dataset it was trained on, or start a new run")
    saved_names = payload.get("classes")  # absent from a checkpoint saved from the reference
    if saved_names is not None and list(saved_names) != list(classes):
        changed = [_renamed(a, b) for a, b in zip(saved_names, classes) if a != b]
        raise CheckpointError(f"{path} was trained on other classes than the data's ({len(changed)} differ: "
                              f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}): use the dataset it "
                              f"was trained on, or start a new run")


def _renamed(saved: str, now: str) -> str:
    """A class name of the checkpoint against the data's, escaped where the two may print
    alike: one letter written as one code point or as two (Unicode's NFC and NFD, which
    macOS and some copies turn folder names into); a character that does not print (a
    zero-width or no-break space, a soft hyphen), or a space at an end."""
    if unicodedata.normalize("NFC", saved) == unicodedata.normalize("NFC", now):
        return f"{ascii(saved)} -> {ascii(now)}, the same letters in another Unicode form"
    if prints_plainly(saved) and prints_plainly(now):
        return f"{saved} -> {now}"
    return f"{ascii(saved)} -> {ascii(now)}, escaped: characters that do not print, or a space at an end"


def load_reference(path, dropout: float = 0.5) -> AlexNet:
    """The single-device net with a checkpoint's weights (from the towers or from a single
    process), built with the architecture the checkpoint records (``model.architecture``)."""
    return reference_from(load_checkpoint(path), dropout)


def reference_from(payload: dict, dropout: float = 0.5) -> AlexNet:
    """load_reference of a checkpoint loaded already (load_checkpoint's payload)."""
    model = AlexNet(payload["arch"]["num_classes"], dropout, checkpoint_architecture(payload))
    model.load_state_dict(payload["model"])
    return model


def save_reference(path, model: AlexNet, **extra) -> None:
    """Saves a reference model as a checkpoint that the towers can evaluate or resume from
    (the one-tower net's, only in one process). A model that torch.compile wrapped is saved
    as the model it wraps, under its own parameter names. Raises TypeError for anything else,
    such as one tower (half the net, which nothing would load)."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, AlexNet):
        raise TypeError(f"save_reference saves the single-device AlexNet, not a {type(model).__name__}: put the towers' "
                        f"halves together first (towers.unshard_state_dicts, into an AlexNet's load_state_dict)")
    save_checkpoint(path, checkpoint_payload(model.state_dict(), num_classes=model.num_classes,
                                             architecture=model.architecture, **extra))


# ---------------------------------------------------------------- across the towers

def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _layout(tensors: dict) -> list:
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def _flat(tensors: dict, length: int, dtype, device) -> torch.Tensor:
    """The tensors end to end in one vector of ``length`` (padded with zeros) of ``dtype``,
    which holds every one of them exactly (the widest of their dtypes)."""
    out, used = torch.empty(length, dtype=dtype, device=device), sum(t.numel() for t in tensors.values())
    torch.cat([t.detach().reshape(-1).to(device, dtype) for t in tensors.values()] or [out[:0]], out=out[:used])
    out[used:].zero_()
    return out


def _unflat(vector: torch.Tensor, layout: list, copy: bool = True) -> dict:
    """The tensors of ``layout`` from ``vector``: each a copy with storage of its own, or with
    ``copy`` False views into ``vector`` where the dtype allows (torch.save writes a view's
    whole storage: only for a caller that copies them, or saves all of them)."""
    tensors, start = {}, 0
    for name, shape, dtype in layout:
        count = int(torch.Size(shape).numel())
        tensors[name] = vector[start:start + count].view(shape).to(dtype, copy=copy)
        start += count
    return tensors


def _common_format(layouts: list) -> tuple:
    """The length and dtype of the vector that carries each rank's tensors of ``layouts``."""
    length = max(sum(int(torch.Size(shape).numel()) for _, shape, _ in layout) for layout in layouts)
    dtypes = [dtype for layout in layouts for _, _, dtype in layout] or [torch.float32]
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return length, dtype


def _gather_tensors(tensors: dict, group, device) -> Optional[list]:
    """Each rank's dict of tensors, in group order, at the group's first rank (None on the
    others): one tensor gather on ``device``, the tensors views into one vector per rank.
    Pickled through ``gather_object``, a tower's weights and momentum (hundreds of MB) took
    seconds a save."""
    layouts = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, _layout(tensors), group=group)
    length, dtype = _common_format(layouts)
    first = dist.get_global_rank(group, 0)
    received = [torch.empty(length, dtype=dtype, device=device) for _ in layouts] if dist.get_rank() == first else None
    dist.gather(_flat(tensors, length, dtype, device), received, dst=first, group=group)
    return None if received is None else [_unflat(v.cpu(), layout, copy=False) for v, layout in zip(received, layouts)]


def _scatter_tensors(parts: Optional[list], group, device) -> dict:
    """The inverse of ``_gather_tensors``: the group's first rank holds one dict of tensors
    per rank of the group (``parts``, None on the others) and each rank receives its own,
    on ``device``."""
    first = dist.get_global_rank(group, 0)
    box = [[_layout(part) for part in parts] if dist.get_rank() == first else None]
    dist.broadcast_object_list(box, src=first, group=group)
    layouts = box[0]
    length, dtype = _common_format(layouts)
    mine = torch.empty(length, dtype=dtype, device=device)
    sent = [_flat(part, length, dtype, device) for part in parts] if dist.get_rank() == first else None
    dist.scatter(mine, sent, src=first, group=group)
    return _unflat(mine, layouts[dist.get_group_rank(group, dist.get_rank())])


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(path: Path, tower: Tower, optimizer, progress: Progress, config: TrainConfig,
                        classes: list, train_images: int, mesh: Mesh, data_mean: Optional[torch.Tensor] = None,
                        digests: Optional[dict] = None) -> None:
    """Collective over every rank: replica 0's towers ship their halves to rank 0, which
    writes one unsharded checkpoint (with one rank per replica, ``tower`` is the whole net
    and is saved as it is). The other replicas hold the same weights and momentum (their
    gradients are averaged), so only their random states are gathered, one per rank.
    ``classes``, ``train_images`` and ``digests`` (launch.data.DataBundle's) let a resumed
    run check that its data is the same;
    ``data_mean`` (3 x 256 x 256, the training set's mean image) lets the checkpoint
    classify new images on its own."""
    rank = dist.get_rank()
    rng_states = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(_rng_state(next(tower.parameters()).device), rng_states, dst=0)
    if mesh.replica != 0:
        return
    mine = {f"model/{k}": v for k, v in tower.state_dict().items()}
    mine.update({f"momentum/{name}": optimizer.state[p]["momentum_buffer"] for name, p in tower.named_parameters()
                 if optimizer.state[p].get("momentum_buffer") is not None})
    everyone = _gather_tensors(mine, mesh.tower_group, next(tower.parameters()).device)
    if rank != 0:
        return
    gathered = [{part: {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(part + "/")}
                 for part in ("model", "momentum")} for tensors in everyone]
    momentum = gathered[0]["momentum"]
    placement = config.fc8_placement
    # Two towers: unsharding copies every tensor out of the gathered vectors. One rank: the
    # vector holds exactly the weights and momentum, all saved, so its views are saved as they are.
    unshard = ((lambda states: states[0]) if len(gathered) == 1 else
               (lambda states: unshard_state_dicts(states, placement)))
    extra = {
        "momentum_buffer": unshard([g["momentum"] for g in gathered]) if momentum else {},
        "progress": dataclasses.asdict(progress),
        "rng": {f"rank{r}": state for r, state in enumerate(rng_states)},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "classes": list(classes),
        "train_images": train_images,
    }
    for split, digest in (digests or {}).items():
        extra[f"{split}_digest"] = digest
    if data_mean is not None:
        extra["data_mean"] = data_mean.detach().to("cpu", torch.float32)
    model = unshard([g["model"] for g in gathered])
    with writing_in_run_folder(path.parent):  # as it began: not another made or put there since
        save_checkpoint(path, checkpoint_payload(model, num_classes=len(classes), architecture=tower.architecture,
                                                 **extra), make_folder=False)


def restore_training_state(path, tower: Tower, optimizer, classes: list, mesh: Mesh,
                           with_training: bool) -> Optional[Progress]:
    """Collective over every rank: rank 0 loads an unsharded checkpoint and sends replica
    0's towers their halves (with one rank per replica, the whole net), which then pass
    them on to the same tower of every other replica. With ``with_training`` also the
    momentum, the progress, and each rank's random state as saved; a rank the saved run
    did not have (more replicas now) keeps the state it was seeded with. The number of
    replicas may differ from the saved run's: the weights do not depend on it."""
    rank, device = dist.get_rank(), next(tower.parameters()).device
    payload = load_checkpoint(path, classes) if rank == 0 else None
    if mesh.replica == 0:
        shard = ((lambda state, t: dict(state)) if mesh.towers == 1
                 else (lambda state, t: shard_state_dict(state, t, tower.fc8_placement)))
        shards = None
        if rank == 0:
            momentum = payload.get("momentum_buffer", {}) if with_training else {}
            shards = [{**{f"model/{k}": v for k, v in shard(payload["model"], t).items()},
                       **{f"momentum/{k}": v for k, v in (shard(momentum, t) if momentum else {}).items()}}
                      for t in range(mesh.towers)]
        received = _scatter_tensors(shards, mesh.tower_group, device)
        tower.load_state_dict({k.split("/", 1)[1]: v for k, v in received.items() if k.startswith("model/")})
        for name, p in tower.named_parameters():
            if f"momentum/{name}" in received:
                # in the weights' type (float32), whatever the file's: a checkpoint made smaller by hand
                optimizer.state[p]["momentum_buffer"] = received[f"momentum/{name}"].to(p.dtype)
    states = None
    if rank == 0:
        saved_rng = payload.get("rng", {}) if with_training else {}
        states = [{"rng": saved_rng.get(f"rank{r}"), "progress": payload.get("progress") if with_training else None,
                   "momentum": bool(with_training and payload.get("momentum_buffer"))}
                  for r in range(dist.get_world_size())]
    received = [None]
    dist.scatter_object_list(received, states, src=0)
    mine = received[0]
    if mesh.replica_group is not None:  # replica 0 -> the same tower of the others, by reference to tower index
        source = dist.get_global_rank(mesh.replica_group, 0)
        with torch.no_grad():
            for p in tower.parameters():
                dist.broadcast(p.detach(), src=source, group=mesh.replica_group)
                if mine["momentum"]:
                    buffer = optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    dist.broadcast(buffer, src=source, group=mesh.replica_group)
    if mine["rng"] is not None:
        _set_rng_state(mine["rng"], device)
    return Progress(**mine["progress"]) if mine["progress"] else None
