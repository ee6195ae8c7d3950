"""The training program's configuration: one dataclass, from which the command line is generated.

Each field's ``help`` is its documentation; ``None`` in a recipe field means
"the dataset's recipe": the paper's section 5 for ``--data``, the documented
deviation in ``BUILTIN_RECIPE`` for the built-in dataset.
"""

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

from towers import FC8_PLACEMENTS
from towers.reference import ACTIVATIONS, INIT_SCHEMES, POOLINGS

from .cli import add_options, option

MAX_TIMEOUT_S = 7 * 24 * 3600.0  # longer waits are no protection against a hung peer


@dataclass
class TrainConfig:
    data: Optional[str] = option(None, "ImageNet-layout folder: DATA/train/CLASS/*.jpg and DATA/val/CLASS/*.jpg "
                                     "(JPEG, PNG and other formats, any colour mode). Default: a built-in generated "
                                     "dataset of ten drawn texture classes, made once and cached")
    out: str = option("runs", "folder that receives one sub-folder per run (log, metrics, checkpoint, summary)")
    run_name: Optional[str] = option(None, "name of this run's folder under --out (default: date and time)")
    epochs: Optional[int] = option(None, "epochs to train (paper: 90; built-in dataset: see the recipe it prints)")
    batch_size: Optional[int] = option(None, "images per step, seen by both towers (paper: 128)")
    lr: Optional[float] = option(None, "initial learning rate (paper: 0.01)")
    momentum: float = option(0.9, "SGD momentum (paper: 0.9)")
    weight_decay: float = option(5e-4, "SGD weight decay (paper: 0.0005)")
    schedule: Optional[str] = option(None, "learning-rate schedule: 'plateau' divides by 10 when validation error stops "
                                    "improving (the paper); 'fixed' divides by 10 at --lr-milestones (the authors' "
                                    "0.01/0.001/0.0001/0.00001 run; paper recipe: plateau)", choices=("plateau", "fixed"))
    patience: int = option(2, "plateau schedule: epochs without a lower validation error before dividing the rate")
    max_reductions: int = option(3, "plateau schedule: how many times at most the rate is divided by 10 (paper: 3)")
    lr_milestones: Optional[tuple] = option(None, "fixed schedule: epochs at which the rate is divided by 10 "
                                                "(paper recipe: 30 60 80)", nargs="+", type=int)
    warmup_steps: Optional[int] = option(None, "steps of linear learning-rate warm-up (paper: 0)")
    init: Optional[str] = option(None, "weight initialisation: 'paper' (N(0, 0.01^2), biases 1 in conv2/4/5 and "
                                     "FC6/7), 'caffe' (biases 0.1, FC6/FC7 std 0.005) or 'scaled' (std 0.6 sqrt(2/fan-in), "
                                     "FC8 std 0.001, biases 0)", choices=tuple(INIT_SCHEMES))
    dropout: float = option(0.5, "dropout probability on the outputs of FC6 and FC7 (paper: 0.5)")
    fc8_placement: str = option("tower0", "'tower0': FC8 whole on tower 0 (the authors' 2012 layout); 'split': 500 + "
                                        "500 neurons, logits gathered for the loss", choices=FC8_PLACEMENTS)
    layout: str = option("towers", "'towers': the paper's two towers, one process each; 'single': the single-device "
                                   "reference in one process, with the same data, recipe and checkpoints; 'one-tower': "
                                   "section 3.2's one-GPU net, in one process (48/128/192/192 kernels in conv1-conv4, "
                                   "conv5 and the FC layers whole, no groups)",
                         choices=("towers", "single", "one-tower"))
    lrn: bool = option(True, "response normalisation after conv1 and conv2 (section 3.3; --no-lrn leaves it out)",
                       action=argparse.BooleanOptionalAction)
    pooling: str = option("overlapping", "max-pooling after LRN1, LRN2 and conv5 (section 3.4): 'overlapping' 3x3 "
                                         "windows with stride 2 (the paper), or 'non-overlapping' 2x2 with stride 2 (the "
                                         "same output sizes, 55 -> 27 -> 13 -> 6, but the last row and column of each "
                                         "odd-sized map are never seen)", choices=tuple(POOLINGS))
    activation: str = option("relu", "the nonlinearity after every layer but FC8: 'relu' (the paper) or 'tanh' "
                                     "(section 3.1, Figure 1)", choices=tuple(ACTIVATIONS))
    replicas: Optional[int] = option(None, "replicas of the net trained data-parallel, a D x 2 mesh of ranks for the "
                                         "towers: each replica trains on its D-th of every --batch-size batch and each "
                                         "tower's gradients are averaged over the replicas (default 1; under torchrun, "
                                         "WORLD_SIZE / 2)")
    seed: int = option(0, "seed of the initial weights, the data order and the augmentation")
    backend: str = option("auto", "'auto': NCCL with tower r on GPU r when two GPUs are visible, else gloo on the CPU",
                        choices=("auto", "nccl", "gloo"))
    workers: Optional[int] = option(None, "data-loading processes on rank 0 (default: a quarter of the CPU cores, "
                                        "at least 1)")
    log_every: int = option(10, "steps between log lines")
    checkpoint_every: int = option(0, "steps between checkpoints within an epoch (0: at the end of each epoch only)")
    max_steps: Optional[int] = option(None, "stop after this many training steps in all (for short trials)")
    val_limit: Optional[int] = option(None, "evaluate on the first N validation images only")
    ten_crop: bool = option(True, "after training, also evaluate with the paper's ten-patch test",
                          action=argparse.BooleanOptionalAction)
    resume: Optional[str] = option(None, "continue from a checkpoint file or a run folder (its checkpoint.pt)")
    eval_only: Optional[str] = option(None, "evaluate this checkpoint (from the towers or the single-device "
                                          "reference) and exit")
    timeout: float = option(300.0, "seconds a rank waits for the other in any one exchange before the run "
                                 "stops with an error naming the rank")
    master_addr: Optional[str] = option(None, "rendezvous address for ranks started by this program (default "
                                            "127.0.0.1: nothing listens beyond this machine)")

    def __post_init__(self):
        if self.lr_milestones is not None:  # argparse and JSON give lists
            self.lr_milestones = tuple(self.lr_milestones)

    def validate(self) -> None:
        """Raises ValueError naming the fix for an impossible value."""
        for name in ("lr", "momentum", "weight_decay", "dropout", "timeout"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every,
                    "max_steps": self.max_steps, "val_limit": self.val_limit, "timeout": self.timeout,
                    "replicas": self.replicas}
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.timeout > MAX_TIMEOUT_S:
            raise ValueError(f"--timeout must be at most {MAX_TIMEOUT_S:.0f} seconds (a week), got {self.timeout}")
        if self.lr is not None and not 0 < self.lr < 10:
            raise ValueError(f"--lr must be a positive rate below 10, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must lie in [0, 1), got {self.dropout}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be an integer from 0 to {2**32 - 1}, got {self.seed}")
        if self.lr_milestones is not None and min(self.lr_milestones) < 1:
            raise ValueError(f"--lr-milestones must be epochs from 1 on, got {' '.join(map(str, self.lr_milestones))}")
        for name in ("patience", "max_reductions", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must not be negative, got {self.warmup_steps}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must not be negative, got {self.workers}")
        if self.replicas is not None and self.batch_size is not None and self.batch_size % self.replicas:
            raise ValueError(f"--batch-size {self.batch_size} does not split evenly over {self.replicas} replicas: "
                             f"give a batch size divisible by {self.replicas} (each replica trains on an equal share)")
        if self.resume and self.eval_only:
            raise ValueError("--resume and --eval-only exclude each other: give one")
        if self.run_name is not None and (os.sep in self.run_name or self.run_name in ("", ".", "..")):
            raise ValueError(f"--run-name must be a plain folder name, got {self.run_name!r}")


# The paper's recipe (section 5), used with --data.
PAPER_RECIPE = dict(epochs=90, batch_size=128, lr=0.01, schedule="plateau", lr_milestones=(30, 60, 80),
                    warmup_steps=0, init="paper")

# The built-in dataset's recipe, printed at start where it differs from the paper's.
# With the paper's initialisation (or the Caffe reference's) the output barely
# depends on the input at the start, on raw 0-255 pixels, and the loss stays at
# ln 10 for the hundreds of steps a CPU run can afford; the fan-in-scaled
# initialisation learns from the first steps. Three epochs of 78 steps, the rate
# divided by 10 for the last one, and a short warm-up.
BUILTIN_RECIPE = dict(epochs=3, batch_size=32, lr=0.005, schedule="fixed", lr_milestones=(2,), warmup_steps=20,
                      init="scaled")


def resolve(config: TrainConfig) -> TrainConfig:
    """Fills the recipe fields left at None from the dataset's recipe."""
    recipe = BUILTIN_RECIPE if config.data is None else PAPER_RECIPE
    return dataclasses.replace(config, **{k: v for k, v in recipe.items() if getattr(config, k) is None})


def deviations(config: TrainConfig) -> dict:
    """Recipe fields whose value differs from the paper's."""
    return {k: getattr(config, k) for k, v in PAPER_RECIPE.items() if getattr(config, k) != v}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.two_gpu",
        description="Train the 2012 AlexNet split over two towers (one process each) with the paper's recipe. "
                    "Starts both ranks itself, or runs under 'torchrun --nproc-per-node 2 -m launch.two_gpu'.")
    add_options(parser, TrainConfig)
    return parser


def parse_config(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))
