""".ci/gpu, the script that runs the GPU tests and the benchmark on a machine with a GPU:
its refusals, and how GPU_BUDGET_S shares a lent machine's time between the two stages.
Here a stand-in for Python answers the script's GPU check and records what each stage was
asked to run; the stages themselves are tested elsewhere (tests/test_gpu.py, test_benchmarks.py)."""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, as_foreground_job

SCRIPT = ROOT / ".ci" / "gpu"
# A Python with a GPU, as far as .ci/gpu can tell: the environment report and the GPU check
# succeed, and each stage prints its command (a stage may be told to take a while).
STAND_IN = """#!/usr/bin/env bash
case "$*" in
    *"-m pytest"*) echo "tests: $*"; [[ -n ${STAND_IN_TESTS_S:-} ]] && exec sleep "$STAND_IN_TESTS_S"; exit 0;;
    *"-m benchmarks.run"*) echo "benchmark: $*";;
esac
"""


def _gpu(out, *args, python=None, **env):
    environ = {k: v for k, v in os.environ.items() if k != "GPU_BUDGET_S"}
    environ.update(PYTHON=str(python or sys.executable), **env)
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "python"
    path.write_text(STAND_IN)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("args, env, message", [
    (("bench-all",), {}, "error: stage must be tests, bench or all, got 'bench-all'"),
    (("tests", "--batches", "128"), {}, "error: the tests stage takes no options, got '--batches 128'"),
    (("all",), {"GPU_BUDGET_S": "ten"}, "error: GPU_BUDGET_S must be a whole number of seconds (at most 999999), got 'ten'"),
    (("all",), {"GPU_BUDGET_S": "0"}, "error: GPU_BUDGET_S must be a whole number of seconds (at most 999999), got '0'"),
    (("all",), {"GPU_BUDGET_S": "9" * 20}, "error: GPU_BUDGET_S must be a whole number of seconds (at most 999999)"),
    (("all",), {"GPU_BUDGET_S": "199"}, "error: GPU_BUDGET_S=199 is too little for the all stage(s): give 200 s or more"),
    (("bench",), {"GPU_BUDGET_S": "99"}, "error: GPU_BUDGET_S=99 is too little for the bench stage(s): give 100 s or more"),
    (("bench", "--time-limit", "60"), {"GPU_BUDGET_S": "300"},
     "error: GPU_BUDGET_S sets the benchmark's --time-limit: give one or the other"),
])
def test_bad_use_is_refused_before_anything_runs(tmp_path, stand_in, args, env, message):
    result = _gpu(tmp_path / "out", *args, python=stand_in, **env)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_folder_for_the_results_is_refused(stand_in):
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=dict(os.environ, PYTHON=str(stand_in)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: give the folder for the results; usage:")


@pytest.mark.slow  # the script with the real Python, which imports torch several times
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_python_that_sees_no_gpu_is_refused(tmp_path):
    """Otherwise every GPU test would be skipped and the stage would pass."""
    result = _gpu(tmp_path, "tests")
    assert result.returncode == 2, result.stderr
    assert "sees no CUDA GPU here (the environment above says what it found)" in result.stderr
    assert "GPUs: none" in result.stdout and not (tmp_path / "environment.txt").exists()
    assert "Python.h (Triton builds its kernels' launchers with it): " in result.stdout, result.stdout  # looked for


def test_a_python_without_torch_is_named_as_such(tmp_path):
    """Not as a Python that sees no GPU: the fix is another PYTHON, not another machine. The
    results of an earlier invocation in the folder stay: they were removed before the refusal."""
    no_torch = tmp_path / "python"
    # -S: no site-packages, so no torch
    no_torch.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S \"$@\"\n")
    no_torch.chmod(0o755)
    earlier = {"gpu-tests.log": "earlier", "benchmark.log": "earlier", "report/report.md": "earlier"}
    for name, text in earlier.items():
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text(text)
    result = _gpu(tmp_path / "out", "all", python=no_torch)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: {no_torch} cannot import torch (the environment above "
                                                      f"says why): name the Python that has it, such as "
                                                      f"PYTHON=.venv/bin/python .ci/gpu OUT")
    assert "No module named 'torch'" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["benchmark.log", "gpu-tests.log", "report"]
    assert {name: (tmp_path / "out" / name).read_text() for name in earlier} == earlier


def test_a_budget_leaves_the_benchmark_what_the_tests_did_not_use(tmp_path, stand_in):
    result = _gpu(tmp_path, "all", "--batches", "128,256", python=stand_in, GPU_BUDGET_S="300")
    assert result.returncode == 0, result.stderr
    assert "tests: -m pytest tests/test_gpu.py -m gpu " in (tmp_path / "gpu-tests.log").read_text()
    command = (tmp_path / "benchmark.log").read_text()
    limit = re.search(r"^benchmark: -m benchmarks.run --device cuda --out \S+/report --time-limit (\d+) "
                      r"--batches 128,256$", command, re.M)
    assert limit and 260 <= int(limit[1]) <= 270, command  # 300 s, less 30 for the report, less the seconds spent


def test_a_budget_beyond_a_week_gives_the_benchmark_the_week_it_takes_at_most(tmp_path, stand_in):
    """benchmarks.run refuses a --time-limit beyond a week: one the user never gave."""
    result = _gpu(tmp_path, "bench", python=stand_in, GPU_BUDGET_S="999999")
    assert result.returncode == 0, result.stderr
    assert " --time-limit 604800" in (tmp_path / "benchmark.log").read_text()


def test_without_a_budget_nothing_is_bounded(tmp_path, stand_in):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("an earlier benchmark's")
    (tmp_path / "gpu-tests.log").write_text("an earlier run's tests")
    result = _gpu(tmp_path, "bench", python=stand_in)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "benchmark.log").read_text().strip().endswith(f"--out {tmp_path}/report")
    assert not (tmp_path / "report").exists()  # the earlier benchmark's report gone (the stand-in draws none)
    assert (tmp_path / "gpu-tests.log").exists()  # the tests stage did not run: its log is left alone


def test_tests_that_outrun_the_budget_are_stopped(tmp_path, stand_in):
    result = _gpu(tmp_path, "tests", python=stand_in, GPU_BUDGET_S="3", STAND_IN_TESTS_S="100")
    assert result.returncode == 124, result.stderr  # timeout's code: the stage failed
    log = (tmp_path / "gpu-tests.log").read_text()
    assert re.fullmatch(r"error: the GPU tests were stopped after their [123] s of GPU_BUDGET_S=3",
                        log.strip().splitlines()[-1]), log


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stop_while_it_reports_the_environment_leaves_no_partial_file(tmp_path, signal_name):
    """Ctrl-C while torch is imported for the environment's report: its hidden partial file,
    named after the script's process, stayed in OUT for good."""
    slow = tmp_path / "python"
    slow.write_text("#!/bin/sh\nsleep 60\n")
    slow.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), "tests"], cwd=ROOT, env=dict(os.environ, PYTHON=str(slow)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=as_foreground_job)  # as a terminal's job, the suite's own aside
    try:
        deadline = time.monotonic() + 30
        while not list(out.glob(".environment.txt.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(out.glob(".environment.txt.partial-*"))
        os.killpg(proc.pid, getattr(signal, signal_name))
        proc.wait(timeout=60)
    finally:  # its own session: nothing of it left, whatever failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert list(out.iterdir()) == []

