"""The paper's experiments as options of the program, and ``python -m benchmarks.ablations``.

The slow tests share one tiny ablation: every variant trained for one epoch on the tiny
dataset, the two-tower variants as towers (two processes each), so that the options
are checked end to end in the towers layout; the built-in report runs them as the
single-device reference.
"""

import dataclasses
import datetime
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch

from benchmarks import ablations
from benchmarks import report as benchmark_report
from launch import cli, two_gpu
from launch.checkpoint import load_checkpoint, load_reference
from launch.config import parse_config, resolve
from launch.meter import Metrics, StepMeter
from towers import Architecture

from conftest import ROOT, RUN_TIMEOUT_S, cmdline, launch, live_processes, terminate_when_ready

ABLATION_TIMEOUT_S = 5 * RUN_TIMEOUT_S  # five tiny runs; a hang fails instead of blocking the suite
TINY_BUDGET = ["--epochs", "1", "--batch-size", "4", "--lr", "0.001", "--workers", "0"]  # 7 steps of 4 images


def _written_curve(tmp_path, errors_per_epoch, batch=10):
    """metrics.jsonl as train_one_epoch writes it with --log-every 1: a fresh StepMeter each epoch,
    one record per step; ``errors_per_epoch`` holds each step's error, epoch by epoch."""
    metrics, step = Metrics(tmp_path / "metrics.jsonl"), 0
    for epoch, errors in enumerate(errors_per_epoch, 1):
        meter = StepMeter()
        for error in errors:
            step += 1
            meter.update(1.0, round(batch * (1 - error)), batch)
            metrics.write(event="train", epoch=epoch, step=step, loss=meter.loss, top1=meter.top1)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_steps_to_25_percent_count_only_full_windows(tmp_path):
    window, per_epoch = StepMeter().window, 30
    records = _written_curve(tmp_path, [
        [0.5] * per_epoch,  # epoch 1: half wrong
        [0.0] * 5 + [0.4] * (per_epoch - 5),  # epoch 2: five perfect steps, alone in the window at first
        [0.1] * per_epoch,  # epoch 3: 10 % wrong
    ])
    curve = ablations.training_curve(records)
    assert len(curve) == 3 * per_epoch
    # The epoch-2 window reaches 0 % error at its first step but holds one batch; once full it
    # holds 5 perfect and 15 of 40 %: 30 %, and more after. Epoch 3's window is at 10 % once full.
    assert min(p["train_error"] for p in curve if per_epoch < p["step"] <= 2 * per_epoch) == 0.0
    assert ablations.steps_to_error(curve, 0.25) == 2 * per_epoch + window
    assert ablations.steps_to_error(curve, 0.05) is None
    # Epoch 2's full window starts at 30 % and climbs to 40 % as the perfect steps leave it.
    rise, low, high = ablations.largest_rise(curve)
    assert (low, high) == (per_epoch + window, per_epoch + window + 5) and rise == pytest.approx(0.1)


def test_epochs_shorter_than_the_window_give_no_steps_to_an_error_rather_than_none_reached(tmp_path):
    """Epochs of 10 steps (the README's small data) never fill the 20-step window: the report
    said 'not within 30' and 'neither ReLU nor tanh got there', of runs at 1 % training error."""
    records = _written_curve(tmp_path, [[0.01] * 10] * 3)
    curve = ablations.training_curve(records)
    run = {"curve": curve, "steps": 30, "failed": None, "steps_to": {"25 %": None, "50 %": None}}
    assert ablations.unmeasurable(run).startswith(f"not measurable: no epoch of the run reached the "
                                                  f"{StepMeter().window} steps")
    lines = ablations.tanh_lines({"full": run, "tanh": run})
    assert lines == [f"ReLU against tanh, steps to a training error, ReLU's (full run): {ablations.unmeasurable(run)}."]
    # the run that could not be measured is named: here tanh's alone
    measured = dict(run, curve=[dict(p, full_window=True) for p in curve])
    assert ablations.tanh_lines({"full": measured, "tanh": run})[0] == (
        f"ReLU against tanh, steps to a training error, tanh's (tanh run): {ablations.unmeasurable(run)}.")
    # a run that stopped early says so itself, not that its epochs were short
    stopped = dict(run, failed="its loss ran away", steps=6)
    assert ablations.unmeasurable(stopped) == ("not measurable: the run stopped at step 6, before the "
                                               f"{StepMeter().window} steps that the step line's training error covers")
    lines = ablations.tanh_lines({"full": run, "tanh": stopped})
    assert "(The tanh run stopped at step 6: its loss ran away.)" in lines
    (tmp_path / "longer").mkdir()
    longer = dict(run, curve=ablations.training_curve(_written_curve(tmp_path / "longer", [[0.01] * 30])))
    assert ablations.unmeasurable(longer) is None


def test_a_resume_within_an_epoch_starts_the_window_again(tmp_path):
    """The resumed start's StepMeter holds its own steps alone: its first ones are no full
    window, though far into their epoch (they were taken for one, and a single lucky batch
    could reach a target)."""
    window = StepMeter().window
    records = _written_curve(tmp_path, [[0.5] * (3 * window)])
    resumed_at = window + 3
    records = records[:resumed_at] + [{"event": "resume", "step": resumed_at, "epoch": 1}]
    meter = StepMeter()
    for step in range(resumed_at + 1, 3 * window + 1):
        meter.update(1.0, 10, 10)  # no error: alone in the window at first
        records.append({"event": "train", "epoch": 1, "step": step, "loss": meter.loss, "top1": meter.top1})
    curve = ablations.training_curve(records)
    assert [p["step"] for p in curve] == list(range(1, 3 * window + 1))
    assert [p["step"] for p in curve if p["full_window"]] == \
        list(range(window, resumed_at + 1)) + list(range(resumed_at + window, 3 * window + 1))
    assert ablations.steps_to_error(curve, 0.25) == resumed_at + window


def test_tanh_that_never_gets_there_gives_a_lower_bound():
    results = {"full": {"steps_to": {"25 %": 40, "50 %": 10}, "steps": 200, "failed": None, "curve": []},
               "tanh": {"steps_to": {"25 %": None, "50 %": 30}, "steps": 200, "failed": None, "curve": []}}
    to_25, to_50 = ablations.tanh_lines(results)
    assert "To 25 % training error: ReLU at step 40, tanh not within 200 steps, so ReLU was at least 5.0x faster " \
           "(a lower bound" in to_25
    assert "To 50 % training error: ReLU at step 10, tanh at step 30: ReLU 3.0x faster" in to_50


def test_runs_of_other_lengths_are_read_only_as_far_as_both_went():
    """A run that stopped early (its loss ran away) is no evidence past its last step: not 'the
    opposite of the paper's direction' for a ReLU that stopped before tanh got there, nor a lower
    bound under 1x for a tanh that stopped before ReLU did."""
    def runs(relu, relu_steps, tanh, tanh_steps):
        stopped = lambda steps: "its loss ran away" if steps < 200 else None  # each run's budget is 200 steps
        return {v: {"steps_to": {"25 %": s, "50 %": s}, "steps": n, "failed": stopped(n), "curve": []}
                for v, s, n in (("full", relu, relu_steps), ("tanh", tanh, tanh_steps))}
    first = lambda *args: ablations.tanh_lines(runs(*args))[0]
    lines = ablations.tanh_lines(runs(None, 50, 120, 200))
    assert lines[0] == "To 25 % training error: tanh at step 120, ReLU not within the 50 steps it ran: not resolved."
    assert "(The full run stopped at step 50: its loss ran away.)" in lines
    # a ReLU run to tanh's very step, without getting there: slower, however it ended
    assert first(None, 120, 120, 200) == ("To 25 % training error: tanh at step 120, ReLU not within 120 steps: the "
                                          "opposite of the paper's direction.")
    assert first(None, 200, 120, 200) == ("To 25 % training error: tanh at step 120, ReLU not within 200 steps: the "
                                          "opposite of the paper's direction.")
    assert first(80, 200, None, 60) == ("To 25 % training error: ReLU at step 80, tanh not within the 60 steps it "
                                        "ran: not resolved.")
    assert first(40, 200, None, 60).startswith("To 25 % training error: ReLU at step 40, tanh not within 60 steps, so "
                                               "ReLU was at least 1.5x faster (a lower bound;")
    assert first(None, 50, None, 200) == ("To 25 % training error: neither ReLU nor tanh got there (ReLU within its 50 "
                                          "steps, tanh within its 200); no ratio measured.")
    assert first(None, 200, None, 200) == ("To 25 % training error: neither ReLU nor tanh got there within 200 steps; "
                                           "no ratio measured.")


