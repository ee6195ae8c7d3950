"""Faults and bad input: no hangs, nothing lost, clear errors, no code run from a checkpoint.

Each test drives the real program (``python -m launch.two_gpu``) in its own process
group, injects the fault from outside (signals, broken files), and bounds every wait.
"""

import contextlib
import dataclasses
import datetime
import errno
import importlib
import io
import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import checkpoint, cli, rank_server, two_gpu
from launch import data as data_module
from launch.checkpoint import (FORMAT, checkpoint_payload, load_checkpoint, save_checkpoint, save_reference,
                              training_checkpoint_bytes)
from launch.config import TrainConfig, parse_config
from launch.meter import Metrics, RunFolderGone
from launch.ranks import MissingRank, choose_placement
from launch.cli import alive as _alive
from launch.cli import check_compile_backend
from launch.two_gpu import check_room_for_checkpoints, main
from towers import AlexNet, Architecture

from conftest import TINY as _TINY
from conftest import (ROOT, RUN_TIMEOUT_S, TRAINED_RUN, Run, as_background_job, as_foreground_job, cmdline,
                      kill_all_but_the_resource_tracker, launch, live_processes, reference_from_seed,
                      skip_without_namespaces, terminate_when_ready)

BOUND_S = 60  # a failure must end the whole run within this long
TINY = [*_TINY, "--log-every", "1", "--val-limit", "4"]


def _no_leftovers(run: Run, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while run.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not run.leftovers(), f"processes left behind: {run.leftovers()}"


def _start(tiny_data, tmp_path, *extra, name="run", **how):
    return Run("--data", tiny_data, "--out", tmp_path, "--run-name", name, "--epochs", "50", *TINY, *extra,
               run_dir=tmp_path / name, **how)


# ---------------------------------------------------------------- a /dev/shm too small for the workers' batches

def _small_dev_shm() -> list:
    """A command prefix that runs a command with a 2 MB /dev/shm of its own (a mount namespace),
    or [] where this machine does not allow one (no unshare, or no right to mount)."""
    prefix = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=2m tmpfs /dev/shm && exec "$@"', "sh"]
    try:
        return prefix if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


SMALL_DEV_SHM = _small_dev_shm()


@pytest.mark.slow
@pytest.mark.skipif(not SMALL_DEV_SHM, reason="needs unshare -m and the right to mount a tmpfs in it")
def test_batches_that_find_no_room_in_dev_shm_stop_the_run_naming_the_fix(tiny_data):
    """A container's /dev/shm (64 MB unless given more) too small for the workers' batches: the run
    stops within seconds, saying what to do, where before a worker's batch was dropped in its queue's
    thread and the ranks waited for it for good. Its data and folders lie outside /dev/shm, which
    the small one hides."""
    with tempfile.TemporaryDirectory(dir="/var/tmp" if os.path.isdir("/var/tmp") else None) as folder:
        data = shutil.copytree(tiny_data, Path(folder, "data"))
        started = time.monotonic()
        result = subprocess.run([*SMALL_DEV_SHM, sys.executable, "-m", "launch.two_gpu", "--data", data, "--out",
                                 Path(folder, "runs"), "--max-steps", "2", *TINY, "--batch-size", "16",
                                 "--workers", "1"],
                                cwd=ROOT, capture_output=True, text=True, timeout=BOUND_S + 60)
    assert result.returncode == 1 and time.monotonic() - started < BOUND_S, result.stderr[-3000:]
    # a batch of 16 crops is 2.4 MB; the worker's share of /dev/shm is reckoned at 2 batches of 16 base images
    assert re.search(r"data: --workers 1: their batches \(6 MB each worker\) may not fit in /dev/shm, which has [0-2] MB "
                     r"free: give --workers 0, or give /dev/shm 1 GB or more \(docker run --shm-size=1g\)",
                     result.stderr), result.stderr
    assert ("rank 0 failed: RuntimeError: the batches of 1 DataLoader workers found no room in /dev/shm (") in result.stderr
    assert "give fewer workers (--workers), or /dev/shm more room (docker run --shm-size)" in result.stderr


def test_the_default_workers_are_as_many_as_dev_shm_holds(monkeypatch, caplog):
    from launch.train import fit_shared_memory
    each = data_module.worker_bytes(128)  # 2 batches of 128 base images: 50 MB
    assert each == 2 * 128 * (3 * 256 * 256 + 8)
    monkeypatch.setattr(data_module, "shared_memory_free", lambda: 4 * each + 1)  # half: 2 workers' batches
    config = parse_config(["--batch-size", "128"])
    assert fit_shared_memory(14, config, loaders_here=1, say=True) == 2
    assert ("data: /dev/shm has 201 MB free, room for the batches of 2 DataLoader worker(s) of each rank that loads "
            "(each holds 2 batches of 128 images there, 50 MB), not of this machine's default 14: 2; give /dev/shm "
            "2 GB or more (docker run --shm-size=2g) to load faster") in caplog.text
    assert fit_shared_memory(14, config, loaders_here=2, say=False) == 1  # two loading ranks share it
    assert fit_shared_memory(2, config, loaders_here=1, say=True) == 2  # fits
    monkeypatch.setattr(data_module, "shared_memory_free", lambda: None)  # no /dev/shm: nothing to fit
    assert fit_shared_memory(14, config, loaders_here=1, say=True) == 14
    monkeypatch.setattr(data_module, "shared_memory_free", lambda: 4 * each + 1)
    caplog.clear()
    given = parse_config(["--batch-size", "128", "--workers", "3"])
    assert fit_shared_memory(3, given, loaders_here=1, say=True) == 3  # kept, and warned of
    assert "data: --workers 3: their batches (50 MB each worker) may not fit in /dev/shm, which has 201 MB free: " \
           "give --workers 2 or fewer" in caplog.text


# ---------------------------------------------------------------- a dead or hung peer never hangs the other

@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_ends_the_run_naming_it(tiny_data, tmp_path, rank):
    # Rank 0 loads the batches with DataLoader worker processes: they end with it.
    # Killed after a checkpoint (rank 0's case) or before the first (rank 1's), and told which way to go on.
    run = _start(tiny_data, tmp_path, *(["--workers", "2", "--checkpoint-every", "2"] if rank == 0 else []))
    run.wait_for_step(2)
    checkpoint = run.run_dir / "checkpoint.pt"
    deadline = time.monotonic() + BOUND_S
    while rank == 0 and not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(run.ranks()[rank], signal.SIGKILL)  # what the out-of-memory killer does
    assert run.wait() == 1
    _no_leftovers(run)
    # The advice is the last line, after what ends after the launcher too: multiprocessing's resource
    # tracker removes the semaphores of the workers' queues that rank 0 held, without a warning.
    err = run.stderr()
    assert f"rank {rank} failed: killed by SIGKILL" in err and "out-of-memory" in err
    if rank == 0:
        assert err.endswith(f"once the cause is fixed, go on from the last checkpoint with --resume {run.run_dir}\n"), err
    else:
        assert not checkpoint.exists()
        assert err.endswith(f"no checkpoint was written yet: once the cause is fixed, start the run again under "
                            f"another --run-name (or after removing {run.run_dir})\n"), err
    assert "Traceback" not in err


# Imported by every Python process the run starts (on PYTHONPATH): a save of a checkpoint stops
# before its sync, its whole temporary file written, until the process is killed.
_STOPS_IN_A_SAVE = """
import os, signal
_fsync = os.fsync
def fsync(fd):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    while ".checkpoint.pt.tmp-" in name:
        signal.pause()
    return _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["rank 0 killed", "SIGTERM to the group", "SIGTERM to rank 0"])
def test_a_save_cut_short_leaves_no_partial_file(tiny_data, tmp_path, monkeypatch, stop):
    """Rank 0 killed in a save (SIGKILL): the launcher removes the save's temporary file (of
    some 200 MB), which was left until a resume. The whole group told to end (SIGTERM, as a
    batch system or docker stop ends a job), or rank 0 alone: rank 0 stops its save as Ctrl-C
    does, removing it, and says so."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_STOPS_IN_A_SAVE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'hook'}{os.pathsep}{ROOT}")
    run = _start(tiny_data, tmp_path, "--checkpoint-every", "1")
    deadline = time.monotonic() + BOUND_S
    while not list(run.run_dir.glob(".checkpoint.pt.tmp-*")):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.stderr()
        time.sleep(0.05)
    if stop == "SIGTERM to the group":
        os.killpg(run.proc.pid, signal.SIGTERM)
    else:
        os.kill(run.ranks()[0], signal.SIGKILL if stop == "rank 0 killed" else signal.SIGTERM)
    assert run.wait() == (130 if stop == "SIGTERM to the group" else 1), run.stderr()
    _no_leftovers(run)
    assert not list(run.run_dir.glob(".checkpoint.pt.tmp-*")) and not (run.run_dir / "checkpoint.pt").exists()
    err = run.stderr()
    assert err.endswith(f"no checkpoint was written yet, so there is nothing to resume: start the run again under "
                        f"another --run-name (or after removing {run.run_dir})\n" if stop == "SIGTERM to the group"
                        else f"no checkpoint was written yet: once the cause is fixed, start the run again under "
                             f"another --run-name (or after removing {run.run_dir})\n"), err
    assert stop != "SIGTERM to rank 0" or "rank 0 failed: stopped by SIGTERM" in err, err


@pytest.mark.slow
def test_ctrl_c_stops_both_ranks(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path)
    run.wait_for_step(1)
    os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    assert run.wait() == 130
    assert "interrupted" in run.stderr() and "Traceback" not in run.stderr()
    assert not (run.run_dir / "checkpoint.pt").exists()  # step 1 of 7: no checkpoint yet
    assert f"nothing to resume: start the run again under another --run-name (or after removing {run.run_dir})" \
        in run.stderr()
    _no_leftovers(run)
    assert " interrupted: every rank stopped; no checkpoint was written yet" in (run.run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_run_stopped_after_its_last_epoch_is_told_what_is_left(trained_run, tmp_path):
    """A stop in the final evaluation, or after the summary is written, leaves a checkpoint at
    the end of the training: the advice is not the --resume that would be refused as finished."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").symlink_to(trained_run[0] / "checkpoint.pt")  # of its 1 epoch
    failure = two_gpu.RankFailure({1: "killed by SIGKILL"}, 1)
    ended = parse_config(["--epochs", "1"])
    missing = f"its checkpoint holds the end of its training (step 7); only the final evaluation is missing: " \
              f"evaluate it with --eval-only {folder} (or "
    for advice in (two_gpu._after_interrupt(ended, folder), two_gpu._after_failure(ended, folder, failure)):
        assert advice.endswith(f"{missing}train it longer with --resume {folder} --epochs N, N > 1)"), advice
    for damaged in (json.dumps({"steps": 6}), "[" * 100_000 + "]" * 100_000):  # of the run before it was resumed;
        (folder / "summary.json").write_text(damaged)  # nested beyond what the decoder can follow
        assert two_gpu._after_interrupt(ended, folder).startswith(missing)
    (folder / "summary.json").write_text(json.dumps({"steps": 7}))
    assert two_gpu._after_interrupt(ended, folder) == f"the run had ended, at step 7, and written its summary: " \
                                                      f"its results are in {folder}"
    (folder / "summary.json").unlink()
    steps = parse_config(["--epochs", "2", "--max-steps", "7"])  # ended by --max-steps in its first epoch
    assert two_gpu._after_interrupt(steps, folder) == \
        f"{missing}train on with --resume {folder} and a larger --max-steps, or none)"
    longer = parse_config(["--epochs", "2"])  # resumed for a second epoch, and stopped in it before a checkpoint
    assert two_gpu._after_interrupt(longer, folder) == f"resume with --resume {folder}"
    assert two_gpu._after_failure(longer, folder, failure) == \
        f"\nonce the cause is fixed, go on from the last checkpoint with --resume {folder}"
    evaluation = parse_config(["--eval-only", str(folder)])
    assert two_gpu._after_interrupt(evaluation, tmp_path / "eval") == \
        f"nothing to resume: run the evaluation again under another --run-name (or after removing {tmp_path / 'eval'})"


def test_a_failed_run_is_told_how_to_go_on_once_the_cause_is_fixed(tmp_path):
    """A wait that timed out (gloo's words or NCCL's watchdog) names --timeout; a run without a
    checkpoint, or an evaluation, starts again; a failure whose own line says what to do (outputs
    that are not numbers) gets nothing more."""
    run = tmp_path / "run"
    run.mkdir()
    config = parse_config(["--timeout", "90"])
    nccl = two_gpu.RankFailure({1: "RuntimeError: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL("
                                   "SeqNum=7, OpType=ALLGATHER) ran for 90000 milliseconds before timing out"}, 1)
    killed = two_gpu.RankFailure({0: "killed by SIGKILL"}, 0)
    timeout = ("\na rank waits at most --timeout 90 s for the other in an exchange: if the other was busy rather than "
               "stuck (a checkpoint written to a slow disk, a long evaluation), give a larger --timeout")
    again = f"\nno checkpoint was written yet: once the cause is fixed, start the run again under another --run-name " \
            f"(or after removing {run})"
    assert two_gpu._after_failure(config, run, nccl) == timeout + again
    assert two_gpu._after_failure(config, run, killed) == again
    evaluation = parse_config(["--eval-only", str(run), "--timeout", "90"])
    evaluate_again = f"\nonce the cause is fixed, run the evaluation again under another --run-name (or after " \
                     f"removing {run})"
    assert (two_gpu._after_failure(evaluation, run, nccl), two_gpu._after_failure(evaluation, run, killed)) == \
        (timeout + evaluate_again, evaluate_again)
    outputs = two_gpu.RankFailure({0: "NonFiniteOutputs: the net's outputs at step 3 are not all numbers: ..."}, 0)
    assert two_gpu._after_failure(config, run, outputs) == ""


@pytest.mark.slow
@pytest.mark.parametrize("job", [as_foreground_job, as_background_job], ids=["foreground", "background"])
def test_sigterm_to_the_launcher_alone_stops_the_ranks_at_once(tiny_data, tmp_path, job):
    """SIGTERM, as a scheduler or `timeout` sends it, to the program's process alone: the ranks
    stop in the step they are in, not some seconds (and steps, a checkpoint) later. In the
    background of a script (SIGINT ignored), a SIGINT to the whole group (the script's Ctrl-C)
    leaves the ranks training, as it leaves their launcher."""
    run = _start(tiny_data, tmp_path, job=job)
    run.wait_for_step(2)
    if job is as_background_job:
        os.killpg(run.proc.pid, signal.SIGINT)
        at = run.steps()
        run.wait_for_step(at + 2)
    os.kill(run.proc.pid, signal.SIGTERM)
    at = run.steps()
    assert run.wait() == 130
    err = run.stderr()
    assert run.steps() <= at + 1, err  # the step under way may still be logged
    assert "interrupted: every rank stopped" in err and "Traceback" not in err, err
    _no_leftovers(run)


@pytest.mark.slow
def test_sigterm_before_the_ranks_start_is_a_clean_stop(tmp_path):
    """While the built-in dataset is made (or a large --data scanned): SIGTERM stops the program
    as Ctrl-C does, saying so, with nothing left half-made."""
    cache, log = tmp_path / "cache", open(tmp_path / "log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "launch.two_gpu", "--out", str(tmp_path / "runs")], cwd=ROOT,
                            env=dict(os.environ, XDG_CACHE_HOME=str(cache)), stdout=log, stderr=log,
                            start_new_session=True)
    drawing = lambda: list(cache.glob("alexnet-towers/.textures10-*.partial-*/train/*/*.jpg"))
    assert terminate_when_ready(proc, drawing, log.name, timeout_s=BOUND_S) == 130
    text = Path(log.name).read_text()
    assert "interrupted before the ranks started: nothing was trained or written" in text, text[-3000:]
    assert "Traceback" not in text
    assert list(cache.glob("alexnet-towers/*")) == [] and not (tmp_path / "runs").exists()
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends when it sees the program gone
    while live_processes(session=proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_processes(session=proc.pid), [cmdline(pid) for pid in live_processes(session=proc.pid)]


def test_a_ctrl_c_as_the_run_folder_is_made_leaves_none_or_says_what_it_holds(tiny_data, tmp_path, monkeypatch, caplog):
    """Interrupted as its config.json is written, a new run leaves no folder (a next start under
    that --run-name was refused as "an earlier start of a run"); interrupted once the folder is
    whole, before the ranks start, it keeps it and says how to start again, not that nothing
    was written."""
    options = ["--data", str(tiny_data), "--out", str(tmp_path / "runs"), "--run-name", "run", *_TINY]
    real = two_gpu.write_whole

    def written_then_interrupted(path, write):
        real(path, write)
        raise KeyboardInterrupt
    monkeypatch.setattr(two_gpu, "write_whole", written_then_interrupted)
    assert main(options) == 130
    assert caplog.messages[-1] == "interrupted before the ranks started: nothing was trained or written"
    assert list((tmp_path / "runs").iterdir()) == []
    monkeypatch.setattr(two_gpu, "write_whole", real)
    monkeypatch.setattr(two_gpu, "_log_also_to", lambda path: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(options) == 130
    assert caplog.messages[-1] == (f"interrupted before the ranks started: nothing was trained; no checkpoint was "
                                   f"written yet, so there is nothing to resume: start the run again under another "
                                   f"--run-name (or after removing {tmp_path / 'runs' / 'run'})")
    assert sorted(p.name for p in (tmp_path / "runs" / "run").iterdir()) == [".lock", "config.json"]


@pytest.mark.slow
def test_ranks_do_not_outlive_a_killed_launcher(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path)
    temporary = run.temporary  # the launcher's: multiprocessing's folder, with the rank server's socket
    run.wait_for_step(1)
    ranks = run.ranks()
    assert [p.name[:5] for p in temporary.iterdir()] == ["pymp-"]
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and "Z" != Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
              for pid in ranks if Path(f"/proc/{pid}/stat").exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in ranks if Path(f"/proc/{pid}/stat").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"ranks {alive} outlived their launcher"
    # A launcher killed so cannot remove its temporary folder; the rank server, ending after it, does.
    while any(temporary.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(temporary.rglob("*")), sorted(temporary.rglob("*"))


_LOADING_PROCESS = """
import multiprocessing, sys
multiprocessing.set_start_method("spawn")  # as in a rank (launch.rank_server.as_rank)
from launch import data
batches = data.train_batches(data.open_data(sys.argv[1]), 4, seed=0, epoch=0, workers=2)
print("starting its workers", flush=True)
next(batches)
"""


def _processes_marked(marker: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    alive = set(live_processes())
    return [pid for pid in found if pid in alive]


@pytest.mark.slow
def test_dataloader_workers_end_with_a_process_killed_while_they_start(tiny_data):
    """A rank killed while its DataLoader workers still import torch: the workers end too, not
    only those that had started waiting for batches."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    marker = f"ALEXNET_TEST_LOADER={tag}"  # in the environment of the process and of all it starts
    loading = subprocess.Popen([sys.executable, "-c", _LOADING_PROCESS, str(tiny_data)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, env=dict(os.environ, ALEXNET_TEST_LOADER=tag))
    try:
        assert loading.stdout.readline() == "starting its workers\n"
        deadline = time.monotonic() + BOUND_S
        while len(_processes_marked(marker)) < 3:  # the process and its two workers
            assert time.monotonic() < deadline and loading.poll() is None, "the workers did not start"
            time.sleep(0.05)
    finally:
        loading.kill()
        loading.wait()
    try:
        assert len(_processes_marked(marker)) >= 2  # the workers, and the resource tracker they share
        deadline = time.monotonic() + BOUND_S
        while _processes_marked(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_marked(marker)
        assert not left, f"{left} (DataLoader workers, resource tracker) outlived the process that started them"
    finally:  # whatever failed, nothing is left running
        for pid in _processes_marked(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_hung_rank_is_found_by_the_timeout(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path, "--timeout", "5")
    run.wait_for_step(1)
    os.kill(run.ranks()[1], signal.SIGSTOP)  # alive but silent
    assert run.wait() == 1
    err = run.stderr()
    assert "rank 1 failed: did not respond" in err, err
    # rank 0's own line names the wait that ran out, in gloo's words: "Timed out ..." of that wait, or
    # "Application timeout caused pair closure" of another on the same peer
    rank0 = next(line for line in err.splitlines() if line.startswith("rank 0 then stopped: "))
    assert "timed out" in rank0.lower() or "application timeout caused pair closure" in rank0.lower(), err
    assert "a rank waits at most --timeout 5 s for the other in an exchange: if the other was busy" in err, err
    _no_leftovers(run)


# ---------------------------------------------------------------- nothing lost

@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, checkpoint_payload(reference_from_seed(10, 1).state_dict(), num_classes=10, step=1))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys; from launch.checkpoint import *; from towers import build_reference\n"
        "save_checkpoint(sys.argv[1], checkpoint_payload(build_reference(1000, seed=2).state_dict(), num_classes=1000))"),
        str(path)], cwd=ROOT)
    deadline = time.monotonic() + BOUND_S
    while not any(p.stat().st_size > 1 << 20 for p in tmp_path.glob(".checkpoint.pt.tmp-*")):
        assert writer.poll() is None and time.monotonic() < deadline, "the save finished before it could be killed"
        time.sleep(0.005)
    writer.kill()
    writer.wait()
    payload = load_checkpoint(path)
    assert payload["step"] == 1 and payload["arch"]["num_classes"] == 10
    assert torch.equal(payload["model"]["conv1.weight"], reference_from_seed(10, 1).conv1.weight)
    save_checkpoint(path, checkpoint_payload(reference_from_seed(10, 1).state_dict(), num_classes=10, step=2))
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*")), "the killed save's temporary file was not cleared"


def test_a_save_clears_only_the_temporary_files_of_killed_saves_on_this_machine(tmp_path):
    """Two runs caching the same statistics at once: neither removes the other's file in the making."""
    path, host = tmp_path / "stats.pt", socket.gethostname()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    zombie = subprocess.Popen(["true"])  # ended, not yet reaped by its parent (as a rank whose fork server was killed)
    while _alive(zombie.pid):
        time.sleep(0.01)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        kept = [f".stats.pt.tmp-{host}-{alive.pid}", f".stats.pt.tmp-another-host-{ended.pid}"]
        cleared = [f".stats.pt.tmp-{host}-{ended.pid}", f".stats.pt.tmp-{ended.pid}",  # the older name: this machine's
                   f".stats.pt.tmp-{host}-{os.getpid()}", f".stats.pt.tmp-{host}-{zombie.pid}"]
        for name in kept + cleared:
            (tmp_path / name).write_bytes(b"half a file")
        save_checkpoint(path, {"mean": torch.ones(3)})
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["stats.pt"])
    assert torch.equal(torch.load(path, weights_only=True)["mean"], torch.ones(3))


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()],
                         ids=["disk", "ctrl-c"])
