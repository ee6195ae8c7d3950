"""The process the ranks are forked from: torch and the training code imported once.

``launch.ranks.run_ranks`` starts ranks from multiprocessing's fork server, which
imports ``PRELOAD`` when it starts and then forks a process per rank: a rank starts
with its imports done, instead of spending seconds importing torch as a freshly
spawned process does. The server only imports (it never touches a GPU or computes),
so a rank is what a spawned process would be once its imports are done; the threads
the server has are those numpy's OpenBLAS starts on import, which OpenBLAS stops
around a fork. ``python -m launch.two_gpu`` starts it first thing, so that its imports
overlap the launcher's own. Torch-free, so that it can be imported before torch.

Each rank closes its copy of the server's liveness pipe as it starts (``as_rank``):
the server then ends when the launcher does, however the launcher ends, and the
ranks' parent-death signal (launch.ranks) ends the ranks.
"""

import atexit
import logging
import multiprocessing.forkserver as forkserver
import os
import resource
import signal
import sys
import tempfile
import threading
from multiprocessing import reduction, resource_tracker, util

from launch.cli import standard_streams, temporary_folder  # torch-free

# launch.train imports launch.ranks, towers and torch, which a rank of any caller needs. Each rank
# then imports the caller's main module itself, as a spawned process does (multiprocessing's
# preparation), finding whatever a script defines; the modules it imports are there already.
PRELOAD = ["launch.train"]


# The longest address of an AF_UNIX socket in bytes (sun_path: 108 on Linux, less its final NUL),
# and the part of it that multiprocessing adds to the temporary folder: its own folder in it and
# a socket there (the server's; and a DataLoader worker's, to hand a batch's shared memory over).
SOCKET_PATH_MAX = 107
SOCKET_NAME = len("/pymp-12345678/listener-12345678")
SHORT_TEMPORARY = ("/tmp", "/var/tmp", "/usr/tmp")  # where Python (3.14 on) falls back to as well


def room_for_sockets() -> None:
    """Points TMPDIR, for this process and all it starts, at the first of ``SHORT_TEMPORARY``
    that it can write in where the temporary folder's path is too long to hold
    multiprocessing's sockets, whose creation would fail ("AF_UNIX path too long"); says so
    in a warning. Elsewhere nothing. Raises ValueError naming the fix where there is no
    temporary folder to use."""
    current = temporary_folder()
    if len(os.fsencode(current)) + SOCKET_NAME <= SOCKET_PATH_MAX:
        return
    usable = next((p for p in SHORT_TEMPORARY if os.path.isdir(p) and os.access(p, os.W_OK | os.X_OK)), None)
    if usable is None:
        raise ValueError(f"the temporary folder {current} is too long a path for the local sockets that the processes "
                         f"use ({SOCKET_PATH_MAX} bytes at most, with their names), and none of "
                         f"{', '.join(SHORT_TEMPORARY)} can be written: set TMPDIR to a shorter path")
    os.environ["TMPDIR"] = tempfile.tempdir = usable
    logging.getLogger(__name__).warning(
        "warning: the temporary folder %s is too long a path for the local sockets that the processes use "
        "(%d bytes at most, with their names); this program keeps its temporary files in %s", current,
        SOCKET_PATH_MAX, usable)


# Files a process may hold open at once (ulimit -n): the ranks' sockets, pipes and queues, and the shared
# memory of their DataLoader workers' batches. On a 2-core CPU 40 sufficed for a run with 2 workers and
# 64 for one with 8 (48 did not); below 32 the rendezvous itself aborted without a word, or waited out
# --timeout.
OPEN_FILES = 1024  # raised to, where the hard limit lets it
MIN_OPEN_FILES = 128  # refused below: a GPU's default of 16 workers takes more than 8 do


def room_for_open_files() -> None:
    """Raises this process's limit on open files (its soft limit: for it and all it starts) to
    ``OPEN_FILES``, or as far as its hard limit lets it; raises ValueError naming the fix where
    that is below ``MIN_OPEN_FILES``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= OPEN_FILES:
        return
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < MIN_OPEN_FILES:
        raise ValueError(f"this program may hold {wanted} files open at once (the hard limit, ulimit -Hn), fewer "
                         f"than the {MIN_OPEN_FILES} it asks for (its sockets and pipes take dozens, and its "
                         f"DataLoader workers a few more each): raise the hard limit to {OPEN_FILES} (as root, or with "
                         f"docker run --ulimit nofile={OPEN_FILES}, systemd's LimitNOFILE or "
                         f"/etc/security/limits.conf)")


# multiprocessing's resource tracker removes the semaphores of a process killed while it held
# them (a rank's DataLoader queues), and says so in a warning as it ends: after the program's
# last line, which says what to do next. (Its other warnings, of a removal that failed, go too.)
QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


def _start_resource_tracker() -> None:
    """Starts multiprocessing's resource tracker (the fork server, its ranks and their workers
    share this process's) with ``QUIET_TRACKER`` among its warning filters: the last of the
    -W options it is given, this program's own (sys.warnoptions), so that it holds over them."""
    sys.warnoptions.append(QUIET_TRACKER)  # read at start-up: this process's own filters stay as they are
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(QUIET_TRACKER)


