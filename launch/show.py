"""python -m launch.show RUN_DIR: pictures of a run of python -m launch.two_gpu.

Writes PNGs into RUN_DIR/show/ (or --out) and prints their paths on stdout, one per
line; what it measures and what it skips goes to stderr.

From checkpoint.pt:
  kernels.png     conv1's 96 kernels as the paper's Figure 3 draws them: tower 0's 48
                  above tower 1's 48, each scaled to its own range
  colour.png      how colour-specific each tower's conv1 kernels are: per kernel, the
                  share of its energy outside its grey part (R = G = B; see
                  colour_share), with each tower's mean and median, also printed.
                  A freshly initialised net gives about 2/3 for both towers.
From metrics.jsonl (and summary.json's last evaluation, if the run stopped mid-epoch):
  curves.png      training loss; training and validation top-1 error, validation
                  top-5 error; learning rate; all against the training step
From summary.json, for --layout towers runs:
  traffic.png     the bytes each exchange moves per training step, forward and
                  backward, sent by each tower
From checkpoint.pt and the run's data (or --data):
  neighbours.png  the paper's Figure 4: validation images, each with the six training
                  images nearest to it in FC7's output (4096-d, after its ReLU or tanh)

A picture whose inputs are not there yet is skipped with a note saying why (and whether
its PNG of an earlier show there is older than the run's files it is drawn from), and
the others are drawn: a run in its first epoch has no checkpoint.pt unless it was started
with --checkpoint-every, and a run that is still going or was stopped has no
summary.json (or an earlier start's, if it was resumed). When nothing at all can be
drawn, RUN_DIR is not a run folder, or a picture cannot be written (a full disk), the
program prints one line naming the fix and exits with status 2; each picture is written
whole or not at all. Records of metrics.jsonl and summary.json that lack what a picture
draws (a damaged line, a hand-edited file) are left out with a note. Ctrl-C or SIGTERM
ends it with one line and status 130: the pictures finished stay, the one being written
goes, and so does a folder made for them left empty.
"""

from launch.cli import hold_interrupts  # torch-free

if __name__ == "__main__":
    hold_interrupts()  # a Ctrl-C during the imports below ends the program in one line

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from towers import TOWERS, AlexNet, shard_state_dict
from towers.reference import LAYERS

from . import data as data_module
from .checkpoint import (FILENAME, CheckpointError, check_classes, checkpoint_architecture, load_checkpoint,
                         reference_from)
from .cli import (JSON_DAMAGE, OutputFailed, Parser, add_options, home_path, lock_folder, make_folder, not_there,
                  one_line, option, pyplot, quick_exit, reader_gone, refuse_empty, remove_made, shell_word, write_out,
                  write_whole)
from .stats import DataStats

log = logging.getLogger(__name__)

PICTURES = ("kernels", "colour", "curves", "traffic", "neighbours")
SHOW_FOLDER = "show"  # under RUN_DIR, unless --out says otherwise
NEIGHBOURS = 6  # training images shown per validation image, as in the paper's Figure 4
DPI = 100
MB = 1e6  # bytes, as in the benchmarks' reports


