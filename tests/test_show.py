"""python -m launch.show: the colour measure, the pictures it writes from a run folder
crafted here (a reference's checkpoint, hand-written metrics, summary and config), the
nearest neighbours of Figure 4, and its errors as a user meets them."""

import argparse
import contextlib
import copy
import dataclasses
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import cli, show
from launch.cli import pyplot
from launch.checkpoint import checkpoint_payload, save_checkpoint
from launch.data import eval_views, open_data
from launch.meter import Metrics, RunFolderGone, check_run_folder, summary_steps, writing_in_run_folder
from towers import AlexNet, Architecture

from conftest import ROOT, RUN_TIMEOUT_S, reference_from_seed, skip_without_namespaces, terminate_when_ready

KERNEL_SHAPE = (3, 11, 11)


def grey_kernels(count: int, seed: int = 0) -> torch.Tensor:
    """Kernels with R = G = B at every pixel."""
    return torch.randn(count, 1, 11, 11, generator=torch.Generator().manual_seed(seed)).expand(count, *KERNEL_SHAPE)


def chroma_kernels(count: int, seed: int = 1) -> torch.Tensor:
    """Kernels with R + G + B = 0 at every pixel."""
    w = torch.randn(count, *KERNEL_SHAPE, generator=torch.Generator().manual_seed(seed))
    return w - w.mean(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def reference():
    return reference_from_seed(10, 0, init="scaled")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_data):
    return open_data(tiny_data)


def write_run(folder: Path, state: dict = None, *, bundle=None, data=None, layout: str = "towers",
              metrics: list = (), summary: dict = None) -> Path:
    """A run folder as launch.two_gpu leaves it: config.json, and what is given of
    checkpoint.pt (a reference-layout state_dict; the one-tower net's for that layout),
    metrics.jsonl and summary.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"data": None if data is None else str(data), "batch_size": 4,
                                                    "layout": layout, "fc8_placement": "tower0"}))
    if state is not None:
        architecture = Architecture(net="one-tower" if layout == "one-tower" else "two-tower")
        save_checkpoint(folder / "checkpoint.pt", checkpoint_payload(
            state, num_classes=len(bundle.classes), architecture=architecture, classes=list(bundle.classes),
            data_mean=bundle.stats.mean))
    if metrics:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def train_record(step: int, loss: float, epoch: int = 1) -> dict:
    return {"event": "train", "epoch": epoch, "step": step, "loss": loss, "top1": 0.5, "lr": 0.01}


def eval_record(epoch: int, step: int, top1_error: float) -> dict:
    return {"event": "eval", "epoch": epoch, "step": step, "top1_error": top1_error, "top5_error": top1_error / 2,
            "next_lr": 0.01}


METRICS = [train_record(2, 2.3), train_record(4, 2.2), eval_record(1, 4, 0.8), train_record(6, 2.0, epoch=2),
           train_record(8, 1.9, epoch=2), eval_record(2, 8, 0.7)]
# What each tower sent per step at batch 4 with FC8 on tower 0 (as summary.json holds it).
EXCHANGES = {"conv3_input/backward": [346112.0, 346112.0], "conv3_input/forward": [346112.0, 346112.0],
             "fc6_input/backward": [73728.0, 73728.0], "fc6_input/forward": [73728.0, 73728.0],
             "fc7_input/backward": [32768.0, 32768.0], "fc7_input/forward": [32768.0, 32768.0],
             "fc8_input/backward": [32768.0, 0.0], "fc8_input/forward": [0.0, 32768.0],
             "logits/forward": [160.0, 0.0]}
SUMMARY = {"steps": 8, "centre": {"top1_error": 0.7, "top5_error": 0.35}, "fc8_placement": "tower0",
           "exchanges_per_step": EXCHANGES}


def run_show(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.show", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def check_png(path: Path) -> tuple:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every pixel: a truncated file fails here
        width, height = image.size
    assert 500 <= width <= 3000 and 250 <= height <= 3000, (path, image.size)
    return width, height


# --------------------------------------------------------------------------- the colour measure

def test_colour_share_is_0_for_grey_1_for_pure_colour_and_the_colour_energy_share_between():
    assert torch.allclose(show.colour_share(grey_kernels(8)), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(show.colour_share(chroma_kernels(8)), torch.ones(8, dtype=torch.float64), atol=1e-12)
    # A grey offset is not part of the pattern, and a constant kernel has no pattern at all.
    assert torch.allclose(show.colour_share(chroma_kernels(8) + 5.0), torch.ones(8, dtype=torch.float64), atol=1e-12)
    assert show.colour_share(torch.full((1, *KERNEL_SHAPE), 3.0)).item() == 0.0
    # Grey (overall mean removed) and pure colour are orthogonal: the share is the colour part's energy share.
    grey = grey_kernels(4, seed=2) - grey_kernels(4, seed=2).mean(dim=(1, 2, 3), keepdim=True)
    colour = chroma_kernels(4, seed=3) * torch.tensor([0.1, 0.5, 1.0, 3.0]).view(4, 1, 1, 1)
    expected = colour.pow(2).sum(dim=(1, 2, 3)) / (grey.pow(2).sum(dim=(1, 2, 3)) + colour.pow(2).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(show.colour_share(grey + colour), expected.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("init", ["paper", "scaled"])
def test_a_freshly_initialised_net_gives_about_two_thirds_for_both_towers(init):
    weight = reference_from_seed(10, 3, init=init).conv1.weight
    shares = [show.colour_share(kernels) for kernels in show.tower_kernels(weight)]
    assert [len(s) for s in shares] == [48, 48]
    # Each kernel's share is Beta(121, 60.5)-distributed about 242/362 (std 0.035), so a mean of 48 lies
    # within 0.015 of it with overwhelming probability.
    for values in shares:
        assert abs(values.mean().item() - 242 / 362) < 0.02 and 0.5 < values.min() and values.max() < 0.85


def _grey_tower_0_coloured_tower_1(tmp_path, monkeypatch) -> tuple:
    """A run whose conv1 kernels are grey on tower 0 and pure colour on tower 1, and the list its
    pictures are drawn into (not saved)."""
    drawn = []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    monkeypatch.setattr(show, "conv1_groups", lambda payload: [("tower 0", grey_kernels(48)),
                                                              ("tower 1", chroma_kernels(48))])
    run = show.RunFolder(write_run(tmp_path / "run"))
    monkeypatch.setattr(run, "checkpoint", lambda: {})
    return run, drawn


def test_each_tower_s_colour_dots_lie_beside_its_own_label(tmp_path, monkeypatch):
    """Tower 0 grey (shares 0), tower 1 coloured (shares 1): each row's dots at the height of the
    tick that names it, tower 0 on top as in the kernels picture."""
    run, drawn = _grey_tower_0_coloured_tower_1(tmp_path, monkeypatch)
    show.draw_colour(run, tmp_path)
    ax = drawn[0].axes[0]
    ticks = {label.get_text().split("\n")[0]: y for y, label in zip(ax.get_yticks(), ax.get_yticklabels())}
    assert ticks == {"tower 0": 1, "tower 1": 0}
    rows = {dots.get_label().removesuffix(": one dot per kernel"): dots.get_offsets() for dots in ax.collections}
    for name, y in ticks.items():  # the jitter: within 0.18 of the row
        assert np.allclose(rows[name][:, 0], float(name[-1])) and abs(rows[name][:, 1] - y).max() < 0.2, name


def test_tower_rows_come_from_the_right_halves(reference, tiny_bundle, tmp_path, caplog):
    state = dict(reference.state_dict())
    state["conv1.weight"] = torch.cat([grey_kernels(48), chroma_kernels(48)])  # tower 0 grey, tower 1 coloured
    shares = [show.colour_share(k) for k in show.tower_kernels(state["conv1.weight"])]
    assert shares[0].max() < 1e-12 and shares[1].min() > 1 - 1e-12
    grids = [show.kernel_grid(k) for k in show.tower_kernels(state["conv1.weight"])]
    assert np.ptp(grids[0], axis=2).max() == 0 and np.ptp(grids[1], axis=2).max() > 0.5  # grey: R = G = B

    run = write_run(tmp_path / "run", state, bundle=tiny_bundle)
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "kernels,colour"]) == 0
    assert "tower 0: mean 0.000, median 0.000" in caplog.text and "tower 1: mean 1.000, median 1.000" in caplog.text
    with Image.open(run / "show" / "kernels.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    half = pixels.shape[0] // 2  # tower 0's block lies in the upper half, tower 1's in the lower
    assert (saturation[:half] > 40).sum() == 0 and (saturation[half:] > 40).sum() > 50_000


@pytest.mark.slow
def test_the_one_tower_net_is_drawn_as_one_group_of_kernels(reference, tiny_bundle, tmp_path, caplog, capsys):
    """Section 3.2's one-GPU net has no towers: its 48 kernels are one group, and nothing crosses."""
    state = reference_from_seed(10, 0, architecture=Architecture(net="one-tower")).state_dict()
    run = write_run(tmp_path / "run", state, bundle=tiny_bundle, layout="one-tower", summary=SUMMARY)
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "kernels,colour,traffic"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(run / "show" / f"{name}.png") for name in ("kernels", "colour")]
    assert "conv1 colour share, one-tower net: mean" in caplog.text and "(48 kernels)" in caplog.text
    assert "tower 1" not in caplog.text
    assert "skipped traffic: a --layout one-tower run has no towers" in caplog.text
    width, height = check_png(run / "show" / "kernels.png")
    two = write_run(tmp_path / "two", reference.state_dict(), bundle=tiny_bundle)
    assert show.main([str(two), "--only", "kernels"]) == 0
    assert check_png(two / "show" / "kernels.png")[1] > height  # a block of 48 kernels per tower, not one


# --------------------------------------------------------------------------- metrics.jsonl

