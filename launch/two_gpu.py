"""python -m launch.two_gpu: train the 2012 AlexNet split over two towers.

With no launcher it starts both ranks itself (rendezvous on 127.0.0.1), or 2·D ranks
for ``--replicas D``; under ``torchrun --nproc-per-node N -m launch.two_gpu`` (N even for
--layout towers) it uses the ranks torchrun gives, N / 2 replicas of the towers
(launch.mesh). NCCL with rank r on GPU r when every rank has a GPU of its own, gloo
otherwise. Run with --help for every option.

Everything a user can get wrong is checked here, in the launching process, before
any rank starts and before a run folder is made: the options, the data, a
checkpoint and whether it fits the data, the run folder. Each gets one line naming
the fix and exit code 2.
"""

import sys

from launch import rank_server  # torch-free
from launch.cli import hold_interrupts  # torch-free

if __name__ == "__main__":
    hold_interrupts()  # a Ctrl-C during the imports below ends the program in one line
    rank_server.start_early(sys.argv)  # imports torch for the ranks while this process imports it for itself

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import resource
import shutil
import shlex
import socket
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from towers import TOWERS

from . import data as data_module
from .checkpoint import (FILENAME, CheckpointError, check_classes, check_training_state, checkpoint_architecture,
                         load_checkpoint, read_as_saved, remove_abandoned_saves, resolve_path,
                         training_checkpoint_bytes)
from .cli import (JSON_DAMAGE, MAX_PROCESSES_PER_CORE, check_compile_backend, home_path, lock_exclusively, quick_exit,
                  shell_word, usable_cores, write_whole)
from .config import (KEPT_UNLESS_GIVEN, RUN_CONTROL, TrainConfig, build_parser, check_schedule_options, check_workers,
                     describe_recipe, given_options, parse_config, recipe_warnings, resolve)
from .meter import console_handler, log_warnings, summary_steps
from .mesh import loading_ranks, machine_ranks
from .ranks import (LOOPBACK, PEER_GONE, PREPARATION_WAIT_S, MissingRank, Placement, RankFailure, choose_placement,
                    cpu_threads_per_rank, die_with_parent, error_line, failed_to_meet, init_process_group,
                    patient_group, reuse_freed_memory, run_ranks, sigterm_as_interrupt)
from .train import architecture, describe_evaluation, elsewhere_than, log_file, run_rank, setup_logging
from .step import AUTOCAST, NO_NATIVE_BF16, convolution_math, native_bf16

log = logging.getLogger("launch.two_gpu")

# The rest is the run's recipe, kept from the checkpoint. Of it, a resumed run may change --epochs (to
# train longer) and, for the fixed schedule, --lr-milestones (which stay where the run's first start
# put them unless given: a run trained longer moves them), --lr (to go on after a loss that diverged;
# the schedule keeps its reductions, see launch.schedule.base_rate) and --warmup-steps (counted from the
# run's first step, so a warm-up again only where longer than the steps trained). --val-limit
# stays: the plateau schedule compares the evaluations of one fixed set of images.
# --data may name the run's images at a new place (the class names and the training-image count are
# checked against the checkpoint's, and the statistics computed from the images found there).
CHANGEABLE_ON_RESUME = {"epochs", "lr", "warmup_steps", "data", "lr_milestones"}
# Recipe fields that a checkpoint's arch records: --eval-only takes them from the checkpoint.
ARCHITECTURE_OPTIONS = ("lrn", "pooling", "activation")
LOCK_NAME = ".lock"  # held by the run using the folder (see lock_run_folder)
# Options that only training reads: --eval-only refuses them rather than ignore them. (--recipe
# stays: it gives the evaluation's batch size where --batch-size does not.)
TRAINING_ONLY = ("epochs", "lr", "momentum", "weight_decay", "schedule", "patience", "max_reductions", "lr_milestones",
                 "warmup_steps", "init", "dropout", "seed", "log_every", "checkpoint_every", "max_steps")


def _gloo_finds_address(name: str) -> bool:
    """Whether gloo finds an IPv4 or IPv6 address under the network interface name ``name`` (an
    alias's label such as eth0:1 too), asked of gloo itself: the lookup a rank's group makes."""
    gloo = getattr(dist, "ProcessGroupGloo", None)  # a torch built without gloo fails elsewhere, in its own words
    try:
        return gloo is None or gloo.create_device(interface=name) is not None
    except RuntimeError:  # "Unable to find address for: NAME"
        return False


def check_gloo_interface() -> None:
    """GLOO_SOCKET_IFNAME, where set, must name this machine's network interfaces (a list of
    them, comma-separated), each with an address that gloo finds: else every rank fails in
    gloo's C++ as it starts ("Unable to find address for"), after the run folder is made."""
    given = os.environ.get("GLOO_SOCKET_IFNAME", "")
    if len(given) <= 1:  # gloo reads none shorter
        return
    try:
        here = sorted(name for _, name in socket.if_nameindex())
    except (OSError, AttributeError):  # not asked where the system does not say
        return
    names = given.split(",")[:-1] if given.endswith(",") else given.split(",")
    missing = [name for name in names if name.split(":")[0] not in here]  # eth0:1, an alias of eth0
    if missing:
        raise ValueError(f"GLOO_SOCKET_IFNAME={given} names {', '.join(missing)}, which this machine has no network "
                         f"interface of (it has {', '.join(here)}): unset it, or name one of those")
    bare = [name for name in names if not _gloo_finds_address(name)]
    if bare:
        usable = [name for name in here if _gloo_finds_address(name)]
        raise ValueError(f"GLOO_SOCKET_IFNAME={given} names {', '.join(bare)}, under which gloo finds no IP address "
                         f"here (an address added under a label, such as eth0:1, is found under that label alone): "
                         f"unset it, or name one under which it finds one ({', '.join(usable) or 'none here'})")


def check_master_addr(addr: str) -> None:
    """The rendezvous listens on ``addr``, and the ranks connect to it there: it must name an
    address of this machine that its own processes can reach."""
    try:
        server = socket.create_server((addr, 0), family=socket.getaddrinfo(addr, 0)[0][0])
    except OSError as exc:  # socket.gaierror too: a name that does not resolve
        raise ValueError(f"--master-addr {addr} cannot be listened on here ({exc.strerror or exc}): give an address "
                         f"of this machine, such as {LOOPBACK} (the default)") from None
    with server:
        try:
            socket.create_connection(server.getsockname()[:2], timeout=10).close()
        except OSError as exc:  # the loopback interface down (a network namespace of its own): they waited --timeout
            raise ValueError(f"--master-addr {addr} can be listened on here but not reached ({exc.strerror or exc}): "
                             f"bring its network interface up (ip link set lo up, for {LOOPBACK}), or give another "
                             f"address of this machine") from None


def _as_option(name: str, value) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _given(config: TrainConfig, given: Optional[set]) -> tuple:
    """(the parser's defaults, the options the command line gave): ``given`` as found by
    config.given_options, or where the caller has none, the options whose values differ
    from their defaults."""
    defaults = vars(build_parser().parse_args([]))
    if given is None:
        given = {name for name, value in dataclasses.asdict(config).items() if value != defaults[name]}
    return defaults, given