def test_a_failing_disk_is_reported_as_the_disks_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                         error):
    """An I/O error in the middle of the write (torch.save reports it as its own RuntimeError
    from closing the archive): the OSError itself reaches the caller, nothing is left behind.
    So does a Ctrl-C there: the run is interrupted, not failed."""
    path = tmp_path / "checkpoint.pt"
    payload = lambda step: checkpoint_payload(reference_from_seed(10, 1).state_dict(), num_classes=10, step=step)
    save_checkpoint(path, payload(1))

    class Failing(io.FileIO):  # one write past the first MB fails, as a bad sector would
        failed = False

        def write(self, data):
            if self.tell() > 1 << 20 and not Failing.failed:
                Failing.failed = True
                raise error
            return super().write(data)

    monkeypatch.setattr(checkpoint, "open", lambda name, mode: io.BufferedWriter(Failing(name, mode)) if "w" in mode
                        else io.open(name, mode), raising=False)  # the save's; a load's reads as it does
    with pytest.raises(type(error)) as info:
        save_checkpoint(path, payload(2))
    assert info.value is error and not isinstance(info.value, RuntimeError)
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


_FULL_DISK = r"""
import json, logging, os, sys
from pathlib import Path
from launch import builtin, checkpoint, stats
from launch.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from towers import build_reference

logging.basicConfig(level=logging.WARNING, format="%(message)s")
big, small = Path(sys.argv[1]), Path(sys.argv[2])
path = big / "run" / "checkpoint.pt"
weights = build_reference(10).state_dict()  # one draw: each checkpoint takes the same room
save_checkpoint(path, checkpoint_payload(weights, num_classes=10, step=1))
out = {}
try:  # a second one does not fit beside the first (it is written beside it, then renamed over it)
    save_checkpoint(path, checkpoint_payload(weights, num_classes=10, step=2))
except OSError as exc:
    out["error"] = str(exc)
real_usage = checkpoint.shutil.disk_usage  # the space taken after the check: the write itself fails
checkpoint.shutil.disk_usage = lambda folder: real_usage(folder)._replace(free=1 << 40)
try:
    save_checkpoint(path, checkpoint_payload(weights, num_classes=10, step=3))
except OSError as exc:
    out["error_while_writing"] = str(exc)
checkpoint.shutil.disk_usage = real_usage
out["kept_step"] = load_checkpoint(path)["step"]
out["leftovers"] = sorted(p.name for p in path.parent.iterdir() if p.name != "checkpoint.pt")

data = builtin.builtin_dataset(small / "data", train_per_class=2, val_per_class=1)
with open(small / "filler", "wb") as f:  # the rest of the data's disk
    try:
        while True:
            f.write(bytes(65536))
            f.flush()
    except OSError:
        pass
from launch.data import open_data
bundle = open_data(data, cache_dir=small / "cache")
out["stats_images"] = bundle.stats.images
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_resumed_run_holds_no_checkpoint_it_replaced(tiny_data, tmp_path):
    """The checkpoint a resumed run started from, read with mmap, held by the launcher for the
    whole run: the file its first save replaces kept its disk space (a third checkpoint's, where
    the run checked room for two) until the run ended."""
    launch("--data", tiny_data, "--out", tmp_path, "--run-name", "run", "--max-steps", "2", *TINY)
    run = Run("--resume", tmp_path / "run", "--max-steps", "200", "--checkpoint-every", "1", run_dir=tmp_path / "run")
    try:
        run.wait_for_step(5)  # three saves after the resume: the first checkpoint replaced long since
        held = {}
        for pid in [run.proc.pid, *run.ranks()]:
            with contextlib.suppress(FileNotFoundError):
                held[pid] = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                             if "checkpoint.pt" in line and "(deleted)" in line]
        assert not any(held.values()), held
    finally:
        run.proc.send_signal(signal.SIGINT)
        run.wait()


def test_the_temporary_files_of_another_user_s_live_process_are_not_taken_for_abandoned(monkeypatch):
    """A shared cache (the statistics, the built-in set): another user's process that runs cannot
    be signalled (EPERM), and its work in progress is not removed; an ended one's is."""
    host = socket.gethostname()

    def kill_raising(error):
        def kill(pid, signal):
            raise error
        return kill
    monkeypatch.setattr(os, "kill", kill_raising(PermissionError(errno.EPERM, "Operation not permitted")))
    other = os.getpid() + 1  # not this process, whose own work is its to remove
    assert not cli.abandoned(f"{host}-{other}")
    monkeypatch.setattr(os, "kill", kill_raising(ProcessLookupError(errno.ESRCH, "No such process")))
    assert cli.abandoned(f"{host}-{other}") and not cli.abandoned(f"another-host-{other}")


def test_temporary_files_are_taken_for_abandoned_by_their_owner_s_name_on_this_machine():
    """"HOST-PID" or "PID": a process of this machine that has ended, or this process itself
    (whose own work reuses the name), left it; a live process's, another machine's and a name
    that is no process's are left alone."""
    host, ended = socket.gethostname(), 2**22 + 1  # beyond the largest process id Linux gives
    assert cli.abandoned(f"{host}-{ended}") and cli.abandoned(str(ended)) and cli.abandoned(f"{host}-{os.getpid()}")
    assert not cli.abandoned(f"{host}-{os.getppid()}") and not cli.abandoned(f"another-host-{ended}")
    assert not cli.abandoned(f"{host}-x{ended}") and not cli.abandoned("partial")


def test_a_save_measures_its_room_before_it_writes_and_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    """The room a checkpoint needs counts each storage once (a one-rank save holds views of one
    vector: counted per view, a save would be refused on a disk with room); a disk without that
    room is refused before a byte is written (else the disk fills for every other writer); a
    save that is made is synced, the file before its rename and the folder after it (a power
    cut keeps the previous file or the new one, whole)."""
    vector = torch.zeros(1000)
    assert checkpoint._saved_bytes({"a": vector[:10], "b": [vector[10:]]}) == 4000 + 256 + (1 << 20)
    assert checkpoint._saved_bytes({"a": vector, "b": torch.zeros(10)}) == 4040 + 2 * 256 + (1 << 20)
    real_usage, real_open = checkpoint.shutil.disk_usage, open
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda folder: real_usage(folder)._replace(free=1 << 20))
    monkeypatch.setattr(checkpoint, "open", lambda *args: pytest.fail(f"opened {args[0]} to write"), raising=False)
    with pytest.raises(OSError, match="it needs") as refused:
        save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"weights": torch.zeros(1 << 20)})
    assert refused.value.errno == errno.ENOSPC and list((tmp_path / "run").iterdir()) == []
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", real_usage)
    monkeypatch.setattr(checkpoint, "open", real_open, raising=False)
    synced = []

    def fsync(fd):
        synced.append(("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file",
                       (tmp_path / "run" / "checkpoint.pt").exists()))
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"weights": torch.zeros(10)})
    assert synced == [("file", False), ("folder", True)]


