"""Starting, watching and stopping the ranks of one run.

``run_ranks`` starts one process per rank on this machine (forked from
launch.rank_server, with torch already imported), rendezvouses them through a
TCPStore that the parent owns (on the loopback address unless the caller gives
another: launch.two_gpu's --master-addr), and watches them: when
one rank fails (an exception, a signal, the out-of-memory killer) the others
are stopped, and the caller gets a :class:`RankFailure` naming the rank and the
cause. Nothing is left running, and nothing waits forever: every process group
has a collective timeout, and the whole run a deadline if given.
Tests use the same helper as the launcher.
"""

import contextlib
import ctypes
import datetime
import functools
import ipaddress
import numbers
import os
import pickle
import queue as queue_module
import re
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import rank_server
from .cli import alive, signal_name, usable_cores

LOOPBACK = "127.0.0.1"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
_GRACE_S = 5.0  # how long the other ranks get to stop by themselves once one has failed


class RankFailure(RuntimeError):
    """One or more ranks of a run failed; ``failures`` maps rank -> cause (one line), and
    ``tracebacks`` rank -> the traceback of the exception it raised, where it raised one.
    The first rank's traceback is also this error's cause, shown below it when uncaught."""

    def __init__(self, failures: dict, first: int, tracebacks: Optional[dict] = None):
        self.failures, self.first, self.tracebacks = failures, first, tracebacks or {}
        lines = [f"rank {first} failed: {failures[first]}"]
        lines += [f"rank {r} then stopped: {'the same error' if why == failures[first] else why}"
                  for r, why in sorted(failures.items()) if r != first]
        super().__init__("\n".join(lines))


class RankTraceback(Exception):
    """A rank's traceback, as text: the cause of a RankFailure."""

    def __str__(self):
        return f"the rank's own traceback:\n{self.args[0]}"


class Placement(NamedTuple):
    """Where the ranks run and how they talk."""
    backend: str  # "nccl" or "gloo"
    device: str  # "cuda" or "cpu"; with nccl rank r uses GPU LOCAL_RANK, with gloo on "cuda" the ranks share the GPUs
    why: str
    ranks: int = 2  # in all: towers x replicas
    towers: int = 2  # ranks per replica: 2, the paper's towers; 1, a single-device net

    @property
    def replicas(self) -> int:
        return self.ranks // self.towers

    def describe(self) -> str:
        first = f"{self.device}{':0' * (self.device == 'cuda')}"
        if self.ranks == 1:
            return f"the whole net on {first}, one process: {self.why}"  # which net: the architecture line
        if self.ranks == 2 and self.towers == 2:
            devices = ["cuda:0", "cuda:1"] if self.backend == "nccl" else [first] * 2
            return f"tower 0 on {devices[0]}, tower 1 on {devices[1]}, exchanging over {self.backend}: {self.why}"
        net = "the two towers" if self.towers == 2 else "the whole net"
        where = {"nccl": "one GPU per rank", "gloo": "the CPU" if self.device == "cpu" else "sharing the GPUs"}
        return (f"{self.replicas} replicas of {net} on {self.ranks} ranks ({where[self.backend]}), talking over "
                f"{self.backend}: {self.why}")