def resumed_config(config: TrainConfig, payload: dict, given: Optional[set] = None) -> TrainConfig:
    """A resumed run keeps the recipe saved in its checkpoint; options that would change it are refused.
    ``given``: the options the command line gave (default: those that differ from their defaults)."""
    saved = payload.get("config")
    if saved is None:
        raise CheckpointError(f"{config.resume} holds weights but no training state (saved from the single-device "
                              f"model?): use it with --eval-only, or start a new run")
    # saved before these options existed: the architecture is in the checkpoint's arch record all the same
    saved = {**{name: payload["arch"][name] for name in ARCHITECTURE_OPTIONS}, **saved}
    # saved before --recipe existed: its recipe fields were filled all the same, from the
    # recipe that was then the dataset's default
    saved = {"recipe": "paper" if saved.get("data") is not None else "small", **saved}
    if saved.get("patience") == 0:  # saved before --patience 0 was refused: it divided the rate as 1 does
        saved["patience"] = 1
    defaults, given = _given(config, given)
    for name in ("out", "run_name"):  # in RUN_CONTROL, but a resumed run goes on in its own folder
        if name in given:
            raise ValueError(f"{_as_option(name, getattr(config, name))}: a resumed run goes on in its own folder, "
                             f"{resolve_path(config.resume).parent}; drop the option (to branch the run, copy "
                             f"that folder and resume the copy)")
    missing = set(defaults) - set(saved) - RUN_CONTROL  # this run's own options fill those
    if missing:
        raise CheckpointError(f"{config.resume} lacks parts of its run's recipe "
                              f"({', '.join(sorted(missing))}), so it cannot be resumed: "
                              f"evaluate it with --eval-only, or train afresh")
    merged = dataclasses.asdict(TrainConfig(**saved))  # as a fresh parse gives it (tuples, not lists)
    for name, value in dataclasses.asdict(config).items():
        if name in KEPT_UNLESS_GIVEN and name not in given:
            continue
        if name in RUN_CONTROL or (name in CHANGEABLE_ON_RESUME and name in given):
            merged[name] = value
        elif name in given and value != merged[name]:
            had = f"'s {_as_option(name, merged[name]) if isinstance(value, bool) else merged[name]}" \
                if merged[name] is not None else f", which ran without --{name.replace('_', '-')}"
            raise ValueError(f"{_as_option(name, value)} differs from the resumed run{had}: "
                             f"a resumed run keeps its recipe, so drop the option (or start a new run)")
    if "lr_milestones" in given and merged["schedule"] != "fixed":
        raise ValueError(f"--lr-milestones divides the rate at fixed epochs, but the resumed run's schedule is "
                         f"{merged['schedule']}: drop --lr-milestones")
    return TrainConfig(**merged)


def evaluated_config(config: TrainConfig, payload: dict, given: Optional[set] = None) -> TrainConfig:
    """--eval-only evaluates the net that the checkpoint holds: its LRN, pooling and
    activation come from the checkpoint, and so does --layout one-tower for the one-tower
    net (no other layout holds it); an option that names another is refused, as is an
    option of training, which it would ignore. Without --data, on the validation images of
    the data it was trained on (the built-in set too), as a resumed run trains on them; without
    --precision, in the run's arithmetic, as the run evaluated it (its summary's numbers)."""
    _, given = _given(config, given)
    saved = payload.get("config")
    trained_on = saved.get("data") if isinstance(saved, dict) else None  # weights alone carry no data folder
    trained_in = saved.get("precision") if isinstance(saved, dict) else None
    if "precision" not in given and trained_in in AUTOCAST:
        config = dataclasses.replace(config, precision=trained_in)
    if "data" not in given and trained_on is not None:
        if not home_path(trained_on).exists():
            raise ValueError(f"{config.eval_only} was trained on {trained_on}, which is not there now: give the "
                             f"images to evaluate it on with --data")
        config = dataclasses.replace(config, data=trained_on)
    unused = [f"--{name.replace('_', '-')}" for name in TRAINING_ONLY if name in given]
    if unused:
        raise ValueError(f"{' '.join(unused)}: --eval-only evaluates {config.eval_only} and trains nothing, so "
                         f"{'this option does' if len(unused) == 1 else 'these options do'} nothing: drop "
                         f"{'it' if len(unused) == 1 else 'them'}")
    saved = payload["arch"]
    for name in ARCHITECTURE_OPTIONS:
        value = getattr(config, name)
        if name in given and value != saved[name]:
            raise ValueError(f"{_as_option(name, value)}: {config.eval_only} holds a net with "
                             f"{_as_option(name, saved[name])}, and is evaluated as it was trained: drop the option")
    if "layout" not in given and checkpoint_architecture(payload).net == "one-tower":
        config = dataclasses.replace(config, layout="one-tower")  # the one layout that holds it
    return dataclasses.replace(config, **{name: saved[name] for name in ARCHITECTURE_OPTIONS})


def check_layout_holds(config: TrainConfig, payload: dict) -> None:
    """The one-tower net of section 3.2 runs only as --layout one-tower, and that layout holds nothing else."""
    path, saved_net = config.resume or config.eval_only, checkpoint_architecture(payload).net
    if saved_net == "one-tower" and config.layout != "one-tower":
        raise ValueError(f"{path} holds the one-tower net of section 3.2 (half the kernels in conv1-conv4), which "
                         f"--layout {config.layout} cannot hold: use --layout one-tower")
    if saved_net != "one-tower" and config.layout == "one-tower":
        raise ValueError(f"{path} holds the paper's two-tower net, not the one-tower net that --layout one-tower "
                         f"builds: use --layout towers or --layout single")


def check_resumed_file(resume: str) -> None:
    """A resumed run goes on in the folder of the checkpoint it resumes, saving as its
    checkpoint.pt: a checkpoint file named otherwise must not lie beside another one, which
    the run would write over (a copy kept of an earlier step, in its run's folder), nor, in a
    folder without one, beside another run's files, whose records it would take up as its own:
    a run's config.json or summary.json, or records whose last resume is not of this file."""
    path = resolve_path(resume)
    folder, own = path.parent, path.parent / FILENAME
    if path.name == FILENAME:
        return
    if own.exists():
        if own.samefile(path):
            return
        why = f"and {own} is another checkpoint, which it would write over"
    else:  # whose run, nothing tells: another's records would be taken up, and replaced where they pass its step
        started = [name for name, found in (("config.json", _run_config(folder) is not None),
                                            ("summary.json", (folder / "summary.json").exists())) if found]
        if started:
            why = (f"and {folder} holds a run's files ({', '.join(started)}) but no {FILENAME}, which may be "
                   f"another run's")
        elif (folder / "metrics.jsonl").exists() and not _resumed_last(folder / "metrics.jsonl", path):
            why = (f"and {folder} holds records (metrics.jsonl) but no {FILENAME}, and the last resume they record is "
                   f"not of this file (or none is): they may be another run's")
        else:
            return
    raise ValueError(f"--resume {path}: a resumed run goes on in that file's folder and saves as its {FILENAME}, "
                     f"{why}: copy {path.name} into a folder of its own as {FILENAME} (with the run's other files, "
                     f"if it should go on with them), and resume that folder")


