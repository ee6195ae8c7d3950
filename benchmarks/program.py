"""The training program as a user runs it, against the synthetic step of the same layout.

``python -m launch.two_gpu`` trains on real JPEGs (the built-in set unless ``--loader-data``)
at the main table's batch, fp32, with no checkpoint within an epoch (each epoch's end, and
the last step, evaluate and save, between the steps timed): the loader, the input hand-over
and the device-side augmentation are all in its steps. Its rate is
taken from ``metrics.jsonl`` (``--log-every 1``), where each step records ``step_ms``,
its own time including the wait for its batch (``input_ms``); the first steps of the run are its
warm-up and are left out. From that rate follows how long the paper's 90 epochs of
ImageNet's training set would take.
"""

import functools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

from launch.ranks import die_with_parent

from .scratch import temporary_folder


IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012's training set
PAPER_EPOCHS = 90
PROGRAM_LAYOUTS = {"towers": "towers", "single": "single"}  # benchmark mode -> the program's --layout


def program_command(layout: str, batch: int, steps: int, device: str, data: Optional[str],
                    workers: Optional[int], fc8_placement: str) -> list:
    """``python -m launch.two_gpu`` with the options of a timed run, less where it writes.
    The towers get the benchmark's FC8 placement: the report holds their rate against the
    synthetic towers' step, which ran with it (the single-device net has FC8 whole)."""
    command = ["-m", "launch.two_gpu", "--layout", layout, "--batch-size", str(batch), "--max-steps", str(steps),
               "--log-every", "1", "--checkpoint-every", "0", "--val-limit", str(batch), "--no-ten-crop"]
    if layout == "towers":
        command += ["--fc8-placement", fc8_placement]
    if device == "cpu":
        command += ["--backend", "gloo"]  # the program's way to keep off a GPU
    if data:
        command += ["--data", data]
    if workers is not None:
        command += ["--workers", str(workers)]
    return command


STOP_GRACE_S = 20.0  # how long a program told to stop (SIGTERM, as Ctrl-C) gets to end its ranks and remove its files


def run_child(argv: list, timeout_s: Optional[float] = None, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``argv`` (``popen``: Popen's options), except that a child that
    outlives ``timeout_s``, or a caller interrupted meanwhile (Ctrl-C, or SIGTERM made one),
    is sent SIGTERM, which the program takes as Ctrl-C (its ranks ended, its files removed),
    and killed only if it has not ended after STOP_GRACE_S. SIGTERM, not SIGINT: a caller
    started in the background by a shell has SIGINT ignored, and its child with it.

    A caller killed outright (SIGKILL, the out-of-memory killer) cannot stop the child: on
    Linux the kernel then sends the child SIGTERM (launch.ranks.die_with_parent), so that
    it does not train on, orphaned.
    The signal follows the death of the thread that started the child: call this from the
    thread that lives as long as the caller (the main thread)."""
    popen.setdefault("preexec_fn", functools.partial(die_with_parent, os.getpid()))
    with subprocess.Popen(argv, text=True, **popen) as child:
        try:
            out, err = child.communicate(timeout=timeout_s)
        except BaseException:
            child.send_signal(signal.SIGTERM)
            try:
                child.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    return subprocess.CompletedProcess(argv, child.returncode, out, err)


def steady_rate(records: list, batch: int, warmup: int) -> dict:
    """images/s from the train records' ``step_ms`` after the first ``warmup`` steps: the
    median step (steady state) and the mean (epoch starts and slow batches included); and
    the median of the steps' waits for their batches (``input_ms``, part of ``step_ms``)."""
    timed = [r for r in records if r.get("event") == "train" and r["step"] > warmup]
    if not timed:
        raise ValueError(f"no training step after the {warmup} warm-up steps to time")
    times = [r["step_ms"] for r in timed]
    median, mean = statistics.median(times), statistics.fmean(times)
    return {"timed_steps": len(times), "median_step_ms": median, "mean_step_ms": mean,
            "median_input_ms": statistics.median(r["input_ms"] for r in timed),
            "images_per_s": 1000 * batch / median, "mean_images_per_s": 1000 * batch / mean}


def paper_training_hours(images_per_s: float) -> float:
    """Hours for 90 epochs of ImageNet's training set at ``images_per_s``."""
    return PAPER_EPOCHS * IMAGENET_TRAIN_IMAGES / images_per_s / 3600


def measure_program(modes: tuple, batch: int, steps: int, warmup: int, devices: dict, data: Optional[str],
                    workers: Optional[int], fc8_placement: str, timeout_s: float, deadline=None) -> list:
    """One short run of the program per mode of ``modes`` that it can train (towers,
    single), on the device of ``devices`` (mode -> "cuda" or "cpu": where the synthetic run
    of that mode ran); a run that fails is recorded with the reason, not raised. ``deadline``
    (benchmarks.run.Deadline) may stop a run sooner, and leaves the rest not run."""
    results = []
    for mode in (m for m in modes if m in PROGRAM_LAYOUTS):
        with temporary_folder("alexnet-program-") as folder:
            command = program_command(PROGRAM_LAYOUTS[mode], batch, warmup + steps, devices[mode], data, workers,
                                      fc8_placement)
            entry = {"mode": mode, "batch": batch, "command": shlex.join(command[1:])}  # a --data of any name
            if deadline is not None:
                timeout_s = deadline.timeout(timeout_s)
                if timeout_s <= 0:
                    results.append({**entry, "failed": deadline.reason})
                    continue
            try:
                done = run_child([sys.executable, *command, "--out", folder, "--run-name", "run"], timeout_s,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except subprocess.TimeoutExpired:
                cut = deadline is not None and deadline.left() <= 0
                results.append({**entry, "failed": f"{deadline.reason} while it ran" if cut else
                                f"still running after {timeout_s:.0f} s"})
                continue
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({**entry, "failed": f"exit {done.returncode}: {last}"})
                continue
            run = Path(folder) / "run"
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            summary = json.loads((run / "summary.json").read_text())
            if not any(r.get("event") == "train" and r["step"] > warmup for r in records):
                # the recipe sized to the data ended the run first (the program's end, not --max-steps)
                results.append({**entry, "failed": f"it ended after {summary.get('steps')} steps (its recipe's "
                                                   f"last for this data), within the {warmup} warm-up steps: give "
                                                   f"a smaller --warmup, or --loader-data with more images"})
                continue
            rate = steady_rate(records, batch, warmup)
            results.append({**entry, **rate, "warmup_steps": warmup, "device": summary["device"],
                            "data": summary["data"], "workers": summary["workers"],
                            "input_bytes_per_step": summary["input_bytes_per_step"],
                            "paper_training_hours": paper_training_hours(rate["images_per_s"])})
    return results
