"""Ablations: the paper's experiments of sections 3.1-3.4, each trained by the training program.

    python -m benchmarks.ablations                  # the built-in dataset and its recipe, every variant
    python -m benchmarks.ablations --epochs 1       # a shorter budget
    python -m benchmarks.ablations --help           # every option

Trains the paper's net ("full") and each variant (no LRN, non-overlapping pooling,
tanh for ReLU, the one-tower net of section 3.2) with ``python -m launch.two_gpu``,
one run after the other, with the same data, seed, recipe and budget; then reads
each run's metrics.jsonl and summary.json and writes report.md, results.json and
ablations.png into the report folder. The run folders (checkpoints of about 450 MB
each: the weights and their momentum) go to --runs, by default the repository's
git-ignored runs/ablations-<date>/.

The variants of the two-tower net run as the single-device reference (``--layout
single``) unless --layout towers is given: it computes the same function as the
towers (tests/test_parity.py checks it for every variant) at a lower cost on a CPU.
The one-tower net always runs in one process (``--layout one-tower``).
"""

from launch.cli import hold_interrupts  # torch-free

if __name__ == "__main__":
    hold_interrupts()  # a Ctrl-C during the imports below ends the program in one line

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from launch import builtin
from launch import data as data_module
from launch.checkpoint import FILENAME, read_as_saved
from launch.cli import (JSON_DAMAGE, Parser, add_options, home_path, make_folder, option, pyplot, quick_exit, real_path,
                        remove_made, shell_word, signal_name, temporary_folder, write_whole)
from launch.config import TrainConfig, check_workers, parse_config, resolve
from launch.meter import StepMeter
from launch.ranks import raise_interrupt
from launch.train import build_model

from .program import run_child
from .report import REPORT_TEXT, usable_cores_note
from .run import REPORTS_DIR, BenchConfig, held, machine_info, plan_devices, refuse_others_files

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# Training errors whose first step is reported: 25 % is Figure 1's (steps until the training
# error first reaches it); 50 % is a level that a short CPU budget reaches, so that a ratio
# can be measured where 25 % is out of reach.
TRAIN_ERROR_TARGETS = (0.25, 0.5)
# variant -> options of launch.two_gpu that make it (the two-tower variants also get --layout)
VARIANTS = {
    "full": [],
    "no-lrn": ["--no-lrn"],
    "non-overlapping": ["--pooling", "non-overlapping"],
    "tanh": ["--activation", "tanh"],
    "one-tower": ["--layout", "one-tower"],
}
# What the paper credits each change with: the variant's validation error minus the full
# net's, in points of top-1 / top-5 error (ILSVRC-2012, one CNN), and where it says so.
PAPER_EFFECTS = {
    "no-lrn": (1.4, 1.2, "section 3.3: response normalisation lowers top-1/top-5 error by 1.4/1.2 points"),
    "non-overlapping": (0.4, 0.3, "section 3.4: overlapping pooling lowers top-1/top-5 error by 0.4/0.3 points"),
    "one-tower": (1.7, 1.2, "section 3.2: the two-tower net beats the one-GPU net with half the kernels by "
                            "1.7/1.2 points"),
}
PAPER_TANH_SLOWDOWN = 6  # section 3.1, Figure 1: ReLUs reach 25 % training error six times faster than tanh
CHART = "ablations.png"
REPORT_FILES = ("results.json", "report.md", CHART)  # what an ablation writes in its --out
CONDITIONS_SUFFIX = ".conditions.json"  # <runs>/<variant>.conditions.json: how the run went (time, load)


@dataclass(frozen=True)
class AblationConfig:
    variants: tuple = option(tuple(VARIANTS), "variants to train (full: the paper's net, the baseline of the others)",
                             choices=tuple(VARIANTS), many=True)
    data: Optional[str] = option(None, "ImageNet-layout folder [the built-in dataset]")
    epochs: Optional[int] = option(None, "epochs of every run [the dataset's recipe]", type=int)
    max_steps: Optional[int] = option(None, "stop every run after this many steps [none]", type=int)
    batch_size: Optional[int] = option(None, "images per step [the dataset's recipe]", type=int)
    lr: Optional[float] = option(None, "initial learning rate [the dataset's recipe]", type=float)
    seed: int = option(0, "seed of every run: initial weights, data order, augmentation, dropout", type=int)
    layout: str = option("single", "how the two-tower variants run: 'single' (the reference in one process, the "
                                   "same function as the towers) or 'towers' (two processes)",
                         choices=("single", "towers"))
    ten_crop: bool = option(False, "also evaluate every run with the ten-patch test", action="store_true")
    workers: Optional[int] = option(None, "data-loading processes of every run [launch.two_gpu's default]", type=int)
    out: Optional[str] = option(None, "report folder [benchmarks/reports/ablations-<host>-<YYYY-MM-DD>]")
    runs: Optional[str] = option(None, "folder of the run folders, one per variant [runs/ablations-<YYYY-MM-DD>]")
    reuse: bool = option(False, "a variant whose run folder already holds a finished run is read, not trained "
                                "again (it must have been trained with these options)", action="store_true")


class AblationError(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) while a variant's run trained; its message says how to finish that run."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m benchmarks.ablations",
                    description="Train the paper's net and its ablations (sections 3.1-3.4) with "
                                "the same seed and budget, and write a report.")
    add_options(parser, AblationConfig)
    return parser


def shared_options(config: AblationConfig, runs: Path) -> list:
    """The options of launch.two_gpu that every variant's run gets."""
    options = ["--out", str(runs), "--seed", str(config.seed), "--log-every", "1"]
    for name in ("data", "epochs", "max_steps", "batch_size", "lr", "workers"):
        value = getattr(config, name)
        if value is not None:
            options += ["--" + name.replace("_", "-"), str(value)]
    return options + ["--ten-crop" if config.ten_crop else "--no-ten-crop"]


def run_options(config: AblationConfig, variant: str, runs: Path) -> list:
    """The options of launch.two_gpu for one variant's run."""
    layout = [] if "--layout" in VARIANTS[variant] else ["--layout", config.layout]
    return shared_options(config, runs) + ["--run-name", variant] + layout + VARIANTS[variant]


