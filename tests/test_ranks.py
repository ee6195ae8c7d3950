"""launch.ranks on its own: the whole run's deadline, loopback detection, threads per rank."""

import contextlib
import ctypes
import functools
import multiprocessing.queues
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from launch import rank_server, ranks
from launch.cli import usable_cores
from launch.images import DataError
from launch.ranks import (RankFailure, choose_placement, cpu_threads_per_rank, failed_to_meet, is_loopback,
                          patient_group, run_ranks)

from conftest import ROOT


def _sleep(rank, seconds):
    time.sleep(seconds)
    return rank


def _exit(rank, codes):
    sys.exit(codes[rank])


@pytest.mark.slow
def test_a_rank_that_exits_with_0_returned_nothing_and_any_other_code_failed():
    """A function written for torchrun may end with sys.exit(0): a rank that ended well."""
    assert run_ranks(_exit, ((0, None),)) == [None, None]
    with pytest.raises(RankFailure) as failed:
        run_ranks(_exit, ((0, 3),))
    assert str(failed.value).startswith("rank 1 failed: SystemExit: 3"), str(failed.value)


def _machine(rank):
    return {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}


@pytest.mark.slow
def test_the_ranks_started_here_are_told_their_machine_as_torchrun_tells_its(monkeypatch):
    """Not a LOCAL_WORLD_SIZE left in the caller's environment (a shell that ran torchrun): a
    rank counts the ranks beside it from it (its default DataLoader workers, its share of /dev/shm)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert run_ranks(_machine) == [dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2")
                                   for r in range(2)]


class _Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h), every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_for_a_large_tensor(rank=0):
    """Bytes that malloc mapped on their own for a 200 MB tensor."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _Mallinfo2
    before = mallinfo2().hblkhd
    tensor = torch.ones(50_000_000)  # written: every page of it touched, as a gradient's are
    mapped = mallinfo2().hblkhd - before
    del tensor
    return mapped


@pytest.mark.slow
def test_a_rank_takes_its_large_tensors_from_mallocs_heap():
    """launch.ranks.reuse_freed_memory, which every rank runs: a 200 MB tensor comes from
    malloc's heap, where its memory is reused once freed, not from a mapping of its own that
    the kernel faults in and zeroes afresh each step. (That the heap is not trimmed after it,
    M_TRIM_THRESHOLD, is left unchecked: the heap's size does not tell it apart here.)"""
    try:
        _mapped_for_a_large_tensor()
    except (OSError, AttributeError):
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    assert _mapped_for_a_large_tensor() >= 200_000_000  # this process, malloc as it is by default: the check can fail
    assert run_ranks(_mapped_for_a_large_tensor, (), world_size=1) == [0]


@pytest.mark.slow
def test_the_whole_run_deadline_stops_ranks_that_run_too_long():
    """At the deadline, not some seconds after it: from the ranks' start, the run's time limit and
    the moment it takes to stop two ranks that sleep."""
    started = []
    with pytest.raises(RankFailure) as info:
        run_ranks(_sleep, (120,), timeout_s=4, on_start=lambda procs: started.append(time.monotonic()))
    assert 4 <= time.monotonic() - started[0] < 7.5  # the deadline, then two ranks stopped (one taken twice: 8 s)
    assert "still running after the run's time limit of 4 s" in str(info.value)
    assert set(info.value.failures) == {0, 1}


def _hang_or_time_out(rank, message):
    if rank == 1:
        time.sleep(120)  # hung: it never answers
    raise RuntimeError(message)


@pytest.mark.slow
@pytest.mark.parametrize("message", ["[gloo] Timed out waiting 15000ms for recv operation to complete",
                                     "Application timeout caused pair closure"])
def test_a_rank_that_went_silent_is_named_before_those_that_timed_out_on_it(message):
    """Both of gloo's words for a wait that ran out (the second when another wait on the same
    peer, such as the next batch crossing, ran out first) put the blame on the silent rank."""
    with pytest.raises(RankFailure) as info:
        run_ranks(_hang_or_time_out, (message,), timeout_s=60)
    assert info.value.first == 1 and str(info.value).startswith("rank 1 failed: did not respond")
    assert message in info.value.failures[0]


def _wait_for_rank0(rank, work_s, patient):
    """Rank 0 works for ``work_s`` (a scan of the data, say), then hands its result to the others."""
    result = [None]
    if not patient:
        time.sleep(work_s if rank == 0 else 0)
        dist.broadcast_object_list(result if rank else [42], src=0)
        return 42
    with patient_group(4 * work_s, work_s / 2) as group:  # met within less than rank 0's work takes
        if rank == 0:
            time.sleep(work_s)
            result = [42]
        dist.broadcast_object_list(result, src=0, group=group)
    dist.barrier()  # and the default group, with its own timeout, goes on
    return result[0]


@pytest.mark.slow
def test_a_patient_group_waits_for_rank_0_beyond_the_collective_timeout():
    """Under torchrun, the other ranks wait for rank 0 to open the data as long as that
    takes, where the default group (the per-exchange --timeout) gives up; and longer than the
    bound they were given to meet in the group (--timeout too, under the program)."""
    assert run_ranks(_wait_for_rank0, (4, True), collective_timeout_s=1, timeout_s=60) == [42, 42]
    with pytest.raises(RankFailure, match="rank 1 failed: .*Timed out"):  # what it spares them
        run_ranks(_wait_for_rank0, (4, False), collective_timeout_s=1, timeout_s=60)


def _meet_with_no_interface(rank):
    os.environ["GLOO_SOCKET_IFNAME"] = "nosuch"  # read as gloo makes the group, as under NCCL's default group
    with patient_group(60, 5):
        pass


def test_only_a_meeting_that_failed_is_told_as_a_rank_missing():
    """A group's making (or its first collective, where gloo connects lazily) failing for want of
    a rank, in the store's words or gloo's, is the ranks not meeting; a fault of this rank's own,
    such as an interface with no address for gloo, keeps its own words (and traceback)."""
    for met_not in (dist.DistStoreError("wait timeout after 5000ms, keys: /default_pg/0//1//cpu//0/1"),
                    RuntimeError("Gloo connectFullMesh failed with [../third_party/gloo/gloo/transport/tcp/pair.cc:144]"
                                 " no error"),
                    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:332] Connect timeout [127.0.0.1]:3"),
                    RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:5"),
                    RuntimeError("[gloo/transport/tcp/pair.cc:598] writev [127.0.0.1]:5: Broken pipe"),
                    RuntimeError("[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:5: Connection reset by peer"),
                    RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv "
                                 "operation to complete")):
        assert failed_to_meet(met_not), met_not
    for own in (RuntimeError("[enforce fail at ../third_party/gloo/gloo/transport/tcp/device.cc:84] ifa != nullptr. "
                             "Unable to find address for: ifb0"), RuntimeError("CUDA error: out of memory")):
        assert not failed_to_meet(own), own
    with pytest.raises(RankFailure, match=r"^rank 0 failed: RuntimeError: \[enforce fail at .*Unable to find address "
                                          r"for: nosuch"):
        run_ranks(_meet_with_no_interface, timeout_s=60)


REPLICA_TIMEOUT_S = 3


def _replicas_open_the_data(rank, data, slow_rank, other_data_rank):
    """Two replicas of two towers as under torchrun: rank 0 holds the data it opened, rank 2
    (replica 1's first tower) opens it itself, ``slow_rank`` taking twice as long as any one
    collective may wait (--timeout, also the bound in which the ranks must meet, a few seconds
    for four ranks to connect on a loaded machine); ``other_data_rank`` is told rank 0 saw one
    more image."""
    from launch import data as data_module, train
    from launch.config import TrainConfig
    from launch.mesh import build_mesh

    mesh = build_mesh(2, timeout_s=REPLICA_TIMEOUT_S)
    seen = data_module.open_data(data)
    plan = train.Plan(list(seen.classes), 1, 1, len(seen.train) + (rank == other_data_rank), seen.stats)
    if rank == slow_rank:
        scan = data_module.open_data
        data_module.open_data = lambda *args, **kwargs: (time.sleep(2 * REPLICA_TIMEOUT_S), scan(*args, **kwargs))[1]
    config = TrainConfig(data=str(data), timeout=REPLICA_TIMEOUT_S)
    opened = train._replica_data(rank, config, plan, seen if rank == 0 else None, mesh)
    dist.barrier()  # the run goes on together
    return None if opened is None else len(opened.train)


