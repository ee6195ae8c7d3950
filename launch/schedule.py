"""The learning-rate schedule of section 5, as functions of the run's progress (which
``end_of_epoch_schedule`` updates).

The rate starts at ``--lr`` (after an optional linear warm-up) and is divided by 10
when the validation error stops improving ('plateau', the paper's text), or at fixed
epochs ('fixed', the authors' released run).
"""

import logging
import math
from dataclasses import dataclass

from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of it already done
    global_step: int = 0
    lr: float = 0.0  # base rate of the schedule, before warm-up
    best_error: float = math.inf
    bad_epochs: int = 0
    reductions: int = 0
    loss: float = math.nan  # training loss of the last step


def base_rate(config: TrainConfig, progress: Progress) -> float:
    """The schedule's rate before warm-up: --lr divided by 10 once per reduction so far
    (plateau) or per milestone passed (fixed). A function of --lr and the progress alone,
    so a resumed run may change --lr and keep its place in the schedule."""
    if config.schedule == "fixed":
        return config.lr * 0.1 ** sum(progress.epoch >= m for m in config.lr_milestones)
    return config.lr * 0.1 ** progress.reductions


def learning_rate(config: TrainConfig, progress: Progress) -> float:
    """The schedule's rate with linear warm-up over the first ``warmup_steps`` steps."""
    if config.warmup_steps and progress.global_step < config.warmup_steps:
        return progress.lr * (progress.global_step + 1) / config.warmup_steps
    return progress.lr


def end_of_epoch_schedule(config: TrainConfig, progress: Progress, evaluation: dict) -> None:
    """Section 5: divide the rate by 10 when the validation error rate stops improving
    ('plateau'), or at fixed epochs ('fixed', the authors' released run). The paper does not
    say which error rate; this program compares the evaluation's top-1 error, not its top-5."""
    if config.schedule == "fixed":
        progress.lr = base_rate(config, progress)
        return
    val_error = evaluation["top1_error"]
    if val_error < progress.best_error:
        progress.best_error, progress.bad_epochs = val_error, 0
        return
    progress.bad_epochs += 1
    if progress.bad_epochs >= config.patience and progress.reductions < config.max_reductions:
        progress.reductions += 1
        progress.lr = base_rate(config, progress)
        progress.bad_epochs = 0
        log.info("validation error stopped improving: learning rate now %g", progress.lr)