def train(config: AblationConfig, variant: str, runs: Path, bundle) -> tuple:
    """Runs the training program for ``variant`` (or, with --reuse, takes its finished run, whose
    recipe, data and steps are checked against those that ``bundle``, the data opened now, and the
    options give). Returns (run folder, None) or, when the run stopped on its own (a loss that ran
    away is a result too), (run folder, why); options the program refuses raise AblationError."""
    run_dir = runs / variant
    options = run_options(config, variant, runs)
    stderr_path = runs / f"{variant}.stderr"
    if run_dir.exists() and not config.reuse:
        raise AblationError(f"{run_dir} already holds a run: add --reuse to read the runs already in --runs "
                            f"{runs} (trained with these options), or give another --runs folder")
    if config.reuse and (run_dir / "summary.json").exists():
        check_reusable(run_dir, options, len(bundle.train))
        check_same_data(run_dir, bundle, stderr_path)
        check_steps(run_dir, options, bundle)
        logger.info("%s: reusing the finished run in %s", variant, run_dir)
        return run_dir, None
    if config.reuse and run_dir.exists():  # a run that stopped on its own is a result too, as when it was trained
        check_reusable(run_dir, options, len(bundle.train))
        why = _stopped(stderr_path)
        if why is None:
            raise AblationError(f"{run_dir} holds a run that neither finished nor stopped on its own (interrupted?): "
                                f"{finish_advice(config.max_steps, run_dir)}")
        check_same_data(run_dir, bundle, stderr_path)
        logger.info("%s: reusing the run in %s, which stopped: %s", variant, run_dir, why)
        return run_dir, why
    command = [sys.executable, "-m", "launch.two_gpu", *options]
    logger.info("%s: %s", variant, shlex.join(["python", *command[1:]]))
    runs.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    try:
        with open(stderr_path, "w") as stderr:
            returncode = run_child(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr).returncode
    except KeyboardInterrupt:  # the run was stopped (run_child): say how to finish this one
        raise Interrupted(f"the {variant} run was stopped: {finish_advice(config.max_steps, run_dir)}") from None
    how = "interrupted" if returncode == 130 else \
        f"killed by {signal_name(-returncode)}" if returncode < 0 else f"exit {returncode}"
    if returncode == 130 or -returncode in STOPPED_BY:  # from outside (SIGTERM, the kernel's SIGKILL): as Ctrl-C here
        raise Interrupted(f"the {variant} run was stopped ({how}; its output: {stderr_path}): "
                          f"{finish_advice(config.max_steps, run_dir)}")
    # beside the run folder, for a report made later from the same runs (--reuse)
    conditions = {"command": shlex.join(["python", *command[1:]]), "wall_s": time.perf_counter() - started,
                  "load_average": {"start": load_at_start, "end": os.getloadavg()}}
    try:
        write_whole(runs / f"{variant}{CONDITIONS_SUFFIX}",
                    lambda partial: partial.write_text(json.dumps(conditions, indent=1) + "\n"))
    except OSError as error:
        raise _cannot_write(runs, error, "--runs") from None
    if returncode != 0:
        lines = stderr_path.read_text().strip().splitlines()
        why = next((line for line in reversed(lines) if line.startswith(("error:", "the run stopped:"))),
                   lines[-1] if lines else "it said nothing")
        if returncode == 2 or not (run_dir / "metrics.jsonl").exists():  # refused, or stopped before training
            raise AblationError(f"the {variant} run failed ({how}): {why.removeprefix('error: ')} (its "
                                f"output: {stderr_path})")
        if _stopped(stderr_path) is None:  # not a result, which --reuse would refuse
            raise AblationError(f"the {variant} run failed ({how}): {why} (its output: {stderr_path})")
        logger.warning("%s: the run stopped after %.0f s: %s", variant, time.perf_counter() - started, cause(why))
        check_same_data(run_dir, bundle, stderr_path)  # the images changed while it trained: not comparable
        return run_dir, why
    logger.info("%s: done in %.0f s", variant, time.perf_counter() - started)
    check_same_data(run_dir, bundle, stderr_path)  # the report gives one data line for every run
    return run_dir, None


# Signals that stop a run from outside (a user, a scheduler, the out-of-memory killer), which a
# resume goes on from; any other that ends it (SIGSEGV, SIGABRT) is the program's failure.
STOPPED_BY = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL}


def finish_advice(max_steps: Optional[int], run_dir: Path) -> str:
    """How to finish a variant's run that was interrupted or stopped, so that --reuse reads
    it: a resume with the ablation's --max-steps (``max_steps``) again (a resume keeps the recipe's epochs but not
    --max-steps, and would train to the last epoch), or, before its first checkpoint, a new
    run in its place, as for a checkpoint of the end of the training (stopped in the final
    evaluation), which a resume refuses and an --eval-only evaluates into another folder."""
    if not run_dir.exists():
        return "it had not begun, so run the ablation again with --reuse, which trains it"
    if not (run_dir / FILENAME).exists():
        return (f"it wrote no checkpoint yet, so remove {shell_word(run_dir)} and run the ablation again with --reuse, "
                f"which trains it anew")
    try:
        progress = read_as_saved(run_dir / FILENAME)["progress"]
        epochs = _read_json(run_dir / "config.json")["epochs"]  # the recipe's, resolved by the run
        ended = progress["global_step"] >= (max_steps or math.inf) or progress["epoch"] >= epochs
    except Exception:  # unreadable: the resume says why
        ended = False
    if ended:
        return (f"its checkpoint holds the end of its training, but it stopped before its summary, so remove "
                f"{shell_word(run_dir)} and run the ablation again with --reuse, which trains it anew")
    resume = ["python", "-m", "launch.two_gpu", "--resume", shell_word(run_dir)]
    if max_steps is not None:
        resume += ["--max-steps", str(max_steps)]
    return (f"finish it with {' '.join(resume)}, then run the ablation again with --reuse (or remove "
            f"{shell_word(run_dir)} to train it anew)")


# The line of a run's output that gives its data (launch.two_gpu's prepare_run)
DATA_LINE = re.compile(r"^data: .* \((\d+) classes, (\d+) training and (\d+) validation images\)$", re.MULTILINE)


def check_same_data(run_dir: Path, bundle, stderr_path: Path) -> None:
    """A run is reused only if it was trained and evaluated on the images that --data holds
    now (config.json names the folder alone, whose images may have changed since): by its
    checkpoint's digests of train/ and val/ (names, classes, sizes), or, for a run that stopped
    before its first checkpoint, by the numbers of images its output gave."""
    checkpoint = run_dir / FILENAME
    if checkpoint.exists():
        try:
            payload = read_as_saved(checkpoint)
            trained = {"classes": payload.get("classes"), "train": payload.get("train_digest"),
                       "val": payload.get("val_digest")}
        except Exception as error:  # damaged, or not a checkpoint: whatever torch says
            raise AblationError(f"cannot read {checkpoint} ({type(error).__name__}): remove its run folder to train "
                                f"that variant again") from None
        now = {"classes": list(bundle.classes), **bundle.digests}
    else:
        logged = DATA_LINE.search(stderr_path.read_text(errors="replace")) if stderr_path.exists() else None
        if logged is None:
            raise AblationError(f"{run_dir} holds no checkpoint and {stderr_path} no line of its data, so the images it "
                                f"was trained on cannot be checked: remove {run_dir} to train that variant again")
        trained = dict(zip(("classes", "train", "val"), map(int, logged.groups())))
        now = {"classes": len(bundle.classes), "train": len(bundle.train), "val": len(bundle.val)}
    if None in trained.values():  # saved before the checkpoints held their data's digests
        raise AblationError(f"{checkpoint} holds no record of the images it was trained on (an earlier version saved "
                            f"it), so they cannot be checked: remove {run_dir} to train that variant again")
    differ = [name for name in now if trained[name] != now[name]]
    if differ:
        what = f"{differ[0]}/ images" if differ[0] != "classes" else \
            "class names" if checkpoint.exists() else "number of classes"
        raise AblationError(f"{run_dir} was trained on other data: its {what} differ from those in {bundle.root} now "
                            f"({len(bundle.train)} training and {len(bundle.val)} validation images): remove "
                            f"{run_dir} to train that variant again on them, or give another --runs folder")