@pytest.mark.slow
def test_a_full_disk_is_named_and_loses_nothing(tmp_path):
    """A real full disk: small tmpfs mounts in a mount namespace of the test's own."""
    big, small, program = tmp_path / "big", tmp_path / "small", tmp_path / "full_disk.py"
    big.mkdir(), small.mkdir()
    program.write_text(_FULL_DISK)
    script = (f"mount -t tmpfs -o size=300m tmpfs {big} && mount -t tmpfs -o size=3m tmpfs {small} && "
              f"exec {shlex.quote(sys.executable)} {program} {big} {small}")
    try:
        result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                                capture_output=True, text=True, timeout=BOUND_S * 3)
    except FileNotFoundError:
        pytest.skip("no unshare command: cannot make a small disk without touching the machine's mounts")
    if result.returncode != 0 and "mount" in result.stderr and not result.stdout:
        pytest.skip(f"cannot mount a small disk here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    # a checkpoint of 10 classes is 228 MB (57 million float32 weights): a second does not fit beside it on 300 MB
    assert "No space left" not in out["error"] and "unexpected pos" not in out["error"]
    assert "no space left for" in out["error"] and "MB free" in out["error"]
    assert 227 < float(out["error"].split("it needs ", 1)[1].split(" MB")[0]) < 229  # the weights and a little more
    assert "the previous one is whole" in out["error"]
    assert out["error_while_writing"].startswith(f"[Errno 28] no space left for {big / 'run' / 'checkpoint.pt'}: ")
    assert "the previous one is whole" in out["error_while_writing"]
    assert out["kept_step"] == 1 and out["leftovers"] == []
    # The statistics are computed, and the failure to cache them on the full disk is a warning.
    assert out["stats_images"] == 20
    assert "could not cache the training-set statistics" in result.stderr
    assert "will be computed again next time" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_weights(tiny_data, trained_run, tmp_path):
    """trained_run again (FC8 split, whose 5 + 5 neurons shard otherwise than the default;
    dropout on), saving every 3 steps, its processes killed with SIGKILL, then resumed: it
    ends with exactly the uninterrupted run's weights and momentum."""
    common = ["--data", tiny_data, "--out", tmp_path, "--run-name", "parts", *TRAINED_RUN, "--no-ten-crop"]
    parts = Run(*common, "--checkpoint-every", "3", run_dir=tmp_path / "parts")  # saving only, not training
    parts.wait_for_step(4)  # a checkpoint exists at step 3; the kill may land inside the save of step 6
    kill_all_but_the_resource_tracker(parts.proc.pid)
    parts.wait()
    killed = load_checkpoint(tmp_path / "parts")
    assert 3 <= killed["progress"]["global_step"] < 7 and set(killed["rng"]) == {"rank0", "rank1"}
    # Resumed with DataLoader worker processes inside rank 0 (the tiny runs load in the rank itself):
    # the batches are a function of (seed, epoch, position) alone.
    resumed = Run("--resume", tmp_path / "parts", "--workers", "2", "--no-ten-crop", "--log-every", "2",
                  run_dir=tmp_path / "parts")
    assert resumed.wait(timeout_s=300) == 0, resumed.stderr()
    a, b = load_checkpoint(trained_run[0]), load_checkpoint(tmp_path / "parts")
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 7
    assert b["config"]["fc8_placement"] == "split"
    # Exactly equal, not close: the same batches, augmentation and dropout masks, the same arithmetic.
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["momentum_buffer"]:
        assert torch.equal(a["momentum_buffer"][key], b["momentum_buffer"][key]), key
    # metrics.jsonl holds each step once: the records written after the killed run's checkpoint
    # (step 4 at least) are dropped for the resumed run's, after a record of the resume.
    # Each step's own loss is the uninterrupted run's, exactly.
    records = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    resumes = [i for i, r in enumerate(records) if r["event"] == "resume"]
    assert len(resumes) == 1 and records[resumes[0]]["step"] == killed["progress"]["global_step"]
    assert all(r["step"] <= killed["progress"]["global_step"] for r in records[:resumes[0]])
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 7 and 4 in steps
    uninterrupted = {r["step"]: r["step_loss"] for r in map(json.loads, (trained_run[0] / "metrics.jsonl").open())
                     if r["event"] == "train"}
    assert {r["step"]: r["step_loss"] for r in records if r["event"] == "train" and r["step"] in uninterrupted} \
        == {step: uninterrupted[step] for step in steps if step in uninterrupted}
    # what the resumed start sent per step: per step of its own, as the uninterrupted run's
    whole, part = (json.loads((run / "summary.json").read_text()) for run in (trained_run[0], tmp_path / "parts"))
    assert part["steps_this_run"] == 7 - killed["progress"]["global_step"]
    assert part["exchange_bytes_per_step"] == whole["exchange_bytes_per_step"] > 0
    assert part["exchanges_per_step"] == whole["exchanges_per_step"]


def _images_lost_while_it_trains(tiny_data, tmp_path, which, *options) -> tuple:
    """(the output, the images' bytes) of a run on a copy of tiny_data whose images ``which(data)``
    become unusable after its first step (their disk gone), which ends it (exit 1)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = Run("--data", data, "--out", tmp_path, "--run-name", "run", "--epochs", "2", "--log-every", "1",
              *TINY, *options, run_dir=tmp_path / "run")
    run.wait_for_step(1)
    os.killpg(run.proc.pid, signal.SIGSTOP)  # the epoch cannot end before every image is lost
    kept = {p: p.read_bytes() for p in sorted(which(data)) if p.is_file()}
    for path in kept:
        path.write_bytes(b"no longer an image")
    os.killpg(run.proc.pid, signal.SIGCONT)
    assert run.wait(timeout_s=300) == 1
    return run.stderr(), kept


@pytest.mark.slow
def test_validation_images_lost_at_an_epoch_s_end_keep_its_training(tiny_data, tmp_path):
    """The validation images become unusable while the first epoch trains (their disk gone):
    its evaluation fails, and the run saves the epoch's training before it stops, which a
    resume, once the images are back, evaluates and goes on from."""
    err, kept = _images_lost_while_it_trains(tiny_data, tmp_path, lambda data: (data / "val").rglob("*"))
    assert "none of the" in err and "validation images could be used" in err, err[-2000:]
    assert f"go on from the last checkpoint with --resume {tmp_path / 'run'}" in err, err[-2000:]
    saved = load_checkpoint(tmp_path / "run")["progress"]
    assert (saved["epoch"], saved["batch"], saved["global_step"]) == (0, 7, 7)  # the epoch trained, not evaluated
    for path, picture in kept.items():
        path.write_bytes(picture)
    resumed = Run("--resume", tmp_path / "run", "--max-steps", "8", "--no-ten-crop", run_dir=tmp_path / "run")
    assert resumed.wait(timeout_s=300) == 0, resumed.stderr()[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records if r["event"] == "eval"] == [(1, 7)]  # then a step of epoch 2
    assert load_checkpoint(tmp_path / "run")["progress"]["global_step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["train/", "a class"])
def test_training_images_lost_while_the_run_trains_stop_it_keeping_its_steps(tiny_data, tmp_path, lost):
    """The training images become unusable while the first epoch trains: all of them (their
    disk gone) stops both ranks at once, none of a class (its folder gone, each image another
    class's stand-in) at the epoch's end. Either way the run saves the steps it took, says why
    in one line (not a rank's lost connection), and a resume, once the images are back, goes
    on. Else the class was never learnt (exit 0), or the epoch's steps were lost."""
    def lost_images(data):
        images = sorted(p for p in (data / "train").rglob("*") if p.is_file())
        return [p for p in images if p.parent.name == images[-1].parent.name] if lost == "a class" else images

    err, kept = _images_lost_while_it_trains(tiny_data, tmp_path, lost_images, "--batch-size", "2")  # 15 steps
    images = sorted(kept)
    assert "Connection closed" not in err and "lost another rank" not in err, err[-3000:]
    assert "\nrank 1 then stopped: the same error\n" in err, err[-3000:]
    assert f"go on from the last checkpoint with --resume {tmp_path / 'run'}" in err, err[-2000:]
    saved = load_checkpoint(tmp_path / "run")["progress"]
    if lost == "train/":
        assert "DataError: no usable image in train/: each of its 30 files failed" in err, err[-2000:]
        assert saved["epoch"] == 0 and 1 <= saved["batch"] == saved["global_step"] < 15, saved
    else:
        assert f"DataError: no usable image of class {images[0].parent.name} in train/: each of its 3 files" in err
        assert (saved["epoch"], saved["batch"], saved["global_step"]) == (0, 15, 15)  # trained, not evaluated
    for path, picture in kept.items():
        path.write_bytes(picture)
    resumed = Run("--resume", tmp_path / "run", "--max-steps", "16", "--no-ten-crop", run_dir=tmp_path / "run")
    assert resumed.wait(timeout_s=300) == 0, resumed.stderr()[-2000:]
    assert load_checkpoint(tmp_path / "run")["progress"]["global_step"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("then", ["moved", "replaced"])
def test_a_run_folder_moved_while_the_run_trains_is_not_written_in_again(tiny_data, tmp_path, then):
    """The run folder renamed after a checkpoint (and another folder made in its place): the
    next save made it again (or wrote into the other), unlocked, and the run went on there
    (exit 0), its log and first checkpoint in the folder moved. The run stops at the save,
    saying so, and the folder where it was moved goes on from its checkpoint."""
    run, deadline = _start(tiny_data, tmp_path, "--checkpoint-every", "2", "--log-every", "50"), time.monotonic() + 240
    while not (tmp_path / "run" / "checkpoint.pt").exists():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.stderr()[-2000:]
        time.sleep(0.05)
    (tmp_path / "run").rename(tmp_path / "moved")
    if then == "replaced":
        (tmp_path / "run").mkdir()
    assert run.wait(timeout_s=120) == 1
    err = run.stderr()
    assert f"RunFolderGone: {tmp_path / 'run'} is gone: it was moved, removed or replaced while the run trained. " \
           f"The run stops rather than write elsewhere than where it began, which would split it between two " \
           f"folders: where it was moved, --resume with its new place goes on from its last checkpoint (or says " \
           f"what to do instead); if it was removed, start the run again" in err, err[-2000:]
    assert "no checkpoint was written" not in err and "start the run again with" not in err, err[-2000:]
    assert not (tmp_path / "run").exists() if then == "moved" else not any((tmp_path / "run").iterdir())
    assert load_checkpoint(tmp_path / "moved")["progress"]["global_step"] == 2
    if then == "replaced":
        return
    # the records of a run with --log-every 1: the first written after the move stops it too
    metrics = Metrics(tmp_path / "moved" / "metrics.jsonl")
    metrics.write(event="train", step=1)
    (tmp_path / "moved").rename(tmp_path / "again")
    with pytest.raises(RunFolderGone):
        metrics.write(event="train", step=2)
    assert not (tmp_path / "moved").exists()
    # removed and made again: the new folder would take the old one's inode number, were that not held
    for _ in range(5):
        metrics = Metrics(tmp_path / "again" / "metrics.jsonl")
        shutil.rmtree(tmp_path / "again")
        (tmp_path / "again").mkdir()
        with pytest.raises(RunFolderGone):
            metrics.write(event="train", step=3)
    # a Metrics made before its folder takes the folder made after it, an earlier one's in this process or not
    for _ in range(2):
        metrics = Metrics(tmp_path / "later" / "metrics.jsonl")
        (tmp_path / "later").mkdir()
        metrics.write(event="train", step=1)
        assert (tmp_path / "later" / "metrics.jsonl").exists()
        shutil.rmtree(tmp_path / "later")


@pytest.mark.slow
def test_outputs_that_are_not_numbers_are_never_scored(trained_run, tmp_path):
    """Weights that ran away after the last finite loss: finite, but the net's outputs overflow
    (NaN after the softmax). Their top-k picks arbitrary classes, which the evaluation scored as
    guesses (87.5 % top-1 error, exit 0); it says instead what happened and what to do."""
    payload = load_checkpoint(trained_run[0])
    model = dict(payload["model"])
    fc8 = model["fc8.weight"].clone()
    fc8[0], fc8[1] = 3e38, -3e38  # logits of +inf and -inf: the softmax's NaN
    save_checkpoint(tmp_path / "ran-away.pt", dict(payload, model=dict(model, **{"fc8.weight": fc8})))
    result = launch("--eval-only", tmp_path / "ran-away.pt", "--out", tmp_path, "--run-name", "eval",
                    "--val-limit", "4", "--workers", "0", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the run stopped: rank 0 failed: launch.train.NonFiniteOutputs: the net's outputs for 4 of the 4 " \
           "validation images are not finite numbers (NaN or infinite): " in result.stderr, result.stderr[-2000:]
    assert f"{tmp_path / 'ran-away.pt'} holds the weights of a run that diverged: evaluate a checkpoint saved " \
           f"before they ran away" in result.stderr
    assert "top-1 error" not in result.stderr and not (tmp_path / "eval" / "summary.json").exists()


@pytest.mark.slow
def test_the_advice_after_a_divergence_reads_the_checkpoint_that_load_checkpoint_refuses(tmp_path):
    """--max-steps saves the last update's weights before the final evaluation: infinite ones, the
    advice failed on load_checkpoint's refusal of them (a CheckpointError, whose own advice, an
    earlier checkpoint, there was none of)."""
    from launch.train import _after_divergence
    config = parse_config(["--lr", "0.5"])
    state = reference_from_seed(10, 0).state_dict()
    payload = checkpoint_payload(state, num_classes=10, progress={"global_step": 5, "loss": 2.0})
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    assert _after_divergence(config, tmp_path, 10) == (f"Go on from the last checkpoint (step 5, loss 2) at a lower "
                                                       f"rate: --resume {tmp_path} --lr 0.05")
    # the threshold, 10 x ln(10 classes) = 23.03, lies between them
    for loss, advice in ((23.0, "Go on from the last checkpoint"), (23.1, "The loss had already run away")):
        save_checkpoint(tmp_path / "checkpoint.pt", dict(payload, progress={"global_step": 5, "loss": loss}))
        assert _after_divergence(config, tmp_path, 10).startswith(advice), loss
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    assert _after_divergence(config, tmp_path, 10, weights_of=5) == (
        "The last checkpoint (step 5) holds these weights, so resuming it would not help: start again with a lower "
        "--lr (such as 0.05) or a longer --warmup-steps")
    state["fc8.weight"] = state["fc8.weight"].clone()
    state["fc8.weight"][0, 0] = float("inf")
    save_checkpoint(tmp_path / "checkpoint.pt", dict(payload, model=state))
    assert _after_divergence(config, tmp_path, 10, weights_of=6) == (
        "The last checkpoint (step 5) holds weights that are not finite numbers, so resuming it would not help: start "
        "again with a lower --lr (such as 0.05) or a longer --warmup-steps")
    (tmp_path / "checkpoint.pt").write_bytes(b"damaged")
    assert _after_divergence(config, tmp_path, 10).startswith("The last checkpoint cannot be read: start again")
    save_checkpoint(tmp_path / "checkpoint.pt", dict(payload, progress={"global_step": 5}))  # older: no loss
    assert _after_divergence(config, tmp_path, 10).startswith("Go on from the last checkpoint (step 5) at a lower rate")
    data = bytearray((tmp_path / "checkpoint.pt").read_bytes())  # a weight's bit changed, its checksum kept:
    data[len(data) // 2] ^= 1  # torch.load reads it without a word (the file is almost all weights)
    (tmp_path / "checkpoint.pt").write_bytes(bytes(data))
    assert _after_divergence(config, tmp_path, 10).startswith("The last checkpoint cannot be read: start again")


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, trained_run, tmp_path):
    run = Run("--data", tiny_data, "--out", tmp_path, "--run-name", "nan", "--epochs", "20", "--checkpoint-every", "1",
              *TINY, "--lr", "5", run_dir=tmp_path / "nan")
    assert run.wait(timeout_s=300) == 1
    err = run.stderr()
    assert "the loss became" in err
    payload = load_checkpoint(tmp_path / "nan")
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    failed_step = int(err.split("the loss became", 1)[1].split("step ", 1)[1].split(";", 1)[0])
    assert payload["progress"]["global_step"] < failed_step
    # At 5, the loss runs away (about 1e12) a step before it becomes NaN: the last
    # checkpoint is finite but not worth resuming, and the program says so.
    assert "had already run away by the last checkpoint" in err and "start again with a lower --lr" in err

    # A sane checkpoint (a copy of the shared finished run: one epoch, 7 steps), then a rate that
    # diverges in the epochs added on resume: the advice is to resume that checkpoint at a lower
    # rate, and doing so works.
    sane = tmp_path / "sane"
    shutil.copytree(trained_run[0], sane)
    diverged = Run("--resume", sane, "--epochs", "3", "--lr", "5", run_dir=sane)
    assert diverged.wait(timeout_s=300) == 1
    assert "Go on from the last checkpoint (step 7, loss " in diverged.stderr(), diverged.stderr()[-2000:]
    assert f"--resume {sane} --lr 0.5" in diverged.stderr()
    # stopped before a save: config.json as the checkpoint has it (it said --lr 5, which a plain --resume would not take)
    assert (sane / "config.json").read_text() == (trained_run[0] / "config.json").read_text()
    resumed = Run("--resume", sane, "--epochs", "3", "--lr", "0.0005", "--warmup-steps", "10", "--max-steps", "9",
                  "--no-ten-crop", run_dir=sane)
    assert resumed.wait(timeout_s=300) == 0, resumed.stderr()
    # the rate of its next step, the eighth of a 10-step warm-up
    assert "at epoch 2, step 7, learning rate 0.0004 (warming up to 0.0005)" in resumed.stderr()
    assert load_checkpoint(sane)["progress"]["global_step"] == 9
    # config.json holds the options of the latest start, as the checkpoint does; where the run began stays
    before, after = (json.loads((run / "config.json").read_text()) for run in (trained_run[0], sane))
    # (not --max-steps, --workers and the like, options of one start: benchmarks.ablations --reuse compares them;
    # --no-ten-crop, given, goes on with the run)
    assert after == {**before, "lr": 0.0005, "epochs": 3, "warmup_steps": 10, "ten_crop": False}, after
    assert before["out"] != "runs" and before["resume"] is None  # the first start's --out, kept


# ---------------------------------------------------------------- bad input: a clear error naming the fix

def _error_of(argv, caplog) -> str:
    caplog.clear()
    assert main([str(a) for a in argv]) == 2
    return caplog.text


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 and WORLD_SIZE=2: a rank lies in 0 ... WORLD_SIZE - 1"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 and WORLD_SIZE=0: a rank lies in 0 ... WORLD_SIZE - 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "2"},  # its GPU: LOCAL_RANK's modulo
     "LOCAL_RANK=5: a rank's number on its machine lies in 0 ... LOCAL_WORLD_SIZE - 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"},
     "LOCAL_RANK=-1: a rank's number on its machine lies in 0 ... WORLD_SIZE - 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "MASTER_PORT='x' is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "MASTER_PORT=99999 is not a port (1-65535)"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"},  # a port of the system's choice
     "MASTER_PORT=0 is not a port (1-65535)"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT not"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "rank0.invalid", "MASTER_PORT": "29500"},  # .invalid: never a host
     "MASTER_ADDR='rank0.invalid' is not an address, nor a name that resolves"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},  # with --master-addr
     "torchrun's ranks meet where torchrun says (its --master-addr or --rdzv-endpoint): drop --master-addr under "
     "torchrun"),
], ids=["not-a-number", "rank-too-large", "no-ranks", "no-local-ranks", "local-rank-too-large", "local-rank-below-0",
        "port", "port-too-large", "port-0", "no-rendezvous",
        "no-such-host", "master-addr-option"])
def test_a_launcher_environment_that_does_not_fit_is_named(tiny_data, tmp_path, caplog, monkeypatch, env, words):
    """What torchrun sets, set wrong by hand, or an option of the ranks the program starts
    itself given under torchrun: refused before any rendezvous (which would wait --timeout)."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("launch.two_gpu.setup_logging", lambda *args: None)  # a rank's, which this process keeps
    option = ["--master-addr", "127.0.0.1"] if "drop --master-addr" in words else []
    err = _error_of(["--data", tiny_data, "--out", tmp_path / "runs", *option], caplog)
    assert words in err, err
    if not option:
        assert "start the program with torchrun, or without these variables" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_rank_whose_gloo_cannot_connect_ends_in_one_line(tiny_data, tmp_path, monkeypatch, caplog, capfd):
    """Under torchrun: a GLOO_SOCKET_IFNAME of no interface here is refused before the ranks
    meet; gloo failing to connect its mesh (a peer gone, as at a torchrun restart) raised a
    RuntimeError of its C++, printed as a traceback by every rank."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29999").items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()  # as it was after: the rank's setup_logging replaces its handlers with its own
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    args = ["--data", str(tiny_data), "--out", str(tmp_path / "runs"), *TINY]
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch")
    assert two_gpu.main(args) == 2
    said = caplog.text + capfd.readouterr().err
    assert "error: GLOO_SOCKET_IFNAME=nosuch names nosuch, which this machine has no network interface of (it has " \
           in said, said
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    mesh = "Gloo connectFullMesh failed with [../third_party/gloo/gloo/transport/tcp/pair.cc:144] no error"
    monkeypatch.setattr(two_gpu, "init_process_group", lambda *args: (_ for _ in ()).throw(RuntimeError(mesh)))
    assert two_gpu.main(args) == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"error: rank 0 could not meet the other ranks at 127.0.0.1:29999 ({mesh}): a rank that stopped on its own "
        f"machine never comes (its output there says why: a check of its options, its files or its network there); "
        f"else start all 2 ranks within --timeout 300 s of each other, each with this MASTER_ADDR and MASTER_PORT (an "
        f"address that every machine reaches, a port free on its machine), as torchrun does (if no launcher started "
        f"this one, RANK and WORLD_SIZE are left over from another program: unset them, and this program starts its "
        f"own ranks)")
    assert not (tmp_path / "runs").exists()
    # another fault as the rank joins (CUDA's): its own traceback, not the advice of a rendezvous
    monkeypatch.setattr(two_gpu, "init_process_group",
                        lambda *args: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory")))
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        two_gpu.main(args)
    # the same fault where gloo first makes a group after the default one (NCCL's): not a rank lost, nor missing

    def join_then_lose_the_interface(*args):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch")  # unchecked, and read as gloo makes the next group
    monkeypatch.setattr(two_gpu, "init_process_group", join_then_lose_the_interface)
    try:
        with pytest.raises(RuntimeError, match="Unable to find address for: nosuch"):
            two_gpu.main(args)
    finally:
        dist.destroy_process_group()
    assert "lost the other ranks" not in capfd.readouterr().err


@pytest.mark.parametrize("value, refused", [("nosuch", "no network interface"), ("lo,nosuch", "no network interface"),
                                            (",lo", "no network interface"), ("lo", None), ("lo,", None),
                                            ("lo:1", "no IP address"), ("bare0", "no IP address"),
                                            ("lo,bare0,bare1", "bare0, bare1, under which gloo finds no IP address"),
                                            ("lo:" + "x" * 13, "no IP address"), ("x", None), ("", None)])
def test_gloo_socket_ifname_is_checked_as_gloo_reads_it(monkeypatch, value, refused):
    """A list of this machine's interfaces (a trailing comma dropped), each with an address that
    gloo finds: an alias eth0:1 of eth0 has its own, or none (lo:1 here; nor one of a name too
    long for any); one character or none is not read at all. bare0 and bare1 stand for
    interfaces without an address (a bridge's port, say)."""
    listed = socket.if_nameindex()
    monkeypatch.setattr(socket, "if_nameindex", lambda: [*listed, (900, "bare0"), (901, "bare1")])
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", value)
    if refused:
        with pytest.raises(ValueError, match=f"^GLOO_SOCKET_IFNAME={value} names .*{refused}"):
            two_gpu.check_gloo_interface()
    else:
        two_gpu.check_gloo_interface()


def test_gloo_itself_stops_at_an_interface_without_an_address(monkeypatch):
    """What the check above spares a run: gloo's C++ error as a rank starts, after the run folder is made."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo:1")  # an alias that lo does not have
    with pytest.raises(RuntimeError, match="Unable to find address for: lo:1"):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert not dist.is_initialized()


@pytest.mark.slow
def test_a_rendezvous_that_never_happens_ends_each_rank_in_one_line(tiny_data, tmp_path):
    """Ranks started by hand with the torchrun environment, their peers missing: rank 0 waits
    for the others in vain, rank 1 for rank 0's address; a rank 0 whose port is taken cannot
    listen. Each ends after --timeout at most, in one line naming the fix, and writes nothing."""
    taken = socket.create_server(("127.0.0.1", 0))
    ports = [_free_port(), _free_port(), taken.getsockname()[1]]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "launch.two_gpu", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
         "--timeout", "2", *TINY], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port)))
        for rank, port in zip((0, 1, 0), ports)]
    try:
        errors = [p.communicate(timeout=BOUND_S)[1] for p in procs]
    finally:
        taken.close()
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [1, 1, 1], errors
    for rank, port, err in zip((0, 1, 0), ports, errors):
        assert "Traceback" not in err, err
        *_, last = err.strip().splitlines()
        assert last.startswith(f"{'[rank 1] ' * rank}error: rank {rank} could not meet the other ranks at "
                               f"127.0.0.1:{port} ("), err
        assert last.endswith("start all 2 ranks within --timeout 2 s of each other, each with this MASTER_ADDR and "
                             "MASTER_PORT (an address that every machine reaches, a port free on its machine), as "
                             "torchrun does (if no launcher started this one, RANK and WORLD_SIZE are left over from "
                             "another program: unset them, and this program starts its own ranks)"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_rank_failing_under_torchrun_ends_in_one_line(tiny_data, tmp_path):
    """Ranks started as torchrun starts them, the loss diverging: each rank ends as a run of
    launch.two_gpu's own ranks does, in one line (rank 0's with what to do next), not each
    with its traceback."""
    procs, errors = _as_torchrun_starts(lambda rank: ["--data", tiny_data, "--out", tmp_path, "--run-name", "nan",
                                                      "--max-steps", "6", "--val-limit", "4", *TINY,
                                                      "--lr", "9.9"])
    assert [p.returncode for p in procs] == [1, 1], errors
    assert not any("Traceback" in err for err in errors), errors
    first = errors[0].split("the run stopped: rank 0 failed: launch.train.NonFiniteLoss: the loss became ", 1)
    assert len(first) == 2 and "start again with a lower --lr (such as 0.99)" in first[1], errors[0]
    assert "[rank 1] the run stopped: rank 1 failed: launch.train.NonFiniteLoss: the loss became " in errors[1], errors[1]
    assert errors[1].rstrip().endswith("Rank 0 says what to do next"), errors[1]


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_that_loses_its_peer_under_torchrun_does_not_call_itself_failed(tiny_data, tmp_path, killed):
    """Rank 1 killed (SIGKILL, as the out-of-memory killer does) while the ranks train: rank 0
    said "rank 0 failed: ... Connection closed by peer", naming itself, where torchrun names rank 1.
    Rank 0 killed: rank 1 said that rank 0 says what to do next, which it never did."""
    port, logs = _free_port(), [tmp_path / f"rank{rank}.err" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "launch.two_gpu", "--data", str(tiny_data), "--out", str(tmp_path),
                               "--run-name", "run", "--epochs", "50", *map(str, TINY)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                              env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank, log in enumerate(logs)]
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + BOUND_S
        while not (metrics.exists() and '"train"' in metrics.read_text()):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].read_text()
            time.sleep(0.1)
        procs[killed].kill()
        assert procs[1 - killed].wait(timeout=BOUND_S) == 1
    finally:
        for p in procs:
            p.kill()
    err, left = logs[1 - killed].read_text(), 1 - killed
    assert f"the run stopped: rank {left} lost another rank: " in err and f"rank {left} failed" not in err, err
    assert "the rank that failed or stopped responding says why in its own lines (torchrun's report names it)" in err
    if killed == 0:  # what rank 0 would have said of its folder, which this machine sees
        assert "rank 0 says what to do next; if it was stopped first: " in err, err
        assert f"--resume {tmp_path / 'run'}" in err or f"under another --run-name (or after removing " \
                                                         f"{tmp_path / 'run'})" in err, err
    # a rank's own error is its own, whatever its message quotes (an --out named after a timeout sweep)
    assert not two_gpu._lost_a_peer(IsADirectoryError(21, "Is a directory", "runs/timed out waiting/train.log"))
    assert not two_gpu._lost_a_peer(ValueError("reset by peer"))
    assert two_gpu._lost_a_peer(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:5"))
    assert two_gpu._lost_a_peer(MissingRank("wait timeout after 5000ms, keys: /default_pg/0//1//cpu//0/1"))


@pytest.mark.slow
def test_a_rank_lost_while_rank_0_prepares_the_run_is_told_with_the_folder_it_made(tmp_path):
    """Rank 1 killed while rank 0 draws the built-in set (a fresh cache, some 20 s): rank 0 made
    the run's folder, which a restart under the same name is refused for: its line names it."""
    port, logs = _free_port(), [tmp_path / f"rank{rank}.err" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "launch.two_gpu", "--out", str(tmp_path), "--run-name", "run",
                               "--max-steps", "1", *map(str, TINY)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                              env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       XDG_CACHE_HOME=str(tmp_path / "cache")))
             for rank, log in enumerate(logs)]
    try:
        deadline = time.monotonic() + BOUND_S
        while not (tmp_path / "cache" / "alexnet-towers").exists():  # rank 0 draws the set, in its preparation
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].read_text()
            time.sleep(0.1)
        procs[1].kill()
        assert procs[0].wait(timeout=2 * BOUND_S) == 1
    finally:
        for p in procs:
            p.kill()
    said = logs[0].read_text().strip().splitlines()[-1]
    assert said.startswith("the run stopped before it trained: rank 0 lost the other ranks while rank 0 prepared the "
                           "run ("), said
    assert said.endswith(f"start every rank again under another --run-name (or after removing {tmp_path / 'run'}), "
                         f"each on a port of this run's own"), said
    assert (tmp_path / "run" / "config.json").is_file()  # the start of a run, which that name is refused for