def choose_placement(requested_backend: str, gpus: int, ranks: int = 2, towers: Optional[int] = None,
                     ranks_here: Optional[int] = None) -> Placement:
    """The devices and backend of ``ranks`` ranks in replicas of ``towers`` (default: 2 for
    two or more ranks) for ``gpus`` GPUs visible on each machine, which runs ``ranks_here``
    of the ranks (default: all). ``requested_backend`` is 'auto', 'nccl' or 'gloo' (gloo:
    the CPU). Raises ValueError naming the fix."""
    towers = towers or min(ranks, 2)
    ranks_here = ranks_here or ranks
    shape = dict(ranks=ranks, towers=towers)
    if ranks == 1:  # a process group of one, which never talks: gloo whatever the device
        if requested_backend == "nccl" and gpus == 0:
            raise ValueError("--backend nccl needs a GPU and this machine shows none: leave --backend at auto")
        if requested_backend == "gloo" or gpus == 0:
            return Placement("gloo", "cpu", "--backend gloo" if gpus else "no GPU visible", **shape)
        return Placement("gloo", "cuda", f"{gpus} GPU(s) visible", **shape)
    if requested_backend == "nccl" and gpus < ranks_here:
        raise ValueError(f"--backend nccl needs one GPU per rank ({ranks_here} here) and this machine shows {gpus}: "
                         f"NCCL refuses two ranks on one GPU. Leave --backend at auto (ranks then share the GPUs "
                         f"over gloo), or use --backend gloo (the CPU)")
    if requested_backend == "gloo":
        return Placement("gloo", "cpu", "--backend gloo puts every rank on the CPU", **shape)
    if gpus >= ranks_here:
        return Placement("nccl", "cuda", f"{gpus} GPUs visible, one per rank", **shape)
    if gpus >= 1:
        return Placement("gloo", "cuda", f"{gpus} GPU(s) visible for {ranks_here} ranks: ranks share a GPU, one "
                                         f"process each; NCCL refuses two ranks on one GPU, gloo stages the CUDA "
                                         f"tensors through host memory", **shape)
    return Placement("gloo", "cpu", "no GPU visible", **shape)


def cpu_threads_per_rank(ranks_here: int) -> int:
    """CPU threads for each of ``ranks_here`` ranks sharing the cores this process may use
    (a container's or taskset's, not the machine's all)."""
    return max(1, usable_cores() // ranks_here)


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (a name or an address) resolves to loopback addresses only."""
    try:
        infos = socket.getaddrinfo(addr, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def init_process_group(backend: str, rank: int, world_size: int, timeout_s: float, store=None) -> None:
    """Joins the default process group; with no ``store`` the torchrun environment (env://) is used."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":  # GPU LOCAL_RANK; ranks beyond the GPUs share them, which only a test arranges
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count()))
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


# How a rank other than 0 ends an error that rank 0 has too, and tells with advice from its files.
ADVICE_FROM_RANK0 = "Rank 0 says what to do next"
PREPARATION_WAIT_S = 2 * 3600  # under torchrun, the longest wait for a rank's first scan of the data folder


# gloo's words for a peer whose connection ended, or that never answered
PEER_GONE = ("closed by peer", "reset by peer", "timed out waiting")


class MissingRank(RuntimeError):
    """A rank that did not come to a meeting of every rank within its bound."""


def failed_to_meet(exc: RuntimeError) -> bool:
    """Whether an error of making a group (or of its first collective, where gloo connects
    lazily) is the ranks not meeting: the store's wait for a rank ran out (a DistError), or
    gloo's connection to a peer failed. Not a fault of this rank's own, such as a network
    interface with no address, or CUDA's."""
    said = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(words in said for words in (
        *PEER_GONE, "connectfullmesh", "connect timeout", "connection refused", "connection timed out", "broken pipe",
        "no route to host", "network is unreachable"))


