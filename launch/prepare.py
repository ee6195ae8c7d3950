"""Pre-resize a raw ImageNet-layout tree to the paper's 256x256 base images, once.

    python -m launch.prepare SRC DST [--workers N] [--quality 95]

SRC holds train/CLASS/* and val/CLASS/* in any image format (.jpg .jpeg .png .bmp
.gif .webp .tif .tiff, any case, any colour mode). Every image is converted to RGB,
its shorter side rescaled to 256 and its central 256x256 patch written as a JPEG
(quality 95) to the same place under DST: a JPEG under its own name (a.jpeg: a.jpg), any
other image under its whole name with .jpg added (a.png: a.png.jpg), whatever else its
folder holds. Unreadable files are skipped and listed, also in DST/unreadable.txt (a line
per file: its path, a tab, the reason; a backslash, tab or line break within them is
written as \\\\, \\t, \\n or \\r); other files are ignored. Images in DST that no file
of SRC becomes (SRC changed since, or DST holds other images) are refused, as training
would read them. Then the training-set statistics (mean image, RGB PCA; for ImageNet's 1,000
WordNet classes the published PCA) are computed and cached in DST, as the authors did once before
training. The training program then decodes small JPEGs only, with no resizing. An interrupted
run can be restarted (the training program refuses DST until a run has written every image): files
already written (each one is written atomically) are kept, unless their image in SRC has changed
(another size or modification time, older or newer, than the image it was made from) or
--quality is another: converted again, or, no longer readable, its file in DST removed.
DST records what each file was made from (in DST/.prepare-record*); of a DST without it
(written by an earlier version) the files no older than their images in SRC are kept, as
that version decided. An image of SRC that lies in DST's train/ or val/, or a folder of DST
that lies in SRC (through a link), is refused. A DST that
cannot be written (a full disk) ends the run with one line naming it, exit code 2, and no
part of a file left in it; a worker killed (where memory runs out) ends it with one line
and exit code 1. A DST that another run is writing to is refused.
"""

from launch.cli import hold_interrupts  # torch-free

if __name__ == "__main__":
    hold_interrupts()  # a Ctrl-C during the imports below ends the program in one line

import argparse
import contextlib
import errno
import glob
import io
import json
import logging
import multiprocessing
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from PIL import Image

from launch.cli import (MAX_PROCESSES_PER_CORE, NAME_MAX, Parser, abandoned, lock_exclusively, quick_exit,
                        real_path, refuse_empty, remove_abandoned, signal_name, usable_cores, without_line_breaks,
                        write_whole)
from launch.data import (PREPARE_LOCK_NAME, UNFINISHED_NAME, DataError, Skipped, cannot_read, class_owners,
                         hold_for_reading, images_in, not_data, open_data, scan_layout, too_deep)
from launch.images import DECODE_ERRORS, load_image, skip_reason
from launch.ranks import die_with_parent

log = logging.getLogger(__name__)


def _convert(job):
    """(source, error message or None): writes the base image of ``source`` to ``target``, then
    adds what it was made from to this worker's part of DST's record (see read_record). A
    source that cannot be read leaves no base image: a file made of it before is removed."""
    source, target, quality, (dst, key, made_from) = job
    try:
        pixels = load_image(source)
    except DECODE_ERRORS as exc:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(target).st_mode):  # made of what the image was: not SRC's image now
                os.unlink(target)
        return source, skip_reason(source, exc)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=quality)
    # A full disk, Ctrl-C, the pool ended: no part of an image is left in DST. Written by
    # Python, which raises where a disk takes a part of the bytes (Pillow's own writes to a
    # file do not: an image cut short would be kept, and counted as done by the next run).
    write_whole(Path(target), lambda partial: partial.write_bytes(jpeg.getbuffer()))
    # Recorded here, as it is written (not by the program, which hears of a CHUNK at a time):
    # an interrupted run's images are kept. Stopped before this line, the image is made again.
    global _record_part
    if _record_part is None:  # opened once, each line handed to the system as it is written
        _record_part = open(Path(dst, f"{RECORD_NAME}-{os.getpid()}"), "a", buffering=1)
    _record_part.write(json.dumps([key, *made_from]) + "\n")
    return source, None


_record_part = None  # in a worker: its own part of DST's record (see read_record), open for its life


def _end_quietly(signum, frame):
    raise SystemExit(1)