@pytest.mark.slow
def test_under_torchrun_the_ranks_wait_for_a_replicas_scan_of_the_data_and_share_its_failure(tiny_data):
    """Under torchrun each replica's first tower scans the data folder itself: the other ranks
    wait for it as long as that takes, not --timeout; if it cannot use the data, every rank
    stops at once with its line, none waiting out a timeout."""
    assert run_ranks(_replicas_open_the_data, (tiny_data, 2, None), world_size=4,
                     collective_timeout_s=REPLICA_TIMEOUT_S, timeout_s=60) == [30, None, 30, None]
    started = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_replicas_open_the_data, (tiny_data, None, 2), world_size=4, collective_timeout_s=REPLICA_TIMEOUT_S,
                  timeout_s=60)
    assert set(info.value.failures) == {0, 1, 2, 3} and time.monotonic() - started < 30
    sees = (r"launch.images.DataError: rank 2 sees other data at \S+ \(10 classes, 30 training images\) than rank 0 "
            r"\(10, 31\): give every machine the same --data")
    assert re.fullmatch(sees, info.value.failures[2]), info.value.failures
    assert all(re.fullmatch(sees + r" \(on rank 2\)", info.value.failures[other]) for other in (0, 1, 3))


def test_a_replica_that_sees_other_images_than_rank_0_is_refused(tiny_data, tmp_path):
    """Under torchrun each replica loads its share of each batch, and evaluates its share of
    the set, from its own folder: the same classes and as many training images, with one of
    them or of the validation images another, would train on or mix two sets."""
    from launch import data as data_module, train
    from launch.config import TrainConfig

    seen = data_module.open_data(tiny_data)
    plan = train.Plan(list(seen.classes), 1, 1, len(seen.train), seen.stats, seen.digests)
    mesh = SimpleNamespace(replicas=1, loads_data=True)  # replica 1's first tower, as far as the data goes
    assert len(train._replica_data(2, TrainConfig(data=str(tiny_data)), plan, None, mesh).val) == len(seen.val)
    # An evaluation reads no training image: a replica may hold val/ alone (its images rank 0's).
    shutil.copytree(tiny_data / "val", tmp_path / "val-only" / "val")
    evaluation = TrainConfig(data=str(tmp_path / "val-only"), eval_only=str(tmp_path / "run"))
    opened = train._replica_data(2, evaluation, plan, None, mesh)
    assert not opened.train.samples and opened.val.samples == [
        (str(tmp_path / "val-only" / Path(path).relative_to(tiny_data)), label) for path, label in seen.val.samples]
    for split, words in (("val", "validation images"), ("train", "training images")):
        other = tmp_path / split
        shutil.copytree(tiny_data, other)
        image = sorted((other / split).glob("*/*"))[0]
        image.rename(image.with_name("other" + image.suffix))
        with pytest.raises(data_module.DataError, match=f"^rank 2 sees other {words} at "
                                                        f"{re.escape(str(other / split))} than rank 0"):
            train._replica_data(2, TrainConfig(data=str(other)), plan, None, mesh)


def test_a_replica_holds_its_data_folder_against_a_prepare_while_the_run_reads_it(tiny_data, tmp_path):
    """Under torchrun a replica's first tower opens the data itself, on its own machine's copy:
    it holds that folder's prepare lock as rank 0 holds its own, so that a launch.prepare into
    it is refused while the run reads it, and it is refused a folder that one is writing."""
    import fcntl
    from launch import data as data_module, train
    from launch.config import TrainConfig

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / data_module.PREPARE_LOCK_NAME).write_text("python -m launch.prepare (pid 1)\n")
    seen = data_module.open_data(data)
    plan = train.Plan(list(seen.classes), 1, 1, len(seen.train), seen.stats, seen.digests)
    mesh = SimpleNamespace(replicas=1, loads_data=True)  # replica 1's first tower, as far as the data goes

    def prepare_may_write() -> bool:
        with open(data / data_module.PREPARE_LOCK_NAME) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

    with contextlib.ExitStack() as reading:
        assert len(train._replica_data(2, TrainConfig(data=str(data)), plan, None, mesh, reading).train) == 30
        assert not prepare_may_write()
    assert prepare_may_write()  # the run over
    with open(data / data_module.PREPARE_LOCK_NAME) as writing, contextlib.ExitStack() as reading:
        fcntl.flock(writing, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(data_module.DataError, match=f"^{re.escape(str(data))} is being written by a python -m "
                                                        f"launch.prepare \\(python -m launch.prepare \\(pid 1\\)\\)"):
            train._replica_data(2, TrainConfig(data=str(data)), plan, None, mesh, reading)


def test_a_parent_that_died_but_was_not_yet_reaped_is_not_alive():
    """die_with_parent's check, for the moment after the parent dies: a zombie until reaped."""
    from launch.cli import alive
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert alive(child.pid) and alive(os.getpid())
        child.kill()
        deadline = time.monotonic() + 10
        while alive(child.pid) and time.monotonic() < deadline:  # a zombie: not waited for yet
            time.sleep(0.05)
        assert not alive(child.pid) and Path(f"/proc/{child.pid}").exists()
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid)


def _same_mistake(rank):
    time.sleep(0.5 * (1 - rank))  # rank 1 reports first
    raise ValueError("the folder holds no images")


class _Empty(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DataError("no usable image in train/: every file failed to decode")


def _load_in_a_worker(rank):
    next(iter(torch.utils.data.DataLoader(_Empty(), num_workers=1)))


@pytest.mark.slow
def test_ranks_that_stop_on_the_same_error_are_named_from_the_lowest():
    with pytest.raises(RankFailure) as info:
        run_ranks(_same_mistake, timeout_s=60)
    assert info.value.first == 0 and set(info.value.failures) == {0, 1}
    assert str(info.value) == ("rank 0 failed: ValueError: the folder holds no images\n"
                               "rank 1 then stopped: the same error")


@pytest.mark.slow
def test_an_error_from_a_dataloader_worker_is_its_own_line_not_the_workers_traceback():
    with pytest.raises(RankFailure) as info:
        run_ranks(_load_in_a_worker, timeout_s=60)
    assert info.value.failures[0] == ("launch.images.DataError: no usable image in train/: every file failed to "
                                      "decode (in DataLoader worker process 0)")


def _is_set(rank, event):
    return event.is_set()


@pytest.mark.slow  # real processes
def test_a_function_the_ranks_cannot_import_is_refused_before_they_start():
    """Each rank failed 'without reporting an error' (the cause only in its stderr) for a function of
    ``python -c``, standard input or a notebook, bare or in a functools.partial; a lambda's or a
    nested function's pickling error was a traceback."""
    def nested(rank):
        return rank

    class Local:
        def __call__(self, rank):
            return rank

    for fn in (nested, lambda rank: rank, functools.partial(nested)):
        with pytest.raises(ValueError, match=r"^the ranks cannot import <function .*(nested|lambda).* by its name: "
                                             r"give a function defined at the top level of a module or script$"):
            run_ranks(fn)
    for fn in (Local(), functools.partial(_sleep, seconds=threading.Lock())):
        with pytest.raises(ValueError, match=r"^the ranks cannot be given .*: it does not pickle \(.*\); give a "
                                             r"function defined at the top level of a module or script, and "
                                             r"arguments that pickle$"):
            run_ranks(fn)
    script = ("import functools, operator\nfrom launch.ranks import run_ranks\ndef f(rank):\n    return rank\n"
              "class Flag:\n    pass\nrun_ranks(F, timeout_s=60)\n")
    function, flag = "<function f at ", "<__main__.Flag object"  # the function, what a partial holds
    for command, fn, named in (([sys.executable, "-c"], "f", function), ([sys.executable, "-"], "f", function),
                               ([sys.executable, "-c"], "functools.partial(f)", function),
                               ([sys.executable, "-c"], "functools.partial(operator.eq, Flag())", flag)):
        text = script.replace("run_ranks(F", f"run_ranks({fn}")
        done = subprocess.run([*command, text] if command[-1] == "-c" else command, input=text, cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 1 and last.startswith(f"ValueError: the ranks cannot import {named}"), last
        assert last.endswith("it was defined in an interactive session (python -c, standard input, a notebook), "
                             "which they do not run; define it in a .py file, and import it or run that file"), last


@pytest.mark.slow
def test_a_partial_holding_what_only_a_rank_start_may_pickle_runs():
    """A multiprocessing Event goes to a rank as it starts, not through pickle.dumps."""
    event = multiprocessing.get_context("forkserver").Event()
    event.set()
    assert run_ranks(functools.partial(_is_set, event=event), timeout_s=60) == [True, True]


@pytest.mark.slow
def test_ranks_within_the_deadline_return_in_rank_order():
    assert run_ranks(_sleep, (0,), timeout_s=60) == [0, 1]


@pytest.mark.slow
def test_ranks_whose_values_arrive_as_the_deadline_passes_returned(monkeypatch):
    """The clock jumps past the deadline as the launcher takes the last rank's value off the queue:
    the value came in time, and the run returns (it failed with min() of no failures)."""
    received, get = [], multiprocessing.queues.Queue.get

    def get_and_jump(self, *args, **kwargs):
        message = get(self, *args, **kwargs)  # queue.Empty from here: no message, no jump
        received.append(message)
        return message

    monotonic = time.monotonic
    monkeypatch.setattr(multiprocessing.queues.Queue, "get", get_and_jump)
    monkeypatch.setattr(time, "monotonic", lambda: monotonic() + 1000 * (len(received) == 2))
    assert run_ranks(_sleep, (0,), timeout_s=60) == [0, 1]
    assert len(received) == 2


def _return_or_raise(rank):
    if rank == 0:
        return lambda: None  # cannot be pickled back to the caller
    raise ValueError("a mistake in the rank's own code")


@pytest.mark.slow
def test_a_ranks_traceback_and_a_value_it_cannot_return_are_told():
    with pytest.raises(RankFailure) as info:
        run_ranks(_return_or_raise, timeout_s=60)
    failure = info.value
    # not "exited without reporting an error", nor Python's own words alone (which do not say pickle in 3.13)
    assert failure.failures[0].startswith("TypeError: the value the rank's function returned cannot be pickled to "
                                          "send it to the launcher ("), failure.failures[0]
    assert failure.failures[1] == "ValueError: a mistake in the rank's own code"
    assert set(failure.tracebacks) == {0, 1}
    cause = str(failure.__cause__)  # what an uncaught RankFailure shows below it: the first rank's traceback
    assert cause == f"the rank's own traceback:\n{failure.tracebacks[failure.first]}"
    assert 'test_ranks.py", line' in failure.tracebacks[1] and "in _return_or_raise" in failure.tracebacks[1]


@pytest.mark.slow
def test_an_error_of_on_start_stops_the_ranks():
    started = []

    def on_start(processes):
        started.extend(processes)
        raise OSError("the caller's own error")

    with pytest.raises(OSError, match="the caller's own error"):
        run_ranks(_sleep, (120,), timeout_s=60, on_start=on_start)
    assert len(started) == 2 and not any(p.is_alive() for p in started)


@pytest.mark.parametrize("world_size", [0, -1, 2.0, True])
def test_a_world_size_that_is_no_number_of_ranks_is_refused(world_size):
    with pytest.raises(ValueError, match="world_size must be a whole number of ranks, at least 1"):
        run_ranks(_sleep, (0,), world_size=world_size)


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), True, "60", 1e15, 10**400, Fraction(10**400)])
@pytest.mark.parametrize("name", ["timeout_s", "collective_timeout_s"])
def test_a_time_limit_that_is_no_number_of_seconds_is_refused(name, seconds):
    """NaN was no limit at all; 0 or less a limit already passed, named as such; a collective's
    limit of 0 or less gloo's socket error."""
    with pytest.raises(ValueError, match=rf"^{name} must be a number of seconds above 0.*, got "
                                         rf"{re.escape(repr(seconds))}$"):
        run_ranks(_sleep, (0,), **{name: seconds})