def test_curves_keep_the_last_record_of_each_step_after_resumes(tmp_path, caplog):
    records = [train_record(10, 2.3), train_record(20, 2.2), train_record(30, 2.1), eval_record(1, 30, 0.9),
               train_record(40, 2.0, 2), train_record(50, 1.9, 2),
               # resumed from the end of epoch 1 (step 30): steps 40 and 50 again, then further
               train_record(40, 1.5, 2), train_record(50, 1.4, 2), train_record(60, 1.3, 2), eval_record(2, 60, 0.6),
               # resumed from a checkpoint at step 20: the epoch-1 evaluation at step 30 is redone
               train_record(30, 2.05), eval_record(1, 30, 0.85), train_record(40, 1.45, 2)]
    path = tmp_path / "metrics.jsonl"
    # Lines that are not the program's records are left out: JSON that is no object, a train record without
    # its step or its loss, an evaluation without its error, and the last line of a run that is writing it.
    odd = ('null\n[1, 2]\n{"event": "train", "loss": 2.0}\n{"event": "train", "step": 5, "top1": 0.5, "lr": 0.01}\n'
           '{"event": "eval", "step": 5, "top1_error": "high", "top5_error": 0.5}\n')
    path.write_text(odd + "".join(json.dumps(r) + "\n" for r in records) + '{"event": "train", "st')
    with caplog.at_level(logging.WARNING, logger="launch.show"):
        metrics = show.read_metrics(path)
    assert [(r["step"], r["loss"]) for r in metrics.train] == [(10, 2.3), (20, 2.2), (30, 2.05), (40, 1.45)]
    assert [(r["epoch"], r["top1_error"]) for r in metrics.evals] == [(1, 0.85)]
    # said, not silent: one record out of place (an edit, two runs' files joined) drops what follows it
    again = "follows records of that step or later and starts the history again there"
    assert f"{path}: a record of step 40 {again} (2 training record(s) dropped); a record of step 30 {again} (4 " \
           f"training record(s) dropped): the records after each such step were left out" in caplog.text, caplog.text
    # A step written twice (two copies of a run's file joined): its later record alone is drawn.
    twice = records[:4] + [train_record(30, 2.0), eval_record(1, 30, 0.8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in twice))
    metrics = show.read_metrics(path)
    assert [(r["step"], r["loss"]) for r in metrics.train] == [(10, 2.3), (20, 2.2), (30, 2.0)]
    assert [(r["step"], r["top1_error"]) for r in metrics.evals] == [(30, 0.8)]

    path.write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    metrics = show.read_metrics(path)
    assert [(r["step"], r["loss"]) for r in metrics.train] == [(10, 2.3), (20, 2.2), (30, 2.1), (40, 1.5), (50, 1.4),
                                                               (60, 1.3)]
    assert [(r["epoch"], r["top1_error"]) for r in metrics.evals] == [(1, 0.9), (2, 0.6)]


def test_a_run_of_one_step_line_has_each_of_its_curves_drawn(tmp_path, monkeypatch):
    """A line through one point draws nothing: the training top-1 error of a run stopped at its
    first step line was missing from the picture, its legend drawn all the same."""
    drawn = []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    run = show._open_run(str(write_run(tmp_path / "short", metrics=[train_record(4, 2.2)])))
    show.draw_curves(run, tmp_path)
    lines = [line for ax in drawn[0].axes for line in ax.get_lines() if list(line.get_xdata()) == [4]]
    assert len(lines) == 3 and all(line.get_marker() not in (None, "None", "") for line in lines), \
        [(line.get_label(), line.get_marker()) for line in lines]


def test_the_curves_plot_the_training_error_and_each_validation_error_as_percent(tmp_path, monkeypatch):
    """The training line is the error (1 - top-1 of the recent steps), not the accuracy; the
    validation lines are the top-1 and top-5 errors each."""
    drawn = []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    records = [dict(train_record(4, 2.2), top1=0.8), dict(eval_record(1, 4, 0.6), top5_error=0.25)]
    show.draw_curves(show._open_run(str(write_run(tmp_path / "run", metrics=records))), tmp_path)
    lines = {line.get_label(): list(line.get_ydata()) for ax in drawn[0].axes for line in ax.get_lines()}
    assert lines["training top-1 (recent steps; dropout and augmentation on)"] == pytest.approx([20.0])
    assert lines["validation top-1 (centre patch, end of each epoch)"] == pytest.approx([60.0])
    assert lines["validation top-5"] == pytest.approx([25.0])


def test_the_run_s_last_evaluation_is_drawn_where_no_epoch_s_evaluation_is_at_its_step(tmp_path):
    run = show._open_run(str(write_run(tmp_path / "run", summary={**SUMMARY, "steps": 10})))
    assert show._final_evaluation(run, [eval_record(1, 4, 0.8)], 10)["step"] == 10  # --max-steps 10, in epoch 2
    assert show._final_evaluation(run, [eval_record(1, 4, 0.8), eval_record(2, 10, 0.7)], 10) is None  # drawn


def test_the_nearest_rows_are_as_many_as_the_pool_holds_nearest_first():
    """A --neighbour-pool (or a training set) below the picture's six neighbours: all of it."""
    pool = torch.tensor([[3.0], [0.0], [1.0]])
    distances, indices = show.nearest(torch.tensor([[0.0], [2.9]]), pool, show.NEIGHBOURS)
    assert indices.tolist() == [[1, 2, 0], [0, 2, 1]]
    assert torch.allclose(distances, torch.tensor([[0.0, 1.0, 3.0], [0.1, 1.9, 2.9]], dtype=torch.float64))


def test_a_resume_from_an_earlier_step_drops_the_later_evaluations_and_the_last_of_one_step_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [train_record(10, 2.3), train_record(20, 2.2), eval_record(1, 20, 0.8), train_record(30, 2.1),
               eval_record(2, 30, 0.7), train_record(20, 2.25)]  # resumed from step 10's checkpoint
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = show.read_metrics(path)
    assert [r["step"] for r in metrics.train] == [10, 20] and metrics.evals == []
    again = [train_record(10, 2.3), eval_record(1, 10, 0.9), eval_record(1, 10, 0.8)]  # an evaluation taken twice
    path.write_text("".join(json.dumps(r) + "\n" for r in again))
    assert [(r["step"], r["top1_error"]) for r in show.read_metrics(path).evals] == [(10, 0.8)]


def test_the_most_images_the_neighbours_picture_draws_are_allowed_and_the_kernels_are_numbered_from_the_first():
    show.ShowOptions(images=show.MAX_IMAGES).validate()
    with pytest.raises(ValueError, match=f"--images must be at most {show.MAX_IMAGES} "):
        show.ShowOptions(images=show.MAX_IMAGES + 1).validate()
    assert show._group_label("tower 0", 0, torch.zeros(48)).startswith("tower 0 (kernels 0-47): ")
    assert show._group_label("tower 1", 48, torch.zeros(48)).startswith("tower 1 (kernels 48-95): ")


def test_a_step_that_is_not_a_whole_number_is_left_out_and_three_resumes_are_named_alone(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [train_record(10, 2.3), {**train_record(20, 2.2), "step": 20.5}]  # edited by hand
    for step in (10, 20, 30):  # three resumes, each from the step before it
        records += [train_record(step + 10, 2.1), train_record(step, 2.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.WARNING, logger="launch.show"):
        metrics = show.read_metrics(path)
    assert [r["step"] for r in metrics.train] == [10, 20, 30]
    assert f"{path}: left out 1 unreadable line(s)" in caplog.messages
    assert sum("starts the history again there" in m for m in caplog.messages) == 1
    assert "more such" not in caplog.text  # the three named, none left unsaid
    path.write_text("".join(json.dumps(r) + "\n" for r in records + [train_record(50, 2.1), train_record(40, 2.0)]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="launch.show"):
        show.read_metrics(path)  # a fourth: three named, and the fourth counted
    assert caplog.messages[-1].count("starts the history again there") == 3
    assert caplog.messages[-1].endswith("; and 1 more such: the records after each such step were left out")


def test_a_gpu_asked_for_where_none_is_visible_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^--device cuda: no GPU is visible here; use --device cpu or auto$"):
        show.ShowOptions(device="cuda").validate()
    show.ShowOptions(device="cpu").validate()


def test_the_summary_of_an_earlier_start_is_not_said_to_be_where_the_run_stopped(tmp_path):
    """A run stopped by --max-steps 4 (its summary.json evaluated at step 4), resumed and stopped
    at step 8: the evaluation of step 4 is that start's end, not where the run stopped."""
    records = [train_record(2, 2.3), train_record(4, 2.2)]
    summary = {**SUMMARY, "steps": 4}
    run = show._open_run(str(write_run(tmp_path / "ended", metrics=records, summary=summary)))
    assert show._final_evaluation(run, [], 4)["where"] == "where the run stopped"
    run = show._open_run(str(write_run(tmp_path / "resumed", metrics=records + [train_record(8, 2.0)],
                                       summary=summary)))
    assert show._final_evaluation(run, [], 8) == {"step": 4, "top1_error": 0.7, "top5_error": 0.35,
                                                  "where": "where an earlier start of the run ended"}
    assert show.main([str(run.path), "--only", "curves"]) == 0


def test_a_run_folder_whose_name_is_not_utf8_is_drawn_with_the_name_escaped(tmp_path, capsysbinary):
    """A folder name (or class name) that is not UTF-8 reaches Python as surrogates, which
    matplotlib refuses: the pictures show those bytes as escapes; the paths printed are the
    names' own bytes."""
    run = write_run(tmp_path / os.fsdecode(b"run-\xff"), metrics=[train_record(10, 2.3), train_record(20, 2.2)])
    assert show.main([str(run), "--only", "curves"]) == 0
    assert capsysbinary.readouterr().out == os.fsencode(run / "show" / "curves.png") + b"\n"
    check_png(run / "show" / "curves.png")
    assert show.shown(os.fsdecode(b"run-\xff")) == "run-\\xff" and show.shown("café") == "café"
    # a newline in the name: quoted as the shell reads it back, one path a line all the same
    run = write_run(tmp_path / "odd\nname", metrics=[train_record(10, 2.3), train_record(20, 2.2)])
    assert show.main([str(run), "--only", "curves"]) == 0
    assert capsysbinary.readouterr().out == f"$'{tmp_path}/odd\\nname/show/curves.png'\n".encode()
    check_png(run / "show" / "curves.png")


def test_damaged_lines_and_evaluations_without_their_epoch_are_left_out_of_the_curves(tmp_path, caplog):
    """A line that is not UTF-8 (a damaged disk, a foreign writer), an evaluation without its
    epoch, numbers beyond a float's range and a loss of true (hand-edited) are left out; the
    curves are drawn from the other records."""
    lines = [json.dumps(r).encode() + b"\n" for r in METRICS]
    epochless = {k: v for k, v in eval_record(2, 6, 0.75).items() if k != "epoch"}
    beyond_a_float = [{**METRICS[0], "loss": 10 ** 400}, {**METRICS[0], "step": 10 ** 400},  # hand edits
                      {**METRICS[0], "loss": True}]  # JSON's true, which Python counts as 1
    lines[3:3] = [b"\xff\xfe\n", json.dumps(epochless).encode() + b"\n", *(json.dumps(r).encode() + b"\n"
                                                                          for r in beyond_a_float)]
    run = write_run(tmp_path / "run", summary=SUMMARY)
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    metrics = show.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in metrics.train] == [2, 4, 6, 8]
    assert [(r["epoch"], r["step"]) for r in metrics.evals] == [(1, 4), (2, 8)]
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "curves"]) == 0
    assert f"{run / 'metrics.jsonl'}: left out 5 unreadable line(s)" in caplog.messages
    check_png(run / "show" / "curves.png")