def test_a_difference_is_read_by_its_sign_and_its_size_against_the_noise_floor():
    """A variant's error minus the full net's, in points: above the floor, a higher error without
    the feature is the paper's direction (the feature helped); within it, noise."""
    assert ablations._direction(3.0, 1.0) == "the paper's"
    assert ablations._direction(-3.0, 1.0) == "the opposite"
    assert ablations._direction(-0.5, 1.0) == "within noise (±1.0)"
    assert ablations._verdict(3.0, 1.0, 2.0) == "the paper's direction"
    assert ablations._verdict(-3.0, 1.0, 2.0) == "the opposite of the paper's direction"
    assert ablations._verdict(-0.5, 1.0, 2.0) == "not resolved: -0.5 lies within the noise floor of ±1.0"
    assert ablations._verdict(0.5, 1.0, 0.4) == ("not resolved: +0.5 lies within the noise floor of ±1.0, and the "
                                                 "paper's +0.4 is far smaller than that floor")
    # 50 % error of 100 images: a standard error of 5 points; a difference of two, sqrt(2) times it, twice over
    def run(top1, loss):
        return {"failed": None, "classes": 10, "centre": {"images": 100, "top1_error": top1},
                "curve": [{"loss": loss, "full_window": True}]}
    floor = ablations.noise_floor({"full": run(0.5, 1.0)})
    assert (floor["standard_error_points"], floor["granularity_points"]) == (pytest.approx(5.0), 1.0)
    assert floor["difference_floor_points"] == pytest.approx(2 * math.sqrt(2) * 5.0)
    assert ablations.noise_floor({"full": run(0.5, 1.0), "tanh": run(0.9, math.log(10))}) == floor  # at chance
    # ReLU there first: the paper's direction; tanh first: not
    both = lambda relu, tanh: {v: {"steps_to": {"25 %": s, "50 %": s}, "steps": 200, "failed": None, "curve": []}
                               for v, s in (("full", relu), ("tanh", tanh))}
    assert ablations.tanh_lines(both(10, 30))[0].endswith("; the paper's direction.")
    assert ablations.tanh_lines(both(30, 10))[0].endswith("; not the paper's direction.")


def test_no_direction_is_read_against_a_full_net_that_did_not_learn():
    """The table called a variant's difference with a full net at chance a direction, where the
    list below it says that such a run compares nothing."""
    def run(loss, top1):
        return {"steps_to": {"25 %": None, "50 %": None}, "steps": 20, "failed": None, "classes": 10,
                "curve": [{"loss": loss, "full_window": True}], "centre": {"top1_error": top1, "top5_error": top1 / 2}, "ten_patch": None,
                "evals": [], "initial_scale": 1.0, "images_per_s": 5.0}
    results = {"full": run(math.log(10), 0.9), "no-lrn": run(1.0, 0.4)}  # the full net at chance
    floor = {"difference_floor_points": 5.0}
    row = next(line for line in ablations.table(results, floor) if line.startswith("| no-lrn"))
    assert "| none: the full net did not learn (see below) |" in row, row
    results["full"] = run(1.2, 0.5)
    row = next(line for line in ablations.table(results, floor) if line.startswith("| no-lrn"))
    assert "| none: the full net did not learn" not in row and "did not learn (see below)" not in row, row


def test_a_run_too_short_for_a_full_window_is_not_said_to_have_failed_to_learn(tmp_path, monkeypatch):
    """One step of ten classes ends at a loss near ln 10 (the mean of that one step, not of 20):
    the report said the run did not learn, 'a failure to train'. And a stopped run's steps to an
    error cell said 'not within 4' of a run that never had a full window."""
    monkeypatch.setattr(ablations, "initial_activation_scale", lambda run_dir, bundle: 1.0)  # of no real images here
    runs, data = tmp_path / "runs", _data(train=1000, val=50)
    run = _reusable_run(runs, data, steps=1)
    _edit_json(run / "metrics.jsonl", _train_records(lambda r: r.update(loss=math.log(10))), lines=True)
    tanh = runs / "tanh"
    tanh.mkdir()
    options = ablations.run_options(ablations.AblationConfig(max_steps=1), "tanh", runs)
    (tanh / "config.json").write_text(json.dumps(dataclasses.asdict(resolve(parse_config(options), 1000))))
    (tanh / "metrics.jsonl").write_text("")  # its loss ran away at its first step
    (runs / "tanh.stderr").write_text(f"{_data_line(data)}\nthe run stopped: rank 0 failed: "
                                      f"launch.train.NonFiniteLoss: the loss became nan at epoch 1, step 1; the run "
                                      f"stops.\n")
    report = (_reuse(runs, data, monkeypatch, "--variants", "full,tanh", "--max-steps", "1") / "report.md").read_text()
    assert "did not learn" not in report and "failure to train" not in report, report
    window = StepMeter().window
    assert (f"- **Too short to tell whether it learned: full.** The step line's training loss is a mean over the last "
            f"{window} steps of an epoch, and this run trained fewer steps than that: its loss does not say whether "
            f"it fell to chance.") in report
    rows = _table_rows(report)
    assert rows["tanh"]["steps to 25 % / 50 % training error"] == (f"not measurable: the run stopped at step 1, before "
                                                                  f"the {window} steps that the step line's training "
                                                                  f"error covers")


def test_a_stopped_run_that_left_a_checkpoint_is_told_to_finish_from_it(tmp_path):
    """A run stopped by what was not its training (a rank killed, a full disk) after a save: the
    advice is to resume it to the ablation's --max-steps and --reuse it, not to train it anew."""
    run = tmp_path / "runs" / "tanh"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"max_steps": 40}))
    (run / "checkpoint.pt").write_bytes(b"")
    r = {"failed": "the run stopped: rank 1 failed: killed by SIGKILL", "run_dir": str(run),
         "files": ["checkpoint.pt", "config.json"]}
    assert ablations.stopped_advice(r) == (f"once the cause is fixed, finish it with python -m launch.two_gpu --resume "
                                           f"{run} --max-steps 40, then run the ablation again with --reuse (or "
                                           f"remove {run} to train it anew)")
    without = ablations.stopped_advice(dict(r, files=["config.json"]))
    assert without.startswith(f"once the cause is fixed, remove {run} "), without


def test_whether_a_run_learned_is_read_at_its_last_full_window():
    """A run at chance for a whole epoch, then 3 steps into the next at a lower loss: the mean of
    3 steps is no 20-step mean, and the run had not learned at its last full window."""
    window = StepMeter().window
    records = [{"event": "train", "epoch": 1, "step": step, "loss": math.log(10), "top1": 0.1}
               for step in range(1, window + 6)]
    records += [{"event": "train", "epoch": 2, "step": window + 5 + step, "loss": 1.0, "top1": 0.6}
                for step in (1, 2, 3)]
    run = {"failed": None, "classes": 10, "curve": ablations.training_curve(records), "centre": {"top1_error": 0.9}}
    assert ablations.learned(run) is False
    assert ablations.not_learned_line("tanh", run).startswith(
        f"- **tanh did not learn.** Its training loss (the step line's mean over the last {window} steps of an "
        f"epoch, or over its steps so far) peaked at 2.30 at step "
        f"{window} and was 2.303 at step {window + 5}, its last with a full window, the loss of a uniform guess over "
        f"10 classes")
    assert ablations.not_learned_line("tanh", dict(run, curve=run["curve"][:window + 5])).startswith(
        f"- **tanh did not learn.** Its training loss (the step line's mean over the last {window} steps of an "
        f"epoch, or over its steps so far) peaked at 2.30 at step "
        f"{window} and ended at 2.303, the loss of a uniform guess over 10 classes")
    assert ablations.learned(dict(run, curve=run["curve"][:window - 1])) is None  # fewer steps than a window: not known
    # epochs shorter than the window (a few hundred images at batch 32), the run far longer: at chance all along
    short_epochs = [{"event": "train", "epoch": 1 + i // 12, "step": 1 + i, "loss": math.log(10), "top1": 0.1}
                    for i in range(17 * 12)]
    at_chance = dict(run, curve=ablations.training_curve(short_epochs))
    assert not any(p["full_window"] for p in at_chance["curve"]) and ablations.learned(at_chance) is False
    assert "peaked at 2.30 at step 1 and ended at 2.303, the loss of a uniform guess" in ablations.not_learned_line(
        "tanh", at_chance)
    assert ablations.learned(dict(at_chance, curve=[dict(p, loss=1.0) for p in at_chance["curve"]])) is True


def _data(train=30, val=10, classes=10, digests=("train images", "val images")):
    """What train() reads of the data opened now (launch.data.DataBundle's fields)."""
    return SimpleNamespace(root=Path("/data"), classes=[f"class{i}" for i in range(classes)], train=range(train),
                           val=range(val), digests=dict(zip(("train", "val"), digests)))


def _finished_run(runs, config, variant, data, steps, checkpoint=True):
    """A run folder as launch.two_gpu leaves a finished run, trained with ``config``'s options on
    ``data``: its config.json, summary.json (``steps``) and checkpoint's record of the data."""
    run = runs / variant
    run.mkdir(parents=True)
    options = ablations.run_options(config, variant, runs)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(resolve(parse_config(options), len(data.train)))))
    (run / "summary.json").write_text(json.dumps({"steps": steps, "steps_this_run": steps}))
    (run / "metrics.jsonl").write_text(json.dumps({"event": "summary", "steps": steps}) + "\n")
    if checkpoint:
        torch.save({"classes": data.classes, "train_digest": data.digests["train"], "val_digest": data.digests["val"],
                    "progress": {"global_step": steps}}, run / "checkpoint.pt")
    return run


def _data_line(data) -> str:
    return f"data: /data ({len(data.classes)} classes, {len(data.train)} training and {len(data.val)} validation images)"