@dataclass(frozen=True)
class ShowOptions:
    only: tuple = option(PICTURES, "pictures to draw", choices=PICTURES, many=True)
    out: Optional[str] = option(None, "folder for the PNGs (default: RUN_DIR/show)", metavar="DIR")
    data: Optional[str] = option(None, "the data folder for the neighbours picture (default: the run's own, "
                                       "from its config.json; the built-in dataset if it had none)",
                                 metavar="DIR")
    images: int = option(5, "neighbours picture: validation images shown, spread evenly over the classes",
                         metavar="N")
    neighbour_pool: int = option(2000, "neighbours picture: training images searched, spread evenly over the "
                                       "classes (all of them if fewer); about 10 a second on a busy 2-core CPU",
                                 metavar="N")
    batch_size: int = option(64, "neighbours picture: images per forward pass", metavar="N")
    device: str = option("auto", "neighbours picture: 'auto' uses a GPU when there is one, else the CPU",
                         choices=("auto", "cpu", "cuda"))

    def validate(self) -> None:
        refuse_empty(out=self.out, data=self.data)
        for name in ("images", "neighbour_pool", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.images > MAX_IMAGES:
            raise ValueError(f"--images must be at most {MAX_IMAGES} (a row of the picture each, 205 pixels high; a "
                             f"taller PNG is more than image viewers open), got {self.images}: draw fewer")
        unused = [f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(self) if field.name not in
                  ("only", "out") and getattr(self, field.name) != field.default and "neighbours" not in self.only]
        if unused:  # options that would change nothing
            names = " and ".join((", ".join(unused[:-1]), unused[-1])) if len(unused) > 1 else unused[0]
            raise ValueError(f"{names} {'are' if len(unused) > 1 else 'is'} the neighbours picture's, which --only "
                             f"leaves out: add neighbours to --only, or drop {'them' if len(unused) > 1 else names}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU is visible here; use --device cpu or auto")


MAX_IMAGES = 100  # rows of the neighbours picture: 20,500 pixels high


class Skipped(Exception):
    """A picture that cannot be drawn from what the run folder holds, with why."""


# --------------------------------------------------------------------------- the run folder

def unreadable(name: str, exc: OSError) -> str:
    """Why the run's file ``name`` cannot be read, and the fix."""
    if isinstance(exc, PermissionError):
        return (f"{name} cannot be read by this user ({exc.strerror}): draw as a user who can, or let this one read "
                f"the run folder (chmod)")
    return f"{name} cannot be read ({exc.strerror or exc})"


def regular_file(path: Path, missing: str) -> Path:
    """``path``, a regular file; else Skipped saying ``missing`` where it is not there, or why
    it cannot be read (a folder in its place; a FIFO, read, would wait for a writer for good)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise Skipped(missing) from None
    except OSError as exc:  # a folder on the way that cannot be entered, a link that loops
        raise Skipped(unreadable(path.name, exc)) from None
    if not stat.S_ISREG(mode):
        raise Skipped(f"its {path.name} is not a regular file but a pipe, a device, a folder or a socket")
    return path


class RunFolder:
    """The files of one run folder, read when first needed."""

    def __init__(self, path: Path):
        self.path = path
        try:
            config = regular_file(path / "config.json", "it has no config.json")
            self.config = json.loads(config.read_text())
        except Skipped as exc:
            why = str(exc)
        except OSError as exc:
            why = unreadable("config.json", exc)
        except JSON_DAMAGE as exc:
            why = f"its config.json is unreadable ({exc})"
        else:
            why = None if isinstance(self.config, dict) else "its config.json is not a JSON object"
        if why is not None:
            raise ValueError(f"{path} is not a run folder: {why}; give a folder written by "
                             f"python -m launch.two_gpu (--out/--run-name)")
        evaluated = self.config.get("eval_only")
        if isinstance(evaluated, str) and evaluated:  # its folder never holds a checkpoint or a summary
            trained = Path(evaluated)
            trained = trained.parent if trained.name == FILENAME else trained
            how = f" (python -m launch.show {shell_word(trained)})" if (trained / "config.json").is_file() else ""
            raise ValueError(f"{path} holds an evaluation (--eval-only) of {evaluated}, which has nothing to draw: "
                             f"draw the run that trained it{how}")
        self._checkpoint = None

    def checkpoint(self) -> dict:
        """The loaded checkpoint.pt (read into memory: the file may be written over while the
        pictures are drawn), or Skipped saying why not: read once for all the pictures drawn
        from it, as is the reason it cannot be."""
        if self._checkpoint is None:
            try:
                self._checkpoint = self._read_checkpoint()
            except Skipped as why:
                self._checkpoint = why
        if isinstance(self._checkpoint, Skipped):
            raise Skipped(str(self._checkpoint))
        return self._checkpoint

    def _read_checkpoint(self) -> dict:
        regular_file(self.path / FILENAME, f"no {FILENAME} yet: a run writes it at the end of each epoch (and "
                                           f"every --checkpoint-every steps, and when --max-steps stops it)")
        try:
            payload = load_checkpoint(self.path, mmap=False)
        except CheckpointError as exc:
            raise Skipped(str(exc)) from None
        # Its net against the folder's (towers and single are one net, which a resume may switch)
        net = dataclasses.asdict(checkpoint_architecture(payload))
        expected = {"net": "one-tower" if self.config.get("layout") == "one-tower" else "two-tower",
                    **{name: self.config[name] for name in net if name != "net" and name in self.config}}
        differ = [name for name in expected if expected[name] != net[name]]
        if differ and "layout" in self.config:  # copied from another run's folder: drawn as this run's
            name = differ[0]
            raise Skipped(f"{FILENAME} is another run's: its {name} is {net[name]}, config.json's "
                          f"{expected[name]}; put the run's own checkpoint back, or draw the folder it came from")
        payload.pop("momentum_buffer", None)  # as large as the weights, and not drawn
        return payload

    def summary(self) -> dict:
        path = regular_file(self.path / "summary.json", "no summary.json: the run writes it when it ends, so it is "
                                                         "still going or was stopped; draw this again once it has finished")
        try:
            summary = json.loads(path.read_text())
        except PermissionError as exc:
            raise Skipped(unreadable(path.name, exc)) from None
        except (OSError, *JSON_DAMAGE) as exc:
            raise Skipped(f"summary.json is unreadable ({exc}): the run may be writing it; try again") from None
        if not isinstance(summary, dict):
            raise Skipped("summary.json is not a JSON object: it was not written by python -m launch.two_gpu")
        return summary

    def metrics(self) -> "Metrics":
        path = regular_file(self.path / "metrics.jsonl",
                            "no metrics.jsonl yet: the run writes its first line after --log-every steps")
        try:
            metrics = read_metrics(path)
        except OSError as exc:
            raise Skipped(unreadable(path.name, exc)) from None
        if not metrics.train:
            raise Skipped("metrics.jsonl has no training records yet")
        return metrics


@dataclass
class Metrics:
    train: list  # "train" records, one per logged step, in step order
    evals: list  # "eval" records, one per finished epoch, in step order


# The fields the pictures draw of each kind of record: a record without them is unreadable.
ERRORS = ("top1_error", "top5_error")  # of an evaluation, as metrics.jsonl and summary.json's "centre" hold them
FIELDS = {"train": ("loss", "top1", "lr"), "eval": ("epoch", *ERRORS)}  # and a whole-number step


def _number(value) -> bool:
    """A number a picture can draw: JSON's NaN and Infinity too (a loss that ran away), not an
    integer beyond a float's range (only a hand edit writes one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _whole(value) -> bool:
    """A whole number a picture can draw: a step, a count of steps."""
    return isinstance(value, int) and _number(value)


def read_metrics(path: Path) -> Metrics:
    """The training and end-of-epoch records of metrics.jsonl as the run's final history.

    A resumed run drops the records of the steps it redoes (launch.meter.Metrics.resume_at),
    but a file joined from copies of a run, or written before the records were dropped, can
    hold a step more than once: a record at a step no later than one already read starts the resumed
    history there, and the records it replaces (at that step or later) are dropped. So the
    last record of each step is kept, and nothing survives from an attempt that went past
    the checkpoint it was later resumed from. Unreadable lines (the last one of a run that
    is writing it, a damaged one, one that lacks what the curves draw) are left out."""
    train, evals, unreadable, replaced = [], [], 0, []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except JSON_DAMAGE:  # a damaged line
            record = None
        event = record.get("event") if isinstance(record, dict) else None
        if record is None or (event in FIELDS and not (_whole(record.get("step"))
                                                       and all(_number(record.get(k)) for k in FIELDS[event]))):
            unreadable += 1
            continue
        if event == "train":
            if train and record["step"] <= train[-1]["step"]:
                kept = [r for r in train if r["step"] < record["step"]]
                replaced.append((record["step"], len(train) - len(kept)))
                train, evals = kept, [r for r in evals if r["step"] < record["step"]]
            train.append(record)
        elif event == "eval":
            evals = [r for r in evals if r["step"] < record["step"]] + [record]
    if unreadable:
        log.warning("%s: left out %d unreadable line(s)", path, unreadable)
    if replaced:  # as a resume from an earlier checkpoint; else an edit or a join of two runs' files
        more = f"; and {len(replaced) - 3} more such" if len(replaced) > 3 else ""
        log.warning("%s: %s%s: the records after each such step were left out", path, "; ".join(
            f"a record of step {step} follows records of that step or later and starts the history again there "
            f"({count} training record(s) dropped)" for step, count in replaced[:3]), more)
    return Metrics(train, evals)


# --------------------------------------------------------------------------- conv1 and colour

def tower_kernels(conv1_weight: torch.Tensor) -> list:
    """Each tower's conv1 kernels (48 x 3 x 11 x 11 each, tower 0 first), cut out of the
    single-device layout as the towers are."""
    return [shard_state_dict({"conv1.weight": conv1_weight}, rank)["conv1.weight"] for rank in range(TOWERS)]


def colour_share(kernels: torch.Tensor) -> torch.Tensor:
    """How colour-specific each kernel is: the share of its energy outside its grey part.
    K x 3 x H x W (RGB) -> K values in [0, 1].

    Take a kernel w (3 x H x W) with its overall mean removed (a constant offset is grey
    and says nothing about the kernel's pattern). Its grey part g holds, in all three
    channels, the mean of w's R, G and B values at that pixel. The measure is
    ||w - g||^2 / ||w||^2.

    0: a grey kernel (R = G = B at every pixel): it sees brightness whatever the hue,
    colour-agnostic. 1: a pure-colour kernel (R + G + B = 0 at every pixel): blind to
    brightness, colour-specific. "Grey" weighs R, G and B equally because the network
    sees them on one scale (raw 0-255 values minus the mean image), so equal steps in
    the three are a change of brightness alone. A kernel of independent random weights
    has on average 242/362 = 0.67 of its energy outside grey (242 of the 362 directions
    left after the mean is removed), so a freshly initialised net gives about 2/3 for
    both towers. A constant kernel (no energy once its mean is gone) counts as 0.
    """
    w = kernels.detach().to(torch.float64)
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    grey = w.mean(dim=1, keepdim=True)  # K x 1 x H x W, broadcast back over the channels
    energy = w.pow(2).sum(dim=(1, 2, 3))
    colour = (w - grey).pow(2).sum(dim=(1, 2, 3))
    return torch.where(energy > 0, colour / energy.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(energy))


def kernel_grid(kernels: torch.Tensor, columns: int = 16, scale: int = 6, gap: int = 3) -> np.ndarray:
    """K x 3 x h x w kernels as one RGB image (H x W x 3, values in [0, 1]): each kernel
    scaled to its own range (all three channels together, so its hues stay), enlarged
    ``scale`` times by repeating pixels, in rows of ``columns`` with ``gap`` white pixels
    between them."""
    k = kernels.detach().to(torch.float64).cpu().numpy()
    count, _, h, w = k.shape
    low = k.min(axis=(1, 2, 3), keepdims=True)
    span = k.max(axis=(1, 2, 3), keepdims=True) - low
    scaled = np.where(span > 0, (k - low) / np.where(span > 0, span, 1), 0.5)  # a constant kernel: mid-grey
    cell_h, cell_w = h * scale + gap, w * scale + gap
    rows = math.ceil(count / columns)
    grid = np.ones((rows * cell_h - gap, columns * cell_w - gap, 3))
    for i, kernel in enumerate(scaled):
        top, left = (i // columns) * cell_h, (i % columns) * cell_w
        enlarged = kernel.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
        grid[top:top + h * scale, left:left + w * scale] = enlarged
    return grid


def _save(fig, path: Path) -> Path:
    """Writes the figure as a PNG atomically (a temporary file renamed over ``path``). A
    folder that fills up or turns read-only meanwhile raises ValueError naming it."""
    try:
        try:
            write_whole(path, lambda partial: fig.savefig(partial, format="png", dpi=DPI))
        except FileNotFoundError:  # another show of this run, which made the folder, removed it empty
            if path.parent.exists():
                raise
            path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(path, lambda partial: fig.savefig(partial, format="png", dpi=DPI))
    except IsADirectoryError:  # the rename onto a folder of the picture's name
        raise ValueError(f"cannot write {path}: a folder of that name is there; remove or rename it, or give "
                         f"another folder with --out") from None
    except OSError as exc:
        raise ValueError(f"cannot write {path.name} in {path.parent} ({exc.strerror or exc}): free space on that "
                         f"disk, or give a folder you can write with --out") from None
    finally:
        pyplot().close(fig)
    return path


def median(values: torch.Tensor) -> float:
    """The median, halfway between the middle two of an even count (torch.median takes the lower)."""
    return values.double().quantile(0.5).item()


def conv1_groups(payload: dict) -> list:
    """(name, K x 3 x 11 x 11 kernels) per tower of a checkpoint's conv1, tower 0 first; the
    one-tower net of section 3.2 (one device, no towers) is one group of its 48 kernels."""
    weight = payload["model"]["conv1.weight"]
    if checkpoint_architecture(payload).net == "one-tower":
        return [("one-tower net", weight)]
    return [(f"tower {rank}", kernels) for rank, kernels in enumerate(tower_kernels(weight))]


def _group_label(name: str, first: int, shares: torch.Tensor) -> str:
    return (f"{name} (kernels {first}-{first + len(shares) - 1}): colour share mean {shares.mean():.2f}, "
            f"median {median(shares):.2f}")


def draw_kernels(run: RunFolder, out: Path) -> Path:
    groups = conv1_groups(run.checkpoint())
    grids = [kernel_grid(kernels) for _, kernels in groups]
    shares = [colour_share(kernels) for _, kernels in groups]
    # Laid out in pixels so that every enlarged kernel pixel is a whole number of screen pixels.
    grid_h, grid_w = grids[0].shape[:2]  # every group holds 48 kernels
    margin, title_h, label_h, between = 20, 56, 28, 18
    rows = len(groups)
    width, height = grid_w + 2 * margin, title_h + rows * (label_h + grid_h) + (rows - 1) * between + margin
    fig = pyplot().figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    split = ("which tower turns colour-specific is chance" if rows > 1 else
             "section 3.2's one-GPU net: half the paper's kernels, on one device")
    fig.suptitle(f"conv1's {sum(len(k) for _, k in groups)} kernels (11 x 11 x 3), each scaled to its own range, as "
                 f"in the paper's Figure 3\n{split}; colour share: see colour.png",
                 y=1 - 6 / height, va="top", fontsize=11)
    top, first = title_h, 0
    for (name, _), grid, values in zip(groups, grids, shares):
        top += label_h
        ax = fig.add_axes((margin / width, 1 - (top + grid_h) / height, grid_w / width, grid_h / height))
        ax.imshow(grid, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(_group_label(name, first, values), loc="left", fontsize=10, pad=6)
        top, first = top + grid_h + between, first + len(values)
    return _save(fig, out / "kernels.png")


def draw_colour(run: RunFolder, out: Path) -> Path:
    groups = conv1_groups(run.checkpoint())
    names, shares = [name for name, _ in groups], [colour_share(kernels) for _, kernels in groups]
    for name, values in zip(names, shares):
        log.info("conv1 colour share, %s: mean %.3f, median %.3f (%d kernels)", name, values.mean(),
                 median(values), len(values))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8 if len(groups) > 1 else 2.6))
    jitter = np.random.default_rng(0).uniform(-0.18, 0.18, size=max(len(s) for s in shares))
    for row, (name, values) in enumerate(zip(names, shares)):
        y = len(groups) - 1 - row  # tower 0 on top, as in the kernels picture
        ax.scatter(values.numpy(), y + jitter[:len(values)], s=22, color=f"C{row}", alpha=0.75, edgecolor="none",
                   label=f"{name}: one dot per kernel")
        ax.vlines(median(values), y - 0.32, y + 0.32, color="black", linewidth=1.2, linestyle="--",
                  label="median" if row == 0 else None)
        ax.scatter([values.mean().item()], [y + 0.4], marker="v", s=70, color="black", zorder=3,
                   label="mean" if row == 0 else None)
    ax.axvline(2 / 3, color="grey", linestyle=":", linewidth=1.2, label="random kernels: about 2/3")
    ax.set_yticks(range(len(groups)), [f"{name}\nmean {values.mean():.2f}\nmedian {median(values):.2f}"
                                       for name, values in reversed(list(zip(names, shares)))])
    ax.set_ylim(-0.6, len(groups) - 0.3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("colour share: ||w - grey(w)||² / ||w||²  (0: grey, colour-agnostic; 1: pure colour)")
    ax.set_title("How colour-specific are each tower's conv1 kernels?" if len(groups) > 1 else
                 "How colour-specific are the one-tower net's conv1 kernels?")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, out / "colour.png")


# --------------------------------------------------------------------------- curves and traffic

def _final_evaluation(run: RunFolder, evals: list, last_step: Optional[int]) -> Optional[dict]:
    """summary.json's last centre-patch evaluation when it is not an end-of-epoch one
    (a run stopped by --max-steps evaluates where it stopped), with its legend: where the
    run stopped, or, before ``last_step`` (the last step trained), where an earlier start of
    it ended (a resumed run writes its own summary.json only when it ends)."""
    try:
        summary = run.summary()
    except Skipped:
        return None
    centre, steps = summary.get("centre"), summary.get("steps")
    if not centre or steps is None:
        return None
    if not (_whole(steps) and isinstance(centre, dict) and all(_number(centre.get(k)) for k in ERRORS)):
        log.warning("%s: left out its last evaluation: it needs a whole number of steps and a \"centre\" with "
                    "%s as numbers, as python -m launch.two_gpu writes it", run.path / "summary.json",
                    " and ".join(ERRORS))
        return None
    if any(r["step"] == steps for r in evals):
        return None
    where = "where the run stopped" if last_step is None or steps >= last_step else \
        "where an earlier start of the run ended"
    return {"step": steps, **centre, "where": where}


def _label_point(ax, x: float, percent: float) -> None:
    ax.annotate(f"{percent:.1f}%", (x, percent), textcoords="offset points", xytext=(5, 5), fontsize=8)


def shown(name: str) -> str:
    """A file or folder name as a picture can show it: bytes that are not UTF-8 (which the
    name holds as surrogates, and matplotlib refuses) as \\x escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def draw_curves(run: RunFolder, out: Path) -> Path:
    metrics = run.metrics()
    steps = [r["step"] for r in metrics.train]
    final = _final_evaluation(run, metrics.evals, max(steps, default=None))
    plt = pyplot()
    fig, (loss_ax, error_ax, lr_ax) = plt.subplots(3, 1, figsize=(9, 9.5), sharex=True,
                                                   gridspec_kw={"height_ratios": (3, 3, 2)})
    fig.suptitle(f"Training of {shown(run.path.resolve().name)}: batch {run.config.get('batch_size')}, "
                 f"layout {run.config.get('layout', 'towers')}", fontsize=12)

    dots = "." if len(steps) < 60 else None  # a few records: each seen (one, or one between NaNs, draws no line)
    loss_ax.plot(steps, [r["loss"] for r in metrics.train], color="C0", marker=dots)
    loss_ax.set_ylabel("training loss\n(cross-entropy)")
    loss_ax.set_title("Training loss (mean over the recent steps, as the step line shows it)", fontsize=10)

    error_ax.plot(steps, [100 * (1 - r["top1"]) for r in metrics.train], color="C0", alpha=0.8, marker=dots,
                  label="training top-1 (recent steps; dropout and augmentation on)")
    if metrics.evals:
        eval_steps = [r["step"] for r in metrics.evals]
        error_ax.plot(eval_steps, [100 * r["top1_error"] for r in metrics.evals], color="C3", marker="o",
                      label="validation top-1 (centre patch, end of each epoch)")
        error_ax.plot(eval_steps, [100 * r["top5_error"] for r in metrics.evals], color="C1", marker="s",
                      label="validation top-5")
        epochs = error_ax.secondary_xaxis("top")
        epochs.set_xticks(eval_steps, [f"epoch {r['epoch']}" for r in metrics.evals], fontsize=8)
        for r in metrics.evals:
            _label_point(error_ax, r["step"], 100 * r["top1_error"])
    if final is not None:
        for key, colour, name in (("top1_error", "C3", "top-1"), ("top5_error", "C1", "top-5")):
            error_ax.scatter([final["step"]], [100 * final[key]], facecolor="none", edgecolor=colour, s=60,
                             linewidth=1.5, zorder=3, label=f"validation {name} {final['where']} (summary.json)")
            _label_point(error_ax, final["step"], 100 * final[key])
    error_ax.set_ylim(0, 100)
    error_ax.set_ylabel("error (%)")
    error_ax.set_title("Top-1 and top-5 error (100% minus accuracy)", fontsize=10)
    error_ax.legend(fontsize=8, loc="lower left")

    lr_ax.plot(steps, [r["lr"] for r in metrics.train], color="C2", marker=dots)
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("training step")
    lr_ax.set_title("Learning rate (at the logged steps)", fontsize=10)
    for ax in (loss_ax, error_ax, lr_ax):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / "curves.png")


def traffic_title(per_step: dict, summary: dict, config: dict) -> str:
    """What the traffic picture shows: with replicas, the towers of one replica, on its share
    of the batch (each replica's towers send as much to each other)."""
    total = sum(sum(v) for v in per_step.values()) / MB
    batch, replicas = config.get("batch_size"), summary.get("replicas")
    whose = "the towers send each other" if not isinstance(replicas, int) or replicas < 2 else \
        f"the two towers of one of the {replicas} replicas send each other (on its {batch} / {replicas} images)"
    return (f"What {whose} per step: {total:.1f} MB in all\nbatch {batch}, FC8 placement "
            f"{summary.get('fc8_placement', '?')}; left bar forward, right bar (hatched) backward")


def draw_traffic(run: RunFolder, out: Path) -> Path:
    no_towers = lambda layout: Skipped(f"a --layout {layout} run has no towers, so nothing crosses between them")
    try:
        summary = run.summary()
    except Skipped:
        if run.config.get("layout") in ("single", "one-tower"):
            raise no_towers(run.config["layout"]) from None
        raise
    # The start that wrote summary.json: config.json already says the layout of a resume that changed it
    layout = summary.get("layout", run.config.get("layout"))
    if layout in ("single", "one-tower"):
        raise no_towers(layout)
    per_step = summary.get("exchanges_per_step")
    if not per_step:
        raise Skipped("summary.json has no exchanges_per_step (written by newer versions of launch.two_gpu)")
    if not (isinstance(per_step, dict) and all(isinstance(sent, list) and len(sent) == TOWERS
                                               and all(_number(b) for b in sent) for sent in per_step.values())):
        raise Skipped(f"summary.json's exchanges_per_step is not as python -m launch.two_gpu writes it (per "
                      f"exchange, the bytes each of the {TOWERS} towers sends)")
    # Keys are "name/direction"; sorted by name they come in the order of the network.
    names = sorted({key.split("/")[0] for key in per_step})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.38
    for offset, direction, hatch in ((-width / 2, "forward", None), (width / 2, "backward", "//")):
        bottom = np.zeros(len(names))
        for rank in range(TOWERS):
            sent = np.array([per_step.get(f"{name}/{direction}", [0.0] * TOWERS)[rank] for name in names],
                            dtype=float) / MB
            ax.bar(np.arange(len(names)) + offset, sent, width, bottom=bottom, color=f"C{rank}", hatch=hatch,
                   edgecolor="white", label=f"{direction}, sent by tower {rank}")
            bottom += sent
        for x, total in zip(np.arange(len(names)) + offset, bottom):
            shown = "none" if not total else f"{total:.2f}" if total >= 0.01 else f"{total * MB / 1e3:.1f} kB"
            ax.annotate(shown, (x, total), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("exchange (the input of the named layer, or the logits for the loss)")
    ax.set_ylabel("MB per training step (10⁶ bytes)")
    ax.set_title(traffic_title(per_step, summary, run.config), fontsize=10)
    ax.margins(y=0.12)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "traffic.png")


# --------------------------------------------------------------------------- neighbours (Figure 4)

HIDDEN_LAYERS = LAYERS[:-1]  # each followed by the activation (ReLU, or tanh); FC7 is the last hidden layer


def activation_name(model: AlexNet) -> str:
    """"ReLU" or "tanh": the nonlinearity after each hidden layer of ``model``."""
    return "ReLU" if model.activation is F.relu else model.activation.__name__


class HiddenOutputs(NamedTuple):
    fc7: torch.Tensor  # N x 4096: FC7's output after its activation
    silent: list  # per image, the first hidden layer whose output is all zero after its ReLU, or None


def hidden_outputs(model: AlexNet, images: torch.Tensor) -> HiddenOutputs:
    """FC7's output after its activation for network inputs ``images`` (N x 3 x 224 x 224,
    the mean subtracted), in eval mode, and for each image the first layer that is silent
    (every ReLU off; never under tanh, which is off nowhere). Images silent at one layer
    get one and the same output from every later layer (its biases alone), so they all lie
    at distance 0 from each other in FC7. Read by forward hooks, so the model runs its own
    forward unchanged."""
    assert not model.training, "FC7 features are taken in eval mode (dropout off)"
    fc7, all_off = [], {}
    relu = model.activation is F.relu

    def watch(name):
        def hook(module, inputs, output):
            all_off[name] = ((output <= 0).flatten(1).all(dim=1) & relu).tolist()
            if name == "fc7":
                fc7.append(model.activation(output))
        return hook

    handles = [getattr(model, name).register_forward_hook(watch(name)) for name in HIDDEN_LAYERS]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    silent = [next((name for name in HIDDEN_LAYERS if all_off[name][i]), None) for i in range(len(images))]
    return HiddenOutputs(fc7[0], silent)


@dataclass
class Images:
    indices: list  # positions in the split of the images that could be used
    crops: torch.Tensor  # N x 3 x 224 x 224 uint8, the centre patches as the network sees them (before the mean)
    features: torch.Tensor  # N x 4096 float32, on the CPU
    silent: list  # per image, the first layer whose output is all zero (see hidden_outputs), or None


def split_features(model: AlexNet, split: data_module.ImageFolderSplit, indices: list, stats: DataStats,
                   batch_size: int, device: torch.device, keep_crops: bool) -> Images:
    """FC7 features of the centre patches of ``split``'s images at ``indices``, batch by
    batch, the network's input made by ``eval_views`` with ``stats.mean``; unusable
    images are left out (and counted in ``split.corrupt``)."""
    kept, crops, features, silent = [], [], [], []
    for first in range(0, len(indices), batch_size):
        batch, positions = [], []
        for index in indices[first:first + batch_size]:
            image, _, skipped = split.load(index, substitute=False)
            split.record_skipped(skipped, data_module.LEFT_OUT)
            if image is not None:
                batch.append(data_module.center_crop(image))
                positions.append(index)
        if not batch:
            continue
        uint8 = torch.stack(batch)
        inputs = data_module.eval_views(uint8.to(device), stats, ten_crop=False)
        outputs = hidden_outputs(model, inputs)
        features.append(outputs.fc7.float().cpu())
        silent += outputs.silent
        kept += positions
        if keep_crops:
            crops.append(uint8)
    if not kept:
        raise Skipped(f"none of the {len(indices)} {split.split}/ images chosen could be decoded")
    return Images(kept, torch.cat(crops) if keep_crops else torch.empty(0), torch.cat(features), silent)


def describe_silent(silent: list) -> str:
    """"conv5's output is all zero for 12" (per layer, in network order) for the images'
    first silent layers (see hidden_outputs); "" if none."""
    counts = {name: silent.count(name) for name in HIDDEN_LAYERS if name in silent}
    return ", ".join(f"{name}'s output is all zero for {count}" for name, count in counts.items())


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int):
    """(distances, indices), each Q x k: the k rows of ``pool`` nearest to each row of
    ``queries`` in Euclidean distance, nearest first. Computed from the differences, not
    from the expansion |a|^2 - 2ab + |b|^2, so that identical vectors are at exactly 0."""
    distances = torch.cdist(queries.double(), pool.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return torch.topk(distances, min(k, pool.shape[0]), dim=1, largest=False)


@dataclass
class Neighbours:
    queries: Images  # validation images
    pool: Images  # training images searched
    distances: torch.Tensor  # Q x k, nearest first
    indices: torch.Tensor  # Q x k, rows of ``pool``
    train_images: int  # in the training set
    activation: str  # after FC7, where the features are read: activation_name


def find_neighbours(model: AlexNet, bundle: data_module.DataBundle, mean: torch.Tensor, images: int, pool: int,
                    batch_size: int, device: torch.device) -> Neighbours:
    """For ``images`` validation images spread evenly over the classes, the NEIGHBOURS
    training images (of ``pool`` searched, spread evenly) nearest in FC7's output;
    ``mean`` (3 x 256 x 256) is the mean image the network was trained with."""
    model = model.to(device).eval()
    stats = dataclasses.replace(bundle.stats, mean=mean)
    query_indices = data_module.eval_indices(len(bundle.val), images)
    pool_indices = data_module.eval_indices(len(bundle.train), pool)  # spread over the class-sorted list
    log.info("Figure 4: FC7 features of %d validation and %d training images on %s", len(query_indices),
             len(pool_indices), device)
    started = time.perf_counter()
    queries = split_features(model, bundle.val, query_indices, stats, batch_size, device, keep_crops=True)
    searched = split_features(model, bundle.train, pool_indices, stats, batch_size, device, keep_crops=False)
    log.info("Figure 4: features in %.0f s", time.perf_counter() - started)
    broken = sum(int((~torch.isfinite(images.features).all(dim=1)).sum()) for images in (queries, searched))
    if broken:  # weights that ran away: their distances are NaN, and the order of the neighbours means nothing
        raise Skipped(f"FC7's outputs for {broken} of the {len(queries.indices) + len(searched.indices)} images are "
                      f"not finite numbers (NaN or infinite): the checkpoint's weights ran away; draw a run that did "
                      f"not diverge")
    for images, what in ((queries, "validation images shown"), (searched, "training images searched")):
        silent = describe_silent(images.silent)
        if silent:
            log.warning("Figure 4: %s (of the %d %s; every ReLU off): all images silent at one layer get one "
                        "FC7 output, so they tie at distance 0", silent, len(images.silent), what)
    distances, indices = nearest(queries.features, searched.features, NEIGHBOURS)
    return Neighbours(queries, searched, distances, indices, len(bundle.train), activation_name(model))


def _open_neighbour_data(run: RunFolder, options: ShowOptions, payload: dict):
    """(data bundle, mean image) for the neighbours picture. A data folder given with
    --data that cannot be used is the user's error (ValueError); the run's own folder
    gone or changed skips the picture."""
    data_dir = options.data if options.data is not None else run.config.get("data")
    if not isinstance(data_dir, (str, type(None))) or data_dir == "":  # "" would be the current folder
        raise Skipped("config.json's \"data\" is not a folder name; give the data the run was trained on with "
                      "--data DIR")
    mean = payload.get("data_mean")
    # The checkpoint's mean image is the one used: the data's statistics are not computed (a
    # pass over 2,000 images, cached in the data folder) for a folder that may be refused.
    known = None if mean is None else DataStats.of_mean(mean)
    try:
        bundle = data_module.open_data(data_dir, stats=known, builtin_alternative=False)  # none: the run's own
        check_classes(payload, run.path / FILENAME, bundle.classes)
    except (ValueError, CheckpointError) as exc:  # DataError, and a path such as ~user of no user
        if options.data is not None:
            raise ValueError(f"--data: {exc}") from None
        raise Skipped(f"the run's data cannot be used ({exc}); give the data it was trained on with --data DIR") from None
    return bundle, bundle.stats.mean  # a checkpoint written before it held the mean image: the data's


def _silent_note(layer: Optional[str]) -> str:
    return f", {layer} silent" if layer else ""


def choose_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def draw_neighbours(run: RunFolder, out: Path, options: ShowOptions) -> Path:
    payload = run.checkpoint()
    bundle, mean = _open_neighbour_data(run, options, payload)
    saved = payload.get("train_digest")  # of the images the run trained on (by name, class and size)
    others = saved is not None and saved != bundle.digests.get("train")
    if others:
        log.warning("Figure 4: %s holds other images than the run trained on (by name, class or size): the "
                    "neighbours are searched among them", bundle.root / "train")
    model = reference_from(payload)
    found = find_neighbours(model, bundle, mean, options.images, options.neighbour_pool, options.batch_size,
                            choose_device(options.device))
    classes = [shown(name) for name in bundle.classes]
    rows, columns = len(found.queries.indices), 1 + found.indices.shape[1]
    plt = pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(1.75 * columns, 2.05 * rows + 0.8), squeeze=False)
    for row, query in enumerate(found.queries.indices):
        query_label = bundle.val.samples[query][1]
        cells = [(found.queries.crops[row], f"validation\n{classes[query_label]}"
                  + _silent_note(found.queries.silent[row]), "black")]
        for distance, pool_row in zip(found.distances[row].tolist(), found.indices[row].tolist()):
            index = found.pool.indices[pool_row]
            label = bundle.train.samples[index][1]
            colour = "darkgreen" if label == query_label else "firebrick"
            image = bundle.train.load(index, substitute=False)[0]  # decoded again: only the few shown
            cells.append((data_module.center_crop(image), f"{classes[label]}\ndistance {distance:.3g}"
                          + _silent_note(found.pool.silent[pool_row]), colour))
        for ax, (crop, title, colour) in zip(axes[row], cells):
            ax.imshow(crop.permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=8, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
        for spine in axes[row][0].spines.values():
            spine.set_linewidth(2.5)
    searched = len(found.pool.indices)
    title = (f"Validation images (left) and the {columns - 1} training images nearest to each in FC7's output "
             f"(4096-d, after {found.activation}; Euclidean), as in the paper's Figure 4\nsearched {searched} of the "
             f"{found.train_images} training images (--neighbour-pool); centre 224 patches; label green when the "
             f"class is the validation image's")
    if others:
        title += f"\nthe training images of {one_line(str(bundle.root))}, not those the run trained on"
    silent = describe_silent(found.pool.silent)
    if silent:
        title += (f"\n{silent} (of the training images searched; every ReLU off): those get one FC7 output and "
                  f"tie at distance 0 (marked 'silent'), so their order means nothing")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "neighbours.png")


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m launch.show", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding config.json, metrics.jsonl, "
                                                           "checkpoint.pt, summary.json)")
    add_options(parser, ShowOptions)
    return parser