@pytest.mark.slow
def test_ranks_started_with_other_options_under_torchrun_are_refused(tiny_data, tmp_path):
    """Ranks started by hand, as torchrun starts them, one of them with an option more: every
    rank would run rank 0's recipe (its --data, its layout), so each refuses in one line."""
    procs, errors = _as_torchrun_starts(lambda rank: ["--data", tiny_data, "--out", tmp_path, "--run-name", "odd",
                                                      "--max-steps", "1", *TINY,
                                                      *(["--layout", "single"] if rank == 1 else [])])
    assert [p.returncode for p in procs] == [2, 2], errors
    for err in errors:
        assert "error: rank 1 was started with other options than rank 0 (" in err and "Traceback" not in err, err
        assert err.rstrip().endswith("--layout single, against " + " ".join(
            ["--data", str(tiny_data), "--out", str(tmp_path), "--run-name", "odd", "--max-steps", "1", *TINY])
            + "): start every rank with the same command line, as torchrun does"), err
    assert not (tmp_path / "odd").exists()  # refused before rank 0 made the run's folder


@pytest.mark.slow
def test_ranks_that_read_other_checkpoints_at_one_path_are_refused(tiny_data, tmp_path):
    """Ranks started as torchrun starts them, each on a machine of its own (here, a working
    folder of its own), with one command line whose --eval-only path holds the paper's net on
    rank 0's machine and section 3.2's one-tower net on rank 1's: they set up other groups and
    waited out --timeout, then blamed each other. Each refuses in one line naming what differs."""
    from launch.checkpoint import save_reference
    for rank, net in enumerate(("two-tower", "one-tower")):
        (tmp_path / f"machine{rank}").mkdir()
        save_reference(tmp_path / f"machine{rank}" / "net.pt", AlexNet(10, architecture=Architecture(net=net)))
    procs, errors = _as_torchrun_starts(
        lambda rank: ["--eval-only", "net.pt", "--data", tiny_data, "--out", tmp_path, "--workers", "0",
                      "--timeout", "5"], cwd_of=lambda rank: tmp_path / f"machine{rank}")
    assert [p.returncode for p in procs] == [2, 2], errors
    for rank, err in enumerate(errors):
        assert "Traceback" not in err, err
        assert err.rstrip().endswith(
            f"{'[rank 1] ' * rank}error: rank 0 and rank 1 read other settings from the checkpoint at --eval-only's "
            f"path on their machines (rank 0 from {tmp_path / 'machine0' / 'net.pt'}: --layout towers --replicas 1; "
            f"rank 1 from {tmp_path / 'machine1' / 'net.pt'}: --layout one-tower --replicas 2): give every machine "
            f"the same checkpoint at that path, or a path that every machine shares"), err


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_under_torchrun_tells_what_to_do_next(tiny_data, tmp_path, sent):
    """torchrun passes its Ctrl-C, and its SIGTERM (a batch system stopping the job), on to every
    rank it started (each in a session of its own): rank 0, which knows the run folder, says to
    resume it (not that nothing was written; SIGTERM ended the ranks without a word); the others,
    that rank 0 says."""
    port, run_dir = _free_port(), tmp_path / "ctrl-c"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "launch.two_gpu", "--data", str(tiny_data), "--out", str(tmp_path), "--run-name", "ctrl-c",
         "--epochs", "50", "--checkpoint-every", "1", *TINY], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"rank{rank}.stderr", "w"), start_new_session=True, preexec_fn=as_foreground_job,
        env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port)))
        for rank in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint.pt").exists():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                (tmp_path / "rank0.stderr").read_text()
            time.sleep(0.2)
        for p in procs:
            os.killpg(p.pid, sent)
        codes = [p.wait(timeout=BOUND_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errors = [(tmp_path / f"rank{rank}.stderr").read_text() for rank in range(2)]
    assert codes[0] == 130 and "Traceback" not in errors[0], errors
    assert errors[0].rstrip().endswith(f"interrupted: resume with --resume {run_dir}"), errors[0]
    assert codes[1] == 130 and errors[1].rstrip().endswith(  # where rank 0 was stopped first (killed), its advice
        f"interrupted: rank 0 says what to do next; if it was stopped first: resume with --resume {run_dir}"), errors[1]


@pytest.mark.slow
def test_ranks_end_with_a_torchrun_agent_killed_by_sigkill(tiny_data, tmp_path):
    """torchrun's agent killed (SIGKILL: it can pass nothing on): its ranks end within seconds,
    as they do with the program's own launcher, rather than train on holding the run's lock."""
    run_dir = tmp_path / "agent"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "--log-dir", str(tmp_path / "torchrun"),  # not a folder of its own in TMPDIR, which it leaves there
         "-m", "launch.two_gpu", "--data", str(tiny_data), "--out", str(tmp_path), "--run-name", "agent",
         "--epochs", "50", "--checkpoint-every", "1", *TINY], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "agent.stderr", "w"), start_new_session=True)
    ranks = []
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint.pt").exists():
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.stderr").read_text()
            time.sleep(0.2)
        ranks += [int(pid) for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
        assert len(ranks) == 2
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + BOUND_S
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in ranks), (tmp_path / "agent.stderr").read_text()[-3000:]
    finally:
        agent.kill()
        for pid in ranks:  # each in a session of its own, as torchrun starts them
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_under_torchrun_a_rank_that_never_comes_stops_the_others_within_the_timeout(tiny_data, tmp_path):
    """Two machines under torchrun, the second's rank refusing before the ranks meet (its
    GLOO_SOCKET_IFNAME names no interface there). NCCL's default group does not meet the ranks
    as it is made; gloo's does not either under TORCH_GLOO_LAZY_INIT=1, which stands for it
    here: the first meeting was the wait for rank 0's preparation, two hours long, and rank 0
    waited that out. It ends within --timeout, in the line of a rendezvous that never happens."""
    port, procs = _free_port(), []
    for node, interface in enumerate(("lo", "nosuch")):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
             "--log-dir", str(tmp_path / f"torchrun{node}"), "-m", "launch.two_gpu", "--data", str(tiny_data),
             "--out", str(tmp_path / "runs"), "--timeout", "5", *TINY], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, GLOO_SOCKET_IFNAME=interface, TORCH_GLOO_LAZY_INIT="1")))
    try:
        errors = [p.communicate(timeout=BOUND_S)[1] for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert "[rank 1] error: GLOO_SOCKET_IFNAME=nosuch names nosuch, which this machine has no network interface" \
        in errors[1], errors[1]
    assert f"error: rank 0 could not meet the other ranks at 127.0.0.1:{port} (" in errors[0], errors[0]
    assert "a rank that stopped on its own machine never comes" in errors[0], errors[0]
    # machines that pick other backends never meet either: said beside the other causes
    line = next(line for line in errors[0].splitlines() if "could not meet the other ranks" in line)
    assert line.endswith(
        "; and under --backend auto each machine picks its own backend: this one picks gloo (no GPU visible), whereas "
        "a machine with a GPU for each rank picks NCCL, and ranks of two backends never meet: give every rank "
        "--backend gloo, or every machine a GPU for each of its ranks"), errors[0]
    assert [p.returncode for p in procs] == [1, 1]
    assert not (tmp_path / "runs").exists()


def test_a_rank_that_could_not_meet_names_the_backends_that_machines_pick(monkeypatch, caplog):
    """Under torchrun on machines of their own, a machine with a GPU per rank picks NCCL and one
    without gloo: their ranks never meet, and each says so beside the other causes. Not where
    every rank is on this machine, nor with --backend given."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    config = parse_config(["--out", "/nowhere"])
    gpus = choose_placement("auto", gpus=2, ranks=4, ranks_here=2)
    cpus = choose_placement("auto", gpus=0, ranks=4, ranks_here=2)
    shared = choose_placement("auto", gpus=1, ranks=4, ranks_here=2)
    for placement, said in ((gpus, "this one picks NCCL (2 GPUs visible, one per rank), whereas a machine with "
                                   "fewer GPUs than ranks picks gloo, and ranks of two backends never meet"),
                            (cpus, "this one picks gloo (no GPU visible), whereas a machine with a GPU for each rank "
                                   "picks NCCL"),
                            (shared, "this one picks gloo (1 GPU(s) visible for 2 ranks), whereas a machine")):
        caplog.clear()
        two_gpu._not_met(0, 4, RuntimeError("timed out"), config, placement)
        assert said in caplog.text, caplog.text
    for local, backend in (("4", "auto"), ("2", "gloo")):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        caplog.clear()
        two_gpu._not_met(0, 4, RuntimeError("timed out"), parse_config(["--backend", backend]), cpus)
        assert "could not meet the other ranks" in caplog.text and "backend" not in caplog.text, caplog.text


def _as_torchrun_starts(args_of, cwd_of=lambda rank: ROOT) -> tuple:
    """(processes, their standard errors) of two ranks of the program started as torchrun starts
    them, ``args_of(rank)`` each one's options, ``cwd_of(rank)`` its working folder, once both
    have ended (within BOUND_S)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "launch.two_gpu", *map(str, args_of(rank))], cwd=cwd_of(rank),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                os.environ.get("PYTHONPATH")]))))
             for rank in range(2)]
    try:
        return procs, [p.communicate(timeout=BOUND_S)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def layouts(tmp_path, tiny_data):
    """Broken copies of the tiny dataset."""
    made = {}
    for name in ("no_val", "other_classes", "empty_class", "unreadable_val"):
        made[name] = tmp_path / name
        shutil.copytree(tiny_data, made[name])
    shutil.rmtree(made["no_val"] / "val")
    (made["other_classes"] / "val" / sorted(os.listdir(tiny_data / "val"))[0]).rename(made["other_classes"] / "val" / "zebra")
    for f in (made["empty_class"] / "train" / sorted(os.listdir(tiny_data / "train"))[0]).iterdir():
        f.unlink()
    for f in (made["unreadable_val"] / "val").rglob("*.jpg"):
        f.write_bytes(b"not a JPEG")
    return made


def test_bad_data_and_options_get_clear_errors(tiny_data, layouts, tmp_path, caplog):
    out = ["--out", tmp_path / "runs"]
    assert "does not exist" in _error_of(["--data", tmp_path / "nowhere", *out], caplog)
    assert "val" in _error_of(["--data", layouts["no_val"], *out], caplog)
    assert "zebra" in _error_of(["--data", layouts["other_classes"], *out], caplog)
    assert "no images" in _error_of(["--data", layouts["empty_class"], *out], caplog).lower()
    # found before a rank starts, not at the end of the first epoch
    said = _error_of(["--data", layouts["unreadable_val"], *out, "--batch-size", 4], caplog)
    assert "no usable image in val/: each of its 10 files failed to decode or was refused, such as " in said
    assert ": unreadable (UnidentifiedImageError: " in said and said.rstrip().endswith(": replace them")
    for option, value, words in [("--batch-size", 0, "must be positive"), ("--lr", -1, "--lr"),
                                 ("--epochs", 0, "must be positive"), ("--dropout", 1.5, "--dropout"),
                                 ("--batch-size", 1000, "larger than the 30 training images"),
                                 ("--backend", "nccl", "needs one GPU per rank")]:
        assert words in _error_of(["--data", tiny_data, *out, option, value], caplog), option
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint.pt"))


@pytest.mark.parametrize("option, value, words", [
    ("--timeout", "inf", "--timeout must be a finite number"), ("--timeout", "nan", "--timeout must be a finite"),
    ("--timeout", "1e12", "--timeout must be at most"), ("--timeout", "0.000001", "--timeout must be at least 1 second"),
    ("--weight-decay", "nan", "--weight-decay must be a finite"),
    ("--weight-decay", "inf", "--weight-decay must be a finite"), ("--seed", "-1", "--seed must be an integer"),
    ("--lr-milestones", "0", "--lr-milestones must be epochs from 1 on"),
    # the ends of each range: a rate of 0 or a dropout of 1 would train nothing without a word
    ("--lr", "0", "--lr must be a positive rate below 10, got 0.0"), ("--lr", "10", "--lr must be a positive rate"),
    ("--momentum", "1", "--momentum must lie in [0, 1), got 1.0"), ("--dropout", "1", "--dropout must lie in [0, 1)"),
    ("--seed", str(2**32), "--seed must be an integer from 0 to 4294967295, got 4294967296"),
    # an unset "$VARIABLE": never the option left out (a new run, the current folder)
    ("--eval-only", "", "--eval-only is empty: give a value"), ("--resume", "", "--resume is empty: give a value"),
    ("--out", "", "--out is empty: give a value"), ("--data", "", "--data is empty: give a value"),
    ("--master-addr", "", "--master-addr is empty: give a value"),
    ("--run-name", "two\nlines", "--run-name must be a plain folder name"),
    ("--run-name", "x" * 256, "--run-name must be a plain folder name (printable, at most 255 bytes"),
    ("--master-addr", "192.0.2.1", "--master-addr 192.0.2.1 cannot be listened on"),
    ("--master-addr", "no-such-host.invalid", "--master-addr no-such-host.invalid cannot be listened on"),
    ("--compile", "turbo", "--compile turbo: torch.compile's backends that this program runs are inductor, aot_eager"),
    ("--workers", "100000", "--workers 100000 would start that many loading processes"),
    ("--val-limit", "0", "--val-limit must be positive, got 0"), ("--max-steps", "0", "--max-steps must be positive"),
    ("--weight-decay", "-0.1", "--weight-decay must not be negative, got -0.1"),
    ("--patience", "0", "--patience must be at least 1 (the epochs without a lower validation error before the "
                        "rate is divided), got 0"),
    ("--warmup-steps", "-1", "--warmup-steps must not be negative, got -1"),
    ("--workers", "-1", "--workers must not be negative, got -1"),
    ("--run-name", "..", "--run-name must be a plain folder name"), ("--run-name", "a/b", "--run-name must be a plain"),
])
def test_bad_options_name_the_option_and_leave_no_run_folder(tiny_data, tmp_path, caplog, option, value, words):
    err = _error_of(["--data", tiny_data, "--out", tmp_path / "runs", option, value], caplog)
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_the_ends_of_each_range_are_accepted():
    """Each option's range holds its ends: a timeout of a second or of a week, plain SGD (no
    momentum, no weight decay), no dropout, the first and last seed, no warm-up, no workers
    (loading in the rank), a run name of 255 bytes (the longest a folder name may be)."""
    ends = [("timeout", 1.0), ("timeout", 7 * 24 * 3600.0), ("momentum", 0.0), ("weight_decay", 0.0),
            ("dropout", 0.0), ("seed", 0), ("seed", 2**32 - 1), ("patience", 1), ("max_reductions", 0),
            ("checkpoint_every", 0), ("warmup_steps", 0), ("workers", 0), ("run_name", "x" * 255)]
    for name, value in ends:
        TrainConfig(**{name: value}).validate()


def test_resume_and_eval_only_together_are_refused():
    """A run either goes on training or evaluates a checkpoint: given both, neither is guessed."""
    with pytest.raises(ValueError, match="^--resume and --eval-only exclude each other: give one$"):
        TrainConfig(resume="run", eval_only="run/checkpoint.pt").validate()


A_NUMBER_OPTION = {"launch.two_gpu": "--batch-size", "launch.predict": "--batch-size", "launch.prepare": "--workers",
                   "launch.show": "--batch-size", "benchmarks.run": "--batch", "benchmarks.report": None,
                   "benchmarks.ablations": "--batch-size"}


def _imports_torch(pid: int) -> bool:
    """Whether the process has torch's library loaded: its import has begun (and goes on for a second or more)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("program", [pytest.param(p, marks=() if p == "launch.two_gpu" else pytest.mark.slow)
                                     for p in A_NUMBER_OPTION])
def test_ctrl_c_while_a_program_imports_torch_ends_it_in_one_line(program):
    """Ctrl-C in the seconds torch takes to import ends each program as at any later moment:
    one line and exit code 130, not the traceback of the import it stopped (or, in prepare,
    a C++ abort); the training program's rank server, which imports torch beside it, ends too.
    The option is one each program refuses at once: a Ctrl-C that was lost ends in exit code 2."""
    proc = subprocess.Popen([sys.executable, "-m", program, "--no-such-option"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_foreground_job)
    try:
        deadline = time.monotonic() + BOUND_S
        while not _imports_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
        err = proc.communicate(timeout=BOUND_S)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err) == (130, "interrupted while the program started: nothing was done\n"), err[-3000:]
    deadline = time.monotonic() + 10  # the rank server ends when it sees the program gone
    while live_processes(session=proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_processes(session=proc.pid), [cmdline(pid) for pid in live_processes(session=proc.pid)]


@pytest.mark.parametrize("program, argv, words", [
    ("launch.prepare", ["loop", "made"], "data folder {tmp}/loop cannot be opened (Too many levels of symbolic links)"),
    ("launch.two_gpu", ["--resume", "loop"], "loop cannot be opened (Too many levels of symbolic links): give a "
                                             "checkpoint file"),  # not "no checkpoint at loop", which ls lists
    ("launch.two_gpu", ["--out", "loop"], "--out loop is a symbolic link in a loop of links: give another --out"),
    *[(program, argv, "~no-such-user-0/run: ~no-such-user-0 names no home folder here (no such user): give the path "
                      "in full") for program, argv in (("launch.two_gpu", ["--resume", "~no-such-user-0/run"]),
                                                       ("launch.two_gpu", ["--out", "~no-such-user-0/run"]),
                                                       ("launch.two_gpu", ["--data", "~no-such-user-0/run"]),
                                                       ("launch.predict", ["~no-such-user-0/run", "loop"]),
                                                       ("launch.show", ["~no-such-user-0/run"]),
                                                       ("launch.prepare", ["loop", "~no-such-user-0/run"]))],
])
def test_a_path_through_a_loop_of_links_or_a_user_with_no_home_is_one_line(program, argv, words, tmp_path, capsys,
                                                                              caplog, monkeypatch):
    """Python's Path raises RuntimeError where os.path does not: resolve() for a loop of links
    (before Python 3.13) and expanduser() for ~user naming no user. A loop is refused as a
    path that is not there; ~user, which the shell keeps as written, as a mistyped name (not
    a folder "~user" made where the program runs)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to("link")
    (tmp_path / "link").symlink_to("loop")
    try:
        code = importlib.import_module(program).main(argv)
    except SystemExit as stopped:  # argparse's error(), as prepare refuses its arguments
        code = stopped.code
    assert code == 2
    err = capsys.readouterr().err + caplog.text  # printed, or logged where the program logs its errors
    assert f"error: {words.format(tmp=tmp_path)}" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "loop"]  # nothing made


