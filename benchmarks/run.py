"""Benchmark: the same training step run five ways, timed, with its traffic counted.

    python -m benchmarks.run --quick     # a small run, under 5 minutes on a 2-core CPU
    python -m benchmarks.run             # the full run: give it an idle machine
    python -m benchmarks.run --help      # every option

Every mode times ``launch.step.train_step`` on the same global batch of synthetic
float32 N x 3 x 224 x 224 images at raw-pixel scale, resident on the device, with
random labels; warm-up steps are not timed.

  single       the reference (towers.build_reference) on one device
  towers       the paper's two towers (towers.Tower, weights from towers.shard_state_dict
               of the same reference) on two ranks, each seeing the whole global batch
  ddp          the reference under DistributedDataParallel on two ranks, half the batch each
  hybrid       two replicas of the towers on four ranks (a 2 x 2 mesh, launch.mesh), half
               the batch per replica, each tower's gradients averaged over the replicas
  torchvision  torchvision.models.alexnet(num_classes=1000) on one device

Devices: with two GPUs the two-rank modes use NCCL, rank r on cuda:r (hybrid needs four); without a GPU
everything runs on the CPU, two-rank modes over gloo with half the cores this process may use
(a taskset's or container's, the report says how many) as threads per rank and single-device
modes with all of them. With one GPU (which cannot host two
NCCL ranks) the two-rank modes share it, one process each, over gloo, as the training
program does (``--one-gpu-two-rank skip`` leaves them out; ``cpu`` runs them on the CPU).
Either way the projection to two GPUs estimates a tower's compute from the single-GPU step
(two ranks taking turns on one GPU time each other's kernels too).

Each run is a fresh process (or pair) started by ``launch.ranks.run_ranks``. Output:
``benchmarks/reports/<host>-<device>-<YYYY-MM-DD>/`` (the device: the GPU's name, or cpu;
``-quick`` added for --quick, which never replaces the full run's report of the day) or
``--out``, with report.md, results.json and two PNG charts.
"""

import sys

from launch import rank_server  # torch-free
from launch.cli import hold_interrupts  # torch-free

if __name__ == "__main__":
    hold_interrupts()  # a Ctrl-C during the imports below ends the program in one line
    rank_server.start_early(sys.argv)  # imports torch for the ranks while this process imports it for itself

import argparse
import contextlib
from dataclasses import asdict, dataclass, replace
import datetime
import json
import logging
import math
import os
from pathlib import Path
import platform
import re
import shlex
import socket
import time
from typing import NamedTuple, Optional

import numpy as np
import torch

from launch.cli import (JSON_DAMAGE, MAX_PROCESSES_PER_CORE, Parser, add_options, check_compile_backend, home_path,
                        lock_folder, make_folder, option, pyplot, quick_exit, refuse_empty, remove_made, repeated,
                        shell_word, usable_cores, write_whole)
from launch import data as data_module
from launch.config import MAX_TIMEOUT_S
from launch.ranks import RankFailure, cpu_threads_per_rank, error_line, raise_interrupt, run_ranks
from launch.step import AUTOCAST, NO_NATIVE_BF16, convolution_math, native_bf16
from towers import FC8_PLACEMENTS, TOWERS, AlexNet

from . import flops, traffic
from .loader import measure_loader, open_loader_data
from .program import PROGRAM_LAYOUTS, STOP_GRACE_S, measure_program
from .scratch import remove_stale_folders, temporary_folder
from .workers import WORKERS, WeightsNotWritten, weights_worker

logger = logging.getLogger(__name__)

