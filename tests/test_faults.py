"""Faults and bad input: no hangs, nothing lost, clear errors, no code run from a checkpoint.

Each test drives the real program (``python -m launch.two_gpu``) in its own process
group, injects the fault from outside (signals, broken files), and bounds every wait.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import data as data_module
from launch.checkpoint import FORMAT, checkpoint_payload, load_checkpoint, save_checkpoint, save_reference
from launch.two_gpu import main
from towers import build_reference

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 60  # a failure must end the whole run within this long
TINY = ["--batch-size", "4", "--lr", "0.001", "--log-every", "1", "--workers", "0", "--val-limit", "4", "--no-ten-crop"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return data_module.builtin_dataset(tmp_path_factory.mktemp("data") / "tiny", train_per_class=3, val_per_class=1)


class Run:
    """The launcher in a process group of its own, as a shell starts a foreground job."""

    def __init__(self, *args, run_dir: Path):
        self.run_dir = run_dir
        self.log = open(run_dir.parent / f"{run_dir.name}.stderr", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.two_gpu", *map(str, args)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)

    def steps(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return max([json.loads(l)["step"] for l in lines if '"train"' in l] or [0])

    def wait_for_step(self, step: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while self.steps() < step:
            assert self.proc.poll() is None, f"the run ended early:\n{self.stderr()}"
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)

    def ranks(self) -> list:
        """PIDs of the two rank processes, rank 0 first (started first)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.proc.pid and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
                found.append((int(fields[19]), int(entry.name)))  # (start time, pid)
        assert len(found) == 2, f"expected two rank processes, found {found}"
        return [pid for _, pid in sorted(found)]

    def wait(self, timeout_s: float = BOUND_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"the run did not end within {timeout_s} s:\n{self.stderr()}")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def leftovers(self) -> list:
        """Processes of the run's group still alive (zombies excluded)."""
        alive = []
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                alive.append(int(entry.name))
        return alive


def _no_leftovers(run: Run, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while run.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not run.leftovers(), f"processes left behind: {run.leftovers()}"


def _start(tiny_data, tmp_path, *extra, name="run"):
    return Run("--data", tiny_data, "--out", tmp_path, "--run-name", name, "--epochs", "50", *TINY, *extra,
               run_dir=tmp_path / name)


# ---------------------------------------------------------------- a dead or hung peer never hangs the other

def test_a_killed_rank_ends_the_run_naming_it(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path)
    run.wait_for_step(2)
    os.kill(run.ranks()[1], signal.SIGKILL)  # what the out-of-memory killer does
    assert run.wait() == 1
    err = run.stderr()
    assert "rank 1 failed: killed by SIGKILL" in err and "out-of-memory" in err
    _no_leftovers(run)


def test_ctrl_c_stops_both_ranks(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path)
    run.wait_for_step(1)
    os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    assert run.wait() == 130
    assert "interrupted" in run.stderr() and "Traceback" not in run.stderr()
    _no_leftovers(run)


def test_ranks_do_not_outlive_a_killed_launcher(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path)
    run.wait_for_step(1)
    ranks = run.ranks()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and "Z" != Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
              for pid in ranks if Path(f"/proc/{pid}/stat").exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in ranks if Path(f"/proc/{pid}/stat").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"ranks {alive} outlived their launcher"


def test_a_hung_rank_is_found_by_the_timeout(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path, "--timeout", "5")
    run.wait_for_step(1)
    os.kill(run.ranks()[1], signal.SIGSTOP)  # alive but silent
    assert run.wait() == 1
    err = run.stderr()
    assert "rank 1 failed: did not respond" in err and "timed out" in err.lower()
    _no_leftovers(run)


# ---------------------------------------------------------------- nothing lost

def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, checkpoint_payload(build_reference(10, seed=1).state_dict(), num_classes=10, step=1))
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
    assert torch.equal(payload["model"]["conv1.weight"], build_reference(10, seed=1).conv1.weight)
    save_checkpoint(path, checkpoint_payload(build_reference(10, seed=1).state_dict(), num_classes=10, step=2))
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*")), "the killed save's temporary file was not cleared"


def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_weights(tiny_data, tmp_path):
    common = ["--data", tiny_data, "--out", tmp_path, "--epochs", "2", "--checkpoint-every", "2", *TINY]
    whole = Run(*common, "--run-name", "whole", run_dir=tmp_path / "whole")
    assert whole.wait(timeout_s=300) == 0, whole.stderr()
    parts = Run(*common, "--run-name", "parts", run_dir=tmp_path / "parts")
    parts.wait_for_step(5)  # a checkpoint exists at step 4; the kill may land inside the next save
    os.killpg(parts.proc.pid, signal.SIGKILL)
    parts.wait()
    killed_at = load_checkpoint(tmp_path / "parts")["progress"]["global_step"]
    assert 4 <= killed_at < 14
    # Resumed with DataLoader worker processes inside rank 0 (the other runs load in the rank itself):
    # the batches are a function of (seed, epoch, position) alone.
    resumed = Run("--resume", tmp_path / "parts", "--workers", "2", "--no-ten-crop", run_dir=tmp_path / "parts")
    assert resumed.wait(timeout_s=300) == 0, resumed.stderr()
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "parts")
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 14
    # Exactly equal, not close: the same batches, augmentation and dropout masks, the same arithmetic.
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["momentum_buffer"]:
        assert torch.equal(a["momentum_buffer"][key], b["momentum_buffer"][key]), key


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    run = Run("--data", tiny_data, "--out", tmp_path, "--run-name", "nan", "--epochs", "20", "--checkpoint-every", "1",
              *TINY[:2], "--lr", "5", *TINY[4:], run_dir=tmp_path / "nan")
    assert run.wait(timeout_s=300) == 1
    err = run.stderr()
    assert "the loss became" in err and "last good checkpoint" in err
    payload = load_checkpoint(tmp_path / "nan")
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    failed_step = int(err.split("the loss became", 1)[1].split("step ", 1)[1].split(";", 1)[0])
    assert payload["progress"]["global_step"] < failed_step