def check_steps(run_dir: Path, options: list, bundle) -> None:
    """A finished run is reused only if it trained the steps the options give: config.json
    keeps the first start's --max-steps, where a resume without it trained to the last epoch."""
    wanted = resolve(parse_config(options), len(bundle.train))
    steps = wanted.epochs * data_module.batches_per_epoch(bundle, wanted.batch_size)
    steps = min(steps, wanted.max_steps or steps)
    records = _read_json(run_dir / "metrics.jsonl", lines=True)
    if not records or not isinstance(records[-1], dict) or records[-1].get("event") != "summary":
        raise AblationError(f"{run_dir} was started again after its summary.json was written (its metrics.jsonl "
                            f"goes on after the summary), so that no longer gives its numbers: remove {run_dir} to "
                            f"train that variant again, or give another --runs folder")
    trained = _checked(_read_json(run_dir / "summary.json"), {"steps": COUNT}, run_dir / "summary.json",
                       run_dir)["steps"]
    if records[-1].get("steps") != trained:  # a later start stopped between its summary record and summary.json
        raise AblationError(f"{run_dir}'s summary.json and the summary at the end of its metrics.jsonl differ (a "
                            f"later start of the run stopped as it wrote them): remove {run_dir} to train that "
                            f"variant again, or give another --runs folder")
    if trained != steps:
        raise AblationError(f"{run_dir} trained {trained} steps, not the {steps} that these options give (resumed "
                            f"without --max-steps?): remove {run_dir} to train that variant again, or give another "
                            f"--runs folder")


def _stopped(stderr_path: Path) -> Optional[str]:
    """Why the run whose output is ``stderr_path`` stopped on its own (a loss that ran away, a
    rank that died), or None if it says no such thing."""
    lines = stderr_path.read_text().splitlines() if stderr_path.exists() else []
    return next((line for line in reversed(lines) if line.startswith("the run stopped:")), None)


# Options of launch.two_gpu that say where and how a run ran, not what it computed.
NOT_COMPARED_ON_REUSE = {"out", "run_name", "log_every", "workers", "timeout", "backend", "master_addr",
                         "checkpoint_every"}
# Filled by where the run ran: compared only where the options give them.
FILLED_BY_THE_RUN = {"replicas"}


def check_reusable(run_dir: Path, options: list, train_images: int) -> None:
    """A run is reused only if its config.json holds what ``options`` would have given it on
    a training set of ``train_images``: the small recipe's epochs and milestones follow from
    that size, as the program fills them, and are compared too (runs of other --epochs were
    taken for one recipe)."""
    if not (run_dir / "config.json").is_file():
        raise AblationError(f"{run_dir} holds no run (no config.json): remove it, or give another --runs folder")
    saved = _checked(_read_json(run_dir / "config.json"), {}, run_dir / "config.json", run_dir)
    wanted = resolve(parse_config(options), train_images)
    wanted = json.loads(json.dumps(asdict(wanted)))  # tuples as JSON gives them back
    saved = _with_defaults(saved)
    differ = sorted(name for name in wanted if name not in NOT_COMPARED_ON_REUSE and saved.get(name) != wanted[name]
                    and not (name in FILLED_BY_THE_RUN and wanted[name] is None))
    if differ:
        name = differ[0]
        raise AblationError(f"{run_dir} was trained with {name} = {saved.get(name)}, not {wanted[name]}: give "
                            f"another --runs folder, or remove {run_dir} to train that variant again with these options")


# ---------------------------------------------------------------- reading the runs

def _read_json(path: Path, lines: bool = False):
    """A run's JSON file (``lines``: one record per line), or AblationError naming it."""
    try:
        text = path.read_text()
        return [json.loads(line) for line in text.splitlines()] if lines else json.loads(text)
    except (OSError, *JSON_DAMAGE) as error:  # such as by a hand edit
        raise AblationError(f"cannot read {path} ({getattr(error, 'strerror', None) or error}): remove its run "
                            f"folder to train that variant again") from None


# What the report reads of a run's files, and what each value must be: ERROR a proportion, COUNT a
# whole number above 0, AMOUNT a finite number of at least 0 (a time, a rate, a loss), TEXT a string;
# {key: kind} an object (a key ending in "?" may be absent or null), [kind] a list of one or more.
ERROR, COUNT, AMOUNT, TEXT = "a number from 0 to 1", "a whole number above 0", "a finite number of at least 0", \
    "a string"
EVALUATION = {"top1_error": ERROR, "top5_error": ERROR, "images": COUNT}
SUMMARY = {"steps": COUNT, "steps_this_run?": AMOUNT, "classes": COUNT, "centre": EVALUATION, "ten_patch?": EVALUATION,
           "images_per_s": AMOUNT, "train_seconds": AMOUNT, "device": TEXT, "layout": TEXT}
RECORDS = {"train": {"epoch": COUNT, "step": COUNT, "loss": AMOUNT, "top1": ERROR}, "eval": {"top1_error": ERROR},
           "resume": {"step": AMOUNT}}
CONDITIONS = {"command": TEXT, "wall_s": AMOUNT, "load_average": {"start": [AMOUNT], "end": [AMOUNT]}}


def _fits(value, kind: str) -> bool:
    if kind == TEXT:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return False
    if kind == ERROR:
        return value <= 1
    return kind != COUNT or (isinstance(value, int) and value > 0)