def _resumed_last(metrics: Path, checkpoint: Path) -> bool:
    """Whether the last 'resume' record of ``metrics`` names the file ``checkpoint``, however
    either path is written: as a resume of that file in a folder of its own, stopped before
    its first save, left it."""
    try:
        lines = metrics.read_bytes().splitlines()
    except OSError:
        return False
    for line in reversed(lines):
        try:
            record = json.loads(line.decode("utf-8"))
        except JSON_DAMAGE:
            continue
        if isinstance(record, dict) and record.get("event") == "resume":
            try:
                return os.path.samefile(record["checkpoint"], checkpoint)
            except (KeyError, TypeError, ValueError, OSError):  # none recorded, not a path, not there
                return False
    return False


def check_resumable(config: TrainConfig, payload: dict, bundle) -> None:
    """A resumed run must find the training set it left, and something left to train."""
    run, progress = resolve_path(config.resume).parent, payload["progress"]
    saved_images, train_images = payload.get("train_images"), len(bundle.train)
    batches = data_module.batches_per_epoch(bundle, config.batch_size)
    if (saved_images is not None and saved_images != train_images) or (saved_images is None
                                                                        and progress["batch"] > batches):
        had = f"{saved_images} training images" if saved_images is not None else f"at least {progress['batch']} batches"
        raise data_module.DataError(
            f"the training set changed since {run} was saved: it had {had}, {bundle.root / 'train'} now has "
            f"{train_images} ({batches} batches of {config.batch_size}), so the run cannot continue where it "
            f"stopped: resume with the data it was trained on, or start a new run")
    if progress["batch"] > batches:  # as many images as it had: the checkpoint is at fault, not the data
        raise CheckpointError(f"{config.resume} records batch {progress['batch']} of an epoch of {batches} batches "
                              f"({train_images} training images in batches of {config.batch_size}): it was not "
                              f"saved by this program; evaluate it with --eval-only, or start a new run")
    saved_train = payload.get("train_digest")
    if saved_train is not None and saved_train != bundle.digests["train"]:
        raise data_module.DataError(
            f"the training set changed since {run} was saved: {bundle.root / 'train'} holds as many images, but "
            f"other ones (by name, class or size), so the run's epoch would not go on over the images it began "
            f"with: resume with the data it was trained on, or start a new run")
    # by name, class and size; a checkpoint saved before digests, by name and class ("val_set")
    saved_val, val = payload.get("val_digest"), bundle.digests["val"]
    if saved_val is None and payload.get("val_set") is not None:
        saved_val, val = payload["val_set"], bundle.fingerprint("val")
    if saved_val is not None and saved_val != val:
        raise data_module.DataError(
            f"the validation set changed since {run} was saved: {bundle.root / 'val'} now holds other images (it "
            f"has {len(bundle.val)}), and the run's evaluations so far (and the plateau schedule's best error) are of "
            f"the set it began with: resume with the data it was trained on, or start a new run")
    done, given = progress["epoch"], run if resolve_path(config.resume).name == FILENAME else config.resume
    if done >= config.epochs:
        epochs = f"{done} epoch{'s' * (done != 1)}"
        trained = f"has finished its {epochs}" if not progress["batch"] else \
            f"has trained {epochs} and {progress['batch']} step{'s' * (progress['batch'] != 1)} of the next"
        fewer = f", and --epochs {config.epochs} asks for no more" if config.epochs < done else ""
        raise ValueError(f"{given} {trained}{fewer}: train it longer with --resume {shell_word(given)} --epochs N "
                         f"(N > {done}), or evaluate it with --eval-only {shell_word(given)}")
    if config.max_steps is not None and progress["global_step"] >= config.max_steps:
        raise ValueError(f"{given} has taken {progress['global_step']} steps, --max-steps {config.max_steps} no more "
                         f"than that: give a larger --max-steps, or none")


def in_use(run_dir: Path, holder: BlockingIOError, resumed: bool) -> ValueError:
    """What to do where another run holds ``run_dir``'s lock (``holder`` names it)."""
    other = ("" if resumed else  # a resumed run goes on in its own folder, whatever --run-name says
             ", or choose another --run-name")
    return ValueError(f"{run_dir} is in use by another run ({holder}): wait for it to end{other}")


def lock_run_folder(run_dir: Path, resumed: bool = False):
    """An exclusive lock on the run folder, held while the returned file stays open, and
    released by the system when this process ends, however it ends. Refuses a folder that
    takes no new file, where the run could write none of its own."""
    fix = ("copy the folder to a place you can write and resume the copy" if resumed else
           "give an --out folder you can write")
    try:
        lock = lock_exclusively(run_dir / LOCK_NAME)
    except BlockingIOError as exc:
        raise in_use(run_dir, exc, resumed) from None
    except OSError as exc:  # a folder of someone else's, a read-only disk
        raise ValueError(f"cannot write in the run folder {run_dir} ({exc.strerror}): {fix}") from None
    try:  # the lock file of an earlier run opens in a folder that takes no file beside it (read-only, immutable)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as exc:
        lock.close()
        raise ValueError(f"cannot write in the run folder {run_dir} ({exc.strerror}): {fix}") from None
    return lock


def new_run_folder(config: TrainConfig) -> tuple:
    """--out/--run-name, made if missing; without --run-name, the date and time (made unique).
    Returns the folder and whether this call made it."""
    out = home_path(config.out)
    try:
        return _new_run_folder(config, out)
    except OSError as exc:
        raise _cannot_use_out(out, exc) from None


def _cannot_use_out(out, exc: OSError) -> ValueError:
    """--out that cannot be examined or made: a name too long, a folder on the way that cannot be read, ..."""
    return ValueError(f"cannot use --out {out} ({exc.strerror or exc}): give an --out folder you can write")


def _new_run_folder(config: TrainConfig, out: Path) -> tuple:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder (it is made if missing)")
    if out.is_symlink() and not out.exists():
        if not os.path.exists(os.path.realpath(out)) and os.path.islink(os.path.realpath(out)):  # where links loop
            raise ValueError(f"--out {out} is a symbolic link in a loop of links: give another --out")
        raise ValueError(f"--out {out} is a symbolic link to {os.readlink(out)}, which is not there: make that "
                         f"folder, or give another --out")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    names = [config.run_name] if config.run_name else [stamp] + [f"{stamp}-{i}" for i in range(2, 100)]
    for name in names:
        run_dir = out / name
        try:
            run_dir.mkdir(parents=True)
            return run_dir, True
        except FileExistsError:
            if config.run_name and run_dir.is_dir():  # made beforehand: the caller looks at what it holds
                return run_dir, False
            if config.run_name:  # a file of that name
                raise ValueError(f"{run_dir} is a file: choose another --run-name") from None
        except OSError as exc:
            raise ValueError(f"cannot make the run folder {run_dir} ({exc.strerror}): give an --out folder "
                             f"you can write") from None
    raise ValueError(f"{out} already holds runs named {stamp}*: give a --run-name")