@contextlib.contextmanager
def patient_group(wait_s: float, meet_s: float):
    """A gloo group of every rank whose collectives wait up to ``wait_s`` for one another,
    whatever the default group's timeout (--timeout, one exchange's bound): for a wait on
    rank 0's long work, such as its first scan of a large data folder. Every rank enters it
    together, before that work starts, and they meet there within ``meet_s`` (--timeout), or
    MissingRank is raised: a rank that never comes (one that stopped on its own machine, which
    a default group that meets lazily, NCCL's, did not notice) is found then, not after
    ``wait_s``. The group ends on leaving."""
    group = None
    try:
        try:
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=meet_s))
            dist.barrier(group=group)  # where gloo connects lazily (TORCH_GLOO_LAZY_INIT=1), it connects here
        except RuntimeError as exc:
            if not failed_to_meet(exc):
                raise
            raise MissingRank(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)) from exc
        group.set_timeout(datetime.timedelta(seconds=wait_s))
        yield group
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        name = signal_name(-exitcode)
        hint = " (the out-of-memory killer sends this)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with code {exitcode} without reporting an error"


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends SIGTERM to this process if its parent (``parent_pid``) dies,
    however it dies (even by SIGKILL); if the parent is gone already, this process ends now.
    A rank calls it for its parent, the rank server, which ends with the launcher
    (launch.rank_server), so no rank outlives its launcher; a rank's DataLoader workers
    call it for their rank (launch.data), the benchmarks' training program for the
    benchmark (benchmarks.program.run_child), and launch.prepare's workers for it. A
    process that multiprocessing's fork server started (the default from Python 3.14) has
    the server as its parent: it lets go of what keeps the server alive (as a rank does,
    launch.rank_server), so that the server ends with ``parent_pid``, and the signal comes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == parent_pid:
        return
    if not alive(parent_pid):  # the parent died before prctl took effect
        os._exit(1)
    # Started by the fork server: each process it starts holds the server's end of the
    # pipe that tells it its client is alive, and the server lives while one is open.
    from multiprocessing import forkserver
    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        forkserver._forkserver._forkserver_alive_fd = None


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_C_INT_MAX = 2 ** 31 - 1


def reuse_freed_memory() -> bool:
    """Has glibc's malloc keep large freed blocks for the next allocation instead of giving
    them back to the system. A training step frees and allocates the same large tensors each
    step (FC6's weight gradient alone is 151 MB; a batch's activations), and blocks over 32 MB
    are otherwise mapped afresh each time, every page of them faulted in and zeroed by the
    kernel again. On a 2-core CPU, two towers: at batch 4 that was a quarter of each step
    (490 -> 364 ms/step) and the run's system time halved, its peak memory per rank 0.74 ->
    0.84 GiB; at batch 32 the system time halved (6.5 -> 3.6 s in 10 steps) with no step time
    change that the noise lets one see. A GPU's tensors are not malloc's. Returns whether it
    was done: not on a C library other than glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # in this order: blocks are never mapped on their own, and the heap is trimmed only past 2 GiB free
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _C_INT_MAX))


def _rank_main(rank, world_size, addr, port, backend, collective_timeout_s, threads, fn, args, results, parent_pid,
               caller):
    die_with_parent(parent_pid)
    reuse_freed_memory()
    rank_server.as_rank(caller)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),  # as torchrun's, not
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR=addr, MASTER_PORT=str(port))  # the caller's
    if is_loopback(addr):  # gloo and NCCL would otherwise listen on the host's outward interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if threads:
        torch.set_num_threads(threads)
    try:
        store = dist.TCPStore(addr, port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=collective_timeout_s))
        init_process_group(backend, rank, world_size, collective_timeout_s, store=store)
        # Every rank's group made before any rank runs fn: gloo's returns on a rank once the rank's own
        # side of each connection is made, and a fn that ends at once (no collective) would close
        # them under a peer still making them ("Gloo connectFullMesh failed ... closed by peer").
        store.set(f"joined/{rank}", "1")
        store.wait([f"joined/{peer}" for peer in range(world_size)])
        try:
            value = fn(rank, *args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
            value = None  # sys.exit(0) at the end of the function, as a script for torchrun ends: nothing returned
        # By value: torch's queue would pass tensors as shared-memory handles, which die with this process.
        try:
            value = pickle.dumps(value)
        except Exception as exc:  # Python's words vary ("Can't get local object" in 3.13): say what failed
            raise TypeError(f"the value the rank's function returned cannot be pickled to send it to the "
                            f"launcher ({error_line(exc)})") from exc
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where it stops as Ctrl-C does (raise_interrupt)
        _ending()
        results.put((rank, "error", str(exc).replace("signal ", "stopped by ", 1) or "interrupted", None))
        raise SystemExit(130)
    except BaseException as exc:  # reported to the parent, which decides what the run's error is
        _ending()
        results.put((rank, "error", error_line(exc), traceback.format_exc()))
        raise SystemExit(1)
    results.put((rank, "ok", value))
    # Leave the group only on success; a failed peer would make this block.
    dist.destroy_process_group()


def _ending() -> None:
    """A rank that ends on an error or a stop: the launcher's Ctrl-C, passed on as it stops the
    ranks (beside a SIGTERM that stopped this one, say), is not raised in the rank's exit, and a
    later SIGTERM (the launcher's terminate, or the kernel's as the rank server ends) kills it,
    as outside a save."""
    set_handlers({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_DFL})


def error_line(exc: BaseException) -> str:
    """The exception as its last line of a traceback shows it. An error that a DataLoader
    worker raised arrives with the worker's whole traceback in its message: of that, the
    worker's own last line, and which worker."""
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    # as raised, not as a subclass shows it (DataError: on one line); or as shown (raised with message=)
    for text in (BaseException.__str__(exc), detail.partition(": ")[2]):
        worker = re.match(r"Caught \w+ (in DataLoader worker process \d+)\.\nOriginal Traceback", text)
        if worker:
            return f"{text.splitlines()[-1]} ({worker.group(1)})"
    return detail