def test_a_resumed_run_drops_the_records_it_redoes(tmp_path):
    """launch.meter.Metrics.resume_at, as a run resumed from its checkpoint at step 30 calls it:
    the records of later steps go (a summary's, of the step it ended at: of a run that went on
    past the checkpoint resumed, and summary.json with it), as do the line a kill cut short and
    a damaged one (not UTF-8); the others stay as they were."""
    path = tmp_path / "metrics.jsonl"
    kept = [train_record(10, 2.3), train_record(20, 2.2), train_record(30, 2.1), eval_record(1, 30, 0.9),
            {"event": "summary", "steps": 30, "centre": {}}, {"event": "summary", "centre": {}}]
    later = [train_record(40, 2.0, 2), eval_record(2, 40, 0.8), {"event": "summary", "steps": 40, "centre": {}}]
    lines = [json.dumps(r) + "\n" for r in [*kept, *later]]
    damaged = b"\x00\xff a damaged line\n"
    path.write_bytes(("".join(lines[:7])).encode() + damaged + ("".join(lines[7:]) + '{"event": "train", "st').encode())
    (tmp_path / "summary.json").write_text(json.dumps(later[-1], indent=2))  # the copy of the last record
    Metrics(path).resume_at(30, epoch=2, checkpoint="run/checkpoint.pt")
    assert not (tmp_path / "summary.json").exists()
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written[:-1] == kept and path.read_text().startswith("".join(lines[:6]))
    assert {k: v for k, v in written[-1].items() if k != "time"} == {"event": "resume", "step": 30, "epoch": 2,
                                                                      "checkpoint": "run/checkpoint.pt"}
    Metrics(path).write(**train_record(40, 1.5, 2))
    assert [(r["step"], r["loss"]) for r in show.read_metrics(path).train] == [(10, 2.3), (20, 2.2), (30, 2.1),
                                                                               (40, 1.5)]
    (tmp_path / "summary.json").write_text(json.dumps(kept[4]))  # of the step resumed: kept, as its record
    Metrics(path).resume_at(30, epoch=2, checkpoint="run/checkpoint.pt")
    assert json.loads((tmp_path / "summary.json").read_text()) == kept[4]
    # a folder without metrics yet (a checkpoint resumed in a folder of its own): nothing to drop, the record begins it
    Metrics(tmp_path / "none.jsonl").resume_at(30, checkpoint="/x/step.pt")
    assert [{k: v for k, v in json.loads(line).items() if k != "time"} for line in
            (tmp_path / "none.jsonl").read_text().splitlines()] == [{"event": "resume", "step": 30,
                                                                      "checkpoint": "/x/step.pt"}]


def test_a_resume_leaves_the_records_of_a_run_that_took_its_folder_s_place_as_they_are(tmp_path):
    """The run folder replaced between the run's start and its resume of metrics.jsonl (moved
    away, another run's made there): the resume stops, as a write of a record does, and the
    other run's metrics.jsonl and summary.json stay whole."""
    folder = tmp_path / "run"
    folder.mkdir()
    metrics = Metrics(folder / "metrics.jsonl")
    folder.rename(tmp_path / "moved")
    folder.mkdir()
    others = json.dumps(train_record(90, 1.0)) + "\n"
    (folder / "metrics.jsonl").write_text(others)
    (folder / "summary.json").write_text(json.dumps({"event": "summary", "steps": 90, "centre": {}}))
    with pytest.raises(RunFolderGone):
        metrics.resume_at(30, epoch=2, checkpoint="run/checkpoint.pt")
    assert (folder / "metrics.jsonl").read_text() == others
    assert json.loads((folder / "summary.json").read_text())["steps"] == 90


def test_a_resume_keeps_the_lines_it_cannot_place_and_a_rewrite_cut_short_changes_nothing(tmp_path, monkeypatch):
    """Lines of no step of their own (JSON other than an object, a hand-edited step that is not a
    whole number) are kept as they are, not compared; and a rewrite that fails halfway (a full
    disk) leaves metrics.jsonl as it was, not cut short."""
    path = tmp_path / "metrics.jsonl"
    odd = [[1, 2], "a note", {"event": "train", "step": "forty"}, {"event": "train", "step": 40.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [train_record(30, 2.1), *odd, train_record(40, 2.0)]))
    Metrics(path).resume_at(30)
    assert [json.loads(line) for line in path.read_text().splitlines()][:-1] == [train_record(30, 2.1), *odd]
    before = path.read_bytes()

    def half_written(self, text, *args, **kwargs):
        with open(self, "w") as partial:
            partial.write(text[:len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_written)
    with pytest.raises(OSError, match="No space left on device"):
        Metrics(path).resume_at(10)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_each_record_carries_the_time_it_was_written(tmp_path):
    """metrics.jsonl's records, a resume's too, each begin with the time they were written, in
    seconds since the epoch: what a reader of the file has to tell how long a run took."""
    path = tmp_path / "metrics.jsonl"
    before = time.time()
    Metrics(path).write(**train_record(10, 2.3))
    Metrics(path).resume_at(10, checkpoint="run/checkpoint.pt")
    Metrics(path).write(**train_record(20, 2.2))
    after = time.time()
    for line in path.read_text().splitlines():
        assert next(iter(json.loads(line))) == "time" and before <= json.loads(line)["time"] <= after, line


def test_the_step_a_run_ended_at_is_read_from_its_summary_only_as_written(tmp_path):
    """summary.json's ``steps``, a whole number as the run writes it; anything else (no file, not
    JSON, not an object, a number of another type) is no step, not one compared with a step."""
    assert summary_steps(tmp_path) is None
    for text, steps in (('{"steps": 40}', 40), ("{not json", None), ("[40]", None), ('{"steps": "40"}', None),
                        ('{"steps": 40.0}', None), ('{"steps": true}', None), ('{"centre": {}}', None)):
        (tmp_path / "summary.json").write_text(text)
        assert summary_steps(tmp_path) == steps and type(summary_steps(tmp_path)) is type(steps), text


def test_metrics_without_a_file_write_nothing(tmp_path, monkeypatch):
    """Metrics(None), as the ranks other than rank 0 make it: records and a resume are no-ops."""
    monkeypatch.chdir(tmp_path)
    metrics = Metrics(None)
    metrics.resume_at(30, checkpoint="run/checkpoint.pt")
    metrics.write(**train_record(40, 2.0))
    assert list(tmp_path.iterdir()) == []


def test_the_run_folder_is_checked_before_a_write_and_named_when_it_went_during_one(tmp_path):
    """A run folder is one while it is a folder (a file in its place is not); a write into it that
    finds it gone meanwhile is said as the folder gone, not as a file not found. Metrics may be
    made before its folder is (any folder made there then will do), and hold one descriptor of
    its folder however many times it is made there."""
    folder = tmp_path / "run"
    metrics = Metrics(folder / "metrics.jsonl")  # not made yet
    folder.mkdir()
    check_run_folder(folder)
    metrics.write(**train_record(10, 2.3))
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [10]
    with pytest.raises(RunFolderGone), writing_in_run_folder(folder):
        shutil.rmtree(folder)
        (folder / "metrics.jsonl").write_text("")
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderGone):
        check_run_folder(tmp_path / "file")
    folder.mkdir()
    descriptors = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        Metrics(folder / "metrics.jsonl")
    assert len(os.listdir("/proc/self/fd")) == descriptors + 1


# --------------------------------------------------------------------------- the pictures

@pytest.mark.slow
def test_every_picture_is_written_from_a_run_folder(reference, tiny_data, tiny_bundle, tmp_path, capsys, caplog):
    run = write_run(tmp_path / "run", reference.state_dict(), bundle=tiny_bundle, data=tiny_data, metrics=METRICS,
                    summary=SUMMARY)
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--images", "2", "--neighbour-pool", "10"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(run / "show" / f"{name}.png") for name in show.PICTURES]
    sizes = {Path(p).stem: check_png(Path(p)) for p in printed}
    assert sizes["kernels"][0] > 1000  # 16 kernels of 66 pixels a row
    assert "FC7 features of 2 validation and 10 training images" in caplog.text
    assert not list((run / "show").glob(".*"))  # no temporary files left


