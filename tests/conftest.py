"""What the tests share: the repository root, a tiny generated dataset, and the
program run as a user runs it (a real process, every wait bounded)."""

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from PIL import Image

from launch import builtin
from towers import AlexNet, Architecture, build_reference

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300  # any one run of the program; a hang fails instead of blocking the suite
# Options that make a run of the program tiny: batch 4 of the 30 training images, the
# loader inside the rank, no ten-patch test at the end (a fifth of a tiny run's CPU time:
# a run that a test needs it of says --ten-crop).
TINY = ["--batch-size", "4", "--lr", "0.001", "--workers", "0", "--no-ten-crop"]
TRAINED_RUN = ["--epochs", "1", "--log-every", "2", "--fc8-placement", "split", *TINY, "--ten-crop"]  # trained_run's
NO_DROPOUT = [*TINY, "--dropout", "0", "--log-every", "1"]  # with --epochs 1: no_dropout_run's
MEMORY_TEMP_ROOT = Path("/dev/shm")
MEMORY_TEMP_MIN_FREE = 16 << 30  # the suite's folders took up to 9.6 GB at once (measured on the whole suite)
PROCESSES_RAM = 12 << 30  # the suite's processes beside them: 16.7 GB were in use at once, folders included


def pytest_configure(config):
    """The tests' temporary folders in memory, on a tmpfs, where the machine has one with
    room to spare, and the RAM for it beside the tests' processes: the program syncs every
    checkpoint it writes (hundreds of MB) to the disk, which on a disk took 1.5 s of each save.
    A --basetemp or pytest's own PYTEST_DEBUG_TEMPROOT given by the caller wins; elsewhere the
    system's temporary folder.
    A job's torchrun variables (a suite run as a rank of a cluster's job) are dropped: with them,
    every launch of the program would run as that rank under torchrun."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID"):
        os.environ.pop(name, None)
    if config.option.basetemp or "PYTEST_DEBUG_TEMPROOT" in os.environ:
        return
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        free = shutil.disk_usage(MEMORY_TEMP_ROOT).free
        # A tmpfs holds its files in RAM: the folders and the processes must fit in it together.
        available = next((int(line.split()[1]) << 10 for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemAvailable:")), 0)
    except OSError:
        return
    tmpfs = any(fields[1:3] == [str(MEMORY_TEMP_ROOT), "tmpfs"] for fields in mounts)
    if tmpfs and free >= MEMORY_TEMP_MIN_FREE and available >= MEMORY_TEMP_MIN_FREE + PROCESSES_RAM \
            and os.access(MEMORY_TEMP_ROOT, os.W_OK | os.X_OK):
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(MEMORY_TEMP_ROOT)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    """A pytest-xdist worker sends each report, its captured output and log included, to the
    controller as UTF-8: a captured line that names a file whose name is not UTF-8 (which
    Python holds as surrogates) ended the whole run in an INTERNALERROR. Escaped here, first."""
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                       for title, text in report.sections]


_TEMPORARY_ROOT = []  # the folder that short_temporary makes its folders in, once made


def short_temporary() -> Path:
    """A new empty folder to be a process's TMPDIR, at a short path. multiprocessing makes its
    sockets in TMPDIR, and an AF_UNIX address holds at most 107 bytes, which a folder deep in
    pytest's can exceed (deeper under pytest-xdist, longer with a long user name); the program
    would then keep its temporary files in /tmp (launch.rank_server.room_for_sockets), out of
    the test's sight. In the tests' temporary root (see pytest_configure); removed when the
    tests end."""
    if not _TEMPORARY_ROOT:
        _TEMPORARY_ROOT.append(tempfile.mkdtemp(prefix="alexnet-tests-", dir=os.environ.get("PYTEST_DEBUG_TEMPROOT")))
    return Path(tempfile.mkdtemp(dir=_TEMPORARY_ROOT[0]))


@pytest.fixture(scope="session", autouse=True)
def _remove_short_temporaries():
    yield
    if _TEMPORARY_ROOT:
        shutil.rmtree(_TEMPORARY_ROOT.pop(), ignore_errors=True)


# pytest-xdist's -n auto: a worker per core, at most two: as measured (1010 s one test after
# another, 795 s in two workers, on two cores), and within the tmpfs room that pytest_configure
# asks for (two workers' folders at once). Under --dist loadfile the tests of one file run in one
# worker, which makes the module's fixtures once; shared out one by one, with each module's kept to
# one worker, the suite took 1019 s: the session's fixtures are made in each worker, and more
# ranks run at once.
MAX_WORKERS = 2


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; without it (the GPU machine's Python) never called
def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The built-in generator with ten classes of 3 training and 1 validation image: 7 steps of 4 per epoch."""
    return builtin.builtin_dataset(tmp_path_factory.mktemp("data") / "tiny", train_per_class=3, val_per_class=1)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    """The built-in set of 2 training and 1 validation image per class (20 and 10), opened."""
    from launch import data
    root = tmp_path_factory.mktemp("builtin") / "shapes"
    builtin.builtin_dataset(root, train_per_class=2, val_per_class=1)
    return data.open_data(root, cache_dir=root.parent / "cache")


