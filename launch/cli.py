"""Command lines generated from dataclasses: one field, one option, the field's
``help`` its documentation; how a command-line program writes its files and how it
ends; whether this machine can compile with the backend an option names. Used by the
training program, its tools and the benchmarks alike."""

import argparse
import atexit
import contextlib
import dataclasses
import errno
import fcntl
import glob
import os
import shlex
import shutil
import signal
import socket
import stat
import sys
import sysconfig
import tempfile
import threading
import typing
import unicodedata
from dataclasses import field
from pathlib import Path


# What json.loads raises for a damaged file or line: text that is not JSON (or not UTF-8: a
# UnicodeDecodeError), or arrays nested deeper than the decoder can follow.
JSON_DAMAGE = (ValueError, RecursionError)
MAX_PROCESSES_PER_CORE = 4  # ranks or loaders (--workers): beyond this many per core they only thrash the machine
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # those check_compile_backend can vouch for


def temporary_folder() -> str:
    """``tempfile.gettempdir()``, or ValueError naming the fix where no folder it tries can be
    written (a read-only container: the processes' sockets, matplotlib and torch need one)."""
    try:
        return tempfile.gettempdir()
    except FileNotFoundError:  # TMPDIR, TEMP, TMP, /tmp, /var/tmp, /usr/tmp and the current folder: none writable
        raise ValueError("no temporary folder can be written here (TMPDIR, /tmp, /var/tmp, /usr/tmp and the current "
                         "folder were tried): set TMPDIR to a folder this user can write (in a read-only container, "
                         "a writable volume)") from None


def usable_cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's limit, where the OS says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def signal_name(number: int) -> str:
    """"SIGKILL" for 9; "signal 40" for a real-time signal, which has no name of its own."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def refuse_empty(**paths) -> None:
    """Raises ValueError naming the fix for a path given as "" (an unset "$VARIABLE"), which
    Path takes for the current folder, where the program would read or write. ``paths``: an
    option's by its field name (out: --out), a positional argument's by its name in capitals."""
    for name, value in paths.items():
        if value != "":
            continue
        if name.isupper():
            raise ValueError(f"{name} is empty: give a path (. for the current folder)")
        raise ValueError(f"--{name.replace('_', '-')} is empty: give a value, or leave the option out")


def home_path(text) -> Path:
    """A path given by the user, its ``~`` or ``~user`` the home folder as the shell expands it.
    Raises ValueError for a ``~user`` that names no user here (Path.expanduser raises
    RuntimeError; the shell keeps it as written, and a folder of that name would be made)."""
    expanded = os.path.expanduser(text)
    if os.fspath(text).startswith("~") and expanded == os.fspath(text):
        user = os.fspath(text)[1:].partition("/")[0]
        raise ValueError(f"{os.fspath(text)}: {'~' + user if user else '~'} names no home folder here (no such user"
                         f"{'' if user else ', and HOME is not set'}): give the path in full")
    return Path(expanded)


def real_path(text) -> Path:
    """``home_path(text)`` made absolute, with its symbolic links followed as far as they lead:
    a loop of links is left for the first use to refuse (Path.resolve raises RuntimeError for
    it before Python 3.13)."""
    return Path(os.path.realpath(home_path(text)))


def lock_folder(folder: Path) -> tuple:
    """(descriptor, None), or (descriptor, the OSError) on a file system without locks: an
    exclusive lock on ``folder`` itself (no file is made in it) until the descriptor is closed,
    released by the system however the process ends; not inherited by the processes it starts.
    Raises BlockingIOError where another process holds it, OSError where it cannot be opened."""
    opened = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(opened, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(opened)
        raise
    except OSError as error:  # some network and FUSE file systems
        return opened, error
    return opened, None


def open_lock_file(path: Path, flags: int) -> int:
    """The descriptor of the lock file ``path``, opened with ``flags`` without waiting (not
    open(): on a pipe it waits for a writer, or fails without a strerror); OSError where it is
    not a file, with nothing to lock nor to name the holder in."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path.name} there is not a file but a pipe, a device or a socket", str(path))
    return fd