def check_room_for_checkpoints(config: TrainConfig, num_classes: int) -> None:
    """A disk that cannot hold the run's checkpoints is found now, not after the first epoch:
    each save writes its file beside the one it replaces (a resumed run's is there already)."""
    folder = resolve_path(config.resume).parent if config.resume else home_path(config.out).absolute()
    try:
        while not folder.exists() and folder != folder.parent:  # --out is made later: the disk that will hold it
            folder = folder.parent
    except OSError as exc:
        raise _cannot_use_out(config.out, exc) from None
    if config.resume:  # a save cut short by a kill (SIGTERM to the whole group) left its partial file
        with contextlib.suppress(OSError):  # a folder that cannot be written is refused later, saying so
            given = resolve_path(config.resume)
            for path in {given, given.parent / FILENAME}:  # the run saves to the latter, whatever it resumed
                remove_abandoned_saves(path)
    size = training_checkpoint_bytes(num_classes, architecture(config))
    largest = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # for this process and the ranks it starts
    if largest != resource.RLIM_INFINITY and largest < size:
        raise ValueError(f"this run's checkpoint is {size / 1e6:.1f} MB and the largest file this program may write is "
                         f"{largest / 1e6:.1f} MB: raise the limit on the size of a file (ulimit -f)")
    needed = size if config.resume else 2 * size
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"the disk holding {folder} has {free / 1e6:.1f} MB free and this run's checkpoints need "
                         f"{needed / 1e6:.1f} MB (each written beside the one it replaces): free some space there, "
                         + ("or move the run folder to a larger disk" if config.resume else "or give an --out on a "
                            "larger disk"))


def prepare_run(config: TrainConfig, checkpoint: Optional[dict]):
    """On rank 0 (or the launching process): open the data (the one scan of it), size the
    recipe to it, check it against the options and the checkpoint, then lock the run folder
    and write its config.json. Returns (config with its recipe complete, run folder, data
    bundle, locks): the run folder's, and a shared one on a data folder made by launch.prepare
    (which a launch.prepare into it waits for: the run's images are not rewritten under it),
    held until ``locks.close()``."""
    locks = contextlib.ExitStack()
    try:
        if config.data is not None:
            reading = data_module.hold_for_reading(home_path(config.data))
            if reading is not None:
                locks.enter_context(reading)
        config, run_dir, bundle, lock = _prepare_run(config, checkpoint)
        locks.enter_context(lock)
    except BaseException:
        locks.close()
        raise
    return config, run_dir, bundle, locks


def _prepare_run(config: TrainConfig, checkpoint: Optional[dict]):
    if config.data is None:
        log.info("data: the built-in dataset (ten generated texture classes), no download needed")
    elif config.resume and not home_path(config.data).exists():
        if config.data == checkpoint["config"].get("data"):
            raise ValueError(f"{config.resume} was trained on {config.data}, which is not there now: give the "
                             f"images' new place with --data")
        raise ValueError(f"--data {config.data} does not exist: give the folder of the images that {config.resume} "
                         f"was trained on")
    saved_mean = None if checkpoint is None else checkpoint.get("data_mean")  # in memory (load_checkpoint)
    # The net goes on seeing its inputs minus the mean image it was trained with, not the
    # mean of what --data holds now (another set, or the same one grown). An evaluation with
    # it needs nothing else of the training set: not its statistics, not even its train/.
    evaluating = bool(config.eval_only) and saved_mean is not None
    if config.eval_only and saved_mean is None and config.data is not None \
            and not (home_path(config.data) / "train").is_dir():
        raise ValueError(f"{config.eval_only} holds no mean image of its training set (saved by an earlier version, "
                         f"or from the single-device model without it), so the evaluation computes it from the "
                         f"training images: give --data a folder that holds the train/ it was trained on too")
    known = data_module.DataStats.of_mean(saved_mean) if evaluating else None
    def the_runs_data(bundle) -> None:  # a resume refused for other data computes, caches and removes nothing
        check_classes(checkpoint, resolve_path(config.resume), bundle.classes)
        check_resumable(resolve(config, train_images=len(bundle.train)), checkpoint, bundle)

    bundle = data_module.open_data(config.data, classify=True, stats=known,  # one class refused (prepare takes it)
                                   need_train=not evaluating, before_stats=the_runs_data if config.resume else None,
                                   builtin_alternative=not (config.resume or config.eval_only))  # else: the run's
    if evaluating:
        log.info("data: %s (%d classes, %d validation images; train/ not read: an evaluation does not need it)",
                 bundle.root, len(bundle.classes), len(bundle.val))
    else:
        log.info("data: %s (%d classes, %d training and %d validation images)", bundle.root, len(bundle.classes),
                 len(bundle.train), len(bundle.val))
    milestones_given = config.lr_milestones is not None  # by the user, not filled by the recipe
    config = resolve(config, train_images=len(bundle.train))
    if config.resume:  # warned of at its start, if given; again where this resume moves them or its end
        saved = checkpoint["config"]
        milestones_given = (tuple(config.lr_milestones or ()), config.epochs) != \
            (tuple(saved.get("lr_milestones") or ()), saved.get("epochs"))
    if not config.eval_only:
        log.info("%s", describe_recipe(config, len(bundle.train)))
        for warning in recipe_warnings(config, len(bundle.train), milestones_given):
            log.warning("%s", warning)
    if config.fc8_placement == "split" and len(bundle.classes) % TOWERS:
        raise ValueError(f"--fc8-placement split gives each tower half of FC8's neurons and needs an even number of "
                         f"classes; the data has {len(bundle.classes)}: use --fc8-placement tower0")
    if checkpoint is not None:  # checked here, before any rank starts, so a bad one gets a plain error
        check_classes(checkpoint, resolve_path(config.resume or config.eval_only), bundle.classes)
        if saved_mean is not None:
            if not evaluating:
                bundle = dataclasses.replace(bundle, stats=dataclasses.replace(bundle.stats, mean=saved_mean))
            log.info("data: the mean image subtracted is the one saved in the checkpoint, its training set's")
    if not config.eval_only:
        data_module.check_batch_size(bundle, config.batch_size)
        check_room_for_checkpoints(config, len(bundle.classes))
    if not config.resume:
        data_module.check_outside_the_images("--out", config.out, bundle.root)
    run_dir, made_folder = (resolve_path(config.resume).parent, False) if config.resume else new_run_folder(config)
    made_lock = not (run_dir / LOCK_NAME).exists()
    lock = lock_run_folder(run_dir, resumed=bool(config.resume))
    written = None  # the config.json of a new run, removed where this start stops before its folder is whole
    try:
        if not config.resume:
            if (run_dir / FILENAME).exists():
                raise ValueError(f"{run_dir} already holds a run: resume it with --resume {shell_word(run_dir)}, "
                                 f"or choose another --run-name")
            remove_abandoned_saves(run_dir / FILENAME)  # of an earlier start killed in its first save
            others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
            if is_a_start_of_a_run(run_dir):
                raise ValueError(f"{run_dir} holds an earlier start of a run, without a checkpoint "
                                 f"({', '.join(others[:4])}): choose another --run-name, or remove that folder "
                                 f"(rm -r {shell_word(run_dir)})")
            if others:
                raise ValueError(f"{run_dir} holds other files ({', '.join(others[:4])}): choose another "
                                 f"--run-name (a run starts in a folder of its own)")
            options = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
            written = run_dir / "config.json"  # none was there (others, above)
            try:
                write_whole(written, lambda partial: partial.write_text(options))
            except OSError as exc:  # a full disk, say (an evaluation checks no room for checkpoints)
                raise ValueError(f"cannot write {written} ({exc.strerror or exc}): free space on "
                                 f"its disk, or give another --out") from None
        else:
            check_run_files(run_dir)  # config.json follows the options at the run's first save (train.save_now)
            check_still_as_read(config.resume, checkpoint)
        log.info("results: %s", run_dir.resolve())
    except BaseException:  # a Ctrl-C too
        if written is not None:
            written.unlink(missing_ok=True)
        if made_lock and not config.resume:  # a folder refused is left as it was found
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            if made_folder:  # made above, for this run alone, and empty
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
        lock.close()
        raise
    return config, run_dir, bundle, lock