@pytest.mark.slow
def test_what_cannot_be_drawn_yet_is_skipped_with_the_reason(tiny_data, tmp_path, capsys, caplog):
    run = write_run(tmp_path / "run", data=tiny_data, metrics=METRICS[:2])  # a run in its first epoch
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(run / "show" / "curves.png")]
    check_png(run / "show" / "curves.png")
    for name in ("kernels", "colour", "neighbours"):
        assert f"skipped {name}: no checkpoint.pt yet" in caplog.text
    assert "skipped traffic: no summary.json" in caplog.text

    single = write_run(tmp_path / "single", data=tiny_data, layout="single", metrics=METRICS, summary=SUMMARY)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(single), "--only", "curves,traffic"]) == 0
    assert "skipped traffic: a --layout single run has no towers" in caplog.text
    # A towers run resumed as --layout single and stopped before it wrote its own summary.json
    resumed = write_run(tmp_path / "resumed", data=tiny_data, layout="single", metrics=METRICS,
                        summary={**SUMMARY, "layout": "towers"})
    assert show.main([str(resumed), "--only", "traffic"]) == 0
    check_png(resumed / "show" / "traffic.png")
    (resumed / "config.json").write_text(json.dumps({"layout": "towers", "batch_size": 4}))  # and one that ended so
    (resumed / "summary.json").write_text(json.dumps({**SUMMARY, "layout": "single"}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(resumed), "--only", "curves,traffic"]) == 0
    assert "skipped traffic: a --layout single run has no towers" in caplog.text

    # A picture drawn before that cannot be drawn now stays, with a note where the run has changed since.
    assert show.main([str(single), "--only", "curves"]) == 0
    traffic = single / "show" / "traffic.png"
    traffic.write_bytes((single / "show" / "curves.png").read_bytes())  # as if drawn before
    os.utime(traffic, (1e9, 1e9))  # in 2001: before the run's files
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(single), "--only", "curves,traffic"]) == 0
    assert ("skipped traffic: a --layout single run has no towers, so nothing crosses between them; the traffic.png "
            "there is older than summary.json: it does not show the run as it is now") in caplog.messages
    os.utime(traffic)  # drawn now: nothing to say
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(single), "--only", "curves,traffic"]) == 0
    assert "traffic.png there is older" not in caplog.text and traffic.exists()


def test_an_evaluation_folder_names_the_run_to_draw(tmp_path, caplog):
    trained = write_run(tmp_path / "trained run", metrics=METRICS)
    for evaluated, how in ((trained, f" (python -m launch.show '{trained}')"),
                           (trained / "checkpoint.pt", f" (python -m launch.show '{trained}')"),
                           (tmp_path / "alone.pt", "")):
        evaluation = tmp_path / "evaluation"
        shutil.rmtree(evaluation, ignore_errors=True)
        evaluation.mkdir()
        (evaluation / "config.json").write_text(json.dumps({"eval_only": str(evaluated), "data": None}))
        caplog.clear()
        assert show.main([str(evaluation)]) == 2
        assert caplog.messages == [f"error: {evaluation} holds an evaluation (--eval-only) of {evaluated}, which has "
                                   f"nothing to draw: draw the run that trained it{how}"]
        assert not (evaluation / "show").exists()


def test_a_picture_is_written_where_another_show_removed_the_folder_it_made(tmp_path):
    """Two shows of one run at once: the first made show/ and, drawing nothing, removes it empty
    as the second, which found it there, is about to write into it."""
    plt = pyplot()
    gone = tmp_path / "show"
    assert show._save(plt.figure(), gone / "curves.png") == gone / "curves.png"
    with Image.open(gone / "curves.png") as image:
        assert image.format == "PNG"


LEFT_OUT = "summary.json: left out its last evaluation: it needs a whole number of steps and a \"centre\""
FOREIGN_SUMMARIES = {  # what a hand-edited summary.json holds, and what show says of it
    "centre not an object": ({"centre": 5}, LEFT_OUT),
    "centre without top-5": ({"centre": {"top1_error": 0.5}}, LEFT_OUT),
    "centre's error not a number": ({"centre": {"top1_error": "x", "top5_error": 0.1}}, LEFT_OUT),
    "steps not a number": ({"steps": "8"}, LEFT_OUT),
    "steps beyond a float": ({"steps": 10 ** 400}, LEFT_OUT),
    "exchanges not per tower": ({"exchanges_per_step": {"conv3_input/forward": [1.0]}},
                                "skipped traffic: summary.json's exchanges_per_step is not as python -m "
                                "launch.two_gpu writes it"),
}


@pytest.mark.parametrize("case", FOREIGN_SUMMARIES)
def test_what_a_hand_edited_summary_lacks_is_left_out_with_a_note(tmp_path, case, capsys, caplog):
    change, note = FOREIGN_SUMMARIES[case]
    run = write_run(tmp_path / "run", metrics=METRICS[:2], summary={**SUMMARY, **change})  # stopped at step 8
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "curves,traffic"]) == 0
    assert note in caplog.text
    assert capsys.readouterr().out.splitlines()[0] == str(run / "show" / "curves.png")
    check_png(run / "show" / "curves.png")


def test_a_count_of_bytes_beyond_2_to_the_64_is_drawn_as_the_float_it_is(tmp_path, capsys):
    """A whole number that numpy would keep as a Python object (and then fail to add to a float)."""
    run = write_run(tmp_path / "run", summary={**SUMMARY, "exchanges_per_step": {**EXCHANGES,
                                                                                "fc6_input/forward": [2 ** 64, 0]}})
    assert show.main([str(run), "--only", "traffic"]) == 0
    assert capsys.readouterr().out == f"{run / 'show' / 'traffic.png'}\n"
    check_png(run / "show" / "traffic.png")


@pytest.mark.parametrize("data, why", [
    (5, "config.json's \"data\" is not a folder name"),
    ("", "config.json's \"data\" is not a folder name"),  # not the current folder
    ("~no-such-user-here/data", "the run's data cannot be used (~no-such-user-here"),  # not the whole show refused
], ids=["number", "empty", "no such user"])
def test_a_hand_edited_data_folder_in_config_json_skips_figure_4(reference, tiny_bundle, tmp_path, caplog, data, why):
    run = write_run(tmp_path / "run", reference.state_dict(), bundle=tiny_bundle)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": data}))
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "colour,neighbours"]) == 0
    assert f"skipped neighbours: {why}" in caplog.text, caplog.text
    check_png(run / "show" / "colour.png")


@pytest.mark.slow
def test_the_checkpoint_is_read_whole_so_that_it_may_be_written_over_while_the_pictures_are_drawn(
        reference, tiny_bundle, tiny_data, tmp_path):
    """Mapped, a checkpoint cut short (a cp of another over it) ended the drawing with SIGBUS.
    A mean image saved in float64 (a hand-made checkpoint; the program saves float32) is drawn
    with too: it stopped Figure 4 with a traceback."""
    run = write_run(tmp_path / "run", None, bundle=tiny_bundle, data=tiny_data)
    save_checkpoint(run / "checkpoint.pt", checkpoint_payload(
        reference.state_dict(), num_classes=len(tiny_bundle.classes), classes=list(tiny_bundle.classes),
        data_mean=tiny_bundle.stats.mean.double()))
    folder = show.RunFolder(run)
    folder.checkpoint()
    assert os.path.realpath(run / "checkpoint.pt") not in Path("/proc/self/maps").read_text()
    (run / "checkpoint.pt").write_bytes(b"")
    options = show.ShowOptions(images=2, neighbour_pool=10)
    (run / "show").mkdir()
    for picture in (show.draw_kernels(folder, run / "show"), show.draw_neighbours(folder, run / "show", options)):
        check_png(picture)


def test_a_second_show_into_the_same_folder_is_refused_while_the_first_draws(tmp_path, caplog):
    """Two shows of two runs into one --out mixed their pictures, most of which do not name their run."""
    run, out = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY), tmp_path / "pictures"
    out.mkdir()
    first, unlockable = cli.lock_folder(out)  # as the show drawing there holds it
    try:
        assert unlockable is None
        assert show.main([str(run), "--only", "curves", "--out", str(out)]) == 2
    finally:
        os.close(first)
    assert caplog.messages[-1] == (f"error: {out} is in use by another program writing there (a launch.show, or a "
                                   f"benchmark): wait for it to end, or give another --out")
    assert list(out.iterdir()) == []
    assert show.main([str(run), "--only", "curves", "--out", str(out)]) == 0  # the first has ended
    assert [p.name for p in out.iterdir()] == ["curves.png"]
    # a picture named twice is refused, as in every comma-separated list of the tools
    with pytest.raises(argparse.ArgumentTypeError, match="^'a,b,a' names a twice: give each once$"):
        cli.comma_list(str, ("a", "b"))("a,b,a")


def test_a_comma_separated_list_takes_spaces_and_a_trailing_comma_but_not_an_empty_list():
    """As a shell user types it: spaces around the items and an empty item (a trailing comma)
    are passed over; a list with no item at all is refused, naming the choices."""
    pictures = cli.comma_list(str, ("a", "b"))
    assert pictures(" a, b,") == ("a", "b") and pictures("b,,a") == ("b", "a")
    with pytest.raises(argparse.ArgumentTypeError, match="^expected a comma-separated list of a, b; got ','$"):
        pictures(",")


@pytest.mark.slow  # a real run's checkpoint, which records its options
def test_a_checkpoint_of_another_net_than_the_folder_s_is_not_drawn_as_its_own(trained_run, tmp_path, caplog):
    """A checkpoint copied from another run's folder: its kernels were drawn and titled as this
    run's net (section 3.2's one-GPU net in a folder of the towers, or the other way)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "layout": "one-tower"}))  # the folder of another net
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "kernels,curves"]) == 0
    assert "skipped kernels: checkpoint.pt is another run's: its net is two-tower, config.json's one-tower; put the " \
           "run's own checkpoint back, or draw the folder it came from" in caplog.text
    assert not (run / "show" / "kernels.png").exists() and (run / "show" / "curves.png").exists()
    # --layout single and --fc8-placement split, which a resume may switch to: the same net, drawn
    (run / "config.json").write_text(json.dumps({**config, "layout": "single", "fc8_placement": "split"}))
    shutil.rmtree(run / "show")
    assert show.main([str(run), "--only", "kernels"]) == 0 and (run / "show" / "kernels.png").exists()


def _main_until_interrupted(args) -> object:
    """show.main's exit code, or what escaped it: a KeyboardInterrupt let through would
    otherwise stop the whole test session as the user's Ctrl-C does."""
    try:
        return show.main(args)
    except KeyboardInterrupt:
        return "KeyboardInterrupt escaped"