def _shape_of(value, shape, where: str, whole: str = "the file") -> Optional[str]:
    """What in ``value`` (read from a JSON file: ``whole``) differs from ``shape``, or None."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            shown = "a list" if isinstance(value, list) else json.dumps(value)[:60]
            return f"{where or whole} is {shown}, not an object"
        for key, inner in shape.items():
            name = f"{where}.{key.rstrip('?')}" if where else key.rstrip("?")
            if value.get(key.rstrip("?")) is None:
                if key.endswith("?"):
                    continue
                return f"{name} is missing" if key not in value else f"{name} is null"
            wrong = _shape_of(value[key.rstrip("?")], inner, name)
            if wrong:
                return wrong
        return None
    if isinstance(shape, list):
        if not isinstance(value, list) or not value:
            return f"{where} is {json.dumps(value)[:60]}, not a list of {shape[0]}s"
        return next(filter(None, (_shape_of(item, shape[0], f"{where}[{i}]") for i, item in enumerate(value))), None)
    return None if _fits(value, shape) else f"{where} is {json.dumps(value)[:60]}, not {shape}"


def _checked(value, shape, path: Path, run_dir: Path, writer: str = "python -m launch.two_gpu"):
    """``value``, read from ``path``, if it has ``shape``; else AblationError naming what differs."""
    wrong = _shape_of(value, shape, "")
    if wrong:
        raise _damaged(path, run_dir, wrong, writer)
    return value


def _damaged(path: Path, run_dir: Path, wrong: str, writer: str = "python -m launch.two_gpu") -> AblationError:
    return AblationError(f"{path} is not as {writer} writes it: {wrong}: remove {run_dir} to train that variant again")


def _read_summary(run_dir: Path) -> dict:
    return _checked(_read_json(run_dir / "summary.json"), SUMMARY, run_dir / "summary.json", run_dir)


def _read_records(run_dir: Path, finished: bool) -> list:
    """metrics.jsonl's records, those the report reads checked; a finished run's holds its steps."""
    path = run_dir / "metrics.jsonl"
    records = _read_json(path, lines=True)
    for line, record in enumerate(records, 1):
        wrong = _shape_of(record, {"event": TEXT}, "", "the record") or \
            _shape_of(record, RECORDS.get(record["event"], {}), "")
        if wrong:
            raise _damaged(path, run_dir, f"line {line}: {wrong}")
    if finished and not any(r["event"] == "train" for r in records):
        raise _damaged(path, run_dir, "no record of a training step, where summary.json says the run finished")
    return records


def training_curve(records: list) -> list:
    """Per training step (metrics.jsonl written with --log-every 1): the step line's
    training error and loss, which cover the last ``StepMeter().window`` steps of the
    epoch, fewer in an epoch's first steps and in the first steps after a resume (whose
    StepMeter starts afresh): ``full_window`` False there."""
    window, curve, start, epoch = StepMeter().window, [], None, None
    for r in records:
        if r["event"] == "resume":
            start = None
        elif r["event"] == "train":
            if start is None or r["epoch"] != epoch:
                start, epoch = r["step"], r["epoch"]
            curve.append({"step": r["step"], "train_error": 1 - r["top1"], "loss": r["loss"],
                          "full_window": r["step"] - start + 1 >= window})
    return curve


def steps_to_error(curve: list, error: float) -> Optional[int]:
    """The first step whose full window's training error is at most ``error``; None if none."""
    return next((p["step"] for p in curve if p["full_window"] and p["train_error"] <= error), None)


def read_run(run_dir: Path, failure: Optional[str] = None) -> dict:
    """A run's numbers: validation errors (summary.json) and the training curve (metrics.jsonl);
    of a run that stopped (``failure``, its line of the program's output), the curve, its cause
    and the files it left. AblationError names a file that is not as launch.two_gpu writes it
    (a hand edit: a record without its fields, a number as text)."""
    try:
        return _read_run(run_dir, failure and cause(failure))
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise _not_as_written(run_dir, error) from None


# How the program ends the line of a run whose weights ran away, before its advice to start that run
# again (in its options, which are not the ablation's)
RAN_AWAY = "; the run stops."


def cause(failure: str) -> str:
    """The line of a run that stopped on its own, less the program's advice after its cause."""
    return failure.split(RAN_AWAY, 1)[0]


def stopped_advice(r: dict) -> str:
    """What to do about a variant's run that stopped, in the ablation's options."""
    if "NonFinite" in r["failed"]:  # it ran away: at the same seed and rate, it would again
        return ("it ran away at the ablation's --lr, the rate of every variant: to compare them at a lower one, run "
                "the ablation again with a lower --lr and another --runs folder")
    if FILENAME in r["files"]:  # a rank killed, a disk that filled: it goes on from its last checkpoint
        run_dir = Path(r["run_dir"])
        max_steps = _read_json(run_dir / "config.json").get("max_steps")
        return f"once the cause is fixed, {finish_advice(max_steps, run_dir)}"
    return (f"once the cause is fixed, remove {shell_word(r['run_dir'])} and run the ablation again with --reuse, "
            f"which trains it anew and reads the other runs")


def _not_as_written(run_dir: Path, error: Exception) -> AblationError:
    return AblationError(f"{run_dir} holds a metrics.jsonl, summary.json or config.json that is not as "
                         f"python -m launch.two_gpu writes it ({type(error).__name__}: {error}): remove {run_dir} to "
                         f"train that variant again")


def _read_run(run_dir: Path, failure: Optional[str]) -> dict:
    records = _read_records(run_dir, finished=failure is None)
    curve = training_curve(records)
    conditions = run_dir.parent / f"{run_dir.name}{CONDITIONS_SUFFIX}"
    numbers = {"run_dir": str(run_dir), "failed": failure, "curve": curve,
               "steps_to": {_percent(target): steps_to_error(curve, target) for target in TRAIN_ERROR_TARGETS},
               "conditions": _checked(_read_json(conditions), CONDITIONS, conditions, run_dir,
                                      "python -m benchmarks.ablations") if conditions.exists() else None}
    if failure is not None:
        # a loss that became NaN names its step, which wrote no record: one past the last one
        diverged = re.search(r"the loss became \S+ at epoch \d+, step (\d+)", failure)
        return {**numbers, "steps": int(diverged[1]) if diverged else curve[-1]["step"] if curve else 0,
                "files": sorted(p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith("."))}
    summary = _read_summary(run_dir)
    return {**numbers, "steps": summary["steps"], "classes": summary["classes"], "centre": summary["centre"],
            "ten_patch": summary.get("ten_patch"), "steps_this_run": summary.get("steps_this_run", summary["steps"]),
            "images_per_s": summary["images_per_s"], "train_seconds": summary["train_seconds"],
            "device": summary["device"], "layout": summary["layout"],
            "evals": [r for r in records if r["event"] == "eval"]}


@torch.no_grad()
def initial_activation_scale(run_dir: Path, bundle) -> float:
    """The standard deviation of pool5's output (FC6's input) in the run's net as it
    started, on its first training batch as training saw it: how large the activations
    that the initialisation scheme gives this variant are."""
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    if config.layout == "towers":  # the same weights and function in one process
        config = dataclasses.replace(config, layout="single")
    model = build_model(config, len(bundle.classes), None, torch.device("cpu")).eval()
    crops, labels = next(iter(data_module.train_batches(bundle, config.batch_size, config.seed, epoch=0)))
    choices = data_module.train_augmentation(config.seed, 0, 0, len(labels))
    pool5 = []
    model.fc6.register_forward_pre_hook(lambda module, args: pool5.append(args[0]))
    model(data_module.augment(crops, choices, bundle.stats))
    return pool5[0].std().item()