def _open_run(run_dir: str) -> RunFolder:
    refuse_empty(RUN_DIR=run_dir)
    path = home_path(run_dir)
    what = not_there(path)  # or a link that loops, or on the way a folder that cannot be searched
    if what is not None:
        raise ValueError(f"RUN_DIR {path} {what}: give a run folder written by python -m launch.two_gpu")
    if not path.is_dir():
        raise ValueError(f"RUN_DIR {path} is a file: give the run folder that holds it ({path.parent})")
    return RunFolder(path)


def _output_folder(run: RunFolder, out: Optional[str]) -> tuple:
    """(the folder for the PNGs, the folders made here for it, parents first), made before
    anything is drawn so that a folder that cannot be written fails at once."""
    folder = home_path(out) if out is not None else run.path / SHOW_FOLDER
    made = []
    try:
        make_folder(folder, made)
        if not os.access(folder, os.W_OK):
            code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code))
    except OSError as exc:
        remove_made(made)
        raise ValueError(f"cannot write the pictures to {folder} ({exc.strerror}): give a folder you can write "
                         f"with --out") from None
    return folder, made


# The run's files each picture is drawn from: a picture older than one of them no longer shows the run.
DRAWN_FROM = {"kernels": (FILENAME,), "colour": (FILENAME,), "neighbours": (FILENAME, "config.json"),
              "curves": ("metrics.jsonl", "summary.json"), "traffic": ("summary.json", "config.json")}