def test_ctrl_c_removes_the_part_written_and_the_folders_made(tmp_path, capsys, caplog, monkeypatch):
    """Ctrl-C (SIGTERM is made one) while a picture is written: one line, exit 130; the part
    written goes, the pictures finished before stay, and folders made for --out go if empty."""
    import matplotlib.figure
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    real, started = matplotlib.figure.Figure.savefig, []

    def stopped_at(picture):
        def savefig(fig, path, **kwargs):
            started.append(path)
            if len(started) == picture:
                Path(path).write_bytes(b"\x89PNG\r\n")
                raise KeyboardInterrupt
            return real(fig, path, **kwargs)
        return savefig

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", stopped_at(1))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "made" / "for" / "it"
    assert _main_until_interrupted([str(run), "--only", "curves", "--out", str(out)]) == 130
    assert not (tmp_path / "made").exists() and signal.getsignal(signal.SIGTERM) == before
    assert caplog.messages == ["interrupted: the pictures written so far are kept, each one whole"]

    started.clear()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", stopped_at(2))
    assert _main_until_interrupted([str(run), "--only", "curves,traffic"]) == 130
    assert [p.name for p in (run / "show").iterdir()] == ["curves.png"]
    check_png(run / "show" / "curves.png")
    assert capsys.readouterr().out == ""


def test_a_full_disk_is_one_line_and_leaves_no_partial_picture(tmp_path, capsys, caplog, monkeypatch):
    """The disk fills while the second picture is written: one line naming the folder, exit 2;
    the first picture stays whole, nothing half-written beside it."""
    import matplotlib.figure
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    real, written = matplotlib.figure.Figure.savefig, []

    def full_disk(fig, path, **kwargs):
        if written:  # a part of the file, then the disk is full
            Path(path).write_bytes(b"\x89PNG\r\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(path)
        return real(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "curves,traffic"]) == 2
    assert caplog.messages[-1] == (f"error: cannot write traffic.png in {run / 'show'} (No space left on device): "
                                   f"free space on that disk, or give a folder you can write with --out")
    assert capsys.readouterr().out == ""
    assert [p.name for p in (run / "show").iterdir()] == ["curves.png"]
    check_png(run / "show" / "curves.png")


def _denied(monkeypatch, refused, *methods) -> None:
    """Path's ``methods`` raise PermissionError for each path that ``refused(path)`` is true of, as
    for a file this user may not read, or in another user's folder that this one may list but not
    enter (the suite may run as root, whom the permission bits do not stop)."""
    for method in methods:
        def denied(path, *args, _real=getattr(Path, method), **kwargs):
            if refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return _real(path, *args, **kwargs)
        monkeypatch.setattr(Path, method, denied)


def test_a_run_folder_that_cannot_be_entered_is_one_line(tmp_path, capsys, caplog, monkeypatch):
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    _denied(monkeypatch, lambda path: run in path.parents, "stat", "read_text", "open")
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run)]) == 2
    assert caplog.messages[-1] == (f"error: {run} is not a run folder: config.json cannot be read by this user "
                                   f"(Permission denied): draw as a user who can, or let this one read the run folder "
                                   f"(chmod); give a folder written by python -m launch.two_gpu (--out/--run-name)")
    assert capsys.readouterr().out == "" and sorted(p.name for p in run.iterdir()) == [
        "config.json", "metrics.jsonl", "summary.json"]


def test_an_out_folder_inside_one_that_cannot_be_entered_is_one_line(tmp_path, capsys, caplog, monkeypatch):
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    _denied(monkeypatch, lambda path: blocked in path.parents, "stat", "lstat", "mkdir")
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "curves", "--out", str(blocked / "a" / "b")]) == 2
    assert caplog.messages[-1] == (f"error: cannot write the pictures to {blocked / 'a' / 'b'} (Permission denied): "
                                   f"give a folder you can write with --out")
    assert capsys.readouterr().out == "" and not list(blocked.iterdir())


@pytest.mark.parametrize("name, picture", [("metrics.jsonl", "curves"), ("summary.json", "traffic"),
                                           ("checkpoint.pt", "kernels")])
def test_a_run_s_file_that_is_a_folder_or_cannot_be_read_is_named_as_such_not_as_missing(tmp_path, caplog,
                                                                                         monkeypatch, name, picture):
    """Not "no metrics.jsonl yet", whose fix is to wait; the other pictures are drawn."""
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    (run / name).unlink(missing_ok=True)
    (run / name).mkdir()
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", picture]) == 2
    assert (f"{picture}: its {name} is not a regular file but a pipe, a device, a folder or a socket"
            in caplog.text), caplog.text
    (run / name).rmdir()
    (run / name).write_text("{}")
    caplog.clear()
    _denied(monkeypatch, lambda path: path == run / name, "stat" if name == "checkpoint.pt" else "read_text", "read_bytes")
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", picture]) == 2
    assert (f"{picture}: {name} cannot be read by this user (Permission denied): draw as a user who can, or let "
            f"this one read the run folder (chmod)") in caplog.text, caplog.text


def test_a_checkpoint_that_cannot_be_loaded_is_read_once_for_the_three_pictures_drawn_from_it(tmp_path, caplog,
                                                                                               monkeypatch):
    """Not a 0.5 GB file read again, checked and refused, for each picture."""
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    (run / "checkpoint.pt").write_bytes(b"damaged")
    reads = []
    monkeypatch.setattr(show, "load_checkpoint", lambda *args, **kwargs: reads.append(args) or (_ for _ in ()).throw(
        show.CheckpointError("checkpoint.pt is damaged")))
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "kernels,colour,neighbours,curves"]) == 0
    assert len(reads) == 1
    for name in ("kernels", "colour", "neighbours"):
        assert f"skipped {name}: checkpoint.pt is damaged" in caplog.text, caplog.text


def test_a_folder_in_a_picture_s_place_is_named_with_its_fix(tmp_path, capsys, caplog):
    """Not "free space on that disk": a folder named curves.png is in the way."""
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    (run / "show" / "curves.png").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "curves"]) == 2
    assert caplog.messages[-1] == (f"error: cannot write {run / 'show' / 'curves.png'}: a folder of that name is "
                                   f"there; remove or rename it, or give another folder with --out")
    assert capsys.readouterr().out == "" and [p.name for p in (run / "show").iterdir()] == ["curves.png"]


def test_a_data_folder_that_is_gone_skips_figure_4_and_a_bad_data_option_is_an_error(reference, tiny_bundle,
                                                                                     tmp_path, caplog):
    run = write_run(tmp_path / "run", reference.state_dict(), bundle=tiny_bundle, data=tmp_path / "gone")
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "colour,neighbours"]) == 0
    assert "skipped neighbours: the run's data cannot be used" in caplog.text and "--data DIR" in caplog.text
    assert "built-in" not in caplog.text  # without --data, the run's own data is drawn, not the built-in set
    shutil.rmtree(run / "show")
    assert show.main([str(run), "--data", str(tmp_path / "elsewhere")]) == 2
    assert not (run / "show").exists()  # the error comes before any picture is drawn
    other = tmp_path / "other"  # another class in it: refused without computing (and caching) its statistics
    shutil.copytree(tiny_bundle.root, other, ignore=shutil.ignore_patterns(".alexnet-stats-*"))
    for split in ("train", "val"):
        (other / split / tiny_bundle.classes[0]).rename(other / split / "zzz")
    caplog.clear()
    assert show.main([str(run), "--only", "neighbours", "--data", str(other)]) == 2
    assert "trained on other classes" in caplog.text and "statistics" not in caplog.text, caplog.text
    assert not list(other.glob(".alexnet-stats-*"))


# --------------------------------------------------------------------------- Figure 4

def test_a_validation_image_that_is_also_a_training_image_is_its_own_nearest_neighbour(reference, tiny_data,
                                                                                       tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "train", data / "train")
    for folder in sorted((data / "train").iterdir()):  # val/: a copy of each class's second training image
        (data / "val" / folder.name).mkdir(parents=True)
        second = sorted(folder.iterdir())[1]
        shutil.copy(second, data / "val" / folder.name / f"copy_of_{second.name}")
    bundle = open_data(data)
    found = show.find_neighbours(reference, bundle, bundle.stats.mean, images=10, pool=30, batch_size=8,
                                 device=torch.device("cpu"))
    assert len(found.queries.indices) == 10 and len(found.pool.indices) == 30
    assert found.distances.shape == (10, show.NEIGHBOURS)
    assert (found.distances[:, 1:] >= found.distances[:, :-1]).all()  # nearest first
    for row, query in enumerate(found.queries.indices):
        val_path = bundle.val.samples[query][0]
        nearest_path = bundle.train.samples[found.pool.indices[found.indices[row, 0]]][0]
        assert Path(nearest_path).name == Path(val_path).name.removeprefix("copy_of_")
        # The same pixels through the same net (in batches of other sizes): distance 0 up to
        # float32 rounding, against distances of the order of the features' size to the others.
        assert found.distances[row, 0] <= 1e-4 * found.distances[row, 1]


@pytest.mark.slow
def test_weights_that_ran_away_skip_figure_4_with_the_reason(reference, tiny_bundle, tmp_path, caplog, capsys):
    """FC7 outputs that are not numbers: every distance NaN, drawn as neighbours without a word."""
    state = dict(reference.state_dict(), **{"fc6.weight": reference.fc6.weight.detach() * 3e38})
    run = write_run(tmp_path / "run", state, bundle=tiny_bundle, data=tiny_bundle.root)
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "colour,neighbours", "--images", "2", "--neighbour-pool", "10"]) == 0
    assert "skipped neighbours: FC7's outputs for 12 of the 12 images are not finite numbers (NaN or infinite): " \
           "the checkpoint's weights ran away; draw a run that did not diverge" in caplog.text, caplog.text
    assert not (run / "show" / "neighbours.png").exists() and capsys.readouterr().out.endswith("colour.png\n")
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show.main([str(run), "--only", "neighbours", "--images", "2", "--neighbour-pool", "10"]) == 2


@pytest.mark.slow
def test_small_distances_are_written_to_three_figures(reference, tiny_bundle, tmp_path, monkeypatch):
    """Features of a small scale (tanh, the paper's initialisation): every distance read
    "distance 0.0", which the picture calls a tie, while they differed."""
    with torch.no_grad():
        state = dict(reference.state_dict(), **{"fc7.weight": reference.fc7.weight * 1e-4,
                                                "fc7.bias": reference.fc7.bias * 1e-4})
    run = write_run(tmp_path / "run", state, bundle=tiny_bundle, data=tiny_bundle.root)
    drawn = []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    assert show.main([str(run), "--only", "neighbours", "--images", "2", "--neighbour-pool", "10"]) == 0
    distances = [float(title.split("distance ")[1].split()[0]) for ax in drawn[0].axes
                 if "distance " in (title := ax.get_title())]
    assert distances and 0 < min(distances) < 0.05 and len(set(distances)) > 1, distances


