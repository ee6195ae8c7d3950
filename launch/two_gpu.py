"""python -m launch.two_gpu: train the 2012 AlexNet split over two towers.

With no launcher it starts both ranks itself (rendezvous on 127.0.0.1); under
``torchrun --nproc-per-node 2 -m launch.two_gpu`` it uses the ranks torchrun
gives. NCCL with tower r on GPU r when two GPUs are visible, gloo on the CPU
otherwise. Run with --help for every option.
"""

import dataclasses
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import data as data_module
from .checkpoint import CheckpointError, load_checkpoint, resolve_path
from .config import BUILTIN_RECIPE, PAPER_RECIPE, TrainConfig, build_parser, deviations, parse_config, resolve
from .ranks import LOOPBACK, RankFailure, init_process_group, run_ranks
from .train import run_rank

log = logging.getLogger("launch.two_gpu")
WORLD_SIZE = 2

# Options that steer one invocation: a resumed run takes them from its own command line.
RUN_CONTROL = {"resume", "eval_only", "max_steps", "workers", "log_every", "checkpoint_every", "ten_crop",
               "val_limit", "timeout", "backend", "master_addr", "out", "run_name"}
# The rest is the run's recipe, kept from the checkpoint; of it, only --epochs may be changed (to train longer).
EXTENDABLE = {"epochs"}


def choose_backend(requested: str) -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "nccl" and gpus < WORLD_SIZE:
        raise ValueError(f"--backend nccl needs two GPUs (one per tower) and this machine shows {gpus}: two NCCL "
                         f"ranks cannot share one GPU. Use --backend gloo (the CPU) or run on a machine with two")
    if requested == "auto":
        if gpus >= WORLD_SIZE:
            return "nccl"
        if gpus == 1:
            log.warning("one GPU found: two NCCL ranks cannot share it, so both towers run on the CPU with gloo")
    return "nccl" if requested == "nccl" else "gloo"


def resumed_config(config: TrainConfig) -> TrainConfig:
    """A resumed run keeps the recipe saved in its checkpoint; options that would change it are refused."""
    saved = load_checkpoint(config.resume).get("config")
    if saved is None:
        raise CheckpointError(f"{config.resume} holds weights but no training state (saved from the single-device "
                              f"model?): use it with --eval-only, or start a new run")
    defaults = vars(build_parser().parse_args([]))
    if set(defaults) - set(saved):
        raise CheckpointError(f"{config.resume} lacks parts of its run's recipe "
                              f"({', '.join(sorted(set(defaults) - set(saved)))}), so it cannot be resumed: "
                              f"evaluate it with --eval-only, or train afresh")
    merged = dataclasses.asdict(TrainConfig(**saved))  # as a fresh parse gives it (tuples, not lists)
    for name, value in dataclasses.asdict(config).items():
        if name in RUN_CONTROL or (name in EXTENDABLE and value != defaults[name]):
            merged[name] = value
        elif value != defaults[name] and value != merged[name]:
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the resumed run's {merged[name]}: "
                             f"a resumed run keeps its recipe, so drop the option (or start a new run)")
    return TrainConfig(**merged)


def prepare_run(config: TrainConfig) -> Path:
    """On rank 0 (or the launching process): make the data, the run folder and its config.json."""
    if config.data is None:
        log.info("data: the built-in dataset (ten generated texture classes), no download needed")
        deviation = {k: f"{v} (paper: {PAPER_RECIPE[k]})" for k, v in deviations(config).items()}
        if deviation:
            log.info("recipe: the paper's, except for the built-in dataset: %s",
                     ", ".join(f"{k}={v}" for k, v in deviation.items()))
    bundle = data_module.open_data(config.data)
    log.info("data: %s (%d classes, %d training and %d validation images)", bundle.root, len(bundle.classes),
             len(bundle.train), len(bundle.val))
    for checkpoint in (config.eval_only, config.resume):
        if checkpoint:  # checked here, before any rank starts, so a bad one gets a plain error
            load_checkpoint(checkpoint, num_classes=len(bundle.classes))
    if not config.eval_only and data_module.batches_per_epoch(bundle, config.batch_size) == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(bundle.train)} training images: "
                         f"choose a smaller one")
    if config.resume:
        run_dir = resolve_path(config.resume).parent
    else:
        name = config.run_name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.out) / name
        if (run_dir / "checkpoint.pt").exists():
            raise ValueError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or choose "
                             f"another --run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    log.info("results: %s", run_dir.resolve())
    return run_dir


def report(summary: dict) -> None:
    centre = summary["centre"]
    line = (f"validation top-1 error {100 * centre['top1_error']:.2f}%, top-5 error "
            f"{100 * centre['top5_error']:.2f}% ({centre['test']}, {centre['images']} images)")
    if "ten_patch" in summary:
        ten = summary["ten_patch"]
        line += f"; ten-patch test: top-1 {100 * ten['top1_error']:.2f}%, top-5 {100 * ten['top5_error']:.2f}%"
    log.info("done: %s", line)
    if summary.get("train_seconds"):
        log.info("trained %d steps in %.0f s (%.1f images/s); wall time %.0f s; results in %s", summary["steps"],
                 summary["train_seconds"], summary["images_per_s"], summary["wall_seconds"], summary["run_dir"])


def _torchrun_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = parse_config(argv)
        config.validate()
        if config.resume:
            config = resumed_config(config)
        config = resolve(config)
        config.validate()
        backend = choose_backend(config.backend)
        if _torchrun_env():
            return _main_under_torchrun(config, backend)
        run_dir = prepare_run(config)
        addr = config.master_addr or LOOPBACK
        summary = run_ranks(run_rank, (config, str(run_dir), backend), world_size=WORLD_SIZE, backend=backend,
                            collective_timeout_s=config.timeout, addr=addr)[0]
    except (ValueError, CheckpointError) as exc:  # DataError is a ValueError
        log.error("error: %s", exc)
        return 2
    except RankFailure as exc:
        log.error("the run stopped: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: both ranks stopped; resume with --resume and the run folder")
        return 130
    report(summary)
    return 0


def _main_under_torchrun(config: TrainConfig, backend: str) -> int:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size != WORLD_SIZE:
        raise ValueError(f"the towers need exactly {WORLD_SIZE} ranks, torchrun gave {world_size}: "
                         f"use --nproc-per-node 2 (or two nodes of 1)")
    if backend == "gloo":  # share the cores among the ranks on this machine, as run_ranks does
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    init_process_group(backend, rank, world_size, config.timeout)
    run_dir = prepare_run(config) if rank == 0 else None
    dist.barrier()
    summary = run_rank(rank, config, str(run_dir) if run_dir else None, backend)
    dist.destroy_process_group()
    if rank == 0:
        report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