def test_time_limits_of_numpy_s_and_fractions_are_seconds():
    """As the check takes them: datetime's timedelta, which the store's limit is made into, did not."""
    assert run_ranks(_sleep, (0,), timeout_s=np.float64(120), collective_timeout_s=Fraction(60)) == [0, 1]


def _environment_and_parent(rank, names):
    return {name: os.environ.get(name) for name in names}, os.getppid()


@pytest.mark.slow
def test_ranks_get_the_environment_of_the_moment_they_start(monkeypatch):
    """The rank server forks the ranks with the environment it started with; each rank
    takes the caller's as it is when run_ranks is called, as a spawned process would."""
    monkeypatch.setenv("ALEXNET_TEST_GONE", "set before")
    run_ranks(_sleep, (0,), timeout_s=60)  # the server runs from here on
    monkeypatch.setenv("ALEXNET_TEST_NEW", "set after the server started")
    monkeypatch.delenv("ALEXNET_TEST_GONE")
    names = ("ALEXNET_TEST_NEW", "ALEXNET_TEST_GONE")
    (first, parent), (second, _) = run_ranks(_environment_and_parent, (names,), timeout_s=60)
    assert first == second == {"ALEXNET_TEST_NEW": "set after the server started", "ALEXNET_TEST_GONE": None}
    assert parent == rank_server.pid() != os.getpid()  # forked from the server, not from this process


def _cuda_usable(rank):
    import torch
    return not torch.cuda._is_in_bad_fork()


@pytest.mark.slow
@pytest.mark.skipif(not __import__("torch").backends.cuda.is_built(), reason="this torch has no CUDA to poison")
def test_the_rank_server_leaves_cuda_untouched_for_the_ranks():
    """A process forked after CUDA's driver started cannot use the GPU ("Cannot re-initialize
    CUDA in forked subprocess"); even torch.cuda.is_available() starts the driver. So the server
    must not touch CUDA while it imports. torch marks a fork after that as bad, GPU or none."""
    assert run_ranks(_cuda_usable, timeout_s=60) == [True, True]


def _print_rank(rank, word):
    print(f"{word} from rank {rank}", file=sys.stderr, flush=True)
    return rank


@pytest.mark.slow
@pytest.mark.parametrize("word", ["first", "second"])
def test_ranks_write_to_the_callers_output_as_it_is_when_they_start(capfd, word):
    """pytest points each test's output somewhere new; the rank server started before."""
    run_ranks(_print_rank, (word,), timeout_s=60)
    err = capfd.readouterr().err
    assert f"{word} from rank 0" in err and f"{word} from rank 1" in err, err


_SCRIPT = """
import os
from launch.ranks import run_ranks

def rank_of_a_script(rank, word):
    return f"{word} from rank {rank}"

if __name__ == "__main__":
    print(run_ranks(rank_of_a_script, ("hello",), timeout_s=60))
"""


def _run_script(folder: Path, text: str) -> subprocess.CompletedProcess:
    """``text`` run as a user's script of its own, in ``folder``, this checkout importable."""
    script = folder / "script.py"
    script.write_text(text)
    return subprocess.run([sys.executable, str(script)], cwd=folder, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_script_can_run_ranks_of_a_function_it_defines(tmp_path):
    result = _run_script(tmp_path, _SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['hello from rank 0', 'hello from rank 1']"


_SLOW_TO_STOP = """
import os, signal, sys, threading, time
from pathlib import Path
from launch import rank_server
from launch.cli import quick_exit
from launch.ranks import run_ranks

def rank_slow_to_stop(rank, folder):
    Path(folder, f"started-{rank}").touch()
    try:
        time.sleep(120)
    except KeyboardInterrupt:  # as a rank in a save: a second or two to leave it whole
        time.sleep(1.5)  # not cut short by the next Ctrl-C: a rank takes only the first (rank_server.as_rank)
        Path(folder, f"stopped-{rank}").touch()
        raise

def at_once(procs):  # a Ctrl-C to the ranks, and to the launcher with a SIGTERM beside it (a scheduler's),
    # both pending at once: handled by number, SIGINT's first, SIGTERM's at the next chance
    while not all(Path(sys.argv[1], f"started-{rank}").exists() for rank in range(2)):
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGINT)
    both, main = {signal.SIGINT, signal.SIGTERM}, threading.get_ident()
    signal.pthread_sigmask(signal.SIG_BLOCK, both)
    signal.pthread_kill(main, signal.SIGTERM)
    signal.pthread_kill(main, signal.SIGINT)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)

if __name__ == "__main__":  # as the training program ends: its rank server stopped, then at once
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with quick_exit():
        try:
            run_ranks(rank_slow_to_stop, (sys.argv[1],), timeout_s=120, on_start=at_once if sys.argv[2:] else None)
        except KeyboardInterrupt:
            sys.exit(130)
        finally:
            rank_server.stop()
"""


@pytest.mark.slow
@pytest.mark.parametrize("then", ["ctrl-c", "sigterm", "sigterm at once"])
def test_ctrl_c_twice_waits_for_the_ranks_to_stop(tmp_path, then):
    """The second Ctrl-C of an impatient user ended the launcher at once, and its ranks with it
    in the middle of their stop (a checkpoint's save, left half-written). So would a SIGTERM to
    the launcher alone after the Ctrl-C (a scheduler's, docker stop's), also one that came with
    the Ctrl-C, both pending at once: its handler ran as the stop began, and cut it short."""
    script = tmp_path / "script.py"
    script.write_text(_SLOW_TO_STOP)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), *(["at-once"] if "at once" in then else [])],
                            cwd=tmp_path, start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"started-{rank}").exists() for rank in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        if then != "sigterm at once":  # else sent by the launcher itself (at_once)
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C, twice
            time.sleep(0.1)
        if then == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        elif then == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert all((tmp_path / f"stopped-{rank}").exists() for rank in (0, 1)), proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