READ_AS = "read_as"  # a loaded checkpoint's key (in memory alone): which file it was read from, _file_identity's


def _file_identity(path: Path) -> Optional[tuple]:
    """What tells a file from another that took its name since (a save writes a new file and
    renames it over the old one); None where it cannot be looked at."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def check_still_as_read(resume: str, checkpoint: dict) -> None:
    """Raises ValueError where the checkpoint to resume is not the file read and checked
    before its run folder was locked: another run, which held the folder, saved a later one
    there (and ended) meanwhile; the ranks would resume that one, unchecked (--max-steps).
    A checkpoint loaded otherwise than by _configure (which records READ_AS) is taken as it is."""
    if READ_AS in checkpoint and checkpoint[READ_AS] != _file_identity(resolve_path(resume)):
        raise ValueError(f"{resume} was saved again, by another run of its folder, while this one started: start "
                         f"this one again to resume from it as it is now")


RUN_FILES = ("config.json", "metrics.jsonl", "train.log", "summary.json")  # read, appended or replaced on resume
RUN_CONFIG_KEYS = {"layout", "batch_size", "run_name", "out"}  # of the config.json this program writes


def _run_config(folder: Path) -> Optional[dict]:
    """The config.json this program wrote in ``folder`` (at a run's first start, or with a
    resume's checkpoint), or None: none, or a user's own."""
    path = folder / "config.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, *JSON_DAMAGE):
        return None
    return saved if isinstance(saved, dict) and RUN_CONFIG_KEYS <= saved.keys() else None


def check_run_files(run_dir: Path) -> None:
    """Raises ValueError, before any rank starts, where one of a resumed run's files is there and
    is not a file: reading a FIFO waits for a writer for good, and a folder fails a rank at its
    first line (or the run at its last, summary.json)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.exists() and not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file (a FIFO, a socket or a device)"
            raise ValueError(f"{path} is {what}, where the run keeps its {name}: remove or rename it, and resume "
                             f"again")


def report(summary: dict) -> None:
    centre = summary["centre"]
    line = (f"validation top-1 error {100 * centre['top1_error']:.2f}%, top-5 error "
            f"{100 * centre['top5_error']:.2f}% ({describe_evaluation(centre)})")
    if "ten_patch" in summary:
        ten = summary["ten_patch"]
        line += f"; ten-patch test: top-1 {100 * ten['top1_error']:.2f}%, top-5 {100 * ten['top5_error']:.2f}%"
        if (ten["images"], ten["skipped"]) != (centre["images"], centre["skipped"]):  # an image unusable between them
            line += f" ({ten['images']} images" + (f", {ten['skipped']} unusable left out)" if ten["skipped"] else ")")
    log.info("done: %s", line)
    if summary.get("train_seconds"):
        log.info("trained %d step%s, to step %d, in %.0f s (%.1f images/s); wall time %.0f s; %s",
                 summary["steps_this_run"], "s" * (summary["steps_this_run"] != 1), summary["steps"],
                 summary["train_seconds"], summary["images_per_s"], summary["wall_seconds"],
                 f"results in {summary['run_dir']}" if summary["run_dir"] else "its run folder is gone")
    if summary.get("train_skipped"):
        many = summary["train_skipped"] != 1
        log.warning("%d training image%s could not be used in this run; the next usable image stood in for %s "
                    "(named in the log above): replace %s", summary["train_skipped"], "s" * many,
                    "each" if many else "it", "them" if many else "it")
    if summary.get("compile"):
        log.info("torch.compile (%s) made %d graphs on rank 0, recompilations included, with %d graph breaks",
                 summary["compile"], summary["compiled_graphs"], summary["graph_breaks"])


def _torchrun_env() -> bool:
    """Whether torchrun (or a launcher like it) started this process: RANK and WORLD_SIZE set,
    which must then be whole numbers that fit, beside the rendezvous's MASTER_ADDR and MASTER_PORT."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    fix = "start the program with torchrun, or without these variables to have it start its own ranks"
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a whole number: {fix}") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise ValueError(f"RANK={values['RANK']} and WORLD_SIZE={values['WORLD_SIZE']}: a rank lies in "
                         f"0 ... WORLD_SIZE - 1: {fix}")
    if not 0 < values.get("MASTER_PORT", 1) < 65536:
        raise ValueError(f"MASTER_PORT={values['MASTER_PORT']} is not a port (1-65535): {fix}")
    if values.get("LOCAL_WORLD_SIZE", 1) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={values['LOCAL_WORLD_SIZE']} must be at least 1: {fix}")
    if not 0 <= values.get("LOCAL_RANK", 0) < values.get("LOCAL_WORLD_SIZE", values["WORLD_SIZE"]):
        raise ValueError(f"LOCAL_RANK={values['LOCAL_RANK']}: a rank's number on its machine lies in 0 ... "
                         f"{'LOCAL_WORLD_SIZE' if 'LOCAL_WORLD_SIZE' in values else 'WORLD_SIZE'} - 1: {fix}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: {fix}")
    return True


def check_rendezvous_address() -> None:
    """Under torchrun: MASTER_ADDR must resolve, or the rendezvous would wait --timeout for nothing."""
    addr = os.environ["MASTER_ADDR"]
    try:
        socket.getaddrinfo(addr, int(os.environ["MASTER_PORT"]))
    except socket.gaierror as exc:
        raise ValueError(f"MASTER_ADDR={addr!r} is not an address, nor a name that resolves ({exc.strerror}): give "
                         f"the address of the machine of rank 0 (torchrun: --master-addr), start the program with "
                         f"torchrun, or without these variables to have it start its own ranks") from None


def is_a_start_of_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds a start of a training run that ended before anything to keep: the
    config.json this program writes as a run starts (a user's own is no sign of one), not an
    evaluation's, and no summary.json (a run that finished, its checkpoint removed since)."""
    saved = _run_config(folder)
    try:
        finished = (folder / "summary.json").exists()
    except OSError:
        return False
    return saved is not None and not saved.get("eval_only") and not finished


def check_saved_one(resume: Path) -> None:
    """--resume of a start of a run (``is_a_start_of_a_run``) without a checkpoint, given as the
    folder or as its checkpoint.pt: nothing to resume. The partial file of its save that was
    killed (some 300 MB) is removed; ValueError says how to start the run again. A run at work
    there now (its lock held) is named as such; under torchrun, by rank 0, which alone locks."""
    try:
        folder = resume if resume.is_dir() or resume.name != FILENAME else resume.parent
        started = is_a_start_of_a_run(folder) and not (folder / FILENAME).exists()
    except OSError:  # a folder that cannot be read: load_checkpoint says so
        return
    if not started:
        return
    if not _torchrun_env() or int(os.environ["RANK"]) == 0:  # under torchrun, each rank checks: one locks
        try:
            lock = lock_exclusively(folder / LOCK_NAME)
        except BlockingIOError as exc:  # a run still before its first save
            raise in_use(folder, exc, resumed=True) from None
        except OSError:  # a folder this user cannot write, a colleague's: nothing of it to remove
            lock = None
        if lock is not None:
            with lock, contextlib.suppress(OSError):
                remove_abandoned_saves(folder / FILENAME)
    raise ValueError(f"{folder} holds no checkpoint to resume (its run stopped before its first save ended, or the "
                     f"checkpoint was removed): start the run again with the options in its config.json, with another "
                     f"--run-name or after removing that folder (rm -r {shell_word(folder)})")


def _configure(argv) -> tuple:
    """(config, checkpoint payload or None, placement) from the command line; raises ValueError."""
    config, given = parse_config(argv), given_options(argv)
    config.validate()
    if "master_addr" in given and _torchrun_env():
        raise ValueError("--master-addr is where the ranks that this program starts meet; torchrun's ranks meet where "
                         "torchrun says (its --master-addr or --rdzv-endpoint): drop --master-addr under torchrun")
    check_schedule_options(config)
    if config.resume:
        check_saved_one(home_path(config.resume))
    # looked at first: a file that took its place while it was read would be taken for the one read
    read_as = _file_identity(resolve_path(config.resume)) if config.resume else None
    checkpoint = load_checkpoint(config.resume or config.eval_only) if config.resume or config.eval_only else None
    if config.resume:
        checkpoint[READ_AS] = read_as
        check_resumed_file(config.resume)
        check_training_state(config.resume, checkpoint)
        config = resumed_config(config, checkpoint, given)
    if config.eval_only:
        config = evaluated_config(config, checkpoint, given)
    if checkpoint is not None:
        check_layout_holds(config, checkpoint)
    if config.layout != "towers" and "fc8_placement" in given and config.fc8_placement != "tower0":
        net = "one-tower net" if config.layout == "one-tower" else "single-device reference"
        raise ValueError(f"--fc8-placement {config.fc8_placement}: the {net} has no towers to place FC8's "
                         f"neurons on: drop the option")
    towers = TOWERS if config.layout == "towers" else 1
    saved_replicas = checkpoint["config"].get("replicas") if config.resume else None
    config = dataclasses.replace(resolve(config), replicas=_replicas(config, towers, saved_replicas))
    config.validate()
    config.check_batch_split(torchrun=_torchrun_env())
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # torchrun's count of the ranks on this machine; a stray one is no concern of ranks this program starts
    ranks_here = (int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None) if _torchrun_env() else None
    placement = choose_placement(config.backend, gpus, ranks=towers * config.replicas, towers=towers,
                                 ranks_here=ranks_here)
    here = machine_ranks(int(os.environ["RANK"])) if _torchrun_env() else range(towers * config.replicas)  # all ours
    check_workers(config.workers, loading_ranks(here, towers))  # one, the same on every rank, where none of its loads
    if config.compile is not None:
        check_compile_backend(config.compile, "--compile", placement.device)
    if config.precision == "bf16" and placement.device == "cuda" and not native_bf16():
        kept = "" if "precision" in given else f" (the arithmetic {config.resume or config.eval_only} was trained in)"
        raise ValueError(f"--precision bf16{kept}: {torch.cuda.get_device_name(0)} has {NO_NATIVE_BF16}; add "
                         f"--precision fp32")
    check_gloo_interface()  # gloo carries the ranks' own talk under NCCL too (patient_group), a lone rank's too
    log.info("placement: %s", placement.describe())
    log.info("architecture: %s", architecture(config).describe())
    log.info("arithmetic: %s", describe_arithmetic(config, placement.device))
    return config, checkpoint, placement


def describe_arithmetic(config: TrainConfig, device: str = "cpu") -> str:
    precision = "bf16 autocast, float32 weights" if config.precision == "bf16" else "float32"
    if device == "cuda" and config.precision != "bf16" and convolution_math() == "tf32":
        precision += " (convolutions in TF32, cuDNN's default on a GPU)"
    if config.compile is None:
        return f"{precision}, eager"
    what = "a tower's first four blocks between its exchanges; FC8 eager" if config.layout == "towers" \
        else "the whole net"
    return f"{precision}, torch.compile with {config.compile} ({what})"


def _replicas(config: TrainConfig, towers: int, resumed: Optional[int] = None) -> int:
    """--replicas, else those of the run resumed (``resumed``), else 1; under torchrun the
    number its ranks make."""
    if not _torchrun_env():
        replicas = config.replicas or resumed or 1
        cores = usable_cores()
        most = MAX_PROCESSES_PER_CORE * cores // towers
        if replicas > most:
            raise ValueError(f"--replicas {replicas} would start {replicas * towers} processes on the {cores} cores "
                             f"this program may use: use at most {most} here, or torchrun across machines")
        return replicas
    world_size = int(os.environ["WORLD_SIZE"])
    net, gave = f"--layout {config.layout}", f"torchrun gave {world_size} rank{'s' * (world_size != 1)}"
    leftover = "" if "TORCHELASTIC_RUN_ID" in os.environ else (  # torchrun's agent sets it: see _not_met
        f" (if no launcher started this one, RANK and WORLD_SIZE={world_size} are left over from another program: "
        f"unset them, and this program starts its own ranks)")
    if world_size % towers:
        raise ValueError(f"{gave} and {net} needs {towers} per replica: use an even --nproc-per-node (and "
                         f"--nnodes){leftover}")
    if config.replicas is not None and config.replicas * towers != world_size:
        raise ValueError(f"--replicas {config.replicas} needs {config.replicas * towers} ranks and {gave}: drop "
                         f"--replicas under torchrun (the ranks decide it){leftover}")
    return world_size // towers


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, handlers=[console_handler()])
    log_warnings()
    run_dir = lock = config = logfile = None
    sigterm = contextlib.ExitStack()
    started = False  # the ranks
    try:
        under_torchrun = _torchrun_env()
        if under_torchrun:  # each rank runs this program: rank 0 tells what it does, the others only what goes wrong
            if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent started this rank (from its main thread):
                die_with_parent(os.getppid())  # it ends with the agent, even one killed by SIGKILL, holding no lock
            check_rendezvous_address()
            setup_logging(int(os.environ["RANK"]), None)
        config, checkpoint, placement = _configure(argv)
        # SIGTERM as Ctrl-C, during the scan of the data too (under torchrun, its agent's SIGTERM, as a batch system
        # stops a job: rank 0 then says how to resume, not nothing; within a collective it is seen once the
        # collective returns, or the agent's SIGKILL ends it)
        sigterm.enter_context(sigterm_as_interrupt())
        if under_torchrun:
            started = True
            held, checkpoint = [checkpoint], None  # let go of by the rank once used (as below)
            return _main_under_torchrun(config, held, placement, sys.argv[1:] if argv is None else list(argv))
        addr = config.master_addr or LOOPBACK
        check_master_addr(addr)
        config, run_dir, bundle, lock = prepare_run(config, checkpoint)
        logfile = _log_also_to(run_dir / "train.log")  # how the run ended, beside rank 0's lines
        # Read with mmap: held, the checkpoint the run's first save replaces would keep its disk space
        # until the run ended, and the third checkpoint's room that needs is not what was checked.
        checkpoint = None
        started = True
        summary = run_ranks(run_rank, (config, str(run_dir), placement, bundle), world_size=placement.ranks,
                            backend=placement.backend,
                            collective_timeout_s=config.timeout, addr=addr)[0]
    except (ValueError, CheckpointError) as exc:  # DataError is a ValueError
        # its text, not the error: a handler that keeps records (a test's) would keep its traceback's
        # frames, and the checkpoint they loaded, for as long
        log.error("error: %s", str(exc))
        return 2
    except RankFailure as exc:
        log.error("the run stopped: %s%s", str(exc), _after_failure(config, run_dir, exc))
        return 1
    except KeyboardInterrupt:
        if not started and run_dir is None:  # in the checks, or the scan of the data
            log.error("interrupted before the ranks started: nothing was trained or written")
        elif not started:  # the run's folder is whole: what it holds decides the advice
            log.error("interrupted before the ranks started: nothing was trained; %s",
                      _after_interrupt(config, run_dir))
        else:
            log.error("interrupted: every rank stopped; %s", _after_interrupt(config, run_dir))
        return 130
    else:
        report(summary)
        return 0
    finally:
        if started and run_dir is not None:  # the ranks have ended: a save one was killed in left its part
            with contextlib.suppress(OSError):
                remove_abandoned_saves(run_dir / FILENAME)
        if lock is not None:
            lock.close()
        sigterm.close()
        if logfile is not None:
            logging.getLogger().removeHandler(logfile)
            logfile.close()