def test_a_tilde_with_no_home_to_expand_is_refused_naming_why(monkeypatch):
    """~ where HOME is not set and the user has no entry among the system's users (a container
    started with an arbitrary user id): said so, not a folder "~" made where the program runs."""
    import pwd

    def no_such_user(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_such_user)
    with pytest.raises(ValueError) as refused:
        cli.home_path("~/runs")
    assert str(refused.value) == ("~/runs: ~ names no home folder here (no such user, and HOME is not set): give the "
                                  "path in full")


@pytest.mark.parametrize("program", A_NUMBER_OPTION)
@pytest.mark.parametrize("refused", ["unknown option", "not a number"])
def test_a_command_line_argparse_refuses_is_one_line_naming_the_help(program, refused, capsys):
    """argparse's refusals (an unknown option, a value of the wrong type) end each program as
    its own checks do: one line and exit code 2, not the usage block above it."""
    option = A_NUMBER_OPTION[program]
    if refused == "not a number" and option is None:
        pytest.skip(f"{program} has no option that takes a number")
    argv, words = {"unknown option": (["--no-such-option"], "unrecognized arguments: --no-such-option"),
                   "not a number": ([f"{option}=x"], f"argument {option}: invalid int value: 'x'")}[refused]
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(program).main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 1, err
    # a program with a required argument names it first, as argparse checks it first
    assert err.startswith("error: ") and (words in err or "the following arguments are required" in err), err
    assert err.endswith(f" (see python -m {program} --help)\n"), err


def test_inductor_on_the_cpu_without_a_compiler_is_refused_before_the_run(tiny_data, tmp_path, caplog, monkeypatch):
    """Else the first step fails, after the ranks started and the run folder was made."""
    from torch._inductor import config as inductor_config
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    with inductor_config.patch({"cpp.cxx": (None, "no-such-g++")}):
        err = _error_of(["--data", tiny_data, "--out", tmp_path / "runs", "--compile", "inductor"], caplog)
        assert ("--compile inductor: on the CPU it builds its kernels with a C++ compiler, and finds none here "
                "(no-such-g++ is not on PATH): install g++ (or set CXX to a C++ compiler), or give aot_eager") in err
        assert not (tmp_path / "runs").exists()
        check_compile_backend("aot_eager", "--compile")  # which builds nothing


@pytest.mark.parametrize("backend, words", [
    ("tvm", "--compile tvm: torch.compile's backends that this program runs are inductor, aot_eager, eager"),
    ("relu_runtime_error_TESTING_ONLY", "--compile relu_runtime_error_TESTING_ONLY: torch.compile's backends"),
    ("", "--compile is empty: the backends that this program runs are inductor, aot_eager, eager"),
])
def test_a_compile_backend_the_program_cannot_check_is_refused_before_the_run(tiny_data, tmp_path, caplog, backend,
                                                                              words):
    """torch.compile lists backends that need a package (tvm: apache-tvm) or are torch's own
    tests: only the first step would fail, after the ranks started and the run folder was made."""
    err = _error_of(["--data", tiny_data, "--out", tmp_path / "runs", "--compile", backend], caplog)
    assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_inductor_on_a_gpu_without_a_c_compiler_or_pythons_headers_is_refused(tmp_path, monkeypatch):
    """Triton builds each kernel's launcher with $CC, else gcc, else clang: without one the first
    compiled step fails on the GPU. The check itself needs no GPU."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no compiler in it
    with pytest.raises(ValueError) as refused:
        check_compile_backend("inductor", "--compile", "cuda")
    assert str(refused.value) == (
        "--compile inductor: on a GPU it builds the launchers of its Triton kernels with a C compiler, and finds "
        "none here (gcc or clang is not on PATH): install gcc (or set CC to a C compiler), or give aot_eager, "
        "which compiles nothing")
    check_compile_backend("aot_eager", "--compile-backend", "cuda")
    monkeypatch.setenv("CC", "")  # which Triton would run, as set
    with pytest.raises(ValueError, match=r"\(CC is set, and empty\)"):
        check_compile_backend("inductor", "--compile", "cuda")
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(ValueError, match=r"\(no-such-cc is not on PATH\)"):
        check_compile_backend("inductor", "--compile", "cuda")
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    check_compile_backend("inductor", "--compile", "cuda")
    monkeypatch.delenv("CC")
    (tmp_path / "clang").symlink_to(cc)
    check_compile_backend("inductor", "--compile", "cuda:0")
    # Triton builds them as Python extensions: a Python without its C headers fails at the first step too
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path / "include")})
    with pytest.raises(ValueError) as refused:
        check_compile_backend("inductor", "--compile", "cuda")
    assert str(refused.value) == (
        f"--compile inductor: on a GPU it builds the launchers of its Triton kernels as Python extensions, which need "
        f"Python's C headers, and finds no Python.h in {tmp_path / 'include'}: install them (the python3-dev package "
        f"of this Python), or give aot_eager, which compiles nothing")
    with pytest.raises(ValueError, match=r"--compile inductor: on the CPU it builds its kernels as Python extensions, "
                                         r"which need Python's C headers, and finds no Python\.h in "):
        monkeypatch.setenv("TORCH_INDUCTOR_INSTALL_GXX", "1")  # a g++ of conda's, not sought on PATH (emptied above)
        check_compile_backend("inductor", "--compile", "cpu")  # its kernels are Python extensions too


def test_options_that_depend_on_the_data_or_the_disk_leave_no_run_folder(tiny_data, tmp_path, caplog):
    five = _five_classes(tiny_data, tmp_path)
    err = _error_of(["--data", five, "--out", tmp_path / "runs", "--fc8-placement", "split"], caplog)
    assert "needs an even number of classes; the data has 5: use --fc8-placement tower0" in err
    assert not (tmp_path / "runs").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert f"--out {a_file} is a file" in _error_of(["--data", tiny_data, "--out", a_file, *TINY], caplog)
    assert "is a file: choose another --run-name" in _error_of(
        ["--data", tiny_data, "--out", tmp_path, "--run-name", "a-file", *TINY], caplog)
    data = tmp_path / "tiny"  # a copy: a run folder made in the data would be a class to the tests after this one
    shutil.copytree(tiny_data, data)
    for split in ("train", "val"):  # a run folder there would be a class of images to every later scan
        classes = sorted(os.listdir(data / split))
        for inside in (data / split / "runs", data / split):
            # were it not refused, the run would end after a step, not train 50 epochs
            assert (f"--out {inside} lies in the data's {split}/ ({data.resolve() / split}), where a folder "
                    f"would be taken for a class of images") in _error_of(
                ["--data", data, "--out", inside, "--max-steps", "1", *TINY], caplog)
        assert sorted(os.listdir(data / split)) == classes
    (tmp_path / "shortcut").symlink_to(data / "train")  # the same folder by other names: a link, and '..'
    for inside in (tmp_path / "shortcut" / "runs", data / "val" / ".." / "train" / "runs"):
        assert f"--out {inside} lies in the data's train/ ({data.resolve() / 'train'}), where a folder" in _error_of(
            ["--data", data, "--out", inside, "--max-steps", "1", *TINY], caplog)
    assert not (data / "train" / "runs").exists()
    too_long = tmp_path / ("a" * 300)
    err = _error_of(["--data", tiny_data, "--out", too_long, *TINY], caplog)
    assert f"cannot use --out {too_long} (File name too long)" in err and "Traceback" not in err


def test_the_command_a_message_suggests_can_be_pasted_whatever_the_folders_name(tiny_data, tmp_path, caplog):
    run = tmp_path / "my runs" / "first"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    err = _error_of(["--data", tiny_data, "--out", tmp_path / "my runs", "--run-name", "first", *TINY], caplog)
    assert f"already holds a run: resume it with --resume '{run}', or choose another --run-name" in err


def test_a_count_of_ranks_per_machine_left_in_the_environment_is_torchruns_alone(tiny_data, tmp_path, monkeypatch):
    """LOCAL_WORLD_SIZE set, but not RANK and WORLD_SIZE: the ranks this program starts itself."""
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "-3")
    _, _, placement = two_gpu._configure(["--data", str(tiny_data), "--out", str(tmp_path / "runs")])
    assert (placement.backend, placement.device) == ("gloo", "cpu")


def test_a_limit_on_file_sizes_below_the_checkpoints_is_found_before_training(tiny_data, tmp_path, caplog,
                                                                               monkeypatch):
    """ulimit -f (a batch system's limit): the first save failed after the first epoch ("File too large")."""
    import resource
    size = training_checkpoint_bytes(10, Architecture())
    real = resource.getrlimit
    limit = lambda largest: lambda which: (largest, largest) if which == resource.RLIMIT_FSIZE else real(which)
    monkeypatch.setattr(resource, "getrlimit", limit(size - 1))
    err = _error_of(["--data", tiny_data, "--out", tmp_path / "runs", *TINY], caplog)
    assert (f"error: this run's checkpoint is {size / 1e6:.1f} MB and the largest file this program may write is "
            f"{(size - 1) / 1e6:.1f} MB: raise the limit on the size of a file (ulimit -f)") in err, err
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(resource, "getrlimit", limit(size))
    room = shutil.disk_usage(tmp_path)._replace(free=4 * size)  # for two checkpoints, on any disk the tests use
    monkeypatch.setattr(shutil, "disk_usage", lambda path: room)
    check_room_for_checkpoints(parse_config(["--out", str(tmp_path / "runs")]), 10)

def test_a_disk_too_small_for_the_checkpoints_is_found_before_training(tiny_data, tmp_path, caplog, monkeypatch):
    """Not after the first epoch (hours on ImageNet): a new run needs room for two checkpoints
    (the second written beside the first), a resumed one for one more."""
    size = training_checkpoint_bytes(10, Architecture())
    assert 455e6 < size < 460e6  # 57 million float32 weights, and as much momentum
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=int(1.5 * size)))
    out = tmp_path / "runs" / "deeper"  # not made yet: its nearest folder's disk is measured
    err = _error_of(["--data", tiny_data, "--out", out, *TINY], caplog)
    assert (f"the disk holding {tmp_path} has {1.5 * size / 1e6:.1f} MB free and this run's checkpoints need "
            f"{2 * size / 1e6:.1f} MB (each written beside the one it replaces): free some space there, or give an "
            f"--out on a larger disk") in err, err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "checkpoint.pt").write_bytes(b"")  # a resumed run's: room for one more is enough
    resumed = parse_config(["--resume", str(tmp_path / "saved")])
    check_room_for_checkpoints(resumed, 10)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=size - 1))
    with pytest.raises(ValueError, match="free some space there, or move the run folder to a larger disk"):
        check_room_for_checkpoints(resumed, 10)
    # A save killed in its write (SIGTERM to the whole group) left its partial file, hundreds of MB:
    # gone before the room is measured. Another run's save under way (a live process) is left alone.
    ended = subprocess.Popen(["true"])
    ended.wait()
    host = socket.gethostname()
    killed = tmp_path / "saved" / f".checkpoint.pt.tmp-{host}-{ended.pid}"
    live = tmp_path / "saved" / f".checkpoint.pt.tmp-{host}-{os.getppid()}"
    for partial in (killed, live):
        partial.write_bytes(b"partial")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=size))
    check_room_for_checkpoints(resumed, 10)
    assert not killed.exists() and live.exists()
    (tmp_path / "saved" / "kept.pt").write_bytes(b"")  # resumed from another name: the run saves as checkpoint.pt
    killed.write_bytes(b"partial")
    check_room_for_checkpoints(parse_config(["--resume", str(tmp_path / "saved" / "kept.pt")]), 10)
    assert not killed.exists()


@pytest.mark.slow
def test_a_run_with_its_output_closed_trains_and_writes_its_files(tiny_data, tmp_path):
    """Started with stdout and stderr closed (``>&- 2>&-``): before, the run folder's lock took the
    number 2, the ranks' lines went into it, and rank 0 failed on a sys.stderr of None, saying so
    to no one (exit 1)."""
    result = subprocess.run(["sh", "-c", 'exec "$@" >&- 2>&-', "sh", sys.executable, "-m", "launch.two_gpu", "--data",
                             str(tiny_data), "--out", str(tmp_path), "--run-name", "run", "--max-steps", "2", *TINY],
                            cwd=ROOT, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert "step 2/" in (tmp_path / "run" / "train.log").read_text()
    assert (tmp_path / "run" / ".lock").read_text().count("\n") <= 1  # its owner, and no log line


@pytest.mark.slow
def test_a_run_file_that_is_not_a_file_is_refused_before_the_ranks_start(trained_run, tmp_path, caplog):
    """A resumed run's config.json, metrics.jsonl or train.log a FIFO: the run waited for a writer
    for good; a folder: a rank failed at its first line (summary.json: at the run's end, after
    training), with advice to resume that failed the same way."""
    run = tmp_path / "run"
    for name in two_gpu.RUN_FILES:
        for kind in ("folder", "fifo"):
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(trained_run[0], run)
            (run / name).unlink()
            (run / name).mkdir() if kind == "folder" else os.mkfifo(run / name)
            err = _error_of(["--resume", run, "--epochs", "2", "--max-steps", "9"], caplog)
            what = "a folder" if kind == "folder" else "not a regular file (a FIFO, a socket or a device)"
            assert f"error: {run / name} is {what}, where the run keeps its {name}: remove or rename it, and " \
                   f"resume again" in err, err
            assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in trained_run[0].iterdir())