def noise_floor(results: dict) -> dict:
    """How large a difference of two validation errors means something here. Each error is a
    proportion of n images: its granularity is 1/n, its binomial standard error sqrt(p(1-p)/n);
    the difference of two such errors has about sqrt(2) times that. A difference within two of
    those standard errors is noise (and one seed adds the spread between seeds, not measured)."""
    finished = [r for r in results.values() if not r["failed"]]
    if not finished:
        raise AblationError("no run finished, so there is nothing to compare: see each run's .stderr file")
    n = min(r["centre"]["images"] for r in finished)
    typical = [r for r in finished if learned(r) is not False] or finished  # a run at chance would inflate it
    p = sum(r["centre"]["top1_error"] for r in typical) / len(typical)
    p = min(max(p, 1 / n), 1 - 1 / n)
    standard_error = math.sqrt(p * (1 - p) / n)
    return {"images": n, "granularity_points": 100 / n, "error_used": p, "standard_error_points": 100 * standard_error,
            "difference_floor_points": 100 * 2 * math.sqrt(2) * standard_error}


def _points(error: float) -> str:
    return f"{100 * error:.1f}"


def _judged(r: dict) -> list:
    """The points of a run's curve that say whether it learned: those with a full window of the
    step line; in a run whose epochs are all shorter than the window, every point (each the mean
    of its epoch so far); none in a run of fewer steps than the window."""
    full = [p for p in r["curve"] if p["full_window"]]
    return full or (r["curve"] if len(r["curve"]) >= StepMeter().window else [])


def learned(r: dict) -> Optional[bool]:
    """False for a run whose training loss (its last judged step's: see _judged) ended at that of
    a uniform guess, ln(classes) (within 1 %): it fell to chance and stayed there. None for a
    run too short to tell: fewer steps than the step line's window."""
    judged = _judged(r)
    if not judged:
        return None
    return abs(judged[-1]["loss"] - math.log(r["classes"])) > 0.01 * math.log(r["classes"])


def not_learned_line(variant: str, r: dict) -> str:
    judged = _judged(r)
    peak, last = max(judged, key=lambda p: p["loss"]), judged[-1]
    ended = f"ended at {last['loss']:.3f}," if last is r["curve"][-1] else \
        f"was {last['loss']:.3f} at step {last['step']}, its last with a full window,"
    return (f"- **{variant} did not learn.** Its training loss (the step line's mean over the last "
            f"{StepMeter().window} steps of an epoch, or over its steps so far) peaked "
            f"at {peak['loss']:.2f} at step {peak['step']} and {ended} the loss of a uniform guess over "
            f"{r['classes']} classes (ln {r['classes']} = {math.log(r['classes']):.3f}); its validation error, "
            f"{_points(r['centre']['top1_error'])} %, is chance. A failure to train under this recipe, one seed: not "
            f"the effect on generalisation that the paper measured.")


def too_short_line(results: dict) -> list:
    """The finished runs of fewer steps than the step line's window: whether they learned is not known."""
    short = [variant for variant, r in results.items() if not r["failed"] and learned(r) is None]
    if not short:
        return []
    return [f"- **Too short to tell whether {'it' if len(short) == 1 else 'they'} learned: {', '.join(short)}.** "
            f"The step line's training loss is a mean over the last {StepMeter().window} steps of an epoch, and "
            f"{'this run' if len(short) == 1 else 'these runs'} trained fewer steps than that: "
            f"{'its loss does' if len(short) == 1 else 'their losses do'} not say whether "
            f"{'it' if len(short) == 1 else 'they'} fell to chance."]


def _direction(delta: float, floor: float) -> str:
    if abs(delta) < floor:
        return f"within noise (±{floor:.1f})"
    return "the paper's" if delta > 0 else "the opposite"


def _verdict(delta: float, floor: float, paper: float) -> str:
    if abs(delta) < floor:
        return (f"not resolved: {delta:+.1f} lies within the noise floor of ±{floor:.1f}, and the paper's "
                f"{paper:+.1f} is far smaller than that floor" if paper < floor else
                f"not resolved: {delta:+.1f} lies within the noise floor of ±{floor:.1f}")
    return "the paper's direction" if delta > 0 else "the opposite of the paper's direction"


def _percent(error: float) -> str:
    return f"{100 * error:.0f} %"


def unmeasurable(r: dict) -> Optional[str]:
    """Why a run's steps to a training error cannot be read: none of its steps has a whole
    window of the step line's error behind it (it stopped first, or its epochs are shorter).
    None if they can."""
    window = StepMeter().window
    if any(p["full_window"] for p in r["curve"]):
        return None
    if r["failed"] and r["steps"] < window:  # not that its epochs were short
        return (f"not measurable: the run stopped at step {r['steps']}, before the {window} steps that the step "
                f"line's training error covers")
    if not r["curve"]:
        return None
    return (f"not measurable: no epoch of the run reached the {window} steps that the step line's "
            f"training error covers (a larger training set or a smaller --batch-size makes longer epochs)")


def tanh_lines(results: dict) -> list:
    """ReLU (the full net) against tanh: steps to each of TRAIN_ERROR_TARGETS, and their ratio."""
    if "full" not in results or "tanh" not in results:
        return ["ReLU against tanh needs both the full and the tanh runs."]
    why = next((f"{name}'s ({variant} run): {reason}" for name, variant in (("ReLU", "full"), ("tanh", "tanh"))
                if (reason := unmeasurable(results[variant]))), None)
    lines = [f"ReLU against tanh, steps to a training error, {why}."] if why else []  # not "neither got there"
    for target in map(_percent, TRAIN_ERROR_TARGETS) if not why else ():
        relu, tanh = results["full"]["steps_to"][target], results["tanh"]["steps_to"][target]
        relu_budget, tanh_budget = results["full"]["steps"], results["tanh"]["steps"]
        if relu is None and tanh is None:
            within = f"within {tanh_budget} steps" if relu_budget == tanh_budget else \
                f"(ReLU within its {relu_budget} steps, tanh within its {tanh_budget})"
            lines.append(f"To {target} training error: neither ReLU nor tanh got there {within}; no ratio measured.")
        elif relu is None and relu_budget < tanh:  # ReLU stopped before the step at which tanh got there
            lines.append(f"To {target} training error: tanh at step {tanh}, ReLU not within the {relu_budget} steps "
                         f"it ran: not resolved.")
        elif relu is None:
            lines.append(f"To {target} training error: tanh at step {tanh}, ReLU not within {relu_budget} steps: "
                         f"the opposite of the paper's direction.")
        elif tanh is None and tanh_budget < relu:
            lines.append(f"To {target} training error: ReLU at step {relu}, tanh not within the {tanh_budget} steps "
                         f"it ran: not resolved.")
        elif tanh is None:
            lines.append(f"To {target} training error: ReLU at step {relu}, tanh not within {tanh_budget} steps, so "
                         f"ReLU was at least {tanh_budget / relu:.1f}x faster (a lower bound; the paper: about "
                         f"{PAPER_TANH_SLOWDOWN}x to 25 %).")
        else:
            direction = "the paper's direction" if tanh > relu else "not the paper's direction"
            lines.append(f"To {target} training error: ReLU at step {relu}, tanh at step {tanh}: ReLU "
                         f"{tanh / relu:.1f}x faster (the paper: about {PAPER_TANH_SLOWDOWN}x to 25 %); {direction}.")
    lines += [f"(The {v} run stopped at step {results[v]['steps']}: {results[v]['failed']}.)"
              for v in ("full", "tanh") if results[v]["failed"]]
    for variant, name in (("full", "ReLU"), ("tanh", "tanh")):
        rise = largest_rise(results[variant]["curve"])
        if rise is not None and rise[0] >= 0.1:
            lines.append(f"The {name} run's training error did not fall steadily: it rose by {100 * rise[0]:.0f} "
                         f"points between steps {rise[1]} and {rise[2]}, so one run's step count says little.")
    return lines


