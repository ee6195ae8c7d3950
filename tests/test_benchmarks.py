"""The benchmark harness: its analytic tables against the paper's numbers, and one real
run of ``python -m benchmarks.run`` in a tiny configuration, checked for the report's
structure and for traffic counted exactly as the layer shapes say. Speed is never asserted.
"""

import dataclasses
import datetime
import errno
import json
import math
import os
import re
from pathlib import Path
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import matplotlib.image
import pytest
import torch
from PIL import Image

from benchmarks import flops, program, report, run, scratch, traffic, workers
from launch import data as data_module
from launch.cli import usable_cores
from launch.mesh import Mesh
from launch.step import StepResult
from towers import FC8_PLACEMENTS, AlexNet
from towers import exchange as exchange_module
from towers.exchange import ExchangeLog
from towers.sharding import shard_state_dict

from conftest import (ROOT, as_foreground_job, cmdline, live_processes, short_temporary, skip_without_namespaces,
                      terminate_when_ready)

PARAMS = 60_965_224  # parameters of the whole net: the layer shapes of section 3.5 and Figure 2
# Elements one tower sends per image, from the paper's Figure 2 (the partition table in the README):
# conv3's input is 128 x 13 x 13 maps per tower, FC6's 128 x 6 x 6, FC7's 2048; each crosses
# forward (all-gather) and its gradient backward (reduce-scatter).
BOTH_TOWERS = 2 * (128 * 13 * 13 + 128 * 6 * 6 + 2048)
SENT_PER_IMAGE = {  # per FC8 placement: (tower 0, tower 1)
    "tower0": (BOTH_TOWERS + 2048 + 1000, BOTH_TOWERS + 2048),  # FC7 output to tower 0 and its gradient back; logits to tower 1
    "split": (BOTH_TOWERS + 2 * 2048 + 500,) * 2,  # FC7 output both ways, forward and backward; 500 logits each
}
# Tower 1 with FC8 whole on tower 0: half of conv1-FC7 (the paper-spec's per-tower figure).
TOWER1_PARAMS = 28_434_112
RUN_TIMEOUT_S = 900  # bound on the harness subprocess; a failure never hangs the suite
# A committed report of every mode, measured whole on the CPU (the tests read its shape: batch 16, hybrid, ...)
CPU_REPORT = ROOT / "benchmarks" / "reports" / "vm-cpu-2026-12-05"


def test_flop_table_follows_the_layer_shapes():
    layers = flops.reference_layers()
    assert list(layers) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    expected_macs = {  # output elements x inputs per output (conv2, conv4, conv5 see their own tower's maps)
        "conv1": 96 * 55 * 55 * 3 * 11 * 11, "conv2": 256 * 27 * 27 * 48 * 5 * 5,
        "conv3": 384 * 13 * 13 * 256 * 3 * 3, "conv4": 384 * 13 * 13 * 192 * 3 * 3,
        "conv5": 256 * 13 * 13 * 192 * 3 * 3, "fc6": 9216 * 4096, "fc7": 4096 * 4096, "fc8": 4096 * 1000,
    }
    assert {name: layer.macs for name, layer in layers.items()} == expected_macs
    assert layers["conv3"].in_shape == (256, 13, 13) and layers["fc6"].in_shape == (9216,)
    assert flops.count_params(AlexNet) == PARAMS
    for placement in ("tower0", "split"):  # the towers together do exactly the reference's work
        assert sum(flops.tower_macs(layers, r, placement) for r in range(2)) == sum(expected_macs.values())
    # FC8 whole on tower 0: its work on tower 0 alone, the other layers halved
    assert flops.tower_macs(layers, 0, "tower0") - flops.tower_macs(layers, 1, "tower0") == expected_macs["fc8"]
    assert traffic.link_time_s(0, 10, 1, 5) == pytest.approx(50e-6)  # ten calls of 5 us start-up each
    assert flops.training_flops(10, 3) == 10 * 3 * 2 * 3  # 2 FLOPs per MAC, training = 3 x forward


@pytest.mark.parametrize("placement", ["tower0", "split"])
def test_analytic_traffic_is_figure_2(placement):
    layers = flops.reference_layers()
    sent = traffic.tower_sent_elements(layers, placement)
    assert tuple(sum(t.values()) for t in sent) == SENT_PER_IMAGE[placement]
    assert traffic.towers_bytes_per_rank(layers, placement, batch=5, element_size=2) == \
        [5 * 2 * n for n in SENT_PER_IMAGE[placement]]
    # data parallel: each of 2 ranks sends 2(n-1)/n = 1 x its fp32 gradients
    assert traffic.ddp_bytes_per_rank(PARAMS) == PARAMS * 4
    crossover = traffic.crossover_batch(layers, placement, PARAMS, activation_size=4)
    assert math.isclose(crossover, 2 * PARAMS * 4 / (4 * sum(SENT_PER_IMAGE[placement])))
    assert 990 < crossover < 1040  # the issue's "about 990 images"


def test_known_gpus_have_peaks():
    assert flops.gpu_peak("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert flops.gpu_peak("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert flops.gpu_peak("NVIDIA A100-SXM4-40GB")[0] == "A100"
    assert flops.gpu_peak("NVIDIA H200")[0] == "H200"
    assert flops.gpu_peak("NVIDIA H200 NVL")[0] == "H200 NVL"  # not the SXM part's peak, 18 % above its own
    assert flops.gpu_peak("NVIDIA GeForce GTX 580") is None


def test_odd_batch_with_ddp_is_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="even"):
        run.main(["--device", "cpu", "--batch", "3", "--out", str(tmp_path)])


@pytest.mark.slow  # a real process
def test_loader_data_too_small_for_the_batch_fails_before_anything_runs(tiny_data, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cpu", "--batch", "16",
                             "--loader-data", str(tiny_data), "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the data-loader benchmark needs two batches of 16 training images (a warm-up and a timed one) and "
        f"{tiny_data} has 30: give a larger --loader-data or a smaller --batch")
    assert not out.exists()


def test_a_quick_run_never_takes_the_full_run_s_folder_of_the_day(monkeypatch):
    """Both by default in benchmarks/reports/<host>-<device>-<date>: a --quick run replaced the
    day's full report (a committed one too), with a log line alone to say so."""
    monkeypatch.setattr(run.socket, "gethostname", lambda: "Lab Box")
    plan = run.DevicePlan("cuda", "cuda", "gloo", "NVIDIA H100 80GB HBM3", "one GPU")
    full, quick = run.default_out(plan), run.default_out(plan, quick=True)
    assert full.parent == quick.parent == run.REPORTS_DIR
    assert full.name == f"lab-box-nvidia-h100-80gb-hbm3-{datetime.date.today().isoformat()}"
    assert quick.name == f"{full.name}-quick"


def test_links_may_be_named_as_their_makers_do():
    config = run.BenchConfig(device="cpu", quick=True, links=("PCIe 4.0 x16=25", "nvlink-4=450", "IB (NDR)=50"))
    assert run.resolve(config, run.plan_devices(config)).links == config.links


def test_a_time_limit_must_be_a_positive_number_of_seconds(tmp_path):
    for limit in ("0", "-5", "nan", "inf", "1e+306"):  # the last more than a redraw takes (1e300), and a week
        with pytest.raises(ValueError) as refused:
            run.main(["--device", "cpu", "--time-limit", limit, "--out", str(tmp_path)])
        assert str(refused.value) == f"--time-limit must be a positive number of seconds, at most 604800 (a week), " \
                                     f"got {limit}"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option, value, message", [
    *[("--links", f"nvlink={gb_s}", f"--links takes NAME=GB/s items such as nvlink=300, the GB/s a decimal number "
                                   f"from 0.000001 to 10^300; got 'nvlink={gb_s}'")
      # 10^400 GB/s is inf, and 10^-311 makes a transfer's time inf: the report showed inf, results.json null
      for gb_s in ("0", "9" * 400, "0." + "0" * 310 + "1")],
    ("--loader-data", "", "--loader-data is empty: give a value, or leave the option out"),  # not the current folder
    # a name that would break the report's tables (a cell too many, a row on two lines) or leave one empty
    *[("--links", f"{name}=25", f"--links names a link in letters, digits, spaces and . + - / ( ), starting with a "
                                f"letter or digit, such as nvlink or 'PCIe 4.0': got {name!r}")
      for name in ("nv|link", "pc\nie", "", "pcie ", "`x`")],
    ("--links", "nvlink=300,nvlink=25", "--links names nvlink twice: give each link once"),
    *[("--link-latency-us", value, f"--link-latency-us must be a number of microseconds from 0 to 1,000,000 (a "
                                   f"second), got {value}")
      for value in ("-1000", "nan", "1e+306")],  # the last: a report that its redraw refused, as not a number measured
    # each run would have gone on to --rank-timeout-s (--quick on the CPU: 3 steps after 1)
    *[(option, "1" + "0" * 20, f"--steps must be from 1 and --warmup from 0, each to 1,000,000, got {got}")
      for option, got in (("--steps", f"1{'0' * 20} and 1"), ("--warmup", f"3 and 1{'0' * 20}"))],
    ("--steps", "0", "--steps must be from 1 and --warmup from 0, each to 1,000,000, got 0 and 1"),
    ("--rank-timeout-s", "0", "--rank-timeout-s must be a number of seconds from 1 to 604800 (a week), got 0"),
    ("--rank-timeout-s", "inf", "--rank-timeout-s must be a number of seconds from 1 to 604800 (a week), got inf"),
    ("--rank-timeout-s", "1e15", "--rank-timeout-s must be a number of seconds from 1 to 604800 (a week), got 1e+15"),
    ("--seed", "-1", "--seed must be an integer from 0 to 4294967295, got -1"),
    ("--seed", "99999999999999999999999", "--seed must be an integer from 0 to 4294967295, got 99999999999999999999999"),
    ("--bf16-slowdown-limit", "nan", "--bf16-slowdown-limit must be a positive number of times fp32's step, got nan"),
    ("--bf16-slowdown-limit", "0", "--bf16-slowdown-limit must be a positive number of times fp32's step, got 0"),
    ("--bf16-slowdown-limit", "-2", "--bf16-slowdown-limit must be a positive number of times fp32's step, got -2"),
    ("--bf16-slowdown-limit", "1e301", "--bf16-slowdown-limit must be a positive number of times fp32's step, got "
                                       "1e+301"),
    ("--loader-batches", "0", "--loader-batches must be at least 1 and --loader-workers at least 0, got 0 and 0,1"),
    ("--loader-workers", "0,-1", "--loader-batches must be at least 1 and --loader-workers at least 0, got 3 and 0,-1"),
    ("--loader-workers", "0,100000", f"--loader-workers 100000 would start that many loading processes on the "
                                     f"{usable_cores()} cores this benchmark may use: give at most {4 * usable_cores()}"),
])
def test_numbers_out_of_range_are_refused_before_anything_runs(tmp_path, option, value, message):
    with pytest.raises(ValueError) as refused:  # otherwise they fail after the measuring, or give negative numbers
        run.main(["--device", "cpu", "--quick", f"{option}={value}", "--out", str(tmp_path)])
    assert str(refused.value) == message
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # no abbreviations: .ci/gpu refuses a --time-limit beside its own
        run.build_parser().parse_args(["--time", "60"])


def test_help_gives_a_list_s_default_as_it_is_typed_and_an_empty_one_as_none():
    """A list option's default reads as the value to type (comma-separated); an empty one as none."""
    helps = {a.dest: " ".join(a.help.split()) for a in run.build_parser()._actions}
    assert helps["links"].endswith("(default: nvlink=300,pcie4=25)"), helps["links"]
    assert helps["compile_modes"].endswith("(default: none)"), helps["compile_modes"]


@pytest.mark.parametrize("changes, refused", [
    (dict(modes=("ddp",), batch=3), "--batch 3 --batches 16"),
    (dict(modes=("single",), batch=3, precision_modes=("hybrid",)), "--batch 3 --batches 16"),  # its sweep at --batch
    (dict(modes=("single",), sweep_modes=("ddp",), batches=(2, 3)), "--batch 8 --batches 2,3"),
    (dict(modes=("single",), batch=0), "--batch 0 --batches 16"),
    (dict(modes=("single", "towers"), sweep_modes=("towers",), batch=3, batches=(3,)), None),  # no batch is halved
])
def test_batches_that_a_mode_would_halve_unevenly_are_refused_before_anything_runs(changes, refused):
    """ddp and hybrid give each of 2 replicas half the global batch: an odd one trained one image
    fewer than the report credits them with, wherever the mode runs at it."""
    config = dataclasses.replace(run.BenchConfig(device="cpu", quick=True), **changes)
    if refused is None:
        run.resolve(config, run.plan_devices(config))
        return
    with pytest.raises(ValueError) as said:
        run.resolve(config, run.plan_devices(config))
    assert str(said.value) == (f"batches must be positive, and even where ddp or hybrid runs (they halve the global "
                               f"batch): {refused}")


def test_an_out_in_the_datas_images_is_refused_before_anything_is_written(tiny_data, tmp_path):
    """--out in --loader-data's train/: the report's folder was taken for a class of images by
    the training program the benchmark runs on that data (which failed), and every later scan."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    out = data / "train" / "report"
    with pytest.raises(ValueError) as refused:
        run.main(["--device", "cpu", "--quick", "--loader-data", str(data), "--out", str(out)])
    assert str(refused.value) == (f"--out {out} lies in the data's train/ ({data / 'train'}), where a folder would be "
                                  f"taken for a class of images: give --out outside {data / 'train'}")
    assert not out.exists()


def test_a_name_too_long_for_the_system_is_one_line(tmp_path, capsys):
    """benchmarks.report's FOLDER and an ablation's --out (refuse_others_files): a traceback."""
    long = tmp_path / ("x" * 300)
    with pytest.raises(SystemExit) as stopped:
        report.main([str(long)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"error: FOLDER {long}: File name too long: give a folder that python -m "
                                       f"benchmarks.run wrote\n")
    with pytest.raises(ValueError, match=f"--out {long}: File name too long: give another folder"):
        run.refuse_others_files(long, report.REPORT_FILES, "benchmarks.ablations")


def test_the_default_loader_workers_are_those_of_the_cores_this_process_may_use(monkeypatch):
    """A 16-core host that lets the benchmark use 2 (taskset, a container's cpuset): the
    default list stops at 2, within the bound a --loader-workers given is held to."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(run, "usable_cores", lambda: 2)
    config = run.BenchConfig(device="cpu")
    assert run.resolve(config, run.plan_devices(config)).loader_workers == (0, 1, 2)


def test_the_report_says_how_many_of_the_machine_s_cores_the_benchmark_could_use(monkeypatch):
    """Its threads are sized to those (half each for two ranks): a report that said 16 logical
    cores of a run on 2 explained its numbers wrong."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(run, "usable_cores", lambda: 2)
    machine = run.machine_info(run.plan_devices(run.BenchConfig(device="cpu")))
    assert (machine["cpu_count"], machine["usable_cores"]) == (16, 2)
    assert report.usable_cores_note(machine) == " (2 of them usable by the benchmark)"
    assert report.usable_cores_note({**machine, "usable_cores": 16}) == ""
    assert report.usable_cores_note({"cpu_count": 16}) == ""  # a results.json that did not record them


def test_a_benchmark_kept_on_the_cpu_of_a_gpu_machine_says_so(monkeypatch):
    """--device cpu where there is a GPU: the report said "GPUs: none" and "no GPU"."""
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 1),
                        ("get_device_name", lambda *args: "GPU-X")):
        monkeypatch.setattr(torch.cuda, name, value)
    plan = run.plan_devices(run.BenchConfig(device="cpu"))
    assert (plan.single, plan.two_rank) == ("cpu", "cpu")
    assert plan.note == "--device cpu: every mode on the CPU, two-rank modes over gloo"
    assert run.machine_info(plan)["gpus"] == ["GPU-X"]
    monkeypatch.setattr(torch.cuda, "get_device_name",  # as lazy CUDA init raises it: no RuntimeError
                        lambda *args: (_ for _ in ()).throw(AssertionError("libcudart functions unavailable")))
    assert run.machine_info(plan)["gpus"] == []  # a driver that fails, which --device cpu is there to avoid


def test_an_out_folder_that_cannot_be_made_is_refused(tiny_data, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("")
    for out, why in ((afile, "File exists"), (afile / "report", "Not a directory")):
        with pytest.raises(ValueError, match=f"--out {out}: cannot make that folder \\({why}\\); give a folder"):
            run.main(["--device", "cpu", "--batch", "2", "--loader-data", str(tiny_data), "--out", str(out)])
    with pytest.raises(ValueError, match="^--out is empty: give a folder, or leave --out out"):
        run.main(["--device", "cpu", "--quick", "--out", " "])  # not a folder named " " where it runs


def test_an_out_folder_under_home_is_expanded(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=f"^--out {tmp_path}/a-file/report: cannot make that folder"):
        run.main(["--device", "cpu", "--batch", "2", "--loader-data", str(tiny_data), "--out", "~/a-file/report"])
    assert not (tmp_path / "~").exists()


def _sleep(rank, *args):
    time.sleep(30)


def test_weights_that_take_longer_than_the_rank_time_limit_name_it(tmp_path, monkeypatch):
    """Drawing the reference (one process that imports torch) is every run's first step: out
    of time there, every run would be, so the benchmark stops and names the option."""
    monkeypatch.setattr(run, "weights_worker", _sleep)
    with pytest.raises(ValueError, match=r"^drawing the reference's weights took longer than --rank-timeout-s 2 "
                                         r"\(rank 0 failed: .*\): give a longer --rank-timeout-s$"):
        run.main(["--device", "cpu", "--quick", "--batch", "2", "--modes", "single", "--rank-timeout-s", "2",
                  "--out", str(tmp_path)])


def test_the_loader_stops_measuring_at_the_deadline(tiny_data):
    class Passed(run.Deadline):
        def left(self):
            return -1.0

    bundle = run.open_loader_data(str(tiny_data), 2)
    loader = run.measure_loader((0, 1, 2), 2, 1, "cpu", bundle, Passed(10))
    assert [w["workers"] for w in loader["by_workers"]] == [0]  # the first is always measured
    assert loader["not_measured_workers"] == [1, 2]
    lines = report.loader_lines({"loader": loader, "runs": [], "config": {"batch": 2}})
    assert "| 1 | not measured: the benchmark's --time-limit of 10 s was reached | |" in lines


def test_a_number_of_workers_that_fails_is_recorded_and_the_others_are_measured(tiny_data, monkeypatch):
    """A worker killed at 16 workers (a /dev/shm too small for their batches: SIGBUS) leaves the
    figures of 0 and 1 worker, and the report names the failure; where every count fails, its error
    ends the loader's section (as a failed run is recorded)."""
    from benchmarks import loader as loader_module
    measure = loader_module._images_per_s

    def dies_from_two(bundle, batch, batches, workers, deadline=None):
        if workers >= 2:
            raise RuntimeError(f"DataLoader worker (pid(s) 12{workers}) exited unexpectedly")
        return measure(bundle, batch, batches, workers, deadline)

    monkeypatch.setattr(loader_module, "_images_per_s", dies_from_two)
    bundle = run.open_loader_data(str(tiny_data), 2)
    loader = run.measure_loader((0, 2, 1), 2, 1, "cpu", bundle)
    assert [w["workers"] for w in loader["by_workers"]] == [0, 1]
    assert loader["failed_workers"] == [
        {"workers": 2, "reason": "failed: RuntimeError: DataLoader worker (pid(s) 122) exited unexpectedly"}]
    lines = report.loader_lines({"loader": loader, "runs": [], "config": {"batch": 2}})
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| workers")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1", "| 2"]  # in the order of their numbers
    assert rows[2] == "| 2 | failed: RuntimeError: DataLoader worker (pid(s) 122) exited unexpectedly | |"

    class Passed(run.Deadline):
        def left(self):
            return -1.0

    # past the --time-limit, a failure is not the one figure the section promises: the next is tried
    loader = run.measure_loader((2, 0, 1), 2, 1, "cpu", bundle, Passed(10))
    assert [w["workers"] for w in loader["by_workers"]] == [0] and loader["not_measured_workers"] == [1]
    with pytest.raises(RuntimeError, match=r"pid\(s\) 122"):
        run.measure_loader((2, 4), 2, 1, "cpu", bundle)


@pytest.mark.parametrize("workers", [(0, 1), (0,)])
def test_the_loader_stops_timing_batches_at_the_deadline(tiny_data, workers):
    """A --time-limit that comes while the first number of workers is timed: no batch is timed
    after it (--loader-batches 100000 ran a minute past a limit of 22 s), and the report
    says how many were, of how many planned (also where 0 workers was the only count to time, so
    that no other count is left untimed)."""
    class Near(run.Deadline):
        calls = 0

        def left(self):  # time for two more checks, then none
            self.calls += 1
            return 1.0 if self.calls <= 2 else -1.0

    bundle = run.open_loader_data(str(tiny_data), 2)  # 30 training images: up to 15 batches timed
    loader = run.measure_loader(workers, 2, 100_000, "cpu", bundle, Near(10))
    measured = loader["by_workers"][0]
    assert measured["workers"] == 0 and 1 <= measured["batches"] < 15 and measured["planned_batches"] == 15
    assert len(loader["by_workers"]) == 1 and loader["not_measured_workers"] == list(workers[1:])
    lines = report.loader_lines({"loader": loader, "runs": [], "config": {"batch": 2}})
    assert (f"a warm-up batch for each worker, then {measured['batches']} timed ({measured['batches']} of 15 with 0 "
            f"workers: the benchmark's --time-limit of 10 s was reached while they were timed) (as many for each "
            f"worker where they are more), timed from when they are asked for.") in lines[0]