def _worker_start(program_pid: int) -> None:
    """The pool ends its workers with SIGTERM, the one writing an image too (once one has
    failed, or the program is interrupted): a worker takes it as an exception, so that
    ``_convert`` removes what it wrote. A terminal's Ctrl-C, which reaches the workers too, is
    left to the program, which ends them so. The program killed (SIGKILL), the kernel sends
    the workers SIGTERM: none goes on converting, holding the lock on DST it was forked with."""
    signal.signal(signal.SIGTERM, _end_quietly)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING)  # held by _pool while it forked this worker
    die_with_parent(program_pid)


STOPPING = {signal.SIGINT, signal.SIGTERM}


CHUNK = 16  # the images a worker is given at a time
RECORD_NAME = ".prepare-record"  # in DST: what each of its images was made from (and -PID: a worker's part)
WORKER_GRACE_S = 10  # for a worker told to end (SIGTERM) to do so, before it is killed


class WorkerEnded(Exception):
    """A worker of the pool ended before the work was done (killed: the work it had is lost)."""


@contextlib.contextmanager
def _pool(workers: int):
    """(a Pool of ``workers`` processes, those processes), the pool ended with the block (told
    to end, SIGTERM), the block ended however. Its end cannot wait for good: a worker still
    there WORKER_GRACE_S seconds after being told to end is killed (SIGKILL). A worker waiting
    for work has been seen to outlive SIGTERM, which left the Pool's end waiting for it; and
    the Pool's end waits for good on a lock that a killed worker held: it is given as long,
    and then left to the program's exit."""
    others = set(multiprocessing.active_children())  # a caller's own processes, never the pool's
    # Ctrl-C and SIGTERM held while the pool forks its workers: one that came then reached this
    # process inside a fork's callback (logging's), where Python ignores it (a traceback, and
    # the run went on to exit 0), or a worker before it had its handlers. Each worker takes
    # them again once it has (_worker_start); this process, with the pool made, below.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
    try:
        pool = multiprocessing.Pool(workers, initializer=_worker_start, initargs=(os.getpid(),))
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    try:
        processes = set(multiprocessing.active_children()) - others
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C held meanwhile is raised here: the pool ends
        yield pool, processes
    finally:
        backstop = threading.Timer(WORKER_GRACE_S, _kill_the_rest, [others])
        backstop.daemon = True
        backstop.start()
        # Interrupted (a second Ctrl-C), the backstop stays: the exit's own end of the pool waits on the workers.
        if not _within(2 * WORKER_GRACE_S, pool.terminate):
            log.warning("the worker pool did not end %d s after being told to: left to the program's exit",
                        2 * WORKER_GRACE_S)
        backstop.cancel()


def _within(seconds: float, call) -> bool:
    """``call()`` in a thread of its own, waited for ``seconds`` at most: whether it returned
    (if not, it is left to the program's exit)."""
    thread = threading.Thread(target=call, name=getattr(call, "__name__", None), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def _convert_chunk(jobs: list) -> list:
    return [_convert(job) for job in jobs]


def _results(pool, workers: set, jobs: list):
    """``_convert`` of each job by the ``pool``, CHUNK jobs at a time, as they come. Raises
    WorkerEnded where one of the pool's ``workers`` has ended before the last: the Pool would
    wait for good for the work it had (it starts another worker, and never gives that work to it)."""
    results = pool.imap_unordered(_convert_chunk, [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)])
    while True:
        try:
            yield from results.next(timeout=1)
        except StopIteration:
            return
        except multiprocessing.TimeoutError:
            ended = sorted((p for p in workers if p.exitcode is not None), key=lambda p: p.pid)
            if ended:
                raise WorkerEnded(ended[0]) from None


def _worker_ended(process) -> str:
    code = process.exitcode
    how = f"killed by {signal_name(-code)}" if code < 0 else f"exit code {code}"
    return (f"error: a worker (process {process.pid}) ended before the images were converted ({how}: by the system "
            f"where memory runs out, or by hand), and what it was converting is lost: run the same command again to "
            f"convert the rest (with fewer --workers where memory is short); the images written so far are kept, "
            f"each one whole")


