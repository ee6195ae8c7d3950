"""The training program's configuration: one dataclass, from which the command line is generated.

Each field's ``help`` is its documentation; ``None`` in a recipe field means
"the recipe's value": the paper's section 5 (``PAPER_RECIPE``, the default with
``--data``) or the small recipe (``SMALL_RECIPE``, its length sized to the training set
by ``small_epochs`` and ``small_milestones``; the default for the built-in dataset).
"""

import argparse
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from towers import FC8_PLACEMENTS, TOWERS
from towers.reference import ACTIVATIONS, INIT_SCHEMES, POOLINGS

from .cli import (JSON_DAMAGE, MAX_PROCESSES_PER_CORE, Parser, add_options, home_path, option, refuse_empty,
                  usable_cores, write_whole)
from .step import AUTOCAST, PAPER_MOMENTUM, PAPER_WEIGHT_DECAY

log = logging.getLogger(__name__)

MAX_TIMEOUT_S = 7 * 24 * 3600.0  # longer waits are no protection against a hung peer


# The paper's recipe (section 5), the default with --data.
PAPER_RECIPE = dict(epochs=90, batch_size=128, lr=0.01, schedule="plateau", lr_milestones=(30, 60, 80),
                    warmup_steps=0, init="paper")
# Below this many training images (a twelfth of ImageNet's 1.2 million) the program warns
# that the paper's recipe is out of its depth. An epoch of 128-image batches is then under
# 782 steps, and the plateau schedule divides the rate after two epochs without a lower
# validation error: on a set of a few hundred images that is after a handful of steps,
# before the paper's initialisation has learnt anything. On 360 photographs of five
# classes (2 steps an epoch) the rate was down to 1e-5 at epoch 7, step 14, and the net
# answered one class throughout (20 % top-1).
PAPER_RECIPE_MIN_IMAGES = 100_000

# The small recipe, for hundreds to tens of thousands of training images; the default for
# the built-in dataset. With the paper's initialisation (or the Caffe reference's) the
# output barely depends on the input at the start, on raw 0-255 pixels, and the loss stays
# at ln(classes) for the hundreds of steps a CPU run can afford; the fan-in-scaled
# initialisation learns from the first steps, after a short warm-up. A fixed schedule, as
# the plateau rule reacts to the noise of a small validation set. The rate is the paper's
# 0.01 at batch 128 scaled to batch 32: at twice that (0.005), on 360 photographs of five
# classes, the training loss rose again from step 90 and validation top-1 fell back from
# 69 % (epoch 4) to 42-58 % for the rest of the run; on the built-in dataset, 0.0025 ends
# with 2.5 % top-1 error where 0.005 ended with 65.5 % (2-core CPU, torch 2.15).
SMALL_RECIPE = dict(batch_size=32, lr=0.0025, schedule="fixed", warmup_steps=20, init="scaled")
# The small recipe's length (small_epochs): the fewest epochs that make SMALL_MIN_STEPS
# steps, and at least SMALL_MIN_EPOCHS. A net learns per step, not per epoch: a few
# hundred images make epochs of about ten steps, and a few of them learn nothing. Beyond
# 200 steps in 3 epochs (6,400 images at batch 32) a run is 3 epochs, so its steps grow
# with the data but its passes over each image do not: a larger set is not overfitted by
# the passes a smaller one needs. The built-in dataset's 2,500 images: 3 epochs of 78 steps.
SMALL_MIN_STEPS = 200
SMALL_MIN_EPOCHS = 3
RECIPES = {"paper": PAPER_RECIPE, "small": SMALL_RECIPE}
_PAPER_SUMMARY = (f"{PAPER_RECIPE['epochs']} epochs, batch {PAPER_RECIPE['batch_size']}, lr {PAPER_RECIPE['lr']}, "
                  f"{PAPER_RECIPE['schedule']} schedule, --init {PAPER_RECIPE['init']}")
_SMALL_SUMMARY = (f"batch {SMALL_RECIPE['batch_size']}, lr {SMALL_RECIPE['lr']} after a {SMALL_RECIPE['warmup_steps']}-"
                  f"step warm-up, --init {SMALL_RECIPE['init']}, as many epochs as make at least {SMALL_MIN_STEPS} "
                  f"steps and at least {SMALL_MIN_EPOCHS} epochs, the rate divided by 10 for the last third")