def largest_rise(curve: list) -> Optional[tuple]:
    """(rise, from step, to step): the largest increase of the full-window training error."""
    best, lowest = None, None
    for p in (p for p in curve if p["full_window"]):
        if lowest is None or p["train_error"] < lowest["train_error"]:
            lowest = p
        elif best is None or p["train_error"] - lowest["train_error"] > best[0]:
            best = (p["train_error"] - lowest["train_error"], lowest["step"], p["step"])
    return best


def table(results: dict, floor: dict) -> list:
    full = results.get("full")
    if full is not None and full["failed"]:
        full = None
    ten = any(r.get("ten_patch") for r in results.values())
    header = ("| variant | what changes | val top-1 error % | val top-5 error % | top-1 / top-5 vs full (points) "
              "| the paper (points) | direction here | val top-1 error % by epoch "
              f"| steps to {' / '.join(map(_percent, TRAIN_ERROR_TARGETS))} training error | FC6 input std at step 1 "
              "| images/s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    descriptions = {"full": "the paper's net (the baseline)", "no-lrn": "no LRN after conv1 and conv2",
                    "non-overlapping": "2x2 pooling windows, stride 2 (not 3x3)", "tanh": "tanh for every ReLU",
                    "one-tower": "one-GPU net: 48/128/192/192/256 kernels, no groups"}
    for variant, r in results.items():
        reached = unmeasurable(r) or " / ".join(str(step) if step is not None else f"not within {r['steps']}"
                                                for step in r["steps_to"].values())
        if r["failed"]:
            lines.append(f"| {variant} | {descriptions[variant]} | stopped at step {r['steps']}: {r['failed']} | — | — "
                         f"| — | — | — | {reached} | {r['initial_scale']:.2f} | — |")
            continue
        centre = r["centre"]
        errors = f"{_points(centre['top1_error'])}", f"{_points(centre['top5_error'])}"
        if ten and r["ten_patch"]:
            errors = tuple(f"{e} (ten-patch {_points(r['ten_patch'][k])})"
                           for e, k in zip(errors, ("top1_error", "top5_error")))
        if variant == "full" or full is None:
            delta = paper = direction = "—"
        else:
            d1 = 100 * (centre["top1_error"] - full["centre"]["top1_error"])
            d5 = 100 * (centre["top5_error"] - full["centre"]["top5_error"])
            delta = f"{d1:+.1f} / {d5:+.1f}"
            if variant in PAPER_EFFECTS:
                p1, p5, _ = PAPER_EFFECTS[variant]
                paper = f"+{p1} / +{p5}"
                direction = (_direction(d1, floor["difference_floor_points"])
                             if learned(r) is not False and learned(full) is not False else
                             "did not learn (see below)" if learned(r) is False else
                             "none: the full net did not learn (see below)")
            else:
                paper, direction = f"ReLU about {PAPER_TANH_SLOWDOWN}x faster to 25 % (errors not given)", "see below"
        by_epoch = " / ".join(_points(e["top1_error"]) for e in r["evals"]) or "—"
        lines.append(f"| {variant} | {descriptions[variant]} | {errors[0]} | {errors[1]} | {delta} | {paper} | "
                     f"{direction} | {by_epoch} | {reached} | {r['initial_scale']:.2f} | {r['images_per_s']:.1f} |")
    return lines


def chart(results: dict, floor: dict, path: Path) -> None:
    plt = pyplot()
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5.5))
    for variant, r in results.items():  # gaps where the window holds fewer steps (an epoch's first steps)
        steps = [p["step"] for p in r["curve"]]
        curves.plot(steps, [100 * p["train_error"] if p["full_window"] else math.nan for p in r["curve"]],
                    label=variant, linewidth=1.2)
    for target in TRAIN_ERROR_TARGETS:
        curves.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8)
    curves.set(xlabel="training step", ylabel=f"training top-1 error %, last {StepMeter().window} steps",
               title="Training error (dropout on, augmented batches)", ylim=(0, 100))
    curves.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=5)
    names = [v for v, r in results.items() if not r["failed"]]
    top1 = [100 * results[v]["centre"]["top1_error"] for v in names]
    bars.bar(names, top1, yerr=floor["standard_error_points"], capsize=4, color="#7a9cc6",
             label=f"measured (± one binomial standard error, {floor['images']} images)")
    if "full" in names:
        base = 100 * results["full"]["centre"]["top1_error"]
        expected = [(i, base + PAPER_EFFECTS[v][0]) for i, v in enumerate(names) if v in PAPER_EFFECTS]
        if expected:
            bars.scatter(*zip(*expected), marker="_", s=400, color="#c0392b", zorder=3,
                         label="the full net's error plus the paper's effect")
    bars.set(ylabel="validation top-1 error % (centre patch)", title="Validation error by variant")
    bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    try:
        write_whole(path, lambda partial: fig.savefig(partial, dpi=120, format="png"))
    finally:
        plt.close(fig)


def swing_lines(results: dict) -> list:
    """How far one run's validation error moved between its evaluations: training this short
    is unstable, which no binomial floor accounts for."""
    swings = {v: max(abs(b["top1_error"] - a["top1_error"]) for a, b in zip(r["evals"], r["evals"][1:]))
              for v, r in results.items() if not r["failed"] and len(r["evals"]) > 1}
    if not swings:
        return []
    variant = max(swings, key=swings.get)
    return [f"- **Instability.** Between two end-of-epoch evaluations of one run the validation top-1 error moved by "
            f"up to {100 * swings[variant]:.1f} points ({variant}; every run's by epoch in the table): where the "
            f"training stops decides much of the final number, beyond the binomial noise above."]