def _stale_note(run: RunFolder, out: Path, name: str) -> str:
    """What the note of a picture that cannot be drawn now adds where its PNG of an earlier
    show is older than a file of the run it is drawn from, and so would pass for a picture
    of the run as it is: "" where there is none, or none of them is newer. It is kept: it
    may be all there is of what it shows (the data gone, a checkpoint deleted)."""
    picture = out / f"{name}.png"
    try:
        drawn = picture.stat().st_mtime
    except OSError:
        return ""
    for source in DRAWN_FROM[name]:
        try:
            if (run.path / source).stat().st_mtime > drawn:
                return f"; the {picture.name} there is older than {source}: it does not show the run as it is now"
        except OSError:
            continue
    return ""


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = vars(build_parser().parse_args(argv))
    run_dir = args.pop("run_dir")
    options = ShowOptions(**args)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops it as Ctrl-C does
    try:
        return _show(run_dir, options)
    except KeyboardInterrupt:  # what was being written is removed by write_whole and _show
        log.error("interrupted: the pictures written so far are kept, each one whole")
        return 130
    except OutputFailed as exc:  # the pictures are written: only their list is lost
        log.error("error: %s", exc)
        return 2
    except BrokenPipeError:
        return reader_gone()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _show(run_dir: str, options: ShowOptions) -> int:
    drawers = {"kernels": draw_kernels, "colour": draw_colour, "curves": draw_curves, "traffic": draw_traffic,
               "neighbours": lambda run, out: draw_neighbours(run, out, options)}
    # The neighbours first: a --data that cannot be used is an error, and it comes before
    # anything is written. The paths are printed in the order of PICTURES.
    order = ["neighbours"] + [name for name in PICTURES if name != "neighbours"]
    try:
        options.validate()
        run = _open_run(run_dir)
        pyplot()  # where matplotlib cannot start, before the neighbours' minutes of forward passes
        out, made = _output_folder(run, options.out)
        written, skipped, held = {}, [], None
        try:
            try:  # the pictures' folder, while they are drawn: two shows into one mixed two runs' pictures
                held = lock_folder(out)[0]
            except BlockingIOError:
                raise ValueError(f"{out} is in use by another program writing there (a launch.show, or a benchmark): "
                                 f"wait for it to end, or give another --out") from None
            except OSError:  # a folder that may be written, not read: drawn into as before, unlocked
                pass
            for name in (name for name in order if name in options.only):
                try:
                    written[name] = drawers[name](run, out)
                except Skipped as why:
                    skipped.append(f"{name}: {why}{_stale_note(run, out, name)}")
        finally:
            remove_made(made)  # when nothing was written into them (before another show may take it)
            if held is not None:
                os.close(held)
        if not written:
            raise ValueError(f"nothing to draw in {run.path} ({'; '.join(skipped)})")  # each says why
    except ValueError as exc:
        log.error("error: %s", exc)
        return 2
    for note in skipped:
        log.warning("skipped %s", note)
    sys.stdout.flush()
    # a path with a newline in it quoted, as the shell reads it back: one per line
    write_out(b"".join(os.fsencode(one_line(str(written[name]))) + b"\n" for name in PICTURES if name in written))
    return 0


if __name__ == "__main__":
    with quick_exit():
        sys.exit(main())