_SIGTERM_BESIDE_CTRL_C = """
import os, signal, threading
from launch.ranks import sigterm_as_interrupt
with sigterm_as_interrupt():
    pass
print("set back:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
both, main = {signal.SIGINT, signal.SIGTERM}, threading.get_ident()
try:
    with sigterm_as_interrupt():
        signal.pthread_sigmask(signal.SIG_BLOCK, both)
        signal.pthread_kill(main, signal.SIGTERM)  # a process group's SIGTERM
        signal.pthread_kill(main, signal.SIGINT)  # and the launcher's Ctrl-C, passed on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # handled by number: SIGINT's (2) before SIGTERM's (15)
except KeyboardInterrupt as exc:
    stopped = exc  # held as a rank holds it while it stops
    print("stopped")
signal.pthread_kill(main, signal.SIGTERM)  # the kernel's, as the rank's parent ends
print("still stopping, SIGTERM ignored:", signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
"""


def test_a_sigterm_beside_a_ctrl_c_stops_a_save_once():
    """A rank's save stopped by a SIGTERM to the whole group, beside which its launcher passes a
    Ctrl-C on, and the kernel sends a SIGTERM again as the rank server ends: the SIGTERM, raised
    after the Ctrl-C as the block ended, left its handler in place, and the last SIGTERM raised
    again in the rank's exit, a traceback after the launcher's last line."""
    done = subprocess.run([sys.executable, "-c", _SIGTERM_BESIDE_CTRL_C], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.splitlines() == ["set back: True", "stopped", "still stopping, SIGTERM ignored: True"]


def _stopped_in_a_save_then_passed_a_ctrl_c(rank, then_failed, record):
    if rank == 1:  # still running: the launcher waits seconds for it, not ending rank 0 at once
        time.sleep(60)
    from multiprocessing import util

    def ending():  # last as the rank ends, its error sent: the launcher's Ctrl-C, passed on as it stops too
        Path(record).write_text(str(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL))
        os.kill(os.getpid(), signal.SIGINT)
    util.Finalize(None, ending, exitpriority=-100)
    try:
        with ranks.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
    finally:
        if then_failed:  # as a barrier after a save fails once the group's SIGTERM has ended a peer
            raise RuntimeError("a peer is gone")


@pytest.mark.parametrize("then_failed", [False, True], ids=["stopped", "failed as it stopped"])
def test_a_rank_stopped_by_sigterm_takes_no_second_ctrl_c(capfd, tmp_path, then_failed):
    """A rank stopped by the SIGTERM of its process group gets its first Ctrl-C from the launcher,
    which passes it on: raised in the rank's exit, it printed a traceback. Ending, the rank is
    killed by a SIGTERM again, as outside a save (the launcher's terminate ends it)."""
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)  # else the ranks ignore Ctrl-C anyway
    try:
        with pytest.raises(RankFailure) as info:
            run_ranks(_stopped_in_a_save_then_passed_a_ctrl_c, (then_failed, str(tmp_path / "sigterm")),
                      timeout_s=60)
    finally:
        signal.signal(signal.SIGINT, interactive)
    assert info.value.failures[0] == ("RuntimeError: a peer is gone" if then_failed else "stopped by SIGTERM")
    err = capfd.readouterr().err
    assert "Process rank0" not in err and "KeyboardInterrupt" not in err, err
    assert (tmp_path / "sigterm").read_text() == "True"


@pytest.mark.parametrize("addr, expected", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("192.0.2.1", False),
                                            ("no-such-host.invalid", False)])
def test_loopback_addresses_are_recognised_by_any_name(addr, expected):
    assert is_loopback(addr) is expected


def test_threads_share_the_cores(monkeypatch):
    cores = usable_cores()
    assert cpu_threads_per_rank(1) == cores
    assert cpu_threads_per_rank(2) == max(1, cores // 2)
    assert cpu_threads_per_rank(4 * cores) == 1  # never zero
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # taskset -c 0-2
    assert (cpu_threads_per_rank(1), cpu_threads_per_rank(2)) == (3, 1)


def test_a_dataloader_worker_s_error_is_its_last_line_however_it_was_raised_again():
    """torch raises a worker's error again as ``type(message=...)`` where the type takes one: its
    args are then empty, and only its str holds the worker's traceback."""
    class Msg(Exception):
        def __init__(self, message):
            super().__init__()
            self.message = message

        def __str__(self):
            return self.message

    worker = "Caught Msg in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n  File x\nMsg: m"
    assert ranks.error_line(Msg(message=worker)) == "Msg: m (in DataLoader worker process 3)"
    assert ranks.error_line(ValueError(worker)) == "Msg: m (in DataLoader worker process 3)"
    assert ranks.error_line(ValueError("plain")) == "ValueError: plain"


def test_a_rank_killed_by_a_real_time_signal_is_said_to_be_so():
    """signal.Signals has no name for one (SIGRTMIN + n): the launcher's report of the failure raised ValueError."""
    real_time = signal.SIGRTMIN + 5
    assert ranks._describe_exit(-real_time) == f"killed by signal {int(real_time)}"
    assert ranks._describe_exit(-signal.SIGKILL) == "killed by SIGKILL (the out-of-memory killer sends this)"


def test_placement_follows_the_gpus_visible():
    assert choose_placement("auto", 0)[:2] == ("gloo", "cpu")
    one = choose_placement("auto", 1)  # both towers on the one GPU, over gloo
    assert one[:2] == ("gloo", "cuda") and "NCCL refuses two ranks on one GPU" in one.why
    assert "tower 0 on cuda:0, tower 1 on cuda:0, exchanging over gloo" in one.describe()
    assert choose_placement("auto", 2)[:2] == ("nccl", "cuda")
    assert "tower 0 on cuda:0, tower 1 on cuda:1, exchanging over nccl" in choose_placement("auto", 8).describe()
    assert choose_placement("gloo", 2)[:2] == ("gloo", "cpu")
    for gpus in (0, 1):
        with pytest.raises(ValueError, match=r"--backend nccl needs one GPU per rank \(2 here\)"):
            choose_placement("nccl", gpus)


def test_replicas_take_one_gpu_per_rank_or_share_them_over_gloo():
    eight = choose_placement("auto", 8, ranks=8)  # 4 replicas of the towers
    assert eight[:2] == ("nccl", "cuda") and eight.replicas == 4
    assert "4 replicas of the two towers on 8 ranks (one GPU per rank)" in eight.describe()
    assert choose_placement("auto", 4, ranks=8)[:2] == ("gloo", "cuda")  # too few GPUs here: they are shared
    assert choose_placement("auto", 2, ranks=8, ranks_here=2)[:2] == ("nccl", "cuda")  # torchrun, 2 per machine
    assert "4 replicas of the two towers on 8 ranks (the CPU)" in choose_placement("auto", 0, ranks=8).describe()
    assert choose_placement("auto", 0, ranks=3, towers=1).replicas == 3
    with pytest.raises(ValueError, match=r"needs one GPU per rank \(4 here\) and this machine shows 2"):
        choose_placement("nccl", 2, ranks=4)


def test_the_single_layout_is_one_rank_on_one_device():
    assert choose_placement("auto", 0, ranks=1)[:3] == ("gloo", "cpu", "no GPU visible")
    assert choose_placement("auto", 1, ranks=1)[:2] == ("gloo", "cuda")  # a group of one never talks
    assert "the whole net on cuda:0, one process" in choose_placement("auto", 2, ranks=1).describe()
    with pytest.raises(ValueError, match="--backend nccl needs a GPU"):
        choose_placement("nccl", 0, ranks=1)


_ENDING = r"""
import atexit, concurrent.futures, sys, threading, time
from launch.cli import quick_exit

class Collected:
    def __del__(self):
        print("torn down")  # what the interpreter's teardown would do, and quick_exit skips

kept = Collected()
pool = concurrent.futures.ThreadPoolExecutor(1)  # left open: its idle thread must be told to end
with quick_exit():
    atexit.register(print, "exit handler ran")
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
    pool.submit(print, "pooled")
    print("buffered output")  # stdout is a pipe: held in Python's buffer until flushed
    code = sys.argv[1]
    if code != "end":
        sys.exit(int(code) if code.isdigit() else code)
"""


@pytest.mark.parametrize("how, exit_code", [("end", 0), ("0", 0), ("3", 3), ("a message", 1)])
@pytest.mark.parametrize("closed", [None, 1, 2], ids=["", "stdout-closed", "stderr-closed"])
def test_a_program_ending_quickly_ends_as_sys_exit_would_less_the_teardown(how, exit_code, closed):
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", _ENDING, how], cwd=ROOT, env=buffered, capture_output=True,
                            text=True, timeout=60, preexec_fn=None if closed is None else lambda: os.close(closed))
    assert result.returncode == exit_code, result.stderr
    if closed != 1:
        assert sorted(result.stdout.splitlines()) == sorted(["pooled", "buffered output", "thread finished",
                                                             "exit handler ran"])
        assert result.stdout.splitlines()[-1] == "exit handler ran"
    if closed != 2:
        assert result.stderr == ("a message\n" if how == "a message" else "")