def scale_line(floor: dict) -> str:
    largest = max(top1 for top1, _, _ in PAPER_EFFECTS.values())
    paper = (f"LRN's {PAPER_EFFECTS['no-lrn'][0]}, overlapping pooling's {PAPER_EFFECTS['non-overlapping'][0]} and "
             f"the two towers' {PAPER_EFFECTS['one-tower'][0]} points of top-1 error were measured on the 50,000 "
             f"ILSVRC-2012 validation images after 90 epochs")
    if largest < floor["difference_floor_points"]:
        return (f"- **The paper's effects are smaller than that floor.** {paper}; here a difference of that size is "
                f"invisible, so agreeing or disagreeing with their direction by less than "
                f"{floor['difference_floor_points']:.1f} points is chance.")
    return f"- **Scale.** {paper}; this validation set resolves differences of that size."


STAGING = ".report.partial-"  # the folder in --out where a report is made, then moved out of


def write_report(results: dict, info: dict, out: Path) -> None:
    floor = noise_floor(results)
    chart(results, floor, out / CHART)
    full = results.get("full")
    if full is not None and full["failed"]:
        full = None
    data_name = "the built-in data" if info["config"]["data"] is None else info["config"]["data"]
    lines = [
        f"# AlexNet ablations: the paper's experiments on {data_name} — {info['machine']['hostname']}, {info['date']}",
        "",
        "## Machine and configuration", "",
        f"- host `{info['machine']['hostname']}`, {info['machine']['cpu_model']}, {info['machine']['cpu_count']} "
        f"logical cores{usable_cores_note(info['machine'])}, GPUs: {', '.join(info['machine']['gpus']) or 'none'}; "
        f"torch {info['machine']['torch']}",
        f"- command: `{info['command']}`" + (f" (the runs of {', '.join(info['reused'])} were already in --runs and "
                                             f"were read, not trained again: trained by this command without "
                                             f"--reuse, with the options checked against their config.json)"
                                             if info["reused"] else ""),
        f"- each run: `python -m launch.two_gpu {' '.join(info['common_options'])}` plus the variant's options "
        f"(each run's own command, wall time and the machine's load are listed under Runs)",
        f"- data: {info['data']}",
        f"- recipe (every run): {info['recipe']}",
        f"- the two-tower variants ran as `--layout {info['config']['layout']}`"
        + (" (the single-device reference: the same function as the towers, checked in float64 for every "
           "variant by tests/test_parity.py, at a lower cost on a CPU); " if info["config"]["layout"] == "single"
           else "; ") + "the one-tower net ran as `--layout one-tower` (one process, no groups)", "",
        "## Results", "",
        *table(results, floor), "",
        f"Validation errors are of the centre patch of the {floor['images']} validation images. Training error is "
        f"the step line's: top-1 error over the last {StepMeter().window} training batches (dropout on, augmented "
        f"images); a step counts for a training-error mark only when its window holds {StepMeter().window} batches of the "
        f"same epoch. FC6 input std at step 1: the standard deviation of pool5's output in the net as it started, on "
        f"its first training batch (the scale of the activations the initialisation gives each variant).", "",
        f"![training error by step, and validation error by variant]({CHART})", "",
        "## What this does and does not show", "",
        f"- **Noise.** One seed on {floor['images']} validation images: an error moves in steps of "
        f"{floor['granularity_points']:.1f} points (one image), and at the runs' mean error of "
        f"{100 * floor['error_used']:.0f} % its binomial standard error is {floor['standard_error_points']:.1f} points; "
        f"a difference between two runs of less than {floor['difference_floor_points']:.1f} points (two standard "
        f"errors of a difference) means nothing. The spread between seeds, not measured, adds to it.",
        *swing_lines(results),
        scale_line(floor),
        *top5_lines(results),
    ]
    lines += [not_learned_line(variant, r) for variant, r in results.items()
              if not r["failed"] and learned(r) is False]
    lines += too_short_line(results)
    for variant, (p1, p5, source) in PAPER_EFFECTS.items():
        if variant in results and full is not None and not results[variant]["failed"]:
            r = results[variant]
            d1 = 100 * (r["centre"]["top1_error"] - full["centre"]["top1_error"])
            verdict = (_verdict(d1, floor["difference_floor_points"], p1)
                       if learned(r) is not False and learned(full) is not False else
                       "a run that did not learn compares nothing about generalisation")
            lines.append(f"- **{variant}** ({source}): here {d1:+.1f} points of top-1 error against the full net; "
                         f"{verdict}.")
    lines.append("- **ReLU against tanh** (section 3.1, Figure 1, measured there on CIFAR-10 with a four-layer net): "
                 + " ".join(tanh_lines(results)))
    lines += ["", "## Runs", "", "The folder of each finished run holds checkpoint.pt, metrics.jsonl, summary.json and "
              "train.log; that of a run that stopped, the files its line lists. Other work on the machine slows a "
              "run (its images/s and wall time), never its results.", ""]
    lines += [run_line(variant, r) for variant, r in results.items()]
    write_whole(out / "report.md", lambda partial: partial.write_text("\n".join(lines) + "\n", **REPORT_TEXT))


def top5_lines(results: dict) -> list:
    """What top-5 error means on the data's number of classes: nothing at five or fewer (always 0)."""
    classes = next(r["classes"] for r in results.values() if not r["failed"])
    if classes <= 5:
        return []
    return [f"- **Top-5 error** on {classes} classes counts a miss only when the true class is among the "
            f"{classes - 5} least likely: a uniform guess misses {100 * (classes - 5) / classes:.0f} % of the time "
            f"(99.5 % on ILSVRC-2012's 1000)."]


def run_line(variant: str, r: dict) -> str:
    line = f"- {variant}: `{r['run_dir']}`"
    if r["failed"]:
        line += (f"; stopped at step {r['steps']}, its folder holds {', '.join(r['files']) or 'no file'} (no "
                 f"summary.json: it did not finish)")
    else:
        # summary.json times the last start of a resumed run alone
        sitting = "" if r["steps_this_run"] == r["steps"] else \
            f", resumed: the last start's {r['steps_this_run']} steps"
        line += (f"; {r['steps']} steps{sitting} trained in {r['train_seconds'] / 60:.1f} min ({r['images_per_s']:.1f} "
                 f"images/s) on {r['device']}, --layout {r['layout']}")
    conditions = r["conditions"]
    if conditions is not None:
        load = conditions["load_average"]
        line += (f"; wall time {conditions['wall_s'] / 60:.1f} min; load average (1 min) {load['start'][0]:.1f} at "
                 f"its start, {load['end'][0]:.1f} at its end; command `{conditions['command']}`")
    if r["failed"]:
        advice = stopped_advice(r)
        line += f". {advice[0].upper()}{advice[1:]}."
    return line


def _with_defaults(saved: dict) -> dict:
    """A run's config.json, with the default of each option added since it was saved: the run
    ran as that default does."""
    return {**json.loads(json.dumps(asdict(parse_config([])))), **saved}