def test_reuse_takes_a_run_that_stopped_and_refuses_one_that_was_interrupted(tmp_path, monkeypatch):
    """A run that stopped on its own (its loss ran away) is a result, read again by --reuse; one
    that was interrupted is not; and without --reuse an existing run folder is never trained over."""
    def no_training(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(ablations.subprocess, "run", no_training)
    runs, config = tmp_path / "runs", ablations.AblationConfig(data=str(tmp_path / "data"), seed=2, reuse=True)
    run = runs / "tanh"
    run.mkdir(parents=True)
    options = ablations.run_options(config, "tanh", runs)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(resolve(parse_config(options), 30))))
    (run / "metrics.jsonl").write_text("")
    stopped = "the run stopped: rank 0 failed: NonFiniteLoss: the loss became nan at epoch 1, step 6"
    data = _data()
    (runs / "tanh.stderr").write_text(f"{_data_line(data)}\nepoch 1/3 step 5/78 loss 9.1\n{stopped}\n")
    assert ablations.train(config, "tanh", runs, data) == (run, stopped)

    (runs / "tanh.stderr").write_text("epoch 1/3 step 5/78 loss 2.1\ninterrupted: every rank stopped; ...\n")
    with pytest.raises(ablations.AblationError, match="neither finished nor stopped on its own .* remove"):
        ablations.train(config, "tanh", runs, data)
    with pytest.raises(ablations.AblationError, match="already holds a run: add --reuse"):
        ablations.train(dataclasses.replace(config, reuse=False), "tanh", runs, data)
    with pytest.raises(ablations.AblationError, match="seed = 2, not 3"):
        ablations.train(dataclasses.replace(config, seed=3), "tanh", runs, data)


def test_reuse_refuses_runs_of_another_length_where_the_recipe_gives_it(tmp_path):
    """On the built-in data the small recipe's epochs (and milestones) follow from the training
    set's size, which the options alone do not give: runs of --epochs 1 and --epochs 5 were
    reused by a command without --epochs, one recipe line claimed for both."""
    runs, data = tmp_path / "runs", _data(train=1000)  # the small recipe: 7 epochs, the rate divided at the 5th
    for variant, epochs in (("full", 1), ("no-lrn", 5), ("tanh", None)):
        _finished_run(runs, ablations.AblationConfig(variants=(variant,), epochs=epochs, max_steps=2), variant, data,
                      steps=2)
    config = ablations.AblationConfig(max_steps=2, reuse=True)
    for variant, epochs in (("full", 1), ("no-lrn", 5)):
        with pytest.raises(ablations.AblationError, match=f"^{runs / variant} was trained with epochs = {epochs}, not "
                                                          f"7: give another --runs folder, or remove "
                                                          f"{runs / variant} to train that variant again with these "
                                                          f"options$"):
            ablations.train(config, variant, runs, data)
    assert ablations.train(config, "tanh", runs, data) == (runs / "tanh", None)  # the recipe's 7
    assert ablations.train(dataclasses.replace(config, epochs=5), "no-lrn", runs, data) == (runs / "no-lrn", None)


def _stop_at_the_runs(monkeypatch, first_run=None):
    """ablations.main stops with OSError("stop") where its runs would start, past its checks,
    once it has called ``first_run()``; the data it opens holds as many training images as any
    batch needs. Returns the list of the data folders opened, each time one is."""
    def stop(*args):
        if first_run is not None:
            first_run()
        raise OSError("stop")
    opened = []  # the data, each time it is opened
    monkeypatch.setattr(ablations.data_module, "open_data",
                        lambda data: opened.append(data) or SimpleNamespace(train=range(10**6)))
    monkeypatch.setattr(ablations, "_measure", stop)
    return opened


def _reuse(runs, data, monkeypatch, *options):
    """``python -m benchmarks.ablations --reuse`` on ``data`` (opened as it is now)."""
    monkeypatch.setattr(ablations.data_module, "open_data", lambda folder: data)
    return ablations.main(["--reuse", "--runs", str(runs), "--out", str(runs.parent / "report"), *options])


@pytest.mark.parametrize("changed", ["a validation image removed", "other training images", "a class renamed"])
def test_reuse_refuses_a_finished_run_trained_on_other_data(tmp_path, monkeypatch, changed):
    """config.json names the data's folder, not its images: a run evaluated on 74 validation images
    was reported as one of the 44 left there."""
    runs, trained_on = tmp_path / "runs", _data(train=1000, val=74, digests=("train", "val of 74"))
    _finished_run(runs, ablations.AblationConfig(max_steps=3), "full", trained_on, steps=3)
    now = {"a validation image removed": _data(train=1000, val=73, digests=("train", "val of 73")),
           "other training images": _data(train=1000, val=74, digests=("other train", "val of 74")),
           "a class renamed": SimpleNamespace(**{**vars(trained_on), "classes": trained_on.classes[:-1] + ["renamed"]})}
    with pytest.raises(ablations.AblationError, match=rf"^{runs / 'full'} was trained on other data: its "
                                                      rf"(val/ images|train/ images|class names) differ .*: remove "
                                                      rf"{runs / 'full'} to train that variant again"):
        _reuse(runs, now[changed], monkeypatch, "--variants", "full", "--max-steps", "3")
    assert ablations.train(ablations.AblationConfig(max_steps=3, reuse=True), "full", runs, trained_on) == \
        (runs / "full", None)  # the same images: reused
    # saved before the checkpoints held their data's digests: not said to be of other images
    payload = torch.load(runs / "full" / "checkpoint.pt")
    torch.save({k: v for k, v in payload.items() if not k.endswith("_digest")}, runs / "full" / "checkpoint.pt")
    with pytest.raises(ablations.AblationError, match=rf"^{runs / 'full' / 'checkpoint.pt'} holds no record of the "
                                                      rf"images it was trained on \(an earlier version saved it\), so "
                                                      rf"they cannot be checked: remove {runs / 'full'} to train"):
        ablations.train(ablations.AblationConfig(max_steps=3, reuse=True), "full", runs, trained_on)


def test_reuse_refuses_a_run_that_stopped_on_other_data_before_its_first_checkpoint(tmp_path, monkeypatch):
    """Without a checkpoint, the numbers of images that the run's output gave are compared."""
    runs, trained_on = tmp_path / "runs", _data(train=64, val=74)  # two batches of the recipe's 32
    run = runs / "tanh"
    run.mkdir(parents=True)
    options = ablations.run_options(ablations.AblationConfig(), "tanh", runs)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(resolve(parse_config(options), 64))))
    (runs / "tanh.stderr").write_text(f"{_data_line(trained_on)}\nthe run stopped: rank 0 failed: NonFiniteLoss: "
                                      f"the loss became nan at epoch 1, step 3\n")
    with pytest.raises(ablations.AblationError, match=rf"^{run} was trained on other data: its val/ images differ"):
        _reuse(runs, _data(train=64, val=44), monkeypatch, "--variants", "tanh")
    with pytest.raises(ablations.AblationError, match=rf"^{run} was trained on other data: its number of classes "):
        _reuse(runs, SimpleNamespace(**{**vars(trained_on), "classes": trained_on.classes[:-1]}), monkeypatch,
               "--variants", "tanh")


def test_reuse_refuses_a_run_resumed_past_the_ablation_s_max_steps(tmp_path, monkeypatch):
    """A resume does not keep --max-steps: resumed without it, the run trained to its last
    epoch, while its config.json still said --max-steps 21."""
    runs, data = tmp_path / "runs", _data(train=1000)
    all_steps = resolve(parse_config(["--batch-size", "4"]), 1000).epochs * 250  # the recipe's epochs of 250 steps
    _finished_run(runs, ablations.AblationConfig(max_steps=21, batch_size=4), "full", data, steps=all_steps)
    with pytest.raises(ablations.AblationError, match=rf"^{runs / 'full'} trained {all_steps} steps, not the 21 that "
                                                      rf"these options give \(resumed without --max-steps\?\): remove"):
        _reuse(runs, data, monkeypatch, "--variants", "full", "--max-steps", "21", "--batch-size", "4")
    _finished_run(runs, ablations.AblationConfig(batch_size=4), "tanh", data, steps=21)
    with pytest.raises(ablations.AblationError, match=rf"^{runs / 'tanh'} trained 21 steps, not the {all_steps} "):
        _reuse(runs, data, monkeypatch, "--variants", "tanh", "--batch-size", "4")


def test_reuse_refuses_a_run_started_again_after_its_summary(tmp_path, monkeypatch):
    """A resume stopped before its end leaves the last start's summary.json: the report gave its
    steps beside a curve and evaluations of the later start."""
    runs, data = tmp_path / "runs", _data(train=1000)
    run = _finished_run(runs, ablations.AblationConfig(max_steps=3), "full", data, steps=3)
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"event": "resume", "step": 3}) + "\n")
    with pytest.raises(ablations.AblationError, match=rf"^{run} was started again after its summary.json was written "
                                                      rf"\(its metrics.jsonl goes on after the summary\)"):
        _reuse(runs, data, monkeypatch, "--variants", "full", "--max-steps", "3")
    with (run / "metrics.jsonl").open("a") as metrics:  # its summary record written, summary.json not yet
        metrics.write(json.dumps({"event": "summary", "steps": 5}) + "\n")
    with pytest.raises(ablations.AblationError, match=rf"^{run}'s summary.json and the summary at the end of its "
                                                      rf"metrics.jsonl differ"):
        _reuse(runs, data, monkeypatch, "--variants", "full", "--max-steps", "3")