def _kill_the_rest(others: set) -> None:
    for process in set(multiprocessing.active_children()) - others:  # the pool's workers, replacements included
        if process.exitcode is None:  # not ended yet, so its id is still its own
            log.warning("a worker (process %d) did not end %d s after being told to: killed", process.pid,
                        WORKER_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


_FIXES = {errno.EACCES: "make it writable", errno.EPERM: "make it writable", errno.EROFS: "make it writable",
          errno.ENOTDIR: "make it a folder", errno.EEXIST: "make it a folder", errno.ENOSPC: "free space on its disk",
          errno.EDQUOT: "free space on its disk", errno.EFBIG: "raise the limit on the size of a file (ulimit -f)"}


def _cannot_write(dst: Path, exc: OSError) -> str:
    """The error line of a write in DST that failed: what is in the way (a file where a class
    folder goes, a folder that is read-only) named where it is not DST itself."""
    long = exc.errno == errno.ENAMETOOLONG and next((p for p in dst.parts if len(os.fsencode(p)) > NAME_MAX), None)
    if long:  # a name of DST's own too long: not the folder above it, where it was to be made
        return (f"error: cannot write DST {dst}: a name in it, {long[:24]}..., is longer than a file name can be "
                f"({NAME_MAX} bytes): give a DST of shorter names")
    fix = f"{_FIXES[exc.errno]}, or give" if exc.errno in _FIXES else "give"  # such as a folder that cannot be made
    path = exc.filename
    if exc.errno == errno.ENOTDIR and path:  # a path through a file: that file is in the way
        path = next((p for p in Path(path).parents if os.path.lexists(p) and not p.is_dir()), path)
    elif path and not os.path.lexists(path):  # a file not made (a partial image): the folder it goes in
        path = os.path.dirname(path)
    where = f"to DST {dst}" if not path or Path(path) == dst else \
        f"{path} on the way to DST {dst}" if Path(path) in dst.parents else f"{path} in DST {dst}"
    return (f"error: cannot write {where} ({exc.strerror or exc}): {fix} a DST that can be written; "
            f"run again, and the images already written are kept")


def target_name(relative: Path) -> Path:
    """Where the base image of ``relative`` (a path in a class folder of SRC) goes in the class
    folder of DST: a JPEG keeps its name (with .jpg), any other image's whole name gets .jpg, so
    that a.png beside a.jpg has a name of its own. It depends on the name alone: a restarted
    run finds the files of the last one, however SRC has changed since."""
    if relative.suffix.lower() in (".jpg", ".jpeg"):
        return relative.with_suffix(".jpg")
    return relative.with_name(f"{relative.name}.jpg")


def planned_targets(src: Path, dst: Path) -> dict:
    """{file in DST: (image of SRC it is made from, (its size, its modification time in ns))}
    for every image of SRC. Raises DataError where two images of SRC would be written to one
    file, where an image of SRC lies in DST's train/ or val/ (through a link): each run would
    add copies of DST's images to it, or where a folder of DST lies in SRC, or is (or holds)
    a folder that SRC's images really are in (through links): the images would be written over
    SRC's. Reads nothing in DST but where its folders lead."""
    classes, files, skipped = scan_layout(src, builtin_alternative=False)  # SRC is required
    for split in ("train", "val"):
        skipped[split].report(split)  # what is not converted
    planned, real_folders = {}, {}  # target -> (source, (size, mtime)); folder -> its real path
    writes_in = [os.path.realpath(dst / split) for split in ("train", "val")]
    for split, place in zip(("train", "val"), writes_in):
        if os.path.commonpath([place, src]) == str(src):
            raise DataError(f"DST's {split}/ {dst / split} is {place}, in SRC {src}: the images would be written "
                            f"into SRC. Remove that link, or give another DST")
    for split in ("train", "val"):
        for name, images in zip(classes, files[split]):
            for path, size_mtime in images:
                folder, file_name = os.path.split(path)
                if folder not in real_folders:
                    real_folders[folder] = os.path.realpath(folder)
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_folders[folder], file_name)
                if any(os.path.commonpath([real, place]) == place for place in writes_in):
                    raise DataError(f"{path} is {real}, an image that this program writes in DST: remove the link "
                                    f"to it from SRC, or give another DST")
                target = dst / split / name / target_name(Path(path).relative_to(src / split / name))
                if len(os.fsencode(target.name)) > NAME_MAX:  # a.png of 252 bytes: a.png.jpg
                    raise DataError(f"{path}: its base image's name in DST, {target.name}, would be longer than a "
                                    f"file name can be ({NAME_MAX} bytes): give it a shorter name in SRC")
                if target in planned:  # such as a.jpg and a.JPEG, or a.png and a.png.jpg
                    raise DataError(f"{planned[target][0]} and {path} would both be written to {target}: rename "
                                    f"one of them in SRC")
                planned[target] = path, tuple(size_mtime)
    folders = {}  # a file of DST that is also a folder of others: a.jpeg (as a.jpg) beside a folder a.jpg/
    for target, (path, _) in planned.items():
        for folder in target.parents:
            if folder == dst:
                break
            folders.setdefault(folder, path)
    for target, (path, _) in planned.items():
        if target in folders:
            raise DataError(f"{path} would be written to {target}, which {folders[target]} needs as a folder: rename "
                            f"one of them in SRC")
    # A class folder of DST that is a link into SRC, or to where SRC's (linked) class folders
    # lead, such as /data/train/a for both: its images would be written over SRC's own.
    sources = set(real_folders.values()) | {os.path.dirname(os.path.realpath(path)) for path, _ in planned.values()
                                            if os.path.islink(path)}
    holding = {str(up) for folder in sources for up in (Path(folder), *Path(folder).parents)}
    for folder in folders:
        real = os.path.realpath(folder)
        if os.path.commonpath([real, src]) == str(src) or real in holding \
                or any(str(up) in sources for up in Path(real).parents):
            raise DataError(f"{folder} in DST is {real}, where SRC's images are: they would be written over. "
                            f"Remove that link, or give another DST")
    return planned