def _recipe(run_dir: Path) -> str:
    saved = _with_defaults(_read_json(run_dir / "config.json"))
    return (f"{saved['epochs']} epochs, batch {saved['batch_size']}, lr {saved['lr']} ({saved['schedule']} schedule"
            + (f", divided by 10 at epochs {', '.join(map(str, saved['lr_milestones']))}"
               if saved["schedule"] == "fixed" else "") +
            f"), {saved['warmup_steps']} warm-up steps, init '{saved['init']}', dropout {saved['dropout']}, "
            f"momentum {saved['momentum']}, weight decay {saved['weight_decay']}, seed {saved['seed']}"
            + (f", at most {saved['max_steps']} steps" if saved["max_steps"] else ""))


def _data_description(config: AblationConfig, bundle) -> str:
    name = "the built-in dataset (ten generated texture classes)" if config.data is None else str(bundle.root)
    return (f"{name}: {len(bundle.classes)} classes, {len(bundle.train)} training and {len(bundle.val)} validation "
            f"images")


def _cannot_write(path: Path, error: OSError, flag: str) -> AblationError:
    """A disk that filled up (or a folder that turned read-only) under ``path``: no file was
    left half-written (``write_whole``), and the runs trained so far stay in --runs."""
    return AblationError(f"cannot write {path} ({error.strerror or error}): free space on that disk, or give {flag} a "
                         f"folder that can be written; the finished runs stay in --runs, and the same command with "
                         f"--reuse makes the report from them")


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = sys.argv[1:] if argv is None else list(argv)
    config = AblationConfig(**vars(build_parser().parse_args(args)))
    for name in ("data", "out", "runs"):  # such as an unset "$VARIABLE"
        if getattr(config, name) == "":
            raise ValueError(f"--{name} is empty: give a folder, or leave the option out")
    temporary_folder()  # which torchvision's import (machine_info) and the runs need
    pyplot()  # where matplotlib cannot start, before the runs, not after them
    if config.data is not None:  # the runs start in the repository's root
        config = dataclasses.replace(config, data=str(real_path(config.data)))
    today = datetime.date.today().isoformat()
    machine = machine_info(plan_devices(BenchConfig()))
    # ~ is the home folder here too, as the shell leaves it in --out=~/report
    out = home_path(config.out).absolute() if config.out else REPORTS_DIR / f"ablations-{machine['hostname']}-{today}"
    runs = real_path(config.runs) if config.runs else ROOT / "runs" / f"ablations-{today}"
    trainers = [parse_config(run_options(config, variant, runs)) for variant in config.variants]
    for variant, trainer in zip(config.variants, trainers):  # values the program refuses: before any folder is made
        if config.reuse and (runs / variant).exists():  # --workers is not compared on reuse: nor held to this machine
            trainer = dataclasses.replace(trainer, workers=None)
        trainer.validate()
        check_workers(trainer.workers)  # each run's one loading rank
    refuse_others_files(out, REPORT_FILES, "benchmarks.ablations")  # before the first run, not after the last
    data = Path(config.data) if config.data is not None else builtin.default_root()
    for flag, folder in (("--out", out), ("--runs", runs)):  # a run folder there: a class of images to the scans
        data_module.check_outside_the_images(flag, str(folder), data)
    for variant in VARIANTS:  # the report's folder taken for a run, or a run trained into the report's
        if real_path(out).is_relative_to(real_path(runs / variant)):
            raise ValueError(f"--out {out} lies in {runs / variant}, the run folder of the {variant} variant: give "
                             f"--out outside it")
    made = []  # the folders this ablation made, each after its parent
    with contextlib.ExitStack() as locks:  # a second ablation into either folder is refused before it writes
        try:
            for flag, folder in (("--out", out), ("--runs", runs)):  # before the first run, not after the last
                try:
                    make_folder(folder, made)
                except OSError as error:
                    raise ValueError(f"{flag} {folder}: cannot make that folder ({error.strerror}); give a folder "
                                     f"that can be written") from None
            for folder, flag in {real_path(out): "--out", runs: "--runs"}.items():  # one lock where they are one
                locks.enter_context(held(folder, flag))
            bundle = data_module.open_data(config.data)  # once the folders are sure: it may compute statistics
            for trainer in trainers:  # values the data refuses: before the first run, not by it
                data_module.check_batch_size(bundle, resolve(trainer, train_images=len(bundle.train)).batch_size)
            return _measure(config, out, runs, args, machine, today, bundle)
        except BaseException:  # a run refused or stopped, Ctrl-C: the folders made for nothing are not left
            remove_made(made)  # while they are held
            raise


def _measure(config: AblationConfig, out: Path, runs: Path, args: list, machine: dict, today: str, bundle) -> Path:
    """main's runs and report, in folders that it made and holds, of the data opened (``bundle``)."""
    results, reused = {}, []
    for variant in config.variants:
        if config.reuse and (runs / variant).exists():  # read by train(), or refused
            reused.append(variant)
        results[variant] = r = read_run(*train(config, variant, runs, bundle))
        try:
            r["initial_scale"] = initial_activation_scale(Path(r["run_dir"]), bundle)
        except (KeyError, TypeError, AttributeError, *JSON_DAMAGE) as error:  # its config.json edited
            raise _not_as_written(Path(r["run_dir"]), error) from None
        if r["failed"]:
            continue
        logger.info("%s: validation top-1 error %.1f %%, top-5 %.1f %%; first step at each training error: %s",
                    variant, 100 * r["centre"]["top1_error"], 100 * r["centre"]["top5_error"], r["steps_to"])
    first = Path(results[config.variants[0]]["run_dir"])
    info = {
        "machine": machine, "date": today, "config": asdict(config),
        "command": shlex.join(["python", "-m", "benchmarks.ablations", *args]),
        "common_options": shared_options(config, runs),
        "recipe": _recipe(first), "data": _data_description(config, bundle), "reused": reused,
    }
    # Made beside the earlier report and put in its place once all three files are made: results
    # that cannot make a report, a full disk or a Ctrl-C leave the earlier one as it was.
    for stale in out.glob(f"{STAGING}*"):  # of an ablation killed while it wrote (--out is this one's now)
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f"{STAGING}{os.getpid()}"
    try:
        staging.mkdir()
        (staging / "results.json").write_text(json.dumps({"info": info, "noise": noise_floor(results),
                                                          "runs": results}, indent=1, allow_nan=False))
        write_report(results, info, staging)
        for name in ("results.json", "report.md", CHART):
            os.replace(staging / name, out / name)
    except OSError as error:
        raise _cannot_write(out, error, "--out") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("report: %s", out / "report.md")
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_interrupt)  # as Ctrl-C: the run in progress is stopped, not left behind
    with quick_exit():
        try:
            main()
        except (ValueError, AblationError) as error:  # options refused here or by a run, a --reuse that does not fit
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as interrupt:
            stopped = f"{interrupt}; " if isinstance(interrupt, Interrupted) else ""
            print(f"interrupted: {stopped}the finished runs stay in --runs, read again with --reuse", file=sys.stderr)
            sys.exit(130)