@pytest.mark.slow
def test_figure_4_names_and_colours_each_image_by_its_own_class(reference, tiny_bundle, tmp_path, monkeypatch):
    """A pool of 10 of the 30 training images: each neighbour is named as the training image at
    its row of the pool (not that row of the set), each validation image as itself, and a
    neighbour is green exactly where its class is the validation image's."""
    run = write_run(tmp_path / "run", reference.state_dict(), bundle=tiny_bundle, data=tiny_bundle.root)
    drawn, found = [], []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    searched = show.find_neighbours
    monkeypatch.setattr(show, "find_neighbours", lambda *args, **kwargs: found.append(searched(*args, **kwargs))
                        or found[-1])
    assert show.main([str(run), "--only", "neighbours", "--images", "3", "--neighbour-pool", "10"]) == 0
    (neighbours,), classes, columns = found, tiny_bundle.classes, 1 + show.NEIGHBOURS
    assert neighbours.pool.indices != list(range(10)) and neighbours.queries.indices != [0, 1, 2]  # told apart
    colours = []
    for row, query in enumerate(neighbours.queries.indices):
        cells = drawn[0].axes[row * columns:(row + 1) * columns]
        query_class = tiny_bundle.val.samples[query][1]
        assert cells[0].get_title().split("\n")[:2] == ["validation", classes[query_class]]
        for ax, pool_row in zip(cells[1:], neighbours.indices[row].tolist()):
            label = tiny_bundle.train.samples[neighbours.pool.indices[pool_row]][1]
            assert ax.get_title().split("\n")[0] == classes[label]
            colours.append(ax.title.get_color())
            assert colours[-1] == ("darkgreen" if label == query_class else "firebrick")
    assert set(colours) == {"darkgreen", "firebrick"}  # both kinds drawn: the rule is seen both ways


def test_figure_4_of_other_training_images_than_the_run_s_says_so(reference, tiny_bundle, tmp_path, monkeypatch,
                                                                    caplog):
    """--data with the run's classes but other images: searched, and said to be others, in the
    title and on the terminal (not "training images" of the run, silently)."""
    run = write_run(tmp_path / "run", reference.state_dict(), bundle=tiny_bundle, data=tiny_bundle.root)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    titles = []
    monkeypatch.setattr(show, "_save", lambda fig, path: titles.append(fig._suptitle.get_text()) or path)
    assert "train_digest" not in payload  # a checkpoint written before it held one: nothing known, nothing said
    for digest, said in ((None, False), (tiny_bundle.digests["train"], False), ("0" * 64, True)):
        save_checkpoint(run / "checkpoint.pt", payload if digest is None else {**payload, "train_digest": digest})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="launch.show"):
            assert show.main([str(run), "--only", "neighbours", "--images", "1", "--neighbour-pool", "2"]) == 0
        assert ("not those the run trained on" in titles[-1]) == said, titles[-1]
        assert ("holds other images than the run trained on" in caplog.text) == said, caplog.text


def test_a_kernel_is_drawn_upright_and_scaled_over_its_three_channels_together():
    """Row by row as its weights lie (a kernel bright in its top row is drawn bright on top), in
    one range for R, G and B, so that its hue stays: a kernel twice as strong in red stays red."""
    kernel = torch.zeros(1, *KERNEL_SHAPE)
    kernel[0, :, 0, :] = torch.tensor([2.0, 1.0, 1.0]).view(3, 1)  # its top row, red twice green and blue
    grid = show.kernel_grid(kernel, columns=1, scale=1, gap=0)
    assert grid.shape == (KERNEL_SHAPE[1], KERNEL_SHAPE[2], 3)
    assert grid[0].tolist() == [[1.0, 0.5, 0.5]] * KERNEL_SHAPE[2] and (grid[1:] == 0).all()


def test_kernels_are_laid_out_in_rows_with_white_gaps_and_a_constant_one_is_mid_grey():
    """Three kernels in rows of two, each enlarged twice, a white gap of one pixel between
    them, the rest of the last row white; a kernel of one value has no range to scale to, and
    is drawn mid-grey."""
    kernels = torch.zeros(3, *KERNEL_SHAPE)
    kernels[0, :, 0, 0] = 1.0  # its top-left pixel white, the rest black
    kernels[2] = 7.0  # constant
    grid = show.kernel_grid(kernels, columns=2, scale=2, gap=1)
    size = 2 * KERNEL_SHAPE[1]
    assert grid.shape == (2 * size + 1, 2 * size + 1, 3)
    assert (grid[:2, :2] == 1).all() and (grid[2:size, :size] == 0).all()  # the first kernel
    assert (grid[size] == 1).all() and (grid[:, size] == 1).all()  # the gaps
    assert (grid[size + 1:, :size] == 0.5).all() and (grid[size + 1:, size + 1:] == 1).all()


def test_an_image_that_cannot_be_decoded_is_left_out_of_figure_4(reference, tiny_data, tmp_path):
    """A validation image, and a training image searched, that cannot be decoded: neither shown
    nor searched, and counted among the split's unreadable files; the others are."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bundle = open_data(data)
    for split in (bundle.val, bundle.train):
        Path(split.samples[1][0]).write_bytes(b"not an image")
    found = show.find_neighbours(copy.deepcopy(reference), bundle, bundle.stats.mean, images=10, pool=30,
                                 batch_size=4, device=torch.device("cpu"))
    assert 1 not in found.queries.indices and 1 not in found.pool.indices
    assert len(found.queries.indices) == 9 and len(found.pool.indices) == 29 and found.indices.shape == (9, 6)
    assert [len(split.corrupt) for split in (bundle.val, bundle.train)] == [1, 1]


def test_features_with_one_unit_that_is_not_a_number_skip_figure_4(reference, tiny_bundle):
    """One of FC7's 4096 outputs infinite is enough: its distances are infinite or NaN, and the
    order of the neighbours means nothing."""
    model = copy.deepcopy(reference).eval()
    with torch.no_grad():
        model.fc7.weight[0] = 3e38  # unit 0 overflows for every image; the other 4095 stay finite
    with pytest.raises(show.Skipped, match="FC7's outputs for 12 of the 12 images are not finite numbers"):
        show.find_neighbours(model, tiny_bundle, tiny_bundle.stats.mean, images=2, pool=10, batch_size=8,
                             device=torch.device("cpu"))


def test_images_for_which_a_layer_is_silent_are_marked(reference, tiny_bundle):
    model = copy.deepcopy(reference).eval()
    with torch.no_grad():
        model.conv5.bias[:128] = -1e6  # the first half of conv5 off for every image
        images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 50
        assert show.hidden_outputs(model, images).silent == [None] * 3
        model.conv5.bias[128:] = -1e6  # and now the whole layer
        outputs = show.hidden_outputs(model, images)
    assert outputs.silent == ["conv5"] * 3
    assert torch.equal(outputs.fc7[0], outputs.fc7[1]) and torch.equal(outputs.fc7[0], outputs.fc7[2])
    assert outputs.fc7.min() >= 0  # read after FC7's ReLU
    assert show.describe_silent(outputs.silent + [None]) == "conv5's output is all zero for 3"


def test_a_tanh_net_is_read_after_its_tanh_and_is_never_silent():
    """Section 3.1's tanh variant: FC7's features are its tanh (negative values kept), and
    no layer counts as silent, since a tanh is off nowhere."""
    model = reference_from_seed(10, 0, init="scaled", architecture=Architecture(activation="tanh")).eval()
    features = []
    model.fc7.register_forward_hook(lambda module, inputs, output: features.append(output))
    with torch.no_grad():
        model.conv5.bias[:] = -1e6  # every output of conv5 below zero: silent, were it a ReLU
        images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 50
        outputs = show.hidden_outputs(model, images)
    assert torch.equal(outputs.fc7, torch.tanh(features[0])) and outputs.fc7.min() < 0
    assert outputs.silent == [None] * 3
    assert show.activation_name(model) == "tanh" and show.activation_name(reference_from_seed(10, 0)) == "ReLU"


# --------------------------------------------------------------------------- errors

def test_the_traffic_bars_stack_what_each_tower_sent(tmp_path, monkeypatch):
    """Per exchange and direction, tower 0's bytes at the bottom, tower 1's on top: with FC8 on
    tower 0 the two send different amounts, so a bar drawn from the wrong tower shows."""
    drawn = []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    run = show.RunFolder(write_run(tmp_path / "run", summary=SUMMARY))
    show.draw_traffic(run, tmp_path)
    names = sorted({key.split("/")[0] for key in EXCHANGES})
    bars = {container.get_label(): container.patches for container in drawn[0].axes[0].containers}
    for direction in ("forward", "backward"):
        bottom = [0.0] * len(names)
        for rank in (0, 1):
            sent = [EXCHANGES.get(f"{name}/{direction}", [0.0, 0.0])[rank] / 1e6 for name in names]
            patches = bars[f"{direction}, sent by tower {rank}"]
            assert [p.get_height() for p in patches] == pytest.approx(sent, abs=1e-12), (direction, rank)
            assert [p.get_y() for p in patches] == pytest.approx(bottom, abs=1e-12), (direction, rank)
            bottom = [b + m for b, m in zip(bottom, sent)]
    for rank in (0, 1):  # "left bar forward, right bar (hatched) backward", as the title says
        forward, backward = bars[f"forward, sent by tower {rank}"], bars[f"backward, sent by tower {rank}"]
        assert all(f.get_x() < b.get_x() and not f.get_hatch() and b.get_hatch() for f, b in zip(forward, backward))
    labels = [text.get_text() for text in drawn[0].axes[0].texts]
    assert "0.2 kB" in labels and "0.69" in labels  # the logits' 160 bytes; conv3's input, 2 x 346,112 bytes
    show.pyplot().close(drawn[0])


def test_the_traffic_of_a_run_of_replicas_is_said_to_be_one_replica_s():
    """summary.json's exchanges are replica 0's towers' on its share of the batch."""
    per_step = {"conv3_input/forward": [0.5e6, 0.5e6]}
    one = show.traffic_title(per_step, {"replicas": 1, "fc8_placement": "split"}, {"batch_size": 8})
    assert one.startswith("What the towers send each other per step: 1.0 MB in all\nbatch 8, FC8 placement split;")
    two = show.traffic_title(per_step, {"replicas": 2, "fc8_placement": "split"}, {"batch_size": 8})
    assert two.startswith("What the two towers of one of the 2 replicas send each other (on its 8 / 2 images) per "
                          "step: 1.0 MB in all\nbatch 8,")


