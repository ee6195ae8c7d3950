"""What rank 0 shows and writes while training: the step line's rolling numbers, a
progress bar on a terminal, metrics.jsonl, and peak memory."""

import contextlib
import json
import logging
import os
import resource
import shutil
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .cli import JSON_DAMAGE, write_whole


class StepMeter:
    """Rolling numbers for the step line: loss, top-1, images/s, ms/step, ETA."""

    def __init__(self, window: int = 20):
        self.window, self.times, self.losses, self.hits, self.images = window, [], [], [], []
        self.last = time.perf_counter()
        self.seconds = 0.0  # every step's time, not only the window's
        self.steps = 0

    def update(self, loss: float, correct: int, images: int) -> None:
        now = time.perf_counter()
        for series, value in ((self.times, now - self.last), (self.losses, loss), (self.hits, correct), (self.images, images)):
            series.append(value)
            del series[:-self.window]
        self.seconds += now - self.last
        self.last = now
        self.steps += 1

    def _timed(self) -> tuple:
        """The window's step times and images for the rates, less this meter's first step once
        others are there: the step that compiles the net (--compile: a minute, where later steps
        take milliseconds) and waits for the epoch's first batch, which would otherwise make the
        rate and the ETA of the next 20 steps many times too slow."""
        skip = int(1 < len(self.times) and self.steps <= self.window)
        return self.times[skip:], self.images[skip:]

    def restart_clock(self) -> None:
        self.last = time.perf_counter()

    @property
    def ms_per_step(self) -> float:
        times, _ = self._timed()
        return 1000 * sum(times) / max(1, len(times))

    @property
    def images_per_s(self) -> float:
        times, images = self._timed()
        return sum(images) / max(1e-9, sum(times))

    @property
    def loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    @property
    def top1(self) -> float:
        return sum(self.hits) / max(1, sum(self.images))


