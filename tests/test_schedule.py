"""The learning-rate schedule of section 5: warm-up, the plateau rule, the
fixed milestones, and the rate a resumed run derives from --lr and its progress."""

import dataclasses
import logging
import math

import pytest

from launch.config import TrainConfig
from launch.schedule import Progress, base_rate, end_of_epoch_schedule, learning_rate


def _config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(lr=0.01, schedule="plateau", lr_milestones=(2, 4), warmup_steps=0,
                                           patience=2, max_reductions=3), **changes)


def test_warmup_rises_linearly_then_holds():
    config = _config(warmup_steps=4)
    rates = [learning_rate(config, Progress(global_step=step, lr=0.01)) for step in range(6)]
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert learning_rate(_config(), Progress(global_step=0, lr=0.01)) == 0.01  # no warm-up: the rate at once


def test_plateau_divides_after_patience_epochs_without_improvement_at_most_max_times(caplog):
    caplog.set_level(logging.INFO, logger="launch.schedule")
    config, progress = _config(), Progress(lr=0.01)
    errors = [0.9, 0.8, 0.85, 0.8, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]
    rates = []
    for epoch, error in enumerate(errors):
        progress.epoch = epoch + 1
        # the top-5 error, improving every epoch, is not the rule's
        end_of_epoch_schedule(config, progress, {"top1_error": error, "top5_error": 0.5 - epoch / 100})
        rates.append(progress.lr)
    # Improvements at 0.8 and 0.7; 0.8 after 0.8 is no improvement (strictly lower is).
    # Two bad epochs (patience 2) divide by 10, then the count starts again; at most three times.
    assert rates == pytest.approx([0.01, 0.01, 0.01, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5])
    assert progress.reductions == 3 and progress.best_error == 0.7
    assert caplog.messages == [f"validation error stopped improving: learning rate now {rate}"
                               for rate in ("0.001", "0.0001", "1e-05")]  # said at each division alone


def test_fixed_schedule_divides_at_the_milestones():
    config, progress = _config(schedule="fixed"), Progress(lr=0.01)
    rates = []
    for epoch in range(1, 6):
        progress.epoch = epoch
        end_of_epoch_schedule(config, progress, {"top1_error": 0.5, "top5_error": 0.1})
        rates.append(progress.lr)
    assert rates == pytest.approx([0.01, 1e-3, 1e-3, 1e-4, 1e-4])


@pytest.mark.parametrize("schedule", ["plateau", "fixed"])
def test_a_resumed_run_keeps_its_place_in_the_schedule_at_a_new_rate(schedule):
    progress = Progress(epoch=4, reductions=2, lr=1e-4, best_error=0.3)  # two milestones passed, or two reductions
    assert base_rate(_config(schedule=schedule), progress) == pytest.approx(1e-4)
    # --lr 0.001 on resume: the same number of divisions by 10, from the new rate
    assert base_rate(_config(schedule=schedule, lr=1e-3), progress) == pytest.approx(1e-5)
    assert not math.isclose(base_rate(_config(schedule=schedule, lr=1e-3), progress), progress.lr)


def test_an_improvement_starts_the_count_of_epochs_without_one_again():
    """--patience counts epochs without improvement in a row: a bad epoch, a better one, then a
    bad one again is one bad epoch, not two, and the rate stays (the plateau rule divided it an
    epoch early where an improvement kept the count)."""
    config, progress = _config(), Progress(lr=0.01)
    for epoch, error in enumerate([0.5, 0.6, 0.4, 0.45], start=1):
        progress.epoch = epoch
        end_of_epoch_schedule(config, progress, {"top1_error": error, "top5_error": 0.1})
    assert (progress.lr, progress.reductions, progress.bad_epochs, progress.best_error) == (0.01, 0, 1, 0.4)


def test_after_the_warm_up_a_step_takes_the_rate_the_schedule_has_divided():
    """Past the warm-up, or without one, a step's rate is the progress's base rate, which each
    division by 10 has lowered (--lr 0.01 divided twice: 0.0001), not --lr that the run began at;
    within the warm-up it is the same rate's part."""
    progress = Progress(global_step=10, lr=0.01 * 0.1 ** 2, reductions=2)
    for warmup in (0, 4, 10):
        assert learning_rate(_config(warmup_steps=warmup), progress) == pytest.approx(1e-4), warmup
    assert learning_rate(_config(warmup_steps=20), progress) == pytest.approx(1e-4 * 11 / 20)