def raise_interrupt(signum, frame):
    """A signal handler: the signal stops the program as Ctrl-C does, once: the process ignores
    it from then on, as it stops (a SIGTERM to a process group reaches a rank twice: sent to it,
    and sent by the kernel as its parent, the rank server, ends). Only this signal is ignored:
    the other handlers (Ctrl-C's) stay as they are."""
    set_handlers({signum: signal.SIG_IGN})
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def set_handlers(handlers: dict) -> None:
    """Sets the signal handlers {signal number: handler (a function, signal.SIG_IGN or SIG_DFL)},
    whatever signals are pending: CPython runs a pending signal's handler before it sets one,
    and a KeyboardInterrupt which that handler raises is dropped here (its process is stopping
    already, which is when this is called)."""
    for signum, handler in handlers.items():
        while signal.getsignal(signum) is not handler:
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signum, handler)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM stops the program as Ctrl-C does within (in the main thread, where handlers can be
    set), so that what cleans up after a Ctrl-C runs: where SIGTERM kills at once (a rank's
    default), only around work that never waits on another process, which would hold the
    handler back as long. A SIGTERM that stopped the program leaves it ignored, also once the
    block is left (``raise_interrupt``); a rank that ends sets it back (``_ending``)."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous is None:  # None: set outside Python,
        yield  # which could not be set back
        return
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is raise_interrupt:  # still this block's: no SIGTERM stopped it
            # one pending as the block ends (beside a Ctrl-C) raises before or in the setting back, which
            # raise_interrupt then leaves ignored
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT and SIGTERM ignored within (in the main thread, where handlers can be set): the stop
    they asked for is bounded (_stop), and then the program ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    set_handlers({s: signal.SIG_IGN for s in previous})  # one pending now asked for the stop under way
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: not set from Python, and not to be set back from it
                signal.signal(number, handler)


def _stop_interrupted(procs, caller) -> None:
    """The ranks stopped after an interrupt of the launcher, within a bound, whatever interrupts
    come meanwhile: a second Ctrl-C would cut the ranks' stop short, in a save perhaps."""
    with _interrupts_ignored():
        if caller.interrupts:  # passed on (a rank takes only the first), so that the ranks stop now
            for p in procs:
                if p.exitcode is None:  # not one whose end the fork server (which reaps it) has reported
                    with contextlib.suppress(OSError):
                        os.kill(p.pid, signal.SIGINT)
        _stop(procs, grace_s=_GRACE_S if caller.interrupts else 0.0)  # ranks that ignore it are ended