def check_workers(workers: Optional[int], loaders_here: int = 1) -> None:
    """Refuses a --workers that would start more loading processes on this machine, where
    ``loaders_here`` ranks load (the replicas' first towers, or each rank of one-rank replicas),
    than its usable cores can run."""
    cores = usable_cores()
    most = MAX_PROCESSES_PER_CORE * cores
    if workers is not None and workers * loaders_here > most:
        each = "for each loading rank" if loaders_here == 1 else \
            f"for each of the {loaders_here} ranks that load on this machine, {workers * loaders_here} in all,"
        raise ValueError(f"--workers {workers} would start that many loading processes {each} on the {cores} cores "
                         f"this program may use: give at most {most // loaders_here}, or leave --workers out for this "
                         f"machine's default")


def _listed(numbers) -> str:
    """Numbers as a sentence lists them: 4, 2 or 1."""
    return f"{', '.join(map(str, numbers[:-1]))}{' or ' * (len(numbers) > 1)}{numbers[-1]}"


@dataclass
class TrainConfig:
    data: Optional[str] = option(None, "ImageNet-layout folder: DATA/train/CLASS/*.jpg and DATA/val/CLASS/*.jpg "
                                     "(JPEG, PNG and other formats, any colour mode). Default: a built-in generated "
                                     "dataset of ten drawn texture classes, made once and cached")
    out: str = option("runs", "folder that receives one sub-folder per run (log, metrics, checkpoint, summary)")
    run_name: Optional[str] = option(None, "name of this run's folder under --out (default: date and time)")
    recipe: Optional[str] = option(None, "training recipe, whose values fill the recipe options not given: 'paper' "
                                       f"(section 5, made for ImageNet's 1.2 million images: {_PAPER_SUMMARY}) or "
                                       f"'small' (for hundreds to tens of thousands of images: {_SMALL_SUMMARY}). "
                                       "Default: 'paper' with --data, 'small' for the built-in dataset. The run "
                                       "prints the recipe it chose, and warns when 'paper' meets fewer than "
                                       f"{PAPER_RECIPE_MIN_IMAGES:,} training images", choices=tuple(RECIPES))
    epochs: Optional[int] = option(None, f"epochs to train (paper: {PAPER_RECIPE['epochs']}; small: scaled to the "
                                         "training set)")
    batch_size: Optional[int] = option(None, f"images per step, seen by both towers (paper: "
                                             f"{PAPER_RECIPE['batch_size']}; small: {SMALL_RECIPE['batch_size']})")
    lr: Optional[float] = option(None, f"initial learning rate (paper: {PAPER_RECIPE['lr']}; small: "
                                       f"{SMALL_RECIPE['lr']})")
    momentum: float = option(PAPER_MOMENTUM, f"SGD momentum (paper: {PAPER_MOMENTUM})")
    weight_decay: float = option(PAPER_WEIGHT_DECAY, f"SGD weight decay (paper: {PAPER_WEIGHT_DECAY:.4f})")
    schedule: Optional[str] = option(None, "learning-rate schedule: 'plateau' divides by 10 when validation error stops "
                                    "improving (the paper); 'fixed' divides by 10 at --lr-milestones (the authors' "
                                    "0.01/0.001/0.0001/0.00001 run) (paper: plateau; small: fixed)",
                                    choices=("plateau", "fixed"))
    patience: int = option(2, "plateau schedule: epochs without a lower validation error before dividing the rate")
    max_reductions: int = option(3, "plateau schedule: how many times at most the rate is divided by 10 (paper: 3)")
    lr_milestones: Optional[tuple] = option(None, "fixed schedule: epochs at which the rate is divided by 10 "
                                                f"(paper: {' '.join(map(str, PAPER_RECIPE['lr_milestones']))}; small: "
                                                "one, for the last third of the epochs, "
                                                "at the end of a run of one or two)",
                                            nargs="+", type=int)
    warmup_steps: Optional[int] = option(None, f"steps of linear learning-rate warm-up (paper: "
                                               f"{PAPER_RECIPE['warmup_steps']}; small: "
                                               f"{SMALL_RECIPE['warmup_steps']})")
    init: Optional[str] = option(None, "weight initialisation: 'paper' (N(0, 0.01^2), biases 1 in conv2/4/5 and "
                                     "FC6/7), 'caffe' (biases 0.1, FC6/FC7 std 0.005) or 'scaled' (std 0.6 sqrt(2/fan-in), "
                                     "FC8 std 0.001, biases 0) (paper: paper; small: scaled)",
                                 choices=tuple(INIT_SCHEMES))
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
                                         "tower's gradients are averaged over the replicas; with --layout single or one-tower, "
                                         "one rank each (default 1; under torchrun, WORLD_SIZE / 2, or WORLD_SIZE "
                                         "with a whole net a rank)")
    precision: str = option("fp32", "arithmetic of the forward pass: 'fp32', or 'bf16' autocast (convolutions and "
                                    "matrix products in bfloat16; the weights, gradients, optimizer and loss in "
                                    "float32; what the towers exchange, forward and backward, in bfloat16: half "
                                    "the bytes)",
                            choices=tuple(AUTOCAST))
    compile: Optional[str] = option(None, "torch.compile the net with this backend: 'inductor' (generates fused "
                                          "kernels), 'aot_eager' or 'eager' (only trace): a tower block by block, its "
                                          "exchanges running between the graphs as written; the single-device nets "
                                          "whole. The first step and the first evaluation compile (a minute or more) "
                                          "(default: none, eager)",
                                    metavar="BACKEND")
    seed: int = option(0, "seed of the initial weights, the data order and the augmentation")
    backend: str = option("auto", "'auto': NCCL with rank r on GPU r when every rank has a GPU of its own, else "
                                  "gloo (the ranks sharing the GPUs, or on the CPU)", choices=("auto", "nccl", "gloo"))
    workers: Optional[int] = option(None, "data-loading processes of each replica's first tower (default: on a GPU, "
                                        "the CPU cores the ranks leave, shared by the replicas, 1 to 16; on the CPU, "
                                        "a quarter of the cores, at most 4; fewer where their batches would not fit "
                                        "in half of /dev/shm's free space)")
    log_every: int = option(10, "steps between log lines")
    checkpoint_every: int = option(0, "steps between checkpoints within an epoch (0: at the end of each epoch only)")
    max_steps: Optional[int] = option(None, "stop after this many training steps in all, for short trials (default: "
                                            "none, the whole of --epochs). It holds for this command only: a --resume "
                                            "without it trains on to the run's --epochs")
    val_limit: Optional[int] = option(None, "evaluate on N validation images only, spread evenly over the classes "
                                            "(default: all)")
    ten_crop: bool = option(True, "after training, also evaluate with the paper's ten-patch test",
                          action=argparse.BooleanOptionalAction)
    resume: Optional[str] = option(None, "continue from a checkpoint file or a run folder (its checkpoint.pt), in that "
                                         "run's folder (default: none, a new run)")
    eval_only: Optional[str] = option(None, "evaluate this checkpoint (from the towers or the single-device "
                                          "reference) and exit, writing its log and metrics to a new run folder "
                                          "under --out (default: none, train)")
    timeout: float = option(300.0, "seconds a rank waits for the other in any one exchange before the run "
                                 "stops with an error naming the rank")
    master_addr: Optional[str] = option(None, "rendezvous address for ranks started by this program (default "
                                            "127.0.0.1: nothing listens beyond this machine)")

    def __post_init__(self):
        if self.lr_milestones is not None:  # argparse and JSON give lists
            self.lr_milestones = tuple(self.lr_milestones)
        for name in ("data", "eval_only"):  # as config.json and the checkpoint keep them: found from any working
            if getattr(self, name):  # folder, as launch.show finds the run an evaluation's folder names ("": validate)
                setattr(self, name, str(home_path(getattr(self, name)).absolute()))  # '..' after a link, as the OS

    def validate(self) -> None:
        """Raises ValueError naming the fix for an impossible value."""
        refuse_empty(**{name: getattr(self, name) for name in ("data", "out", "resume", "eval_only", "master_addr")})
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
            raise ValueError(f"--timeout must be at most {MAX_TIMEOUT_S:.0f} seconds (a week), got {self.timeout:.15g}")
        if self.timeout < 1:  # below a second the ranks' first meeting itself times out
            raise ValueError(f"--timeout must be at least 1 second, got {self.timeout:.15g}")
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
        if self.lr_milestones is not None and min(self.lr_milestones, default=0) < 1:  # none: a config.json's []
            raise ValueError(f"--lr-milestones must be epochs from 1 on, got "
                             f"{' '.join(map(str, self.lr_milestones)) or 'none'}")
        if self.patience < 1:  # 0 would divide at the first epoch without a lower error, as 1 does
            raise ValueError(f"--patience must be at least 1 (the epochs without a lower validation error before the "
                             f"rate is divided), got {self.patience}")
        for name in ("max_reductions", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must not be negative, got {self.warmup_steps}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must not be negative, got {self.workers}")
        if self.resume and self.eval_only:
            raise ValueError("--resume and --eval-only exclude each other: give one")
        if self.run_name is not None and (os.sep in self.run_name or self.run_name in ("", ".", "..")
                                          or not self.run_name.isprintable() or len(os.fsencode(self.run_name)) > 255):
            raise ValueError(f"--run-name must be a plain folder name (printable, at most 255 bytes, no {os.sep}), "
                             f"got {self.run_name!r}")

    def check_batch_split(self, torchrun: bool = False) -> None:
        """Raises ValueError where the batch does not split evenly over the replicas (once they
        are known); ``torchrun``: they are those its ranks make, which its options change, not
        --replicas."""
        if (self.replicas is not None and self.batch_size is not None and self.batch_size % self.replicas
                and not self.eval_only):  # an evaluation shares out the images, not a training batch
            # a resumed run keeps its batch size: the number of replicas is what it can change
            fits = [n for n in range(min(2 * self.replicas, self.batch_size), 0, -1)
                    if self.batch_size % n == 0][:3]  # 1 at the latest
            batch = "" if self.resume else f"give a batch size divisible by {self.replicas}, or "
            if torchrun:  # its ranks make the replicas
                ranks = TOWERS if self.layout == "towers" else 1  # a replica's
                raise ValueError(f"--batch-size {self.batch_size} does not split evenly over the {self.replicas} "
                                 f"replicas of torchrun's {self.replicas * ranks} ranks: {batch}start torchrun with "
                                 f"ranks for a number of replicas that divides {self.batch_size} "
                                 f"({_listed([n * ranks for n in fits])} ranks: --nproc-per-node times --nnodes, "
                                 f"{ranks} per replica; each replica trains on an equal share)")
            raise ValueError(f"--batch-size {self.batch_size} does not split evenly over {self.replicas} replicas: "
                             f"{batch}give a number of replicas that divides {self.batch_size} ({_listed(fits)}; each "
                             f"replica trains on an equal share)")


def check_schedule_options(config: TrainConfig) -> None:
    """Refuses options of the learning-rate schedule that a new run would not use, which it
    would otherwise ignore: --lr-milestones under 'plateau', --patience and --max-reductions
    under 'fixed' (given other than their defaults), and milestones that name an epoch twice,
    given to a resumed run too. ``config``: as parsed, before resolve."""
    if config.eval_only:  # an evaluation has no schedule (its options refused as training's)
        return
    milestones = config.lr_milestones or ()
    if len(set(milestones)) < len(milestones):
        raise ValueError(f"--lr-milestones {' '.join(map(str, milestones))} names an epoch twice (the rate would be "
                         f"divided by 100 there): give each epoch once")
    if config.resume:  # a resumed run keeps its schedule
        return
    recipe = config.recipe or default_recipe(config)
    schedule = config.schedule or RECIPES[recipe]["schedule"]
    origin = "--schedule" if config.schedule else f"the {recipe} recipe's"
    if schedule == "plateau" and config.lr_milestones is not None:
        raise ValueError(f"--lr-milestones divides the rate at fixed epochs, but this run's schedule is {origin} "
                         f"plateau: add --schedule fixed, or drop --lr-milestones")
    unused = [f"--{name.replace('_', '-')}" for name in ("patience", "max_reductions")
              if getattr(config, name) != TrainConfig.__dataclass_fields__[name].default]
    if schedule == "fixed" and unused:
        raise ValueError(f"{' and '.join(unused)} act{'s' * (len(unused) == 1)} on the plateau schedule, but this "
                         f"run's schedule is {origin} fixed: add --schedule plateau, or drop "
                         f"{'it' if len(unused) == 1 else 'them'}")


# Options that steer one invocation: a resumed run takes them from its own command line. Of
# them, the layout, the arithmetic, how often it logs and saves and whether it ends with the
# ten-patch test are kept from the resumed run where the command line does not give them
# (--replicas too, see launch.two_gpu._replicas), so that a plain --resume goes on as the run went: a run
# saving every N steps on a machine that may be taken away goes on saving so. (--compile,
# which has no value for "not compiled", is this command line's; --max-steps, --workers and
# --timeout, which fit one machine and one sitting, too.)
RUN_CONTROL = {"resume", "eval_only", "max_steps", "workers", "log_every", "checkpoint_every", "ten_crop",
               "timeout", "backend", "master_addr", "out", "run_name", "layout", "replicas", "precision", "compile",
               "fc8_placement"}  # a checkpoint holds the whole net, whatever the placement: a resume may change it
KEPT_UNLESS_GIVEN = ("layout", "precision", "log_every", "checkpoint_every", "ten_crop", "fc8_placement")
CONFIG_JSON_FOLLOWS = (*KEPT_UNLESS_GIVEN, "replicas", "compile")  # of RUN_CONTROL, on resume


def update_config_json(run_dir: Path, config: TrainConfig) -> None:
    """A resumed run's recipe and arithmetic in its config.json (an --epochs, --lr or --data given
    anew, the layout, replicas and precision it goes on in, how often it logs and saves), written
    as a checkpoint is saved with them: a resume that stops before it leaves the file as the last
    checkpoint has it. The options of how the first start ran (--out, --run-name, --max-steps, ...)
    stay. A file that cannot be written is warned of: the checkpoint holds the options all the same."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, *JSON_DAMAGE):  # removed, or damaged by hand: written anew
        saved = None
    # its recipe and how it goes on; not how one start was run (--max-steps, --workers, --timeout, ...)
    now = {name: value for name, value in dataclasses.asdict(config).items()
           if name not in RUN_CONTROL or name in CONFIG_JSON_FOLLOWS}
    options = {**(saved if isinstance(saved, dict) else {}), **now}
    try:
        write_whole(path, lambda partial: partial.write_text(json.dumps(options, indent=2) + "\n"))
    except OSError as exc:
        log.warning("warning: could not update %s (%s): it holds the options of an earlier start of the run", path,
                    exc.strerror or exc)


def small_epochs(train_images: int, batch_size: int) -> int:
    """The small recipe's length for a training set of ``train_images``."""
    steps_per_epoch = max(1, train_images // batch_size)
    return max(SMALL_MIN_EPOCHS, math.ceil(SMALL_MIN_STEPS / steps_per_epoch))


def small_milestones(epochs: int) -> tuple:
    """The small recipe's one division of the rate by 10, for the last third of ``epochs``."""
    return (max(1, math.ceil(2 * epochs / 3)),)


def default_recipe(config: TrainConfig) -> str:
    return "paper" if config.data is not None else "small"


def recipe_values(config: TrainConfig, train_images: Optional[int] = None) -> dict:
    """What ``config.recipe`` (or the dataset's default) gives each recipe field. The small
    recipe's epochs and milestones depend on the training set's size and are left out
    until ``train_images`` is known; its milestones follow --epochs where it is given."""
    recipe = config.recipe or default_recipe(config)
    values = dict(RECIPES[recipe])
    if recipe == "small" and train_images is not None:
        values["epochs"] = small_epochs(train_images, config.batch_size or values["batch_size"])
        values["lr_milestones"] = small_milestones(config.epochs or values["epochs"])
    return values


def resolve(config: TrainConfig, train_images: Optional[int] = None) -> TrainConfig:
    """Names the recipe and fills the recipe fields left at None from it: all of them once
    ``train_images`` (the training set's size) is given, all but the small recipe's epochs
    and milestones before."""
    values = recipe_values(config, train_images)
    return dataclasses.replace(config, recipe=config.recipe or default_recipe(config),
                               **{k: v for k, v in values.items() if getattr(config, k) is None})


def _as_options(values: dict) -> str:
    def shown(value):
        return " ".join(map(str, value)) if isinstance(value, tuple) else value
    return " ".join(f"--{name.replace('_', '-')} {shown(value)}" for name, value in values.items())


def describe_recipe(config: TrainConfig, train_images: int) -> str:
    """The recipe of a resolved ``config`` as the options it sets, with where it came from,
    why these values, and which of them the command line gave instead of the recipe."""
    recipe = recipe_values(config, train_images)
    fields = [k for k in PAPER_RECIPE if k != "lr_milestones" or config.schedule == "fixed"]
    origin = f"the default {'with --data' if config.data is not None else 'for the built-in dataset'}" \
        if config.recipe == default_recipe(config) else f"--recipe {config.recipe}"
    if config.resume:  # its values are the run's own, a milestone where its first start put it
        return (f"recipe: {config.recipe} (the resumed run's, which a resume may change by --epochs, --lr, "
                f"--warmup-steps and --lr-milestones): {_as_options({k: getattr(config, k) for k in fields})}")
    if config.recipe == "paper":
        why = "section 5, made for ImageNet's 1.2 million training images"
    else:
        steps = max(1, train_images // config.batch_size)
        why = (f"{recipe['epochs']} epochs of {steps} steps for {train_images} training images at batch "
               f"{config.batch_size}: at least {SMALL_MIN_STEPS} steps and {SMALL_MIN_EPOCHS} epochs, the rate "
               f"divided by 10 for the last third")
        own = config.schedule == "fixed" and tuple(config.lr_milestones or ()) == tuple(recipe["lr_milestones"])
        if own and all(m >= config.epochs for m in recipe["lr_milestones"]):  # --epochs 1 or 2
            why += (f"; {config.epochs} epoch{'s leave' if config.epochs > 1 else ' leaves'} no last third: the rate "
                    f"is not divided")
    line = f"recipe: {config.recipe} ({origin}; {why}): {_as_options({k: getattr(config, k) for k in fields})}"
    given = {k: getattr(config, k) for k in fields if getattr(config, k) != recipe[k]}
    if given:
        line += "; of these, given as options: " + _as_options(given)
    return line


def recipe_warnings(config: TrainConfig, train_images: int, milestones_given: bool = True) -> list:
    """Warnings: the paper's recipe meets a training set far smaller than ImageNet's; the
    fixed schedule's milestones lie beyond the run's epochs, where they were given
    (``milestones_given``): the small recipe's own follows --epochs, and lies beyond them only
    in a run of one or two epochs, too short for a last third at a lower rate (its recipe
    line shows it)."""
    warnings = []
    if config.recipe == "paper" and train_images < PAPER_RECIPE_MIN_IMAGES:
        warnings.append(f"warning: the paper's recipe is made for 1.2 million training images and this set has "
                        f"{train_images} (under {PAPER_RECIPE_MIN_IMAGES:,}): it will likely learn nothing here; "
                        f"--recipe small sizes the run to the data")
    beyond = [m for m in config.lr_milestones or () if m >= config.epochs] if config.schedule == "fixed" else []
    if beyond and milestones_given:
        one = len(beyond) == 1
        warnings.append(f"warning: the rate's milestone{'s' * (not one)} {' '.join(map(str, beyond))} "
                        f"(--lr-milestones) {'is' if one else 'are'} never reached in this run's {config.epochs} "
                        f"epochs: give milestones below --epochs")
    return warnings


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m launch.two_gpu",
        description="Train the 2012 AlexNet split over two towers (one process each) with the paper's recipe. "
                    "Starts both ranks itself, or runs under 'torchrun --nproc-per-node 2 -m launch.two_gpu'.")
    add_options(parser, TrainConfig)
    return parser


def parse_config(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def given_options(argv=None) -> set:
    """The fields that the command line ``argv`` gives, at their default values too (which
    ``parse_config`` cannot tell from options left out)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))