def _bad_run_dir(tmp_path, case):
    run = tmp_path / "run"
    if case == "a link that loops":
        run.symlink_to(run)
    elif case == "a file":  # such as the run's checkpoint.pt given for its folder
        run.write_bytes(b"PK")
    elif case != "missing":
        run.mkdir()
    if case == "nothing to draw":
        (run / "config.json").write_text(json.dumps({"data": None, "batch_size": 4, "layout": "towers"}))
    if case == "config.json a pipe":
        os.mkfifo(run / "config.json")  # opened, it would wait for a writer
    if case == "config.json nested too deep":
        (run / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # beyond what the decoder can follow
    if case == "config.json a list":
        (run / "config.json").write_text("[1]")
    return run


BAD_RUN_DIRS = {"missing": "does not exist", "no config.json": "not a run folder", "nothing to draw": "nothing to draw",
                "a link that loops": "cannot be opened (Too many levels of symbolic links): give a run folder",
                "a file": "is a file: give the run folder that holds it (",
                "config.json a pipe": "not a run folder: its config.json is not a regular file but a pipe",
                "config.json nested too deep": "not a run folder: its config.json is unreadable (maximum recursion",
                "config.json a list": "not a run folder: its config.json is not a JSON object; give a folder written"}


@pytest.mark.parametrize("args, words", [
    (["--images", "0"], "--images must be at least 1, got 0"),
    (["--neighbour-pool", "-1"], "--neighbour-pool must be at least 1, got -1"),
    # a row of the picture each: 500 made a PNG of 1225 x 102580 pixels, more than PIL opens by default
    (["--images", "101"], "--images must be at most 100 (a row of the picture each, 205 pixels high; a taller PNG is "
                          "more than image viewers open), got 101: draw fewer"),
    # an unset "$VARIABLE": the current folder, where the pictures were written (or the data read)
    (["--out", ""], "--out is empty: give a value, or leave the option out"),
    (["--data", ""], "--data is empty: give a value, or leave the option out"),
    (["--only", "curves,kernels", "--data", "somewhere"], "--data is the neighbours picture's, which --only leaves "
                                                          "out: add neighbours to --only, or drop --data"),
    # they changed nothing, said nothing
    (["--only", "kernels", "--images", "3"], "--images is the neighbours picture's, which --only leaves out: add "
                                             "neighbours to --only, or drop --images"),
    (["--only", "curves", "--device", "cpu", "--batch-size", "8", "--neighbour-pool", "9"],
     "--neighbour-pool, --batch-size and --device are the neighbours picture's, which --only leaves out: add "
     "neighbours to --only, or drop them")])
def test_bad_options_are_one_line_before_anything_is_read(tmp_path, args, words, caplog, capsys):
    assert show.main([str(tmp_path / "no-such-run"), *args]) == 2 and capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [f"error: {words}"]


def test_an_empty_run_dir_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.chdir(tmp_path)
    assert show.main([""]) == 2 and capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "error: RUN_DIR is empty: give a path (. for the current folder)"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", BAD_RUN_DIRS)
def test_a_bad_run_dir_is_refused_naming_it(tmp_path, case, caplog, capsys):
    """In this process (the program's log goes to caplog); the real process: the test below."""
    run = _bad_run_dir(tmp_path, case)
    assert show.main([str(run)]) == 2 and capsys.readouterr().out == ""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(run) in errors[0], errors
    assert BAD_RUN_DIRS[case] in errors[0]
    assert not (run / "show").exists()  # no empty folder left behind


@pytest.mark.slow  # a real process
def test_a_bad_run_dir_gives_one_line_and_exit_2(tmp_path):
    run = _bad_run_dir(tmp_path, "nothing to draw")
    result = run_show(run)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(run) in lines[0], result.stderr
    assert BAD_RUN_DIRS["nothing to draw"] in lines[0]
    assert not (run / "show").exists()


@pytest.mark.slow  # a real process, in a mount namespace of its own
def test_a_read_only_disk_for_the_pictures_is_named_as_such(tmp_path):
    """Not "Permission denied", which sends the user to the folder's permissions."""
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {read_only} && "
              f"exec {shlex.quote(sys.executable)} -m launch.show {run} --only curves --out {read_only}")
    try:
        result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                                capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except FileNotFoundError:
        pytest.skip("no unshare command: cannot mount a read-only disk without touching the machine's mounts")
    if result.returncode != 0 and "mount" in result.stderr and "error: " not in result.stderr:
        pytest.skip(f"cannot mount a read-only disk here: {result.stderr.strip()[:200]}")
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.splitlines() == [f"error: cannot write the pictures to {read_only} (Read-only file system): "
                                          f"give a folder you can write with --out"]


@pytest.mark.slow  # a real process
def test_matplotlibs_warnings_as_it_starts_are_said_where_it_starts(tmp_path):
    """Held back only to be dropped where it cannot start (below): a cache in a temporary
    folder, rebuilt on every run, is said, with matplotlib's advice."""
    (tmp_path / "a-file").write_text("")  # no folder can be made under it
    program = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
               "from launch.cli import pyplot; pyplot()")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, env=dict(os.environ, MPLCONFIGDIR=str(tmp_path / "a-file" / "mpl")))
    assert result.returncode == 0, result.stderr
    assert "Matplotlib created a temporary cache directory" in result.stderr, result.stderr


@pytest.mark.slow  # a real process, in a mount namespace of its own
def test_no_folder_for_matplotlibs_cache_is_one_line(tmp_path):
    """A read-only container: matplotlib finds no folder to keep its cache in, a temporary one
    either, and raised OSError through the program, a traceback."""
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    read_only = ("mount --rbind /tmp /tmp && mount -o remount,bind,ro /tmp && mount --rbind /var/tmp /var/tmp && "
                 f"mount -o remount,bind,ro /var/tmp && mount -t tmpfs tmpfs {pictures}")
    skip_without_namespaces("--mount", setup=read_only)
    script = (f"{read_only} && cd /tmp && exec env -u TMPDIR -u TEMP -u TMP MPLCONFIGDIR=/tmp/matplotlib "
              f"{shlex.quote(sys.executable)} -m launch.show {run} --only curves --out {pictures}")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Matplotlib requires access to a writable cache "
                                                   "directory") and \
        lines[0].endswith("set the MPLCONFIGDIR environment variable to a writable directory"), result.stderr

# --------------------------------------------------------------------------- the real program

# The program as python -m launch.show runs it, but each picture's writer stops after the first
# bytes of the file and waits for a signal.
STOPS_WHILE_WRITING = """
import runpy, signal
from pathlib import Path
import matplotlib.figure

def savefig(fig, path, **kwargs):
    Path(path).write_bytes(b"\\x89PNG\\r\\n")
    while True:
        signal.pause()

matplotlib.figure.Figure.savefig = savefig
runpy.run_module("launch.show", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # a real process and a real signal
def test_sigterm_while_a_picture_is_written_removes_it_and_the_folder_made(tmp_path):
    """SIGTERM while curves.png is written, into the show/ folder made for it: one line,
    exit 130, as on Ctrl-C; neither the part written nor the folder is left."""
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    log = tmp_path / "show.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", STOPS_WHILE_WRITING, str(run), "--only", "curves"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    code = terminate_when_ready(proc, lambda: any((run / "show").glob(".curves.png.partial-*")), log)
    assert code == 130, log.read_text()[-3000:]
    assert log.read_text().splitlines()[-1] == "interrupted: the pictures written so far are kept, each one whole"
    assert "Traceback" not in log.read_text()
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "summary.json"]


@pytest.mark.slow  # a real process
def test_a_reader_that_goes_away_ends_it_quietly_and_a_full_output_in_one_line(tmp_path):
    """``python -m launch.show RUN | true``: no reader is left when it prints the paths."""
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    reader, writer = os.pipe()
    os.close(reader)  # before the program starts: its print meets a closed pipe
    try:
        result = subprocess.run([sys.executable, "-m", "launch.show", str(run), "--only", "curves"], cwd=ROOT,
                                stdout=writer, stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT_S)
    finally:
        os.close(writer)
    assert result.returncode == 141 and result.stderr == "", result.stderr[-3000:]
    check_png(run / "show" / "curves.png")
    if os.path.exists("/dev/full"):  # an output that cannot take the paths (a full disk): one line, exit 2
        with open("/dev/full", "w") as full:
            result = subprocess.run([sys.executable, "-m", "launch.show", str(run), "--only", "curves"], cwd=ROOT,
                                    stdout=full, stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 2 and result.stderr.splitlines() == [
            "error: cannot write to the standard output (No space left on device): free space on the disk it goes "
            "to, or send it elsewhere"], result.stderr[-3000:]


@pytest.mark.slow
def test_a_real_run_is_drawn(trained_run, tmp_path):
    shutil.copytree(trained_run[0], tmp_path / "run")  # the pictures go into the run folder; the shared one stays as it is
    result = run_show(tmp_path / "run", "--neighbour-pool", "30", "--images", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "run" / "show" / f"{name}.png") for name in show.PICTURES]
    for path in result.stdout.splitlines():
        check_png(Path(path))
    assert "conv1 colour share, tower 0: mean" in result.stderr and "skipped" not in result.stderr


def test_a_median_of_an_even_count_is_halfway_between_the_middle_two():
    """As the colour-share figures report the 48 kernels of a tower (torch.median takes the lower)."""
    assert show.median(torch.tensor([0.0, 1.0, 3.0, 10.0])) == 2.0 and show.median(torch.tensor([1.0, 5.0, 2.0])) == 2.0


# --------------------------------------------------------------------------- what each picture is drawn from

def _filled(architecture: Architecture = Architecture(), classes: int = 10) -> dict:
    """A reference-layout state_dict of ``architecture`` with every weight 0.01 (no draw of weights)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AlexNet(classes, architecture=architecture).state_dict().items()}
    return {k: torch.full(shape, 0.01) for k, shape in shapes.items()}