def _stop(procs, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()


def check_importable(fn: Callable, args: Sequence = ()) -> None:
    """ValueError where the ranks could not be given ``fn``: a lambda or a function defined inside
    another (by the name of the function a ``functools.partial`` or a bound method holds), what
    an interactive session (``python -c``, standard input, a notebook) defined, which the ranks
    do not run, be it ``fn``, what its partial holds or one of ``args``, or anything else pickle
    refuses. Each rank failed 'without reporting an error', or the start raised a pickling error."""
    target, held = fn, []
    while isinstance(target, functools.partial):
        held += [*target.args, *target.keywords.values()]
        target = target.func
    target = getattr(target, "__func__", target)  # a bound method's function
    name = getattr(target, "__qualname__", "")
    if "<lambda>" in name or "<locals>" in name:
        raise ValueError(f"the ranks cannot import {target!r} by its name: give a function defined at the top level "
                         f"of a module or script")
    main = sys.modules.get("__main__")
    if not os.path.isfile(getattr(main, "__file__", None) or ""):
        for item in (target, *held, *args):
            if "__main__" in (getattr(item, "__module__", None), type(item).__module__):
                raise ValueError(f"the ranks cannot import {item!r}: it was defined in an interactive session "
                                 f"(python -c, standard input, a notebook), which they do not run; define it in a .py "
                                 f"file, and import it or run that file")
    try:
        pickle.dumps(fn)
    except RuntimeError:  # a multiprocessing object (an Event, a Queue), which a process's start alone may pickle
        pass
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ValueError(f"the ranks cannot be given {fn!r}: it does not pickle ({exc}); give a function defined at "
                         f"the top level of a module or script, and arguments that pickle") from None


_LONGEST_S = datetime.timedelta.max.total_seconds()  # the longest time limit a process group's store takes


def run_ranks(fn: Callable, args: Sequence = (), world_size: int = 2, backend: str = "gloo",
              timeout_s: Optional[float] = None, collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
              threads_per_rank: Optional[int] = None, on_start: Optional[Callable] = None,
              addr: str = LOOPBACK) -> list:
    """Runs ``fn(rank, *args)`` in ``world_size`` new processes joined in one process
    group; returns the ranks' return values in rank order.

    ``fn``, ``args`` and what ``fn`` returns must be picklable (a module-level function;
    in a script, one whose ranks start under ``if __name__ == "__main__":``, as the ranks
    import the script). ``timeout_s`` bounds the whole run; ``collective_timeout_s``
    bounds any one collective. ``on_start(processes)`` is called once all ranks have
    started. The rendezvous store listens on ``addr``, the loopback address unless the
    caller says otherwise. A rank whose ``fn`` calls ``sys.exit(0)`` (or ``sys.exit()``)
    returned None; another exit code is its failure. Raises :class:`RankFailure` if any
    rank fails, after stopping the others; any other exception here (Ctrl-C, or one
    ``on_start`` raises) stops the ranks before it is raised.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a whole number of ranks, at least 1, got {world_size!r}")
    for name, seconds in (("timeout_s", timeout_s), ("collective_timeout_s", collective_timeout_s)):
        if not (seconds is None and name == "timeout_s" or isinstance(seconds, numbers.Real)
                and not isinstance(seconds, bool) and 0 < seconds <= _LONGEST_S):
            no_limit = " (or None: no limit)" if name == "timeout_s" else ""
            raise ValueError(f"{name} must be a number of seconds above 0 and at most {_LONGEST_S:.4g}{no_limit}, "
                             f"got {seconds!r}")
    timeout_s = None if timeout_s is None else float(timeout_s)  # numpy's, a Fraction: as datetime takes them
    collective_timeout_s = float(collective_timeout_s)
    check_importable(fn, args)
    if threads_per_rank is None and backend == "gloo":
        threads_per_rank = cpu_threads_per_rank(world_size)
    # TCPStore on its own would listen on every interface; hand it a socket bound to ``addr``.
    listener = socket.create_server((addr, 0), family=socket.getaddrinfo(addr, 0)[0][0])
    store = dist.TCPStore(addr, listener.getsockname()[1], world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=collective_timeout_s), master_listen_fd=listener.fileno())
    # The store owns the descriptor now and closes it when it is destroyed. Were the socket to
    # close it as well, the store would later close a number the next run's listener reuses.
    listener.detach()
    rank_server.start()
    ctx = mp.get_context("forkserver")
    results, caller = ctx.Queue(), rank_server.Caller()
    # Not daemonic, so that a rank may start DataLoader workers; PR_SET_PDEATHSIG ends a
    # rank whose launcher dies (through the server), and _stop below ends them all otherwise.
    procs = [ctx.Process(target=_rank_main, name=f"rank{rank}",
                         args=(rank, world_size, addr, store.port, backend, collective_timeout_s, threads_per_rank, fn, args,
                               results, rank_server.pid(), caller))
             for rank in range(world_size)]
    for rank, p in enumerate(procs):
        try:
            p.start()
        except (OSError, EOFError) as exc:  # the server died (killed) before it forked this rank
            _stop(procs[:rank], grace_s=0.0)
            raise RankFailure({rank: f"could not be started: the rank server ended ({exc!r})"}, rank) from None
    sigterm = contextlib.ExitStack()
    sigterm.enter_context(sigterm_as_interrupt())  # SIGTERM to the launcher stops the ranks (then the launcher exits)
    values, failures, tracebacks, first = {}, {}, {}, None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed_at = None
    try:
        if on_start is not None:
            on_start(procs)
        while len(values) < world_size:
            try:
                message = results.get(timeout=0.1)
            except queue_module.Empty:
                message = None
            if message is not None:
                rank, status = message[0], message[1]
                if status == "ok":
                    values[rank] = pickle.loads(message[2])
                else:
                    failures.setdefault(rank, message[2])
                    if message[3] is not None:
                        tracebacks.setdefault(rank, message[3])
                    first = rank if first is None else first
                    failed_at = failed_at or time.monotonic()
            for rank, p in enumerate(procs):
                if rank not in values and rank not in failures and p.exitcode is not None and results.empty():
                    failures[rank] = _describe_exit(p.exitcode)
                    # A rank that died without a word is the cause; the others' errors follow from it.
                    first = rank if first is None or p.exitcode < 0 else first
                    failed_at = failed_at or time.monotonic()
            now = time.monotonic()
            if failed_at is not None and (now - failed_at > _GRACE_S or len(values) + len(failures) == world_size):
                silent = [r for r in range(world_size) if r not in values and r not in failures]
                for rank in silent:
                    failures[rank] = "did not respond (hung or stopped); ended by the launcher"
                # gloo says "Timed out ..." of the wait that ran out, and "Application timeout caused
                # pair closure" of another wait on the same peer (a batch crossing beside the step)
                if silent and any(word in str(failures[first]).lower() for word in ("timed out", "timeout")):
                    first = silent[0]  # the others timed out waiting for it
                break
            if deadline is not None and now > deadline and len(values) < world_size:  # not one that just returned
                for rank in range(world_size):
                    if rank not in values:
                        failures.setdefault(rank, f"still running after the run's time limit of {timeout_s:.0f} s")
                first = first if first is not None else min(failures)
                break
    except KeyboardInterrupt:  # Ctrl-C, which the terminal sent the ranks too, or SIGTERM to this process
        while True:
            try:
                _stop_interrupted(procs, caller)
                break
            except KeyboardInterrupt:  # a signal that came with the first (a SIGTERM beside a Ctrl-C): its
                continue  # handler runs as the stop starts, which it asked for too
        raise
    except BaseException:
        _stop(procs, grace_s=0.0)
        raise
    finally:
        sigterm.close()
        del store  # closes the listener now, not when a traceback holding this frame is dropped
    _stop(procs, grace_s=0.0 if failures else _GRACE_S)
    if failures:
        # Ranks that stopped on the same error (a mistake each found for itself): the lowest is named first
        first = min(rank for rank, why in failures.items() if why == failures[first])
        kind = failures[first].split(":", 1)[0]
        if failures[first].endswith(ADVICE_FROM_RANK0) and failures.get(0, "").split(":", 1)[0] == kind:
            first = 0  # the same error, in rank 0's words: with what to do next
        error = RankFailure(failures, first, tracebacks)
        if first in tracebacks:
            raise error from RankTraceback(tracebacks[first])
        raise error
    return [values[rank] for rank in range(world_size)]