@pytest.mark.slow
def test_a_train_log_that_cannot_be_opened_ends_the_run_in_one_line(trained_run, tmp_path):
    """The launcher keeps its last lines in train.log too: one it cannot open, though it is not
    there as something else (a link into a folder that is gone), ends the run as rank 0's failure
    to open it does, in one line, not a traceback."""
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / "train.log").unlink()
    (run / "train.log").symlink_to(tmp_path / "gone" / "train.log")
    result = launch("--resume", run, "--epochs", "2", "--max-steps", "8", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the run stopped: rank 0 failed: FileNotFoundError: " in result.stderr, result.stderr


def test_a_current_folder_that_was_removed_is_one_line(tmp_path):
    """The ranks' start reads it: a traceback from multiprocessing, before, whatever --out said."""
    result = subprocess.run(["sh", "-c", 'mkdir gone && cd gone && rmdir ../gone && exec "$@"', "sh", sys.executable,
                             "-m", "launch.two_gpu", "--out", str(tmp_path / "runs")], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        "error: the current folder no longer exists (removed since the shell entered it): cd to one that does, and "
        "run the command again\n"), result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_start_of_a_run_killed_in_its_first_save_is_named_and_its_partial_file_removed(tiny_data, tmp_path,
                                                                                         caplog):
    """Killed in its first save: the folder holds the run's config.json, its log and a partial
    checkpoint of some 300 MB that nothing removed. --resume said 'no checkpoint at', a new start
    of the same --run-name 'holds other files'; neither said what to do, and the file stayed."""
    from launch.two_gpu import check_saved_one, lock_run_folder
    folder = tmp_path / "r"
    folder.mkdir()
    config = dataclasses.asdict(parse_config(["--data", str(tiny_data), "--out", str(tmp_path), "--run-name", "r"]))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "train.log").write_text("epoch 1 step 9 ...\n")
    ended = subprocess.Popen(["true"])
    ended.wait()
    partial = folder / f".checkpoint.pt.tmp-{socket.gethostname()}-{ended.pid}"
    resumed = (f"error: {folder} holds no checkpoint to resume (its run stopped before its first save ended, or the "
               f"checkpoint was removed): start the run again with the options in its config.json, with another "
               f"--run-name or after removing that folder (rm -r {folder})")
    for given in (folder, folder / "checkpoint.pt"):
        partial.write_bytes(b"partial")
        err = _error_of(["--resume", given], caplog)
        assert resumed in err, err
        assert not partial.exists()
    def read_only(path):  # a colleague's folder, which this user may read only
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    partial.write_bytes(b"partial")
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr("launch.two_gpu.lock_exclusively", read_only)
        err = _error_of(["--resume", folder], caplog)
    assert resumed in err and partial.exists(), err  # not "copy the folder to a place you can write"
    with lock_run_folder(folder):  # a run there now, before its first save: not to be removed
        assert f"error: {folder} is in use by another run (" in _error_of(["--resume", folder], caplog)
        # under torchrun each rank checks, and rank 0 alone locks: rank 1 did not take rank 0's lock for another run's
        with pytest.MonkeyPatch.context() as env:
            for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
                env.setenv(name, value)
            with pytest.raises(ValueError, match="holds no checkpoint to resume"):
                check_saved_one(folder)
    partial.write_bytes(b"partial")
    restart = ["--data", tiny_data, "--out", tmp_path, "--run-name", "r", *TINY]
    err = _error_of(restart, caplog)
    assert (f"error: {folder} holds an earlier start of a run, without a checkpoint (config.json, train.log): "
            f"choose another --run-name, or remove that folder (rm -r {folder})") in err, err
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "config.json", "train.log"]
    # what is no start of a run cut short: no word of one, nothing removed
    for name, content in (("config.json", '{"name": "a file of the user\'s own"}'),
                          ("config.json", json.dumps({**config, "eval_only": str(folder)})),  # an evaluation's
                          ("summary.json", "{}")):  # a run that finished, its checkpoint removed since
        (folder / "config.json").write_text(json.dumps(config))
        (folder / name).write_text(content)
        assert "holds other files (" in _error_of(restart, caplog)
        assert f"no checkpoint at {folder / 'checkpoint.pt'}" in _error_of(["--resume", folder], caplog)
        (folder / "summary.json").unlink(missing_ok=True)


def test_a_run_folder_holds_one_run(tiny_data, tmp_path, caplog):
    from launch.two_gpu import lock_run_folder
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "train.log").write_text("a run that stopped before its first checkpoint\n")
    err = _error_of(["--data", tiny_data, "--out", tmp_path, "--run-name", "earlier", *TINY], caplog)
    assert "holds other files (train.log): choose another --run-name" in err
    assert (earlier / "train.log").read_text().startswith("a run that stopped") and not (earlier / "config.json").exists()
    assert sorted(p.name for p in earlier.iterdir()) == ["train.log"]  # left as it was found: no lock file
    for resumed, fix in ((True, "copy the folder to a place you can write and resume the copy"),
                         (False, "give an --out folder you can write")):  # --out is refused on resume
        with pytest.raises(ValueError, match=f"cannot write in the run folder .*: {fix}"):
            lock_run_folder(tmp_path / "vanished", resumed=resumed)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    err = _error_of(["--data", tiny_data, "--out", dangling, *TINY], caplog)
    assert f"--out {dangling} is a symbolic link to {tmp_path / 'gone'}, which is not there: make that folder" in err

    busy = tmp_path / "busy"
    busy.mkdir()
    lock = lock_run_folder(busy)  # as a run holds it while it runs
    try:
        err = _error_of(["--data", tiny_data, "--out", tmp_path, "--run-name", "busy", *TINY], caplog)
        assert f"{busy} is in use by another run (process {os.getpid()}" in err
        assert err.rstrip().endswith("wait for it to end, or choose another --run-name"), err
        with pytest.raises(ValueError, match=r"in use by another run \(.*\): wait for it to end$"):
            lock_run_folder(busy, resumed=True)  # which --run-name would not change
    finally:
        lock.close()


def test_a_run_folder_that_cannot_be_written_is_named(tiny_data, tmp_path, caplog):
    folder = tmp_path / "immutable"
    folder.mkdir()
    # An immutable folder: no file can be made in it, not even by root (as the tests may run).
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
        pytest.skip("chattr +i does not work here")
    try:
        err = _error_of(["--data", tiny_data, "--out", tmp_path, "--run-name", "immutable", *TINY], caplog)
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)
    assert f"cannot write in the run folder {folder} (Operation not permitted)" in err and "Traceback" not in err
    # a run's folder made immutable after it ran: its lock file opens all the same (a failure in a rank, before)
    from launch.two_gpu import LOCK_NAME, lock_run_folder
    (folder / LOCK_NAME).write_text("")
    subprocess.run(["chattr", "+i", folder], check=True)
    try:
        with pytest.raises(ValueError, match=rf"^cannot write in the run folder {re.escape(str(folder))} \(Operation "
                                             rf"not permitted\): copy the folder to a place you can write"):
            lock_run_folder(folder, resumed=True)
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)
    assert sorted(os.listdir(folder)) == [LOCK_NAME]


def test_a_lock_file_that_is_a_pipe_is_named(tmp_path, capsys):
    """A run folder's .lock, or a DST's .prepare.lock, made a named pipe: the refusal said
    "(None)" (io's error has no strerror), and prepare's did not name the file."""
    from launch import builtin, prepare
    from launch.two_gpu import LOCK_NAME, lock_run_folder
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / LOCK_NAME)
    with pytest.raises(ValueError) as refused:
        lock_run_folder(folder, resumed=True)
    assert str(refused.value).startswith(f"cannot write in the run folder {folder} (.lock there is not a file but a "
                                         f"pipe, a device or a socket): "), refused.value
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    os.mkfifo(dst / data_module.PREPARE_LOCK_NAME)
    shutil.copytree(builtin.builtin_dataset(tmp_path / "tiny", train_per_class=1, val_per_class=1), src)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {dst / '.prepare.lock'} in DST {dst} (.prepare.lock there is not a file but a pipe, a "
        f"device or a socket): give a DST that can be written; run again, and the images already written are kept")


@pytest.mark.parametrize("layout, net", [("one-tower", "one-tower net"), ("single", "single-device reference")])
def test_fc8_placement_split_is_refused_for_a_net_without_towers(tiny_data, tmp_path, caplog, layout, net):
    """It has no towers: the option would be recorded in the run's files, and mean nothing.
    (A towers run's placement that a resume as single keeps, not given, is kept for its next
    resume as towers.)"""
    err = _error_of(["--data", tiny_data, "--out", tmp_path / "runs", *TINY, "--layout", layout, "--fc8-placement",
                     "split"], caplog)
    assert f"--fc8-placement split: the {net} has no towers to place FC8's neurons on: drop the option" in err
    assert not (tmp_path / "runs").exists()


def test_a_data_folder_of_one_class_is_refused_naming_the_fix(tiny_data, tmp_path, caplog):
    """Not by the net (num_classes must be at least 2), with no fix named; launch.prepare and
    the loader's benchmark, which train nothing, take such a folder."""
    one = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(tiny_data / split / sorted(os.listdir(tiny_data / "train"))[0], one / split / "only")
    err = _error_of(["--data", one, "--out", tmp_path / "runs", *TINY], caplog)
    assert (f"error: {one} has one class, only: a classifier tells classes apart, so add the folders of the others "
            f"(two at least) to train/ and val/") in err, err
    assert not (tmp_path / "runs").exists() and not list(one.glob(".alexnet-stats-*"))  # no statistics computed
    assert len(data_module.open_data(one).classes) == 1


def test_a_checkpoint_of_other_classes_is_refused(tiny_data, tmp_path, caplog):
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_data, renamed)
    first = sorted(os.listdir(renamed / "train"))[0]
    for split in ("train", "val"):  # same number of classes, one of them another
        (renamed / split / first).rename(renamed / split / "zzz_other")
    trained = tmp_path / "trained.pt"
    save_reference(trained, reference_from_seed(10, 0), classes=sorted(os.listdir(tiny_data / "train")))
    err = _error_of(["--data", renamed, "--out", tmp_path / "runs", "--eval-only", trained], caplog)
    assert "was trained on other classes than the data's" in err and f"{first} -> " in err
    assert not (tmp_path / "runs").exists()
    # a name that prints as the checkpoint's, its letters written otherwise (é as e and a combining accent)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.check_classes({"arch": {"num_classes": 2}, "classes": ["caf\u00e9", "tea"]}, "run", ["cafe\u0301", "tea"])
    assert "(1 differ: 'caf\\xe9' -> 'cafe\\u0301', the same letters in another Unicode form)" in str(refused.value)
    for saved, now, shown in (("tea ", "tea", "'tea ' -> 'tea'"), ("a\u00a0b", "a b", "'a\\xa0b' -> 'a b'"),
                              ("tea\u200b", "tea", "'tea\\u200b' -> 'tea'"), ("te\u00ada", "tea", "'te\\xada' -> 'tea'")):
        with pytest.raises(checkpoint.CheckpointError) as refused:
            checkpoint.check_classes({"arch": {"num_classes": 2}, "classes": [saved, "z"]}, "run", [now, "z"])
        assert f"(1 differ: {shown}, escaped: characters that do not print, or a space at an end)" in \
            str(refused.value)


def test_a_file_that_is_no_checkpoint_is_named_as_such_without_torchs_advice(tmp_path):
    """torch.load's own message for a file that is not a zip archive advises saving it again
    with an option of torch.save: no help to whoever was handed the file. Read whole, not
    mapped (launch.predict, launch.show), torch.load reads its legacy format, a checkpoint in
    it too (with no checksums to check), and warns of a plain pickle before refusing it."""
    legacy, noise, truncated = tmp_path / "legacy.pt", tmp_path / "noise.pt", tmp_path / "truncated.pt"
    plain, saved_legacy = tmp_path / "plain.pt", tmp_path / "saved-legacy.pt"
    torch.save({"format": FORMAT}, legacy, _use_new_zipfile_serialization=False)  # torch's format before 1.6
    noise.write_bytes(bytes(range(256)) * 4)
    plain.write_bytes(pickle.dumps({"format": FORMAT}, protocol=4))
    save_reference(truncated, reference_from_seed(10, 0))
    torch.save(load_checkpoint(truncated), saved_legacy, _use_new_zipfile_serialization=False)
    truncated.write_bytes(truncated.read_bytes()[:1 << 20])
    for path in (legacy, noise, plain, saved_legacy, truncated):
        for mmap in (True, False):
            with pytest.raises(checkpoint.CheckpointError) as refused, warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing said before the refusal's one line
                load_checkpoint(path, mmap=mmap)
            said = str(refused.value)
            assert said.startswith(f"{path} is truncated or not a checkpoint (") and "torch.save your" not in said, said
            assert said.endswith("): give a whole checkpoint that this program wrote"), said
            assert ("not a zip archive" in said) == (path != truncated) and said.count("give a whole") == 1, said
    with pytest.raises(RuntimeError) as torchs:
        torch.load(truncated, weights_only=True)
    first = str(torchs.value).splitlines()[0]  # its first line: cut at a word, and said to be, where it is long
    assert (f"(RuntimeError: {first[:200].rsplit(' ', 1)[0]} ...): " if len(first) > 200 else first) in said, said


def test_saved_options_of_another_type_or_outside_their_choices_are_named():
    """What JSON and torch.save keep of the options: a whole number for a float field (300 for
    300.0), a list for a tuple, None for an option left to the recipe are the options' own; a
    list holding other than whole numbers, a float for an int, a value outside the choices
    are named as they were saved. A field the options lack is left to the caller."""
    own = {"timeout": 300, "lr": 1, "lr_milestones": [30, 60], "epochs": None, "recipe": None, "schedule": "fixed"}
    assert cli.values_refused(own, TrainConfig) == []
    saved = {"lr_milestones": [30, "60"], "epochs": 2.0, "schedule": "weekly", "no_such_option": 1}
    assert cli.values_refused(saved, TrainConfig) == ["lr_milestones=[30, '60']", "epochs=2.0", "schedule='weekly'"]


def test_a_checkpoint_this_user_cannot_read_is_said_so_not_called_truncated(tmp_path, monkeypatch):
    """A whole checkpoint of another user's, private: "truncated or not a checkpoint" sent the
    user to look for another copy. (Simulated: the tests may run as root, who reads any file.)"""
    private = tmp_path / "private.pt"
    save_reference(private, reference_from_seed(10, 0))

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(checkpoint, "open", refused, raising=False)  # the checkpoint module's reads
    with pytest.raises(checkpoint.CheckpointError, match=f"^cannot read {private} \\(Permission denied\\): give a "
                                                         f"checkpoint that this user can read, or let it be read"):
        load_checkpoint(private)


def test_a_checkpoint_in_a_folder_whose_name_is_not_utf8_is_read(tmp_path):
    """A run folder named in bytes that are not UTF-8 (Python holds them as surrogates): a
    checkpoint saved there is read back by load_checkpoint (which --resume, --eval-only,
    launch.predict and launch.show read through), mapped or read whole: torch.load maps a file
    by a UTF-8 name only."""
    from launch.checkpoint import read_as_saved
    folder = tmp_path / os.fsdecode(b"run-\xff")
    model = reference_from_seed(10, 0)
    save_reference(folder / "checkpoint.pt", model)
    for mmap in (True, False):
        loaded = load_checkpoint(folder, mmap=mmap)
        assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items()), mmap
    assert torch.equal(read_as_saved(folder / "checkpoint.pt")["model"]["fc8.bias"], model.fc8.bias)


def test_a_damaged_checkpoint_is_refused_not_loaded_as_it_is(tmp_path):
    """Bytes of a tensor changed on the disk or in a copy: torch.load would load them as they
    are, and the net would predict worse without a word. A pickle edited by hand is refused in
    one line too, not with the unpickler's traceback."""
    good, damaged, edited = tmp_path / "good.pt", tmp_path / "damaged.pt", tmp_path / "edited.pt"
    save_reference(good, reference_from_seed(10, 0))
    with zipfile.ZipFile(good) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("/data/3"))
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)  # its bytes
    damaged.write_bytes(good.read_bytes())
    with open(damaged, "r+b") as f:
        f.seek(start + 1000)
        f.write(b"\0\0\0\0")
    with pytest.raises(checkpoint.CheckpointError, match=(
            f"^{damaged} is damaged: its record {record.filename} does not match the checksum written with it "
            f"\\(a disk or a copy went wrong\\): give an undamaged copy, or an earlier checkpoint$")):
        load_checkpoint(damaged)
    with zipfile.ZipFile(edited, "w") as archive:  # whole records, whose pickle makes OrderedDict(True)
        for name, data in records:
            archive.writestr(name, b"\x80\x02ccollections\nOrderedDict\n\x88\x85R." if name.endswith("data.pkl") else data)
    with pytest.raises(checkpoint.CheckpointError, match=f"^{edited} is truncated or not a checkpoint \\(TypeError: "):
        load_checkpoint(edited)
    assert load_checkpoint(good)["arch"]["num_classes"] == 10
    unchecked = tmp_path / "unchecked.pt"  # saved without checksums (CRC 0), as torch may be told to: loads
    torch.serialization.set_crc32_options(False)
    try:
        save_reference(unchecked, reference_from_seed(10, 0))
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(unchecked)["arch"]["num_classes"] == 10
    # Zip archives torch.save does not write are left to torch.load to name, not checked and not a traceback.
    for compression in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
        packed = tmp_path / f"packed-{compression}.pt"
        with zipfile.ZipFile(packed, "w", compression=compression) as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")  # {}: no marker
            archive.writestr("archive/notes.txt", b"x" * 1000)
        if compression == zipfile.ZIP_DEFLATED:  # its compressed bytes damaged: zlib's error, not BadZipFile
            with zipfile.ZipFile(packed) as archive:
                where = archive.getinfo("archive/notes.txt").header_offset + 30 + len("archive/notes.txt") + 2
            with open(packed, "r+b") as f:
                f.seek(where)
                f.write(b"\xff\xff\xff")
        with pytest.raises(checkpoint.CheckpointError, match=f"^{packed} (is truncated or not a checkpoint|is not a "
                                                             f"checkpoint of this project)"):
            load_checkpoint(packed)


