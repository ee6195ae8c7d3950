"""The process the ranks are forked from: torch and the training code imported once.

``launch.ranks.run_ranks`` starts ranks from multiprocessing's fork server, which
imports ``PRELOAD`` when it starts and then forks a process per rank: a rank starts
with its imports done, instead of spending seconds importing torch as a freshly
spawned process does. The server only imports (it never touches a GPU or computes),
so a rank is what a spawned process would be once its imports are done; the threads
the server has are those numpy's OpenBLAS starts on import, which OpenBLAS stops
around a fork. ``python -m launch.two_gpu`` starts it first thing, so that its imports
overlap the launcher's own. Torch-free, so that it can be imported before torch.

Each rank closes the server's liveness pipe as it starts (``detach``): the server
then ends when the launcher does, however the launcher ends, and the ranks' parent-
death signal (launch.ranks) ends the ranks.
"""

import multiprocessing.forkserver as forkserver
import os
import signal

# launch.train imports launch.ranks, towers and torch, which a rank of any caller needs. Each rank
# then imports the caller's main module itself, as a spawned process does (multiprocessing's
# preparation), finding whatever a script defines; the modules it imports are there already.
PRELOAD = ["launch.train"]


def start() -> None:
    """Starts the server if it is not running (at most once per process; later calls return at once)."""
    forkserver.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def start_early(argv: list) -> None:
    """``start`` for a program's first lines, before it imports torch, unless it was asked
    only for its help or runs under torchrun (which starts the ranks itself). The program
    calls ``stop`` as it ends."""
    if not ({"-h", "--help"} & set(argv) or "RANK" in os.environ):
        start()


def stop() -> None:
    """Ends the server now if it runs (a launcher that refused its options, or whose ranks
    have ended): killed rather than asked, as it would finish its imports first, and the
    caller's output stays open while it lives."""
    server = forkserver._forkserver
    if server._forkserver_pid is None:
        return
    try:
        os.kill(server._forkserver_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server._stop()  # closes this end of the liveness pipe, reaps the server, forgets its address


def pid() -> int:
    """The running server's process id."""
    return forkserver._forkserver._forkserver_pid


def detach() -> None:
    """In a rank: close its copy of the launcher's end of the server's liveness pipe (each
    forked process receives one), so that the server sees the launcher's end close when
    the launcher ends."""
    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        forkserver._forkserver._forkserver_alive_fd = None