# ---------------------------------------------------------------- bad input: a clear error naming the fix

def _error_of(argv, caplog) -> str:
    caplog.clear()
    assert main([str(a) for a in argv]) == 2
    return caplog.text


@pytest.fixture
def layouts(tmp_path, tiny_data):
    """Broken copies of the tiny dataset."""
    import shutil
    made = {}
    for name in ("no_val", "other_classes", "empty_class"):
        made[name] = tmp_path / name
        shutil.copytree(tiny_data, made[name])
    shutil.rmtree(made["no_val"] / "val")
    (made["other_classes"] / "val" / sorted(os.listdir(tiny_data / "val"))[0]).rename(made["other_classes"] / "val" / "zebra")
    for f in (made["empty_class"] / "train" / sorted(os.listdir(tiny_data / "train"))[0]).iterdir():
        f.unlink()
    return made


def test_bad_data_and_options_get_clear_errors(tiny_data, layouts, tmp_path, caplog):
    out = ["--out", tmp_path / "runs"]
    assert "does not exist" in _error_of(["--data", tmp_path / "nowhere", *out], caplog)
    assert "val" in _error_of(["--data", layouts["no_val"], *out], caplog)
    assert "zebra" in _error_of(["--data", layouts["other_classes"], *out], caplog)
    assert "no images" in _error_of(["--data", layouts["empty_class"], *out], caplog).lower()
    for option, value, words in [("--batch-size", 0, "must be positive"), ("--lr", -1, "--lr"),
                                 ("--epochs", 0, "must be positive"), ("--dropout", 1.5, "--dropout"),
                                 ("--batch-size", 1000, "larger than the 30 training images"),
                                 ("--backend", "nccl", "two GPUs")]:
        assert words in _error_of(["--data", tiny_data, *out, option, value], caplog), option
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint.pt"))


def test_bad_checkpoints_get_clear_errors_and_run_no_code(tiny_data, tmp_path, caplog):
    args = ["--data", tiny_data, "--out", tmp_path / "runs", "--eval-only"]
    good = tmp_path / "good.pt"
    save_reference(good, build_reference(10))
    assert "trained for 10 classes but the data has 5" in _error_of(
        ["--data", _five_classes(tiny_data, tmp_path), "--out", tmp_path / "runs", "--eval-only", good], caplog)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in _error_of([*args, truncated], caplog)

    other_arch = tmp_path / "other.pt"
    torch.save(checkpoint_payload(torch.nn.Linear(3, 10).state_dict(), num_classes=10), other_arch)
    assert "does not hold the 2012 AlexNet" in _error_of([*args, other_arch], caplog)
    torch.save(build_reference(10).state_dict(), tmp_path / "plain.pt")
    assert "not a checkpoint of this project" in _error_of([*args, tmp_path / "plain.pt"], caplog)

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": FORMAT, "payload": _RunsCommand(f"touch {marker}")}, crafted)
    assert "refusing to load" in _error_of([*args, crafted], caplog)
    assert not marker.exists()
    assert "no checkpoint at" in _error_of([*args, tmp_path / "missing.pt"], caplog)


def test_resume_refuses_a_changed_recipe_and_weights_only_checkpoints(tiny_data, tmp_path, caplog):
    weights_only = tmp_path / "reference.pt"
    save_reference(weights_only, build_reference(10))
    assert "holds weights but no training state" in _error_of(["--resume", weights_only], caplog)
    full = Run("--data", tiny_data, "--out", tmp_path, "--run-name", "real", "--max-steps", "1", *TINY,
               run_dir=tmp_path / "real")
    assert full.wait(timeout_s=300) == 0, full.stderr()
    err = _error_of(["--resume", tmp_path / "real", "--fc8-placement", "split"], caplog)
    assert "--fc8-placement split differs from the resumed run's tower0" in err


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _five_classes(tiny_data, tmp_path):
    import shutil
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


def test_the_run_listens_on_the_loopback_address_only(tiny_data, tmp_path):
    run = _start(tiny_data, tmp_path)
    try:
        run.wait_for_step(1)
        addresses = _listening_addresses([run.proc.pid, *run.ranks()])
    finally:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.wait()
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert addresses, "found no listening socket: the check would be vacuous"
    assert addresses <= loopback, f"listening beyond the loopback address: {addresses}"