def test_an_interrupted_run_is_finished_with_the_ablation_s_max_steps(tmp_path, monkeypatch):
    """The advice, when the ablation is interrupted and when --reuse finds the run unfinished,
    resumes with --max-steps again (a resume does not keep it), or, with no checkpoint to resume,
    trains the run anew."""
    def interrupted(*args, **kwargs):  # Ctrl-C while the run trains: run_child stops it and raises
        (runs / "full").mkdir(exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ablations, "run_child", interrupted)
    runs, data = tmp_path / "runs", _data()
    config = ablations.AblationConfig(max_steps=21)
    run = runs / "full"
    with pytest.raises(ablations.Interrupted) as stopped:
        ablations.train(config, "full", runs, data)
    assert str(stopped.value) == (f"the full run was stopped: it wrote no checkpoint yet, so remove {run} and run the "
                                  f"ablation again with --reuse, which trains it anew")
    options = ablations.run_options(config, "full", runs)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(resolve(parse_config(options), 30))))
    torch.save({"progress": {"global_step": 19, "epoch": 0}}, run / "checkpoint.pt")
    resume = f"finish it with python -m launch.two_gpu --resume {run} --max-steps 21, then run the ablation again " \
             f"with --reuse (or remove {run} to train it anew)"
    with pytest.raises(ablations.AblationError) as unfinished:
        ablations.train(dataclasses.replace(config, reuse=True), "full", runs, data)
    assert str(unfinished.value) == f"{run} holds a run that neither finished nor stopped on its own (interrupted?): " \
                                    f"{resume}"
    # stopped in its final evaluation: a resume would refuse a checkpoint of the end of the training
    torch.save({"progress": {"global_step": 21, "epoch": 0}}, run / "checkpoint.pt")
    with pytest.raises(ablations.AblationError, match=f"its checkpoint holds the end of its training, but it stopped "
                                                      f"before its summary, so remove {run} and run the ablation"):
        ablations.train(dataclasses.replace(config, reuse=True), "full", runs, data)
    shutil.rmtree(run)
    with pytest.raises(ablations.Interrupted) as stopped:
        ablations.train(config, "full", runs, data)
    assert str(stopped.value).startswith("the full run was stopped: it wrote no checkpoint yet")


def test_a_run_that_trained_on_images_changed_under_it_is_refused(tmp_path, monkeypatch):
    """Images added to --data while the ablation's first variant trained: the next variants
    trained on another set, and the report gave one data line for every run, comparing them."""
    runs, opened, changed = tmp_path / "runs", _data(), _data(train=38, digests=("38 train images", "val images"))

    def trained(command, stdout, stderr, **kwargs):  # on the images as they were when it started
        _finished_run(runs, ablations.AblationConfig(max_steps=3), "full", changed, steps=3)
        stderr.write(f"{_data_line(changed)}\n")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(ablations, "run_child", trained)
    with pytest.raises(ablations.AblationError, match=rf"^{runs / 'full'} was trained on other data: its train/ "
                                                      rf"images differ from those in /data now"):
        ablations.train(ablations.AblationConfig(max_steps=3), "full", runs, opened)


@pytest.mark.parametrize("damage, file, wrong", [
    ("a record without its event", "metrics.jsonl", "line 1: event is missing"),
    ("a number as text", "metrics.jsonl", 'line 1: top1 is "x", not a number from 0 to 1'),
    ("a summary that is a list", "summary.json", "the file is a list, not an object"),
    ("a summary without its rate", "summary.json", "images_per_s is missing")])
def test_run_files_edited_by_hand_are_named_not_a_traceback(tmp_path, damage, file, wrong):
    run = tmp_path / "full"
    run.mkdir()
    records = [{"event": "train", "epoch": 1, "step": 1, "top1": 0.5, "loss": 2.0}, {"event": "summary"}]
    summary = {"steps": 1, "classes": 10, "centre": {"top1_error": 0.5, "top5_error": 0.1, "images": 10},
               "images_per_s": 1.0, "train_seconds": 1.0, "device": "cpu", "layout": "towers"}
    if damage == "a record without its event":
        del records[0]["event"]
    elif damage == "a number as text":
        records[0]["top1"] = "x"
    elif damage == "a summary that is a list":
        summary = []
    else:
        del summary["images_per_s"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ablations.AblationError) as refused:
        ablations.read_run(run)
    assert str(refused.value) == (f"{run / file} is not as python -m launch.two_gpu writes it: {wrong}: remove {run} "
                                  f"to train that variant again")


def _reusable_run(runs, data, steps=3, config=None, variant="full"):
    """A finished run of ``variant``, ``--max-steps steps`` (and ``config``'s options) as
    launch.two_gpu and the ablation leave it, on ``data``: every file that the report reads,
    metrics.jsonl with a record per step."""
    config = config or ablations.AblationConfig(max_steps=steps)
    run = _finished_run(runs, config, variant, data, steps=steps)
    (run / "metrics.jsonl").unlink()
    _written_curve(run, [[0.5] * steps])
    centre = {"top1_error": 0.4, "top5_error": 0.1, "images": len(data.val)}
    summary = {"steps": steps, "steps_this_run": steps, "classes": len(data.classes), "centre": centre,
               "images_per_s": 8.0, "train_seconds": 1.5, "device": "cpu", "layout": "single"}
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"event": "eval", "epoch": 1, "step": steps, **centre}) + "\n")
        metrics.write(json.dumps({"event": "summary", **summary}) + "\n")
    (run / "summary.json").write_text(json.dumps(summary))
    conditions = {"command": "python -m launch.two_gpu", "wall_s": 9.0,
                  "load_average": {"start": [1.0, 1.0, 1.0], "end": [2.0, 1.0, 1.0]}}
    (runs / f"{variant}{ablations.CONDITIONS_SUFFIX}").write_text(json.dumps(conditions))
    return run


def _edit_json(path, change, lines=False):
    """``change`` applied to the JSON file ``path`` (``lines``: to its list of records), or what
    it returns in its place."""
    text = path.read_text()
    value = [json.loads(line) for line in text.splitlines()] if lines else json.loads(text)
    value = change(value) or value
    path.write_text("".join(json.dumps(r) + "\n" for r in value) if lines else json.dumps(value))


def _train_records(change):
    return lambda records: [change(r) or r if r["event"] == "train" else r for r in records]


@pytest.mark.parametrize("file, change, wrong", [
    ("conditions", lambda c: c.__delitem__("load_average"), "load_average is missing"),
    ("conditions", lambda c: c.update(wall_s="9.0"), 'wall_s is "9.0", not a finite number of at least 0'),
    ("conditions", lambda c: c.update(wall_s=math.nan), "wall_s is NaN, not a finite number of at least 0"),
    ("conditions", lambda c: [c], "the file is a list, not an object"),
    ("summary", lambda s: s["centre"].update(top1_error="0.4"), 'centre.top1_error is "0.4", not a number from 0 to 1'),
    ("summary", lambda s: s["centre"].update(top1_error=math.nan),
     "centre.top1_error is NaN, not a number from 0 to 1"),
    ("summary", lambda s: s["centre"].update(top1_error=-3), "centre.top1_error is -3, not a number from 0 to 1"),
    ("summary", lambda s: s["centre"].update(images=0), "centre.images is 0, not a whole number above 0"),
    ("summary", lambda s: s.update(images_per_s=None), "images_per_s is null"),
    ("summary", lambda s: s.update(classes=0), "classes is 0, not a whole number above 0"),
    ("metrics", _train_records(lambda r: r.update(loss="2.3")),
     'line 1: loss is "2.3", not a finite number of at least 0'),
    ("metrics", _train_records(lambda r: r.update(loss=math.nan)),
     "line 1: loss is NaN, not a finite number of at least 0"),
    ("metrics", lambda records: [r for r in records if r["event"] != "train"],
     "no record of a training step, where summary.json says the run finished")])
def test_reuse_refuses_a_run_whose_numbers_are_not_as_written_in_one_line(tmp_path, monkeypatch, file, change, wrong):
    """Values that the report computes with: a string, a missing key, a count of 0 broke it with
    a traceback; a NaN or a negative error went into report.md, the chart and results.json (as a
    bare NaN, which is no JSON). Refused as they are read, naming the file and the fix."""
    monkeypatch.setattr(ablations, "initial_activation_scale", lambda run_dir, bundle: 1.0)  # of no real images here
    runs, data = tmp_path / "runs", _data(train=1000, val=50)
    run = _reusable_run(runs, data)
    out = _reuse(runs, data, monkeypatch, "--variants", "full", "--max-steps", "3")  # as written: reported
    assert json.loads((out / "results.json").read_text())["runs"]["full"]["centre"]["top1_error"] == 0.4
    shutil.rmtree(out)
    path = {"conditions": runs / f"full{ablations.CONDITIONS_SUFFIX}", "summary": run / "summary.json",
            "metrics": run / "metrics.jsonl"}[file]
    _edit_json(path, change, lines=file == "metrics")
    if file == "summary":  # as the summary that ends metrics.jsonl, which --reuse compares with it
        summary = json.loads(path.read_text())
        _edit_json(run / "metrics.jsonl", lambda records: records[:-1] + [{"event": "summary", **summary}], lines=True)
    report = tmp_path / "report"
    with pytest.raises(ablations.AblationError) as refused:
        _reuse(runs, data, monkeypatch, "--variants", "full", "--max-steps", "3")
    writer = "python -m benchmarks.ablations" if file == "conditions" else "python -m launch.two_gpu"
    assert str(refused.value) == (f"{path} is not as {writer} writes it: {wrong}: remove {run} to train that variant "
                                  f"again")
    assert not report.exists()  # no report of it, nor the folder made for one