def lock_exclusively(path: Path, read_only: bool = False):
    """An exclusive lock on the file ``path`` (made where missing), held while the returned
    file stays open and released by the system when this process ends, however it ends. The
    file names its holder. Raises BlockingIOError, whose message names the holder, where
    another process holds it; OSError where the file cannot be made or locked. ``read_only``:
    a file this process may only read (another user's) is locked too, without its name."""
    try:
        fd, mode = open_lock_file(path, os.O_RDWR | os.O_CREAT), "r+"
    except PermissionError:
        if not (read_only and path.is_file()):
            raise
        fd, mode = open_lock_file(path, os.O_RDONLY), "r"
    lock = open(fd, mode)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise BlockingIOError(holder) from None
    except OSError:
        lock.close()
        raise
    if not lock.writable():
        return lock
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def option(default, help: str, *, many: bool = False, **argparse_kwargs):
    """A dataclass field that is also the command-line option ``--field-name``.
    ``many``: a comma-separated list (``type`` and ``choices`` then apply to each item).
    The rest goes to ``add_argument``; ``type`` is inferred from the annotation if not given."""
    return field(default=default, metadata={"help": help, "many": many, **argparse_kwargs})


def repeated(values: list):
    """The first of ``values`` that an earlier one equals, or None."""
    return next((v for i, v in enumerate(values) if v in values[:i]), None)


def comma_list(item_type=str, choices=None):
    """An argparse type: 'a,b,c' -> a tuple of ``item_type``, each once, each one of ``choices`` if given."""
    def parse(text):
        values = [item_type(v.strip()) for v in text.split(",") if v.strip()]
        if not values or any(choices and v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                             f"{', '.join(map(str, choices or ['values']))}; got {text!r}")
        twice = repeated(values)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{text!r} names {twice} twice: give each once")
        return tuple(values)
    return parse