def _log_also_to(path: Path) -> Optional[logging.Handler]:
    """The launcher's lines from now on (how the run ends: its results, or why it stopped and what
    to do next) also in ``path``, the run's train.log, as rank 0 writes its own there. Where it
    cannot be opened, rank 0 says why, as it fails to open it too; None."""
    try:
        logfile = log_file(path)
    except OSError:
        return None
    logging.getLogger().addHandler(logfile)
    return logfile


def _after_interrupt(config: Optional[TrainConfig], run_dir: Optional[Path]) -> str:
    if config is not None and config.eval_only:
        return f"nothing to resume: run the evaluation again {elsewhere_than(run_dir)}" if run_dir is not None \
            else "nothing to resume: run the evaluation again"
    if run_dir is not None and (run_dir / FILENAME).exists():
        return _from_checkpoint(config, run_dir, f"resume with --resume {shell_word(run_dir)}")
    again = f" {elsewhere_than(run_dir, config)}" if run_dir is not None else ""
    if config is not None and config.resume:  # a checkpoint of another name, in a folder without its own yet
        return f"no checkpoint was written since it resumed: start it again{again}"
    return f"no checkpoint was written yet, so there is nothing to resume: start the run again{again}"


def _unless_rank_0_said(folder: Optional[str], after) -> str:
    """What a rank other than 0 of torchrun's says to do next: rank 0 says it, unless it was
    stopped first (killed), which this rank cannot tell; then, where this machine sees rank 0's
    run ``folder``, what rank 0 would have said of it (``after(Path(folder))``)."""
    said = after(Path(folder)) if folder is not None and os.path.isdir(folder) else ""
    return f"rank 0 says what to do next; if it was stopped first: {said}" if said else "rank 0 says what to do next"