def test_a_program_whose_output_s_reader_went_away_ends_with_the_interpreter_s_code_for_it():
    """Output that cannot be flushed at the end, its reader gone (a closed pipe), ends the
    program with the code the interpreter gives that (120), unless it ended with a code of
    its own; nothing is said of it."""
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    for how, exit_code in (("end", 120), ("3", 3)):
        read, write = os.pipe()
        os.close(read)
        try:
            result = subprocess.run([sys.executable, "-c", _ENDING, how], cwd=ROOT, env=buffered, stdout=write,
                                    stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write)
        assert (result.returncode, result.stderr) == (exit_code, ""), result.stderr


def test_a_process_whose_parent_died_before_it_asked_to_die_with_it_ends():
    """die_with_parent for a parent already gone (ended before prctl took effect): the process ends
    at once, with code 1, instead of living on with no one to end it. Its own parent, or one that
    lives but is not its own (as with a fork server's child: here a process beside it), lets it go on."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    beside = subprocess.Popen(["sleep", "120"])
    code = ("import os, sys\nfrom launch.ranks import die_with_parent\ndie_with_parent(int(sys.argv[1]))\n"
            "print('went on')\n")
    try:
        for parent, returncode, out in ((gone.pid, 1, ""), (os.getpid(), 0, "went on\n"), (beside.pid, 0, "went on\n")):
            done = subprocess.run([sys.executable, "-c", code, str(parent)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            assert (done.returncode, done.stdout) == (returncode, out), (parent, done.stderr[-2000:])
    finally:
        beside.kill()
        beside.wait()


def _set_up_as(rank):
    import multiprocessing
    return (torch.get_num_threads(), os.environ.get("GLOO_SOCKET_IFNAME"), os.environ.get("NCCL_SOCKET_IFNAME"),
            multiprocessing.get_start_method())


@pytest.mark.slow
@pytest.mark.parametrize("gloo", [None, "lo,lo"], ids=["gloo-unset", "gloo-named"])
def test_a_rank_takes_its_share_of_the_cores_the_loopback_interface_and_spawns_its_workers(monkeypatch, gloo):
    """Each gloo rank computes on its share of the cores (not every core, two ranks fighting over
    them); on a loopback address gloo and NCCL are pointed at lo (not the interface the host name
    resolves to) unless the caller named one (for gloo here lo twice, a list of interfaces it
    uses); and what a rank starts (DataLoader workers) is spawned."""
    if gloo is None:
        monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    else:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", gloo)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth9")  # the caller's choice, read by NCCL alone
    expected = (cpu_threads_per_rank(2), gloo or "lo", "eth9", "spawn")
    assert run_ranks(_set_up_as, timeout_s=60) == [expected, expected]


@pytest.mark.slow
@pytest.mark.parametrize("error", [OSError("the server is gone"), EOFError()], ids=["refused", "closed"])
def test_a_rank_that_could_not_be_started_stops_those_that_were(monkeypatch, error):
    """The rank server gone as rank 1 starts (its socket refused, or closed before it answered):
    rank 0, started already, is stopped, not left waiting for its peer (its rendezvous waits up
    to the collective timeout), and rank 1 is named."""
    started, start = [], multiprocessing.context.ForkServerProcess.start

    def start_or_fail(self):
        if started:
            raise error
        start(self)
        started.append(self)
    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "start", start_or_fail)
    try:
        with pytest.raises(RankFailure, match=rf"^rank 1 failed: could not be started: the rank server ended "
                                              rf"\({re.escape(repr(error))}\)$"):
            run_ranks(_sleep, (0,), timeout_s=60)
        assert len(started) == 1 and not started[0].is_alive()
    finally:
        for p in started:
            p.kill()
            p.join(10)


def _ignore_sigterm_and_sleep(ready):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(120)


def test_a_rank_that_ignores_sigterm_is_killed_when_the_ranks_are_stopped():
    """launch.ranks._stop on a process that ignores SIGTERM (as a rank does once a SIGTERM stopped it)
    ends it within seconds: it is killed, not waited for as long as it runs."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_ignore_sigterm_and_sleep, args=(ready,))
    process.start()
    try:
        assert ready.wait(60)  # its handler set
        stopping = threading.Thread(target=ranks._stop, args=([process], 0.0), daemon=True)
        stopping.start()
        stopping.join(20)
        assert not stopping.is_alive() and process.exitcode == -signal.SIGKILL
    finally:
        process.kill()
        process.join(10)


def _fail(rank, message):
    raise ValueError(message)


@pytest.mark.slow
def test_a_failed_run_does_not_keep_its_rendezvous_listening_while_its_error_is_held(monkeypatch):
    """The store's listener closes as the run ends, not when the RankFailure (whose traceback holds
    run_ranks's frame, and so the store) is dropped: pytest, a notebook or a retry loop keeps it.
    Nor does the launcher's SIGTERM stop it as a Ctrl-C does meanwhile: its handler is set back."""
    ports, store, before = [], dist.TCPStore, signal.getsignal(signal.SIGTERM)

    def store_of_port_told(*args, **kwargs):
        made = store(*args, **kwargs)
        ports.append(made.port)  # the number alone: the store itself is not held here
        return made
    monkeypatch.setattr(dist, "TCPStore", store_of_port_told)  # the launcher's; the ranks' are made elsewhere
    with pytest.raises(RankFailure) as info:
        run_ranks(_fail, ("a mistake",), timeout_s=60)
    assert set(info.value.failures) == {0, 1} and len(ports) == 1  # info holds run_ranks's frame in its traceback
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports[0]), timeout=10).close()
    assert signal.getsignal(signal.SIGTERM) is before


def _fail_or_return(rank, killed):
    if rank == 1:
        if killed:
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer ends it
        raise ValueError("rank 1's own words")
    if killed:
        dist.barrier()  # fails as its peer is gone
    return rank


@pytest.mark.slow
@pytest.mark.parametrize("killed", [False, True], ids=["raised", "killed"])
def test_ranks_that_ended_before_their_messages_were_read_are_told_by_them(monkeypatch, killed):
    """With the launcher made to read the queue only once every rank has ended: a rank whose message
    waits there is told by it, not as 'exited ... without reporting an error'; a rank killed without a word is
    named first, before the error its peer then met, whichever the launcher saw first."""
    procs, get = [], multiprocessing.queues.Queue.get

    def get_once_all_ended(self, *args, **kwargs):
        deadline = time.monotonic() + 60
        while procs and any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        return get(self, *args, **kwargs)
    monkeypatch.setattr(multiprocessing.queues.Queue, "get", get_once_all_ended)
    with pytest.raises(RankFailure) as info:
        run_ranks(_fail_or_return, (killed,), timeout_s=60, on_start=procs.extend)
    if killed:
        assert info.value.first == 1 and str(info.value).startswith("rank 1 failed: killed by SIGKILL"), info.value
    else:
        assert info.value.failures == {1: "ValueError: rank 1's own words"}, info.value.failures


@pytest.mark.slow
def test_the_launcher_does_not_wait_out_the_grace_once_every_rank_has_reported(monkeypatch):
    """The grace the other ranks get to stop by themselves once one failed ends as soon as each
    has answered: a run whose ranks all failed at once is told at once, not after the grace."""
    monkeypatch.setattr(ranks, "_GRACE_S", 120.0)
    started = []
    with pytest.raises(RankFailure):
        run_ranks(_same_mistake, timeout_s=30, on_start=lambda procs: started.append(time.monotonic()))
    assert time.monotonic() - started[0] < 20  # the grace waited out: the run's time limit, 30 s