def test_the_report_says_which_runs_reuse_read(tmp_path, monkeypatch):
    """--reuse where no run was in --runs yet: every run was trained, while the report said that
    runs already finished in --runs had been read. It names those that were."""
    def trained(command, stdout, stderr, **kwargs):
        variant = command[command.index("--run-name") + 1]
        _reusable_run(runs, data, variant=variant)
        stderr.write(f"{_data_line(data)}\n")
        started.append(variant)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(ablations, "run_child", trained)
    monkeypatch.setattr(ablations, "initial_activation_scale", lambda run_dir, bundle: 1.0)  # of no real images here
    runs, data, started = tmp_path / "runs", _data(train=1000, val=50), []

    def command_line(*variants):
        out = _reuse(runs, data, monkeypatch, "--variants", ",".join(variants), "--max-steps", "3")
        reused = json.loads((out / "results.json").read_text())["info"].get("reused")
        line = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("- command: "))
        shutil.rmtree(out)
        return reused, line

    reused, line = command_line("full", "tanh")
    assert line.endswith("--max-steps 3`") and started == ["full", "tanh"] and reused == [], line
    reused, line = command_line("full", "tanh", "no-lrn")
    assert started == ["full", "tanh", "no-lrn"] and reused == ["full", "tanh"]
    assert line.endswith("--max-steps 3` (the runs of full, tanh were already in --runs and were read, not trained "
                         "again: trained by this command without --reuse, with the options checked against their "
                         "config.json)"), line


@pytest.mark.parametrize("stopped, advice", [
    ("launch.train.NonFiniteLoss: the loss became nan at epoch 1, step 3; the run stops. No checkpoint was written "
     "yet: start again with a lower --lr (such as 0.00025) or a longer --warmup-steps, under another --run-name (or "
     "after removing RUN)",
     "It ran away at the ablation's --lr, the rate of every variant: to compare them at a lower one, run the ablation "
     "again with a lower --lr and another --runs folder."),
    ("killed by SIGKILL\nno checkpoint was written yet: once the cause is fixed, start the run again under another "
     "--run-name (or after removing RUN)",
     "Once the cause is fixed, remove RUN and run the ablation again with --reuse, which trains it anew and reads the "
     "other runs.")])
def test_a_run_that_stopped_is_reported_with_the_ablation_s_advice_and_its_files(tmp_path, monkeypatch, stopped,
                                                                                  advice):
    """The program's advice after the cause of a run that stopped names its own options (--run-name,
    --warmup-steps), which the ablation does not have; and the folder of a run that stopped holds
    no summary.json (nor, before its first save, checkpoint.pt), which the report said each did."""
    monkeypatch.setattr(ablations, "initial_activation_scale", lambda run_dir, bundle: 1.0)  # of no real images here
    runs, data = tmp_path / "runs", _data(train=1000, val=50)
    _reusable_run(runs, data)
    run = runs / "tanh"
    run.mkdir()
    options = ablations.run_options(ablations.AblationConfig(max_steps=3), "tanh", runs)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(resolve(parse_config(options), 1000))))
    _written_curve(run, [[0.9, 0.9]])
    (run / "train.log").write_text("epoch 1/1 step 2/250 loss 2.3\n")
    stopped = stopped.replace("RUN", str(run))
    (runs / "tanh.stderr").write_text(f"{_data_line(data)}\nthe run stopped: rank 0 failed: {stopped}\n")
    out = _reuse(runs, data, monkeypatch, "--variants", "full,tanh", "--max-steps", "3")
    report = (out / "report.md").read_text()
    assert "--run-name" not in report and "--warmup-steps" not in report, report
    cause = f"the run stopped: rank 0 failed: {stopped.split('; the run stops.')[0].splitlines()[0]}"
    assert json.loads((out / "results.json").read_text())["runs"]["tanh"]["failed"] == cause
    assert f"| tanh | tanh for every ReLU | stopped at step {3 if 'nan' in cause else 2}: {cause} |" in report
    line = next(line for line in report.splitlines() if line.startswith("- tanh: "))
    assert line == (f"- tanh: `{run}`; stopped at step {3 if 'nan' in cause else 2}, its folder holds config.json, "
                    f"metrics.jsonl, train.log (no summary.json: it did not finish). {advice.replace('RUN', str(run))}")
    assert "The folder of each finished run holds checkpoint.pt, metrics.jsonl, summary.json and train.log; that of " \
           "a run that stopped, the files its line lists." in report