class Parser(argparse.ArgumentParser):
    """argparse's parser whose refusal of a command line is one line naming the fix, as every
    other error of the programs is (exit code 2), not argparse's usage block above it."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One option per field of ``config_class``, each defaulting to the field's default."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kwargs = dict(f.metadata)
        many = kwargs.pop("many")
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Union:  # Optional[X] -> X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if kwargs.get("action") is argparse.BooleanOptionalAction:
            kwargs["help"] += f" (default: {'on' if f.default else 'off'})"
        elif "action" not in kwargs:
            if f.default is not None:
                shown = ("," if many else " ").join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                kwargs["help"] += f" (default: {shown if shown != '' else 'none'})"
            if many:
                kwargs["type"] = comma_list(kwargs.pop("type", str), kwargs.pop("choices", None))
                kwargs.setdefault("metavar", "A,B,...")
            else:
                kwargs.setdefault("type", hint)
                kwargs.setdefault("metavar", None if hint is str and "choices" in kwargs else f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, **kwargs)


def _of_kind(value, hint) -> bool:
    """Whether ``value``, as JSON or torch.save keeps it, is of the type ``hint`` (a float may be saved as an int)."""
    if typing.get_origin(hint) is typing.Union:
        return any(_of_kind(value, a) for a in typing.get_args(hint))
    if hint is float:
        return type(value) in (int, float)
    if hint is tuple:  # lists of whole numbers, as the options that take several give them
        return isinstance(value, (list, tuple)) and all(type(v) is int for v in value)
    return type(value) is hint


def values_refused(record: dict, config_class) -> list:
    """What a record of ``config_class``'s fields, read back from a file, holds that no
    instance would: a value of another type than its field's, or outside its choices, each
    as 'name=value'. Fields the class lacks are left to the caller."""
    hints = typing.get_type_hints(config_class)
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config_class)}
    return [f"{name}={value!r}" for name, value in record.items() if name in hints and not (
            _of_kind(value, hints[name]) and (value is None or choices[name] is None or value in choices[name]))]


def shell_word(path) -> str:
    """``path`` as a shell reads it back, for a command that a message suggests."""
    return shlex.quote(str(path))


LINE_BREAKING = ("Cc", "Zl", "Zp")  # Unicode categories: control characters, line and paragraph separators


def without_line_breaks(text: str) -> str:
    """``text`` with each character that would break it into lines (a control character, a
    line or paragraph separator: in a name within it) escaped as Python writes it ("\\n")."""
    if not any(unicodedata.category(c) in LINE_BREAKING for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in LINE_BREAKING else c
                   for c in text)


def one_line(name: str) -> str:
    """``name`` as is, or, where it holds a control character or a line separator (a newline
    would break a block into lines that read as others'), in the shell's $'...' quoting, which
    reads back as the name."""
    if not any(unicodedata.category(c) in LINE_BREAKING for c in name):
        return name
    escapes = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return "$'" + "".join(escapes.get(c) or (c if unicodedata.category(c) not in LINE_BREAKING else
                                             f"\\x{ord(c):02x}" if ord(c) < 0x80 else f"\\u{ord(c):04x}")
                          for c in name) + "'"


def prints_plainly(name: str) -> bool:
    """Whether ``name`` shows as what it is: every character prints (no zero-width or
    no-break space, no soft hyphen), and no space at an end."""
    return name.isprintable() and name == name.strip()


def abandoned(owner: str) -> bool:
    """Whether the temporary file or folder of the work named by ``owner`` ("HOST-PID", or
    "PID" as earlier versions named a checkpoint's) was left by work that was killed: on this
    machine, by a process that has ended (or has this process's id, whose own work reuses
    the name). Another live process's, such as that of a run caching the same statistics,
    is left alone, and so is any made on another machine."""
    host, dash, pid = owner.rpartition("-")
    if (dash and host != socket.gethostname()) or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # such as EPERM: another user's live process
        return False
    return os.path.isdir(f"/proc/{pid}") and not alive(int(pid))  # Linux: a zombie has ended


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux: not gone, nor a zombie, dead and not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


NAME_MAX = 255  # bytes in one file name, on the file systems of Linux and macOS


def write_whole(path: Path, write) -> None:
    """``write(partial)``, then ``partial`` (a hidden file beside ``path``) renamed over ``path``:
    the file is whole or not there, even where the disk fills up while it is written, or the
    writer is stopped (the error is raised, and the partial file removed). The partial file
    is named after ``path``, shortened where the name would be too long for the folder."""
    suffix = f".partial-{os.getpid()}"
    name = f".{path.name}{suffix}"
    if len(os.fsencode(name)) > NAME_MAX:
        name = f".{os.fsdecode(os.fsencode(path.name)[:NAME_MAX - 1 - len(suffix)])}{suffix}"
    partial = path.with_name(name)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def not_there(path) -> typing.Optional[str]:
    """Why ``path`` is not there to be used: "does not exist", or what stands in the way (a link
    to nothing, a link that loops, a folder on the way that cannot be entered); None where it is."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return "is a link to nothing" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    return None


def make_folder(folder: Path, made: list) -> None:
    """Makes ``folder`` and the parents it lacks, adding to ``made`` each that this call made,
    parents first (not one that another process made meanwhile), those made before an OSError
    too; an OSError also where ``folder`` is there but not a folder."""
    for level in reversed((folder, *folder.parents)):
        if not os.path.lexists(level):
            try:
                level.mkdir()
            except FileExistsError:  # made meanwhile
                continue
            made.append(level)
    if not os.path.isdir(folder):  # a file in its place
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))