def _rank_1_first(rank, folder) -> None:
    """Rank 1 goes on at once, marking it; rank 0 once rank 1 has, and its report has had time
    to reach the launcher."""
    went_on = Path(folder, "rank 1 went on")
    if rank == 1:
        went_on.touch()
        return
    deadline = time.monotonic() + 60
    while not went_on.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


def _rank_1_fails_first(rank, folder, first: Exception, then: Exception):
    """Rank 1 raises ``first``, then rank 0 ``then``."""
    _rank_1_first(rank, folder)
    raise first if rank == 1 else then


@pytest.mark.slow
def test_an_error_that_rank_0_tells_with_advice_is_named_in_its_words(tmp_path):
    """Rank 1's error, which says rank 0 tells what to do, reported first: the run names rank 0's."""
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_1_fails_first, (str(tmp_path), ValueError(f"the data moved. {ranks.ADVICE_FROM_RANK0}"),
                                        ValueError("the data moved: run again with --data at its new place")),
                  timeout_s=60)
    assert str(info.value).startswith("rank 0 failed: ValueError: the data moved: run again with --data"), info.value


def test_the_rank_server_starts_early_unless_torchrun_started_the_ranks(monkeypatch):
    """launch.rank_server.start_early: the server starts in a program's first lines (its imports
    then overlap the program's), but not under torchrun (RANK set), which starts the ranks itself
    (a server there would be a process per rank doing nothing), nor for --help; the limit on open
    files is raised under torchrun too."""
    calls = []
    monkeypatch.setattr(rank_server, "start", lambda: calls.append("start"))
    monkeypatch.setattr(rank_server, "room_for_open_files", lambda: calls.append("files"))
    monkeypatch.delenv("RANK", raising=False)
    rank_server.start_early(["prog", "--epochs", "1"])
    assert calls == ["files", "start"]
    calls.clear()
    rank_server.start_early(["prog", "--he"])
    assert calls == []
    rank_server.start_early(["prog", "--", "--epochs"])  # "--": what follows are arguments, not options
    assert calls == ["files", "start"]
    calls.clear()
    monkeypatch.setenv("RANK", "0")
    rank_server.start_early(["prog"])
    assert calls == ["files"]


def _exit_without_a_word(rank):
    os._exit(0)  # as a library that ends the process itself would: no error raised, nothing returned


@pytest.mark.slow
def test_a_rank_that_exits_with_0_without_returning_is_said_to_have_exited_not_killed():
    """Code 0 from a rank that never reported: not "killed by signal 0"."""
    with pytest.raises(RankFailure) as info:
        run_ranks(_exit_without_a_word, timeout_s=60)
    assert info.value.failures == {rank: "exited with code 0 without reporting an error" for rank in (0, 1)}


def _return_in_reverse(rank, folder):
    _rank_1_first(rank, folder)  # rank 1's value reaches the launcher first
    return rank


@pytest.mark.slow
def test_ranks_return_their_values_in_rank_order_whichever_returns_first(tmp_path):
    assert run_ranks(_return_in_reverse, (str(tmp_path),), timeout_s=60) == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("first_words", ["the data moved", f"the data moved. {ranks.ADVICE_FROM_RANK0}"],
                         ids=["plain", "rank 0 advises"])
def test_the_rank_that_failed_first_is_named_before_one_that_failed_otherwise_after_it(tmp_path, first_words):
    """Rank 0's later error is another one (its peer gone): rank 1's is the cause, also where rank 1
    says that rank 0 tells what to do next, as rank 0 says nothing of the kind."""
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_1_fails_first, (str(tmp_path), ValueError(first_words), RuntimeError("a peer is gone")),
                  timeout_s=60)
    assert info.value.first == 1 and str(info.value).startswith(f"rank 1 failed: ValueError: {first_words}\n"
                                                                f"rank 0 then stopped: RuntimeError: a peer is gone")


def _fail_or_run_on(rank):
    if rank == 1:
        raise ValueError("rank 1's own words")
    time.sleep(120)


@pytest.mark.slow
def test_a_rank_that_failed_before_the_deadline_is_named_before_those_still_running_at_it(monkeypatch):
    """The run's time limit passes while the launcher gives the other ranks their grace to stop:
    the rank that failed is the cause, not the first of those that were still running."""
    monkeypatch.setattr(ranks, "_GRACE_S", 120.0)
    with pytest.raises(RankFailure) as info:
        run_ranks(_fail_or_run_on, timeout_s=10)
    assert info.value.first == 1 and info.value.failures == {
        1: "ValueError: rank 1's own words", 0: "still running after the run's time limit of 10 s"}


def _fail_at_once_or_hang(rank, folder):
    if rank == 1:
        time.sleep(120)  # hung: it never answers
    Path(folder, "failed at").write_text(str(time.time()))
    raise ValueError("rank 0's own words")


@pytest.mark.slow
def test_a_rank_that_does_not_answer_after_a_failure_is_ended_after_the_grace(tmp_path):
    """Not at the run's time limit, nor some graces later: within seconds of the other rank's failure."""
    with pytest.raises(RankFailure) as info:
        run_ranks(_fail_at_once_or_hang, (str(tmp_path),), timeout_s=120)
    assert time.time() - float((tmp_path / "failed at").read_text()) < 2 * ranks._GRACE_S  # one grace, and room
    assert info.value.failures[1] == "did not respond (hung or stopped); ended by the launcher"


def _clean_up_as_it_ends(rank, folder):
    from multiprocessing import util
    util.Finalize(None, lambda: (time.sleep(0.5), Path(folder, f"cleaned up {rank}").touch()), exitpriority=0)
    return rank


@pytest.mark.slow
def test_ranks_that_returned_end_by_themselves_their_exit_handlers_run(tmp_path):
    """A run that went well waits for its ranks to end (their exit handlers: a log flushed, a
    temporary file removed), rather than terminating them as soon as their values arrive."""
    procs = []
    assert run_ranks(_clean_up_as_it_ends, (str(tmp_path),), timeout_s=60, on_start=procs.extend) == [0, 1]
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cleaned up 0", "cleaned up 1"]


def _ignore_ctrl_c_and_sleep(rank, folder):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a rank in a save that ignores it would
    Path(folder, f"started {rank}").touch()
    time.sleep(120)


def _stop_on_ctrl_c(rank, folder):
    try:
        Path(folder, f"started {rank}").touch()
        time.sleep(120)
    except KeyboardInterrupt:
        Path(folder, f"interrupted {rank}").touch()
        raise


def _interrupt_once_started(folder, interrupted):
    """on_start: a Ctrl-C of the launcher alone (not of its process group), once each rank runs its function."""
    deadline = time.monotonic() + 60
    while not all(Path(folder, f"started {rank}").exists() for rank in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    interrupted.append(time.monotonic())
    raise KeyboardInterrupt


@pytest.mark.slow
def test_a_ctrl_c_stops_ranks_that_ignore_it_within_one_grace_and_leaves_the_launchers_handlers(tmp_path):
    """The grace the ranks get to stop after a Ctrl-C is one for them all, not one each; then the
    launcher's own handlers of SIGINT and SIGTERM are as they were before the run, not ignored."""
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        procs, interrupted, before = [], [], signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            run_ranks(_ignore_ctrl_c_and_sleep, (str(tmp_path),), timeout_s=60,
                      on_start=lambda p: (procs.extend(p), _interrupt_once_started(tmp_path, interrupted)))
        # one grace, then the terminate (a grace each would take two): room for a loaded machine
        assert time.monotonic() - interrupted[0] < 2 * ranks._GRACE_S - 0.5
        assert [p.exitcode for p in procs] == [-signal.SIGTERM] * 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGINT, interactive)


@pytest.mark.slow
def test_a_ctrl_c_of_the_launcher_alone_is_passed_on_to_the_ranks(tmp_path):
    """A Ctrl-C that reached the launcher alone (or a SIGTERM to it alone): each rank gets one and
    stops as on a Ctrl-C of its own, ending with Ctrl-C's code (130), not terminated after the grace."""
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        procs, interrupted = [], []
        with pytest.raises(KeyboardInterrupt):
            run_ranks(_stop_on_ctrl_c, (str(tmp_path),), timeout_s=60,
                      on_start=lambda p: (procs.extend(p), _interrupt_once_started(tmp_path, interrupted)))
    finally:
        signal.signal(signal.SIGINT, interactive)
    assert [p.exitcode for p in procs] == [130, 130]
    assert {"interrupted 0", "interrupted 1"} <= {p.name for p in tmp_path.iterdir()}