@pytest.mark.slow
def test_a_damaged_run_reused_ends_the_ablation_in_one_line_with_exit_code_2(tiny_data, tmp_path):
    """The command as a user runs it, on a run of the tiny data whose files were edited: one line
    naming the file, exit code 2, no traceback and no report; the run as written is reported."""
    from launch import data as data_module
    data = data_module.open_data(tiny_data, cache_dir=tmp_path / "cache")
    options = ["--data", str(cli.real_path(tiny_data)), "--batch-size", "4", "--max-steps", "3"]
    config = ablations.AblationConfig(**vars(ablations.build_parser().parse_args(options)))
    written = tmp_path / "written"
    _reusable_run(written, data, config=config)
    damages = {"full.conditions.json": (lambda c: [c], "the file is a list, not an object"),
               "full/summary.json": (lambda s: s["centre"].update(images=0),
                                     "centre.images is 0, not a whole number above 0"),
               "full/metrics.jsonl": (_train_records(lambda r: r.update(loss=math.nan)),
                                      "line 1: loss is NaN, not a finite number of at least 0")}
    for damaged, (change, wrong) in (None, (None, None)), *damages.items():
        runs, out = tmp_path / "runs", tmp_path / "report"
        shutil.rmtree(runs, ignore_errors=True)
        shutil.copytree(written, runs)
        if damaged:
            _edit_json(runs / damaged, change, lines=damaged.endswith(".jsonl"))
        ablation = subprocess.run([sys.executable, "-m", "benchmarks.ablations", *options, "--variants", "full",
                                   "--reuse", "--runs", str(runs), "--out", str(out)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=RUN_TIMEOUT_S)
        if damaged is None:  # as written: reported
            assert ablation.returncode == 0, ablation.stderr[-3000:]
            assert (out / "report.md").exists()
            shutil.rmtree(out)
            continue
        assert ablation.returncode == 2 and "Traceback" not in ablation.stderr, ablation.stderr[-3000:]
        writer = "python -m benchmarks.ablations" if damaged.endswith("conditions.json") else "python -m launch.two_gpu"
        line = (f"error: {runs / damaged} is not as {writer} writes it: {wrong}: remove {runs / 'full'} to train that "
                f"variant again")
        assert ablation.stderr.splitlines()[-1] == line, ablation.stderr[-3000:]
        assert [x for x in ablation.stderr.splitlines() if x.startswith("error:")] == [line]
        assert not out.exists()


@pytest.mark.parametrize("returncode, began", [(130, True), (-signal.SIGKILL, True), (-signal.SIGKILL, False),
                                               (-signal.SIGSEGV, True), (-signal.SIGRTMIN - 5, True), (1, True)])
def test_a_run_stopped_from_outside_is_not_taken_for_a_result(tmp_path, monkeypatch, returncode, began):
    """A run whose program was stopped by a SIGTERM of its own (exit 130) or killed (the
    out-of-memory killer) after it began training is unfinished, as when the ablation is
    interrupted, not a run that stopped on its own: it was reported as a result, and the next
    variants compared with it, while --reuse refused the same folder. A run that crashed
    (SIGSEGV, a real-time signal, a traceback) without saying it stopped is a failure, named
    with its output."""
    def stopped(command, stdout, stderr, **kwargs):
        if began:
            (runs / "full").mkdir(parents=True, exist_ok=True)
            (runs / "full" / "metrics.jsonl").write_text("")
        stderr.write("epoch 1/3 step 5/78 loss 2.1\n" + ("interrupted: every rank stopped; resume with ...\n"
                                                         if returncode == 130 else ""))
        return subprocess.CompletedProcess(command, returncode)

    monkeypatch.setattr(ablations, "run_child", stopped)
    runs, config = tmp_path / "runs", ablations.AblationConfig(max_steps=21)
    output = runs / "full.stderr"
    if returncode not in (130, -signal.SIGKILL):
        with pytest.raises(ablations.AblationError) as failed:
            ablations.train(config, "full", runs, _data())
        how = {-signal.SIGSEGV: "killed by SIGSEGV", 1: "exit 1"}.get(returncode, f"killed by signal {-returncode}")
        assert str(failed.value) == f"the full run failed ({how}): epoch 1/3 step 5/78 loss 2.1 (its output: {output})"
        return
    with pytest.raises(ablations.Interrupted) as interrupted:
        ablations.train(config, "full", runs, _data())
    how = {130: "interrupted", -signal.SIGKILL: "killed by SIGKILL"}[returncode]
    advice = (f"it wrote no checkpoint yet, so remove {runs / 'full'} and run the ablation again with --reuse, which "
              f"trains it anew" if began else
              "it had not begun, so run the ablation again with --reuse, which trains it")
    assert str(interrupted.value) == f"the full run was stopped ({how}; its output: {output}): {advice}"
    # no record of its conditions: a --reuse of the run, once finished, would report this start's time
    assert not (runs / f"full{ablations.CONDITIONS_SUFFIX}").exists()


def test_a_resumed_run_s_time_is_said_to_be_its_last_start_s(tmp_path):
    """summary.json times the steps of the start that wrote it: a run resumed for its last 2
    of 21 steps did not train 21 steps in that time."""
    run = tmp_path / "full"
    run.mkdir()
    _written_curve(run, [[0.5] * 21])
    summary = {"steps": 21, "steps_this_run": 2, "classes": 10, "centre": {"top1_error": 0.5, "top5_error": 0.1,
                                                                           "images": 10},
               "images_per_s": 80.0, "train_seconds": 6.0, "device": "cpu", "layout": "single"}
    (run / "summary.json").write_text(json.dumps(summary))
    line = ablations.run_line("full", ablations.read_run(run))
    assert "; 21 steps, resumed: the last start's 2 steps trained in 0.1 min (80.0 images/s)" in line
    (run / "summary.json").write_text(json.dumps({**summary, "steps_this_run": 21}))
    assert "; 21 steps trained in 0.1 min" in ablations.run_line("full", ablations.read_run(run))
    # how the machine was loaded: the 1-minute averages (the first of os.getloadavg's three)
    conditions = {"wall_s": 90.0, "load_average": {"start": [1.5, 2.0, 3.0], "end": [0.5, 5.0, 6.0]}, "command": "x"}
    (tmp_path / f"full{ablations.CONDITIONS_SUFFIX}").write_text(json.dumps(conditions))
    assert ablations.run_line("full", ablations.read_run(run)).endswith(
        "; wall time 1.5 min; load average (1 min) 1.5 at its start, 0.5 at its end; command `x`")


def test_a_run_whose_loss_became_nan_stopped_at_that_step(tmp_path):
    """The step whose loss was NaN wrote no record: the run stopped at the step after the last one."""
    _written_curve(tmp_path, [[0.9, 0.9]])
    failure = ("the run stopped: rank 0 failed: launch.train.NonFiniteLoss: the loss became nan at epoch 1, step 3; "
               "the run stops.")
    assert ablations.read_run(tmp_path, failure)["steps"] == 3
    assert ablations.read_run(tmp_path, "the run stopped: rank 1 failed: killed by SIGKILL")["steps"] == 2


@pytest.mark.parametrize("classes, line", [
    (10, "- **Top-5 error** on 10 classes counts a miss only when the true class is among the 5 least likely: a "
         "uniform guess misses 50 % of the time (99.5 % on ILSVRC-2012's 1000)."),
    (40, "- **Top-5 error** on 40 classes counts a miss only when the true class is among the 35 least likely: a "
         "uniform guess misses 88 % of the time (99.5 % on ILSVRC-2012's 1000)."),
    (5, None), (2, None)])
def test_the_top5_sentence_follows_the_number_of_classes(classes, line):
    results = {"full": {"failed": "the run stopped: ..."}, "tanh": {"failed": None, "classes": classes}}
    assert ablations.top5_lines(results) == ([line] if line else [])


def test_a_damaged_run_file_a_variant_named_twice_and_a_home_folder_are_told_apart(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "tanh"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n{"event": "tra\n')  # cut short by a hand edit
    with pytest.raises(ablations.AblationError, match=f"cannot read {run / 'metrics.jsonl'} .*: remove its run folder"):
        ablations.read_run(run)
    (run / "config.json").write_bytes(b"\xff")
    with pytest.raises(ablations.AblationError, match=f"cannot read {run / 'config.json'} "):
        ablations.check_reusable(run, [], 30)
    (run / "config.json").write_text("[]")
    with pytest.raises(ablations.AblationError) as refused:
        ablations.check_reusable(run, [], 30)
    assert str(refused.value) == (f"{run / 'config.json'} is not as python -m launch.two_gpu writes it: the file is a "
                                  f"list, not an object: remove {run} to train that variant again")
    with pytest.raises(SystemExit):  # argparse: one line, exit 2
        ablations.build_parser().parse_args(["--variants", "full,tanh,full"])
    with pytest.raises(ValueError, match="--runs is empty"):
        ablations.main(["--runs", ""])

    # --out=~/x: no shell expands that ~
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    made, home = [], tmp_path / "home"
    _stop_at_the_runs(monkeypatch, lambda: made.extend(p.relative_to(home) for p in sorted(home.rglob("*"))))
    with pytest.raises(OSError, match="stop"):
        ablations.main(["--out=~/report", "--runs=~/runs"])
    assert made == [Path("report"), Path("runs")] and not (tmp_path / "~").exists()  # as the runs start
    assert not home.exists()  # and none left by an ablation that stopped before writing in them


def test_an_ablation_that_stops_leaves_no_folder_it_made_for_nothing(tmp_path, monkeypatch):
    """A run refused or stopped: the folders made for the report and the runs are removed where
    nothing was written in them, with the parents made for them; what holds anything stays."""
    kept = tmp_path / "new" / "runs" / "full.stderr"

    def a_run_wrote():
        kept.write_text("the run's output")
    _stop_at_the_runs(monkeypatch, a_run_wrote)
    for given in ("new/report", "new/runs/report"):  # beside the runs, in them
        with pytest.raises(OSError, match="stop"):
            ablations.main(["--out", str(tmp_path / given), "--runs", str(tmp_path / "new" / "runs")])
        assert sorted(tmp_path.rglob("*")) == [tmp_path / "new", tmp_path / "new" / "runs", kept]
    kept.unlink()
    _stop_at_the_runs(monkeypatch)
    with pytest.raises(OSError, match="stop"):
        ablations.main(["--out", str(tmp_path / "new" / "a" / "report"), "--runs", str(tmp_path / "new" / "runs")])
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "new", tmp_path / "new" / "runs"]  # it was there before
    with pytest.raises(OSError, match="stop"):  # through a folder that is not there: the same folder
        ablations.main(["--out", str(tmp_path / "none" / ".." / "new" / "runs"), "--runs", str(tmp_path / "r")])
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "new", tmp_path / "new" / "runs"]
    real_mkdir = Path.mkdir

    def another_made_it_first(folder, *args, **kwargs):  # another ablation, between the look and the making
        real_mkdir(folder, *args, **kwargs)
        if folder.name == "report":
            raise FileExistsError(17, "File exists", str(folder))
    monkeypatch.setattr(Path, "mkdir", another_made_it_first)
    with pytest.raises(OSError, match="stop"):
        ablations.main(["--out", str(tmp_path / "new" / "report"), "--runs", str(tmp_path / "new" / "runs")])
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "new", tmp_path / "new" / "report", tmp_path / "new" / "runs"]
    monkeypatch.undo()
    made = []  # parents made before a level that cannot be
    with pytest.raises(OSError):
        cli.make_folder(tmp_path / "a" / "b" / ("x" * 300), made)
    assert made == [tmp_path / "a", tmp_path / "a" / "b"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_report_and_run_folders_in_the_data_s_images_are_refused_before_they_are_made(tiny_data, tmp_path, split):
    """A folder there would be a class of images to the runs' scans of the data: named as such,
    not as classes that differ between train/ and val/."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for flag in ("--out", "--runs"):
        inside = data / split / "ablation"
        folders = {"--out": tmp_path / "report", "--runs": tmp_path / "runs", flag: inside}
        with pytest.raises(ValueError) as refused:
            ablations.main(["--data", str(data), *(f"{f}={folder}" for f, folder in folders.items())])
        assert str(refused.value) == (f"{flag} {inside} lies in the data's {split}/ ({data / split}), where a "
                                      f"folder would be taken for a class of images: give {flag} outside "
                                      f"{data / split}")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and not inside.exists()


@pytest.mark.parametrize("inside, variant", [("full", "full"), ("tanh/report", "tanh"),
                                             ("no-lrn/../one-tower", "one-tower")])
def test_a_report_folder_in_a_variant_s_run_folder_is_refused_before_it_is_made(tmp_path, monkeypatch, inside,
                                                                                 variant):
    """--out R/full with --runs R: the report's folder, made first, was taken for the full run's
    ('already holds a run'; with --reuse, 'holds no run', again each time it was removed)."""
    _stop_at_the_runs(monkeypatch)  # past the checks of the options
    runs = tmp_path / "runs"
    with pytest.raises(ValueError) as refused:
        ablations.main(["--runs", str(runs), "--out", str(runs / inside), "--reuse"])
    assert str(refused.value) == (f"--out {runs / inside} lies in {runs / variant}, the run folder of the {variant} "
                                  f"variant: give --out outside it")
    assert not any(tmp_path.iterdir())
    with pytest.raises(OSError, match="stop"):  # beside the run folders, or in --runs itself: taken
        ablations.main(["--runs", str(runs), "--out", str(runs / "full-report")])
    with pytest.raises(OSError, match="stop"):
        ablations.main(["--runs", str(runs), "--out", str(runs)])
    # --runs left at its default, in a repository whose runs/ is a link to a roomier disk
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "runs").symlink_to(tmp_path / "disk", target_is_directory=True)
    monkeypatch.setattr(ablations, "ROOT", tmp_path / "repo")
    default = tmp_path / "repo" / "runs" / f"ablations-{datetime.date.today().isoformat()}"
    with pytest.raises(ValueError, match=f"^--out {re.escape(str(default / inside))} lies in "):
        ablations.main(["--out", str(default / inside)])


@pytest.mark.parametrize("option, value, words", [("--epochs", "0", "--epochs must be positive, got 0"),
                                                   ("--lr", "nan", "--lr must be a finite number, got nan"),
                                                   ("--seed", "-5", "--seed must be an integer from 0 to"),
                                                   ("--workers", "100000", "--workers 100000 would start that many")])
def test_a_value_the_training_program_refuses_is_refused_before_any_folder_is_made(tmp_path, option, value, words):
    out, runs = tmp_path / "report", tmp_path / "runs"
    with pytest.raises(ValueError, match=f"^{re.escape(words)}"):
        ablations.main([option, value, "--out", str(out), "--runs", str(runs)])
    assert not any(tmp_path.iterdir())  # no report folder, no run folder, no run's output


def test_a_batch_larger_than_the_training_set_is_refused_before_the_first_run(tiny_data, tmp_path):
    """Found in the data before the first run, not by it; the folders made for it are not left."""
    with pytest.raises(ValueError, match="^--batch-size 31 is larger than the 30 training images: choose a smaller"):
        ablations.main(["--data", str(tiny_data), "--batch-size", "31", "--out", str(tmp_path / "report"),
                        "--runs", str(tmp_path / "runs")])
    assert not any(tmp_path.iterdir())


def test_a_run_reused_is_not_held_to_this_machine_s_bounds(tmp_path, monkeypatch):
    """--workers is not compared on --reuse: runs trained on a machine of more cores are read here."""
    (tmp_path / "runs" / "full").mkdir(parents=True)
    _stop_at_the_runs(monkeypatch)
    with pytest.raises(OSError, match="stop"):  # past the checks of the options, at the runs
        ablations.main(["--variants", "full", "--workers", "100000", "--reuse", "--out", str(tmp_path / "report"),
                        "--runs", str(tmp_path / "runs")])
    with pytest.raises(ValueError, match="^--lr must be a positive rate below 10"):  # other values still are checked
        ablations.main(["--variants", "full", "--lr", "-1", "--reuse", "--out", str(tmp_path / "report"),
                        "--runs", str(tmp_path / "runs")])


@pytest.mark.parametrize("shared", ["--out", "--runs", "both in one"])
def test_a_second_ablation_into_the_same_folders_is_refused_before_it_writes(tmp_path, monkeypatch, shared):
    """Two ablations given one --runs would train into one run folder, each truncating the
    other's log; given one --out, interleave their reports. While one runs, the other is refused."""
    if shared == "both in one":  # one folder for both: one lock
        first = second = {"--out": tmp_path / "both", "--runs": tmp_path / "both"}
    else:
        first = {"--out": tmp_path / "report", "--runs": tmp_path / "runs"}
        second = {flag: first[flag] if flag == shared else tmp_path / f"second-{flag[2:]}" for flag in first}
    refused, written = [], []

    def first_running():  # the second starts while the first starts its runs
        with pytest.raises(ValueError) as error:
            ablations.main([*(f"{flag}={folder}" for flag, folder in second.items()), "--variants", "full"])
        refused.append(str(error.value))
        written.extend(p for folder in set(first.values()) for p in folder.iterdir())

    opened = _stop_at_the_runs(monkeypatch, first_running)
    with pytest.raises(OSError, match="stop"):
        ablations.main([*(f"{flag}={folder}" for flag, folder in first.items()), "--variants", "full"])
    assert opened == [None]  # by the first: the second was refused before its data (the statistics computed)
    flag = "--runs" if shared == "both in one" else shared
    assert refused == [f"{flag} {first[flag].resolve()} is in use by another benchmark program writing there: wait "
                       f"for it to end, or give another {flag}"]
    assert written == []  # by the second in the first's folders
    assert not any(tmp_path.iterdir())  # the folders each made for nothing are gone


def test_an_out_folder_of_another_tool_s_report_is_refused_before_any_run(tmp_path, monkeypatch):
    """A benchmark's report (its results.json replaced, its charts left beside the ablation's)
    or files of the user's are refused, one line; an earlier ablation's report is replaced."""
    _stop_at_the_runs(monkeypatch)  # past the check of --out
    benchmark = {"results.json": json.dumps({"machine": {}, "config": {}, "runs": [],
                                             "command": "python -m benchmarks.run --quick"}),
                 "report.md": "a benchmark's report", "images_per_s_vs_batch.png": "a chart"}
    for name, files in (("benchmark", benchmark), ("mine", {"report.md": "my notes"})):
        out = tmp_path / name
        out.mkdir()
        for file, text in files.items():
            (out / file).write_text(text)
        with pytest.raises(ValueError) as refused:
            ablations.main(["--out", str(out), "--runs", str(tmp_path / "runs")])
        shown = ", ".join(f for f in ablations.REPORT_FILES if f in files)
        assert str(refused.value) == (f"--out {out} holds {shown} that python -m benchmarks.ablations did not write "
                                      f"(no results.json of its own beside them): give another folder, or move them")
        assert {p.name: p.read_text() for p in out.iterdir()} == files
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text(json.dumps({"info": {"machine": {}, "config": {}, "command":
                                                               "python -m benchmarks.ablations --epochs 1"},
                                                      "noise": {}, "runs": {}}))
    with pytest.raises(OSError, match="stop"):
        ablations.main(["--out", str(earlier), "--runs", str(tmp_path / "runs")])


# ---------------------------------------------------------------- one tiny ablation, run as a user runs it

@pytest.fixture(scope="module")
def ablation(tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablation")
    args = ["--data", str(tiny_data), *TINY_BUDGET, "--layout", "towers", "--seed", "3", "--out",
            str(folder / "report"), "--runs", str(folder / "runs")]
    result = subprocess.run([sys.executable, "-m", "benchmarks.ablations", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=ABLATION_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, args


def _table_rows(report: str) -> dict:
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip("| ") for cell in rows[0]]
    return {cells[0].strip("| "): dict(zip(header, (c.strip("| ") for c in cells))) for cells in rows[1:]}


@pytest.mark.slow
def test_report_has_a_row_per_variant_with_the_runs_numbers(ablation):
    folder, _ = ablation
    report = (folder / "report" / "report.md").read_text()
    rows = _table_rows(report)
    assert list(rows) == list(ablations.VARIANTS)
    full = json.loads((folder / "runs" / "full" / "summary.json").read_text())["centre"]
    for variant, row in rows.items():
        run = folder / "runs" / variant
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 7
        assert summary["layout"] == ("one-tower" if variant == "one-tower" else "towers")
        centre = summary["centre"]
        assert row["val top-1 error %"] == f"{100 * centre['top1_error']:.1f}"
        assert row["val top-5 error %"] == f"{100 * centre['top5_error']:.1f}"
        assert row["images/s"] == f"{summary['images_per_s']:.1f}"
        assert row["val top-1 error % by epoch"] == f"{100 * centre['top1_error']:.1f}"  # one epoch, one evaluation
        if variant != "full":
            delta = 100 * (centre["top1_error"] - full["top1_error"])
            assert row["top-1 / top-5 vs full (points)"].startswith(f"{delta:+.1f} / ")
        train_records = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
        assert len(train_records) == 7  # every step logged
        # seven steps never fill a 20-step window: not 'not within 7', which reads as a result
        assert row["steps to 25 % / 50 % training error"].startswith(
            f"not measurable: no epoch of the run reached the {StepMeter().window} steps")
    # At the same initial weights LRN divides every map by at least k^beta = 2^0.75: without it the
    # activations reaching FC6 are larger.
    assert float(rows["no-lrn"]["FC6 input std at step 1"]) > float(rows["full"]["FC6 input std at step 1"]) > 0
    # ten validation images: one image is 10 points, the floor of a difference far above the paper's effects
    assert "an error moves in steps of 10.0 points (one image)" in report
    assert "The paper's effects are smaller than that floor" in report
    assert "python -m benchmarks.ablations --data" in report and "--layout towers" in report
    assert matplotlib.image.imread(folder / "report" / ablations.CHART).shape[2] in (3, 4)
    saved = json.loads((folder / "report" / "results.json").read_text())
    assert set(saved["runs"]) == set(ablations.VARIANTS)


@pytest.mark.slow
def test_reuse_reads_finished_runs_and_refuses_runs_of_other_options(ablation, tmp_path):
    folder, args = ablation
    checkpoint = folder / "runs" / "tanh" / "checkpoint.pt"
    trained_at = checkpoint.stat().st_mtime_ns
    out = ablations.main([*args, "--reuse", "--out", str(tmp_path / "again")])
    assert checkpoint.stat().st_mtime_ns == trained_at  # read, not trained again
    assert _table_rows((out / "report.md").read_text()) == _table_rows((folder / "report" / "report.md").read_text())
    with pytest.raises(ablations.AblationError, match="seed = 3, not 4"):
        ablations.main([*args, "--reuse", "--seed", "4", "--out", str(tmp_path / "other")])
    # A run saved before an option existed ran as that option's default: still reusable.
    older = tmp_path / "older"
    older.mkdir()
    saved = json.loads((folder / "runs" / "full" / "config.json").read_text())
    options = ablations.run_options(ablations.AblationConfig(**vars(ablations.build_parser().parse_args(args))),
                                    "full", folder / "runs")
    for config in ({k: v for k, v in saved.items() if k not in ("precision", "compile")}, {**saved, "precision": "bf16"}):
        (older / "config.json").write_text(json.dumps(config))
        if config.get("precision") == "bf16":
            with pytest.raises(ablations.AblationError, match="precision = bf16, not fp32"):
                ablations.check_reusable(older, options, 30)  # the tiny data's training images
        else:
            ablations.check_reusable(older, options, 30)


@pytest.mark.slow
def test_benchmarks_report_given_an_ablation_s_folder_names_the_command_that_redraws_it(ablation, tmp_path, capsys,
                                                                                         monkeypatch):
    """The report moved elsewhere, its command's --runs (left to its default) dropped: benchmarks.report
    refuses it in one line, leaving it as it was, and names the ablation's command with the folders
    it wrote; that command reads the runs, trains none, and redraws the report where it now is."""
    folder, args = ablation
    moved = tmp_path / "moved report"
    shutil.copytree(folder / "report", moved)
    saved = json.loads((moved / "results.json").read_text())
    runs_at = args.index("--runs")
    saved["info"]["command"] = shlex.join(["python", "-m", "benchmarks.ablations", *args[:runs_at],
                                           *args[runs_at + 2:]])
    (moved / "results.json").write_text(json.dumps(saved))
    before = {p.name: p.read_bytes() for p in moved.iterdir()}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        benchmark_report.main([moved.name])  # named from here
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {moved.name}/results.json is an ablation's, not a benchmark's" in err
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == before
    words = shlex.split(err.split(" by ", 1)[1].rsplit(" (from the folder where it ran)", 1)[0])
    assert words[:3] == ["python", "-m", "benchmarks.ablations"] and words.count("--reuse") == 1
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where a default --runs, or --out named from tmp_path, would be
    checkpoint = folder / "runs" / "tanh" / "checkpoint.pt"
    trained_at = checkpoint.stat().st_mtime_ns
    assert ablations.main(words[3:]) == moved
    assert checkpoint.stat().st_mtime_ns == trained_at  # read, not trained again
    assert _table_rows((moved / "report.md").read_text()) == _table_rows((folder / "report" / "report.md").read_text())


@pytest.mark.slow
def test_a_report_into_a_folder_whose_name_is_not_utf8_is_written(ablation, tmp_path):
    """The report names its command, --out included: the odd bytes are escaped, not refused."""
    folder, args = ablation
    out = tmp_path / "r\udcffport"
    ablations.main([*args, "--reuse", "--out", str(out)])
    assert "r\\udcffport" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_full_disk_under_the_report_is_one_line_and_leaves_no_partial_file(ablation, tmp_path, monkeypatch):
    """The disk fills while the chart is written: one line naming the folder, the fix and
    --reuse; the results.json written before it is whole, and no part of the chart is left."""
    import matplotlib.figure
    folder, args = ablation

    def full_disk(fig, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG\r\n")  # a part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    out = tmp_path / "report"
    with pytest.raises(ablations.AblationError) as refused:
        ablations.main([*args, "--reuse", "--out", str(out)])
    assert str(refused.value) == (f"cannot write {out} (No space left on device): free space on that disk, or give "
                                  f"--out a folder that can be written; the finished runs stay in --runs, and the "
                                  f"same command with --reuse makes the report from them")
    # the report's files are put in place together, once all are made: none is, and the folder made for them goes
    assert not out.exists()
    # Into the folder of an earlier report (of every variant): it stays as it was, whole, not
    # mixed with the new results (its results.json was replaced and its report removed)
    earlier = tmp_path / "earlier"
    shutil.copytree(folder / "report", earlier)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    with pytest.raises(ablations.AblationError):
        ablations.main([*args, "--reuse", "--out", str(earlier), "--variants", "full"])
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


@pytest.mark.slow
def test_the_options_reach_the_towers_checkpoint_and_evaluation(ablation, tiny_data, tmp_path, caplog):
    folder, _ = ablation
    for variant, architecture in (("no-lrn", Architecture(lrn=False)),
                                  ("non-overlapping", Architecture(pooling="non-overlapping")),
                                  ("tanh", Architecture(activation="tanh"))):
        run = folder / "runs" / variant
        assert load_reference(run).architecture == architecture  # saved by the two towers
        assert "exchanges_per_step" in json.loads((run / "summary.json").read_text())
    run = folder / "runs" / "tanh"
    summary = json.loads((run / "summary.json").read_text())
    # Evaluation takes the checkpoint's architecture, whatever the layout
    again = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "eval", "--eval-only", run, "--layout", "single",
                   "--no-ten-crop", "--workers", "0")
    assert "architecture: tanh for ReLU" in again.stderr
    assert f"top-1 error {100 * summary['centre']['top1_error']:.2f}%" in again.stderr
    # and refuses an option that names another one
    line = _error_line(["--data", tiny_data, "--out", tmp_path, "--run-name", "no", "--eval-only", run, "--no-lrn"],
                       caplog)
    assert line == f"error: --no-lrn: {run} holds a net with --lrn, and is evaluated as it was trained: drop the option"
    assert not (tmp_path / "no").exists()


def _error_line(argv, caplog) -> str:
    """The one error line of ``python -m launch.two_gpu ARGV``, which stops with exit code 2
    before any rank starts: run in this process."""
    caplog.clear()
    assert two_gpu.main([str(a) for a in argv]) == 2, caplog.text
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1, caplog.text
    return errors[0]


@pytest.mark.slow
def test_the_one_tower_layout_keeps_its_net(ablation, tiny_data, tmp_path, caplog):
    folder, _ = ablation
    run = tmp_path / "one-tower"
    shutil.copytree(folder / "runs" / "one-tower", run)  # resumed below: the shared run stays as it was
    payload = load_checkpoint(run)
    assert payload["arch"]["net"] == "one-tower" and payload["config"]["layout"] == "one-tower"
    model = load_reference(run)
    assert model.conv1.out_channels == 48 and model.conv5.out_channels == 256
    assert all(m.groups == 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    # never loaded into the towers or the two-tower reference: one line naming the fix
    for layout in ("towers", "single"):
        line = _error_line(["--data", tiny_data, "--out", tmp_path, "--run-name", "e", "--eval-only", run,
                            "--layout", layout], caplog)
        assert re.fullmatch(rf"error: {re.escape(str(run))} holds the one-tower net .* --layout {layout} cannot "
                            rf"hold: use --layout one-tower", line), line
    line = _error_line(["--resume", run, "--max-steps", "3", "--layout", "towers"], caplog)
    assert line.endswith("--layout towers cannot hold: use --layout one-tower")
    line = _error_line(["--resume", run, "--layout", "one-tower", "--activation", "tanh"], caplog)
    assert "--activation tanh differs from the resumed run's relu" in line
    # and a two-tower checkpoint is never loaded into the one-tower net
    line = _error_line(["--data", tiny_data, "--out", tmp_path, "--run-name", "e", "--eval-only",
                        folder / "runs" / "full", "--layout", "one-tower"], caplog)
    assert line.endswith("holds the paper's two-tower net, not the one-tower net that --layout one-tower builds: use "
                         "--layout towers or --layout single")

    # --eval-only takes the one layout that holds it, as --resume does (and as the advice to evaluate it words it)
    launch("--eval-only", run, "--data", tiny_data, "--out", tmp_path, "--run-name", "e", "--no-ten-crop")
    evaluated = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["layout"]) for r in evaluated] == [("eval_only", "one-tower")], evaluated
    assert evaluated[0]["centre"]["images"] > 0, evaluated
    launch("--resume", run, "--epochs", "2", "--max-steps", "9", "--no-ten-crop")  # in the run's layout, one-tower
    resumed = load_checkpoint(run)
    assert resumed["progress"]["global_step"] == 9 and resumed["arch"]["net"] == "one-tower"
    assert not torch.equal(resumed["model"]["conv1.weight"], payload["model"]["conv1.weight"])


@pytest.mark.slow
def test_an_ablation_stopped_while_a_run_trains_leaves_nothing_running(tiny_data, tmp_path):
    """SIGTERM, as a scheduler sends it, while a variant trains: the run (a child process with
    ranks of its own) is stopped as Ctrl-C stops it, not left to train on its own. Started as
    a shell script's background job is, with SIGINT ignored (which its child inherits)."""
    log = open(tmp_path / "log", "w+")
    command = [sys.executable, "-m", "benchmarks.ablations", "--data", str(tiny_data), *TINY_BUDGET, "--epochs", "3",
               "--layout", "towers", "--variants", "full", "--runs", str(tmp_path / "runs"), "--out",
               str(tmp_path / "report")]
    ablation = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    session = lambda word="": [pid for pid in live_processes(session=ablation.pid) if word in cmdline(pid)]
    # once the program's rank server and its two ranks run
    assert terminate_when_ready(ablation, lambda: len(session("forkserver")) >= 3, log.name) == 130
    text = Path(log.name).read_text()
    assert "interrupted: the full run was stopped: " in text and "Traceback" not in text, text[-3000:]
    variant_log = next((tmp_path / "runs").glob("full*.stderr")).read_text()
    assert "interrupted: every rank stopped" in variant_log, variant_log[-3000:]
    deadline = time.monotonic() + 20
    while session() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session(), [cmdline(pid) for pid in session()]


def test_the_recipe_of_a_run_saved_before_an_option_existed_is_told_with_its_default(tmp_path):
    """A config.json of a run saved before an option existed: --reuse takes it (it ran as the
    default does), and the report's line of its recipe says that default, not a KeyError."""
    saved = json.loads(json.dumps(dataclasses.asdict(parse_config([]))))
    default = saved.pop("warmup_steps")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert f"{default} warm-up steps" in ablations._recipe(tmp_path)