MODES = ("single", "towers", "ddp", "hybrid", "torchvision")
RANKS = {"towers": TOWERS, "ddp": 2, "hybrid": 2 * TOWERS}  # the rest: one
MULTI_RANK_MODES = tuple(RANKS)
SWEEP_MODES = ("single", "towers", "ddp", "torchvision")
COMPILE_MODES = ("single", "towers", "torchvision")
PROGRAM_MODES = tuple(PROGRAM_LAYOUTS)
PRECISIONS = tuple(AUTOCAST)
MEMORY_FORMATS = ("contiguous", "channels_last")
MAX_STEPS = 1_000_000  # of --steps, and of --warmup: more would end at --rank-timeout-s, each run
ELEMENT_SIZE = {"fp32": 4, "bf16": 2}  # bytes of an exchanged activation, as the analytic figure assumes
REPORTS_DIR = Path(__file__).resolve().parent / "reports"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run depends on; the command line is generated from these fields.
    ``None`` means "chosen by device and --quick" (see ``DEFAULTS``)."""

    modes: tuple = option(MODES, "modes of the main table", choices=MODES, many=True)
    batch: Optional[int] = option(None, "global batch of the main table and the precision sweep "
                                        "[GPU 128, CPU 16, --quick: GPU 64, CPU 8]", type=int)
    warmup: Optional[int] = option(None, "untimed steps before the timed ones [GPU 10, CPU 2, --quick: GPU 3, CPU 1]", type=int)
    steps: Optional[int] = option(None, "timed steps per run [GPU 50, CPU 20, --quick: GPU 10, CPU 3]", type=int)
    batches: Optional[tuple] = option(None, "global batches of the batch-size sweep "
                                            "[GPU 32,64,128,256,512; CPU 4,8,16,32; --quick: GPU 16,128, CPU 16]",
                                      type=int, many=True)
    sweep_modes: tuple = option(SWEEP_MODES, "modes of the batch-size sweep", choices=MODES, many=True)
    precisions: tuple = option(PRECISIONS, "precision sweep: fp32, and bf16 autocast (train_step's autocast_dtype)",
                               choices=PRECISIONS, many=True)
    memory_formats: tuple = option(MEMORY_FORMATS, "memory-format sweep: images and conv weights contiguous "
                                                   "(NCHW) or channels_last (NHWC)", choices=MEMORY_FORMATS, many=True)
    precision_modes: Optional[tuple] = option(None, "modes of the precision/memory-format sweep "
                                                    f"[{','.join(SWEEP_MODES)}; --quick on CPU: towers]", choices=MODES, many=True)
    compile_modes: tuple = option((), "modes also timed under torch.compile (towers.compile_blocks: a tower block by "
                                      "block, its exchanges between the graphs; the others whole) at the main batch, "
                                      "in every precision and memory format of the precision sweep; the first "
                                      "warm-up step compiles", choices=COMPILE_MODES, many=True)
    compile_backend: str = option("inductor", "torch.compile's backend for --compile-modes: inductor, aot_eager (the "
                                              "tracing without code generation) or eager")
    bf16_slowdown_limit: float = option(4.0, "once a bf16 run on a device is this many times slower than its "
                                             "fp32 run (bf16 emulated there), that device's later bf16 runs are "
                                             "marked 'not measured on this device'", type=float)
    fc8_placement: str = option("tower0", "towers' FC8: whole on tower 0 (the authors' layout) or split 500+500",
                                choices=FC8_PLACEMENTS)
    seed: int = option(0, "seed of the reference's weights, the synthetic batch and dropout", type=int)
    device: str = option("auto", "auto: GPUs when present; cpu: force the CPU; cuda: fail without a GPU",
                         choices=("auto", "cpu", "cuda"))
    one_gpu_two_rank: str = option("gpu", "with exactly one GPU (which cannot host two NCCL ranks): towers/ddp "
                                          "share it, one process each, over gloo (as the training program does); or "
                                          "skip them; or run them on the CPU over gloo", choices=("gpu", "skip", "cpu"))
    links: tuple = option(("nvlink=300", "pcie4=25"), "links of the projection, NAME=GB/s per direction "
                                                      "(10^9 bytes/s)", many=True)
    link_latency_us: float = option(10.0, "projection: start-up cost of each collective on the link, microseconds",
                                    type=float)
    rank_timeout_s: float = option(1800.0, "a run still going after this many seconds is stopped and marked failed",
                                   type=float)
    out: Optional[str] = option(None, "output folder [benchmarks/reports/<host>-<device>-<YYYY-MM-DD>, "
                                        "the device being the GPU's name or cpu; -quick added for --quick]")
    loader_workers: Optional[tuple] = option(None, "the data-loader benchmark: numbers of worker processes "
                                                   "[0, 1, 2, 4, ... up to the CPU cores; --quick: 0,1]", type=int,
                                             many=True)
    loader_batches: Optional[int] = option(None, "the data-loader benchmark: timed batches of --batch images per "
                                                 "number of workers [20, --quick 3]", type=int)
    loader_data: Optional[str] = option(None, "the data-loader benchmark's ImageNet-layout folder [the built-in "
                                              "dataset: pre-resized 256x256 JPEGs]")
    program_modes: tuple = option(PROGRAM_MODES, "the training program (python -m launch.two_gpu) on the loader's "
                                                 "data in these layouts, --warmup + --steps steps at --batch, against "
                                                 "the main table", choices=PROGRAM_MODES, many=True)
    time_limit: Optional[float] = option(None, "seconds the whole benchmark may take: no run starts after them, a "
                                               "run still going then is stopped, and the report holds what was "
                                               "measured, the rest listed as not measured. On top come a few seconds "
                                               "to start and to draw the report, and up to "
                                               f"{STOP_GRACE_S:.0f} s for a training program that is stopped to end "
                                               "[no limit]", type=float)
    quick: bool = option(False, "small defaults that finish in under 5 minutes on a 2-core CPU", action="store_true")


DEFAULTS = {  # (device of the single-device modes, --quick) -> defaults for the None fields
    ("cuda", False): dict(batch=128, warmup=10, steps=50, batches=(32, 64, 128, 256, 512), precision_modes=SWEEP_MODES),
    ("cpu", False): dict(batch=16, warmup=2, steps=20, batches=(4, 8, 16, 32), precision_modes=SWEEP_MODES),
    ("cuda", True): dict(batch=64, warmup=3, steps=10, batches=(16, 128), precision_modes=SWEEP_MODES),
    ("cpu", True): dict(batch=8, warmup=1, steps=3, batches=(16,), precision_modes=("towers",)),
}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: .ci/gpu refuses a --time-limit beside its own, which an abbreviation would pass
    parser = Parser(prog="python -m benchmarks.run", description=__doc__, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, BenchConfig)
    return parser


class DevicePlan(NamedTuple):
    single: str  # device of single/torchvision: "cuda" or "cpu"
    two_rank: Optional[str]  # device of towers/ddp, None when skipped
    backend: Optional[str]  # "nccl" or "gloo"
    gpu_name: Optional[str]
    note: str  # why it is so, for the report


def plan_devices(config: BenchConfig) -> DevicePlan:
    gpus = 0 if config.device == "cpu" else torch.cuda.device_count()
    if config.device == "cuda" and gpus == 0:
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")
    if gpus == 0:
        why = "--device cpu" if config.device == "cpu" and torch.cuda.is_available() else "no GPU"
        return DevicePlan("cpu", "cpu", "gloo", None, f"{why}: every mode on the CPU, two-rank modes over gloo")
    name = torch.cuda.get_device_name(0)
    if gpus >= 2:
        return DevicePlan("cuda", "cuda", "nccl", name, f"{gpus} GPUs: two-rank modes over NCCL, rank r on cuda:r")
    if config.one_gpu_two_rank == "gpu":
        return DevicePlan("cuda", "cuda", "gloo", name, "one GPU: two-rank modes share it, one process each, over gloo "
                                                       "(NCCL refuses two ranks on one GPU); their compute contends for "
                                                       "the one GPU")
    if config.one_gpu_two_rank == "skip":
        return DevicePlan("cuda", None, None, name, "one GPU, which cannot host two NCCL ranks: towers and ddp "
                                                   "skipped (--one-gpu-two-rank skip)")
    return DevicePlan("cuda", "cpu", "gloo", name, "one GPU, which cannot host two NCCL ranks: single and "
                                                  "torchvision on the GPU, towers and ddp on the CPU over gloo "
                                                  "(not comparable with the GPU rows)")


def resolve(config: BenchConfig, devices: DevicePlan) -> BenchConfig:
    """Fills the None fields and checks the values."""
    defaults = DEFAULTS[(devices.single, config.quick)]
    cores = usable_cores()  # of this process: a container's or taskset's limit
    defaults = dict(defaults, loader_workers=(0, 1) if config.quick else
                    (0,) + tuple(2 ** i for i in range(cores.bit_length()) if 2 ** i <= cores),
                    loader_batches=3 if config.quick else 20)
    config = replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})
    if not (1 <= config.steps <= MAX_STEPS and 0 <= config.warmup <= MAX_STEPS):
        raise ValueError(f"--steps must be from 1 and --warmup from 0, each to {MAX_STEPS:,}, got {config.steps} and "
                         f"{config.warmup}")
    if config.compile_modes and config.warmup < 1:
        raise ValueError("--compile-modes needs --warmup 1 or more: the first step compiles, and is not to be timed")
    if config.compile_modes:
        check_compile_backend(config.compile_backend, "--compile-backend", devices.single)
    split = ("ddp", "hybrid")
    ddp_batches = ((config.batch,) if set(split) & set(config.modes + config.precision_modes) else ()) + \
        (config.batches if set(split) & set(config.sweep_modes) else ())
    if min((config.batch,) + config.batches) < 1 or any(b % 2 for b in ddp_batches):
        raise ValueError(f"batches must be positive, and even where ddp or hybrid runs (they halve the global "
                         f"batch): --batch {config.batch} --batches {','.join(map(str, config.batches))}")
    if not 0 <= config.seed < 2**32:
        raise ValueError(f"--seed must be an integer from 0 to {2**32 - 1}, got {config.seed}")
    if not 0 < config.bf16_slowdown_limit <= 1e300:  # a number the report can be redrawn from
        raise ValueError(f"--bf16-slowdown-limit must be a positive number of times fp32's step, "
                         f"got {config.bf16_slowdown_limit:.15g}")
    if config.time_limit is not None and not 0 < config.time_limit <= MAX_TIMEOUT_S:
        raise ValueError(f"--time-limit must be a positive number of seconds, at most {MAX_TIMEOUT_S:.0f} (a week), "
                         f"got {config.time_limit:.15g}")
    for link in config.links:
        name, _, gb_s = link.partition("=")
        # bounded, so that a transfer's time is a number: 10^400 GB/s is inf, 10^-311 makes the time inf
        if not re.fullmatch(r"\d+(\.\d+)?", gb_s) or not 1e-6 <= float(gb_s) <= 1e300:
            raise ValueError(f"--links takes NAME=GB/s items such as nvlink=300, the GB/s a decimal number from "
                             f"0.000001 to 10^300; got {link!r}")
        if not re.fullmatch(r"\w([\w .+/()-]*[\w.+)])?", name):  # a cell of the report's tables, on one line
            raise ValueError(f"--links names a link in letters, digits, spaces and . + - / ( ), starting with a "
                             f"letter or digit, such as nvlink or 'PCIe 4.0': got {name!r}")
    twice = repeated([link.partition("=")[0] for link in config.links])
    if twice is not None:  # two rows of one name in the projection, and its chart's bars one behind the other
        raise ValueError(f"--links names {twice} twice: give each link once")
    if not 0 <= config.link_latency_us <= 1e6:
        raise ValueError(f"--link-latency-us must be a number of microseconds from 0 to 1,000,000 (a second), got "
                         f"{config.link_latency_us:.15g}")
    if not 1 <= config.rank_timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"--rank-timeout-s must be a number of seconds from 1 to {MAX_TIMEOUT_S:.0f} (a week), "
                         f"got {config.rank_timeout_s:.15g}")
    if config.out is not None and not config.out.strip():
        raise ValueError("--out is empty: give a folder, or leave --out out for "
                         "benchmarks/reports/<host>-<device>-<date>")
    refuse_empty(loader_data=config.loader_data)  # else the current folder, and the program on the built-in set
    if config.loader_batches < 1 or min(config.loader_workers) < 0:
        raise ValueError(f"--loader-batches must be at least 1 and --loader-workers at least 0, got "
                         f"{config.loader_batches} and {','.join(map(str, config.loader_workers))}")
    most = MAX_PROCESSES_PER_CORE * cores
    if max(config.loader_workers) > most:  # as the training program's --workers
        raise ValueError(f"--loader-workers {max(config.loader_workers)} would start that many loading processes on "
                         f"the {cores} cores this benchmark may use: give at most {most}")
    return config


class RunKey(NamedTuple):
    mode: str
    batch: int
    precision: str
    memory_format: str
    compiled: bool = False


def main_runs(config: BenchConfig) -> list:
    """The main table's runs: each mode at the main batch, fp32, contiguous."""
    return [RunKey(m, config.batch, "fp32", "contiguous") for m in config.modes]