def test_the_loader_s_rate_is_that_of_its_workers_kept_busy(tiny_data, monkeypatch):
    """Each image made to take 50 ms more (a sleep, which no other process on a busy CPU makes
    shorter): 2 workers make at most 40 images/s, and the benchmark says no more than that.
    Timed from the batch after a warm-up one, over 5 batches of 2, it said 42 to 47 on a busy
    2-core CPU (50 at most): the batch that the second worker made alongside the warm-up
    counted as made in no time."""
    from benchmarks import loader as loader_module
    load = data_module.ImageFolderSplit.load

    def slow(split, index, substitute=True):
        time.sleep(0.05)
        return load(split, index, substitute)

    monkeypatch.setattr(data_module.ImageFolderSplit, "load", slow)  # in the workers too: they are forked
    bundle = run.open_loader_data(str(tiny_data), 2)
    for count, most in ((2, 40), (0, 20)):
        rate = loader_module._images_per_s(bundle, 2, 5, count)
        assert (rate["batches"], rate["planned_batches"]) == ((4, 4) if count else (5, 5))  # 2 each, for 2 workers
        assert 0.25 * most < rate["images_per_s"] <= 1.02 * most, rate  # the clock's and the sleep's grain


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29's, for torchcodec
def test_batches_decoded_by_torchvision_are_the_loader_s(tiny_data, tmp_path, monkeypatch):
    """What the GPU decodes in the loader's section is the loader's own batches: shown on the
    CPU, where torchvision's decoder (libjpeg-turbo, as Pillow's) gives the same pixels. On a GPU
    nvJPEG repeats each colour sample where libjpeg interpolates them (tests/test_gpu.py); its
    speed, not its pixels, is what is measured."""
    from benchmarks import loader as loader_module
    bundle = run.open_loader_data(str(tiny_data), 4)
    batches = data_module.train_batches(bundle, 4, seed=0, epoch=0)
    for index, paths in enumerate(loader_module.batch_paths(bundle, 4, 3)):
        crops = next(batches)[0]
        decoded = loader_module.decoded_batch(paths, 4 * index, torch.device("cpu"))
        assert decoded.dtype == torch.uint8 and torch.equal(decoded, crops), index
    rate = loader_module.decoding(bundle, 4, 3, torch.device("cpu"))  # in a process of its own
    assert (rate["batches"], rate["planned_batches"], rate["device"]) == (3, 3, "cpu") and rate["images_per_s"] > 0
    assert rate["cut"] is None and report.loader_decoding_missing({"decoded_on_device": rate}) == []

    class Near(run.Deadline):  # the --time-limit reached as the first batch is timed
        def left(self):
            return 1e-9
    cut = loader_module.decoding(bundle, 4, 3, torch.device("cpu"), Near(10))
    assert (cut["batches"], cut["cut"]) == (1, "not measured: the benchmark's --time-limit of 10 s was reached")
    assert report.loader_decoding_missing({"decoded_on_device": cut}) == [
        "- the loader's batches decoded on the GPU, 2 of 3 batches: not measured: the benchmark's --time-limit of 10 s "
        "was reached"]
    # timed for DECODING_TIMEOUT_S less its start at most, without a --time-limit too: said so
    with monkeypatch.context() as patched:
        patched.setattr(loader_module, "DECODING_TIMEOUT_S", loader_module.DECODING_START_S + 1e-6)
        capped = loader_module.decoding(bundle, 4, 3, torch.device("cpu"))
    assert (capped["batches"], capped["cut"]) == (1, "not measured: the 1e-06 s that decoding is timed at most were "
                                                     "over")
    lines = report.loader_lines({"loader": dict(loader_module.measure_loader((0,), 4, 1, "cpu", bundle),
                                                decoded_on_device=capped), "runs": [], "config": {"batch": 4}})
    assert any(line.endswith("over 1 of 3 timed batches (the 1e-06 s that decoding is timed at most were over)")
               for line in lines), lines
    # a file it cannot decode, or not of the base size, is the measurement's failure, said; a hang is bounded
    order = data_module.epoch_order(len(bundle.train), 0, 0)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bundle = run.open_loader_data(str(data), 4)
    odd = Path(bundle.train.samples[order[1]][0])
    odd.write_bytes(b"not a JPEG")
    assert loader_module.decoding(bundle, 4, 3, torch.device("cpu"))["reason"].startswith("failed: RuntimeError: ")
    Image.new("RGB", (300, 256)).save(odd, format="JPEG")
    assert loader_module.decoding(bundle, 4, 3, torch.device("cpu"))["reason"] == (
        f"failed: ValueError: {odd} is not a 256x256 image, which decoding on the device is measured on (the "
        f"pre-resized JPEGs of launch.prepare)")
    odd.unlink()
    os.mkfifo(odd)  # read, it waits for a writer for good, as a hung decoder would
    monkeypatch.setattr(loader_module, "DECODING_TIMEOUT_S", 10.0)
    started = time.monotonic()
    hung = loader_module.decoding(bundle, 4, 3, torch.device("cpu"))
    assert hung == {"reason": "failed: still running after the run's time limit of 10 s"}
    assert time.monotonic() - started < 60
    # on the CPU the loader's section says that there was no GPU, and the report does not count it missing
    loader = run.measure_loader((0,), 4, 1, "cpu", run.open_loader_data(str(tiny_data), 4))
    assert loader["decoded_on_device"] == {"reason": loader_module.NO_GPU_DECODING}
    lines = report.loader_lines({"loader": loader, "runs": [], "config": {"batch": 4}})
    assert f"- the loader's first batches decoded on the GPU by torchvision (nvJPEG): {loader_module.NO_GPU_DECODING}" \
        in lines
    assert report.loader_decoding_missing(loader) == []
    failed = {"decoded_on_device": {"reason": "failed: RuntimeError: nvjpeg"}}
    assert report.loader_decoding_missing(failed) == ["- the loader's batches decoded on the GPU: failed: RuntimeError: "
                                                      "nvjpeg"]


def test_the_loader_section_names_the_workers_that_keep_up_with_the_towers_or_none():
    by_workers = [{"workers": w, "batch": 16, "batches": 4, "images_per_s": rate, "seconds": 64 / rate}
                  for w, rate in ((0, 40.0), (2, 90.0), (4, 150.0))]
    loader = {"data": "DATA", "train_images": 100, "by_workers": by_workers, "device": "cpu",
              "augment_ms_per_batch": 3.0, "input_bytes_per_image": 150536, "float32_bytes_per_image": 602120}

    def said(towers_rate):
        towers = {"mode": "towers", "batch": 16, "precision": "fp32", "memory_format": "contiguous",
                  "images_per_s": towers_rate}
        lines = report.loader_lines({"loader": loader, "runs": [towers], "config": {"batch": 16}})
        return next(line for line in lines if line.startswith("- the towers' training step"))
    assert said(80.0).endswith("80.0 images/s at this batch: the loader keeps up with it from 2 workers")
    assert said(5000.0).endswith("no worker count measured keeps up with it (the most: 150.0 images/s from 4 workers)")
    # and the loader's first batches decoded on the GPU, where they were
    loader["decoded_on_device"] = {"device": "cuda", "batches": 4, "planned_batches": 4, "batch": 16, "seconds": 0.2,
                                   "images_per_s": 320.0, "cut": None}
    towers = {"mode": "towers", "batch": 16, "precision": "fp32", "memory_format": "contiguous", "images_per_s": 80.0}
    decoded = ("- the loader's first batches decoded on cuda by torchvision (nvJPEG, one call per batch; each file "
               "read on one thread, the crops cut on the GPU), alone on the GPU: 320.0 images/s over 4 of 4 timed "
               "batches")
    lines = report.loader_lines({"loader": loader, "runs": [towers], "config": {"batch": 16}})
    assert f"{decoded}, against the towers' step's 80.0 (in training, decoding would share the GPU with it)" in lines
    loader["decoded_on_device"].update(batches=2, cut="not measured: the benchmark's --time-limit of 9 s was reached")
    lines = report.loader_lines({"loader": loader, "runs": [], "config": {"batch": 16}})
    assert decoded.replace("4 of 4", "2 of 4") + " (the benchmark's --time-limit of 9 s was reached)" in lines, lines


def test_a_precision_baseline_that_was_never_planned_is_not_called_unmeasured():
    """--precision-modes towers without towers in --modes: no fp32 contiguous towers run was
    planned, and the report, which ends 'Everything planned was measured', says so in its row."""
    bf16 = {"mode": "towers", "batch": 2, "precision": "bf16", "memory_format": "channels_last", "images_per_s": 3.0,
            "step_ms": {"median": 600.0, "p10": 590.0, "p90": 610.0}, "bytes_total": 1e6,
            "bytes_total_analytic": 1e6, "peak_memory_bytes": [1e9, 1e9]}
    config = {"batch": 2, "modes": ["single"], "precisions": ["bf16"], "memory_formats": ["channels_last"],
              "precision_modes": ["towers"], "compile_modes": []}
    rows = [line for line in report.precision_table({"config": config, "runs": [bf16]}) if line.startswith("| towers")]
    assert rows[0] == "| towers | fp32 | contiguous | no | not planned: add towers to --modes for the speed-up's " \
                      "baseline | | | | |"
    assert rows[1].startswith("| towers | bf16 | channels_last | no | 3.0 | 600.0 [590.0, 610.0] | — |")
    config["modes"] = ["single", "towers"]  # planned, and not measured (a --time-limit, a failure)
    rows = [line for line in report.precision_table({"config": config, "runs": [bf16]}) if line.startswith("| towers")]
    assert rows[0] == "| towers | fp32 | contiguous | no | not measured | | | | |"


def test_the_precision_table_s_speed_up_is_the_fp32_step_over_the_variant_s():
    run_of = lambda precision, ms, rate: {
        "mode": "towers", "batch": 2, "precision": precision, "memory_format": "contiguous", "images_per_s": rate,
        "step_ms": {"median": ms, "p10": ms - 10, "p90": ms + 10}, "bytes_total": 1e6, "bytes_total_analytic": 5e5,
        "peak_memory_bytes": [1e9, 2e9]}
    config = {"batch": 2, "modes": ["towers"], "precisions": ["fp32", "bf16"], "memory_formats": ["contiguous"],
              "precision_modes": ["towers"], "compile_modes": []}
    runs = [run_of("fp32", 600.0, 3.3), run_of("bf16", 200.0, 10.0)]
    rows = [line for line in report.precision_table({"config": config, "runs": runs}) if line.startswith("| towers")]
    assert rows == [  # 600 ms / 600 ms; 600 ms / 200 ms
        "| towers | fp32 | contiguous | no | 3.3 | 600.0 [590.0, 610.0] | 1.00x | 1.00 / 0.50 | 1000.00 / 2000.00 |",
        "| towers | bf16 | contiguous | no | 10.0 | 200.0 [190.0, 210.0] | 3.00x | 1.00 / 0.50 | 1000.00 / 2000.00 |"]


def test_the_loader_table_gives_the_milliseconds_of_a_batch_of_each_number_of_workers():
    by_workers = [{"workers": 0, "batch": 16, "batches": 4, "images_per_s": 128.0, "seconds": 0.5},
                  {"workers": 2, "batch": 16, "batches": 5, "images_per_s": 320.0, "seconds": 0.25}]
    loader = {"data": "DATA", "train_images": 100, "by_workers": by_workers, "device": "cpu",
              "augment_ms_per_batch": 3.0, "input_bytes_per_image": 150536, "float32_bytes_per_image": 602120}
    lines = report.loader_lines({"loader": loader, "runs": [], "config": {"batch": 16}})
    # 500 ms over 4 batches; 250 ms over 5
    assert [line for line in lines if line.startswith("| ") and line[2].isdigit()] == ["| 0 | 128.0 | 125.0 |",
                                                                                     "| 2 | 320.0 | 50.0 |"]


def _speed_goal_run(mode, batch, precision, memory_format, images_per_s, peak=None, gflop_per_s=1.0):
    return {"mode": mode, "batch": batch, "precision": precision, "memory_format": memory_format,
            "images_per_s": images_per_s, "peak": peak, "gflop_per_s": gflop_per_s}


def test_the_speed_goals_name_the_fastest_variant_of_each_net_and_the_largest_share_of_the_bf16_peak():
    """Goal 1: the fastest single and the fastest torchvision at the main batch, each its own
    variant, in each precision with more than one pair; goal 3: the bf16 run nearest the peak."""
    h100 = lambda math, share, gpus: {"gpu": "H100", "math": math, "tflop_per_s_per_device": 989.4,
                                      "devices": gpus, "share": share}
    runs = [_speed_goal_run("single", 16, "fp32", "contiguous", 10.0),
            _speed_goal_run("torchvision", 16, "fp32", "contiguous", 12.0),
            _speed_goal_run("single", 16, "fp32", "channels_last", 15.0),
            _speed_goal_run("torchvision", 16, "fp32", "channels_last", 11.0),
            _speed_goal_run("single", 8, "fp32", "contiguous", 90.0),  # faster, at another batch
            _speed_goal_run("torchvision", 8, "fp32", "contiguous", 99.0),
            _speed_goal_run("single", 16, "bf16", "contiguous", 20.0, h100("bf16", 0.2, 1)),  # one pair in bf16
            _speed_goal_run("torchvision", 16, "bf16", "contiguous", 30.0),
            # 35 % of 2 x 989.4 TFLOP/s: 692.58 TFLOP/s
            _speed_goal_run("towers", 16, "bf16", "channels_last", 25.0, h100("bf16", 0.35, 2), 692_580.0),
            _speed_goal_run("towers", 16, "fp32", "contiguous", 25.0, h100("tf32", 0.9, 2))]
    results = {"config": {"batch": 16, "modes": ["single", "torchvision"]}, "runs": runs, "program": [],
               "analytic": {"macs_per_image": {"single": 2, "torchvision": 1}}}
    lines = report.speed_goal_lines(results)
    assert [line for line in lines if line.startswith("- fastest")] == [
        "- fastest of each at batch 16 in fp32: single 15.0 images/s (fp32, channels_last), torchvision 12.0 "
        "(fp32, contiguous)"]
    assert "- at most 35.0 % of the H100's 989.4 TFLOP/s: towers, batch 16, bf16, channels_last, 692.6 TFLOP/s " \
           "over 2 GPU(s)" in lines


def test_a_report_notes_each_run_whose_loss_became_non_finite(tmp_path, monkeypatch):
    """A loss that diverged: None as results.json holds it, NaN or infinite as the benchmark hands it over."""
    committed = CPU_REPORT / "results.json"
    results = json.loads(committed.read_text())
    for chart in ("chart_images_per_s", "chart_bytes"):  # the text alone
        monkeypatch.setattr(report, chart, lambda results, path: path.write_bytes(b""))
    report.write_report(results, tmp_path)
    assert "Note: the loss" not in (tmp_path / "report.md").read_text()
    losses = {("towers", 16, "fp32", "contiguous"): [3.1, None], ("single", 16, "bf16", "channels_last"): [math.nan],
              ("ddp", 4, "fp32", "contiguous"): [3.2, math.inf]}
    for r in results["runs"]:
        r["final_loss"] = losses.get((r["mode"], r["batch"], r["precision"], r["memory_format"]), r["final_loss"])
    report.write_report(results, tmp_path)
    assert "\nNote: the loss became non-finite in towers (batch 16, fp32, contiguous), single (batch 16, bf16, " \
           "channels_last), ddp (batch 4, fp32, contiguous) (random labels at raw-pixel scale).\n" in \
           (tmp_path / "report.md").read_text()


class _Drawing:
    """pyplot, a figure and its axes at once, recording what is drawn on them (a chart's data, no pixels)."""

    def __init__(self):
        self.drawn = []  # (what, args, kwargs)

    def subplots(self, *args, **kwargs):
        return self, self

    @property
    def xaxis(self):
        return self

    def get_legend_handles_labels(self):
        return [], []

    def __getattr__(self, what):
        return lambda *args, **kwargs: self.drawn.append((what, args, kwargs))

    def series(self, what: str) -> dict:
        """The label of each plot or scatter drawn, and its x and y."""
        return {kwargs["label"]: (list(args[0]), list(args[1])) for drawn, args, kwargs in self.drawn
                if drawn == what}


def _chart_run(mode, batch, precision="fp32", memory_format="contiguous", compiled=False, **figures):
    return {"mode": mode, "batch": batch, "precision": precision, "memory_format": memory_format,
            "compiled": compiled, **figures}


def test_the_throughput_chart_draws_the_fp32_eager_contiguous_runs_of_the_swept_batches_in_batch_order(
        tmp_path, monkeypatch):
    drawing = _Drawing()
    monkeypatch.setattr(report, "pyplot", lambda: drawing)
    runs = [_chart_run("single", 8, images_per_s=80.0), _chart_run("single", 4, images_per_s=40.0),
            _chart_run("single", 2, images_per_s=20.0),  # the projection's half batch, not swept
            _chart_run("single", 8, "bf16", images_per_s=1.0),
            _chart_run("single", 8, "fp32", "channels_last", images_per_s=2.0),
            _chart_run("single", 8, compiled=True, images_per_s=3.0), _chart_run("towers", 8, images_per_s=70.0)]
    results = {"config": {"batch": 8, "batches": [4]}, "runs": runs, "machine": {"hostname": "box"}}
    report.chart_images_per_s(results, tmp_path / "chart.png")
    assert drawing.series("plot") == {"single": ([4, 8], [40.0, 80.0]), "towers": ([8], [70.0])}


def test_the_bytes_chart_draws_ddp_s_gradients_of_both_ranks_and_the_fp32_runs_measured(tmp_path, monkeypatch):
    drawing = _Drawing()
    monkeypatch.setattr(report, "pyplot", lambda: drawing)
    runs = [_chart_run("towers", 8, bytes_total=2e6), _chart_run("ddp", 8, bytes_total=6e6),
            _chart_run("ddp", 8, "bf16", bytes_total=1.0), _chart_run("single", 8, bytes_total=0)]
    results = {"config": {"fc8_placement": "tower0"}, "runs": runs,
               "analytic": {"crossover_batch": {"fp32": {"tower0": 100.0}}, "ddp_bytes_per_rank": 3e6,
                            "towers_sent_elements_per_image": [{"a/forward": 10}, {"a/forward": 5}]}}
    report.chart_bytes(results, tmp_path / "chart.png")
    lines = drawing.series("plot")
    batches, towers = lines["towers, analytic (activations)"]
    assert towers == pytest.approx([4 * (10 + 5) * n / 1e6 for n in batches])  # both towers' elements in fp32
    assert set(lines["ddp, analytic (gradients, ring)"][1]) == {2 * 3e6 / 1e6}  # each of the 2 ranks sends 3 MB
    assert drawing.series("scatter") == {"towers, measured": ([8], [2.0]), "ddp, measured": ([8], [6.0])}


def _report_refused(folder: Path, capsys) -> str:
    """The one line (exit 2) with which ``python -m benchmarks.report FOLDER`` refuses it."""
    with pytest.raises(SystemExit) as exit:
        report.main([str(folder)])
    assert exit.value.code == 2
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1, message
    return message


@pytest.mark.parametrize("content", ["[1, 2]", "null", "{}", '{"runs": []}'])
def test_a_report_is_drawn_only_from_a_results_json(tmp_path, capsys, content):
    (tmp_path / "results.json").write_text(content)
    message = _report_refused(tmp_path, capsys)
    assert message.startswith(f"error: {tmp_path / 'results.json'} is not what python -m benchmarks.run writes (")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # nothing drawn


def test_a_results_json_that_is_not_a_file_is_refused_not_waited_on(tmp_path, capsys):
    """A FIFO would be waited on for a writer for good, by benchmarks.report and by benchmarks.run
    asking whether the folder's files are its own."""
    os.mkfifo(tmp_path / "results.json")
    message = _report_refused(tmp_path, capsys)
    assert message == (f"error: {tmp_path / 'results.json'} is not a file: give a folder that python -m benchmarks.run "
                       f"wrote\n")
    with pytest.raises(ValueError, match="did not write"):
        run.refuse_others_files(tmp_path, ("results.json", "report.md"), "benchmarks.run")


def _first_results(bench: "run.Bench") -> dict:
    """``bench.save()`` once a run has something to report (a failure): with nothing, it writes nothing."""
    bench.not_measured.append({**run.RunKey("single", 2, "fp32", "contiguous")._asdict(), "reason": "failed: here"})
    return bench.save()


def _quick_bench(out: Path) -> "run.Bench":
    """A --quick benchmark on the CPU at batch 2 writing to ``out``, before it has run anything."""
    config = run.BenchConfig(device="cpu", quick=True, batch=2)
    devices = run.plan_devices(config)
    return run.Bench(run.resolve(config, devices), devices, out, [], run.Deadline(None))


def test_json_nested_beyond_python_s_stack_is_one_line(tmp_path, capsys):
    """A results.json of arrays nested 100,000 deep, which the decoder cannot follow."""
    (tmp_path / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    message = _report_refused(tmp_path, capsys)
    assert message.startswith(f"error: {tmp_path / 'results.json'} cannot be read (maximum recursion depth")
    assert not run._written_by(tmp_path / "results.json", "benchmarks.run")  # so benchmarks.run refuses the folder


def test_a_full_disk_under_the_weights_every_run_loads_is_one_line(tmp_path):
    """The reference's weights, hundreds of MB in the temporary folder: where they do not fit,
    the benchmark ends with one line (exit 2) naming the folder and the fix, and their size:
    the reference's 60,965,224 float32 weights and as many in its shards, in MB of 10^6 bytes,
    as the reports count them (MiB were said to be MB)."""
    bench = _quick_bench(tmp_path)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "reference.pt").symlink_to("/dev/full")  # every write to it fails, as on a full disk
    with pytest.raises(ValueError) as refused:
        bench.draw_weights(str(folder))
    assert re.fullmatch(rf"cannot write the reference's weights and its towers' shards \(488 MB\) in the temporary "
                        rf"folder {re.escape(str(folder))} \(the write failed\): free space on that disk, or set TMPDIR "
                        rf"to a folder with room", str(refused.value)), refused.value