def remove_made(made: list) -> None:
    """Removes the folders that make_folder made (``made``, for one folder or more), each before
    its parent, where they are empty: one that holds something stays, and so do its parents."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):  # gone, or not empty
            folder.rmdir()


class OutputFailed(Exception):
    """The standard output could not take what was written to it (a full disk, a file too
    large), where its reader is still there; the message names the fix."""


def reader_gone() -> int:
    """After a BrokenPipeError of the standard output (the reader went away: | head): the exit
    code of a tool killed by SIGPIPE, which ends silently, nothing left to flush at the exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def write_out(data: bytes) -> None:
    """``data`` written to the standard output, as bytes (a file name need not be UTF-8),
    and flushed. Raises BrokenPipeError where the reader went away (| head), OutputFailed
    where the output cannot take it."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputFailed(f"cannot write to the standard output ({exc.strerror or exc}): free space on the disk "
                           f"it goes to, or send it elsewhere") from None


_held_interrupts = []


def remove_abandoned(folder: Path, prefix: str, suffixed: bool = False) -> None:
    """Removes the temporary files and folders in ``folder`` of work that was killed
    (``abandoned``): those named ``prefix`` and "HOST-PID", then, where ``suffixed``, a "-" and
    anything (mkdtemp's letters)."""
    for stale in folder.glob(f"{glob.escape(prefix)}*"):
        owner = stale.name[len(prefix):]
        if abandoned(owner.rpartition("-")[0] if suffixed else owner):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


CLOSED_AT_START = set()  # the standard descriptors that standard_streams found closed


def standard_streams() -> None:
    """Opens /dev/null on each standard descriptor that is closed (``>&-``), and gives Python a
    stdout and stderr where it has none: else the next file the program opens (a run folder's
    lock) would take the number, and what is written to the stream (by the ranks too) would
    go into that file, and a write to ``sys.stderr`` would fail on None."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            CLOSED_AT_START.add(fd)
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdout is None:
        sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)


def hold_interrupts() -> None:
    """A program's first lines, before its slow imports (torch's take seconds), under ``if
    __name__ == "__main__":``: a Ctrl-C during the imports is held rather than raised inside
    them, where it would print the importers' traceback (or end in a C++ abort), and
    ``quick_exit`` then ends the program with one line and exit code 130 before it starts.
    A second Ctrl-C is raised at once, so that an import that hangs can still be stopped. A
    program started with Ctrl-C ignored (in the background of a script) keeps it ignored.
    First, the standard streams are made whole (``standard_streams``)."""
    standard_streams()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _hold_interrupt)


def _hold_interrupt(signum, frame):
    if _held_interrupts:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    _held_interrupts.append(signum)


def _release_interrupts() -> None:
    """Ctrl-C as Python handles it again; the program's end if one was held (``hold_interrupts``)."""
    if signal.getsignal(signal.SIGINT) is _hold_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _held_interrupts:
        print("interrupted while the program started: nothing was done", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def quick_exit():
    """The body of a program's ``if __name__ == "__main__":``. Its end, or ``sys.exit(code)``
    within it (argparse's included), ends the process as the interpreter would, less the
    interpreter's own teardown: other threads are waited for, the exit handlers run
    (logging's, multiprocessing's clean-up), and the output is flushed; the collection and
    freeing of every object is skipped. With torch imported that teardown takes about a
    second on a 2-core CPU, after the program has done its work. Any other exception
    leaves the block as usual. Only for programs that close their files: a buffered file
    left open would lose what it holds, as it would on SIGKILL. A Ctrl-C held during the
    program's imports (``hold_interrupts``) ends it here, without running the body."""
    try:
        _release_interrupts()
        yield
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):  # as sys.exit("message") does
        if sys.stderr is not None:
            print(code, file=sys.stderr)
        code = 1
    # The interpreter's own first steps of its teardown: other threads are waited for (idle
    # thread pools told to end first, as the interpreter does), then the exit handlers run.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with that descriptor closed
                stream.flush()
        except OSError:  # a reader that went away (a closed pipe): the interpreter's exit status for it
            code = code or 120
    os._exit(code or 0)