def plan_runs(config: BenchConfig) -> list:
    """Every distinct run, fp32 before bf16 (the bf16 check compares with fp32), in the order of
    need should a --time-limit cut them short: the main table, the precision and memory-format
    sweep, the projection's half batch, the batch-size sweep, the compiled runs (slow to start)."""
    main = main_runs(config)
    sweep = [RunKey(m, b, "fp32", "contiguous") for b in sorted(config.batches) for m in config.sweep_modes]
    # the projection's DDP compute: one rank's work is the single net on half the batch
    half = ([RunKey("single", config.batch // 2, "fp32", "contiguous")]
            if config.batch % 2 == 0 and "single" in config.modes else [])
    precisions = sorted(config.precisions, key=PRECISIONS.index)
    sweep_pf = [RunKey(m, config.batch, p, f) for p in precisions for f in config.memory_formats
                for m in config.precision_modes]
    compiled = [RunKey(m, config.batch, p, f, True) for p in precisions for f in config.memory_formats
                for m in config.compile_modes]
    return list(dict.fromkeys(main + sweep_pf + half + sweep + compiled))


def device_of(key: RunKey, devices: DevicePlan) -> Optional[str]:
    """Where a run's ranks compute: with --one-gpu-two-rank cpu, the multi-rank modes on another device."""
    return devices.two_rank if key.mode in MULTI_RANK_MODES else devices.single


def run_spec(key: RunKey, config: BenchConfig, devices: DevicePlan, weights: dict) -> dict:
    two_rank = key.mode in MULTI_RANK_MODES
    return {**key._asdict(), "warmup": config.warmup, "steps": config.steps, "seed": config.seed,
            "fc8_placement": config.fc8_placement, "compile_backend": config.compile_backend,
            "device": device_of(key, devices),
            "backend": devices.backend if two_rank else "none (one process)",
            "collective_timeout_s": config.rank_timeout_s,
            # where a collective's time needs the device waited for: steps of their own (workers._exchange_steps)
            "exchange_steps": two_rank and devices.two_rank == "cuda", **weights}


def execute(spec: dict, config: BenchConfig, devices: DevicePlan, timeout_s: float) -> list:
    worker = WORKERS[spec["mode"]]
    if spec["mode"] in MULTI_RANK_MODES:
        return run_ranks(worker, (spec,), world_size=RANKS[spec["mode"]], backend=devices.backend, timeout_s=timeout_s)
    # one rank, all threads; its process group (gloo, size 1) is never used
    return run_ranks(worker, (spec,), world_size=1, backend="gloo", timeout_s=timeout_s,
                     threads_per_rank=cpu_threads_per_rank(1))


def analytic_figures(config: BenchConfig) -> dict:
    reference = flops.reference_layers()
    tv = flops.torchvision_layers()
    sizes = flops.param_sizes(AlexNet)
    num_params = sum(sizes)
    crossover = {p: {placement: traffic.crossover_batch(reference, placement, num_params, ELEMENT_SIZE[p])
                     for placement in FC8_PLACEMENTS} for p in PRECISIONS}
    tower_sizes = flops.tower_param_sizes(config.fc8_placement)
    tower_params = [sum(tower) for tower in tower_sizes]
    return {
        "reference_layers": {k: asdict(v) for k, v in reference.items()},
        "torchvision_layers": {k: asdict(v) for k, v in tv.items()},
        "macs_per_image": {
            "single": sum(l.macs for l in reference.values()),
            "ddp": sum(l.macs for l in reference.values()),
            "towers": [flops.tower_macs(reference, r, config.fc8_placement) for r in range(TOWERS)],
            "hybrid": [flops.tower_macs(reference, r, config.fc8_placement) for r in range(TOWERS)],
            "torchvision": sum(l.macs for l in tv.values()),
        },
        "num_params": num_params,
        "towers_sent_elements_per_image": traffic.tower_sent_elements(reference, config.fc8_placement),
        "towers_calls_per_step": traffic.exchange_calls(reference, config.fc8_placement),
        "ddp_payload_bytes_per_rank": traffic.ddp_payload_bytes(num_params),
        "ring_factor": traffic.ring_factor(2),
        "ddp_bytes_per_rank": traffic.ddp_bytes_per_rank(num_params),
        "crossover_batch": crossover,
        "tower_params": tower_params,
        "ddp_buckets": traffic.ddp_buckets(sizes),  # all-reduces per step, where not measured
        "tower_buckets": [traffic.ddp_buckets(tower) for tower in tower_sizes],
        "training_flops_per_mac": flops.TRAINING_FLOPS_PER_MAC,
    }


def _percentiles(seconds: list) -> dict:
    p10, median, p90 = np.percentile(np.array(seconds) * 1e3, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


def _exact(value: float):
    return int(value) if float(value).is_integer() else value


def summarize(spec: dict, ranks: list, analytic: dict, devices: DevicePlan) -> dict:
    """One run's numbers from its ranks' raw results. A step ends when the slowest rank's does."""
    mode, batch, steps = spec["mode"], spec["batch"], spec["steps"]
    step_s = [max(per_rank) for per_rank in zip(*(r["step_s"] for r in ranks))]
    step_ms = _percentiles(step_s)
    run = {
        **{k: spec[k] for k in ("mode", "batch", "precision", "memory_format", "compiled", "device", "backend",
                                 "warmup", "steps")},
        "ranks": len(ranks), "devices": [r["device"] for r in ranks], "threads": [r["threads"] for r in ranks],
        "step_ms": step_ms, "step_ms_raw": [s * 1e3 for s in step_s],
        "images_per_s": batch / (step_ms["median"] / 1e3),
        "peak_memory_bytes": [r["peak_memory_bytes"] for r in ranks], "memory_kind": ranks[0]["memory_kind"],
        "rss_at_start_bytes": [r["rss_at_start_bytes"] for r in ranks],
        "param_bytes": [r["param_bytes"] for r in ranks], "final_loss": [r["final_loss"] for r in ranks],
    }
    if mode in ("ddp", "hybrid"):
        run["compute_ms"] = [_percentiles(r["compute_only_s"])["median"] for r in ranks]
        run["allreduce_alone_ms"] = [_percentiles(r["allreduce_alone_s"])["median"] for r in ranks]
        run["payload_bytes_per_rank"] = [r["payload_bytes"] / steps for r in ranks]
        run["buckets_per_step"] = [r["buckets"] for r in ranks]  # the last step's
        # what the gradient all-reduce added to the step: DDP overlaps it with the backward pass
        run["comm_ms"] = [_percentiles(r["step_s"])["median"] - c for r, c in zip(ranks, run["compute_ms"])]
    if mode == "towers":
        element_size = ELEMENT_SIZE[spec["precision"]]
        run["comm_ms"] = [_percentiles(r["comm_s"])["median"] for r in ranks]
        run["compute_ms"] = [_percentiles([s - c for s, c in zip(r["comm_step_s"], r["comm_s"])])["median"]
                             for r in ranks]
        assert all(r["sent_bytes"] % steps == 0 for r in ranks), "exchange traffic differs between steps"
        run["bytes_per_rank"] = [r["sent_bytes"] // steps for r in ranks]
        run["bytes_per_rank_analytic"] = [n * batch * element_size
                                          for n in (sum(t.values()) for t in analytic["towers_sent_elements_per_image"])]
        run["calls_per_step"] = [r["calls"] / steps for r in ranks]
        run["exchanges"] = [{key: {"calls_per_step": e["calls"] / steps,
                                   "sent_bytes_per_step": e["sent_bytes"] / steps,
                                   "received_bytes_per_step": e["received_bytes"] / steps,
                                   "bytes_per_element": (e["sent_bytes"] or e["received_bytes"]) /
                                                        max(1, e["sent_elements"] or e["received_elements"]),
                                   "sent_bytes_per_step_analytic": sent.get(key, 0) * batch * element_size}
                             for key, e in r["exchanges"].items()}
                            for r, sent in zip(ranks, analytic["towers_sent_elements_per_image"])]
    elif mode == "hybrid":
        replicas = ranks[0]["replicas"]
        figures = traffic.hybrid_bytes_per_rank(flops.reference_layers(), spec["fc8_placement"], batch, replicas,
                                                ELEMENT_SIZE[spec["precision"]], analytic["tower_params"])
        towers = [r["tower"] for r in ranks]
        run["replicas"] = replicas
        run["exchange_ms"] = [_percentiles(r["comm_s"])["median"] for r in ranks]
        run["hidden_share"] = [max(0.0, min(1.0, 1 - c / a)) if a > 0 else None
                               for c, a in zip(run["comm_ms"], run["allreduce_alone_ms"])]
        assert all(r["sent_bytes"] % steps == 0 for r in ranks), "exchange traffic differs between steps"
        run["exchange_bytes_per_rank"] = [r["sent_bytes"] // steps for r in ranks]
        run["exchange_bytes_per_rank_analytic"] = [figures["exchange"][t] for t in towers]
        run["gradient_bytes_per_rank"] = [_exact(traffic.ring_factor(replicas) * r["payload_bytes"] / steps)
                                          for r in ranks]
        run["gradient_bytes_per_rank_analytic"] = [_exact(figures["gradients"][t]) for t in towers]
        run["bytes_per_rank"] = [e + g for e, g in zip(run["exchange_bytes_per_rank"], run["gradient_bytes_per_rank"])]
        run["bytes_per_rank_analytic"] = [e + g for e, g in zip(run["exchange_bytes_per_rank_analytic"],
                                                                run["gradient_bytes_per_rank_analytic"])]
    elif mode == "ddp":
        run["bytes_per_rank"] = [_exact(analytic["ring_factor"] * r["payload_bytes"] / steps) for r in ranks]
        run["bytes_per_rank_analytic"] = [_exact(analytic["ddp_bytes_per_rank"])] * len(ranks)
    else:
        run["comm_ms"] = None
        run["compute_ms"] = [step_ms["median"]]
        run["bytes_per_rank"] = run["bytes_per_rank_analytic"] = [0]
    run["bytes_total"] = sum(run["bytes_per_rank"])
    run["bytes_total_analytic"] = sum(run["bytes_per_rank_analytic"])
    macs = analytic["macs_per_image"][mode]
    run["flops_per_step"] = flops.training_flops(sum(macs) if isinstance(macs, list) else macs, batch)
    flop_per_s = run["flops_per_step"] / (step_ms["median"] / 1e3)
    run["gflop_per_s"] = flop_per_s / 1e9
    run["peak"] = None
    known = devices.gpu_name and flops.gpu_peak(devices.gpu_name)
    if spec["device"] == "cuda" and known:
        math_mode = "bf16" if spec["precision"] == "bf16" else convolution_math()
        tflops = known[1][math_mode]
        gpus = len({r["device"] for r in ranks})  # over gloo on one GPU, two ranks share it
        run["peak"] = {"gpu": known[0], "math": math_mode, "tflop_per_s_per_device": tflops, "devices": gpus,
                       "share": flop_per_s / (tflops * 1e12 * gpus)}
    return run


def projection(runs: dict, config: BenchConfig, analytic: dict) -> dict:
    """Step time on a two-GPU machine with the given links, from measured compute times."""
    single = runs.get(RunKey("single", config.batch, "fp32", "contiguous"))
    towers = runs.get(RunKey("towers", config.batch, "fp32", "contiguous"))
    ddp = runs.get(RunKey("ddp", config.batch, "fp32", "contiguous"))
    half = runs.get(RunKey("single", config.batch // 2, "fp32", "contiguous"))
    if single is None:
        return {"skipped": "the single mode was not measured at the main batch, so there is no compute time to project from"}
    macs = analytic["macs_per_image"]
    # Ranks sharing a GPU take turns on it (each CUDA context its own time slices): one's compute
    # holds the other's kernels too, not what a GPU of its own would take. CPU ranks have their cores.
    one_gpu = lambda r: r is not None and r["devices"][0].startswith("cuda") and len(set(r["devices"])) == 1
    towers_measured = towers is not None and not one_gpu(towers) \
        and towers["devices"][0].split(":")[0] == single["devices"][0].split(":")[0]
    if towers_measured:
        tower_compute_ms, tower_source = max(towers["compute_ms"]), "measured: towers' compute (step minus exchange), slower rank"
    else:
        tower_compute_ms = single["step_ms"]["median"] * max(macs["towers"]) / macs["single"]
        tower_source = "estimated: single step x the busier tower's share of the FLOPs " + (
            "(the towers' ranks shared one GPU, each slowed by the other's kernels)" if one_gpu(towers) else
            "(towers not measured: see 'Not measured')" if towers is None else
            f"(the towers ran on {towers['devices'][0].split(':')[0]}, not on single's device)")
    if towers_measured and ddp is not None and ddp["devices"] == towers["devices"] and not one_gpu(ddp):
        # Like for like: two ranks sharing the devices as the towers' two did, not one process alone.
        ddp_compute_ms = max(ddp["compute_ms"])
        ddp_source = "measured: ddp's compute (its steps without the all-reduce), slower rank"
    elif config.batch % 2:  # ddp's two ranks take half the batch each: an odd batch has no half (and no ddp run)
        ddp_compute_ms, ddp_source = None, (f"not projected: the batch, {config.batch}, is odd, which two "
                                            f"data-parallel ranks cannot split")
    elif half is not None:  # one process at half the batch, on single's device (as the towers' estimate is)
        ddp_compute_ms, ddp_source = half["step_ms"]["median"], f"measured: single at batch {half['batch']}"
        if towers_measured:
            ddp_source += " (one process, alone on its device: the towers' two ranks shared theirs)"
    else:
        own = f"ddp was not run at batch {config.batch}" if ddp is None else (
            "ddp's own compute counts only where the towers' was measured on single's kind of device, with ddp's "
            "ranks on the same devices as the towers', neither sharing one GPU")
        ddp_compute_ms, ddp_source = None, f"not projected: single was not run at batch {config.batch // 2}, and {own}"
    tower_bytes = max(sum(t.values()) for t in analytic["towers_sent_elements_per_image"]) * config.batch * 4
    ddp_bytes = analytic["ddp_bytes_per_rank"]
    ddp_calls = ddp["buckets_per_step"][0] if ddp else analytic["ddp_buckets"]
    links = []
    for link in config.links:
        name, _, gb_s = link.partition("=")
        gb_s = float(gb_s)
        tower_link_s = traffic.link_time_s(tower_bytes, analytic["towers_calls_per_step"], gb_s, config.link_latency_us)
        entry = {"link": name, "gb_per_s": gb_s, "towers_link_ms": tower_link_s * 1e3,
                 "towers_ms": tower_compute_ms + tower_link_s * 1e3}
        if ddp_compute_ms is not None:
            ddp_link_ms = traffic.link_time_s(ddp_bytes, ddp_calls, gb_s, config.link_latency_us) * 1e3
            entry.update(ddp_link_ms=ddp_link_ms, ddp_serial_ms=ddp_compute_ms + ddp_link_ms,
                         ddp_overlapped_ms=max(ddp_compute_ms, ddp_link_ms))
        links.append(entry)
    return {
        "batch": config.batch, "single_ms": single["step_ms"]["median"],
        "tower_compute_ms": tower_compute_ms, "tower_compute_source": tower_source,
        "ddp_compute_ms": ddp_compute_ms, "ddp_compute_source": ddp_source,
        "towers_bytes_per_direction": tower_bytes, "towers_calls": analytic["towers_calls_per_step"],
        "ddp_bytes_per_direction": ddp_bytes, "ddp_calls": ddp_calls, "latency_us": config.link_latency_us,
        "measured": {m: r["step_ms"]["median"] if r else None for m, r in (("towers", towers), ("ddp", ddp))},
        "measured_devices": {m: r["devices"] if r else None for m, r in (("towers", towers), ("ddp", ddp))},
        "links": links,
    }


# The mesh projection: 8 GPUs as 4 replicas of the towers, or as 8 data-parallel ranks.
PROJECTED_GPUS = 8
PROJECTED_BATCHES = tuple(2 ** k for k in range(5, 14))  # 32 .. 8192
# Compute per image where no GPU was measured: this GPU's dense peak of this math at this share.
ASSUMED_GPU, ASSUMED_MATH, ASSUMED_SHARE = "H100", "bf16", 0.4
BACKWARD_SHARE = 2 / 3  # of a step's compute: the part an all-reduce can hide behind (backward = 2 x forward)


def mesh_projection(runs: dict, config: BenchConfig, analytic: dict) -> dict:
    """Step time of PROJECTED_GPUS GPUs on the first --links link: hybrid (replicas of the
    towers) against plain data parallel, over global batches, and where each wins.

    Per step, each way: compute (per-image time x the rank's images, a tower doing its share
    of the FLOPs), plus what the gradient all-reduce does not hide behind the backward pass
    (DDP's buckets start as gradients are ready; at best they hide behind the backward's
    share of the compute), plus for hybrid the towers' exchanges, which block the next
    layer. Exchanges and all-reduces use the ring and link model of the two-GPU projection."""
    name, _, gb_s = config.links[0].partition("=")
    gb_s = float(gb_s)
    macs = analytic["macs_per_image"]
    single = runs.get(RunKey("single", config.batch, "fp32", "contiguous"))
    if single is not None and single["device"] == "cuda":
        per_image_ms = single["step_ms"]["median"] / config.batch
        element_size, source = 4, f"measured: the single mode's fp32 step on {single['devices'][0]}, per image"
    else:
        tflops = flops.GPU_PEAK_TFLOPS[ASSUMED_GPU][ASSUMED_MATH]
        per_image_ms = flops.training_flops(macs["single"], 1) / (tflops * 1e12 * ASSUMED_SHARE) * 1e3
        element_size = ELEMENT_SIZE[ASSUMED_MATH]
        source = (f"assumed, no GPU measured: {ASSUMED_GPU} at {100 * ASSUMED_SHARE:.0f} % of its dense "
                  f"{ASSUMED_MATH} peak ({tflops:g} TFLOP/s), {ASSUMED_MATH} activations")
    replicas = PROJECTED_GPUS // TOWERS
    tower_share = max(macs["towers"]) / macs["single"]
    reference = flops.reference_layers()
    hybrid_grad_bytes = traffic.ddp_bytes_per_rank(max(analytic["tower_params"]), replicas)
    ddp_grad_bytes = traffic.ddp_bytes_per_rank(analytic["num_params"], PROJECTED_GPUS)
    link = lambda nbytes, calls: traffic.link_time_s(nbytes, calls, gb_s, config.link_latency_us) * 1e3

    def step_ms(batch: int) -> tuple:
        compute = per_image_ms * tower_share * batch / replicas
        exchange = link(max(traffic.towers_bytes_per_rank(reference, config.fc8_placement, batch / replicas,
                                                          element_size)), analytic["towers_calls_per_step"])
        grad = link(hybrid_grad_bytes, max(analytic["tower_buckets"]))
        hybrid = compute + exchange + max(0.0, grad - BACKWARD_SHARE * compute)
        ddp_compute = per_image_ms * batch / PROJECTED_GPUS
        ddp_grad = link(ddp_grad_bytes, analytic["ddp_buckets"])
        ddp = ddp_compute + max(0.0, ddp_grad - BACKWARD_SHARE * ddp_compute)
        return {"batch": batch, "hybrid_compute_ms": compute, "hybrid_exchange_ms": exchange,
                "hybrid_allreduce_ms": grad, "hybrid_ms": hybrid, "ddp_compute_ms": ddp_compute,
                "ddp_allreduce_ms": ddp_grad, "ddp_ms": ddp}

    rows = [step_ms(b) for b in PROJECTED_BATCHES]
    # where the faster way changes, to the multiple of PROJECTED_GPUS
    changes, previous = [], None
    for batch in range(PROJECTED_GPUS, 2 * PROJECTED_BATCHES[-1] + 1, PROJECTED_GPUS):
        row = step_ms(batch)
        faster = "hybrid" if row["hybrid_ms"] < row["ddp_ms"] else "ddp"
        if previous is not None and faster != previous:
            changes.append({"batch": batch, "from": previous, "to": faster})
        previous = faster
    return {"gpus": PROJECTED_GPUS, "replicas": replicas, "link": name, "gb_per_s": gb_s,
            "latency_us": config.link_latency_us, "per_image_ms": per_image_ms, "compute_source": source,
            "element_size": element_size, "tower_share": tower_share, "backward_share": BACKWARD_SHARE,
            "hybrid_gradient_bytes_per_rank": hybrid_grad_bytes, "ddp_gradient_bytes_per_rank": ddp_grad_bytes,
            "rows": rows, "changes": changes, "faster_at_the_largest": previous}


def _gpu_names() -> list:
    """The GPUs the machine has, used or not (--device cpu); none where the driver does not answer."""
    try:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
            else []
    except Exception:  # a driver that fails (DeferredCudaCallError is no RuntimeError), which --device cpu avoids
        return []


def machine_info(devices: DevicePlan) -> dict:
    import torchvision
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
        "gpus": _gpu_names(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "device_plan": devices._asdict(),
    }


def _load_average() -> Optional[list]:
    """1, 5 and 15 minute load averages: other work on the machine slows every mode."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(devices: DevicePlan, quick: bool = False) -> Path:
    """The report's folder: a --quick run's is its own, never the full run's of the same day."""
    machine = _slug(socket.gethostname() + "-" + (devices.gpu_name or "cpu"))
    return REPORTS_DIR / f"{machine}-{datetime.date.today().isoformat()}{'-quick' if quick else ''}"


def _bf16_unsupported(key: RunKey, devices: DevicePlan) -> Optional[str]:
    if key.precision == "bf16" and device_of(key, devices) == "cuda" and not native_bf16():
        return f"not measured on this device: the GPU has {NO_NATIVE_BF16}"
    return None


class Deadline:
    """--time-limit: once it passes no run starts, and a run under way is stopped at it."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def timeout(self, limit_s: float) -> float:
        """A run's time limit: ``limit_s``, or what is left before the deadline if less."""
        return min(limit_s, self.left())

    @property
    def reason(self) -> str:
        return f"not measured: the benchmark's --time-limit of {self.seconds:.15g} s was reached"


class Bench:
    """One benchmark's runs, in fresh processes each, and its results.json, written anew after
    every run (so that a benchmark stopped from outside leaves what it measured, from which
    ``report.write_report`` can draw the report). An earlier benchmark's files in the folder
    stay until this one's first results.json replaces theirs, once it holds a figure or a
    failure; its report goes then, not to stand beside another benchmark's results. A
    benchmark whose --time-limit passed before either writes nothing."""

    def __init__(self, config: BenchConfig, devices: DevicePlan, out: Path, argv, deadline: Deadline):
        self.config, self.devices, self.out = config, devices, out
        self.deadline, self.started = deadline, time.perf_counter()
        self.analytic = analytic_figures(config)
        self.keys = plan_runs(config)
        self.runs, self.not_measured, self.weights = {}, [], None
        self.bf16_reasons = {}  # device -> why its bf16 runs are not measured (--bf16-slowdown-limit)
        self.weights_failed = None  # why the weights every run loads could not be drawn
        self.written = False  # whether results.json in ``out`` is this benchmark's
        self.results = {
            "machine": {**machine_info(devices), "load_average": {"start": _load_average(), "end": None}},
            "config": asdict(config),
            "command": " ".join(["python -m benchmarks.run", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
            "date": datetime.date.today().isoformat(), "analytic": self.analytic,
            "planned_runs": len(self.keys), "loader": None, "program": None,
        }

    def save(self) -> dict:
        runs = self.runs
        self.results.update(runs=list(runs.values()), not_measured=self.not_measured,
                            projection=projection(runs, self.config, self.analytic),
                            mesh_projection=mesh_projection(runs, self.config, self.analytic),
                            elapsed_s=time.perf_counter() - self.started)
        self.results["machine"]["load_average"]["end"] = _load_average()
        if not self.written and not self.has_news():  # an earlier report stays, whole
            return self.results
        # strict JSON: a loss that diverged (NaN, infinite) is written null, as benchmarks.report reads it
        path, text = self.out / "results.json", json.dumps(_finite(self.results), indent=1, default=str,
                                                            allow_nan=False)
        try:
            write_whole(path, lambda partial: partial.write_text(text))  # as the report's files are
        except OSError as error:  # a full disk, or a folder that went or turned read-only
            kept = (f"; {path.name} there holds the runs measured before" if self.written else
                    f"; {path.name} there is an earlier benchmark's, as it was" if path.exists() else "")
            raise ValueError(f"cannot write {path} ({error.strerror or error}): free space on that disk, or give "
                             f"--out a folder that can be written{kept}") from None
        if not self.written:
            self.written = True
            self.remove_earlier_report()
        return self.results

    def has_news(self) -> bool:
        """Whether a run, the data loader or the training program has given a figure, or a reason
        of its own not to (a failure, a mode this machine cannot run): not the --time-limit's."""
        loader, program = self.results["loader"] or {}, self.results["program"] or []
        reasons = [entry["reason"] for entry in self.not_measured] + [loader.get("skipped") or ""] + \
            [entry["failed"] for entry in program if "failed" in entry]
        cut = self.deadline.reason if self.deadline.seconds is not None else None
        return bool(self.runs or loader.get("by_workers") or loader.get("failed_workers")
                    or any("failed" not in entry for entry in program)
                    or any(reason and not (cut and reason.startswith(cut)) for reason in reasons))

    def remove_earlier_report(self) -> None:
        """The files of an earlier benchmark's report, which must not stand beside this one's results."""
        from .report import REPORT_FILES
        earlier = [name for name in REPORT_FILES if name != "results.json" and (self.out / name).exists()]
        for name in earlier:
            (self.out / name).unlink(missing_ok=True)
        if earlier:
            logger.info("%s: removed the earlier benchmark's %s, as results.json there is now this one's", self.out,
                        ", ".join(earlier))

    def draw_weights(self, folder: str) -> None:
        """The reference from the seed and its two tower shards, as files in ``folder`` that every run
        loads; left undrawn if the deadline comes first."""
        timeout_s = self.deadline.timeout(self.config.rank_timeout_s)
        if timeout_s <= 0:  # passed since the caller looked
            return
        started = time.monotonic()
        try:
            self.weights = run_ranks(weights_worker, (self.config.seed, self.config.fc8_placement, folder),
                                     world_size=1, timeout_s=timeout_s)[0]
        except RankFailure as failure:
            if self.deadline.left() <= 0:
                return
            cause = failure.failures[failure.first]
            if cause.startswith(f"{WeightsNotWritten.__module__}.{WeightsNotWritten.__name__}: "):
                raise ValueError(cause.split(": ", 1)[1]) from None
            if time.monotonic() - started >= timeout_s:  # every run would time out the same way
                raise ValueError(f"drawing the reference's weights took longer than --rank-timeout-s "
                                 f"{self.config.rank_timeout_s:.15g} ({failure}): give a longer "
                                 f"--rank-timeout-s") from None
            # its process killed (the out-of-memory killer): no run can start; the loader and program can
            self.weights_failed = f"failed: the weights every run loads could not be drawn ({failure})"
            logger.warning("%s", self.weights_failed)

    def measure(self, keys: list, folder: str) -> None:
        """Runs the planned runs of ``keys``; the weights every run loads are drawn into ``folder`` first."""
        config, devices = self.config, self.devices
        for key in keys:
            index = len(self.runs) + len(self.not_measured) + 1
            reason = _bf16_unsupported(key, devices) or \
                (self.bf16_reasons.get(device_of(key, devices)) if key.precision == "bf16" else None)
            if key.mode in MULTI_RANK_MODES and devices.two_rank is None:
                reason = f"skipped: {devices.note}"
            elif key.mode == "hybrid" and devices.backend == "nccl" and torch.cuda.device_count() < RANKS["hybrid"]:
                reason = (f"skipped: NCCL needs one GPU per rank and hybrid has {RANKS['hybrid']} ranks; this machine "
                          f"shows {torch.cuda.device_count()} GPUs")
            if not reason and self.weights is None and self.weights_failed is None and self.deadline.left() > 0:
                self.draw_weights(folder)
            if not reason and self.weights is None and self.weights_failed is not None:
                reason = self.weights_failed
            timeout_s = self.deadline.timeout(config.rank_timeout_s)  # one look: it may pass between two
            if not reason and timeout_s <= 0:
                reason = self.deadline.reason
            if reason:
                self.not_measured.append({**key._asdict(), "reason": reason})
                continue
            spec = run_spec(key, config, devices, self.weights)
            try:
                ranks = execute(spec, config, devices, timeout_s)
            except RankFailure as failure:
                stopped = self.deadline.left() <= 0  # by the --time-limit, not a failure of its own
                why = f"{self.deadline.reason} while it ran" if stopped else f"failed: {str(failure).splitlines()[0]}"
                logger.warning("[%d/%d] %s batch %d %s %s%s %s", index, len(self.keys), key.mode, key.batch,
                               key.precision, key.memory_format, " compiled" * key.compiled,
                               why if stopped else f"failed: {failure}")
                self.not_measured.append({**key._asdict(), "reason": why})
                self.save()
                continue
            run = self.runs[key] = summarize(spec, ranks, self.analytic, devices)
            logger.info("[%d/%d] %-11s batch %4d %s %-13s%s %8.1f images/s  %8.1f ms/step [p10 %.1f, p90 %.1f]  "
                        "(%.0f s)", index, len(self.keys), key.mode, key.batch, key.precision, key.memory_format,
                        " compiled" * key.compiled, run["images_per_s"],
                        run["step_ms"]["median"], run["step_ms"]["p10"], run["step_ms"]["p90"],
                        time.perf_counter() - self.started)
            self.save()
            fp32 = (self.runs.get(key._replace(precision="fp32"))
                    or self.runs.get(key._replace(precision="fp32", memory_format="contiguous")))
            if key.precision == "bf16" and run["device"] not in self.bf16_reasons and fp32 is not None:
                slowdown = run["step_ms"]["median"] / fp32["step_ms"]["median"]
                if slowdown > config.bf16_slowdown_limit:
                    self.bf16_reasons[run["device"]] = (
                        f"not measured on this device ({run['device']}): bf16 autocast ran {slowdown:.1f}x slower "
                        f"than fp32 in {key.mode} (limit --bf16-slowdown-limit {config.bf16_slowdown_limit})")

    def run(self, loader_data) -> dict:
        """The main table first, then the data loader and the training program (measured against the
        main table), then the sweeps: what a --time-limit cuts short is the least needed."""
        config, devices, keys = self.config, self.devices, self.keys
        main = [k for k in keys if k in set(main_runs(config))]
        logger.info("%s; %d runs; writing to %s", devices.note, len(keys), self.out)
        with temporary_folder("alexnet-bench-") as folder:
            self.measure(main, folder)
            if self.deadline.left() > 0:
                logger.info("data loader: %s workers, %d batches of %d", ",".join(map(str, config.loader_workers)),
                            config.loader_batches, config.batch)
                try:
                    self.results["loader"] = measure_loader(config.loader_workers, config.batch,
                                                            config.loader_batches, devices.single, loader_data,
                                                            self.deadline)
                except (RuntimeError, OSError) as error:  # a worker that died (a /dev/shm too small for its
                    # batches): recorded, as a failed run is, and the rest of the benchmark goes on
                    logger.warning("data loader: failed: %s", error_line(error))
                    self.results["loader"] = {"skipped": f"failed: {error_line(error)}"}
            else:
                self.results["loader"] = {"skipped": self.deadline.reason}
            self.save()
            if self.deadline.left() > 0:
                logger.info("the training program: %s, %d + %d steps of %d", ",".join(config.program_modes),
                            config.warmup, config.steps, config.batch)
            # each layout where its synthetic run was: --one-gpu-two-rank cpu put the towers on the CPU
            program_devices = {"single": devices.single, "towers": devices.two_rank or devices.single}
            self.results["program"] = measure_program(config.program_modes, config.batch, config.steps, config.warmup,
                                                      program_devices, config.loader_data, None, config.fc8_placement,
                                                      config.rank_timeout_s, self.deadline)
            self.save()
            self.measure([k for k in keys if k not in main], folder)
        results = self.save()
        if not self.written:
            raise ValueError(f"the --time-limit of {self.config.time_limit:.15g} s passed before anything was "
                             f"measured: give a longer one; nothing was written in {self.out}")
        return results


def _finite(value):
    """``value`` with each float that is not finite replaced by None."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _written_by(path: Path, program: str) -> bool:
    """Whether ``path`` is a results.json that ``python -m program`` wrote (benchmarks.ablations
    keeps its machine, config and command under "info")."""
    if not path.is_file():  # not a FIFO, which would wait for a writer for good
        return False
    try:
        results = json.loads(path.read_text())
    except (OSError, *JSON_DAMAGE):
        return False
    if not isinstance(results, dict) or not isinstance(header := results.get("info", results), dict):
        return False
    command = str(header.get("command", ""))
    return ("runs" in results and {"machine", "config"} <= header.keys()
            and (command == f"python -m {program}" or command.startswith(f"python -m {program} ")))


def refuse_others_files(out: Path, names: tuple, program: str) -> list:
    """The files of ``names`` (what ``python -m program`` writes in its report folder) that
    ``out`` holds already: an earlier report of ``program``'s, to be replaced. Where no
    results.json of ``program`` is beside them they are the user's or another tool's (a
    benchmark's report under an ablation's, its charts left beside), and ValueError names the fix."""
    try:
        folders = [name for name in names if (out / name).is_dir()]
        earlier = [name for name in names if (out / name).exists()]
    except OSError as error:  # a name too long
        raise ValueError(f"--out {out}: {error.strerror}: give another folder") from None
    if folders:  # which a report can neither replace nor remove
        raise ValueError(f"--out {out} holds a folder named {folders[0]}, where python -m {program} writes a file: "
                         f"give another folder, or move it")
    if earlier and not _written_by(out / "results.json", program):
        raise ValueError(f"--out {out} holds {', '.join(earlier)} that python -m {program} did not write (no "
                         f"results.json of its own beside them): give another folder, or move them")
    return earlier


@contextlib.contextmanager
def held(folder: Path, flag: str):
    """An exclusive lock on ``folder`` (given with ``flag``) while a benchmark program
    (benchmarks.run, .ablations or .report) writes there, released by the system however the
    process ends: two benchmarks given one --out would each replace the other's results.json
    and leave one's report beside the other's results; two ablations given one --runs, train
    into one run folder; a report redrawn while its benchmark runs, call its runs to come
    never started."""
    try:
        opened, unlocked = lock_folder(folder)
    except BlockingIOError:
        other = f", or give another {flag}" if flag.startswith("--") else ""
        raise ValueError(f"{flag} {folder} is in use by another benchmark program writing there: wait for it to "
                         f"end{other}") from None
    except OSError as error:
        raise ValueError(f"{flag} {folder}: cannot open this folder ({error.strerror}); give one that can be read and "
                         f"written") from None
    try:
        if unlocked is not None:
            logger.warning("%s %s cannot be locked (%s): nothing stops another benchmark program from writing there "
                           "at the same time", flag, folder, unlocked.strerror)
        yield
    finally:
        os.close(opened)


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = BenchConfig(**vars(build_parser().parse_args(argv)))
    try:
        return _main(config, argv)
    except KeyboardInterrupt as interrupt:
        if not isinstance(interrupt, Said):
            logger.error("interrupted before the first run was measured: nothing was written")
        raise


class Said(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) whose consequences main has logged already."""


def _main(config: BenchConfig, argv) -> Path:
    devices = plan_devices(config)
    config = resolve(config, devices)
    deadline = Deadline(config.time_limit)  # from here: the built-in data may be made first, and CUDA started
    stale = remove_stale_folders()  # the space a benchmark killed outright took, before this one takes its own
    if stale:
        logger.info("removed the temporary folders of benchmarks killed before they ended: %s",
                    ", ".join(map(str, stale)))
    loader_data = open_loader_data(config.loader_data, config.batch)  # a bad folder fails before anything runs
    out = home_path(config.out) if config.out is not None else default_out(devices, config.quick)
    data_module.check_outside_the_images("--out", str(out), loader_data.root)  # the program trains on that data
    pyplot()  # where matplotlib cannot start, before the runs, not after them
    made = []  # the folders made for --out, parents first: not left behind by a benchmark that wrote nothing there
    try:
        try:
            make_folder(out, made)
        except OSError as error:
            raise ValueError(f"--out {out}: cannot make that folder ({error.strerror}); give a folder that can be "
                             f"written") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: this folder cannot be written; give another")
        with held(out, "--out"):  # to the end: a second benchmark on the same --out is refused
            return _bench_in(out, config, devices, argv, deadline, loader_data)
    except BaseException:  # refused or stopped: a folder made for it stays only where something is in it
        remove_made(made)
        raise


def _bench_in(out: Path, config: BenchConfig, devices, argv, deadline, loader_data) -> Path:
    """_main's runs and report, in ``out``, which it holds."""
    from .report import REPORT_FILES
    earlier = refuse_others_files(out, REPORT_FILES, "benchmarks.run")  # replaced once this one's first run ends
    if earlier:
        logger.info("%s holds an earlier benchmark's %s: kept until this one's first results are written", out,
                    ", ".join(earlier))
    bench = None
    try:
        bench = Bench(config, devices, out, argv, deadline)
        results = bench.run(loader_data)
    except KeyboardInterrupt:
        if bench is not None and bench.written:
            logger.error("stopped: %s holds the runs measured so far; python -m benchmarks.report %s draws their "
                         "report", out / "results.json", shell_word(out))
        else:
            logger.error("stopped before the first run was measured: nothing was written in %s", out)
        raise Said from None
    from .report import write_report  # the ranks, started by the rank server, never import matplotlib
    try:
        write_report(results, out)
    except KeyboardInterrupt:
        logger.error("stopped while the report was drawn: %s holds every run; python -m benchmarks.report %s "
                     "draws it", out / "results.json", shell_word(out))
        raise Said from None
    except OSError as error:  # each file of the report is whole or not there
        raise ValueError(f"cannot write the report in {out} ({error.strerror or error}): free space on that disk, "
                         f"then python -m benchmarks.report {shell_word(out)} draws it from its results.json") from None
    logger.info("done in %.0f s: %s", time.perf_counter() - bench.started, out / "report.md")
    return out


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, raise_interrupt)  # as Ctrl-C: runs ended, temporary files removed
    with quick_exit():
        try:
            main()
        except ValueError as error:  # the user's options or data: one line, exit code 2
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # said in main's last log line
            sys.exit(130)
        finally:
            rank_server.stop()