def test_a_checkpoint_of_the_other_net_than_the_folder_s_is_refused_and_its_own_net_is_read(tiny_bundle, tmp_path):
    """The towers' checkpoint in a one-tower run's folder is another run's; the one-tower run's own
    checkpoint there is read, and its kernels are one group of 48."""
    one_tower = Architecture(net="one-tower")
    folder = write_run(tmp_path / "run", _filled(one_tower, len(tiny_bundle.classes)), bundle=tiny_bundle,
                       layout="one-tower")
    groups = show.conv1_groups(show.RunFolder(folder).checkpoint())
    assert [(name, tuple(kernels.shape)) for name, kernels in groups] == [("one-tower net", (48, *KERNEL_SHAPE))]
    save_checkpoint(folder / "checkpoint.pt", checkpoint_payload(_filled(classes=len(tiny_bundle.classes)),
                                                                 num_classes=len(tiny_bundle.classes)))
    with pytest.raises(show.Skipped, match="^checkpoint.pt is another run's: its net is two-tower, config.json's "
                                           "one-tower; put the run's own checkpoint back"):
        show.RunFolder(folder).checkpoint()


def test_a_summary_that_is_no_object_and_metrics_without_a_training_record_are_each_named(tmp_path, caplog):
    """Nothing to draw: a run stopped before its first step line (an evaluation alone in its
    metrics.jsonl) and a summary.json that is JSON but not an object, each with why."""
    run = write_run(tmp_path / "run", metrics=[eval_record(1, 4, 0.8)])
    (run / "summary.json").write_text("[8]")
    assert show.main([str(run), "--only", "curves,traffic"]) == 2
    assert caplog.messages[-1] == (f"error: nothing to draw in {run} (curves: metrics.jsonl has no training records "
                                   f"yet; traffic: summary.json is not a JSON object: it was not written by python -m "
                                   f"launch.two_gpu)")
    assert not (run / "show").exists()


def test_an_evaluation_s_summary_without_steps_adds_no_point_and_no_note(tmp_path, caplog):
    """An --eval-only summary.json holds a "centre" and no step: it is no evaluation of this run's
    training, and says nothing wrong with the file."""
    run = show.RunFolder(write_run(tmp_path / "run", summary={"centre": {"top1_error": 0.5, "top5_error": 0.25}}))
    with caplog.at_level(logging.INFO, logger="launch.show"):
        assert show._final_evaluation(run, [], 8) is None
    assert caplog.messages == []


def test_the_run_s_last_evaluation_is_drawn_with_its_own_errors_where_its_start_ended(tmp_path, monkeypatch):
    """summary.json of a start stopped at step 4, the run resumed to step 8: top-1 and top-5 each
    drawn at step 4, said to be where an earlier start ended (the last step trained is 8)."""
    drawn = []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    summary = {**SUMMARY, "steps": 4, "centre": {"top1_error": 0.5, "top5_error": 0.25}}
    folder = write_run(tmp_path / "run", metrics=[train_record(2, 2.3), train_record(4, 2.2), train_record(8, 2.0)],
                       summary=summary)
    show.draw_curves(show.RunFolder(folder), tmp_path)
    points = {dots.get_label(): dots.get_offsets().tolist() for ax in drawn[0].axes for dots in ax.collections}
    where = "where an earlier start of the run ended (summary.json)"
    assert points == {f"validation top-1 {where}": [[4, 50]], f"validation top-5 {where}": [[4, 25]]}
    show.pyplot().close(drawn[0])


def test_traffic_follows_the_layout_of_the_start_that_wrote_the_summary(tmp_path, monkeypatch):
    """A --layout single run stopped before its summary.json: no towers, not "wait for the end";
    a towers start's summary.json in a folder resumed as --layout single: its traffic is drawn."""
    drawn = []
    monkeypatch.setattr(show, "_save", lambda fig, path: drawn.append(fig) or path)
    single = show.RunFolder(write_run(tmp_path / "single", layout="single"))
    with pytest.raises(show.Skipped, match="^a --layout single run has no towers, so nothing crosses between them$"):
        show.draw_traffic(single, tmp_path)
    resumed = show.RunFolder(write_run(tmp_path / "resumed", layout="single", summary={**SUMMARY, "layout": "towers"}))
    assert show.draw_traffic(resumed, tmp_path) == tmp_path / "traffic.png" and len(drawn) == 1
    show.pyplot().close(drawn[0])


def test_the_first_silent_layer_is_named_an_output_of_exactly_zero_being_off(reference):
    """conv2 of zero weights and biases: exactly 0 before its ReLU, off. conv3, fed zeros, is off
    too (its biases negative), as may be later ones: the first, conv2, is the one named."""
    model = copy.deepcopy(reference).eval()
    with torch.no_grad():
        model.conv2.weight.zero_()
        model.conv2.bias.zero_()
        model.conv3.bias.fill_(-1.0)
        images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 50
        assert show.hidden_outputs(model, images).silent == ["conv2"] * 3


def test_figure_4_s_features_are_taken_with_the_checkpoint_s_mean_image(reference, tiny_bundle):
    """The mean image the network was trained with (the checkpoint's), not the data's own."""
    model = copy.deepcopy(reference)
    shifted = tiny_bundle.stats.mean + 40.0
    found = show.find_neighbours(model, tiny_bundle, shifted, images=2, pool=2, batch_size=8,
                                 device=torch.device("cpu"))
    inputs = eval_views(found.queries.crops, dataclasses.replace(tiny_bundle.stats, mean=shifted), ten_crop=False)
    torch.testing.assert_close(found.queries.features, show.hidden_outputs(model.eval(), inputs).fc7)


def test_an_out_folder_that_cannot_be_written_is_one_line_and_the_folders_made_for_it_go(tmp_path, caplog, capsys,
                                                                                         monkeypatch):
    """Made, then found not writable (this user's permissions; the suite may run as root)."""
    run, out = write_run(tmp_path / "run", metrics=METRICS), tmp_path / "made" / "for" / "it"
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: Path(path) != out and real(path, mode, **kwargs))
    assert show.main([str(run), "--only", "curves", "--out", str(out)]) == 2
    assert caplog.messages[-1] == (f"error: cannot write the pictures to {out} (Permission denied): give a folder "
                                   f"you can write with --out")
    assert capsys.readouterr().out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_picture_of_an_earlier_show_is_said_to_be_older_than_the_run_s_file_changed_since(tmp_path):
    """curves.png drawn before summary.json was written, and metrics.jsonl gone: older than
    summary.json; drawn after it, nothing to say; no picture there, nothing either."""
    run = show.RunFolder(write_run(tmp_path / "run", summary=SUMMARY))
    (tmp_path / "curves.png").write_bytes(b"")
    os.utime(tmp_path / "curves.png", (1e9, 1e9))  # in 2001
    assert show._stale_note(run, tmp_path, "curves") == ("; the curves.png there is older than summary.json: it does "
                                                         "not show the run as it is now")
    os.utime(tmp_path / "curves.png")
    assert show._stale_note(run, tmp_path, "curves") == "" and show._stale_note(run, tmp_path, "traffic") == ""


def test_an_output_that_cannot_take_the_paths_is_one_line_and_exit_2(tmp_path, caplog, monkeypatch):
    """The pictures are written; only their list is lost (a full disk for the standard output)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    run = write_run(tmp_path / "run", metrics=METRICS)
    full = open("/dev/full", "w")
    try:
        with monkeypatch.context() as patched:
            patched.setattr(sys, "stdout", full)
            assert show.main([str(run), "--only", "curves"]) == 2
    finally:
        with contextlib.suppress(OSError):  # what it could not write is still in its buffer
            full.close()
    assert caplog.messages[-1] == ("error: cannot write to the standard output (No space left on device): free space "
                                   "on the disk it goes to, or send it elsewhere")
    check_png(run / "show" / "curves.png")


def test_the_pictures_folder_is_free_for_another_show_and_no_figure_is_left_open_once_it_ends(tmp_path):
    run = write_run(tmp_path / "run", metrics=METRICS, summary=SUMMARY)
    figures = pyplot().get_fignums()
    assert show.main([str(run), "--only", "curves,traffic"]) == 0
    assert pyplot().get_fignums() == figures
    held, _ = cli.lock_folder(run / "show")  # BlockingIOError while the show's lock is held
    os.close(held)


def test_tower_1_s_kernels_are_numbered_after_tower_0_s(tmp_path, monkeypatch):
    run, drawn = _grey_tower_0_coloured_tower_1(tmp_path, monkeypatch)
    show.draw_kernels(run, tmp_path)
    assert [ax.get_title(loc="left") for ax in drawn[0].axes] == [
        "tower 0 (kernels 0-47): colour share mean 0.00, median 0.00",
        "tower 1 (kernels 48-95): colour share mean 1.00, median 1.00"]
    show.pyplot().close(drawn[0])


def test_the_paths_are_printed_in_the_order_of_the_pictures_not_the_order_drawn(tmp_path, monkeypatch, capsys):
    """The neighbours are drawn first (a --data that cannot be used is refused before anything
    is written), and printed last."""
    run, drawn = write_run(tmp_path / "run", metrics=METRICS), []
    real = show.draw_curves
    monkeypatch.setattr(show, "draw_curves", lambda run, out: drawn.append("curves") or real(run, out))
    monkeypatch.setattr(show, "draw_neighbours", lambda run, out, options: drawn.append("neighbours")
                        or out / "neighbours.png")
    assert show.main([str(run), "--only", "neighbours,curves"]) == 0
    assert drawn == ["neighbours", "curves"]
    assert capsys.readouterr().out.splitlines() == [str(run / "show" / name) for name in ("curves.png",
                                                                                          "neighbours.png")]