def test_weights_whose_process_is_killed_leave_every_run_not_measured_saying_why(tmp_path, monkeypatch, caplog):
    """The process drawing the reference killed (the out-of-memory killer): the benchmark ended
    in a traceback (exit 1). No run can start without the weights; the loader and the program
    need none, and are measured."""
    drawn = []

    def killed(*args, **kwargs):
        drawn.append(args)
        raise run.RankFailure({0: "killed by SIGKILL (the out-of-memory killer sends this)"}, 0)

    def execute(*args):
        raise AssertionError("a run started without its weights")

    monkeypatch.setattr(run, "run_ranks", killed)
    monkeypatch.setattr(run, "execute", execute)
    bench = _quick_bench(tmp_path)
    bench.measure([run.RunKey("single", 2, "fp32", "contiguous"), run.RunKey("towers", 2, "fp32", "contiguous")],
                  str(tmp_path))
    why = ("failed: the weights every run loads could not be drawn (rank 0 failed: killed by SIGKILL (the "
           "out-of-memory killer sends this))")
    assert len(drawn) == 1 and [r["reason"] for r in bench.not_measured] == [why, why]
    assert why in caplog.text


def test_a_run_that_fails_is_named_as_the_table_names_it_and_the_benchmark_goes_on(tmp_path, monkeypatch, caplog):
    bench = _quick_bench(tmp_path)
    bench.weights = {}  # as drawn: no run loads them here

    def fail(spec, *args):
        raise run.RankFailure({0: "RuntimeError: out of memory"}, 0)

    monkeypatch.setattr(run, "execute", fail)
    keys = [run.RunKey("single", 2, "fp32", "channels_last"), run.RunKey("towers", 4, "bf16", "contiguous", True)]
    bench.measure(keys, str(tmp_path))
    assert "single batch 2 fp32 channels_last failed: rank 0 failed: RuntimeError: out of memory" in caplog.text
    assert "towers batch 4 bf16 contiguous compiled failed: rank 0 failed" in caplog.text
    assert "RunKey(" not in caplog.text
    assert [r["reason"] for r in bench.not_measured] == ["failed: rank 0 failed: RuntimeError: out of memory"] * 2


def test_a_run_stopped_by_the_time_limit_is_not_called_failed(tmp_path, monkeypatch, caplog):
    """The run that the --time-limit stops: the line and the report say so, not that it failed (its
    ranks were stopped at the limit's last seconds: "within 0 s")."""
    bench = _quick_bench(tmp_path)
    bench.weights = {}
    bench.deadline = run.Deadline(60)

    def stopped(spec, *args):
        bench.deadline.left = lambda: -1.0  # the limit came while it ran
        raise run.RankFailure({0: "did not finish within 0 s"}, 0)

    monkeypatch.setattr(run, "execute", stopped)
    bench.measure([run.RunKey("single", 2, "fp32", "contiguous")], str(tmp_path))
    said = "not measured: the benchmark's --time-limit of 60 s was reached while it ran"
    assert f"single batch 2 fp32 contiguous {said}" in caplog.text and "failed" not in caplog.text, caplog.text
    assert [r["reason"] for r in bench.not_measured] == [said]


def test_bf16_runs_far_slower_than_fp32_skip_the_later_bf16_runs_of_their_own_device_alone(tmp_path, monkeypatch):
    """--bf16-slowdown-limit: bf16 emulated on the CPU towers of --one-gpu-two-rank cpu (10 times
    fp32's step) leaves the CPU's later bf16 runs unmeasured, not the GPU's."""
    bench = _quick_bench(tmp_path)
    bench.weights = {}
    bench.devices = bench.devices._replace(single="cuda", two_rank="cpu", backend="gloo")
    bench.save = lambda: None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    step_ms = {("towers", "fp32"): 10, ("towers", "bf16"): 100, ("single", "fp32"): 10, ("single", "bf16"): 50}
    measured = []

    def execute(spec, *args):
        measured.append((spec["mode"], spec["precision"], spec["device"]))
        return []

    def summarize(spec, *args):
        ms = step_ms.get((spec["mode"], spec["precision"]), 10)
        return {"device": spec["device"], "images_per_s": 1.0, "step_ms": {"median": ms, "p10": ms, "p90": ms}}

    monkeypatch.setattr(run, "execute", execute)
    monkeypatch.setattr(run, "summarize", summarize)
    bench.measure([run.RunKey(mode, 2, precision, "contiguous") for mode, precision in (
        ("towers", "fp32"), ("towers", "bf16"), ("single", "fp32"), ("single", "bf16"), ("ddp", "bf16"),
        ("torchvision", "bf16"))], str(tmp_path))
    # single's bf16 at 5 times fp32's step, on the GPU: its own device's first, which skips the GPU's later ones
    assert measured == [("towers", "fp32", "cpu"), ("towers", "bf16", "cpu"), ("single", "fp32", "cuda"),
                        ("single", "bf16", "cuda")]
    assert [(r["mode"], r["reason"]) for r in bench.not_measured] == [
        ("ddp", "not measured on this device (cpu): bf16 autocast ran 10.0x slower than fp32 in towers (limit "
                "--bf16-slowdown-limit 4.0)"),
        ("torchvision", "not measured on this device (cuda): bf16 autocast ran 5.0x slower than fp32 in single (limit "
                        "--bf16-slowdown-limit 4.0)")]


@pytest.mark.parametrize("looks", [1, 2, 3])
def test_a_time_limit_that_passes_between_two_looks_at_it_stops_the_runs(tmp_path, monkeypatch, looks):
    """The deadline seen ahead (``looks`` times) and passed a moment later: a run was handed a time
    limit below 0, which run_ranks refuses as no time limit at all (the benchmark ended in an error)."""
    class Passing(run.Deadline):
        seen = 0

        def left(self):
            self.seen += 1
            return 1.0 if self.seen <= looks else -1.0

    handed = []

    def draw(*args, timeout_s, **kwargs):
        handed.append(timeout_s)
        return [{"reference_path": "reference.pt", "shard_paths": ["tower0.pt", "tower1.pt"]}]

    def execute(spec, config, devices, timeout_s):
        handed.append(timeout_s)
        raise run.RankFailure({0: "did not finish"}, 0)

    monkeypatch.setattr(run, "run_ranks", draw)
    monkeypatch.setattr(run, "execute", execute)
    bench = _quick_bench(tmp_path)
    bench.deadline = Passing(60)
    bench.measure([run.RunKey("single", 2, "fp32", "contiguous")], str(tmp_path))
    assert all(limit > 0 for limit in handed), handed
    assert [r["reason"] for r in bench.not_measured] in ([bench.deadline.reason],
                                                          [f"{bench.deadline.reason} while it ran"])


def test_a_loader_whose_worker_dies_is_recorded_and_the_benchmark_goes_on(tmp_path, monkeypatch):
    """A DataLoader worker killed (a /dev/shm too small for its batches: SIGBUS): the loader's
    section says so, as a failed run's does, and the program's runs and the sweeps still come."""
    bench = _quick_bench(tmp_path)
    measured = []
    monkeypatch.setattr(run.Bench, "measure", lambda self, keys, folder: measured.append(len(keys)))

    def bus_error(*args):
        raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")

    monkeypatch.setattr(run, "measure_loader", bus_error)
    monkeypatch.setattr(run, "measure_program", lambda *args: {"skipped": "not run in this test"})
    results = bench.run(None)
    assert results["loader"] == {"skipped": "failed: RuntimeError: DataLoader worker (pid(s) 123) exited unexpectedly"}
    assert results["program"] == {"skipped": "not run in this test"} and len(measured) == 2  # the main table, the sweeps


def test_a_report_file_that_is_a_folder_is_refused_before_any_file_is_replaced(tmp_path, capsys):
    """A chart's name taken by a folder: benchmarks.report replaced report.md and the other chart,
    then failed on it (exit 2, a new report beside an old chart's place); benchmarks.run ended in
    a traceback, its results.json beside the earlier report."""
    _first_results(_quick_bench(tmp_path))
    (tmp_path / "report.md").write_text("# the earlier report\n")
    (tmp_path / report.IMAGES_CHART).write_text("the earlier chart")
    (tmp_path / report.BYTES_CHART).mkdir()
    message = _report_refused(tmp_path, capsys)
    assert message.startswith(f"error: cannot write the report in {tmp_path} ({report.BYTES_CHART} there is a "
                              f"folder)"), message
    assert (tmp_path / "report.md").read_text() == "# the earlier report\n"
    assert (tmp_path / report.IMAGES_CHART).read_text() == "the earlier chart"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(report.REPORT_FILES)  # no partial file left
    with pytest.raises(ValueError) as refused:
        run.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert str(refused.value) == (f"--out {tmp_path} holds a folder named {report.BYTES_CHART}, where python -m "
                                  f"benchmarks.run writes a file: give another folder, or move it")


def test_results_json_is_strict_json_a_diverged_loss_written_null(tmp_path):
    """Python's json writes NaN, which is not JSON: other readers (jq, a browser's) refuse the file."""
    bench = _quick_bench(tmp_path)
    bench.results["program"] = [{"mode": "towers", "final_loss": [float("nan"), float("inf"), 2.5]}]
    bench.save()

    def refuse(constant):
        raise AssertionError(f"{constant} in results.json")

    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert saved["program"] == [{"mode": "towers", "final_loss": [None, None, 2.5]}]