def pyplot():
    """matplotlib.pyplot, drawing with Agg (into files) whatever MPLBACKEND says (a name it does
    not know stopped its import). Raises ValueError with its own message, which names the fix,
    where it cannot start (no folder to keep its cache in, a temporary one either); its
    warnings as it starts (its modules' too) are held back till then, and said where it starts."""
    import logging.handlers
    said = logging.getLogger("matplotlib")
    handlers, propagate = said.handlers, said.propagate
    held = logging.handlers.BufferingHandler(capacity=10_000)
    said.handlers, said.propagate = [held], False
    backend, no_folder = os.environ.pop("MPLBACKEND", None), False  # read as it is imported, not after
    try:
        import matplotlib
    except OSError as exc:  # each folder it tried comes before the error that sums them up, which alone is said
        no_folder = True
        raise ValueError(exc) from None
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
        said.handlers, said.propagate = handlers, propagate
        for record in held.buffer if not no_folder else ():
            said.callHandlers(record)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check_compile_backend(backend: str, option: str, device: str = "cpu") -> None:
    """Raises ValueError, naming ``option``, unless ``backend`` is one of COMPILE_BACKENDS, or
    if it is inductor and finds no compiler to build its code with for ``device`` (else the
    first step would fail): a C++ compiler for its kernels on the CPU, a C compiler for the
    launchers of Triton's kernels on a GPU, and Python's C headers for either (both are built
    as Python extensions). torch.compile's other backends (tvm, openxla, ...) need packages or
    devices that only the first step would find missing. For inductor, imports its
    configuration (a second or more): call it only when compiling."""
    if backend not in COMPILE_BACKENDS:
        given = f"{option} {backend}: torch.compile's backends" if backend else f"{option} is empty: the backends"
        raise ValueError(f"{given} that this program runs are {', '.join(COMPILE_BACKENDS)} ('inductor' generates "
                         f"fused kernels; 'aot_eager' and 'eager' trace the net and run it as written): give one of "
                         f"them")
    if backend != "inductor":
        return
    where = ("on the CPU it builds its kernels" if device == "cpu"
             else "on a GPU it builds the launchers of its Triton kernels")
    if device != "cpu":
        # Triton's own search (triton.runtime.build._find_compiler): $CC, else gcc, else clang
        candidates = (os.environ["CC"],) if "CC" in os.environ else ("gcc", "clang")  # an empty CC too
        if not any(c and shutil.which(c) for c in candidates):
            missing = f"{' or '.join(candidates)} is not on PATH" if any(candidates) else "CC is set, and empty"
            raise ValueError(f"{option} inductor: {where} with a C compiler, and finds none here ({missing}): install "
                             f"gcc (or set CC to a C compiler), or give aot_eager, which compiles nothing")
    elif not os.getenv("TORCH_INDUCTOR_INSTALL_GXX"):
        from torch._inductor import config
        # inductor's own search (torch._inductor.cpp_builder.cpp_compiler_search) runs each candidate
        # with --version; None stands for a g++ it installs with conda where asked to
        candidates = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        if not any(c is not None and shutil.which(c) for c in candidates):
            raise ValueError(f"{option} inductor: {where} with a C++ compiler, and finds none here "
                             f"({', '.join(c for c in candidates if c is not None)} is not on PATH): install g++ "
                             f"(or set CXX to a C++ compiler), or give aot_eager, which compiles nothing")
    headers = python_headers()
    if not os.path.isfile(os.path.join(headers, "Python.h")):
        raise ValueError(f"{option} inductor: {where} as Python extensions, which need Python's C headers, and finds "
                         f"no Python.h in {headers}: install them (the python3-dev package of this Python), or give "
                         f"aot_eager, which compiles nothing")


def python_headers() -> str:
    """The folder where Triton looks for Python.h to build its launchers (triton.runtime.build),
    and one of those where inductor looks for it to build its CPU kernels (its cpp_builder)."""
    scheme = sysconfig.get_default_scheme()
    return sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