def _handlers(rank):
    return signal.getsignal(signal.SIGINT) is rank_server._interrupt_once, signal.getsignal(signal.SIGTERM)


@pytest.mark.slow
def test_ranks_take_ctrl_c_as_their_launcher_does_and_leave_sigterm_to_it():
    """A launcher in the background of a script ignores SIGINT, and so do its ranks; one that takes
    Ctrl-C has ranks that take it (once). After the run, the launcher's SIGTERM is its own again."""
    interactive = signal.getsignal(signal.SIGINT)
    before = signal.getsignal(signal.SIGTERM)
    try:
        for launcher, in_rank in ((signal.SIG_IGN, False), (signal.default_int_handler, True)):
            signal.signal(signal.SIGINT, launcher)
            assert run_ranks(_handlers, timeout_s=60) == [(in_rank, signal.SIG_DFL)] * 2
            assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is launcher
    finally:
        signal.signal(signal.SIGINT, interactive)


_IN_A_THREAD = """
import threading
from launch.ranks import run_ranks

def rank_of_a_thread(rank):
    return rank

if __name__ == "__main__":
    values = []
    thread = threading.Thread(target=lambda: values.append(run_ranks(rank_of_a_thread, timeout_s=60)))
    thread.start()
    thread.join()
    print(values)
"""


@pytest.mark.slow
def test_ranks_can_be_run_from_a_thread_other_than_the_main_one(tmp_path):
    """Where signal handlers cannot be set (the rank server's start, the launcher's SIGTERM): left as they are."""
    result = _run_script(tmp_path, _IN_A_THREAD)
    assert (result.returncode, result.stdout) == (0, "[[0, 1]]\n"), result.stderr[-3000:]


def _output_of_a_rank(rank):
    print(f"out from rank {rank}", flush=True)
    print(f"err from rank {rank}", file=sys.stderr, flush=True)
    def target(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own, closed since
            return None
    same = {target(1), target(2)}
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd") if target(fd) in same)


@pytest.mark.slow
def test_a_rank_writes_its_output_and_errors_where_the_caller_s_go_and_holds_them_once(capfd):
    """Each to its own (not the output to the errors), the caller's descriptors taken as the rank's
    1 and 2, no copy of them left open besides."""
    assert run_ranks(_output_of_a_rank, timeout_s=60) == [[1, 2], [1, 2]]
    out, err = capfd.readouterr()
    for rank in (0, 1):
        assert f"out from rank {rank}" in out and f"out from rank {rank}" not in err, (out, err)
        assert f"err from rank {rank}" in err and f"err from rank {rank}" not in out, (out, err)


def _temporary_folder(rank):
    from multiprocessing import util
    return util.get_temp_dir()


@pytest.mark.slow
def test_a_rank_keeps_its_temporary_files_in_a_folder_of_its_own():
    """Not the launcher's multiprocessing folder, which goes as the launcher exits, under a rank's
    DataLoader workers still using it."""
    from multiprocessing import util
    launchers = util.get_temp_dir()
    folders = run_ranks(_temporary_folder, timeout_s=60)
    assert launchers not in folders and len(set(folders)) == 2, (launchers, folders)


def test_a_name_that_resolves_to_loopback_and_other_addresses_is_not_loopback(monkeypatch):
    """A host name in /etc/hosts as 127.0.1.1 and in DNS as the machine's outward address: gloo
    would be pointed at lo for ranks that must reach the other machines."""
    resolved = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: resolved)
    assert not is_loopback("host")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: resolved[:1])
    assert is_loopback("host")


def test_a_temporary_folder_whose_sockets_just_fit_is_kept(monkeypatch):
    """The sockets' addresses hold 107 bytes: a folder that leaves exactly that room is used as it is."""
    monkeypatch.setenv("TMPDIR", "/tmp")  # so that the TMPDIR set below is undone, there before or not
    monkeypatch.delenv("TMPDIR")
    fitting = "/" + "t" * (rank_server.SOCKET_PATH_MAX - rank_server.SOCKET_NAME - 1)
    monkeypatch.setattr(tempfile, "tempdir", fitting)
    rank_server.room_for_sockets()
    assert tempfile.tempdir == fitting and "TMPDIR" not in os.environ
    monkeypatch.setattr(tempfile, "tempdir", fitting + "t")
    rank_server.room_for_sockets()
    assert tempfile.gettempdir() == os.environ["TMPDIR"] != fitting + "t"


_STOPPED_TWICE = """
import os
from launch import rank_server
from launch.ranks import run_ranks

def rank_after_a_restart(rank):
    return rank

if __name__ == "__main__":
    from multiprocessing import forkserver
    rank_server.start()
    first, alive_fd = rank_server.pid(), forkserver._forkserver._forkserver_alive_fd
    socket_path = forkserver._forkserver._forkserver_address
    rank_server.stop()
    try:
        os.fstat(alive_fd)
        print("liveness pipe left open")
    except OSError:
        pass
    print("socket left" if os.path.exists(socket_path) else "socket removed")
    rank_server.stop()  # no server: nothing to do
    print(run_ranks(rank_after_a_restart, timeout_s=60), rank_server.pid() != first)
    rank_server.stop()
"""


@pytest.mark.slow
def test_a_stopped_rank_server_leaves_nothing_open_and_a_later_run_starts_another(tmp_path):
    """A program that stops the server (its options refused, its ranks ended) and then runs ranks
    again (a notebook, a loop of runs) gets a new server; the old one's pipe and socket are gone."""
    script = tmp_path / "script.py"
    script.write_text(_STOPPED_TWICE)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "socket removed\n[0, 1] True\n"), result.stderr[-3000:]


def test_a_failure_names_its_first_rank_and_says_which_others_stopped_on_the_same_error():
    failure = RankFailure({2: "ValueError: a", 0: "ValueError: a", 1: "RuntimeError: a peer is gone"}, 2)
    assert str(failure) == ("rank 2 failed: ValueError: a\nrank 0 then stopped: the same error\n"
                            "rank 1 then stopped: RuntimeError: a peer is gone")


def test_a_rank_that_exited_without_a_word_is_told_by_its_code_and_one_killed_by_its_signal():
    assert ranks._describe_exit(0) == "exited with code 0 without reporting an error"  # not "killed by signal 0"
    assert ranks._describe_exit(3) == "exited with code 3 without reporting an error"
    assert ranks._describe_exit(-signal.SIGTERM) == "killed by SIGTERM"


class _Group:
    def __init__(self, timeout):
        self.timeouts = [timeout.total_seconds()]

    def set_timeout(self, timeout):
        self.timeouts.append(timeout.total_seconds())


@pytest.mark.parametrize("barrier_error", [None, RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by "
                                                              "peer [127.0.0.1]:5"), RuntimeError("CUDA error")],
                         ids=["met", "a rank missing", "its own fault"])
def test_a_patient_group_meets_within_one_bound_waits_the_other_and_always_ends(monkeypatch, barrier_error):
    """Made with the meeting's bound, then given the long wait's; destroyed on leaving, also where
    the meeting failed (a rank missing: MissingRank; this rank's own fault: its own error)."""
    made, destroyed = [], []

    def barrier(group):
        if barrier_error is not None:
            raise barrier_error
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: made.append(_Group(timeout)) or made[-1])
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", destroyed.append)
    if barrier_error is None:
        expected = contextlib.nullcontext()
    elif "CUDA" in str(barrier_error):
        expected = pytest.raises(RuntimeError, match="^CUDA error$")
    else:
        expected = pytest.raises(ranks.MissingRank, match="Connection closed by peer")
    with expected:
        with patient_group(600, 5) as group:
            assert group is made[0]
    assert made[0].timeouts == ([5, 600] if barrier_error is None else [5]) and destroyed == made


def _nested_function(rank):
    def nested(rank):
        return rank
    return nested


def _named_partial(fn):
    """A partial given its function's name, which functools.partial does not flatten into a partial of it."""
    return functools.update_wrapper(functools.partial(fn), fn)


@pytest.mark.parametrize("wrap", [lambda fn: fn, functools.partial, lambda fn: functools.partial(_named_partial(fn))],
                         ids=["bare", "partial", "partial of a named partial"])