def _from_checkpoint(config: TrainConfig, run_dir: Path, resume: str) -> str:
    """What to do with the checkpoint of a run that stopped: ``resume``, the advice to resume
    it, unless it holds the end of the training (its --epochs, or --max-steps: the run stopped
    in its final evaluation, or after it), which a resume would refuse, or train past."""
    try:
        progress = read_as_saved(run_dir / FILENAME)["progress"]
        epoch, step = int(progress["epoch"]), int(progress["global_step"])
    except Exception:  # unreadable: the resume says why
        return resume
    all_epochs, max_steps = epoch >= config.epochs, config.max_steps is not None and step >= config.max_steps
    if not (all_epochs or max_steps):
        return resume
    # the summary of this very step, not of the run before it was resumed to train longer
    if summary_steps(run_dir) == step:
        return f"the run had ended, at step {step}, and written its summary: its results are in {run_dir}"
    longer = (f"train it longer with --resume {shell_word(run_dir)} --epochs N, N > {epoch}" if all_epochs else
              f"train on with --resume {shell_word(run_dir)} and a larger --max-steps, or none")
    return (f"its checkpoint holds the end of its training (step {step}); only the final evaluation is missing: "
            f"evaluate it with --eval-only {shell_word(run_dir)} (or {longer})")


def _after_failure(config: Optional[TrainConfig], run_dir: Optional[Path], failure: RankFailure) -> str:
    """What to do once the cause of a rank's failure is fixed (a rank killed by the
    out-of-memory killer, a hung peer, unusable data): go on from the last checkpoint, or
    start again. A diverged loss's failure, or its outputs', says itself what to do, as does a
    run folder gone."""
    first = failure.failures[failure.first]
    if config is None or run_dir is None or any(f"{error}:" in first
                                                for error in ("NonFiniteLoss", "NonFiniteOutputs", "RunFolderGone")):
        return ""
    advice = ""
    if any(word in str(failure).lower() for word in ("timed out", "timeout")):
        advice = (f"\na rank waits at most --timeout {config.timeout:.15g} s for the other in an exchange: if the "
                  f"other was busy rather than stuck (a checkpoint written to a slow disk, a long evaluation), give "
                  f"a larger --timeout")
    if config.eval_only:
        return f"{advice}\nonce the cause is fixed, run the evaluation again {elsewhere_than(run_dir)}"
    if (run_dir / FILENAME).exists():
        return advice + "\n" + _from_checkpoint(config, run_dir, f"once the cause is fixed, go on from the last "
                                                                 f"checkpoint with --resume {shell_word(run_dir)}")
    return (f"{advice}\nno checkpoint was written yet: once the cause is fixed, start the run again "
            f"{elsewhere_than(run_dir, config)}")


def _lost_a_peer(exc: Exception) -> bool:
    """Whether a rank's error is a collective's that another rank failed, in the words of gloo or
    NCCL (torch.distributed raises them as RuntimeError): its connection closed or reset (the
    other rank gone), or a wait for it that timed out (it hung). Not an error of the rank's own,
    whatever its message quotes (a path such as runs/timeout-300)."""
    if not isinstance(exc, RuntimeError):
        return False
    if isinstance(exc, MissingRank):  # a rank did not come to a meeting (such as a replica's first scan)
        return True
    error = str(exc).lower()
    return any(words in error for words in (*PEER_GONE, "pair closure", "collective operation timeout",
                                            "remote process", "ncclremoteerror"))


def _not_met(rank: int, world_size: int, exc: Exception, config: TrainConfig, placement: Placement) -> None:
    """Says that this rank could not meet the others (``exc``: the store's words or gloo's), and why that happens."""
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    # torchrun's agent sets TORCHELASTIC_RUN_ID; without it, the variables may be another tool's
    leftover = "" if "TORCHELASTIC_RUN_ID" in os.environ else (
        " (if no launcher started this one, RANK and WORLD_SIZE are left over from another program: unset them, "
        "and this program starts its own ranks)")
    backends, here = "", os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun's: the ranks of this machine
    if config.backend == "auto" and here.isdigit() and int(here) < world_size:  # the others' machines may differ
        this, other, whose = ("NCCL", "gloo", "fewer GPUs than ranks") if placement.backend == "nccl" else \
            ("gloo", "NCCL", "a GPU for each rank")
        backends = (f"; and under --backend auto each machine picks its own backend: this one picks {this} "
                    f"({placement.why.split(':')[0]}), whereas a machine with {whose} picks {other}, and ranks "
                    f"of two backends never meet: give every rank --backend gloo, or every machine a GPU for each "
                    f"of its ranks")
    log.error("error: rank %d could not meet the other ranks at %s (%s): a rank that stopped on its own "
              "machine never comes (its output there says why: a check of its options, its files or its network "
              "there); else start all %d ranks within --timeout %g s of each other, each with this MASTER_ADDR "
              "and MASTER_PORT (an address that every machine reaches, a port free on its machine), as torchrun "
              "does%s%s", rank, where, str(exc).strip().splitlines()[0], world_size, config.timeout, leftover,
              backends)