@pytest.mark.slow
def test_bad_checkpoints_get_clear_errors_and_run_no_code(tiny_data, tmp_path, caplog):
    args = ["--data", tiny_data, "--out", tmp_path / "runs", "--eval-only"]
    good = tmp_path / "good.pt"
    save_reference(good, reference_from_seed(10, 0))
    assert "trained for 10 classes but the data has 5" in _error_of(
        ["--data", _five_classes(tiny_data, tmp_path), "--out", tmp_path / "runs", "--eval-only", good], caplog)
    # a --data that is no folder: named, without the built-in dataset for advice (left out, the run's data is read)
    meaned = tmp_path / "meaned.pt"
    save_reference(meaned, reference_from_seed(10, 0), data_mean=torch.zeros(3, 256, 256))
    err = _error_of(["--data", good, "--out", tmp_path / "runs", "--eval-only", meaned], caplog)
    assert f"data folder {good} is not a folder: pass the path of" in err and "built-in" not in err, err

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in _error_of([*args, truncated], caplog)

    other_arch = tmp_path / "other.pt"
    torch.save(checkpoint_payload(torch.nn.Linear(3, 10).state_dict(), num_classes=10), other_arch)
    assert "does not hold the 2012 AlexNet" in _error_of([*args, other_arch], caplog)
    torch.save(reference_from_seed(10, 0).state_dict(), tmp_path / "plain.pt")
    assert "not a checkpoint of this project (no 'alexnet-towers/checkpoint' marker): give one that launch.two_gpu " \
           "or launch.checkpoint.save_reference wrote\n" in _error_of([*args, tmp_path / "plain.pt"], caplog)
    # the options of training, which an evaluation would ignore; at their default values too
    assert f"error: --lr --seed: --eval-only evaluates {good} and trains nothing, so these options do nothing: drop them" \
        in _error_of([*args, good, "--lr", "0.1", "--seed", "0", "--batch-size", "8"], caplog)
    assert "so this option does nothing: drop it\n" in _error_of([*args, good, "--max-steps", "3"], caplog)
    save_reference(tmp_path / "odd-mean.pt", reference_from_seed(10, 0), data_mean=torch.zeros(3, 224, 224))
    assert "holds a mean image of shape (3, 224, 224), not 3 x 256 x 256" in _error_of(
        [*args, tmp_path / "odd-mean.pt"], caplog)

    for value in (float("nan"), float("inf")):
        diverged = reference_from_seed(10, 0)
        with torch.no_grad():
            diverged.fc8.weight[3, 7] = value
        save_reference(tmp_path / "diverged.pt", diverged)
        assert f"error: {tmp_path / 'diverged.pt'} holds values that are not finite numbers (NaN or infinite) in " \
               f"fc8.weight: the run diverged before it was saved; use an earlier checkpoint" in _error_of(
                   [*args, tmp_path / "diverged.pt"], caplog), value
    integral = reference_from_seed(10, 0).state_dict()
    integral["conv1.weight"] = integral["conv1.weight"].to(torch.int64)  # all 0: another function, silently
    save_checkpoint(tmp_path / "integral.pt", checkpoint_payload(integral, num_classes=10))
    assert f"error: {tmp_path / 'integral.pt'} holds values that are not floating-point numbers (conv1.weight as " \
           f"int64): it was not saved by this program" in _error_of([*args, tmp_path / "integral.pt"], caplog)
    payload = load_checkpoint(good)
    for name, broken in (("arch", dict(payload, arch=[1, 2])),
                         ("model", {k: v for k, v in payload.items() if k != "model"}),
                         ("a weight", dict(payload, model=dict(payload["model"], **{"fc8.bias": "text"}))),
                         ("num_classes", dict(payload, arch=dict(payload["arch"], num_classes="10"))),
                         *((f"num_classes {n}", dict(payload, arch=dict(payload["arch"], num_classes=n)))
                           for n in (1, -1))):
        torch.save(broken, tmp_path / "broken.pt")
        assert f"{tmp_path / 'broken.pt'} is not laid out as this program writes a checkpoint" in _error_of(
            [*args, tmp_path / "broken.pt"], caplog), name
    for broken, said in ((dict(payload, version=2), "has checkpoint version 2; this program reads version 1: read it "
                                                    "with the version of this program that wrote it"),
                         (dict(payload, arch=dict(payload["arch"], name="alexnet-2014")),
                          "holds architecture 'alexnet-2014', not 'alexnet-2012': it was not saved by this program")):
        torch.save(broken, tmp_path / "broken.pt")
        assert f"error: {tmp_path / 'broken.pt'} {said}\n" in _error_of([*args, tmp_path / "broken.pt"], caplog), said

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": FORMAT, "payload": _RunsCommand(f"touch {marker}")}, crafted)
    assert "refusing to load" in _error_of([*args, crafted], caplog)
    assert not marker.exists()
    assert "no checkpoint at" in _error_of([*args, tmp_path / "missing.pt"], caplog)


def test_a_run_folder_whose_config_cannot_be_written_is_one_line_and_left_as_found(tiny_data, tmp_path, caplog,
                                                                                   monkeypatch):
    """A full disk under --out when config.json is written: an evaluation checks no room for
    checkpoints beforehand. One line naming the fix; the folder made for the run is removed."""
    good = tmp_path / "good.pt"
    save_reference(good, reference_from_seed(10, 0))

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(two_gpu, "write_whole", full)
    for name in (None, "named"):
        err = _error_of(["--data", tiny_data, "--out", tmp_path / "runs", "--eval-only", good,
                         *(["--run-name", name] if name else [])], caplog)
        assert "error: cannot write " in err and "/config.json (No space left on device): free space on its disk, " \
            "or give another --out" in err, err
        assert list((tmp_path / "runs").iterdir()) == [], name
    long = tmp_path / ("a" * 300)  # a name the system cannot even look at: named as such, before any folder is made
    assert f"error: cannot use --out {long} (File name too long)" in _error_of(
        ["--data", tiny_data, "--out", long, "--eval-only", good, "--run-name", "x"], caplog)
    (tmp_path / "runs" / "mine").mkdir()  # a folder made beforehand, empty, is kept
    _error_of(["--data", tiny_data, "--out", tmp_path / "runs", "--eval-only", good, "--run-name", "mine"], caplog)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["mine"] and not any((tmp_path / "runs" / "mine").iterdir())


def test_a_resume_is_refused_where_the_checkpoint_s_place_in_the_epoch_is_not_in_the_data(small_bundle, tmp_path):
    """20 training images, 5 batches of 4: a checkpoint may stand at batch 5 (its epoch ended), never at 6.
    Where the count of images changed, the data is at fault and named so; where it did not, the checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").touch()  # its content: the dicts below
    config = parse_config(["--resume", str(run / "checkpoint.pt"), "--batch-size", "4", "--epochs", "3"])
    saved = {"train_images": 20, "progress": {"epoch": 1, "batch": 5, "global_step": 10}}
    two_gpu.check_resumable(config, saved, small_bundle)
    beyond = dict(saved, progress=dict(saved["progress"], batch=6))
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            f"{config.resume} records batch 6 of an epoch of 5 batches (20 training images in batches of 4): it was "
            f"not saved by this program; evaluate it with --eval-only, or start a new run")):
        two_gpu.check_resumable(config, beyond, small_bundle)
    for had, payload in (("21 training images", dict(saved, train_images=21)),
                         ("at least 6 batches", {"progress": beyond["progress"]})):  # saved before it kept the count
        with pytest.raises(data_module.DataError, match="^" + re.escape(
                f"the training set changed since {run} was saved: it had {had}, {small_bundle.root / 'train'} now "
                f"has 20 (5 batches of 4), so the run cannot continue where it stopped: resume with the data it "
                f"was trained on, or start a new run") + "$"):
            two_gpu.check_resumable(config, payload, small_bundle)


def test_a_checkpoint_named_otherwise_is_resumed_where_its_folder_s_records_are_its_own(tmp_path):
    """A hard link to the run's own checkpoint.pt is that checkpoint; in a folder without one,
    records whose last resume is of another file are refused, whatever resumes came before."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"saved")
    os.link(run / "checkpoint.pt", run / "linked.pt")
    two_gpu.check_resumed_file(str(run / "linked.pt"))  # the same file: nothing written over
    (run / "copy.pt").write_bytes(b"saved")
    with pytest.raises(ValueError, match=f"and {run / 'checkpoint.pt'} is another checkpoint, which it would write "):
        two_gpu.check_resumed_file(str(run / "copy.pt"))
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("a.pt", "b.pt"):
        (alone / name).write_bytes(b"saved")
    metrics = alone / "metrics.jsonl"
    resumes = [{"event": "resume", "step": 1, "checkpoint": str(alone / "a.pt")}, {"event": "train", "step": 2},
               {"event": "resume", "step": 2, "checkpoint": str(alone / "b.pt")}, {"event": "train", "step": 3}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in resumes))
    two_gpu.check_resumed_file(str(alone / "b.pt"))  # resumed last: it goes on with its own records
    with pytest.raises(ValueError, match="and the last resume they record is not of this file"):
        two_gpu.check_resumed_file(str(alone / "a.pt"))


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """Without --run-name a run's folder is named by the second it starts: a second run in that
    second (a script starting several) takes the next free suffix, never the first one's folder."""
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 7, 9, 30, 5)
    monkeypatch.setattr(two_gpu, "datetime", types.SimpleNamespace(datetime=Frozen))
    config = parse_config(["--out", str(tmp_path / "runs")])
    made = [two_gpu.new_run_folder(config) for _ in range(3)]
    assert made == [(tmp_path / "runs" / name, True) for name in ("20261207-093005", "20261207-093005-2",
                                                                 "20261207-093005-3")]
    for i in range(4, 100):
        (tmp_path / "runs" / f"20261207-093005-{i}").mkdir()
    with pytest.raises(ValueError, match=f"^{tmp_path / 'runs'} already holds runs named 20261207-093005\\*: give a "
                                         f"--run-name$"):
        two_gpu.new_run_folder(config)