def test_a_nested_function_is_refused_by_its_name_however_deeply_a_partial_holds_it(wrap):
    """Not after pickle's own error (a local object), nor as a function the ranks could import."""
    with pytest.raises(ValueError, match=r"^the ranks cannot import <function _nested_function.<locals>.nested at "
                                         r"\w+> by its name: give a function defined at the top level"):
        ranks.check_importable(wrap(_nested_function(0)))
    ranks.check_importable(functools.partial(_named_partial(_sleep), seconds=0))


@pytest.mark.parametrize("soft, hard, raised_to", [(256, 4096, 1024), (256, resource.RLIM_INFINITY, 1024),
                                                   (64, 128, 128), (64, 100, 100), (2048, 4096, None),
                                                   (1024, 1024, None)])
def test_the_open_files_limit_is_raised_as_far_as_the_hard_limit_lets_it(monkeypatch, soft, hard, raised_to):
    """To 1024, or the hard limit below that; refused below 128, naming the limit it got."""
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    set_to = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: set_to.append(limits))
    if raised_to is not None and raised_to < rank_server.MIN_OPEN_FILES:
        with pytest.raises(ValueError, match=rf"^this program may hold {raised_to} files open at once \(the hard "
                                             rf"limit, ulimit -Hn\), fewer than the 128"):
            rank_server.room_for_open_files()
    else:
        rank_server.room_for_open_files()
    assert set_to == ([] if raised_to is None else [(raised_to, hard)])


@pytest.mark.parametrize("fails", [False, True], ids=["started", "failed"])
def test_the_resource_tracker_starts_quiet_and_leaves_the_warning_options_as_they_were(monkeypatch, fails):
    from multiprocessing import resource_tracker
    seen = []

    def ensure_running():
        seen.append(list(sys.warnoptions))
        if fails:
            raise OSError("no tracker")
    monkeypatch.setattr(resource_tracker, "ensure_running", ensure_running)
    monkeypatch.setattr(sys, "warnoptions", ["error::DeprecationWarning"])
    with pytest.raises(OSError) if fails else contextlib.nullcontext():
        rank_server._start_resource_tracker()
    assert seen == [["error::DeprecationWarning", rank_server.QUIET_TRACKER]]
    assert sys.warnoptions == ["error::DeprecationWarning"]


def test_the_rank_server_starts_with_ctrl_c_ignored_and_leaves_the_caller_s_handler(monkeypatch):
    import multiprocessing.forkserver as forkserver
    seen = []
    monkeypatch.setattr(rank_server, "room_for_sockets", lambda: None)
    monkeypatch.setattr(rank_server, "_start_resource_tracker", lambda: None)
    monkeypatch.setattr(forkserver, "set_forkserver_preload", lambda modules: None)
    monkeypatch.setattr(forkserver, "ensure_running", lambda: seen.append(signal.getsignal(signal.SIGINT)))
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rank_server.start()
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, interactive)


def _fake_server(monkeypatch, pid, alive_fd, address):
    import multiprocessing.forkserver as forkserver
    for name, value in (("_forkserver_pid", pid), ("_forkserver_alive_fd", alive_fd),
                        ("_forkserver_address", address)):
        monkeypatch.setattr(forkserver._forkserver, name, value)
    return forkserver._forkserver


def test_a_stopped_rank_server_is_killed_and_its_pipe_and_socket_go(monkeypatch, tmp_path):
    """launch.rank_server.stop, in this process, of a server stood in for by a process of its own."""
    server = subprocess.Popen(["sleep", "120"])
    read, write = os.pipe()
    os.set_blocking(read, False)  # a writing end left open: BlockingIOError, not a wait
    address = tmp_path / "listener-1"
    address.touch()
    try:
        fake = _fake_server(monkeypatch, server.pid, write, str(address))
        rank_server.stop()
        assert (fake._forkserver_pid, fake._forkserver_alive_fd, fake._forkserver_address) == (None, None, None)
        assert not address.exists() and os.read(read, 1) == b""  # the writing end closed: the reader sees its end
        with pytest.raises(ProcessLookupError):
            os.kill(server.pid, 0)  # killed and reaped
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            server.kill()


@pytest.mark.parametrize("folder, pid, left", [("pymp-abc", None, []), ("other", None, ["other"]),
                                               ("pymp-abc", 12345, ["pymp-abc", "pymp-abc/listener-1"])],
                         ids=["server", "not multiprocessing's folder", "the launcher"])
def test_a_rank_server_ending_removes_its_socket_and_its_launcher_s_emptied_folder(monkeypatch, tmp_path, folder,
                                                                                    pid, left):
    """In the server (no pid of a server of its own) its socket goes, and the folder that held it if
    that is multiprocessing's; in a launcher (the server's pid set) nothing."""
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "listener-1").touch()
    _fake_server(monkeypatch, pid, None, str(tmp_path / folder / "listener-1"))
    rank_server._remove_the_socket_as_the_server_ends()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == left


_AS_RANK = """
import multiprocessing, os, signal, sys
from multiprocessing import forkserver
from launch import rank_server
read, write = os.pipe()
os.set_blocking(read, False)  # a writing end left open: BlockingIOError, not a wait
forkserver._forkserver._forkserver_alive_fd = write  # the launcher's end of the server's liveness pipe
multiprocessing.current_process()._config["tempdir"] = "/the/launcher/s"
os.environ["ALEXNET_SERVER_S"] = "the server's"
rank_server.as_rank(({"ALEXNET_CALLER_S": "the caller's"}, sys.argv[1] == "interrupts", (None, None)))
print(sorted(name for name in os.environ if name.startswith("ALEXNET_")), os.read(read, 1),
      forkserver._forkserver._forkserver_alive_fd, signal.getsignal(signal.SIGINT) is rank_server._interrupt_once,
      multiprocessing.get_start_method(), "tempdir" in multiprocessing.current_process()._config)
"""


@pytest.mark.parametrize("interrupts", [True, False], ids=["interrupts", "ignores-ctrl-c"])
def test_a_rank_takes_its_callers_environment_and_ctrl_c_and_lets_go_of_the_servers_pipe(interrupts):
    """launch.rank_server.as_rank in a process of its own (torch-free): the caller's environment alone
    (not the server's), Ctrl-C as the caller takes it, the launcher's end of the liveness pipe closed
    (else the server outlives the launcher), its workers spawned, no temporary folder of the launcher's."""
    done = subprocess.run([sys.executable, "-c", _AS_RANK, "interrupts" if interrupts else "-"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (done.returncode, done.stdout) == (0, f"['ALEXNET_CALLER_S'] b'' None {interrupts} spawn False\n"), \
        done.stderr[-2000:]


_DIES_WITH_ITS_PARENT = """
import os, signal, sys, time
from multiprocessing import forkserver
from launch.ranks import die_with_parent
folder, beside = sys.argv[1], int(sys.argv[2])
read, write = os.pipe()
os.set_blocking(read, False)
forkserver._forkserver._forkserver_alive_fd = write  # as in a process the fork server started
die_with_parent(beside)  # alive, but not its parent: as the server's child
print(os.read(read, 1), forkserver._forkserver._forkserver_alive_fd, flush=True)
ready_read, ready_write = os.pipe()
if os.fork() == 0:  # the child, whose parent ends once it is set up
    signal.signal(signal.SIGTERM, lambda *args: (open(os.path.join(folder, "SIGTERM"), "w").close(), os._exit(0)))
    die_with_parent(os.getppid())
    os.write(ready_write, b"1")
    time.sleep(60)
    os._exit(1)
os.read(ready_read, 1)
os._exit(0)
"""


def test_a_process_that_dies_with_its_parent_gets_sigterm_and_lets_go_of_a_fork_servers_pipe(tmp_path):
    """die_with_parent: a SIGTERM (which a rank may handle to clean up) as the parent ends, not a SIGKILL;
    and a process the fork server started (its parent alive but another) closes the server's liveness pipe."""
    beside = subprocess.Popen(["sleep", "120"])
    try:
        done = subprocess.run([sys.executable, "-c", _DIES_WITH_ITS_PARENT, str(tmp_path), str(beside.pid)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert (done.returncode, done.stdout) == (0, "b'' None\n"), done.stderr[-2000:]
        deadline = time.monotonic() + 30
        while not (tmp_path / "SIGTERM").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "SIGTERM").exists()
    finally:
        beside.kill()
        beside.wait()


def test_the_ranks_of_a_caller_that_ignores_ctrl_c_ignore_it_too():
    """launch.rank_server.Caller: a launcher in the background of a script (SIGINT ignored) is not
    stopped by Ctrl-C, nor are its ranks; an interactive one's are."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert not rank_server.Caller().interrupts
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert rank_server.Caller().interrupts
    finally:
        signal.signal(signal.SIGINT, previous)