@pytest.fixture(scope="module")
def group_of_one():
    """The default process group, of this process alone (gloo), for a module's tests."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """(run folder, the program's output) of one finished run of the towers on the tiny dataset:
    FC8 split between the towers, one epoch of 7 steps, a log line every 2, the ten-patch test.
    Tests that only read a run share it; a test that would change it works on a copy."""
    out = tmp_path_factory.mktemp("trained")
    result = launch("--data", tiny_data, "--out", out, "--run-name", "run", *TRAINED_RUN)
    return out / "run", result


@pytest.fixture(scope="session")
def no_dropout_run(tiny_data, tmp_path_factory):
    """The run folder of the towers trained one epoch (7 steps) without dropout, every step
    logged: the losses that other layouts and replica counts must reproduce. Read only.
    The first epoch of two, --max-steps ending the run there, saving every 2 steps: the
    train records, evaluation and weights are those of --epochs 1 (the plateau schedule
    does not look ahead), and tests/test_launch.py reads how it saved."""
    out = tmp_path_factory.mktemp("no-dropout")
    launch("--data", tiny_data, "--out", out, "--run-name", "run", "--epochs", "2", "--max-steps", "7",
           "--checkpoint-every", "2", *NO_DROPOUT)
    return out / "run"


@pytest.fixture(scope="module")
def mesh_of_one(group_of_one):
    """The mesh of a run of one rank: one replica of one tower, in this process."""
    from launch.mesh import Mesh
    return Mesh(replicas=1, towers=1, replica=0, tower=0, tower_group=group_of_one, replica_group=None)


def train_epoch(model, optimizer, bundle, config, progress, mesh, metrics=None, beyond=None) -> bool:
    """launch.train.train_one_epoch over ``bundle`` in this process, on the CPU, with no step lines
    on the terminal; whether it reached the epoch's end."""
    from launch import data, train
    from launch.meter import Metrics, ProgressBar
    with data.Loader(bundle) as loader:
        finished, _ = train.train_one_epoch(model, optimizer, loader, plan_of(bundle, config.batch_size), config,
                                            progress, torch.device("cpu"), mesh, None, metrics or Metrics(None),
                                            ProgressBar(False), train.InputBytes(), model, beyond)
    return finished


def plan_of(bundle, batch_size: int):
    """launch.train's Plan for ``bundle`` (as launch.data.open_data opens it) in batches of ``batch_size``."""
    from launch import data, train
    return train.Plan(bundle.classes, data.batches_per_epoch(bundle, batch_size), len(bundle.val), len(bundle.train),
                      bundle.stats)


class Recorder(torch.nn.Module):
    """A stand-in for the net: its logits are a learnable bias, the same for every image; keeps
    every batch it is given."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))
        self.seen = []

    def forward(self, images):
        self.seen.append(images.detach().clone())
        return self.bias.expand(len(images), -1)


@functools.lru_cache(maxsize=3)  # 0.25 GB each: a worker runs many files
def _initial_weights(classes: int, seed: int, init: str, net: str) -> dict:
    return build_reference(classes, seed=seed, dropout=0.0, init=init, architecture=Architecture(net=net)).state_dict()


def reference_from_seed(classes: int, seed: int, dtype=torch.float32, device="cpu",
                        architecture: Architecture = Architecture(), init: str = "paper") -> AlexNet:
    """build_reference(classes, seed, dropout=0, init, architecture) in ``dtype`` on ``device``,
    its weights a copy of those drawn once per process (a draw takes 1.5 s; tests that start
    several nets from one seed copy it). The variants of one net (two towers or one) have the
    same shapes, and so the same weights from a seed."""
    with torch.device("meta"):  # no initialisation of its own: it takes the drawn weights
        reference = AlexNet(classes, dropout=0.0, architecture=architecture)
    weights = {k: v.to(device, dtype, copy=True)
               for k, v in _initial_weights(classes, seed, init, architecture.net).items()}
    reference.load_state_dict(weights, assign=True)
    assert all(p.requires_grad for p in reference.parameters())
    return reference


def launch(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """``python -m launch.two_gpu ARGS`` to the end; with ``check``, a non-zero exit fails the test."""
    result = subprocess.run([sys.executable, "-m", "launch.two_gpu", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def terminate_when_ready(proc: subprocess.Popen, ready, log: Path, timeout_s: float = RUN_TIMEOUT_S) -> int:
    """SIGTERM, as a scheduler or a timeout sends it, to ``proc`` (started in a session of its
    own, its output in ``log``) once ``ready()`` holds; its exit code. A process that ends
    first, or does not end within 120 s of the signal, fails the test; its session is killed."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, Path(log).read_text()[-3000:]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def skip_without_namespaces(*flags: str, setup: str = "true") -> None:
    """Skips the test where this machine does not let it run ``setup`` in namespaces of its own
    (``unshare --user --map-root-user FLAGS``): no unshare command, user namespaces forbidden
    (docker's default seccomp profile), or no right to mount there."""
    try:
        allowed = subprocess.run(["unshare", "--user", "--map-root-user", *flags, "sh", "-c", setup],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        allowed = False
    if not allowed:
        pytest.skip(f"needs namespaces of its own (unshare --user {' '.join(flags)}) and the right to run: {setup}")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_all_but_the_resource_tracker(group: int) -> None:
    """SIGKILL to every process of a process group but multiprocessing's resource tracker, which
    then removes the named semaphores in /dev/shm that the killed processes held (none else
    would: a whole group killed left them there for good), and ends. The group is stopped
    first, so that none of them sees another end, or starts one more, before it is killed."""
    os.killpg(group, signal.SIGSTOP)
    tracker = [pid for pid in live_processes(group=group) if "multiprocessing.resource_tracker" in cmdline(pid)]
    for pid in live_processes(group=group):
        if pid not in tracker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in tracker:
        os.kill(pid, signal.SIGCONT)


def live_processes(*, group: Optional[int] = None, session: Optional[int] = None) -> list:
    """PIDs of the live processes (zombies excluded) of a process group, or of a session."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else None
        except (OSError, IndexError):
            continue
        if fields and fields[0] != "Z" and group in (None, int(fields[2])) and session in (None, int(fields[3])):
            found.append(int(entry.name))
    return found


def damaged_tiff(path: Path, tag: int, at: int, value: bytes) -> Path:
    """A 32x32 RGB TIFF at ``path`` with ``value`` written ``at`` bytes into the entry of
    ``tag`` (an entry: 2 bytes of tag, 2 of type, 4 of count, 4 of value or offset)."""
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    tiff = bytearray(path.read_bytes())
    ifd = int.from_bytes(tiff[4:8], "little")
    entries = [ifd + 2 + 12 * i for i in range(int.from_bytes(tiff[ifd:ifd + 2], "little"))]
    entry = next(e for e in entries if int.from_bytes(tiff[e:e + 2], "little") == tag)
    tiff[entry + at:entry + at + len(value)] = value
    path.write_bytes(bytes(tiff))
    return path


def warned_of_tiff(path: Path) -> Path:
    """A TIFF that PIL reads with a warning: its rows-per-strip tag holds two values, of one."""
    return damaged_tiff(path, 278, 4, (2).to_bytes(4, "little"))


def undecodable_dds(path: Path) -> Path:
    """A DDS (whatever the name) of a pixel format PIL knows none of: it raises NotImplementedError."""
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(buffer, "DDS")
    dds = bytearray(buffer.getvalue())
    dds[80:84] = struct.pack("<I", 1)  # the pixel format's flags
    path.write_bytes(bytes(dds))
    return path


def as_foreground_job() -> None:
    # A shell hands a foreground job the default SIGINT, whatever it ignores itself; the
    # suite may run in the background (where SIGINT is ignored and the child inherits that).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def as_background_job() -> None:
    # A script's job started with & has SIGINT ignored (and the program inherits that)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Run:
    """The program in the background, in a process group of its own as a shell starts a
    foreground job (or, with ``job=as_background_job``, a script's background job), for
    tests that act on it while it runs."""

    def __init__(self, *args, run_dir: Path, job=as_foreground_job):
        self.run_dir = run_dir
        self.log = open(run_dir.parent / f"{run_dir.name}.stderr", "w+")
        # Temporary files in a folder of the test's: a run whose whole group a test kills with
        # SIGKILL cannot remove its multiprocessing folder, and the machine's /tmp is not the test's.
        self.temporary = short_temporary()
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.two_gpu", *map(str, args)], cwd=ROOT,
                                     env=dict(os.environ, TMPDIR=str(self.temporary)), stdout=subprocess.DEVNULL,
                                     stderr=self.log, start_new_session=True, preexec_fn=job)

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

    def ranks(self, count: int = 2) -> list:
        """PIDs of the ``count`` rank processes, rank 0 first (started first): the children of
        the launcher's rank server (launch.rank_server)."""
        parents = {}  # pid -> (parent pid, start time)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = (int(fields[1]), int(fields[19]))
        servers = {pid for pid, (parent, _) in parents.items() if parent == self.proc.pid and "forkserver" in cmdline(pid)}
        found = sorted((started, pid) for pid, (parent, started) in parents.items() if parent in servers)
        assert len(found) == count, f"expected {count} rank processes, found {found}"
        return [pid for _, pid in found]

    def wait(self, timeout_s: float = 60) -> int:
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
        return live_processes(group=self.proc.pid)