def peak_memory(device) -> tuple:
    """(bytes, what was measured): the CUDA allocator's peak on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "peak RSS of the rank process (getrusage)"  # Linux: KiB


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


CLEAR_LINE = "\r\033[K"  # back to the line's start, and erase it


def takes_escape_codes(stream) -> bool:
    """Whether ``stream`` is a terminal that takes escape codes: not TERM=dumb (an editor's shell)."""
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def terminal_columns() -> int:
    """The width of standard error's terminal, in characters, as it is now (a window resized
    since counts); else shutil.get_terminal_size's ($COLUMNS, standard output's terminal, 80)."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):  # no terminal's descriptor (io.UnsupportedOperation too)
        columns = 0
    return columns or shutil.get_terminal_size().columns


def console_handler(fmt: str = "%(message)s") -> logging.Handler:
    """The handler of a program's lines on standard error. On a terminal each line first
    erases the one it is written on: there, rank 0's progress bar, drawn without a line
    break, is replaced by any line that comes (a skipped image, another rank's warning, the
    launcher's error), not run into by it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CLEAR_LINE + fmt if takes_escape_codes(sys.stderr) else fmt))
    return handler


def log_warnings() -> None:
    """A library's warning (PIL's about an image it still reads, torch's) as a line of the
    log, as the program's own are: on a terminal it replaces the progress bar, not runs into
    it, and it is in train.log (a DataLoader worker's, on the console alone). Python's filters
    still decide which are shown."""
    def show(message, category, filename, lineno, file=None, line=None):
        logging.getLogger("py.warnings").warning("warning: %s (%s, %s:%d)", message, category.__name__, filename,
                                                 lineno)
    warnings.showwarning = show


class ProgressBar:
    """A one-line bar on a terminal (rank 0 only); nothing when stderr is not a terminal, or
    is one that takes no escape codes (TERM=dumb: an editor's shell), where the step lines
    alone say how far the run is. The line is cut to the terminal's width: one that wrapped
    left a row behind at each step, as the bar is redrawn on its last row alone."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and takes_escape_codes(sys.stderr)
        self.shown = False

    def show(self, done: int, total: int, text: str) -> None:
        if not self.enabled:
            return
        width = 24
        filled = min(width, int(width * done / max(1, total)))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}"
        sys.stderr.write(CLEAR_LINE + line[:max(0, terminal_columns() - 1)])  # some terminals wrap at the last column
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write(CLEAR_LINE)
            sys.stderr.flush()
            self.shown = False


class RunFolderGone(RuntimeError):
    """The run folder was moved, removed or replaced while the run trained: a save or a
    record would make it again, or write into another run's, holding half a run and no
    lock, and the run stops instead."""

    def __init__(self, folder: Path):
        super().__init__(f"{folder} is gone: it was moved, removed or replaced while the run trained. The run stops "
                         f"rather than write elsewhere than where it began, which would split it between two folders: "
                         f"where it was moved, --resume with its new place goes on from its last checkpoint (or says "
                         f"what to do instead); if it was removed, start the run again")


_RUN_FOLDERS = {}  # run folder -> a descriptor of it, opened when its run's Metrics was made, in this process


def check_run_folder(folder: Path) -> None:
    """Raises RunFolderGone unless ``folder`` is the very folder it was when its run's Metrics
    was made (any folder, for one no Metrics was made for). That one is held open, so that no
    folder made in its place can take its inode number."""
    try:
        now = os.stat(folder)
    except OSError:
        raise RunFolderGone(folder) from None
    held = _RUN_FOLDERS.get(folder)
    if not stat.S_ISDIR(now.st_mode) or (held is not None and not os.path.samestat(os.fstat(held), now)):
        raise RunFolderGone(folder)


@contextlib.contextmanager
def writing_in_run_folder(folder: Path):
    """A write into ``folder``, the run's: checked to be the run's own before it
    (check_run_folder), and an error of a folder gone meanwhile named as such."""
    check_run_folder(folder)
    try:
        yield
    except FileNotFoundError:
        check_run_folder(folder)
        raise


def summary_steps(folder: Path) -> Optional[int]:
    """The step at which the run whose summary.json ``folder`` holds ended, or None (none, or not as written)."""
    try:
        steps = json.loads((folder / "summary.json").read_bytes()).get("steps")
    except (OSError, AttributeError, *JSON_DAMAGE):
        return None
    return steps if type(steps) is int else None


def _hold_run_folder(folder: Path) -> None:
    previous = _RUN_FOLDERS.pop(folder, None)  # an earlier run's there, in this process
    if previous is not None:
        os.close(previous)
    try:
        _RUN_FOLDERS[folder] = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # none yet: any folder there will do
        pass


class Metrics:
    """metrics.jsonl: one JSON object per line, appended (a resumed run continues the file)."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        if path is not None:  # the folder it writes in, and the run's checkpoints are saved in (check_run_folder)
            _hold_run_folder(path.parent)

    def resume_at(self, step: int, **record) -> None:
        """A resumed run goes on from its checkpoint's ``step``: the records of later steps
        (a summary's: of the step it ended at), written before the run stopped or by a run
        that went on past the checkpoint resumed, and redone now, are dropped, as is a line
        cut short by the stop; a 'resume' record marks the place. So each step is in the file once, as
        the net in the checkpoint took it. The file is rewritten whole or left as it was; one
        not there yet (a checkpoint resumed in a folder of its own) is begun by the record.
        A summary.json of a later step, the copy of a summary record dropped, is removed. Raises
        RunFolderGone where the run folder is no longer the run's own (see check_run_folder)."""
        if self.path is None:
            return
        with writing_in_run_folder(self.path.parent):  # the run's own: not another's, in its place since
            ended = summary_steps(self.path.parent)  # summary.json, a copy of the last summary record: gone with it
            if ended is not None and ended > step:
                self.path.with_name("summary.json").unlink(missing_ok=True)
            if not self.path.exists():
                self.write(event="resume", step=step, **record)
                return

            def kept(line: bytes) -> bool:
                try:
                    value = json.loads(line.decode("utf-8"))
                except JSON_DAMAGE:  # a damaged line
                    return False
                at = value.get("step", value.get("steps")) if isinstance(value, dict) else None
                return type(at) is not int or at <= step

            lines = [line.decode("utf-8") + "\n" for line in self.path.read_bytes().splitlines() if kept(line)]
            lines.append(json.dumps({"time": time.time(), "event": "resume", "step": step, **record}) + "\n")
            write_whole(self.path, lambda partial: partial.write_text("".join(lines)))

    def write(self, **record) -> None:
        if self.path is not None:
            with writing_in_run_folder(self.path.parent), open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")