def plan_jobs(dst: Path, planned: dict, quality: int, made_from: Optional[dict]):
    """(jobs still to do, the records of those already done) of the ``planned`` targets, their
    folders made in DST. Raises DataError where DST holds images that no image of SRC becomes. A target is
    done where it is a file (not a link) that ``made_from`` (read_record) says was made from
    its source as it is now (size and modification time, see _same_source: a source replaced
    by another of any date, a copy's older one too, is converted again; not its content, as
    make does not) and at this ``quality``. ``made_from`` None (a DST of an
    earlier version, which kept no record): done where no older than its source, to the second,
    as that version decided. A job is (source, target, quality, (DST, its record's key and value))."""
    _remove_abandoned_partials(planned)
    try:
        stray = _stray_images(dst, planned)
    except RecursionError:  # os.walk recurses, before Python 3.12
        raise too_deep(dst) from None
    except OSError as exc:  # a folder of DST that cannot be read: not one that cannot be written
        raise cannot_read(exc, dst) from None
    if stray:
        raise DataError(f"DST {dst} holds {len(stray)} image(s) that no image of SRC becomes, such as {stray[0]} "
                        f"(SRC has changed since they were written, or DST holds other images): the training "
                        f"program would read them as data. Remove them, or give a new DST, and run again")
    jobs, done, dst_text = [], {}, str(dst)
    for target, (path, (size, mtime_ns)) in planned.items():
        key, value = target.relative_to(dst).as_posix(), (os.path.basename(path), size, mtime_ns, quality)
        try:
            status = os.lstat(target)
        except FileNotFoundError:
            status = None
        made = status is not None and stat.S_ISREG(status.st_mode)
        if made and (_same_source(made_from.get(key), value) if made_from is not None
                     else status.st_mtime_ns // 10**9 >= mtime_ns // 10**9):
            done[key] = value
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((path, str(target), quality, (dst_text, key, value)))
    return jobs, done


def _same_source(recorded: Optional[tuple], now: tuple) -> bool:
    """Whether the record of an image of DST, (its source's name, size, modification time in
    ns, quality), is of its source as it is ``now``: a time that lost its fraction of a second
    (a copy by tar, which keeps whole seconds) is compared to the second, so that an unchanged
    tree copied so is not converted again. (A copy onto FAT, which keeps even seconds, or one
    that keeps microseconds is converted again: slower, never wrong.)"""
    if recorded is None or len(recorded) != len(now):
        return False
    (name, size, ns, quality), (name_now, size_now, ns_now, quality_now) = recorded, now
    if type(ns) is not int:  # a line edited by hand
        return False
    whole = ns % 10**9 == 0 or ns_now % 10**9 == 0
    return (name, size, quality) == (name_now, size_now, quality_now) and \
        (ns // 10**9 == ns_now // 10**9 if whole else ns == ns_now)


def read_record(dst: Path):
    """({file of DST relative to it: [name of its source, its size, its modification time in
    ns, quality]}, the files of DST's record, or [] where there is none). The record is a JSON
    array a line, in DST/RECORD_NAME and in a file of each worker that wrote images since it
    was last rewritten (RECORD_NAME-PID, a line added once its image is whole: its own, as
    two processes' writes to one file may mix); each run (holding DST's lock) that converts
    rewrites it whole, first and last. A line cut short (the program killed as it wrote it) is
    skipped: its image is converted again. No record: a new DST, or an earlier version's."""
    parts = sorted(dst.glob(f"{glob.escape(RECORD_NAME)}-*"))  # all written since DST/RECORD_NAME was
    parts = [dst / RECORD_NAME, *parts] if (dst / RECORD_NAME).exists() else parts
    made_from = {}
    for part in parts:
        if not stat.S_ISREG(os.lstat(part).st_mode):  # a FIFO would be waited on for good
            raise DataError(f"{part} is not a file, where DST keeps its record of what its images were made from: "
                            f"remove it, and run again")
        for line in part.read_bytes().split(b"\n"):
            with contextlib.suppress(ValueError, TypeError, RecursionError):  # a line damaged or edited by hand
                key, *value = json.loads(line)
                made_from[key] = tuple(value)
    return made_from, parts


def _rewrite_record(dst: Path, made_from: dict, parts: list) -> None:
    """DST's record rewritten whole to hold ``made_from`` alone, in one file: its ``parts`` merged."""
    def write(partial: Path) -> None:
        with open(partial, "w") as record:  # a line at a time: ImageNet's is 1.3 million of them
            record.writelines(json.dumps([key, *value]) + "\n" for key, value in made_from.items())

    write_whole(dst / RECORD_NAME, write)
    for part in parts:
        if part.name != RECORD_NAME:
            part.unlink()


def _stray_images(dst: Path, planned: dict) -> list:
    """The images in DST's class folders that are not in ``planned``, sorted: those that the
    training program would read, found as it finds them (data.images_in: through folder
    links, each real file once, none reached in another class's folder). One that is an
    image planned in its split under another path (through a link) is not one."""
    stray = []
    for split in ("train", "val"):
        if not (dst / split).is_dir():
            continue
        names = sorted(e.name for e in os.scandir(dst / split) if e.is_dir() and not not_data(e.name))
        owners, seen, planned_real = class_owners(dst / split, names), set(), None
        for name in names:
            for path, _ in images_in(dst / split / name, name, owners, seen, Skipped(), set()):
                if Path(path) in planned:
                    continue
                if planned_real is None:
                    planned_real = {os.path.realpath(t) for t in planned if t.parts[len(dst.parts)] == split}
                if os.path.realpath(path) not in planned_real:
                    stray.append(Path(path))
    return sorted(stray)


def _remove_abandoned_partials(planned: dict) -> None:
    """Removes the hidden partial images that the workers of a run that was killed left beside
    the images planned (write_whole's ".NAME.partial-PID", NAME shortened where the whole name
    would be too long), where it can; no other file."""
    targets = {}  # folder -> the names of the images planned in it
    for target in planned:
        targets.setdefault(target.parent, set()).add(target.name)
    for folder, names in targets.items():
        try:
            hidden = [e.name for e in os.scandir(folder) if e.name.startswith(".") and ".partial-" in e.name]
        except OSError:  # not made yet, or not readable: the scan of DST says so
            continue
        for name in hidden:
            base, _, pid = name[1:].rpartition(".partial-")
            ours = base in names or (len(os.fsencode(name)) == NAME_MAX  # cut by bytes, within a character perhaps
                                     and any(os.fsencode(n).startswith(os.fsencode(base)) for n in names))
            if ours and pid.isdigit() and abandoned(pid):
                with contextlib.suppress(OSError):  # a DST this run cannot write: it is read as it is
                    os.unlink(os.path.join(folder, name))


def main(argv=None) -> int:
    parser = Parser(prog="python -m launch.prepare", description=__doc__.split("\n\n", 2)[2],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    # Not type=Path, which makes "" the current folder: an empty variable ($DST unset) would write there.
    parser.add_argument("src", metavar="SRC", help="raw tree with train/CLASS/ and val/CLASS/ folders")
    parser.add_argument("dst", metavar="DST", help="where the 256x256 JPEGs go (same layout)")
    parser.add_argument("--workers", type=int, default=usable_cores(),
                        help="processes that decode and resize (default: one per CPU core it may use)")
    parser.add_argument("--quality", type=int, default=95,
                        help="JPEG quality of the written images (default: 95); run again with another, the images "
                             "of DST made at the last one are converted again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cores = usable_cores()
    if not 1 <= args.workers <= MAX_PROCESSES_PER_CORE * cores:
        parser.error(f"--workers must be 1 to {MAX_PROCESSES_PER_CORE * cores} ({MAX_PROCESSES_PER_CORE} processes for "
                     f"each of the {cores} cores it may use: more only thrash the machine), got {args.workers}")
    if not 1 <= args.quality <= 100:  # Pillow would clamp it to 1 or 100, silently
        parser.error(f"--quality must be 1 to 100 (JPEG's scale; default 95), got {args.quality}")
    try:
        refuse_empty(SRC=args.src, DST=args.dst)
        src, dst = real_path(args.src), real_path(args.dst)
    except ValueError as exc:
        parser.error(str(exc))
    if dst == src or src in dst.parents:
        parser.error(f"DST {dst} must lie outside SRC {src}")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C
    try:
        return _prepare(src, dst, args.workers, args.quality)
    except KeyboardInterrupt:
        print("interrupted: the images written so far are kept, each one whole; run the same command again to go on",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(src: Path, dst: Path, workers: int, quality: int) -> int:
    try:
        planned = planned_targets(src, dst)
    except DataError as exc:  # a bad SRC
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lock = contextlib.nullcontext()
    try:
        dst.mkdir(parents=True, exist_ok=True)
        lock = lock_exclusively(dst / PREPARE_LOCK_NAME, read_only=True)
    except BlockingIOError as exc:
        try:  # a shared lock is taken where the holders are training runs reading DST
            reading = hold_for_reading(dst)
        except DataError:
            reading = None
        if reading is not None:
            reading.close()
            print(f"error: DST {dst} is being read by a training run (python -m launch.two_gpu): wait for it to end, "
                  f"or give another DST", file=sys.stderr)
        else:
            print(f"error: DST {dst} is being written by another launch.prepare ({exc}): wait for it to end, or give "
                  f"another DST", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            log.warning("DST %s is on a file system without locks (%s): a second run into it at once would not be "
                        "refused", dst, exc.strerror)
        elif exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not dst.is_dir():
            print(_cannot_write(dst, exc), file=sys.stderr)
            return 2
        # else a DST that this run cannot write to, where it has nothing to lock: it may hold every
        # image already (another user's); a write it needs fails, and says so
    with lock:  # what DST holds is then this run's to read and change
        return _write(src, dst, planned, workers, quality)


def _write(src: Path, dst: Path, planned: dict, workers: int, quality: int) -> int:
    try:
        remove_abandoned(dst, f".{RECORD_NAME}.partial-")  # a rewrite of the record killed (ImageNet's: 100 MB)
        made_from, parts = read_record(dst)
        jobs, kept = plan_jobs(dst, planned, quality, made_from if parts else None)
        done = len(kept)
    except DataError as exc:  # images in DST that are not SRC's, a record that is not a file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # its folders (or its record) cannot be made (or read) in DST
        print(_cannot_write(dst, exc), file=sys.stderr)
        return 2
    total = len(jobs) + done
    log.info("%d images in %s: %d to convert, %d already in %s", total, src, len(jobs), done, dst)
    if not parts and kept:
        # An earlier version's DST, which kept no record: its images are taken as that version
        # took them (by date), not all made again (hours for ImageNet), and recorded so.
        log.warning("DST %s holds no record of what its images were made from (an earlier version wrote them): "
                    "the %d no older than their images in SRC are kept, as that version decided; if SRC's images "
                    "were replaced by older ones since, or --quality was another, remove DST and run again", dst,
                    len(kept))
    requality = sum(key in made_from and made_from[key][3:] != value[3:]
                    and _same_source(made_from[key][:3] + value[3:], value) for *_, (_, key, value) in jobs)
    if requality:
        log.warning("%d images in DST were made at another --quality: converted again at %d", requality, quality)
    unfinished = dst / UNFINISHED_NAME  # the training program refuses DST while it is there
    if jobs:
        with contextlib.suppress(OSError):  # a DST that cannot be written: its writes fail, and say so
            unfinished.touch()
    try:
        # The record of the images to be made again goes before they are: a run stopped
        # between an image's write and its record's never takes the image for the one before.
        # A finished DST (no jobs, or unreadable files alone: nothing to change in the record)
        # is read alone: it may be on a disk this run cannot write to.
        if jobs and (kept != made_from or not parts):  # a new DST too: a record, even empty, says it is this
            _rewrite_record(dst, kept, parts)  # version's (killed before its first line, it is not taken for older)
        elif not parts and kept:  # an earlier version's finished DST: recorded, where it can be written
            with contextlib.suppress(OSError):
                _rewrite_record(dst, kept, parts)
        unreadable = _convert_jobs(jobs, workers)
        if jobs and len(unreadable) < len(jobs):  # the workers' parts merged: the next run reads one file
            _rewrite_record(dst, *read_record(dst))
    except OSError as exc:  # a write (reads that fail are skipped)
        print(_cannot_write(dst, exc), file=sys.stderr)
        return 2
    except WorkerEnded as exc:
        print(_worker_ended(exc.args[0]), file=sys.stderr)
        return 1
    listing = dst / "unreadable.txt"  # of this run: the files of SRC that are not in DST
    # A name as SRC's folder spells it, in whatever bytes. A DST that holds this list already
    # is left as it is: it may be on a disk this run cannot write to (another user's, done).
    listed = "".join(f"{_escaped(source)}\t{_escaped(error)}\n" for source, error in unreadable).encode(
        "utf-8", "surrogateescape")
    try:
        if unreadable and not (listing.is_file() and listing.read_bytes() == listed):
            write_whole(listing, lambda partial: partial.write_bytes(listed))
        elif not unreadable and os.path.lexists(listing):
            listing.unlink()
        if os.path.lexists(unfinished):  # every image written (a run stopped after that has nothing left to do)
            unfinished.unlink()
    except OSError as exc:
        print(_cannot_write(dst, exc), file=sys.stderr)
        return 2
    if unreadable:
        log.warning("%d files skipped (unreadable or refused); listed in %s", len(unreadable), listing)
    try:
        bundle = open_data(dst, builtin_alternative=False)
    except DataError as exc:  # such as a class whose every image is unreadable
        print(f"error: the prepared tree cannot be used: {exc}", file=sys.stderr)
        return 2
    log.info("%s", bundle.describe())
    return 0


def _escaped(text: str) -> str:
    """``text`` on one line of unreadable.txt, its fields' separator (a tab) escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _convert_jobs(jobs: list, workers: int) -> list:
    """Converts the images of ``jobs`` in a pool of at most ``workers`` processes; returns the
    (source, reason) of those it skipped, sorted: the pool's order is chance, and a run again
    lists them as the last did, byte for byte. Raises OSError (a write) or WorkerEnded, once
    the pool has ended, so that the error told is the program's last line."""
    unreadable, start = [], time.monotonic()
    if not jobs:
        return unreadable
    with _pool(min(workers, -(-len(jobs) // CHUNK))) as (pool, processes):  # no more workers than chunks of work
        for count, (source, error) in enumerate(_results(pool, processes, jobs), 1):
            if error is not None:
                unreadable.append((source, error))
                log.warning("skipped %s", without_line_breaks(error))  # a name's newline would start a line
            if count % 1000 == 0 or count == len(jobs):
                rate = count / max(time.monotonic() - start, 1e-9)
                log.info("%d/%d done: %d converted, %d skipped (%.0f images/s)", count, len(jobs),
                         count - len(unreadable), len(unreadable), rate)
        # Done: the workers end by themselves. Ending them with SIGTERM (the block's end) while
        # they wait for work can leave one waiting for good (see _pool). But where one was killed
        # as it waited for work, holding the lock on the work's queue, the others wait for that
        # lock for good: the block's end then ends them, within bounds.
        pool.close()
        _within(2 * WORKER_GRACE_S, pool.join)
    return sorted(unreadable)


if __name__ == "__main__":
    with quick_exit():
        sys.exit(main())