def test_a_full_disk_under_results_json_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """results.json is written anew after every run: a disk that fills meanwhile ends the
    benchmark with one line (exit 2), the last whole results.json kept, no temporary beside it."""
    bench = _quick_bench(tmp_path)
    saved = _first_results(bench)
    written = (tmp_path / "results.json").read_text()
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as the report's files, not 0600
    real = Path.write_text

    def full_disk(path, text, *args, **kwargs):  # writes part of the file, then the disk is full
        real(path, text[:100], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    bench.not_measured.append({"mode": "towers", "reason": "a run measured after the first save"})
    with pytest.raises(ValueError) as refused:
        bench.save()
    assert str(refused.value) == (f"cannot write {tmp_path / 'results.json'} (No space left on device): free space "
                                  f"on that disk, or give --out a folder that can be written; results.json there "
                                  f"holds the runs measured before")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no partial file left
    assert (tmp_path / "results.json").read_text() == written and json.loads(written)["date"] == saved["date"]
    # a benchmark whose first results.json cannot be written: the one there is not its own
    later = run.Bench(bench.config, bench.devices, tmp_path, [], run.Deadline(None))
    with pytest.raises(ValueError) as refused:
        _first_results(later)
    assert str(refused.value).endswith("; results.json there is an earlier benchmark's, as it was")
    assert (tmp_path / "results.json").read_text() == written


def _earlier_report(out: Path) -> dict:
    """The files of an earlier benchmark's report in ``out``, made; name -> text."""
    out.mkdir()
    files = dict.fromkeys(report.REPORT_FILES, "an earlier report")
    files["results.json"] = json.dumps({"machine": {}, "config": {}, "runs": [], "command": "python -m benchmarks.run"})
    for name, text in files.items():
        (out / name).write_text(text)
    return files


def test_files_of_the_report_s_names_that_no_benchmark_wrote_are_kept(tiny_data, tmp_path):
    """A report.md of one's own (and no benchmark's results.json beside it) is not taken for
    an earlier report, to be removed once the first results are written."""
    for mine in ({"report.md": "my notes"}, {"results.json": '{"my": "data"}', "report.md": "my notes"}):
        out = tmp_path / str(len(mine))
        out.mkdir()
        for name, text in mine.items():
            (out / name).write_text(text)
        with pytest.raises(ValueError) as refused:
            run.main(["--device", "cpu", "--batch", "2", "--loader-data", str(tiny_data), "--out", str(out)])
        assert str(refused.value) == (f"--out {out} holds {', '.join(mine)} that python -m benchmarks.run did not "
                                      f"write (no results.json of its own beside them): give another folder, or "
                                      f"move them")
        assert {p.name: p.read_text() for p in out.iterdir()} == mine


@pytest.mark.parametrize("stopped", ["before the first results", "after the first results", "in the report"])
def test_an_earlier_benchmark_stays_until_the_first_results_replace_it(tiny_data, tmp_path, monkeypatch, caplog,
                                                                       stopped):
    """A second benchmark in the folder of a first (the default --out is one per machine and
    day), stopped: before it has results, the first's files are as they were; after, its
    results.json stands alone, the first's report gone with the first's results; stopped
    while its report is drawn, it says how to draw it."""
    out = tmp_path / "report"
    earlier = _earlier_report(out)

    def interrupted(bench, loader_data):
        if stopped == "before the first results":
            raise KeyboardInterrupt
        results = _first_results(bench)
        if stopped == "after the first results":
            raise KeyboardInterrupt
        return results

    monkeypatch.setattr(run.Bench, "run", interrupted)
    monkeypatch.setattr(report, "write_report", lambda results, out: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run.main(["--device", "cpu", "--quick", "--batch", "2", "--loader-data", str(tiny_data), "--out", str(out)])
    if stopped == "before the first results":
        assert f"stopped before the first run was measured: nothing was written in {out}" in caplog.text
        assert {p.name: p.read_text() for p in out.iterdir()} == earlier
    elif stopped == "after the first results":
        assert f"stopped: {out / 'results.json'} holds the runs measured so far" in caplog.text
        assert [p.name for p in out.iterdir()] == ["results.json"]
    else:
        assert (f"stopped while the report was drawn: {out / 'results.json'} holds every run; python -m "
                f"benchmarks.report {out} draws it") in caplog.text
        assert [p.name for p in out.iterdir()] == ["results.json"]
        assert json.loads((out / "results.json").read_text())["runs"] == []


def test_a_second_benchmark_on_the_same_out_is_refused_while_the_first_runs(tiny_data, tmp_path, monkeypatch, caplog,
                                                                           capsys):
    """One --out, one benchmark at a time: the second would replace the first's results.json
    and leave one's report beside the other's results. The lock goes with the first."""
    out = tmp_path / "report"
    earlier = _earlier_report(out)
    argv = ["--device", "cpu", "--quick", "--batch", "2", "--loader-data", str(tiny_data), "--out", str(out)]
    second = []

    def first_running(bench, loader_data):  # the second starts while the first measures
        with pytest.raises(ValueError) as refused:
            run.main(argv)
        second.append(str(refused.value))
        second.append({p.name: p.read_text() for p in out.iterdir()} == earlier)  # refused, it changed nothing
        _first_results(bench)  # and a redraw of its report, from a results.json that is not its last
        second.append(_report_refused(out, capsys))
        raise KeyboardInterrupt

    monkeypatch.setattr(run.Bench, "run", first_running)
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    assert second == [f"--out {out} is in use by another benchmark program writing there: wait for it to end, or "
                      f"give another --out", True,
                      f"error: FOLDER {out} is in use by another benchmark program writing there: wait for it to "
                      f"end\n"]
    assert [p.name for p in out.iterdir()] == ["results.json"]  # no report drawn beside it
    monkeypatch.setattr(run.Bench, "run", lambda bench, loader_data: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the first has ended: the folder is free again
        run.main(argv)
    assert f"stopped before the first run was measured: nothing was written in {out}" in caplog.text
    # a file system that has no locks: said, and the benchmark goes on
    monkeypatch.setattr("fcntl.flock", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks")))
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    assert f"--out {out} cannot be locked (No locks): nothing stops another benchmark program" in caplog.text


@pytest.mark.parametrize("where", ["open_loader_data", "Bench"])
def test_a_benchmark_stopped_while_it_sets_up_says_so_in_one_line(tiny_data, tmp_path, monkeypatch, caplog, where):
    """Ctrl-C while the data is opened or the benchmark prepared (seconds: torchvision's
    imports) ended it with exit 130 and no word."""
    monkeypatch.setattr(run, where, lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run.main(["--device", "cpu", "--quick", "--batch", "2", "--loader-data", str(tiny_data), "--out",
                  str(tmp_path / "report")])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["interrupted before the first run was measured: nothing was written" if where != "Bench" else
                      f"stopped before the first run was measured: nothing was written in {tmp_path / 'report'}"]


def test_hybrid_left_out_of_the_modes_is_said_to_be_not_run():
    """Not "not measured (see 'Not measured')", where that section said everything planned was."""
    committed = CPU_REPORT / "results.json"
    results = json.loads(committed.read_text())
    assert report.hybrid_lines(results)[0].startswith("2 replicas of the two towers on 4 ranks")
    results["runs"] = [r for r in results["runs"] if r["mode"] != "hybrid"]
    assert report.hybrid_lines(results) == ["hybrid was not measured at the main batch (see 'Not measured')."]
    results["config"]["modes"] = [m for m in results["config"]["modes"] if m != "hybrid"]
    assert report.hybrid_lines(results) == ["Not run (--modes)."]


def _table_widths(markdown: str) -> list:
    """The number of cells of each line of each table, table by table."""
    tables, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            table.append(len(line.strip().strip("|").split("|")))
        elif table:
            tables.append(table)
            table = []
    return tables


def test_a_report_of_nothing_measured_says_so_in_whole_sentences_and_tables(tmp_path):
    config = run.BenchConfig(device="cpu", quick=True, batch=2, modes=("single",), batches=(4,),
                             sweep_modes=("single",), time_limit=5)
    devices = run.plan_devices(config)
    # an --out whose name is not UTF-8, in the command the report names: its odd bytes escaped
    bench = run.Bench(run.resolve(config, devices), devices, tmp_path, ["--out", "r\udcffport"], run.Deadline(5))
    bench.not_measured = [{**key._asdict(), "reason": bench.deadline.reason} for key in bench.keys]
    report.write_report(bench.save(), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "--out 'r\\udcffport'" in text
    sweep = text.split("## Batch-size sweep\n\n", 1)[1].split("\n## ", 1)[0]
    assert sweep.startswith("Not measured: no fp32, contiguous run (see 'Not measured').\n\nTowers: ")
    assert "- **Memory.** No run was measured (see 'Not measured'). Param memory = " in text
    assert "| peak memory per rank (MB) |" in text
    tables = _table_widths(text)
    assert len(tables) == 3  # the main table, the precision sweep and the eight-GPU projection
    assert all(len(set(widths)) == 1 and len(widths) >= 3 for widths in tables), tables


def test_a_full_disk_under_the_report_is_one_line_and_leaves_no_partial_file(tiny_data, tmp_path, monkeypatch):
    """The disk fills while the second chart is written, by benchmarks.run and by benchmarks.report:
    one line naming the folder and the fix (a command to paste: the name quoted), no partial
    file, and an earlier draw's report as it was: not a new chart beside it."""
    import matplotlib.figure
    out, real = tmp_path / "the report", matplotlib.figure.Figure.savefig

    def full_disk(fig, path, **kwargs):
        if "bytes" not in Path(path).name:
            return real(fig, path, **kwargs)
        Path(path).write_bytes(b"\x89PNG\r\n")  # a part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    monkeypatch.setattr(run.Bench, "run", lambda bench, loader_data: _first_results(bench))  # a run that failed
    with pytest.raises(ValueError) as refused:
        run.main(["--device", "cpu", "--quick", "--batch", "2", "--loader-data", str(tiny_data), "--out", str(out)])
    assert str(refused.value) == (f"cannot write the report in {out} (No space left on device): free space on that "
                                  f"disk, then python -m benchmarks.report '{out}' draws it from its results.json")
    assert [p.name for p in out.iterdir()] == ["results.json"]
    for name in report.REPORT_FILES[1:]:  # an earlier draw's report, which a redraw replaces
        (out / name).write_text("earlier")
    with pytest.raises(SystemExit) as stopped:
        report.main([str(out)])
    assert stopped.value.code == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(report.REPORT_FILES)
    assert all((out / name).read_text() == "earlier" for name in report.REPORT_FILES[1:])


@pytest.mark.slow  # real processes
@pytest.mark.parametrize("stop", ["a results.json it cannot draw", "SIGTERM", "SIGINT"])
def test_a_redraw_that_fails_or_is_stopped_leaves_the_earlier_report_as_it_was(tmp_path, stop):
    """All of the report or none of it: a redraw stopped while it drew the charts (or failing
    at the second) left the first chart new beside the earlier report.md, and a Ctrl-C printed
    a traceback."""
    committed = CPU_REPORT
    folder = tmp_path / "report"
    shutil.copytree(committed, folder)
    earlier = {name: f"an earlier draw's {name}".encode() for name in report.REPORT_FILES[1:]}  # not a redraw's
    for name, content in earlier.items():
        (folder / name).write_bytes(content)
    if stop == "a results.json it cannot draw":  # found while the second chart is drawn, after the first
        results = json.loads((folder / "results.json").read_text())
        results["runs"][0]["batch"] = 10 ** 299  # drawn as one point of the first chart, beyond the second's axis
        (folder / "results.json").write_text(json.dumps(results))
        result = subprocess.run([sys.executable, "-m", "benchmarks.report", str(folder)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith("error: "), result.stderr[-3000:]
    else:  # while the first chart is drawn: after the imports, the lock and the checks
        proc = subprocess.Popen([sys.executable, "-c", _STOPPED_WHILE_DRAWING, str(folder)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=as_foreground_job)  # as a terminal's job, the suite's own aside
        assert proc.stdout.readline() == "drawing\n"
        proc.send_signal(getattr(signal, stop))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and err.splitlines() == [
            "interrupted: the report was not redrawn, and the folder's earlier files are as they were"], err[-3000:]
    assert {name: (folder / name).read_bytes() for name in report.REPORT_FILES[1:]} == earlier
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in committed.iterdir())


@pytest.mark.slow  # real processes
def test_a_redraw_draws_with_agg_whatever_mplbackend_names_and_where_matplotlib_cannot_start_says_so_in_a_line(
        tmp_path):
    """MPLBACKEND naming a backend that matplotlib does not know stopped its import (the
    reports are drawn with Agg, into files), after a whole benchmark's runs, or with the
    redraw blaming results.json. A read-only container, where matplotlib finds no folder for
    its cache: two lines, the second with "(None)" and another fix than matplotlib's."""
    committed = CPU_REPORT
    folder = tmp_path / "report"
    shutil.copytree(committed, folder)
    result = subprocess.run([sys.executable, "-m", "benchmarks.report", str(folder)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, MPLBACKEND="bogus"))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-3000:]
    assert (folder / "report.md").stat().st_mtime > (folder / "results.json").stat().st_mtime  # drawn anew
    read_only = ("mount --rbind /tmp /tmp && mount -o remount,bind,ro /tmp && mount --rbind /var/tmp /var/tmp && "
                 "mount -o remount,bind,ro /var/tmp")
    skip_without_namespaces("--mount", setup=read_only)
    # the current folder read-only too
    script = (f"{read_only} && cd /tmp && exec env -u TMPDIR -u TEMP -u TMP MPLCONFIGDIR=/tmp/matplotlib "
              f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m benchmarks.report {folder}")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: Matplotlib requires access to a writable cache directory") and \
        lines[0].endswith("set the MPLCONFIGDIR environment variable to a writable directory"), result.stderr


@pytest.mark.slow  # real processes
def test_a_redraw_killed_while_it_draws_leaves_nothing_that_the_next_does_not_remove(tmp_path):
    """SIGKILL (the out-of-memory killer) in the middle of a chart: its part stays, hidden, and
    the next redraw removes it (a part written through write_whole had a name it never did)."""
    committed = CPU_REPORT
    folder = tmp_path / "report"
    shutil.copytree(committed, folder)
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_DRAWING, str(folder)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the part it left
    result = subprocess.run([sys.executable, "-m", "benchmarks.report", str(folder)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in committed.iterdir())


# benchmarks.report as python -m runs it, its first chart's drawing held until the test stops it
# ... and killed while it draws its first chart, having written a part of it
_KILLED_WHILE_DRAWING = """
import os, runpy, signal, sys
import matplotlib.figure
def killed(fig, path, **kwargs):
    with open(path, "wb") as f:
        f.write(b"\\x89PNG")
    os.kill(os.getpid(), signal.SIGKILL)
matplotlib.figure.Figure.savefig = killed
sys.argv = ["benchmarks.report", sys.argv[1]]
runpy.run_module("benchmarks.report", run_name="__main__", alter_sys=True)
"""


_STOPPED_WHILE_DRAWING = """
import runpy, sys, time
import matplotlib.figure
def held(fig, path, **kwargs):
    print("drawing", flush=True)
    time.sleep(120)
matplotlib.figure.Figure.savefig = held
sys.argv = ["benchmarks.report", sys.argv[1]]
runpy.run_module("benchmarks.report", run_name="__main__", alter_sys=True)
"""


def test_a_benchmark_that_measured_nothing_keeps_the_earlier_report(tiny_data, tmp_path, monkeypatch):
    """A --time-limit that runs out before the first figure (on a new machine, while the built-in
    data is made): the earlier benchmark's report was removed for one of "not measured" rows
    alone, and the benchmark ended with exit 0."""
    out = tmp_path / "report"
    out.mkdir()
    earlier = {"results.json": json.dumps({"machine": {}, "config": {}, "runs": [],
                                           "command": "python -m benchmarks.run --batch 128"}),
               "report.md": "# the earlier report\n", "images_per_s_vs_batch.png": "a chart"}
    for name, text in earlier.items():
        (out / name).write_text(text)

    class Passed(run.Deadline):
        def left(self):
            return -1.0

    monkeypatch.setattr(run, "Deadline", Passed)
    with pytest.raises(ValueError) as refused:
        run.main(["--device", "cpu", "--quick", "--batch", "2", "--loader-data", str(tiny_data), "--time-limit", "60",
                  "--out", str(out)])
    assert str(refused.value) == (f"the --time-limit of 60 s passed before anything was measured: give a longer "
                                  f"one; nothing was written in {out}")
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier
    new = tmp_path / "new" / "report"  # and the folders made for it are not left behind, empty
    with pytest.raises(ValueError, match="nothing was written in"):
        run.main(["--device", "cpu", "--quick", "--batch", "2", "--loader-data", str(tiny_data), "--time-limit", "60",
                  "--out", str(new)])
    assert sorted(tmp_path.iterdir()) == [out]


@pytest.mark.slow
def test_a_benchmark_cut_short_by_its_time_limit_reports_what_it_measured(tiny_data, tmp_path, monkeypatch):
    """results.json is written anew after every run, and the deadline is checked before each:
    here the deadline passes as soon as the first run's results are on disk."""
    out, stopped_here = tmp_path / "report", tmp_path / "stopped"

    class AfterTheFirstRun(run.Deadline):
        def left(self):
            if not (out / "results.json").exists():
                return math.inf
            if not stopped_here.exists():  # what a benchmark killed at this moment would leave
                stopped_here.mkdir()
                shutil.copy(out / "results.json", stopped_here)
            return -1.0

    monkeypatch.setattr(run, "Deadline", AfterTheFirstRun)
    run.main(["--device", "cpu", "--quick", "--batch", "2", "--loader-data", str(tiny_data), "--time-limit", "60",
              "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert [(r["mode"], r["batch"]) for r in results["runs"]] == [("single", 2)]  # the main table's first mode
    reason = "not measured: the benchmark's --time-limit of 60 s was reached"
    config = run.BenchConfig(device="cpu", quick=True, batch=2)
    assert len(results["not_measured"]) == len(run.plan_runs(run.resolve(config, run.plan_devices(config)))) - 1 > 5
    assert {n["reason"] for n in results["not_measured"]} == {reason}
    assert results["loader"] == {"skipped": reason}
    assert [(p["mode"], p["failed"]) for p in results["program"]] == [("towers", reason), ("single", reason)]
    report = (out / "report.md").read_text()
    assert "## Data loader\n\nNot measured: the benchmark's --time-limit of 60 s was reached.\n" in report
    assert f"- towers, batch 2, fp32, contiguous: {reason}" in report
    # the loader and the program in 'Not measured' too, which said "Everything planned was measured." without them
    assert f"\n- the data loader: {reason}\n- the training program, towers: {reason}\n" \
           f"- the training program, single: {reason}\n" in report
    assert f"- not measured: no run of the training program finished (towers: {reason}; single: {reason})" in report
    assert sorted(p.name for p in out.iterdir()) == ["bytes_per_step_vs_batch.png", "images_per_s_vs_batch.png",
                                                     "report.md", "results.json"]  # no partial file left
    # the report of a benchmark stopped from outside, drawn from the results.json it left
    result = subprocess.run([sys.executable, "-m", "benchmarks.report", str(stopped_here)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (stopped_here / "report.md").read_text()
    assert "| single | 1 x cpu" in report and "| towers | not measured" in report
    unstarted = f"{len(results['not_measured'])} of the {len(results['not_measured']) + 1} planned runs, the data " \
                f"loader and the training program"
    assert f"- {unstarted} had not been measured: the benchmark was stopped" in report
    # said at the top too, not only in the last section: the report of a stopped benchmark
    title, said = report.split("\n\n")[:2]
    assert title.startswith("# AlexNet") and said == (
        f"**Not finished**: {unstarted} had not been measured when results.json was written (the benchmark was "
        f"stopped, or was still running); what follows is what was measured before.")
    assert re.search(r"\n- the runs measured here took \d+ s; the benchmark had not finished\n", report)
    assert "Not finished" not in (out / "report.md").read_text()  # the run that went on to its time limit
    assert "## Data loader\n\nNot measured: results.json holds no figures of it.\n" in report
    # every run measured (or cut by the time limit), the training program not reached: not finished either
    (stopped_here / "results.json").write_text(json.dumps({**results, "program": None}))
    assert subprocess.run([sys.executable, "-m", "benchmarks.report", str(stopped_here)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120).returncode == 0
    report = (stopped_here / "report.md").read_text()
    assert report.split("\n\n")[1].startswith("**Not finished**: the training program had not been measured when")
    assert "- the training program had not been measured: the benchmark was stopped" in report
    assert "Everything planned was measured." not in report
    result = subprocess.run([sys.executable, "-m", "benchmarks.report", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {tmp_path / 'results.json'} cannot be read")


@pytest.mark.slow
def test_a_benchmark_stopped_while_the_program_runs_leaves_nothing_running_or_behind(tiny_data, tmp_path):
    """SIGTERM, as a scheduler or a timeout sends it, while the training program (a child
    process with ranks of its own) runs: everything ends, the temporary folders go."""
    temporary, out = short_temporary(), tmp_path / "report"
    _earlier_report(out)  # an earlier benchmark's, in the folder that this one writes to
    log = open(tmp_path / "log", "w+")
    bench = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--batch", "2",
                              "--modes", "single", "--program-modes", "towers", "--loader-workers", "0",
                              "--loader-data", str(tiny_data), "--out", str(out)],
                             cwd=ROOT, env=dict(os.environ, TMPDIR=str(temporary)), stdout=log, stderr=log,
                             start_new_session=True)
    # once the program's two ranks run (forked from its server, beside the harness's)
    ready = lambda: _session(bench.pid, "launch.two_gpu") and len(_session(bench.pid, "forkserver")) >= 4
    assert terminate_when_ready(bench, ready, log.name, timeout_s=RUN_TIMEOUT_S) == 130
    text = Path(log.name).read_text()
    assert f"stopped: {out / 'results.json'} holds the runs measured so far; python -m benchmarks.report" in text
    assert "Traceback" not in text, text[-3000:]
    deadline = time.monotonic() + 20
    while (_session(bench.pid) or any(not p.name.startswith("torchinductor_") for p in temporary.iterdir())) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session(bench.pid), [cmdline(pid) for pid in _session(bench.pid)]
    assert [p.name for p in temporary.iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's cache
    results = json.loads((out / "results.json").read_text())
    assert [r["mode"] for r in results["runs"]] == ["single"] and results["loader"]["by_workers"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # the earlier report gone, none drawn


# The smallest caller of run_child: the training program as the benchmark starts it (its output
# into the caller's), at a learning rate that keeps it training far longer than the test waits.
PROGRAM_CALLER = """
import sys
from benchmarks.program import program_command, run_child
command = program_command("towers", 2, 100_000, "cpu", sys.argv[1], 0, "tower0")
run_child([sys.executable, *command, "--lr", "0.0001", "--out", sys.argv[2], "--run-name", "run"])
"""


@pytest.mark.slow
def test_the_program_ends_with_a_benchmark_killed_outright(tiny_data, tmp_path):
    """SIGKILL (as the out-of-memory killer sends it) to the process that started the training
    program through run_child, which cannot stop it then: the program, which would otherwise
    train on orphaned, ends with its ranks."""
    temporary = short_temporary()
    log = open(tmp_path / "log", "w+")
    caller = subprocess.Popen([sys.executable, "-c", PROGRAM_CALLER, str(tiny_data), str(tmp_path)], cwd=ROOT,
                              env=dict(os.environ, TMPDIR=str(temporary)), stdout=log, stderr=log,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # the program's ranks train
            assert caller.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.1)
        assert _session(caller.pid, "launch.two_gpu")
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _session(caller.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _session(caller.pid), [cmdline(pid) for pid in _session(caller.pid)]
        assert "interrupted: every rank stopped" in Path(log.name).read_text()  # stopped as Ctrl-C stops it
    finally:
        if _session(caller.pid):
            os.killpg(caller.pid, signal.SIGKILL)


# A benchmark killed outright: its temporary folder, with what it held, stays behind.
KILLED_HOLDER = """
import sys
from benchmarks.scratch import temporary_folder
with temporary_folder(sys.argv[1]) as folder:
    open(folder + "/weights.pt", "w").write("the reference's weights")
    print(folder, flush=True)
    sys.stdin.read()
"""


def test_the_temporary_folders_of_a_killed_benchmark_are_removed_by_the_next(tmp_path, monkeypatch):
    """Folders of processes that ended without removing them go; those of a live process, of a
    process this one cannot see (its lock held elsewhere), and anything named otherwise stay."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # found again from TMPDIR
    left = []
    for prefix in scratch.PREFIXES:
        holder = subprocess.Popen([sys.executable, "-c", KILLED_HOLDER, prefix], cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        left.append(Path(holder.stdout.readline().strip()))
        holder.kill()
        assert holder.wait(timeout=60) == -9 and (left[-1] / "weights.pt").exists()
        holder.stdin.close()
        holder.stdout.close()
    dead_pid = left[0].name.split("-")[2]
    elsewhere = tmp_path / f"alexnet-program-{dead_pid}-abcdefgh"  # a process of another PID namespace
    elsewhere.mkdir()
    others = [tmp_path / "alexnet-bench-12345678", tmp_path / "alexnet-bench-notapid-abcdefgh"]
    for folder in others:
        folder.mkdir()
    lock = os.open(elsewhere, os.O_RDONLY)
    try:
        scratch.fcntl.flock(lock, scratch.fcntl.LOCK_SH)
        with scratch.temporary_folder("alexnet-bench-") as live:
            assert scratch.remove_stale_folders() == sorted(left)
            assert Path(live).is_dir() and elsewhere.is_dir() and all(folder.is_dir() for folder in others)
    finally:
        os.close(lock)
    assert not Path(live).exists()
    # benchmarks.run removes them first thing, before the options that name files are checked
    left = tmp_path / f"alexnet-bench-{dead_pid}-abcdefgh"
    left.mkdir()
    with pytest.raises(ValueError, match="does not exist"):
        run.main(["--device", "cpu", "--loader-data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert not left.exists()


def _session(sid: int, word: str = "") -> list:
    """Live processes of session ``sid`` whose command line holds ``word``."""
    return [pid for pid in live_processes(session=sid) if word in cmdline(pid)]


@pytest.mark.slow  # a real process
def test_help_explains_every_option():
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for field in run.BenchConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in result.stdout, field


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data):
    """One real harness run in the quick mode, made smaller still: batch 2 (1 warm-up + 2 timed
    steps), a sweep to batch 4 for the towers, one bf16 channels_last towers run, the single
    net in bf16 channels_last compiled (torch.compile's tracing without code generation:
    inductor's would take a minute on a 2-core CPU; tests/test_parity.py checks the towers
    compiled), the loader with 0 and 2 workers, and the training program as towers, on the
    tiny dataset's JPEGs (the built-in set's generator, made smaller). No bf16 run is left
    out for being slow: how much slower this CPU's emulated bf16 runs varies from machine to
    machine (4 to 16 times fp32's step measured), and the tests need every run."""
    out = tmp_path_factory.mktemp("bench") / "report"
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--batch", "2", "--warmup", "1",
               "--steps", "2", "--batches", "4", "--sweep-modes", "towers", "--precision-modes", "towers",
               "--precisions", "bf16", "--memory-formats", "channels_last", "--compile-modes", "single",
               "--compile-backend", "aot_eager", "--bf16-slowdown-limit", "1e9", "--loader-workers", "0,2",
               "--loader-batches", "2", "--loader-data", str(tiny_data), "--program-modes", "towers", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def _measured(batch: int, step_ms: float, compute_ms: list, devices: list, **more) -> dict:
    """A run's summary, as far as the two-GPU projection reads it: its median step, each rank's compute."""
    return {"batch": batch, "devices": devices, "step_ms": {"median": step_ms}, "compute_ms": compute_ms, **more}


def test_the_projection_takes_ddp_compute_from_ranks_that_share_devices_as_the_towers_did():
    """Two ranks sharing the machine compute slower than one process alone on it: ddp's
    projected compute is its own ranks', measured as the towers' were, where it ran."""
    config = run.BenchConfig(device="cpu", quick=True, batch=16)
    runs = {run.RunKey("single", 16, "fp32", "contiguous"): _measured(16, 930.0, [880.0], ["cpu"]),
            run.RunKey("single", 8, "fp32", "contiguous"): _measured(8, 670.0, [620.0], ["cpu"]),
            run.RunKey("towers", 16, "fp32", "contiguous"): _measured(16, 860.0, [810.0, 800.0], ["cpu", "cpu"]),
            run.RunKey("ddp", 16, "fp32", "contiguous"): _measured(16, 1070.0, [1000.0, 1020.0], ["cpu", "cpu"],
                                                                   buckets_per_step=[4.0, 4.0])}
    analytic = run.analytic_figures(config)
    shared = run.projection(runs, config, analytic)
    assert shared["ddp_compute_ms"] == 1020.0 and shared["ddp_compute_source"].startswith("measured: ddp's compute")
    assert shared["links"][0]["ddp_serial_ms"] > shared["links"][0]["towers_ms"]  # the towers win, as measured
    del runs[run.RunKey("ddp", 16, "fp32", "contiguous")]
    alone = run.projection(runs, config, analytic)
    assert alone["ddp_compute_ms"] == 670.0
    assert alone["ddp_compute_source"] == ("measured: single at batch 8 (one process, alone on its device: the "
                                           "towers' two ranks shared theirs)")


def test_a_ddp_left_unprojected_is_said_why_in_the_report():
    """Without the single net at half the batch (an odd batch has no half: not even one run in
    the batch sweep) and without ddp's own ranks to count, the projection's ddp columns are
    dashes: the report says why under them."""
    on_one_gpu = _measured(16, 17.5, [12.0, 12.5], ["cuda:0", "cuda:0"], buckets_per_step=[4.0, 4.0])
    for batch, ddp, why in (
            (16, None, "single was not run at batch 8, and ddp was not run at batch 16"),
            (16, on_one_gpu, "single was not run at batch 8, and ddp's own compute counts only where the towers' was "
                             "measured on single's kind of device, with ddp's ranks on the same devices as the "
                             "towers', neither sharing one GPU"),
            (15, None, "the batch, 15, is odd, which two data-parallel ranks cannot split")):
        config = run.BenchConfig(device="cpu", quick=True, batch=batch)
        runs = {run.RunKey("single", batch, "fp32", "contiguous"): _measured(batch, 15.0, [10.0], ["cuda:0"]),
                run.RunKey("single", 7, "fp32", "contiguous"): _measured(7, 9.0, [6.0], ["cuda:0"])}
        if ddp is not None:
            runs[run.RunKey("ddp", batch, "fp32", "contiguous")] = ddp
        projected = run.projection(runs, config, run.analytic_figures(config))
        assert projected["ddp_compute_ms"] is None and "ddp_serial_ms" not in projected["links"][0]
        lines = report.projection_lines({"projection": projected})
        assert f"- ddp: not projected: {why}." in lines
        assert all(line.endswith("| — | — | — |") for line in lines if line.startswith("| ") and line[2].isalpha()
                   and not line.startswith("| link"))


@pytest.mark.slow  # two real ranks of the full net
def test_the_exchanges_are_timed_in_steps_of_their_own_where_the_device_must_be_waited_for(tmp_path):
    """On a GPU, waiting for the device around each of the towers' collectives stalled the
    timed steps' queue of kernels, which the other modes' steps are not: the exchanges are
    timed in as many steps again, and the compute is taken from those (here on the CPU, as
    a GPU's run would)."""
    from benchmarks.workers import weights_worker
    config = run.resolve(run.BenchConfig(device="cpu", quick=True, batch=2, steps=2, warmup=1),
                         run.plan_devices(run.BenchConfig(device="cpu")))
    devices = run.plan_devices(config)
    weights = weights_worker(0, config.seed, config.fc8_placement, str(tmp_path))
    spec = run.run_spec(run.RunKey("towers", 2, "fp32", "contiguous"), config, devices, weights)
    assert spec["exchange_steps"] is False  # the CPU's collectives block: the timed steps time them as they are
    key, one_gpu = run.RunKey("towers", 2, "fp32", "contiguous"), run.DevicePlan("cuda", "cuda", "gloo", "a GPU", "")
    assert run.run_spec(key, config, one_gpu, weights)["exchange_steps"] is True
    assert run.run_spec(key, config, one_gpu._replace(two_rank="cpu"), weights)["exchange_steps"] is False
    assert run.run_spec(key._replace(mode="single"), config, one_gpu, weights)["exchange_steps"] is False
    ranks = run.execute({**spec, "exchange_steps": True}, config, devices, timeout_s=300)
    for r in ranks:
        assert len(r["step_s"]) == len(r["comm_step_s"]) == len(r["comm_s"]) == 2 and r["comm_step_s"] != r["step_s"]
        assert all(0 < c < s for c, s in zip(r["comm_s"], r["comm_step_s"]))
    summary = run.summarize(spec, ranks, run.analytic_figures(config), devices)
    assert summary["compute_ms"] == pytest.approx([1e3 * statistics.median(s - c for s, c in zip(r["comm_step_s"],
                                                                                                r["comm_s"]))
                                                   for r in ranks])
    assert summary["bytes_per_rank"] == summary["bytes_per_rank_analytic"]  # the timed steps' traffic, counted once


def test_the_projection_takes_no_compute_from_ranks_that_took_turns_on_one_gpu_or_ran_on_another_device():
    """Two ranks on one GPU (over gloo) take turns on it: each one's compute held the other's
    kernels, about twice a tower's own on a GPU of its own, and the two-GPU projection showed
    the towers and ddp that much slower. Two GPUs: their ranks' own compute, as measured. Ranks
    on the CPU beside the GPU's single net (--one-gpu-two-rank cpu): both from the GPU's single
    steps, where ddp's came from its CPU ranks against the towers' from the GPU."""
    config = run.BenchConfig(device="cpu", quick=True, batch=16)
    analytic = run.analytic_figures(config)
    for gpus in (["cuda:0", "cuda:0"], ["cuda:0", "cuda:1"], ["cpu", "cpu"]):
        runs = {run.RunKey("single", 16, "fp32", "contiguous"): _measured(16, 15.0, [10.0], ["cuda:0"]),
                run.RunKey("single", 8, "fp32", "contiguous"): _measured(8, 11.0, [6.0], ["cuda:0"]),
                run.RunKey("towers", 16, "fp32", "contiguous"): _measured(16, 16.0, [11.0, 10.5], gpus),
                run.RunKey("ddp", 16, "fp32", "contiguous"): _measured(16, 17.5, [12.0, 12.5], gpus,
                                                                       buckets_per_step=[4.0, 4.0])}
        projected = run.projection(runs, config, analytic)
        if gpus[0] == gpus[1]:
            share = max(analytic["macs_per_image"]["towers"]) / analytic["macs_per_image"]["single"]
            assert projected["tower_compute_ms"] == pytest.approx(15.0 * share)
            why = "(the towers' ranks shared one GPU, each slowed by the other's kernels)" if gpus[0] == "cuda:0" \
                else "(the towers ran on cpu, not on single's device)"
            assert projected["tower_compute_source"] == f"estimated: single step x the busier tower's share of the " \
                                                        f"FLOPs {why}"
            # both from the single net's steps, with nothing said of the towers' ranks
            assert (projected["ddp_compute_ms"], projected["ddp_compute_source"]) == \
                (11.0, "measured: single at batch 8")
        else:
            assert (projected["tower_compute_ms"], projected["ddp_compute_ms"]) == (11.0, 12.5)
    del runs[run.RunKey("towers", 16, "fp32", "contiguous")]  # failed, left out, out of time: not "another device"
    assert run.projection(runs, config, analytic)["tower_compute_source"].endswith(
        "(towers not measured: see 'Not measured')")


def _rank_result(**measured) -> dict:
    """A rank's result as a worker returns it: ``measured`` and the fields every worker adds (workers._finish)."""
    return {"device": "cpu", "threads": 1, "param_bytes": 8, "peak_memory_bytes": 16, "memory_kind": "RSS",
            "rss_at_start_bytes": 4, "final_loss": 6.9, **measured}


def _summary_spec(mode: str, batch: int, precision: str = "fp32", steps: int = 3) -> dict:
    """The fields of run_spec that summarize reads."""
    return {"mode": mode, "batch": batch, "precision": precision, "memory_format": "contiguous", "compiled": False,
            "device": "cpu", "backend": "gloo", "warmup": 1, "steps": steps, "fc8_placement": "tower0"}


CPU_PLAN = run.DevicePlan("cpu", "cpu", "gloo", None, "no GPU")


def test_a_ddp_run_is_as_slow_as_its_slower_rank_and_its_compute_is_the_no_sync_steps():
    """Per step the slower rank's time; per rank, the compute is the median no_sync step and the
    all-reduce the median step less it; its bytes the hook's count per step x the ring factor."""
    ranks = [_rank_result(step_s=[0.100, 0.300, 0.200], compute_only_s=[0.050, 0.070, 0.060],
                          allreduce_alone_s=[0.030, 0.010, 0.020], payload_bytes=3 * 1000, buckets=4),
             _rank_result(step_s=[0.150, 0.250, 0.260], compute_only_s=[0.080, 0.090, 0.100],
                          allreduce_alone_s=[0.040, 0.050, 0.045], payload_bytes=3 * 1000, buckets=4)]
    analytic = {"ring_factor": 1.0, "ddp_bytes_per_rank": 1200.0, "macs_per_image": {"ddp": 10}}
    summary = run.summarize(_summary_spec("ddp", 26), ranks, analytic, CPU_PLAN)
    # the slower rank's steps: 150, 300, 260 ms; sorted 150, 260, 300
    assert summary["step_ms_raw"] == pytest.approx([150.0, 300.0, 260.0])
    assert summary["step_ms"] == pytest.approx({"median": 260.0, "p10": 150 + 0.2 * 110, "p90": 260 + 0.8 * 40})
    assert summary["images_per_s"] == pytest.approx(26 / 0.260)  # 100
    assert summary["compute_ms"] == pytest.approx([60.0, 90.0])  # the no_sync steps' medians
    # each rank's own median step (200, 250 ms) less its compute
    assert summary["comm_ms"] == pytest.approx([200.0 - 60.0, 250.0 - 90.0])
    assert summary["allreduce_alone_ms"] == pytest.approx([20.0, 45.0])
    assert summary["payload_bytes_per_rank"] == [1000.0, 1000.0]  # 3000 bytes over 3 steps
    assert summary["bytes_per_rank"] == [1000, 1000] and summary["bytes_total"] == 2000  # x 2(n-1)/n = 1
    assert summary["bytes_per_rank_analytic"] == [1200, 1200] and summary["bytes_total_analytic"] == 2400
    assert summary["gflop_per_s"] == pytest.approx(6 * 10 * 26 / 0.260 / 1e9)  # 6 FLOPs per MAC per image


@pytest.mark.parametrize("precision, element_size", [("fp32", 4), ("bf16", 2)])
def test_a_hybrid_run_hides_what_its_all_reduce_did_not_add_and_counts_its_activations_in_its_precision(
        precision, element_size):
    """hybrid's 4 ranks (towers 0, 1, 0, 1 of 2 replicas): all-reduce added = median step - median
    no_sync step, hidden = 1 - added / alone within [0, 1]; the exchanges' analytic bytes are the
    tower's Figure 2 elements on its replica's half of the batch at the precision's element size."""
    steps, batch = 3, 8
    tower_params = [PARAMS - TOWER1_PARAMS, TOWER1_PARAMS]
    # per rank: the no_sync step (ms) and the all-reduce alone (ms); every step takes 200 ms
    timings = [(100, 400), (210, 100), (50, 100), (100, 0)]
    ranks = [_rank_result(step_s=[0.2] * steps, compute_only_s=[compute / 1e3] * steps, comm_s=[0.01, 0.03, 0.02],
                          allreduce_alone_s=[alone / 1e3] * steps, buckets=4,
                          payload_bytes=steps * 4 * tower_params[rank % 2],  # every fp32 gradient each step
                          sent_bytes=steps * (batch // 2) * element_size * SENT_PER_IMAGE["tower0"][rank % 2],
                          replicas=2, tower=rank % 2)
             for rank, (compute, alone) in enumerate(timings)]
    analytic = {"tower_params": tower_params, "macs_per_image": {"hybrid": [6, 4]}}
    summary = run.summarize(_summary_spec("hybrid", batch, precision, steps), ranks, analytic, CPU_PLAN)
    assert summary["replicas"] == 2
    assert summary["compute_ms"] == pytest.approx([100.0, 210.0, 50.0, 100.0])
    assert summary["exchange_ms"] == pytest.approx([20.0] * 4)  # the median of the exchanges' 10, 30, 20 ms
    assert summary["comm_ms"] == pytest.approx([100.0, -10.0, 150.0, 100.0])  # 200 ms less the no_sync step
    # 1 - 100/400; 1 - (-10)/100 = 1.1 held to 1; 1 - 150/100 = -0.5 held to 0; nothing alone to hide: none
    assert summary["hidden_share"][:3] == pytest.approx([0.75, 1.0, 0.0]) and summary["hidden_share"][3] is None
    exchange = [(batch // 2) * element_size * n for n in SENT_PER_IMAGE["tower0"]] * 2  # 4 images per replica
    assert summary["exchange_bytes_per_rank_analytic"] == exchange == summary["exchange_bytes_per_rank"]
    gradients = [4 * n for n in tower_params] * 2  # a ring over 2 replicas: 2(n-1)/n = 1 x the fp32 gradients
    assert summary["gradient_bytes_per_rank_analytic"] == gradients == summary["gradient_bytes_per_rank"]
    assert summary["bytes_per_rank_analytic"] == [e + g for e, g in zip(exchange, gradients)]
    assert summary["bytes_total_analytic"] == sum(exchange) + sum(gradients) == summary["bytes_total"]


def test_a_towers_run_s_compute_is_each_step_less_its_exchanges_and_its_bytes_are_per_step_in_its_precision():
    """towers: compute = the median of (a step that times the exchanges - its exchanges), exchange
    = their median; bytes and calls per step from the ExchangeLog, analytic ones from the elements
    each tower sends per image x batch x 2 bytes in bf16 (an exchange autocast left in fp32: 4)."""
    steps, batch = 3, 4
    sent_per_image = [{"conv3_input/forward": 10, "logits/forward": 5}, {"conv3_input/forward": 10,
                                                                         "fc8_input/forward": 3}]

    def log(sent, received, size):  # an exchange's ExchangeLog entry: elements per image, bytes per element
        return {"calls": steps, "sent_bytes": steps * batch * sent * size,
                "received_bytes": steps * batch * received * size,
                "sent_elements": steps * batch * sent, "received_elements": steps * batch * received}
    exchanges = [{"conv3_input/forward": log(10, 10, 2), "logits/forward": log(5, 0, 4)},  # logits left in fp32
                 {"conv3_input/forward": log(10, 10, 2), "logits/forward": log(0, 5, 4),
                  "fc8_input/forward": log(3, 0, 2)}]
    ranks = [_rank_result(step_s=[0.5] * steps, comm_step_s=[0.30, 0.40, 0.35], comm_s=[0.10, 0.05, 0.20],
                          sent_bytes=sum(e["sent_bytes"] for e in exchanges[0].values()), calls=6,
                          exchanges=exchanges[0]),
             _rank_result(step_s=[0.5] * steps, comm_step_s=[0.30, 0.30, 0.30], comm_s=[0.01, 0.02, 0.03],
                          sent_bytes=sum(e["sent_bytes"] for e in exchanges[1].values()), calls=9,
                          exchanges=exchanges[1])]
    analytic = {"towers_sent_elements_per_image": sent_per_image, "macs_per_image": {"towers": [6, 4]}}
    summary = run.summarize(_summary_spec("towers", batch, "bf16", steps), ranks, analytic, CPU_PLAN)
    # rank 0: 300-100, 400-50, 350-200 ms: 200, 350, 150; rank 1: 290, 280, 270 ms
    assert summary["compute_ms"] == pytest.approx([200.0, 280.0])
    assert summary["comm_ms"] == pytest.approx([100.0, 20.0])  # the median exchange
    # rank 0: 10 x 4 x 2 + 5 x 4 x 4 bytes; rank 1: 10 x 4 x 2 + 3 x 4 x 2
    assert summary["bytes_per_rank"] == [80 + 80, 80 + 24] and summary["bytes_total"] == 264
    assert summary["bytes_per_rank_analytic"] == [(10 + 5) * 4 * 2, (10 + 3) * 4 * 2]
    assert summary["bytes_total_analytic"] == 120 + 104
    assert summary["calls_per_step"] == [2.0, 3.0]  # 6 and 9 calls in 3 steps
    assert summary["exchanges"][0]["logits/forward"] == {
        "calls_per_step": 1.0, "sent_bytes_per_step": 80.0, "received_bytes_per_step": 0.0, "bytes_per_element": 4.0,
        "sent_bytes_per_step_analytic": 5 * 4 * 2}
    # tower 1 receives the logits and sends none: 4 bytes an element of those it received, none by the analytic table
    assert summary["exchanges"][1]["logits/forward"]["bytes_per_element"] == 4.0
    assert summary["exchanges"][1]["logits/forward"]["sent_bytes_per_step_analytic"] == 0
    assert summary["exchanges"][1]["fc8_input/forward"]["sent_bytes_per_step_analytic"] == 3 * 4 * 2


def test_the_two_gpu_projection_sends_the_busier_tower_s_bytes_and_overlaps_ddp_at_best_fully():
    """Per link: towers = the slower tower's compute + the busier tower's bytes / bandwidth + a
    start-up per collective; ddp serial = compute + all-reduce, overlapped = the larger of the two.
    The report's row: images/s and 'vs single' (single's step / the towers' step) from those."""
    config = run.BenchConfig(batch=16, links=("slow=0.001", "fast=1"), link_latency_us=100.0)
    runs = {run.RunKey("single", 16, "fp32", "contiguous"): _measured(16, 50.0, [50.0], ["cpu"]),
            run.RunKey("towers", 16, "fp32", "contiguous"): _measured(16, 45.0, [30.0, 32.0], ["cpu", "cpu"]),
            run.RunKey("ddp", 16, "fp32", "contiguous"): _measured(16, 60.0, [25.0, 24.0], ["cpu", "cpu"],
                                                                   buckets_per_step=[3, 3])}
    analytic = {"macs_per_image": {"single": 10, "towers": [6, 4]}, "towers_calls_per_step": 9, "ddp_buckets": 5,
                "towers_sent_elements_per_image": [{"a/forward": 100}, {"a/forward": 60, "b/backward": 50}],
                "ddp_bytes_per_rank": 40_000.0}
    projected = run.projection(runs, config, analytic)
    assert projected["towers_bytes_per_direction"] == 110 * 16 * 4  # tower 1's 60 + 50 elements, 16 images, fp32
    assert (projected["tower_compute_ms"], projected["ddp_compute_ms"]) == (32.0, 25.0)  # the slower rank's
    assert projected["ddp_calls"] == 3  # ddp's own buckets, not the analytic 5
    slow, fast = projected["links"]
    # 0.001 GB/s = 10^6 bytes/s: 7040 bytes in 7.04 ms, 9 collectives of 0.1 ms; ddp: 40 ms + 3 x 0.1 ms
    assert slow["towers_link_ms"] == pytest.approx(7.04 + 0.9) and slow["towers_ms"] == pytest.approx(32 + 7.94)
    assert slow["ddp_link_ms"] == pytest.approx(40.3) and slow["ddp_serial_ms"] == pytest.approx(25 + 40.3)
    assert slow["ddp_overlapped_ms"] == pytest.approx(40.3)  # the all-reduce outlasts the compute
    # 1 GB/s: 7040 bytes in 0.00704 ms; ddp 0.04 ms + 0.3 ms, well inside its 25 ms of compute
    assert fast["towers_ms"] == pytest.approx(32 + 0.00704 + 0.9) and fast["ddp_link_ms"] == pytest.approx(0.34)
    assert fast["ddp_overlapped_ms"] == pytest.approx(25.0)
    rows = [line for line in report.projection_lines({"projection": projected}) if line.startswith("| slow")
            or line.startswith("| fast")]
    # towers: 16 images / 39.94 ms = 400.6 images/s, single's 50 ms / 39.94 ms = 1.25x; ddp: 16 / 65.3 ms = 245.0
    assert rows[0] == "| slow | 0.001 | 7.94 | 39.9 | 400.6 | 1.25x | 40.30 | 65.3 / 40.3 | 245.0 |"
    # towers: 16 / 32.90704 ms = 486.2 images/s, 50 / 32.90704 = 1.52x; ddp: 16 / 25.34 ms = 631.4
    assert rows[1] == "| fast | 1 | 0.91 | 32.9 | 486.2 | 1.52x | 0.34 | 25.3 / 25.0 | 631.4 |"


def test_the_eight_gpu_projection_hides_each_all_reduce_behind_two_thirds_of_its_compute_and_names_the_faster():
    """4 replicas of the towers against 8 data-parallel ranks: compute per image from the single
    net's GPU step, a tower's share of it on a quarter of the batch, its exchanges on that quarter,
    and what each all-reduce takes beyond 2/3 of its compute (the backward); the faster by row."""
    config = run.BenchConfig(batch=32, links=("link=1", "other=9"), link_latency_us=10.0)  # 10^6 bytes per ms
    single = {"device": "cuda", "devices": ["cuda:0"], "step_ms": {"median": 64.0}}  # 2 ms per image
    analytic = {"macs_per_image": {"single": 1000, "towers": [600, 400]}, "num_params": 4_000_000,
                "tower_params": [1_500_000, 500_000], "towers_calls_per_step": 9, "tower_buckets": [2, 1],
                "ddp_buckets": 3}
    projected = run.mesh_projection({run.RunKey("single", 32, "fp32", "contiguous"): single}, config, analytic)
    assert (projected["link"], projected["per_image_ms"], projected["element_size"]) == ("link", 2.0, 4)
    assert projected["compute_source"] == "measured: the single mode's fp32 step on cuda:0, per image"
    # ring all-reduces: 2 x 3/4 x 4 bytes x the larger tower's 1.5 M; 2 x 7/8 x 4 bytes x 4 M
    assert projected["hybrid_gradient_bytes_per_rank"] == 9_000_000
    assert projected["ddp_gradient_bytes_per_rank"] == 28_000_000
    exchange_ms = lambda images: SENT_PER_IMAGE["tower0"][0] * images * 4 / 1e6 + 9 * 0.01  # tower 0 sends more
    rows = {row["batch"]: row for row in projected["rows"]}
    assert list(rows) == [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    # batch 32: a tower's 0.6 of 2 ms x 8 images; 9 ms + 2 buckets x 0.01 ms all-reduce, 6.4 ms of it hidden
    assert rows[32] == pytest.approx({
        "batch": 32, "hybrid_compute_ms": 9.6, "hybrid_exchange_ms": exchange_ms(8), "hybrid_allreduce_ms": 9.02,
        "hybrid_ms": 9.6 + exchange_ms(8) + (9.02 - 6.4), "ddp_compute_ms": 8.0, "ddp_allreduce_ms": 28.03,
        "ddp_ms": 8.0 + 28.03 - 2 / 3 * 8.0})
    # batch 64: the tower's all-reduce wholly behind 2/3 of its 19.2 ms
    assert rows[64]["hybrid_ms"] == pytest.approx(19.2 + exchange_ms(16))
    assert rows[8192]["ddp_ms"] == pytest.approx(2 * 8192 / 8)  # wholly hidden: compute alone
    # hybrid 0.3 b + 0.0596 b + 0.09 ms against ddp b / 12 + 28.03 ms: at 96, 34.61 against 36.03 ms; at 104,
    # 37.49 against 36.70
    assert projected["changes"] == [{"batch": 104, "from": "hybrid", "to": "ddp"}]
    assert projected["faster_at_the_largest"] == "ddp"
    lines = report.mesh_projection_lines({"mesh_projection": projected})
    assert "| 32 | 9.60 / 2.00 / 9.02 | 14.22 | 8.00 / 28.03 | 30.70 | hybrid |" in lines
    assert "| 8192 | 2457.60 / 488.53 / 9.02 | 2946.13 | 2048.00 / 28.03 | 2048.00 | data parallel |" in lines
    assert lines[-1] == "- From a global batch of **104** on, data parallel is faster (hybrid below it)."


@pytest.mark.parametrize("device", ["cpu", None])
def test_the_eight_gpu_projection_assumes_an_h100_s_bf16_where_no_gpu_was_measured(device):
    """A single step on the CPU (or none) says nothing of a GPU's: 40 % of an H100's dense bf16
    peak (989.4 TFLOP/s) per image, and the exchanges in bf16, 2 bytes an element."""
    config = run.BenchConfig(batch=32, links=("link=1",), link_latency_us=0.0)
    runs = {} if device is None else {
        run.RunKey("single", 32, "fp32", "contiguous"): {"device": device, "devices": [device],
                                                         "step_ms": {"median": 64.0}}}
    analytic = {"macs_per_image": {"single": 1000, "towers": [600, 400]}, "num_params": 4, "tower_params": [3, 1],
                "towers_calls_per_step": 9, "tower_buckets": [2, 1], "ddp_buckets": 3}
    projected = run.mesh_projection(runs, config, analytic)
    per_image_ms = 6 * 1000 / (989.4e12 * 0.4) * 1e3  # 6 training FLOPs per MAC
    assert projected["per_image_ms"] == pytest.approx(per_image_ms) and projected["element_size"] == 2
    assert projected["compute_source"] == ("assumed, no GPU measured: H100 at 40 % of its dense bf16 peak "
                                           "(989.4 TFLOP/s), bf16 activations")
    assert projected["rows"][0]["hybrid_exchange_ms"] == pytest.approx(SENT_PER_IMAGE["tower0"][0] * 8 * 2 / 1e6)


def _run(results, mode, batch=2, precision="fp32", memory_format="contiguous", compiled=False):
    key = (mode, batch, precision, memory_format, compiled)
    matches = [r for r in results["runs"]
               if (r["mode"], r["batch"], r["precision"], r["memory_format"], r["compiled"]) == key]
    assert len(matches) == 1, key
    return matches[0]


@pytest.mark.slow  # the real results
@pytest.mark.parametrize("edit, why", [
    ("a word for a number", ""), ("a zero count", ""),
    ("a NaN step", "ValueError: runs[0].step_ms.median is nan, not a number a benchmark measures"),
    ("an infinite rate", "ValueError: runs[0].images_per_s is inf, not a number a benchmark measures"),
    ("a negative rate", "ValueError: runs[0].images_per_s is -5, not a number a benchmark measures"),
    ("a batch too large for a float", "ValueError: runs[0].batch is an integer of 401 digits, not a number a "
                                      "benchmark measures"),
    ("an unknown mode", "ValueError: runs[0].mode is 'bogus', not one of single, towers, ddp, hybrid, torchvision"),
    ("an infinite all-reduce", "ValueError: runs[0].comm_ms[0] is inf, not a number a benchmark measures")])
def test_a_hand_edited_results_json_is_refused_in_one_line(tiny_run, tmp_path, capsys, edit, why):
    """Not drawn as it stands: a NaN, infinite or negative number printed as measured (a traceback from the
    charts for one too large), a run of an unknown mode shown as not measured where 'Not measured' said
    everything was."""
    results = json.loads((tiny_run[0] / "results.json").read_text())
    run0 = results["runs"][0]
    if edit == "a word for a number":
        run0["images_per_s"] = "fast"
    elif edit == "a zero count":
        results["loader"]["by_workers"][0]["batches"] = 0
    elif edit == "a NaN step":
        run0["step_ms"]["median"] = float("nan")
    elif edit in ("an infinite rate", "a negative rate"):
        run0["images_per_s"] = float("inf") if edit == "an infinite rate" else -5.0
    elif edit == "a batch too large for a float":
        run0["batch"] = 10 ** 400
    elif edit == "an infinite all-reduce":
        run0["comm_ms"] = [float("inf")]
    else:
        run0["mode"] = "bogus"
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit) as exit:
        report.main([str(tmp_path)])
    message = capsys.readouterr().err
    assert exit.value.code == 2 and len(message.strip().splitlines()) == 1, message
    assert message.startswith(f"error: {tmp_path / 'results.json'} is not what python -m benchmarks.run writes (")
    assert why in message and [p.name for p in tmp_path.iterdir()] == ["results.json"], message


def test_report_refuses_an_empty_folder_name(tmp_path, monkeypatch, capsys):
    """"" (an unset variable) read the current folder's results.json, and wrote the report there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exit:
        report.main([""])
    assert exit.value.code == 2 and capsys.readouterr().err.startswith("error: FOLDER is empty: give a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.slow  # the real results
def test_a_ddp_all_reduce_that_added_less_than_nothing_is_drawn(tiny_run, tmp_path):
    """DDP's all-reduce hidden in the backward: the step's median less the compute's falls below
    zero by noise, as benchmarks.run writes it."""
    results = json.loads((tiny_run[0] / "results.json").read_text())
    next(r for r in results["runs"] if r["mode"] == "ddp")["comm_ms"] = [-0.4, 0.3]
    (tmp_path / "results.json").write_text(json.dumps(results))
    report.main([str(tmp_path)])
    assert "-0.4" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_report_has_every_part(tiny_run):
    out, results = tiny_run
    report = (out / "report.md").read_text()
    for section in ("Machine and software", "Configuration", "Main table", "How each number is taken",
                    "Towers: traffic per exchange", "Batch-size sweep", "Precision and memory format",
                    "Projection to a two-GPU machine", "Data loader", "Hybrid: replicas of the towers",
                    "Projection to eight GPUs: replicas of the towers or data parallel",
                    "The training program against the synthetic step", "Speed goals", "Not measured"):
        assert f"## {section}\n" in report, section
    main = report.split("## Main table\n", 1)[1].split("\n## ", 1)[0]
    assert "| mode | device" in main and "images/s" in main and "% of peak" in main
    for mode in ("single", "towers", "ddp", "hybrid", "torchvision"):
        row = next(line for line in main.splitlines() if line.startswith(f"| {mode} |"))
        assert "not measured" not in row, row
        r = _run(results, mode)
        assert f" | {r['images_per_s']:.1f} | {r['step_ms']['median']:.1f} [{r['step_ms']['p10']:.1f}, " \
               f"{r['step_ms']['p90']:.1f}] | " in row, row  # the median step, its 10th and 90th percentiles
        # the compute column: the step less its exchanges, but for hybrid, whose exchanges are in it
        assert ("(the `no_sync` step, exchanges in it)" in row) == (mode == "hybrid"), row
    assert "crossover" in report.lower() and "PROJECTION" in report
    for chart in ("images_per_s_vs_batch.png", "bytes_per_step_vs_batch.png"):
        path = out / chart
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(path).shape[:2]
        assert height > 100 and width > 100
        assert f"]({chart})" in report


@pytest.mark.slow
def test_the_loader_is_measured_by_workers(tiny_run):
    out, results = tiny_run
    loader = results["loader"]
    assert [w["workers"] for w in loader["by_workers"]] == [0, 2]
    assert all(w["images_per_s"] > 0 and w["batches"] == 2 and w["batch"] == 2 for w in loader["by_workers"])
    assert loader["augment_ms_per_batch"] > 0 and loader["device"] == "cpu"
    assert loader["float32_bytes_per_image"] - 8 == 4 * (loader["input_bytes_per_image"] - 8)  # uint8: a quarter
    section = (out / "report.md").read_text().split("## Data loader\n", 1)[1].split("\n## ", 1)[0]
    assert "| workers | images/s | ms per batch |" in section and "| 2 |" in section


@pytest.mark.slow
def test_the_training_program_is_timed_from_its_own_steps(tiny_run):
    out, results = tiny_run
    [towers] = results["program"]
    assert "failed" not in towers, towers
    assert towers["mode"] == "towers" and towers["batch"] == 2 and towers["device"] == "cpu"
    assert towers["timed_steps"] == 2 and towers["warmup_steps"] == 1  # --steps after --warmup
    assert towers["images_per_s"] == pytest.approx(1000 * 2 / towers["median_step_ms"])
    assert 0 < towers["median_input_ms"] < towers["median_step_ms"]  # part of the step: 0 workers, loaded in rank 0
    assert towers["input_bytes_per_step"] == 8 + 2 * 3 * 224 * 224 + 2 * 8  # uint8 crops and labels
    assert towers["paper_training_hours"] == pytest.approx(90 * 1_281_167 / towers["images_per_s"] / 3600)
    section = (out / "report.md").read_text().split("## The training program against the synthetic step\n", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| towers | 2 |"))
    synthetic = next(r for r in results["runs"] if (r["mode"], r["batch"], r["precision"], r["memory_format"]) ==
                     ("towers", 2, "fp32", "contiguous"))
    assert f"| {towers['median_step_ms']:.1f} ({towers['median_input_ms']:.1f}) | {synthetic['images_per_s']:.1f} | " \
           f"{100 * towers['images_per_s'] / synthetic['images_per_s']:.0f} % |" in row
    assert "python -m launch.two_gpu --layout towers --batch-size 2 --max-steps 3" in section


@pytest.mark.slow
def test_the_speed_goals_are_checked_against_the_runs(tiny_run):
    out, results = tiny_run
    section = (out / "report.md").read_text().split("## Speed goals\n", 1)[1].split("\n## ", 1)[0]
    single, torchvision = _run(results, "single"), _run(results, "torchvision")
    ratio = single["images_per_s"] / torchvision["images_per_s"]
    row = next(line for line in section.splitlines() if line.startswith("| 2 | fp32, contiguous |"))
    assert row.endswith(f"| {ratio:.2f} | {'met' if ratio >= 1 else '**not met**'} |"), row
    [program] = results["program"]
    share = program["images_per_s"] / _run(results, "towers")["images_per_s"]
    assert f"- towers: {100 * share:.0f} % (" in section
    assert "no bf16 run on a GPU" in section  # a CPU has no peak to reach


@pytest.mark.slow
def test_compiled_runs_are_timed_and_reported_apart(tiny_run):
    out, results = tiny_run
    compiled = _run(results, "single", 2, "bf16", "channels_last", True)
    assert compiled["images_per_s"] > 0 and compiled["bytes_per_rank"] == [0]
    section = (out / "report.md").read_text().split("## Precision and memory format\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| single | bf16 | channels_last | yes |"))
    assert f"| {compiled['images_per_s']:.1f} |" in row
    main = (out / "report.md").read_text().split("## Main table\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in main.splitlines() if line.startswith("| single |"))
    assert f"| 2 | {_run(results, 'single')['images_per_s']:.1f} |" in row  # the main table stays eager


def test_compiled_runs_need_a_warm_up_step_and_a_backend_that_exists(tmp_path):
    with pytest.raises(ValueError, match="--compile-modes needs --warmup 1 or more"):
        run.main(["--device", "cpu", "--compile-modes", "single", "--warmup", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--compile-backend turbo: torch.compile's backends that this program runs"):
        run.main(["--device", "cpu", "--compile-modes", "single", "--compile-backend", "turbo", "--out", str(tmp_path)])
    from torch._inductor import config as inductor_config
    with inductor_config.patch({"cpp.cxx": (None, "no-such-g++")}), \
            pytest.raises(ValueError, match="--compile-backend inductor: on the CPU it builds its kernels with a C"):
        run.main(["--device", "cpu", "--compile-modes", "single", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_steady_rate_leaves_out_the_warm_up():
    records = [{"event": "train", "step": s, "step_ms": ms, "input_ms": ms / 10}
               for s, ms in enumerate([900, 100, 120, 80, 300], 1)]
    rate = program.steady_rate(records + [{"event": "eval", "step": 5}], batch=4, warmup=1)
    assert rate["timed_steps"] == 4 and rate["median_step_ms"] == 110 and rate["mean_step_ms"] == 150
    assert rate["median_input_ms"] == 11  # of the timed steps only
    assert rate["images_per_s"] == pytest.approx(4000 / 110) and rate["mean_images_per_s"] == pytest.approx(4000 / 150)
    with pytest.raises(ValueError, match="no training step after the 5 warm-up steps"):
        program.steady_rate(records, batch=4, warmup=5)
    assert program.paper_training_hours(1_281_167 * 90 / 3600) == pytest.approx(1.0)


def test_a_program_run_s_command_is_one_to_paste_into_a_shell(monkeypatch):
    """The command of a program run, which the report prints to be run again: a --data whose
    name holds a space is quoted (it was joined as two words), and read back as one."""
    monkeypatch.setattr(program, "run_child", lambda argv, timeout_s, **popen: subprocess.CompletedProcess(
        argv, 2, "", "error: not run here\n"))
    refused, = program.measure_program(("towers",), 2, 5, 2, {"towers": "cpu"}, "/data/my images", None, "split", 60)
    assert refused["failed"] == "exit 2: error: not run here"
    words = shlex.split(refused["command"])
    assert words[0] == "launch.two_gpu" and words[words.index("--data") + 1] == "/data/my images"
    results = {"config": {"fc8_placement": "split"}}
    assert report._program_differs(results, refused) is None
    results["config"]["fc8_placement"] = "tower0"
    assert report._program_differs(results, refused) == ("the program ran with FC8 split, the synthetic towers with "
                                                         "FC8 tower0")


def test_the_augmentation_s_time_is_the_median_of_its_timed_repeats(monkeypatch):
    """Cut to an even number of repeats by the --time-limit, the median is halfway between the
    middle two (it was the upper one)."""
    from types import SimpleNamespace
    from benchmarks import loader as loader_module
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # the warm-up's 5 s, then repeats of 1 s and 3 s
    monkeypatch.setattr(loader_module.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(data_module, "augment", lambda crops, choices, stats: crops)
    assert loader_module._augment_ms(SimpleNamespace(stats=None), 2, torch.device("cpu"), repeats=2) == 2000.0


def test_a_program_run_that_ends_within_the_warm_up_is_recorded_as_failed(monkeypatch):
    """On a small data set the program's recipe may end the run before --warmup + --steps:
    that run is recorded as failed, with the fix, and the benchmark goes on."""
    def ended_early(argv, timeout_s, **popen):
        run_dir = Path(argv[argv.index("--out") + 1]) / "run"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"event": "train", "step": step, "step_ms": 100.0, "input_ms": 1.0}) + "\n" for step in (1, 2, 3)))
        (run_dir / "summary.json").write_text(json.dumps({"steps": 3, "device": "cpu", "data": "tiny", "workers": 0,
                                                          "input_bytes_per_step": 8}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(program, "run_child", ended_early)
    ended, = program.measure_program(("single",), 2, 5, 3, {"single": "cpu"}, None, 0, "tower0", 60)
    assert ended["failed"] == ("it ended after 3 steps (its recipe's last for this data), within the 3 warm-up steps: "
                               "give a smaller --warmup, or --loader-data with more images")
    timed, = program.measure_program(("single",), 2, 5, 2, {"single": "cpu"}, None, 0, "tower0", 60)
    assert "failed" not in timed and timed["timed_steps"] == 1


def test_the_program_s_towers_run_with_the_benchmark_s_fc8_placement(tiny_data, tmp_path, monkeypatch):
    """The program's towers are held against the synthetic towers, which ran with --fc8-placement:
    the program gets it too; a program run of another placement (a results.json of a benchmark
    that did not pass it on) is held against nothing, and no speed goal is checked on it."""
    started = []

    def refused(argv, timeout_s, **popen):  # the commands, not the runs
        started.append(" ".join(argv))
        return subprocess.CompletedProcess(argv, 2, "", "error: not run here\n")

    monkeypatch.setattr(program, "run_child", refused)
    monkeypatch.setattr(run.Bench, "measure", lambda bench, keys, folder: None)
    monkeypatch.setattr(run, "measure_loader", lambda *args: {"skipped": "not measured here"})
    run.main(["--device", "cpu", "--quick", "--batch", "2", "--fc8-placement", "split", "--loader-data",
              str(tiny_data), "--out", str(tmp_path / "report")])
    towers, single = started
    assert "--layout towers" in towers and "--fc8-placement split" in towers
    assert "--layout single" in single and "--fc8-placement" not in single  # the single net has FC8 whole

    towers_run = {"mode": "towers", "batch": 2, "precision": "fp32", "memory_format": "contiguous",
                  "images_per_s": 10.0, "peak": None}
    ran = {"mode": "towers", "batch": 2, "command": "launch.two_gpu --layout towers --batch-size 2", "device": "cpu",
           "workers": 0, "timed_steps": 2, "images_per_s": 9.0, "mean_images_per_s": 9.0, "median_step_ms": 222.2,
           "paper_training_hours": 3559.0, "data": "tiny"}
    results = {"config": {"fc8_placement": "split", "batch": 2, "modes": ["towers"]}, "runs": [towers_run],
               "program": [ran],
               "analytic": {"macs_per_image": {"single": 2, "torchvision": 1}}}
    why = "the program ran with FC8 tower0, the synthetic towers with FC8 split"
    assert f"- towers: not held against the synthetic step: {why}" in report.program_lines(results)
    assert f"- towers: not checked: {why}" in report.speed_goal_lines(results)
    ran["command"] += " --fc8-placement split"
    assert "- towers: 90 % (9.0 against 10.0 images/s): met" in report.speed_goal_lines(results)
    # a layout that --modes left out of the main table: said so, not left out without a word
    results["program"].append({**ran, "mode": "single", "command": "launch.two_gpu --layout single --batch-size 2"})
    why = "no synthetic single run at batch 2 in the main table (--modes)"
    assert f"- single: not held against the synthetic step: {why}" in report.program_lines(results)
    assert f"- single: not checked: {why}" in report.speed_goal_lines(results)
    results["config"]["modes"].append("single")  # asked for, and not measured (skipped, failed, cut short)
    assert "- single: not checked: no synthetic single run at batch 2 in the main table (see 'Not measured')" \
        in report.speed_goal_lines(results)


def test_the_main_table_says_where_a_modes_ranks_took_turns_on_fewer_cores():
    """Hybrid's 4 ranks on a 2-core CPU: its figures (the all-reduce adding more than it takes
    alone, none of it hidden) were the ranks taking turns, unsaid beside '1 / 1 / 1 / 1 threads'."""
    committed = CPU_REPORT / "results.json"
    results = json.loads(committed.read_text())
    assert results["machine"]["cpu_count"] == 2 and "usable_cores" not in results["machine"]  # an older results.json
    note = ("- hybrid: its 4 ranks took turns on 2 cores (more processes than cores, a thread each): its figures "
            "hold that as well as the mode's own cost")
    assert [line for line in report.main_table(results) if line.startswith("- ")] == [note]
    results["machine"]["usable_cores"] = 4
    assert not [line for line in report.main_table(results) if line.startswith("- ")]


def test_runs_are_planned_fp32_before_bf16_with_the_single_net_at_half_the_batch_before_the_sweep():
    """The bf16 slowdown check holds a bf16 run against its fp32 one, measured first whatever
    order --precisions gives; the projection's ddp compute is the single net at half the batch,
    planned after the precision sweep and before the batch sweep; a run planned twice runs once."""
    config = run.BenchConfig(modes=("single", "towers"), batch=8, batches=(16, 2), sweep_modes=("single", "towers"),
                             precisions=("bf16", "fp32"), memory_formats=("contiguous", "channels_last"),
                             precision_modes=("towers",), compile_modes=("single",))
    key = lambda mode, batch, precision="fp32", memory_format="contiguous", compiled=False: run.RunKey(
        mode, batch, precision, memory_format, compiled)
    assert run.plan_runs(config) == [
        key("single", 8), key("towers", 8),  # the main table
        key("towers", 8, "fp32", "channels_last"), key("towers", 8, "bf16"), key("towers", 8, "bf16", "channels_last"),
        key("single", 4),  # half of batch 8
        key("single", 2), key("towers", 2), key("single", 16), key("towers", 16),  # the sweep, smaller batch first
        key("single", 8, compiled=True), key("single", 8, "fp32", "channels_last", True),
        key("single", 8, "bf16", compiled=True), key("single", 8, "bf16", "channels_last", True)]
    # no half batch without the single net in the main table, nor of an odd batch
    assert key("single", 4) not in run.plan_runs(dataclasses.replace(config, modes=("towers",)))
    odd = run.plan_runs(dataclasses.replace(config, batch=9, batches=(16,)))
    assert [k for k in odd if k.mode == "single" and not k.compiled] == [key("single", 9), key("single", 16)]


def test_the_batch_sweep_shows_the_batches_asked_for_not_the_projections_half_batch():
    """--batch 4 --batches 4: the single net's run at batch 2, which the projection takes its
    data-parallel compute from, was a row of the sweep and a point of its chart."""
    runs = [{"mode": mode, "batch": batch, "precision": "fp32", "memory_format": "contiguous", "images_per_s": 5.0,
             "step_ms": {"median": 400.0}, "bytes_total": 1e6, "bytes_total_analytic": 1e6}
            for mode, batch in (("single", 2), ("single", 4), ("towers", 4))]
    lines = report.sweep_tables({"config": {"batch": 4, "batches": [4]}, "runs": runs})
    rows = [line.split(" |")[0] for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 4"] * 2  # images/s, bytes


def test_the_program_s_towers_run_where_the_synthetic_towers_ran(tiny_data, tmp_path, monkeypatch):
    """With one GPU and --one-gpu-two-rank cpu the synthetic towers ran on the CPU: the program's
    towers, held against them, do too (--backend gloo); its single net runs on the GPU, as the
    synthetic single did."""
    started = []

    def refused(argv, timeout_s, **popen):  # the commands, not the runs
        started.append(" ".join(argv))
        return subprocess.CompletedProcess(argv, 2, "", "error: not run here\n")

    monkeypatch.setattr(program, "run_child", refused)
    monkeypatch.setattr(run, "plan_devices", lambda config: run.DevicePlan("cuda", "cpu", "gloo", "a GPU", "one GPU"))
    monkeypatch.setattr(run.Bench, "measure", lambda bench, keys, folder: None)
    monkeypatch.setattr(run, "measure_loader", lambda *args: {"skipped": "not measured here"})
    run.main(["--quick", "--batch", "2", "--one-gpu-two-rank", "cpu", "--loader-data", str(tiny_data), "--out",
              str(tmp_path / "report")])
    towers, single = started
    assert "--layout towers" in towers and "--backend gloo" in towers
    assert "--layout single" in single and "--backend" not in single


@pytest.mark.slow
def test_results_hold_every_run_and_field(tiny_run):
    _, results = tiny_run
    for key in ("machine", "config", "command", "analytic", "runs", "not_measured", "projection", "elapsed_s"):
        assert key in results, key
    assert results["not_measured"] == []
    fields = ("step_ms", "images_per_s", "comm_ms", "compute_ms", "bytes_per_rank", "bytes_per_rank_analytic",
              "bytes_total", "bytes_total_analytic", "peak_memory_bytes", "param_bytes", "flops_per_step",
              "gflop_per_s", "threads")
    for mode in ("single", "towers", "ddp", "hybrid", "torchvision"):
        r = _run(results, mode)
        assert all(f in r for f in fields), mode
        assert len(r["step_ms_raw"]) == 2 and r["images_per_s"] > 0 and r["gflop_per_s"] > 0
        assert r["step_ms"]["p10"] <= r["step_ms"]["median"] <= r["step_ms"]["p90"]
        assert all(m > 0 for m in r["peak_memory_bytes"])
        assert all(math.isfinite(c) for c in r["compute_ms"])
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["step_ms"]["median"] / 1e3)), mode  # the median's
        # the ranks of a run share the cores this benchmark may use: a single-device run has them all
        ranks = {"towers": 2, "ddp": 2, "hybrid": 4}.get(mode, 1)
        assert r["threads"] == [max(1, usable_cores() // ranks)] * ranks, mode
    assert _run(results, "towers", 4)["batch"] == 4 and _run(results, "towers", 2, "bf16", "channels_last")
    # the towers hold the reference's parameters between them, tower 0 with FC8
    single, towers = _run(results, "single"), _run(results, "towers")
    assert single["batch"] == towers["batch"] and single["flops_per_step"] == towers["flops_per_step"]  # both towers'
    assert single["param_bytes"] == [PARAMS * 4] and sum(towers["param_bytes"]) == PARAMS * 4
    assert towers["param_bytes"][0] - towers["param_bytes"][1] == (4096 * 1000 + 1000) * 4
    assert {link["link"] for link in results["projection"]["links"]} == {"nvlink", "pcie4"}


@pytest.mark.slow
@pytest.mark.parametrize("batch", [2, 4])
def test_towers_traffic_is_exactly_the_analytic_figure(tiny_run, batch):
    _, results = tiny_run
    towers = _run(results, "towers", batch)
    assert towers["bytes_per_rank"] == towers["bytes_per_rank_analytic"]
    assert towers["bytes_per_rank"] == [4 * batch * n for n in SENT_PER_IMAGE["tower0"]]
    assert towers["bytes_total"] == towers["bytes_total_analytic"]
    for exchanges in towers["exchanges"]:
        for key, e in exchanges.items():
            assert e["sent_bytes_per_step"] == e["sent_bytes_per_step_analytic"], key
            assert e["calls_per_step"] == 1, key


def test_a_data_parallel_rank_takes_its_own_part_of_the_global_batch():
    """ddp's and hybrid's replicas each train on their part of the global batch: together, the whole."""
    images, labels = torch.rand(4, 3, 8, 8), torch.arange(4)
    parts = [workers._share(images, labels, index, 2, "channels_last") for index in range(2)]
    assert [part_labels.tolist() for _, part_labels in parts] == [[0, 1], [2, 3]]
    assert torch.equal(torch.cat([part for part, _ in parts]), images)
    assert all(part.is_contiguous(memory_format=torch.channels_last) for part, _ in parts)


@pytest.mark.parametrize("placement", FC8_PLACEMENTS)
def test_the_all_reduces_of_a_step_are_ddps_own_buckets(placement):
    """As DistributedDataParallel assigns the gradients to buckets (its own function, on meta
    tensors): the reference's and each tower's, whose FC6 and FC7 fill one each."""
    assert traffic.DDP_FIRST_BUCKET_BYTES == torch.distributed._DEFAULT_FIRST_BUCKET_BYTES  # DDP's, as it reads it
    with torch.device("meta"):
        reference = AlexNet(1000)
    shards = [shard_state_dict(reference.state_dict(), r, placement).values() for r in range(2)]
    for params in ([p for p in reference.parameters()], *map(list, shards)):
        buckets, _ = torch.distributed._compute_bucket_assignment_by_size(
            list(reversed(params)), [traffic.DDP_FIRST_BUCKET_BYTES, traffic.DDP_BUCKET_CAP_BYTES])
        assert traffic.ddp_buckets([p.numel() for p in params]) == len(buckets)
    for sizes in ([1, 2 ** 18], [2 ** 18 - 1, 1, 2 ** 18]):  # a bucket filled exactly to its limit closes
        with torch.device("meta"):
            params = [torch.empty(n) for n in sizes]
        buckets, _ = torch.distributed._compute_bucket_assignment_by_size(
            list(reversed(params)), [traffic.DDP_FIRST_BUCKET_BYTES, traffic.DDP_BUCKET_CAP_BYTES])
        assert traffic.ddp_buckets(sizes) == len(buckets), sizes


def test_a_ddp_step_counts_its_own_buckets_not_ddps_first_guess(group_of_one):
    """DDP all-reduces its first step in the buckets of its first guess and rebuilds them after
    it, as the gradients became ready: the harness counts the buckets of the latest step, so a
    run timed from the first step (--warmup 0) reports the steady count, not a fraction."""
    from torch.nn.parallel import DistributedDataParallel
    from benchmarks.workers import AllReduceCounter, counting_allreduce_hook
    torch.manual_seed(0)
    model = DistributedDataParallel(AlexNet(10))
    counter = AllReduceCounter()
    model.register_comm_hook(counter, counting_allreduce_hook)
    counts = []
    for _ in range(3):
        model(torch.randn(1, 3, 224, 224)).sum().backward()
        counts.append(counter.buckets)
    assert counts[0] != counts[1] == counts[2] == traffic.ddp_buckets([p.numel() for p in model.parameters()]), counts
    assert counter.payload_bytes == 3 * 4 * sum(p.numel() for p in model.parameters())  # every gradient, each step


class _FakeClock:
    """time.perf_counter for the workers and the ExchangeLog: it moves only when a stub step moves it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _StubTower(torch.nn.Module):
    """A tower's stand-in for the workers: one small layer and a real ExchangeLog."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.exchange_log = ExchangeLog()

    def forward(self, images):
        return self.linear(images)


def _stub_steps(monkeypatch, model, step) -> list:
    """A worker's steps on ``model`` (4 inputs, 3 classes), on a fake clock: train_step calls
    ``step(call, model, images, clock)`` (call counts from 1) and appends what it returns to
    the list returned, in the order of the calls; its loss is the call's number."""
    clock, timeline = _FakeClock(), []
    fake_time = type("FakeTime", (), {"perf_counter": staticmethod(clock.perf_counter)})
    monkeypatch.setattr(workers, "time", fake_time)
    monkeypatch.setattr(exchange_module, "time", fake_time)  # the ExchangeLog's own clock
    monkeypatch.setattr(workers, "_load", lambda *args: model)
    monkeypatch.setattr(workers, "synthetic_batch",
                        lambda batch, *args: (torch.rand(batch, 4), torch.randint(0, 3, (batch,))))

    def train_step(model, optimizer, images, labels, autocast_dtype=None):
        timeline.append(step(len(timeline) + 1, model, images, clock))
        return StepResult(torch.tensor(float(len(timeline))), torch.tensor(0))
    monkeypatch.setattr(workers, "train_step", train_step)
    return timeline


def _worker_spec(mode: str, warmup: int, steps: int, **changes) -> dict:
    """run_spec's spec of a CPU run of ``mode`` at batch 4 (weights never read: _load is stubbed)."""
    config = run.BenchConfig(device="cpu", warmup=warmup, steps=steps)
    weights = {"reference_path": "unused", "shard_paths": ["unused", "unused"]}
    return {**run.run_spec(run.RunKey(mode, 4, "fp32", "contiguous"), config, CPU_PLAN, weights), **changes}


def _advance(call, model, images, clock):
    """A step that takes ``call`` seconds."""
    clock.now += call
    return call


@pytest.mark.parametrize("warmup, timed_calls", [(2, [3, 4, 5]), (0, [1, 2, 3])])
def test_a_single_run_times_its_steps_after_its_untimed_warmup_steps(monkeypatch, warmup, timed_calls):
    """--warmup steps run first and untimed; then --steps steps, each timed on its own."""
    calls = _stub_steps(monkeypatch, torch.nn.Linear(4, 3), _advance)
    result = workers.single_worker(0, _worker_spec("single", warmup, steps=3))
    assert calls == list(range(1, warmup + 4))  # warm-up and timed steps, nothing else
    assert result["step_s"] == timed_calls  # call k takes k seconds: the calls after the warm-up's
    assert result["final_loss"] == warmup + 3  # the last timed step's


def _count_all_reduces(monkeypatch) -> list:
    """Wraps the all-reduce that workers.counting_allreduce_hook hands each bucket to; returns
    the list it appends each bucket's size to."""
    all_reduced, allreduce_hook = [], workers.default_hooks.allreduce_hook

    def counted(group, bucket):
        all_reduced.append(bucket.buffer().numel())
        return allreduce_hook(group, bucket)
    monkeypatch.setattr(workers, "default_hooks", type("Hooks", (), {"allreduce_hook": staticmethod(counted)}))
    return all_reduced


def test_ddp_times_its_no_sync_steps_apart_after_the_timed_steps_and_all_reduces_nothing_in_them(
        monkeypatch, group_of_one):
    """ddp: --warmup untimed steps, --steps timed steps that all-reduce, then one untimed and
    --steps timed steps under no_sync() (compute only): nothing all-reduced in those."""
    all_reduced = _count_all_reduces(monkeypatch)

    def step(call, model, images, clock):  # a real backward through DDP; call k takes k seconds
        before = len(all_reduced)
        model(images).sum().backward()
        clock.now += call
        return call, model.require_backward_grad_sync, len(all_reduced) - before
    calls = _stub_steps(monkeypatch, torch.nn.Linear(4, 3), step)
    result = workers.ddp_worker(0, _worker_spec("ddp", warmup=2, steps=3))
    # 2 warm-ups, 3 timed, 1 no_sync warm-up, 3 no_sync timed; the Linear's 15 gradients fill one bucket
    assert calls == [(k, True, 1) for k in range(1, 6)] + [(k, False, 0) for k in range(6, 10)]
    assert result["step_s"] == [3, 4, 5] and result["compute_only_s"] == [7, 8, 9]  # call k takes k seconds
    assert result["payload_bytes"] == 3 * 15 * 4 and result["buckets"] == 1  # the timed steps' fp32 gradients
    assert result["final_loss"] == 5  # the last timed step's, not a no_sync step's
    assert len(result["allreduce_alone_s"]) == 3


def _exchanging_step(call, model, images, clock):
    """A tower's step on the fake clock: call k computes for k seconds, then sends 2 fp32 elements
    in an exchange of k/4 seconds, recorded by the tower's ExchangeLog as the towers' collectives are."""
    tower = getattr(model, "module", model)  # under DistributedDataParallel in hybrid
    clock.now += call
    sent = torch.zeros(2)
    started = tower.exchange_log.clock(sent)
    clock.now += call / 4
    tower.exchange_log.record("conv3_input", "forward", sent, None, started)
    return call, tower.exchange_log.synchronize


def test_a_towers_run_on_the_cpu_times_its_exchanges_within_its_timed_steps_after_the_warmup(
        monkeypatch, group_of_one):
    """towers where the collectives block (the CPU's): comm_s is what each timed step's exchanges
    took, by the ExchangeLog, comm_step_s the timed steps themselves; the bytes and calls are the
    timed steps' alone, not the warm-up's."""
    tower = _StubTower()
    calls = _stub_steps(monkeypatch, tower, _exchanging_step)
    result = workers.towers_worker(0, _worker_spec("towers", warmup=2, steps=3))
    assert calls == [(k, False) for k in range(1, 6)]  # 2 warm-ups, 3 timed steps, none that waits on the device
    assert result["step_s"] == result["comm_step_s"] == [3.75, 5.0, 6.25]  # calls 3 to 5: k + k/4 seconds
    assert result["comm_s"] == [0.75, 1.0, 1.25]  # their exchanges: k/4 seconds
    assert (result["sent_bytes"], result["received_bytes"], result["calls"]) == (3 * 2 * 4, 0, 3)
    assert result["exchanges"]["conv3_input/forward"]["calls"] == 3 and result["final_loss"] == 5


def test_a_towers_run_whose_exchanges_need_the_device_waited_for_times_them_in_steps_of_their_own(
        monkeypatch, group_of_one):
    """With spec["exchange_steps"] (a GPU's), the exchanges are timed in --steps further steps with
    the ExchangeLog waiting for the device (synchronize), which it stops doing after them: comm_s and
    comm_step_s come from those, step_s, the bytes and the loss from the timed steps before them."""
    tower = _StubTower()
    calls = _stub_steps(monkeypatch, tower, _exchanging_step)
    result = workers.towers_worker(0, _worker_spec("towers", warmup=2, steps=3, exchange_steps=True))
    # 2 warm-ups and 3 timed steps as on the CPU, then 3 steps that wait on the device around each exchange
    assert calls == [(k, False) for k in range(1, 6)] + [(k, True) for k in range(6, 9)]
    assert tower.exchange_log.synchronize is False
    assert result["step_s"] == [3.75, 5.0, 6.25]  # calls 3 to 5: k + k/4 seconds
    assert result["comm_step_s"] == [7.5, 8.75, 10.0] and result["comm_s"] == [1.5, 1.75, 2.0]  # calls 6 to 8
    assert (result["sent_bytes"], result["calls"], result["final_loss"]) == (3 * 2 * 4, 3, 5)


@pytest.mark.parametrize("exchange_steps, waited_calls, comm_s", [
    (False, [], [0.75, 1.0, 1.25]),  # the timed steps' exchanges (calls 3 to 5: k/4 seconds)
    (True, [10, 11, 12], [2.5, 2.75, 3.0]),  # those of 3 no_sync steps after the compute's, waiting on the device
])
def test_a_hybrid_run_times_its_exchanges_and_its_no_sync_compute_apart_from_its_all_reducing_steps(
        monkeypatch, group_of_one, exchange_steps, waited_calls, comm_s):
    """hybrid (one replica of the towers, here): --warmup untimed steps, --steps timed steps that
    all-reduce and exchange, then one untimed and --steps timed no_sync steps (nothing all-reduced);
    with spec["exchange_steps"], --steps no_sync steps more that time the exchanges."""
    all_reduced = _count_all_reduces(monkeypatch)
    monkeypatch.setattr(workers, "build_mesh", lambda towers, timeout_s: Mesh(1, towers, 0, 0, group_of_one,
                                                                              group_of_one))

    def step(call, model, images, clock):  # a real backward through DDP, then _exchanging_step's
        before = len(all_reduced)
        model(images).sum().backward()
        _, synchronize = _exchanging_step(call, model, images, clock)
        return call, model.require_backward_grad_sync, len(all_reduced) - before, synchronize
    calls = _stub_steps(monkeypatch, _StubTower(), step)
    result = workers.hybrid_worker(0, _worker_spec("hybrid", warmup=2, steps=3, exchange_steps=exchange_steps))
    # 2 warm-ups and 3 timed steps all-reduce the Linear's 15 gradients in one bucket; 1 + 3 no_sync steps do not
    assert calls == [(k, True, 1, False) for k in range(1, 6)] + [(k, False, 0, False) for k in range(6, 10)] + [
        (k, False, 0, True) for k in waited_calls]
    assert result["step_s"] == [3.75, 5.0, 6.25] and result["compute_only_s"] == [8.75, 10.0, 11.25]  # k + k/4 s
    assert result["comm_s"] == comm_s
    # the timed steps' alone: 3 x the fp32 gradients, 3 x 2 fp32 elements sent
    assert (result["payload_bytes"], result["buckets"], result["sent_bytes"]) == (3 * 15 * 4, 1, 3 * 2 * 4)
    assert result["final_loss"] == 5 and len(result["allreduce_alone_s"]) == 3


@pytest.mark.slow
def test_ddp_traffic_is_every_gradient_once(tiny_run):
    _, results = tiny_run
    ddp = _run(results, "ddp")
    assert ddp["payload_bytes_per_rank"] == [PARAMS * 4] * 2  # counted by the comm hook
    assert len(ddp["allreduce_alone_ms"]) == 2 and min(ddp["allreduce_alone_ms"]) > 0
    assert ddp["bytes_per_rank"] == ddp["bytes_per_rank_analytic"] == [PARAMS * 4] * 2  # x 2(n-1)/n = 1
    # the all-reduces the projections count where none was measured (ceil(244 MB / 25 MiB) said 10)
    assert ddp["buckets_per_step"] == [results["analytic"]["ddp_buckets"]] * 2 == [4, 4]
    hybrid = _run(results, "hybrid")  # ranks 0, 1, 2, 3: towers 0, 1, 0, 1
    assert hybrid["buckets_per_step"] == results["analytic"]["tower_buckets"] * 2


@pytest.mark.slow
def test_hybrid_traffic_is_exactly_the_analytic_figure(tiny_run):
    out, results = tiny_run
    hybrid = _run(results, "hybrid")
    assert hybrid["ranks"] == 4 and hybrid["replicas"] == 2
    # Each replica's towers exchange on their replica's half of the batch (1 image of 2) ...
    assert hybrid["exchange_bytes_per_rank"] == hybrid["exchange_bytes_per_rank_analytic"] == \
        [4 * 1 * n for n in SENT_PER_IMAGE["tower0"]] * 2
    # ... and each tower's gradients are all-reduced over the 2 replicas: 2(n-1)/n = 1 x its parameters.
    tower_params = [PARAMS - TOWER1_PARAMS, TOWER1_PARAMS]
    assert hybrid["payload_bytes_per_rank"] == [4 * n for n in tower_params] * 2  # counted by the comm hook
    assert hybrid["gradient_bytes_per_rank"] == hybrid["gradient_bytes_per_rank_analytic"] == \
        [4 * n for n in tower_params] * 2
    assert all(ms > 0 for ms in hybrid["allreduce_alone_ms"])
    section = (out / "report.md").read_text().split("## Hybrid: replicas of the towers\n", 1)[1].split("\n## ", 1)[0]
    assert "hidden behind the backward" in section and "| gradient all-reduce" in section
    projection = results["mesh_projection"]
    assert projection["gpus"] == 8 and projection["replicas"] == 4
    assert [r["batch"] for r in projection["rows"]][:2] == [32, 64]
    # Hybrid all-reduces a tower's gradients over 4 ranks, data parallel all of them over 8.
    assert projection["hybrid_gradient_bytes_per_rank"] == 2 * 3 / 4 * 4 * (PARAMS - TOWER1_PARAMS)
    assert projection["ddp_gradient_bytes_per_rank"] == 2 * 7 / 8 * 4 * PARAMS


def test_towers_hold_the_references_parameters_between_them():
    for placement in ("tower0", "split"):
        counts = flops.tower_param_counts(placement)
        assert sum(counts) == PARAMS
    assert flops.tower_param_counts("tower0") == [PARAMS - TOWER1_PARAMS, TOWER1_PARAMS]


def test_a_run_s_flops_are_all_its_ranks_work_and_its_share_of_the_peak_is_over_the_gpus_its_ranks_used(
        monkeypatch):
    """Training FLOPs per step: 6 x the MACs of both towers' work x the batch; the share of the peak
    against the peak of the math used (bf16 under bf16 autocast, else what the convolutions run as)
    times the GPUs the ranks ran on (two ranks over gloo on one GPU: one). A run on the CPU has no
    share, whatever GPU the machine has; a single-device run's compute is its median step."""
    monkeypatch.setattr(run, "convolution_math", lambda: "tf32")
    plan = run.DevicePlan("cuda", "cuda", "nccl", "NVIDIA H100 80GB HBM3", "2 GPUs")
    analytic = {"macs_per_image": {"towers": [6e9, 4e9], "single": 10e9},
                "towers_sent_elements_per_image": [{}, {}]}

    def towers(devices, precision):
        ranks = [_rank_result(device=device, step_s=[0.5] * 3, comm_step_s=[0.5] * 3, comm_s=[0.1] * 3, sent_bytes=0,
                              calls=0, exchanges={}) for device in devices]
        return run.summarize({**_summary_spec("towers", 8, precision), "device": "cuda"}, ranks, analytic, plan)
    flop_per_s = 6 * 10e9 * 8 / 0.5  # both towers' MACs, 8 images in a 500 ms step
    for devices, precision, peak_tflops, gpus in ((["cuda:0", "cuda:1"], "bf16", 989.4, 2),
                                                  (["cuda:0", "cuda:1"], "fp32", 494.7, 2),
                                                  (["cuda:0", "cuda:0"], "fp32", 494.7, 1)):
        summary = towers(devices, precision)
        assert summary["gflop_per_s"] == pytest.approx(flop_per_s / 1e9)
        assert summary["peak"] == pytest.approx({"gpu": "H100", "math": "bf16" if precision == "bf16" else "tf32",
                                                 "tflop_per_s_per_device": peak_tflops, "devices": gpus,
                                                 "share": flop_per_s / (peak_tflops * 1e12 * gpus)})
    single = run.summarize(_summary_spec("single", 8), [_rank_result(step_s=[0.1, 0.3, 0.2])], analytic, plan)
    assert single["peak"] is None  # on the CPU beside the GPU (--device cpu)
    assert single["compute_ms"] == pytest.approx([200.0]) and single["comm_ms"] is None
    assert single["bytes_per_rank"] == single["bytes_per_rank_analytic"] == [0]


def test_a_rank_computes_on_its_own_gpu_over_nccl_and_on_the_one_gpu_the_ranks_share_over_gloo():
    assert workers._device({"device": "cuda", "backend": "nccl"}, 1) == torch.device("cuda", 1)
    assert workers._device({"device": "cuda", "backend": "gloo"}, 1) == torch.device("cuda", 0)
    assert workers._device({"device": "cpu", "backend": "gloo"}, 1) == torch.device("cpu")


def test_each_tower_loads_its_own_shard_and_a_hybrid_rank_its_replica_s_part_of_the_batch_all_reduced_over_its_replicas(
        monkeypatch, group_of_one):
    """towers: rank r loads tower r's shard. hybrid: a rank loads the shard of its tower in its
    replica, trains on its replica's part of the global batch, and all-reduces (in the steps and
    alone) over its replica group only, never over every rank."""
    import torch.distributed as dist
    loaded, seen, groups = [], [], []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, group=None, **kwargs):
        groups.append(group)
        return all_reduce(tensor, *args, group=group, **kwargs)
    monkeypatch.setattr(dist, "all_reduce", counted)

    def step(call, model, images, clock):  # the images the rank trains on, and a real backward through DDP
        seen.append(images[:, 0].tolist())
        model(images).sum().backward()
        return _exchanging_step(call, model, images, clock)
    tower = _StubTower()
    _stub_steps(monkeypatch, tower, step)
    monkeypatch.setattr(workers, "_load", lambda build, path, *args: loaded.append(path) or tower)
    monkeypatch.setattr(workers, "synthetic_batch", lambda batch, *args: (
        torch.arange(batch * 4.0).reshape(batch, 4), torch.arange(batch) % 3))
    weights = {"shard_paths": ["tower0.pt", "tower1.pt"]}
    workers.towers_worker(1, _worker_spec("towers", warmup=0, steps=1, **weights))
    assert loaded == ["tower1.pt"] and seen == [[0.0, 4.0, 8.0, 12.0]]  # the whole batch of 4
    replica_group = dist.new_group([0])  # stands for the 2 ranks of tower 0 in 2 replicas: not the default group
    monkeypatch.setattr(workers, "build_mesh", lambda towers, timeout_s: Mesh(2, towers, 1, 0, group_of_one,
                                                                              replica_group))
    loaded.clear(), seen.clear()
    workers.hybrid_worker(0, _worker_spec("hybrid", warmup=0, steps=1, **weights))
    assert loaded == ["tower0.pt"]  # tower 0 of replica 1
    assert seen and all(images == [8.0, 12.0] for images in seen)  # replica 1's half: images 2 and 3
    assert groups and all(group is replica_group for group in groups)


def test_the_bounds_of_each_number_are_accepted_and_a_step_beyond_them_refused(monkeypatch):
    """Each option's range as its message gives it, both ends included."""
    monkeypatch.setattr(run, "usable_cores", lambda: 2)
    config = run.BenchConfig(device="cpu", quick=True, seed=2**32 - 1, link_latency_us=1e6, rank_timeout_s=1.0,
                             loader_workers=(0, 8), steps=run.MAX_STEPS, warmup=run.MAX_STEPS)
    run.resolve(config, run.plan_devices(config))
    for change, message in ((dict(seed=2**32), "--seed must be an integer from 0 to 4294967295, got 4294967296"),
                            (dict(link_latency_us=1.000001e6), "--link-latency-us must be a number of microseconds "
                                                               "from 0 to 1,000,000 (a second), got 1000001"),
                            (dict(rank_timeout_s=0.5), "--rank-timeout-s must be a number of seconds from 1 to "
                                                       "604800 (a week), got 0.5"),
                            (dict(rank_timeout_s=604800.5), "--rank-timeout-s must be a number of seconds from 1 "
                                                            "to 604800 (a week), got 604800.5"),
                            (dict(loader_workers=(0, 9)), "--loader-workers 9 would start that many loading processes "
                                                          "on the 2 cores this benchmark may use: give at most 8")):
        with pytest.raises(ValueError) as refused:
            run.resolve(dataclasses.replace(config, **change), run.plan_devices(config))
        assert str(refused.value) == message


def test_the_defaults_are_those_the_help_gives_for_each_device_and_quick():
    """--help's brackets name the defaults chosen by device and --quick: the run takes those."""
    helps = {a.dest: " ".join(a.help.split()) for a in run.build_parser()._actions}
    numbers = lambda text: tuple(int(n) for n in text.split(","))
    documented = {}
    for field in ("batch", "warmup", "steps"):
        gpu, cpu, quick_gpu, quick_cpu = re.search(r"\[GPU (\d+), CPU (\d+), --quick: GPU (\d+), CPU (\d+)\]",
                                                   helps[field]).groups()
        documented[field] = {("cuda", False): int(gpu), ("cpu", False): int(cpu), ("cuda", True): int(quick_gpu),
                             ("cpu", True): int(quick_cpu)}
    gpu, cpu, quick_gpu, quick_cpu = re.search(r"\[GPU ([\d,]+); CPU ([\d,]+); --quick: GPU ([\d,]+), CPU ([\d,]+)\]",
                                               helps["batches"]).groups()
    documented["batches"] = {("cuda", False): numbers(gpu), ("cpu", False): numbers(cpu),
                             ("cuda", True): numbers(quick_gpu), ("cpu", True): numbers(quick_cpu)}
    full, quick = re.search(r"\[(\d+), --quick (\d+)\]", helps["loader_batches"]).groups()
    for device in ("cuda", "cpu"):
        for quick_run in (False, True):
            plan = run.DevicePlan(device, device, "gloo", None, "")
            resolved = run.resolve(run.BenchConfig(quick=quick_run), plan)
            for field, by_plan in documented.items():
                assert getattr(resolved, field) == by_plan[(device, quick_run)], (field, device, quick_run)
            assert resolved.loader_batches == int(quick if quick_run else full)


def test_a_run_s_spec_and_its_ranks_follow_its_mode_and_the_devices(monkeypatch):
    """run_spec: the exchanges timed in steps of their own only where a multi-rank mode computes on
    a GPU, and each collective bounded by --rank-timeout-s; execute: each mode on as many ranks as
    it has (hybrid 4, towers and ddp 2, the single-device modes 1), over the plan's backend."""
    config = run.BenchConfig(device="cpu", rank_timeout_s=60.0, warmup=1, steps=2)
    one_gpu = run.DevicePlan("cuda", "cuda", "gloo", "a GPU", "one GPU")
    key = run.RunKey("towers", 2, "fp32", "contiguous")
    weights = {"reference_path": "reference.pt", "shard_paths": ["tower0.pt", "tower1.pt"]}
    spec = run.run_spec(key, config, one_gpu, weights)
    assert (spec["exchange_steps"], spec["device"], spec["collective_timeout_s"]) == (True, "cuda", 60.0)
    on_the_cpu = run.run_spec(key, config, one_gpu._replace(two_rank="cpu"), weights)  # --one-gpu-two-rank cpu
    assert (on_the_cpu["exchange_steps"], on_the_cpu["device"]) == (False, "cpu")
    single = run.run_spec(key._replace(mode="single"), config, one_gpu, weights)
    assert (single["exchange_steps"], single["device"], single["backend"]) == (False, "cuda", "none (one process)")
    started = []
    monkeypatch.setattr(run, "run_ranks", lambda worker, args, world_size, backend, timeout_s, **kwargs:
                        started.append((worker, world_size, backend, timeout_s)) or [])
    for mode in run.MODES:
        run.execute({**spec, "mode": mode}, config, one_gpu._replace(backend="nccl"), 5.0)
    assert started == [(workers.single_worker, 1, "gloo", 5.0), (workers.towers_worker, 2, "nccl", 5.0),
                       (workers.ddp_worker, 2, "nccl", 5.0), (workers.hybrid_worker, 4, "nccl", 5.0),
                       (workers.single_worker, 1, "gloo", 5.0)]


def test_a_bf16_run_is_held_against_fp32_in_its_memory_format_or_else_contiguous_up_to_the_limit_itself(
        tmp_path, monkeypatch):
    """A channels_last bf16 run without an fp32 channels_last one is held against fp32 contiguous;
    a bf16 run exactly --bf16-slowdown-limit times slower than fp32 leaves the later ones measured."""
    measured = []

    def measure(step_ms: dict, keys: list) -> "run.Bench":
        bench = _quick_bench(tmp_path)
        bench.weights, bench.save = {}, lambda: None
        monkeypatch.setattr(run, "execute", lambda spec, *args: measured.append(
            (spec["mode"], spec["precision"], spec["memory_format"])) or [])
        monkeypatch.setattr(run, "summarize", lambda spec, *args: {
            "device": spec["device"], "images_per_s": 1.0,
            "step_ms": dict.fromkeys(("median", "p10", "p90"), step_ms[(spec["precision"], spec["memory_format"])])})
        bench.measure([run.RunKey(mode, 2, precision, memory_format) for mode, precision, memory_format in keys],
                      str(tmp_path))
        return bench
    keys = [("single", "fp32", "contiguous"), ("single", "bf16", "channels_last"), ("towers", "bf16", "contiguous")]
    bench = measure({("fp32", "contiguous"): 10.0, ("bf16", "channels_last"): 50.0}, keys)
    assert measured == keys[:2]
    assert [r["reason"] for r in bench.not_measured] == [
        "not measured on this device (cpu): bf16 autocast ran 5.0x slower than fp32 in single (limit "
        "--bf16-slowdown-limit 4.0)"]
    measured.clear()
    bench = measure({("fp32", "contiguous"): 10.0, ("bf16", "channels_last"): 40.0, ("bf16", "contiguous"): 40.0},
                    keys)
    assert measured == keys and not bench.not_measured


def test_multi_rank_modes_are_skipped_where_the_devices_cannot_host_their_ranks(tmp_path, monkeypatch):
    """Every multi-rank mode, hybrid too, where the plan leaves them out (one GPU, --one-gpu-two-rank
    skip); hybrid under NCCL where fewer GPUs than its 4 ranks show."""
    monkeypatch.setattr(run, "execute", lambda *args: pytest.fail("a run started that cannot run here"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    hybrid = run.RunKey("hybrid", 2, "fp32", "contiguous")
    for devices, reason in (
            (run.DevicePlan("cuda", None, None, "a GPU", "one GPU: skipped"), "skipped: one GPU: skipped"),
            (run.DevicePlan("cuda", "cuda", "nccl", "a GPU", "3 GPUs"), "skipped: NCCL needs one GPU per rank and "
                                                                          "hybrid has 4 ranks; this machine shows 3 "
                                                                          "GPUs")):
        bench = _quick_bench(tmp_path)
        bench.weights, bench.devices, bench.save = {}, devices, lambda: None
        bench.measure([hybrid], str(tmp_path))
        assert [r["reason"] for r in bench.not_measured] == [reason]


def test_the_eight_gpu_projection_names_where_the_faster_way_changes_beyond_its_table_s_largest_batch():
    """The faster way is sought up to twice the table's largest batch: with 400 M parameters, data
    parallel's all-reduce (2.8 s) outweighs hybrid's extra compute and exchanges up to 10,136 images,
    past the 8,192 of the last row, and that change is named though every row says hybrid."""
    config = run.BenchConfig(batch=32, links=("link=1",), link_latency_us=10.0)  # 10^6 bytes per ms
    single = {"device": "cuda", "devices": ["cuda:0"], "step_ms": {"median": 64.0}}  # 2 ms per image
    analytic = {"macs_per_image": {"single": 1000, "towers": [600, 400]}, "num_params": 400_000_000,
                "tower_params": [1_500_000, 500_000], "towers_calls_per_step": 9, "tower_buckets": [2, 1],
                "ddp_buckets": 3}
    projected = run.mesh_projection({run.RunKey("single", 32, "fp32", "contiguous"): single}, config, analytic)
    assert all(row["hybrid_ms"] < row["ddp_ms"] for row in projected["rows"])
    # hybrid 0.3 b + 0.0596 b + 0.09 ms against ddp b / 12 + 2800.03 ms: equal at 10,133.6 images
    assert projected["changes"] == [{"batch": 10136, "from": "hybrid", "to": "ddp"}]
    assert projected["faster_at_the_largest"] == "ddp"


def test_a_results_json_of_another_program_whose_name_begins_alike_is_not_the_benchmark_s(tmp_path):
    """refuse_others_files replaces only a report of ``python -m benchmarks.run`` itself."""
    header = {"runs": [], "machine": {}, "config": {}}
    for command, ours in (("python -m benchmarks.run", True), ("python -m benchmarks.run --quick", True),
                          ("python -m benchmarks.runner --quick", False), ("python -m benchmarks.run_all", False)):
        (tmp_path / "results.json").write_text(json.dumps({**header, "command": command}))
        assert run._written_by(tmp_path / "results.json", "benchmarks.run") is ours, command


def test_the_program_is_timed_with_the_benchmark_s_warmup_and_steps_where_the_synthetic_runs_ran(
        tiny_data, tmp_path, monkeypatch):
    """The training program runs --warmup + --steps steps and is timed after its --warmup, on the
    devices of the synthetic runs it is held against."""
    handed = []
    monkeypatch.setattr(run.Bench, "measure", lambda bench, keys, folder: None)
    monkeypatch.setattr(run, "measure_loader", lambda *args: {"skipped": "not measured here"})
    monkeypatch.setattr(run, "measure_program", lambda modes, batch, steps, warmup, devices, *args: handed.append(
        (modes, batch, steps, warmup, devices)) or [])
    run.main(["--device", "cpu", "--quick", "--batch", "2", "--warmup", "2", "--steps", "5", "--loader-data",
              str(tiny_data), "--out", str(tmp_path / "report")])
    assert handed == [(("towers", "single"), 2, 5, 2, {"single": "cpu", "towers": "cpu"})]


def test_the_all_reduce_alone_is_timed_after_one_untimed_call_that_sets_up_the_transport(monkeypatch, group_of_one):
    """_time_allreduce: one all-reduce of a buffer as large as all the gradients, untimed, then
    ``repeats`` timed ones, each on its own (here call k takes k seconds)."""
    clock, sizes = _FakeClock(), []

    def all_reduce(tensor, group=None):
        sizes.append(tensor.numel())
        clock.now += len(sizes)
    monkeypatch.setattr(workers, "time", type("FakeTime", (), {"perf_counter": staticmethod(clock.perf_counter)}))
    monkeypatch.setattr(workers.dist, "all_reduce", all_reduce)
    assert workers._time_allreduce(torch.nn.Linear(4, 3), 3) == [2, 3, 4]
    assert sizes == [15] * 4  # the Linear's 12 weights and 3 biases


def test_the_weights_every_run_loads_are_sharded_with_the_benchmark_s_fc8_placement(tmp_path, monkeypatch):
    """weights_worker: the reference of the seed, and each tower's shard of it as towers.shard_state_dict
    cuts it for --fc8-placement (split: 500 of FC8's outputs on each tower; tower0: FC8 on tower 0),
    each in its tower's file."""
    saved = {}

    def build_reference(seed):
        with torch.device("meta"):  # the shapes alone
            return AlexNet(1000)
    monkeypatch.setattr(workers, "build_reference", build_reference)
    monkeypatch.setattr(workers, "_save", lambda tensors, path, *args: saved.update({path: tensors}))
    reference = build_reference(0).state_dict()
    fc8 = 4096 * 1000 + 1000
    for placement, sizes in (("split", [PARAMS / 2] * 2), ("tower0", [(PARAMS + fc8) / 2, (PARAMS - fc8) / 2])):
        saved.clear()
        paths = workers.weights_worker(0, 0, placement, str(tmp_path))
        assert paths == {"reference_path": f"{tmp_path}/reference.pt",
                         "shard_paths": [f"{tmp_path}/tower0.pt", f"{tmp_path}/tower1.pt"]}
        assert {k: v.shape for k, v in saved[paths["reference_path"]].items()} == {
            k: v.shape for k, v in reference.items()}
        for tower_rank, path in enumerate(paths["shard_paths"]):
            expected = shard_state_dict(reference, tower_rank, placement)
            assert {k: v.shape for k, v in saved[path].items()} == {k: v.shape for k, v in expected.items()}
            assert sum(v.numel() for v in saved[path].values()) == sizes[tower_rank], (placement, tower_rank)


def test_a_rank_draws_its_dropout_from_the_seed_and_loads_its_weights_in_the_memory_format(tmp_path):
    """_start seeds torch from --seed (a rank's dropout masks are those of any run of the seed);
    _load puts the loaded weights in the run's memory format."""
    with torch.random.fork_rng():  # the process's own streams as they were, afterwards
        for rank in (0, 1):
            drawn = []
            for seed in (5, 5, 6):
                torch.manual_seed(100 + len(drawn))  # whatever the process drew before
                workers._start({"seed": seed, "device": "cpu", "backend": "gloo"}, rank)
                drawn.append(torch.rand(4))
            assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2]), rank
    build = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    torch.save(build().state_dict(), tmp_path / "weights.pt")
    for memory_format in ("contiguous", "channels_last"):
        model = workers._load(build, str(tmp_path / "weights.pt"), torch.device("cpu"), memory_format)
        assert model[0].weight.is_contiguous(memory_format=workers.MEMORY_FORMATS[memory_format]), memory_format


def test_the_report_s_cells_are_the_results_in_the_units_they_name():
    """From the committed CPU results: a one-device row moves no bytes (torchvision's too), the runtime's
    RSS is a span of MB, hybrid's images per replica, the eight-GPU projection's compute per image in
    microseconds, the program against the synthetic step in % and its 90 epochs in hours and days."""
    committed = CPU_REPORT / "results.json"
    results = json.loads(committed.read_text())
    rows = {line.split(" | ")[0]: line for line in report.main_table(results) if line.startswith("| ")}
    for mode in ("single", "torchvision"):
        assert "| 0 (one device) | 0 | 0 | 0 |" in rows[f"| {mode}"], rows[f"| {mode}"]
    for measured in results["runs"]:
        measured["rss_at_start_bytes"] = [300.4e6] * measured["ranks"]
    assert "the Python/torch runtime alone held 300 MB when the worker started" in " ".join(report.methods(results))
    results["runs"][1]["rss_at_start_bytes"][0] = 420.4e6
    assert "the Python/torch runtime alone held 300-420 MB when the worker started" in " ".join(
        report.methods(results))
    single = _run(results, "single", 16)
    single.update(gflop_per_s=83.34, peak={"share": 0.1234, "math": "tf32"})
    row = next(line for line in report.main_table(results) if line.startswith("| single |"))
    assert row.endswith("| 83.3 | 12.3 % of tf32 |"), row
    hybrid = _run(results, "hybrid", 16)
    assert hybrid["replicas"] == 2 and "Global batch 16, 8 images per replica" in report.hybrid_lines(results)[0]
    older = {**results, "config": {k: v for k, v in results["config"].items() if k != "modes"},
             "runs": [r for r in results["runs"] if r["mode"] != "hybrid"]}  # a results.json before --modes
    assert report.hybrid_lines(older) == ["hybrid was not measured at the main batch (see 'Not measured')."]
    results["mesh_projection"]["per_image_ms"] = 0.5
    assert any(line.startswith("- compute per image (whole net, training): 500.00 us, ")
               for line in report.mesh_projection_lines(results))
    _run(results, "towers", 16)["images_per_s"] = 30.0
    towers = results["program"][0]
    assert towers["mode"] == "towers" and towers["batch"] == 16
    towers.update(images_per_s=27.0, paper_training_hours=1146.7)
    row = next(line for line in report.program_lines(results) if line.startswith("| towers"))
    assert row.endswith("| 30.0 | 90 % | 1,147 h (47.8 days) |"), row


def test_a_goal_reached_exactly_is_met():
    """The reference exactly as fast as torchvision's AlexNet; the program at exactly 80 % of the synthetic rate."""
    runs = [_speed_goal_run("single", 16, "fp32", "contiguous", 10.0),
            _speed_goal_run("torchvision", 16, "fp32", "contiguous", 10.0),
            _speed_goal_run("towers", 16, "fp32", "contiguous", 10.0)]
    ran = {"mode": "towers", "batch": 16, "command": "launch.two_gpu --layout towers", "images_per_s": 8.0}
    results = {"config": {"batch": 16, "modes": ["single", "torchvision", "towers"], "fc8_placement": "tower0"},
               "runs": runs, "program": [ran], "analytic": {"macs_per_image": {"single": 2, "torchvision": 1}}}
    lines = report.speed_goal_lines(results)
    assert "| 16 | fp32, contiguous | 10.0 | 10.0 | 1.00 | met |" in lines
    assert "- towers: 80 % (8.0 against 10.0 images/s): met" in lines


def test_the_loader_keeps_up_from_the_first_number_of_workers_as_fast_as_the_towers():
    by_workers = [{"workers": w, "batch": 16, "batches": 4, "images_per_s": rate, "seconds": 64 / rate}
                  for w, rate in ((0, 40.0), (2, 90.0), (4, 150.0))]
    loader = {"data": "DATA", "train_images": 100, "by_workers": by_workers, "device": "cpu",
              "augment_ms_per_batch": 3.0, "input_bytes_per_image": 150536, "float32_bytes_per_image": 602120}
    towers = {"mode": "towers", "batch": 16, "precision": "fp32", "memory_format": "contiguous", "images_per_s": 90.0}
    lines = report.loader_lines({"loader": loader, "runs": [towers], "config": {"batch": 16}})
    assert "- the towers' training step takes 90.0 images/s at this batch: the loader keeps up with it from 2 " \
           "workers" in lines


def test_a_report_counts_the_runs_not_measured_as_done_and_says_everything_was_measured_only_then(
        tmp_path, monkeypatch):
    committed = CPU_REPORT / "results.json"
    results = json.loads(committed.read_text())
    for chart in ("chart_images_per_s", "chart_bytes"):  # the text alone
        monkeypatch.setattr(report, chart, lambda results, path: path.write_bytes(b""))
    results["planned_runs"], results["not_measured"] = len(results["runs"]), []
    report.write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Not finished" not in text and text.endswith("\nEverything planned was measured.\n")
    results["planned_runs"] += 1
    results["not_measured"].append({"mode": "hybrid", "batch": 32, "precision": "fp32", "memory_format": "contiguous",
                                    "compiled": False, "reason": "failed: here"})
    report.write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Not finished" not in text and "Everything planned was measured." not in text
    assert text.endswith("\n- hybrid, batch 32, fp32, contiguous: failed: here\n")
    # data parallel's bytes per step, both ranks: 2 x 2(n-1)/n x the parameters x 4 bytes
    assert "Data parallel: 2 ranks x 2(n-1)/n x 60,965,224 x 4 bytes = 487.7 MB per step, whatever the batch." in text


def test_a_redraw_takes_a_negative_all_reduce_time_and_refuses_a_run_of_an_unknown_memory_format():
    """Only comm_ms may be negative (DDP's all-reduce hidden: a difference of two medians); each
    run's mode, precision and memory format must be ones the report knows."""
    report.check_numbers({"runs": [{"comm_ms": [-3.0, 2.0], "step_ms": {"median": 5.0}}]})
    with pytest.raises(ValueError, match=r"^runs\[0\]\.batch is an integer of 401 digits, not a number"):
        report.check_numbers({"runs": [{"batch": 10**400}]})  # too large for a float to format
    with pytest.raises(ValueError, match=r"^runs\[0\]\.compute_ms\[0\] is -3, not a number a benchmark measures$"):
        report.check_numbers({"runs": [{"compute_ms": [-3.0]}]})
    known = {"mode": "single", "precision": "fp32", "memory_format": "contiguous"}
    report.check_names({"runs": [known]})
    for key, value, names in (("mode", "tower", "single, towers, ddp, hybrid, torchvision"),
                              ("precision", "fp16", "fp32, bf16"),
                              ("memory_format", "nhwc", "contiguous, channels_last")):
        with pytest.raises(ValueError) as refused:
            report.check_names({"runs": [known, {**known, key: value}]})
        assert str(refused.value) == f"runs[1].{key} is {value!r}, not one of {names}"


def test_an_ablation_s_results_name_its_command_with_reuse_once_and_the_folders_it_wrote():
    runs = {"full": {"run_dir": "/data/runs/full"}, "tanh": {"run_dir": "/data/runs/tanh"}}
    for command, again in (("python -m benchmarks.ablations --variants full,tanh",
                            "python -m benchmarks.ablations --variants full,tanh --reuse"),
                           ("python -m benchmarks.ablations --reuse --variants full,tanh",
                            "python -m benchmarks.ablations --reuse --variants full,tanh")):
        assert report._ablation_redraw({"info": {"command": command}, "runs": runs}, Path("/reports/moved")) == \
            f"{again} --out /reports/moved --runs /data/runs"
    assert report._ablation_redraw({"command": "python -m benchmarks.run", "runs": []}, Path("/reports")) is None