# Settings that each machine resolves against its own working folder (the command lines are compared as given)
MACHINE_PATHS = ("data", "out", "resume", "eval_only")


def _unlike_rank_0(found: list) -> Optional[str]:
    """Why the ranks cannot run together, from each rank's (command line, settings) in rank
    order; None if they can. With one command line, settings differ where a rank read them
    from another file at the same path: the checkpoint at --resume's or --eval-only's."""
    for rank, (command, settings) in enumerate(found):
        if command != found[0][0]:
            return (f"rank {rank} was started with other options than rank 0 ({shlex.join(command) or 'none'}, "
                    f"against {shlex.join(found[0][0]) or 'none'}): start every rank with the same command line, "
                    f"as torchrun does")
        differ = [name for name in {**found[0][1], **settings}
                  if name not in MACHINE_PATHS and settings.get(name) != found[0][1].get(name)]
        if differ:
            def shown(values):
                return " ".join(f"--{name.replace('_', '-')} unset" if values.get(name) is None else
                                _as_option(name, " ".join(map(str, values[name]))
                                           if isinstance(values[name], (list, tuple)) else values[name])
                                for name in differ)
            path = settings.get("resume") or settings.get("eval_only")
            if not path:  # none known: a rank of another version of this program, say
                return (f"rank {rank} set the run up otherwise than rank 0 ({shown(settings)}, against "
                        f"{shown(found[0][1])}): start every rank with the same program, as torchrun does")
            option = "resume" if settings.get("resume") else "eval_only"
            return (f"rank 0 and rank {rank} read other settings from the checkpoint at --{option.replace('_', '-')}'s "
                    f"path on their machines (rank 0 from {shell_word(found[0][1].get(option))}: {shown(found[0][1])}; "
                    f"rank {rank} from {shell_word(path)}: {shown(settings)}): give every machine the same checkpoint "
                    f"at that path, or a path that every machine shares")
    return None


def _main_under_torchrun(config: TrainConfig, held: list, placement, argv: list) -> int:
    """``held``: [the checkpoint loaded, or None], which rank 0 takes out for prepare_run and no
    rank keeps (mmap'd, it would hold the disk space of the checkpoint the run replaces)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world_size == placement.ranks, (world_size, placement)
    reuse_freed_memory()  # as run_ranks has each rank do
    rank_server.room_for_sockets()  # for the DataLoader workers' (the server is torchrun's business)
    if placement.backend == "gloo":  # share the cores among the ranks on this machine, as run_ranks does
        torch.set_num_threads(cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    try:
        init_process_group(placement.backend, rank, world_size, config.timeout)
    except RuntimeError as exc:  # no rendezvous: a peer missing, a port taken, gloo's mesh not made (a restart)
        if not failed_to_meet(exc):
            raise  # another fault (CUDA's, a device's): its own traceback, not this advice
        _not_met(rank, world_size, exc, config, placement)
        return 1
    run_dir = bundle = lock = None
    # Rank 0 tells the other ranks whether the run can start, and if not, why; if so, the
    # recipe it sized to the data, and the run's folder (theirs to name, where rank 0 is stopped first).
    outcome, preparing, met = [None, None, None], False, False
    try:
        # The other ranks wait for it as long as a first scan of ImageNet and its statistics may take on a
        # slow disk, not --timeout: the launcher does this work before it starts any rank.
        try:
            with patient_group(max(PREPARATION_WAIT_S, config.timeout), config.timeout) as group:
                met = True
                # Every rank runs rank 0's recipe: one started with other options (by hand), or that read
                # other settings from its own files, would silently train on rank 0's data, or build other
                # groups than the others and hang.
                found = [None] * world_size
                dist.all_gather_object(found, ([str(a) for a in argv], dataclasses.asdict(config)), group=group)
                unlike = _unlike_rank_0(found)
                if unlike is not None:
                    raise ValueError(unlike)
                if rank == 0:
                    preparing = True
                    try:
                        config, run_dir, bundle, lock = prepare_run(config, held.pop())
                        outcome = [None, config, str(run_dir)]
                    except (ValueError, CheckpointError) as exc:
                        outcome = [str(exc), None, None]
                    preparing = False
                dist.broadcast_object_list(outcome, src=0, group=group)
        except RuntimeError as exc:  # of a collective (gloo's is no DistError): a rank gone, or another run's port
            if isinstance(exc, MissingRank):  # NCCL's group meets lazily: a rank missing is seen here
                _not_met(rank, world_size, exc, config, placement)
                return 1
            if preparing or not met:
                raise  # rank 0's own work, or a fault of this rank's own in making the group: its traceback
            again = f" {elsewhere_than(run_dir, config)}" if run_dir is not None else ""  # rank 0 made its folder
            log.error("the run stopped before it trained: rank %d lost the other ranks while rank 0 prepared the "
                      "run (%s): see the other ranks' output, and start every rank again%s, each on a port of this "
                      "run's own", rank, str(exc).strip().splitlines()[0][:300], again)
            return 1
        if outcome[0] is not None:
            raise ValueError(outcome[0])
        config = outcome[1]
        held.clear()  # the ranks but rank 0 loaded it too, to check their options
        try:
            summary = run_rank(rank, config, str(run_dir) if run_dir else None, placement, bundle)
        except Exception as exc:  # each rank's process ends as run_ranks reports a failed rank: in one line
            failure = RankFailure({rank: error_line(exc)}, rank)
            if _lost_a_peer(exc):  # not this rank's failure, which it cannot tell apart
                after = _after_failure(config, run_dir, failure) if rank == 0 else "\n" + _unless_rank_0_said(
                    outcome[2], lambda folder: _after_failure(config, folder, failure).strip())
                log.error("the run stopped: rank %d lost another rank: %s; the rank that failed or stopped "
                          "responding says why in its own lines (torchrun's report names it)%s", rank,
                          failure.failures[rank], after)
            else:
                log.error("the run stopped: %s%s", failure, _after_failure(config, run_dir, failure))
            return 1
    except KeyboardInterrupt:  # torchrun passes its Ctrl-C on to every rank; rank 0 knows the run folder
        log.error("interrupted: %s", _after_interrupt(config, run_dir) if rank == 0 else _unless_rank_0_said(
            outcome[2], lambda folder: _after_interrupt(config, folder)))
        return 130
    finally:
        if lock is not None:
            lock.close()
    dist.destroy_process_group()
    if rank == 0:
        report(summary)
    return 0


if __name__ == "__main__":
    with quick_exit():
        try:
            code = main()
        finally:
            rank_server.stop()  # not left to finish its imports after a refusal, holding this program's output open
        sys.exit(code)