def start() -> None:
    """Starts the server if it is not running (at most once per process; later calls return at once).
    It starts with SIGINT ignored, so that a Ctrl-C during its imports does not print its
    traceback beside the launcher's; the ranks handle SIGINT again (``as_rank``)."""
    room_for_sockets()
    _start_resource_tracker()
    forkserver.set_forkserver_preload(PRELOAD)
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored signal stays ignored across exec
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def start_early(argv: list) -> None:
    """``start`` for a program's first lines, before it imports torch, unless it was asked
    only for its help or runs under torchrun (which starts the ranks itself), after
    ``room_for_open_files`` (under torchrun too). The program calls ``stop`` as it ends."""
    try:
        os.getcwd()  # which the server's start reads, as the ranks' would
    except FileNotFoundError:
        print("error: the current folder no longer exists (removed since the shell entered it): cd to one that "
              "does, and run the command again", file=sys.stderr)
        raise SystemExit(2) from None
    if any(a == "-h" or (len(a) > 2 and "--help".startswith(a)) for a in argv[1:]):  # argparse takes --he too
        return
    try:
        room_for_open_files()  # under torchrun too
        if "RANK" not in os.environ:
            start()
    except ValueError as exc:  # too few open files, or no temporary folder to use
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def stop() -> None:
    """Ends the server now if it runs (a launcher that refused its options, or whose ranks
    have ended): killed rather than asked, as it would finish its imports first, and the
    caller's output stays open while it lives."""
    server = forkserver._forkserver
    if server._forkserver_pid is None:
        return
    try:
        os.kill(server._forkserver_pid, signal.SIGKILL)
        while True:  # a Ctrl-C here, the program's last moment, would end it in a traceback
            try:
                os.waitpid(server._forkserver_pid, 0)
                break
            except KeyboardInterrupt:
                continue
    except (ProcessLookupError, ChildProcessError):  # gone already, or reaped for us (SIGCHLD ignored)
        pass
    os.close(server._forkserver_alive_fd)
    address = server._forkserver_address
    if address and not util.is_abstract_socket_namespace(address) and os.path.exists(address):
        os.unlink(address)
    server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None


@atexit.register
def _remove_the_socket_as_the_server_ends() -> None:
    """In the server (which imports this module with ``PRELOAD``), as it ends because its
    launcher has: removes its socket and, if nothing else is left in it, the launcher's
    multiprocessing folder that holds it. A launcher removes that folder as it exits, unless
    it was killed by SIGKILL; the server ends after the launcher has, so never under its feet.
    Elsewhere (the server's address unset, or set with the server's pid, as in its callers) nothing."""
    server = forkserver._forkserver
    address = server._forkserver_address
    if server._forkserver_pid is not None or not isinstance(address, str) or util.is_abstract_socket_namespace(address):
        return
    folder = os.path.dirname(address)
    try:
        os.unlink(address)
        if os.path.basename(folder).startswith("pymp-"):
            os.rmdir(folder)
    except OSError:  # gone already, or not empty
        pass


def pid() -> int:
    """The running server's process id."""
    return forkserver._forkserver._forkserver_pid


class Caller:
    """What a spawned rank would inherit from its caller as the rank starts, handed to the
    rank (``as_rank``): the environment, the standard output and error, and whether Ctrl-C
    stops it (``interrupts``; not in the background of a script, where SIGINT is ignored).
    The server's date from its start, and a caller may have changed its own since (pytest
    redirects each test's output)."""

    def __init__(self):
        self.environ = dict(os.environ)
        self.interrupts = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN

    def __reduce__(self):  # pickled as the rank starts: the descriptors travel with it
        return _caller_in_rank, (self.environ, self.interrupts,
                                 *(reduction.DupFd(fd) if _is_open(fd) else None for fd in (1, 2)))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _caller_in_rank(environ, interrupts, *output):
    return environ, interrupts, tuple(None if fd is None else fd.detach() for fd in output)


def _interrupt_once(signum, frame):
    """A rank's Ctrl-C: the first stops it, and the next (the launcher passing on what the
    terminal sent the whole process group already) does not interrupt its way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def as_rank(caller) -> None:
    """First thing in a rank: takes the caller's environment and output (``Caller``) as its
    own, handles Ctrl-C again where the caller does (once: ``_interrupt_once``), has what it
    starts itself (DataLoader workers) spawned rather than forked from a server of its own,
    which would outlive the rank if it were killed, and closes its copy of the launcher's
    end of the server's liveness pipe (each forked process receives one), so that the
    server sees the launcher's end close when the launcher ends."""
    environ, interrupts, output = caller
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    os.environ.update(environ)
    for fd, target in zip(output, (1, 2)):
        if fd is not None:
            os.dup2(fd, target)
            os.close(fd)
    standard_streams()  # a server started with either closed has None for it, and so its ranks
    signal.signal(signal.SIGINT, _interrupt_once if interrupts else signal.SIG_IGN)
    import multiprocessing
    multiprocessing.set_start_method("spawn", force=True)
    # Its own temporary folder, as a spawned rank has: the launcher's (inherited with the process
    # object) goes when the launcher exits, under what the rank's workers would still remove.
    multiprocessing.current_process()._config.pop("tempdir", None)
    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        forkserver._forkserver._forkserver_alive_fd = None