def test_a_refusal_logs_its_text_and_keeps_nothing_it_loaded(tmp_path, caplog):
    """A log record that held the error held its traceback's frames and the checkpoint they had
    loaded: a handler that keeps records (pytest's) kept every refused checkpoint in memory (0.45 GB
    each, mapped from /dev/shm: one test of 40 refusals held 17 GB, and was killed for memory)."""
    weights_only = tmp_path / "reference.pt"
    save_reference(weights_only, reference_from_seed(10, 0))
    assert "holds weights but no training state" in _error_of(["--resume", weights_only], caplog)
    kept = [arg for record in caplog.records for arg in (record.args or ()) if isinstance(arg, BaseException)]
    assert kept == [], kept


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_and_weights_only_checkpoints(tiny_data, tmp_path, caplog):
    weights_only = tmp_path / "reference.pt"
    save_reference(weights_only, reference_from_seed(10, 0))
    assert "holds weights but no training state" in _error_of(["--resume", weights_only], caplog)
    full = Run("--data", tiny_data, "--out", tmp_path, "--run-name", "real", "--max-steps", "1", *TINY,
               run_dir=tmp_path / "real")
    assert full.wait(timeout_s=300) == 0, full.stderr()
    err = _error_of(["--resume", tmp_path / "real", "--dropout", "0.3"], caplog)
    assert "--dropout 0.3 differs from the resumed run's 0.5" in err
    err = _error_of(["--resume", tmp_path / "real", "--val-limit", "8"], caplog)  # the schedule compares one set
    assert "--val-limit 8 differs from the resumed run's 4" in err
    assert "has taken 1 steps, --max-steps 1 no more than that" in _error_of(
        ["--resume", tmp_path / "real", "--max-steps", "1"], caplog)

    shutil.copy(tmp_path / "real" / "checkpoint.pt", tmp_path / "real" / "backup.pt")  # a copy kept of a step
    err = _error_of(["--resume", tmp_path / "real" / "backup.pt"], caplog)
    assert f"and {tmp_path / 'real' / 'checkpoint.pt'} is another checkpoint, which it would write over: copy " \
           f"backup.pt into a folder of its own as checkpoint.pt" in err, err
    # beside another run's files, no checkpoint of theirs: its records (a run stopped before its first save)
    # would be taken up as the resumed run's, and the config.json rewritten
    (tmp_path / "stopped").mkdir()
    shutil.copy(tmp_path / "real" / "config.json", tmp_path / "stopped" / "config.json")  # the program's
    shutil.copy(tmp_path / "real" / "checkpoint.pt", tmp_path / "stopped" / "other.pt")
    err = _error_of(["--resume", tmp_path / "stopped" / "other.pt"], caplog)
    assert f"--resume {tmp_path / 'stopped' / 'other.pt'}: a resumed run goes on in that file's folder and saves as " \
           f"its checkpoint.pt, and {tmp_path / 'stopped'} holds a run's files (config.json) but no checkpoint.pt, " \
           f"which may be another run's: copy other.pt into a folder of its own" in err, err
    assert (tmp_path / "stopped" / "config.json").read_bytes() == (tmp_path / "real" / "config.json").read_bytes()
    # a folder of its own, where a resume of it stopped before its first save: resumed again, as it says;
    # another checkpoint there is refused, its records not those of the last resume (nor of none)
    downloaded = tmp_path / "downloaded" / "alexnet.pt"
    downloaded.parent.mkdir()
    shutil.copy(tmp_path / "real" / "checkpoint.pt", downloaded)
    shutil.copy(downloaded, downloaded.parent / "other.pt")
    (downloaded.parent / "train.log").write_text("")
    (downloaded.parent / "config.json").write_text('{"model": "alexnet"}')  # a user's own, downloaded with it
    two_gpu.check_resumed_file(str(downloaded))  # nothing taken up
    (downloaded.parent / "config.json").unlink()
    metrics = downloaded.parent / "metrics.jsonl"
    for records in ([{"event": "train", "step": 2}], [{"event": "resume", "step": 1, "checkpoint": str(downloaded)},
                                                      {"event": "train", "step": 2}]):
        metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
        with pytest.raises(ValueError, match=f"and {re.escape(str(downloaded.parent))} holds records "
                                             f"\\(metrics.jsonl\\) but no checkpoint.pt, and the last resume they "
                                             f"record is not of this file \\(or none is\\)"):
            two_gpu.check_resumed_file(str(downloaded.parent / "other.pt"))
    (tmp_path / "link").symlink_to(downloaded.parent)
    for name in (downloaded, tmp_path / "link" / "alexnet.pt", downloaded.parent / ".." / "downloaded" / "alexnet.pt"):
        two_gpu.check_resumed_file(str(name))  # the records of its own last resume, however the file is named
    assert two_gpu._after_interrupt(two_gpu.parse_config(["--resume", str(downloaded)]), downloaded.parent) == (
        f"no checkpoint was written since it resumed: start it again from the checkpoint it resumed (--resume "
        f"{downloaded})")
    metrics.unlink()  # as the program writes them, the first resume beginning the file
    assert main(["--resume", str(downloaded), "--max-steps", "2", "--workers", "0"]) == 0
    first = json.loads(metrics.read_text().splitlines()[0])
    assert (first["event"], first["checkpoint"]) == ("resume", str(downloaded)), first
    payload = load_checkpoint(tmp_path / "real")  # a run that evaluated all the validation images
    save_checkpoint(tmp_path / "all" / "checkpoint.pt", dict(payload, config=dict(payload["config"], val_limit=None)))
    err = _error_of(["--resume", tmp_path / "all", "--val-limit", "8"], caplog)
    assert "--val-limit 8 differs from the resumed run, which ran without --val-limit: a resumed run keeps" in err
    for option in (["--out", tmp_path / "branch"], ["--run-name", "branch"], ["--out", "runs"]):  # never silently
        # the old folder (--out at its default value too)
        err = _error_of(["--resume", tmp_path / "real", *option], caplog)
        assert f"a resumed run goes on in its own folder, {tmp_path / 'real'}; drop the option" in err, err

    # Its data moved: named by --data at the new place (the class names and counts checked).
    payload = load_checkpoint(tmp_path / "real")
    shutil.copytree(tiny_data, tmp_path / "data-new-place")
    save_checkpoint(tmp_path / "moved" / "checkpoint.pt", dict(payload, config=dict(payload["config"],
                                                                                   data=str(tmp_path / "gone"))))
    err = _error_of(["--resume", tmp_path / "moved"], caplog)
    assert f"was trained on {tmp_path / 'gone'}, which is not there now: give the images' new place with --data" in err
    err = _error_of(["--resume", tmp_path / "moved", "--data", tmp_path / "typo"], caplog)  # not the run's fault
    assert f"error: --data {tmp_path / 'typo'} does not exist: give the folder of the images that " \
           f"{tmp_path / 'moved'} was trained on" in err, err
    # accepted: the refusal that comes after every check of the data
    err = _error_of(["--resume", tmp_path / "moved", "--data", tmp_path / "data-new-place", "--max-steps", "1"], caplog)
    assert "has taken 1 steps, --max-steps 1 no more than that" in err, err

    # A training state this program did not write: of a version with an option more, or damaged.
    for broken, words in ((dict(payload, config=dict(payload["config"], future_option=1)),
                           "records options this program does not have (future_option): another version of it saved "
                           "the run; evaluate it with --eval-only, or resume it with the version of this program"),
                          (dict(payload, config="text"), "records its run's recipe as a str, not as this program"),
                          (dict(payload, config=dict(payload["config"], epochs="3")),
                           "records its run's recipe with values of other types than this program writes"),
                          ({k: v for k, v in payload.items() if k != "progress"}, "records no progress (epoch, batch"),
                          (dict(payload, progress=dict(payload["progress"], batch=-1)), "records no progress"),
                          (dict(payload, momentum_buffer=dict(payload["momentum_buffer"],
                                                              **{"conv1.weight": torch.zeros(3)})),
                           "holds momentum that does not fit its weights"),
                          (dict(payload, rng={"rank0": {"cpu": torch.zeros(3, dtype=torch.uint8)}}),
                           "holds random states that are not as this program writes them"),
                          (dict(payload, rng={"rank0": {"cpu": torch.get_rng_state().float()}}),
                           "holds random states that are not as this program writes them"),
                          (dict(payload, rng=dict(payload["rng"], rank1="text")), "holds random states that are"),
                          (dict(payload, rng=[]), "holds random states that are"),
                          # one rank's missing: it went on from its seed, and the run not as it was
                          (dict(payload, rng={"rank0": payload["rng"]["rank0"]}),
                           "holds the random states of 1 ranks, and its run (towers, 1 replica) had 2"),
                          # of the right size, but no Mersenne Twister's state: it failed in the rank
                          (dict(payload, rng={"rank0": {"cpu": torch.zeros_like(torch.get_rng_state())}}),
                           "holds random states that are not as this program writes them"),
                          # values no option takes: a traceback, a failure in a rank, or another run without a word
                          *((dict(payload, config=dict(payload["config"], **{name: value})),
                             f"records its run's recipe with values that this program does not write ({name}="
                             f"{value!r}): evaluate it with --eval-only")
                            for name, value in (("recipe", "zzz"), ("precision", "zzz"), ("layout", "zzz"),
                                                ("schedule", "zzz"), ("epochs", 2.5), ("fc8_placement", None))),
                          (dict(payload, config=dict(payload["config"], pooling="non-overlapping")),
                           "records its net otherwise in its recipe than with its weights (pooling 'non-overlapping' "
                           "against 'overlapping')"),
                          *((dict(payload, progress=dict(payload["progress"], **{name: value})),
                             f"records its progress with values that this program does not write ({name}={value!r})")
                            for name, value in (("reductions", -5), ("best_error", "x"), ("best_error", math.nan),
                                                ("lr", math.inf), ("loss", None))),
                          # momentum that trained on wrong (NaN: saved over the checkpoint as NaN weights)
                          *((dict(payload, momentum_buffer=dict(payload["momentum_buffer"],
                                                                **{"conv1.weight": change(momentum)})),
                             "holds momentum that does not fit its weights (of their shapes and types, finite)")
                            for momentum in [payload["momentum_buffer"]["conv1.weight"]]
                            for change in (lambda m: m.to(torch.int32), lambda m: m.half(),
                                           lambda m: torch.full_like(m, math.nan))),
                          # momentum missing, which the run started again from nothing without a word
                          (dict(payload, momentum_buffer={k: v for k, v in payload["momentum_buffer"].items()
                                                          if k != "conv1.weight"}),
                           "lacks the momentum of conv1.weight (after 1 steps)"),
                          (dict(payload, train_images="30"), "records its training set's size as '30', not as"),
                          (dict(payload, train_images=0), "records its training set's size as 0, not as"),
                          # a field this program does not know: a traceback in every rank as the progress is built
                          (dict(payload, progress=dict(payload["progress"], future=1)),
                           "records no progress (epoch, batch and step) as this program writes it"),
                          # the checkpoint at fault, not the data: it said the set of 30 images "now has 30"
                          (dict(payload, progress=dict(payload["progress"], batch=500)),
                           "records batch 500 of an epoch of 7 batches (30 training images in batches of 4): it was "
                           "not saved by this program"),
                          ({k: v for k, v in payload.items() if k != "momentum_buffer"},
                           "lacks the momentum of conv1.bias, conv1.weight, conv2.bias, conv2.weight ... (after 1 ")):
        if words.startswith(("records options", "holds momentum that does not fit its weights (of", "records batch")):
            # through the program, as a user meets them: saved, loaded, and refused in one line
            save_checkpoint(tmp_path / "broken" / "checkpoint.pt", broken)
            err = _error_of(["--resume", tmp_path / "broken"], caplog)
            assert f"error: {tmp_path / 'broken'} {words}" in err and "Traceback" not in err, err
        else:  # as the program checks a loaded checkpoint (two_gpu._configure): a save and a load cost a second
            with pytest.raises(checkpoint.CheckpointError) as refused:
                checkpoint.check_training_state(tmp_path / "broken", broken)
            assert f"{tmp_path / 'broken'} {words}" in str(refused.value)
    # no momentum after steps, as a run with --momentum 0 saves: its own (and any weights' before a step)
    without = {k: v for k, v in payload.items() if k != "momentum_buffer"}
    checkpoint.check_training_state("no-momentum", dict(without, config=dict(payload["config"], momentum=0.0)))
    checkpoint.check_training_state("step-0", dict(without, progress=dict(payload["progress"], global_step=0)))
    save_checkpoint(tmp_path / "broken" / "checkpoint.pt", dict(payload, config="text"))  # its weights evaluate
    assert "data folder" in _error_of(["--eval-only", tmp_path / "broken", "--data", tmp_path / "typo"], caplog)

    # The same run moved to a copy of its data with fewer training images, as many under another
    # name or with the pictures of two classes swapped, other class names, or another validation
    # image in place of one, or the pictures of two classes swapped there (its evaluations so far
    # are of the set it began with); "legacy": a checkpoint saved before the sets' digests, whose
    # validation set is known by its images' names and classes alone.
    legacy = dict({k: v for k, v in payload.items() if not k.endswith("_digest")},
                  val_set=data_module.open_data(tiny_data).fingerprint("val"))
    for change in ("shrunk", "train-renamed", "train-swapped", "renamed", "val-replaced", "val-swapped",
                   "legacy-val-swapped", "legacy-val-replaced"):
        data = tmp_path / f"data-{change}"
        shutil.copytree(tiny_data, data)
        first, second = sorted(os.listdir(data / "train"))[:2]
        if change == "shrunk":
            next(iter(sorted((data / "train" / first).iterdir()))).unlink()
        elif change == "train-renamed":
            image = next(iter(sorted((data / "train" / first).iterdir())))
            image.rename(image.with_name("zzz" + image.suffix))
        elif change.endswith("-swapped"):  # every name where it was, the pictures of two classes swapped
            split = "train" if change == "train-swapped" else "val"
            for x, y in zip(*(sorted((data / split / c).iterdir()) for c in (first, second))):
                pictures = x.read_bytes(), y.read_bytes()
                assert len(pictures[0]) != len(pictures[1])  # as two JPEGs of other pictures are, as a rule
                x.write_bytes(pictures[1]), y.write_bytes(pictures[0])
        elif change.endswith("val-replaced"):
            image = next(iter(sorted((data / "val" / first).iterdir())))
            image.rename(image.with_name("other" + image.suffix))
        else:
            for split in ("train", "val"):
                (data / split / first).rename(data / split / "zzz_other")
        saved = legacy if change.startswith("legacy") else payload
        moved = dict(saved, config=dict(saved["config"], data=str(data)))
        save_checkpoint(tmp_path / f"moved-{change}" / "checkpoint.pt", moved)
        if change == "legacy-val-swapped":  # what the names and classes cannot tell: resumable, as before
            config = two_gpu.resumed_config(parse_config(["--resume", str(tmp_path / f"moved-{change}")]), moved)
            two_gpu.check_resumable(config, moved, data_module.open_data(data))
            continue
        cached = sorted(p.name for p in data.glob(".alexnet-stats-*"))
        # --max-steps: a change not refused fails at once on the steps taken, not after training 90 epochs
        err = _error_of(["--resume", tmp_path / f"moved-{change}", "--max-steps", "1"], caplog)
        expected = {"shrunk": "the training set changed since", "renamed": "was trained on other classes"}.get(
            change, "the validation set changed since" if "val" in change else
            "holds as many images, but other ones (by name, class or size)")
        assert expected in err and "Traceback" not in err, err
        # refused before the changed set's statistics were computed (2,000 images decoded), cached in its folder,
        # and the cache of the set it was trained on removed from there
        assert sorted(p.name for p in data.glob(".alexnet-stats-*")) == cached and "computing" not in err, change

    epochs = payload["config"]["epochs"]
    finished = dict(payload, progress=dict(payload["progress"], epoch=epochs, batch=0))  # as after its last epoch
    save_checkpoint(tmp_path / "finished" / "checkpoint.pt", finished)
    (tmp_path / "finished" / "summary.json").write_text("{}")
    err = _error_of(["--resume", tmp_path / "finished"], caplog)
    assert f"has finished its {epochs} epochs: train it longer with --resume {tmp_path / 'finished'} --epochs N " \
           f"(N > {epochs})" in err, err
    longer = dict(finished, config=dict(payload["config"], epochs=epochs + 2),
                  progress=dict(finished["progress"], epoch=epochs + 2))
    save_checkpoint(tmp_path / "longer" / "checkpoint.pt", longer)
    err = _error_of(["--resume", tmp_path / "longer", "--epochs", epochs + 1], caplog)  # fewer than it has done
    assert f"has finished its {epochs + 2} epochs, and --epochs {epochs + 1} asks for no more: train it longer " \
           f"with --resume {tmp_path / 'longer'} --epochs N (N > {epochs + 2})" in err, err
    assert (tmp_path / "finished" / "summary.json").read_text() == "{}"  # not rewritten
    save_checkpoint(tmp_path / "kept" / "step.pt", finished)  # a file of another name: named itself, as resumable
    err = _error_of(["--resume", tmp_path / "kept" / "step.pt"], caplog)
    assert f"{tmp_path / 'kept' / 'step.pt'} has finished its {epochs} epochs: train it longer with --resume " \
           f"{tmp_path / 'kept' / 'step.pt'} --epochs N (N > {epochs}), or evaluate it with --eval-only " \
           f"{tmp_path / 'kept' / 'step.pt'}" in err, err
    midway = dict(longer, progress=dict(longer["progress"], batch=2))
    save_checkpoint(tmp_path / "midway" / "checkpoint.pt", midway)
    err = _error_of(["--resume", tmp_path / "midway", "--epochs", epochs + 1], caplog)
    assert f"{tmp_path / 'midway'} has trained {epochs + 2} epochs and 2 steps of the next, and --epochs " \
           f"{epochs + 1} asks for no more" in err, err


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _five_classes(tiny_data, tmp_path):
    five = tmp_path / "five"
    for split in ("train", "val"):
        for name in sorted(os.listdir(tiny_data / split))[:5]:
            shutil.copytree(tiny_data / split / name, five / split / name)
    return five


# ---------------------------------------------------------------- nothing listens beyond this machine

def _listening_addresses(pids) -> set:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # 0A: LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found


@pytest.mark.slow
def test_a_refused_run_leaves_no_process_behind(tmp_path):
    """The rank server starts with the program, before the options are read; a refusal ends
    it at once (left alone it would finish importing torch first, holding the output open)."""
    run = Run("--data", tmp_path / "nowhere", "--out", tmp_path, run_dir=tmp_path / "refused")
    assert run.wait() == 2 and "does not exist" in run.stderr()
    # The server was ended and reaped before the launcher exited; multiprocessing's resource
    # tracker ends by itself once the launcher's end of its pipe closes, perhaps between the
    # listing and the reading of its command line (then read as empty: it has ended).
    left = {pid: cmdline(pid) for pid in run.leftovers()}
    assert {pid: line for pid, line in left.items() if line and "resource_tracker" not in line} == {}
    _no_leftovers(run)


@pytest.mark.slow
def test_two_runs_cannot_share_a_run_folder(tiny_data, tmp_path, caplog):
    first = _start(tiny_data, tmp_path, name="shared")
    try:
        first.wait_for_step(1)
        # The second run in this process: refused before it starts a rank.
        second = _error_of(["--data", tiny_data, "--out", tmp_path, "--run-name", "shared", *TINY], caplog)
        assert f"{tmp_path / 'shared'} is in use by another run" in second
        assert _error_of(["--resume", tmp_path / "shared"], caplog)  # no checkpoint yet: refused all the same
    finally:
        kill_all_but_the_resource_tracker(first.proc.pid)  # which removes the launcher's queue's semaphores
        first.wait()


@pytest.mark.slow
def test_a_temporary_folder_too_long_for_a_socket_is_replaced(tiny_data, tmp_path):
    """multiprocessing makes sockets in TMPDIR (the rank server's; a DataLoader worker's, to hand
    a batch over), and an AF_UNIX address holds 107 bytes at most: under a longer TMPDIR the
    program starts nothing and says why, as DataLoader workers would, a warning apart."""
    long = tmp_path / ("t" * 100)
    long.mkdir()
    result = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "run", "--max-steps", "2", "--val-limit",
                    "4", "--no-ten-crop", "--batch-size", "4", "--workers", "1", env=dict(os.environ, TMPDIR=str(long)))
    assert (f"warning: the temporary folder {long} is too long a path for the local sockets that the processes use "
            f"(107 bytes at most, with their names); this program keeps its temporary files in /tmp") in result.stderr
    assert "1 DataLoader worker processes" in result.stderr and "Traceback" not in result.stderr
    assert load_checkpoint(tmp_path / "run")["progress"]["global_step"] == 2 and not any(long.iterdir())


def test_too_few_open_files_are_raised_as_far_as_the_hard_limit_lets_them(monkeypatch):
    """ulimit -Sn 40 (a soft limit): raised; below 32 the rendezvous aborted without a word."""
    import resource
    limits = {"now": (40, 100000)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, values: limits.update(now=values))
    rank_server.room_for_open_files()
    assert limits["now"] == (1024, 100000)
    limits["now"] = (40, 600)
    rank_server.room_for_open_files()
    assert limits["now"] == (600, 600)


@pytest.mark.parametrize("program", ["launch.two_gpu", "benchmarks.run"])
def test_too_few_open_files_are_one_line(tmp_path, program):
    """ulimit -n 20 (soft and hard): an abort without a word (SIGABRT), a wait of --timeout, or a
    traceback, each with a run folder to remove by hand."""
    result = subprocess.run(["sh", "-c", 'ulimit -n 20 && exec "$@"', "sh", sys.executable, "-m", program,
                             "--out", str(tmp_path / "out")], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, (
        "error: this program may hold 20 files open at once (the hard limit, ulimit -Hn), fewer than the 128 it asks "
        "for (its sockets and pipes take dozens, and its DataLoader workers a few more each): raise the hard limit to "
        "1024 (as root, or with docker run --ulimit nofile=1024, systemd's LimitNOFILE or /etc/security/limits.conf)"
        "\n")), \
        result.stderr
    assert not (tmp_path / "out").exists()

def test_a_temporary_folder_too_long_with_none_shorter_to_use_is_one_line(monkeypatch):
    """Where none of /tmp, /var/tmp, /usr/tmp can be written: the sockets' creation failed in a
    traceback ("AF_UNIX path too long")."""
    monkeypatch.setattr(tempfile, "tempdir", "/" + "t" * 100)
    monkeypatch.setattr(rank_server, "SHORT_TEMPORARY", ("/no/such/folder",))
    with pytest.raises(ValueError) as refused:
        rank_server.room_for_sockets()
    assert str(refused.value) == (f"the temporary folder /{'t' * 100} is too long a path for the local sockets that "
                                  f"the processes use (107 bytes at most, with their names), and none of "
                                  f"/no/such/folder can be written: set TMPDIR to a shorter path")


@pytest.mark.slow  # real processes, in a mount namespace of their own
@pytest.mark.parametrize("program", ["launch.two_gpu", "benchmarks.run", "benchmarks.ablations"])
def test_no_temporary_folder_to_write_is_one_line(tmp_path, program):
    """A read-only container: /tmp and /var/tmp read-only, TMPDIR unset, the current folder
    read-only too (where Python looks last). Tracebacks before, from the rank server's start
    or torchvision's import; nothing is written."""
    read_only = ("mount --rbind /tmp /tmp && mount -o remount,bind,ro /tmp && mount --rbind /var/tmp /var/tmp && "
                 "mount -o remount,bind,ro /var/tmp")
    skip_without_namespaces("--mount", setup=read_only)
    script = (f"{read_only} && cd /tmp && exec env -u TMPDIR -u TEMP -u TMP {shlex.quote(sys.executable)} -m {program} "
              f"--out {tmp_path / 'out'}")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        "error: no temporary folder can be written here (TMPDIR, /tmp, /var/tmp, /usr/tmp and the current folder "
        "were tried): set TMPDIR to a folder this user can write (in a read-only container, a writable volume)"), \
        result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

def test_a_loopback_interface_that_is_down_is_one_line(tmp_path):
    """A network namespace of its own, its loopback interface down (unshare -n): the ranks'
    rendezvous was listened on but never reached, and the run waited out --timeout (300 s)
    before a traceback, leaving a run folder."""
    skip_without_namespaces("--net")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--net", sys.executable, "-m", "launch.two_gpu",
                             "--out", str(tmp_path / "out")], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (2, (
        "error: --master-addr 127.0.0.1 can be listened on here but not reached (Network is unreachable): bring its "
        "network interface up (ip link set lo up, for 127.0.0.1), or give another address of this machine")), \
        result.stderr
    assert not (tmp_path / "out").exists()

@pytest.mark.slow
@pytest.mark.parametrize("master_addr", [None, "localhost"])
def test_the_run_listens_on_the_loopback_address_only(tiny_data, tmp_path, master_addr):
    run = _start(tiny_data, tmp_path, *(["--master-addr", master_addr] if master_addr else []))
    try:
        run.wait_for_step(1)
        addresses = _listening_addresses([run.proc.pid, *run.ranks()])
    finally:
        kill_all_but_the_resource_tracker(run.proc.pid)  # as above
        run.wait()
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert addresses, "found no listening socket: the check would be vacuous"
    assert addresses <= loopback, f"listening beyond the loopback address: {addresses}"


def test_a_checkpoint_given_as_tilde_slash_is_in_the_home_folder(tmp_path, monkeypatch):
    """--resume=~/run: the shell leaves a ~ after = as it is."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert checkpoint.resolve_path("~/run") == tmp_path / "run" / "checkpoint.pt"


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["--layout", "one-tower", "--replicas", "2"]], ids=["towers", "replicas"])
def test_training_images_that_cannot_be_used_are_counted_in_the_summary(tiny_data, tmp_path, layout):
    """Two unreadable training images, one in the run's one batch: the next image stands in for
    it, and the run, which ends well, says so on its last line and in summary.json,
    not only in a warning among the step lines; the other, met by the statistics alone, is not
    counted. The one met is the batch's last: with replicas, in the share that rank 1 loads."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    samples = data_module.open_data(data).train.samples  # in the program's order
    batch = data_module.epoch_order(len(samples), 0, 0)[:4].tolist()  # the first batch of seed 0
    not_met = next(i for i in range(len(samples)) if i not in batch and i - 1 != batch[-1])
    for index in (batch[-1], not_met):
        Path(samples[index][0]).write_bytes(b"not an image")
    result = launch("--data", data, "--out", tmp_path, "--run-name", "run", "--max-steps", "1", *TINY, *layout)
    assert "left out of the statistics" in result.stderr  # both: each image of the 30 is in their sample
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train_skipped"] == 1
    assert "1 training image could not be used in this run; the next usable image stood in for it" in \
        result.stderr.splitlines()[-1], result.stderr[-2000:]
