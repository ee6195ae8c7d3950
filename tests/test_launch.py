"""python -m launch.two_gpu as a user runs it: real processes, real files.

Runs are tiny (a generated dataset of 30 training images, batch 4) but go through
everything a long run does: both ranks, the data pipeline on rank 0, checkpoints,
evaluation. Every subprocess has a timeout, so a hang fails instead of blocking.
"""

import dataclasses
import errno
import fcntl
import io
import json
import logging
import math
import os
import pty
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.flops import reference_layers
from benchmarks.traffic import tower_sent_elements
from launch import data as data_module
from launch import cli, train, two_gpu
from launch.checkpoint import (load_checkpoint, load_reference, restore_training_state, save_checkpoint, save_reference,
                              save_training_state)
from launch.mesh import build_mesh
from launch.ranks import MissingRank, RankFailure, run_ranks
from launch.train import IMAGE_SHAPE, InputBytes, Plan, default_workers, evaluate, shared_batches
from launch.config import TrainConfig, given_options, parse_config, resolve
from launch.schedule import Progress
from launch.step import convolution_math, paper_optimizer, train_step
from towers import Tower, build_reference, shard_state_dict

from conftest import NO_DROPOUT, ROOT, RUN_TIMEOUT_S, launch, warned_of_tiff
from conftest import TINY as _TINY

TINY = [*_TINY, "--log-every", "2"]


@pytest.mark.slow  # a run of the program
def test_short_run_writes_its_results_and_eval_only_agrees(trained_run, tiny_data, tmp_path):
    run, result = trained_run  # FC8 split, --epochs 1 --log-every 2, the tiny options
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "train.log"} <= {p.name for p in run.iterdir()}
    log = (run / "train.log").read_text()  # the launcher's last lines too: how the run ended
    assert re.search(r" done: validation top-1 error [0-9.]+%, top-5 error [0-9.]+% \(centre patch, ", log), log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 7]
    assert all(r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["lr"] > 0 for r in train_lines)
    summary = json.loads((run / "summary.json").read_text())
    # each step's own time (the benchmark's program rate): within the epoch's training time
    assert all(0 < r["step_ms"] for r in train_lines) and sum(r["step_ms"] for r in train_lines) < 1000 * summary["train_seconds"]
    assert all(0 < r["input_ms"] < r["step_ms"] for r in train_lines)  # the wait for the batch: part of the step
    assert summary["steps"] == 7 and summary["epochs"] == 1 and summary["centre"]["images"] == 10
    assert summary["workers"] == 0  # --workers 0, as the tiny runs load
    assert summary["ten_patch"]["test"] == "ten-patch"
    # The batch crosses as uint8 crops: a quarter of float32 images (plus the count and the labels).
    assert summary["input_bytes_per_step"] == 8 + 4 * 3 * 224 * 224 + 4 * 8
    # Per exchange and direction, what each tower sent per step: the analytic figures, to the byte.
    analytic = tower_sent_elements(reference_layers(10), "split")
    assert summary["exchanges_per_step"] == {key: [4 * 4 * tower.get(key, 0) for tower in analytic]
                                             for key in set().union(*analytic)}
    assert summary["exchange_bytes_per_step"] == 4 * 4 * sum(analytic[0].values())
    assert "step 7/7" in result.stderr and "ETA" in result.stderr and str(run.resolve()) in result.stderr
    assert "[rank 1]" not in result.stderr  # only rank 0 prints
    payload = load_checkpoint(run)
    assert payload["progress"]["global_step"] == 7 and set(payload["rng"]) == {"rank0", "rank1"}
    # each tower its own dropout masks, as on two GPUs: seeded apart
    assert not torch.equal(payload["rng"]["rank0"]["cpu"], payload["rng"]["rank1"]["cpu"])
    assert payload["data_mean"].shape == (3, 256, 256) and 0 < payload["data_mean"].mean() < 255

    # Evaluated on the same validation images beside other training images (all black, so
    # their mean is 0): the net is still given its inputs minus the mean image it was
    # trained with, the checkpoint's, and scores as it did.
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other, ignore=shutil.ignore_patterns(".alexnet-stats-*"))  # the cache left behind
    for image in (other / "train").rglob("*.jpg"):
        Image.new("RGB", (256, 256)).save(image)
    again = launch("--data", other, "--out", tmp_path, "--run-name", "eval", "--eval-only", run,
                   "--fc8-placement", "tower0", "--workers", "0")
    assert "the mean image subtracted is the one saved in the checkpoint" in again.stderr
    assert not list(other.glob(".alexnet-stats-*"))  # the training set's statistics were not computed
    # The validation set alone (ILSVRC-2012's val/ without its 140 GB train/): the same scores.
    val_only = tmp_path / "ilsvrc-val"
    shutil.copytree(tiny_data / "val", val_only / "val")
    alone = launch("--data", val_only, "--out", tmp_path, "--run-name", "val-only", "--eval-only", run,
                   "--workers", "0")
    assert "(10 classes, 10 validation images; train/ not read: an evaluation does not need it)" in alone.stderr
    assert alone.stderr.split("done: ", 1)[1].splitlines()[0] == again.stderr.split("done: ", 1)[1].splitlines()[0]
    # A checkpoint without its mean image (an earlier version's): the evaluation needs train/ for it.
    older = tmp_path / "older" / "checkpoint.pt"
    save_checkpoint(older, {k: v for k, v in payload.items() if k != "data_mean"})
    config, checkpoint, _ = two_gpu._configure(["--data", str(val_only), "--out", str(tmp_path), "--eval-only",
                                                str(older)])
    with pytest.raises(ValueError, match=f"^{older} holds no mean image of its training set .* give --data a folder "
                                         f"that holds the train/ it was trained on too$"):
        two_gpu.prepare_run(config, checkpoint)
    config, checkpoint, _ = two_gpu._configure(["--data", str(other), "--out", str(tmp_path), "--run-name", "look",
                                                "--eval-only", str(run)])
    _, _, bundle, lock = two_gpu.prepare_run(config, checkpoint)
    lock.close()
    assert torch.equal(bundle.stats.mean, payload["data_mean"]) and bundle.stats.mean.max() > 0
    # Without --data, the data it was trained on (not the built-in set), as --resume does; gone, it is refused.
    config, _, _ = two_gpu._configure(["--out", str(tmp_path), "--eval-only", str(run)])
    assert Path(config.data).resolve() == Path(tiny_data).resolve()
    gone = tmp_path / "gone"
    save_checkpoint(gone / "checkpoint.pt", dict(payload, config=dict(payload["config"], data=str(tmp_path / "nowhere"))))
    with pytest.raises(ValueError, match=f"{gone} was trained on {tmp_path / 'nowhere'}, which is not there now: "
                                         f"give the images to evaluate it on with --data"):
        two_gpu._configure(["--out", str(tmp_path), "--eval-only", str(gone)])
    evaluated = json.loads(again.stderr.split("done: ", 1)[1].splitlines()[0].join(['"', '"']))
    top1 = f"top-1 error {100 * summary['centre']['top1_error']:.2f}%"
    ten = f"ten-patch test: top-1 {100 * summary['ten_patch']['top1_error']:.2f}%"
    assert top1 in evaluated and ten in evaluated  # the checkpoint loads under the other FC8 placement too


@pytest.mark.slow
def test_a_resume_whose_checkpoint_another_run_saves_again_while_it_starts_is_refused(trained_run, tmp_path):
    """The checkpoint is read and checked (--max-steps, --epochs, the data) before the run folder
    is locked: another run of the folder, holding it, may save a later one and end meanwhile.
    The ranks would then resume that one, unchecked: refused, as the start begun over reads it."""
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    options = ["--resume", str(run), "--epochs", "2"]
    config, checkpoint, _ = two_gpu._configure(options)
    two_gpu.prepare_run(config, checkpoint)[3].close()  # the file as read: resumed
    config, checkpoint, _ = two_gpu._configure(options)
    shutil.copy(run / "checkpoint.pt", tmp_path / "saved.pt")  # another run's save: a new file renamed over it
    os.replace(tmp_path / "saved.pt", run / "checkpoint.pt")
    with pytest.raises(ValueError, match=f"^{run} was saved again, by another run of its folder, while this one "
                                         f"started: start this one again to resume from it as it is now$"):
        two_gpu.prepare_run(config, checkpoint)
    config, checkpoint, _ = two_gpu._configure(options)  # begun over: the folder free, the file as it is now
    two_gpu.prepare_run(config, checkpoint)[3].close()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("term", ["xterm-256color", "dumb"])
def test_the_progress_bar_is_drawn_only_where_the_terminal_takes_escape_codes(monkeypatch, term):
    """TERM=dumb (an editor's shell) printed ESC[K as it stands: no bar there. Nor from the ranks
    other than rank 0 (enabled=False); a bar cleared is erased once; one of no steps is empty."""
    from launch.meter import ProgressBar
    monkeypatch.setenv("TERM", term)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    ProgressBar(enabled=False).show(1, 10, "loss 6.907")
    bar = ProgressBar(enabled=True)
    bar.show(1, 10, "loss 6.907")
    bar.clear()
    bar.clear()
    bar.show(0, 0, "none")
    assert sys.stderr.getvalue() == ("" if term == "dumb" else
                                     "\r\033[K[##......................] 1/10 loss 6.907\r\033[K"
                                     "\r\033[K[........................] 0/0 none")


def test_the_terminal_s_width_is_asked_of_the_terminal_as_it_is_now(monkeypatch):
    """The progress bar's width is standard error's terminal's at each draw (a window resized
    since counts), before $COLUMNS, which a shell sets once and does not change on a resize."""
    from launch.meter import terminal_columns
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w")
    try:
        with monkeypatch.context() as patched:
            patched.setenv("COLUMNS", "40")
            patched.setattr(sys, "stderr", terminal)
            for columns in (60, 100):
                fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
                assert terminal_columns() == columns
    finally:
        terminal.close()
        os.close(leader)


def test_the_progress_bar_fits_the_terminal_and_the_lines_logged_meanwhile_replace_it(monkeypatch):
    """A bar wider than the terminal wrapped, and each redraw, on its last row, left a row
    behind; a warning logged while the bar was shown (a skipped image, another rank's) went on
    the bar's line, after it. On a pipe the lines are as logged."""
    from launch.meter import ProgressBar, console_handler
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "40")  # the fake terminal has no descriptor to ask
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar, log = ProgressBar(enabled=True), logging.getLogger("test_progress_bar")
    monkeypatch.setattr(log, "propagate", False)
    monkeypatch.setattr(log, "handlers", [console_handler("[rank 1] %(message)s")])
    bar.show(12, 10, "epoch 1/1 step 12/10 loss 2.3026 top-1 10.0%")  # past its total: the bar full, no more
    log.warning("skipped image a.jpg")
    assert sys.stderr.getvalue() == ("\r\033[K[########################] 12/10 epoch "  # 39 characters
                                     "\r\033[K[rank 1] skipped image a.jpg\n")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(log, "handlers", [console_handler()])
    log.warning("skipped image a.jpg")
    assert sys.stderr.getvalue() == "skipped image a.jpg\n"


@pytest.mark.slow  # a run
@pytest.mark.parametrize("workers", ["0", "1"])  # the images decoded by the rank, or by a worker it spawned
def test_a_librarys_warning_is_a_line_of_the_log_and_in_train_log(tiny_data, tmp_path, workers):
    """PIL's warning about an image it reads came as its own two lines, on a terminal after the
    progress bar, on its line, and was not in train.log."""
    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    for split in ("train", "val"):
        warned_of_tiff(folder / split / "dots" / "odd.tif")
    result = launch("--data", folder, "--out", tmp_path / "runs", "--run-name", "run", "--max-steps", "2",
                    *TINY, "--workers", workers)
    said = re.compile(r"(\[rank \d\] )?warning: .*tag 278 .* \(UserWarning, .+TiffImagePlugin\.py:\d+\)")
    assert any(said.fullmatch(line) for line in result.stderr.splitlines()), result.stderr[-3000:]
    assert "warnings.warn" not in result.stderr and "UserWarning:" not in result.stderr, result.stderr[-3000:]
    if workers == "0":  # a worker's is on the console alone
        logged = (tmp_path / "runs" / "run" / "train.log").read_text().splitlines()
        assert any(said.fullmatch(line.split(" ", 2)[2]) for line in logged), logged  # after the date and time


def test_default_workers_feed_a_gpu_and_leave_the_cpu_to_compute(monkeypatch):
    assert 1 <= train.usable_cores() <= os.cpu_count()
    monkeypatch.setattr(train, "usable_cores", lambda: 16)
    assert default_workers(on_gpu=True, ranks_here=2, loaders_here=1) == 14  # two towers on one GPU
    assert default_workers(on_gpu=True, ranks_here=1, loaders_here=1) == 15  # --layout single
    assert default_workers(on_gpu=True, ranks_here=4, loaders_here=2) == 6  # two replicas of the towers
    assert default_workers(on_gpu=False, ranks_here=2, loaders_here=1) == 4
    monkeypatch.setattr(train, "usable_cores", lambda: 64)
    assert default_workers(on_gpu=True, ranks_here=2, loaders_here=1) == 16
    monkeypatch.setattr(train, "usable_cores", lambda: 2)
    assert default_workers(on_gpu=True, ranks_here=2, loaders_here=1) == 1
    assert default_workers(on_gpu=False, ranks_here=2, loaders_here=1) == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the program's ranks as torchrun starts them
@pytest.mark.parametrize("world_size", [2, 4])
def test_torchrun_environment_is_honoured(tiny_data, tmp_path, world_size):
    """As torchrun starts the program: 2 ranks are the towers, 4 are two replicas of them
    (the second replica's first tower opens the data itself). With the small recipe, whose
    length rank 0 sizes to the data it opens and hands the other ranks. Under a TMPDIR too long
    for multiprocessing's sockets (tests/test_faults.py), which each rank replaces."""
    port = _free_port()
    procs = []
    long = tmp_path / ("t" * 100)
    long.mkdir()
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(long))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.two_gpu", "--data", str(tiny_data), "--out", str(tmp_path), "--run-name",
             "tr", "--max-steps", "2", "--val-limit", "100", "--recipe", "small", *TINY],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=RUN_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * world_size, "".join(err[-2000:] for _, err in outputs)
    for line in ("placement:", "architecture:", "arithmetic:", "done:"):  # told once, by rank 0
        assert line in outputs[0][1] and not any(line in err for _, err in outputs[1:]), line
    for rank, (_, err) in enumerate(outputs):
        assert f"{f'[rank {rank}] ' if rank else ''}warning: the temporary folder {long} is too long" in err, err
    payload = load_checkpoint(tmp_path / "tr")
    assert payload["progress"]["global_step"] == 2 and len(payload["rng"]) == world_size
    # each rank its own dropout masks: the same tower of two replicas too (a replica's draws a copy of another's
    # would drop the same units of the k-th image of each share), after the same two steps of the same draws
    states = [payload["rng"][f"rank{r}"]["cpu"] for r in range(world_size)]
    assert not any(torch.equal(a, b) for i, a in enumerate(states) for b in states[i + 1:])
    assert payload["config"]["epochs"] == 29  # 7 steps of 4 an epoch: 29 epochs make 200 steps
    summary = json.loads((tmp_path / "tr" / "summary.json").read_text())
    assert summary["replicas"] == world_size // 2
    # --val-limit beyond the set: the set, shared among the replicas
    assert (summary["centre"]["images"], summary["centre"]["skipped"]) == (10, 0)


def _checkpoint_worker(rank, data_root, tmp):
    """Two towers train two steps and save; then evaluate in ten-crop and on fixed images.
    Also load a checkpoint written by the single-device reference."""
    mesh = build_mesh(towers=2, timeout_s=60)  # one replica: its tower group is the default group
    group = mesh.tower_group
    torch.manual_seed(rank)
    opened = data_module.open_data(data_root)
    bundle = opened if rank == 0 else None  # only rank 0 reads images; both know the statistics
    plan = Plan([str(i) for i in range(10)], 7, 10, 30, opened.stats)
    tower = Tower(group, 10, dropout=0.5)
    tower.load_state_dict(shard_state_dict(build_reference(10, seed=5, init="caffe").state_dict(), rank))
    optimizer = paper_optimizer(tower.parameters(), lr=0.01)
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(9)) * 60
    labels = torch.arange(4)
    for _ in range(2):
        train_step(tower, optimizer, images, labels)
    save_training_state(Path(tmp) / "towers.pt", tower, optimizer, Progress(global_step=2), TrainConfig(), plan.classes,
                        plan.train_images, mesh)
    tower.eval()
    with torch.no_grad():
        saved_logits = tower(images)
    ten = evaluate(tower, data_module.Loader(bundle) if bundle else None, plan, 4, torch.device("cpu"), mesh, ten_crop=True)
    restore_training_state(Path(tmp) / "reference.pt", tower, optimizer, plan.classes, mesh, with_training=False)
    with torch.no_grad():
        loaded_logits = tower(images)
    return {"saved_logits": saved_logits, "ten": ten, "loaded_logits": loaded_logits, "images": images}


@pytest.mark.slow  # two ranks
def test_checkpoints_move_between_towers_and_reference_and_ten_crop_is_the_average(tiny_data, tmp_path):
    reference = build_reference(10, seed=8, init="caffe")
    save_reference(tmp_path / "reference.pt", reference)
    out = run_ranks(_checkpoint_worker, (str(tiny_data), str(tmp_path)), timeout_s=RUN_TIMEOUT_S)[0]

    # float32, different summation order between the towers and the grouped reference: 1e-5 relative.
    loaded = load_reference(tmp_path / "towers.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(out["images"]), out["saved_logits"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(reference.eval()(out["images"]), out["loaded_logits"], rtol=1e-5, atol=1e-4)

    # The ten-patch test equals the average of ten single-patch evaluations, each run on
    # the single-device model saved by the towers, one view at a time.
    bundle = data_module.open_data(tiny_data)
    probs, labels = [], []
    with torch.no_grad():
        for images, batch_labels in data_module.Loader(bundle).eval(4, ten_crop=True):
            views = data_module.eval_views(images, bundle.stats, ten_crop=True)
            per_view = [F.softmax(loaded(views[:, v]), dim=1) for v in range(10)]
            probs.append(torch.stack(per_view).mean(dim=0))
            labels.append(batch_labels)
    probs, labels = torch.cat(probs), torch.cat(labels)
    top5 = probs.topk(5, dim=1).indices
    assert out["ten"]["images"] == len(labels) == 10
    assert out["ten"]["top1_error"] == pytest.approx(1 - (top5[:, 0] == labels).float().mean().item())
    assert out["ten"]["top5_error"] == pytest.approx(1 - (top5 == labels[:, None]).any(1).float().mean().item())


def _built_tower(rank, config):
    """(this tower's weights as build_model made them, how many nets this rank drew)."""
    draws, draw = [], train.build_reference
    train.build_reference = lambda *args, **kwargs: draws.append(1) or draw(*args, **kwargs)
    model = train.build_model(config, 10, torch.distributed.group.WORLD, torch.device("cpu"))
    return model.state_dict(), len(draws)


@pytest.mark.slow
@pytest.mark.parametrize("fc8_placement", ["tower0", "split"])
def test_each_tower_starts_as_its_half_of_the_reference_drawn_once(fc8_placement):
    """Tower 0 draws the whole net (seconds of a core) and hands tower 1 its half: each tower
    holds exactly its shard of the reference that the seed draws, FC8's halves too where it
    is split, and only tower 0 drew."""
    config = TrainConfig(seed=5, fc8_placement=fc8_placement, dropout=0.0, init="paper")
    towers = run_ranks(_built_tower, (config,))
    assert [draws for _, draws in towers] == [1, 0]
    reference = build_reference(10, seed=5, dropout=0.0).state_dict()
    for rank, (state, _) in enumerate(towers):
        expected = shard_state_dict(reference, rank, fc8_placement)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, expected[name]), (rank, name)


@pytest.mark.slow  # a run of the program
def test_the_single_layout_trains_the_same_function_and_shares_checkpoints(tiny_data, no_dropout_run, tmp_path):
    """--layout single: the reference in one process, through the same program. Without
    dropout and from the same seed it takes the towers' steps (no_dropout_run), loss for loss."""
    single = launch("--data", tiny_data, "--out", tmp_path, "--max-steps", "4", "--val-limit", "6", "--epochs", "1",
                    *NO_DROPOUT, "--run-name", "single", "--layout", "single")
    assert "the whole net on cpu, one process" in single.stderr
    losses = {}
    for name, run in (("single", tmp_path / "single"), ("towers", no_dropout_run)):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = torch.tensor([r["loss"] for r in records if r["event"] == "train"][:4])
    assert len(losses["single"]) == 4
    # float32, the grouped convolutions of the reference against the towers' halves: the
    # parity tests' 1e-5 per forward, grown over four SGD steps; 1e-4 relative.
    torch.testing.assert_close(losses["single"], losses["towers"], rtol=1e-4, atol=0)
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["layout"] == "single" and summary["exchange_bytes_per_step"] == 0
    # The single run's checkpoint evaluates under the towers, with the same result.
    again = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "eval", "--eval-only", tmp_path / "single",
                   "--val-limit", "6", "--no-ten-crop", "--workers", "0")
    assert f"top-1 error {100 * summary['centre']['top1_error']:.2f}%" in again.stderr
    # It resumes as it was saved: one process, its one rank's random state
    assert set(load_checkpoint(tmp_path / "single")["rng"]) == {"rank0"}
    launch("--resume", tmp_path / "single", "--max-steps", "5")
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert (summary["layout"], summary["steps"], summary["steps_this_run"]) == ("single", 5, 1)


@pytest.mark.slow  # a run of the program
def test_bf16_and_compiled_towers_train_and_resume_in_either_arithmetic(tiny_data, tmp_path, monkeypatch):
    """--precision and --compile choose how a run computes, not what it trains: the checkpoint
    holds float32 weights. A resumed run keeps its precision unless its command line gives
    another, and compiles as its command line says. The
    backend here is 'eager' (dynamo's graphs run as they are: inductor would take a minute on
    a 2-core CPU; tests/test_parity.py traces the towers' backward too, with aot_eager, and
    tests/test_gpu.py trains with inductor on the GPU)."""
    run = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "bf16", *TINY, "--max-steps", "3",
                 "--val-limit", "4", "--precision", "bf16", "--compile", "eager", "--checkpoint-every", "3")
    # the stop's checkpoint, saved once, on a --checkpoint-every step too
    saves = [line for line in run.stderr.splitlines() if line.startswith("checkpoint of step ")]
    assert len(saves) == 1 and saves[0].startswith("checkpoint of step 3 saved in "), run.stderr
    assert ("arithmetic: bf16 autocast, float32 weights, torch.compile with eager (a tower's first four blocks "
            "between its exchanges; FC8 eager)") in run.stderr
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["compile"] == "eager" and summary["steps"] == 3
    # compiled: a graph per block at least (evaluation, in eval mode without gradients, makes more), none broken
    assert summary["compiled_graphs"] >= 4 and summary["graph_breaks"] == 0, summary
    assert f"torch.compile (eager) made {summary['compiled_graphs']} graphs on rank 0" in run.stderr
    # every exchange carries bf16, forward and backward: 2 bytes a number, for 4 images (FC8 on tower 0)
    maps, fc, logits = [2 * 4 * 128 * 13 * 13] * 2, [2 * 4 * 128 * 6 * 6] * 2, 2 * 4 * summary["classes"]
    assert summary["exchanges_per_step"] == {
        "conv3_input/forward": maps, "conv3_input/backward": maps, "fc6_input/forward": fc, "fc6_input/backward": fc,
        "fc7_input/forward": [2 * 4 * 2048] * 2, "fc7_input/backward": [2 * 4 * 2048] * 2,
        "fc8_input/forward": [0, 2 * 4 * 2048], "fc8_input/backward": [2 * 4 * 2048, 0],
        "logits/forward": [logits, 0]}, summary["exchanges_per_step"]
    records = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["step_loss"]) for r in records if r["event"] == "train")
    # --log-every 2, and the last step of a run that --max-steps ends within an epoch
    assert [r["step"] for r in records if r["event"] == "train"] == [2, 3]
    assert all(v.dtype == torch.float32 for v in load_checkpoint(tmp_path / "bf16")["model"].values())
    for argv, arithmetic in ((["--precision", "bf16"], ("bf16", None)), ([], ("bf16", None)),
                             (["--precision", "fp32"], ("fp32", None)),
                             (["--compile", "aot_eager"], ("bf16", "aot_eager"))):
        config, _, _ = two_gpu._configure([*map(str, ("--resume", tmp_path / "bf16", "--max-steps", "4")), *argv])
        assert (config.precision, config.compile) == arithmetic, argv
        assert config.lr == 0.001 and config.batch_size == 4  # the recipe stays the run's
    # on GPUs without bfloat16, the arithmetic that an evaluation keeps from the checkpoint is named as such
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 2),
                        ("is_bf16_supported", lambda including_emulation=True: including_emulation),  # emulated
                        ("get_device_name", lambda *args: "GPU-X")):
        monkeypatch.setattr(torch.cuda, name, value)
    for argv, said in (([], f" (the arithmetic {tmp_path / 'bf16'} was trained in)"), (["--precision", "bf16"], "")):
        with pytest.raises(ValueError) as refused:
            two_gpu._configure([*map(str, ("--eval-only", tmp_path / "bf16")), *argv])
        assert str(refused.value) == (f"--precision bf16{said}: GPU-X has no bfloat16 arithmetic of its own (an "
                                      f"emulation, slower than fp32); add --precision fp32")


@pytest.mark.slow  # a run of the program
def test_a_stop_at_an_epochs_end_saves_and_evaluates_once_and_the_training_time_is_the_steps_alone(no_dropout_run):
    """--max-steps at the end of an epoch (7 steps of --epochs 2) ends the run there: one
    checkpoint and one evaluation, not a second of each after an epoch of no steps. The
    summary's training time, hence its images/s, is the sum of the steps' own times, without
    the checkpoints written between them (--checkpoint-every 2)."""
    log = (no_dropout_run / "train.log").read_text()  # each line after its time
    assert re.findall(r" checkpoint of step (\d+) saved in ", log) == ["2", "4", "6", "7"], log
    records = [json.loads(line) for line in (no_dropout_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [7]
    # the rate the epochs after it start from, as the checkpoint has it (not "lr", a step's rate in a step's record)
    assert records[-2]["next_lr"] == load_checkpoint(no_dropout_run)["progress"]["lr"] and "lr" not in records[-2]
    summary = json.loads((no_dropout_run / "summary.json").read_text())
    assert summary["centre"] == {k: v for k, v in records[-2].items() if k in summary["centre"]}  # that evaluation
    assert (summary["epochs"], summary["steps"]) == (1, 7)
    steps_ms = [r["step_ms"] for r in records if r["event"] == "train"]  # --log-every 1
    assert len(steps_ms) == 7 and summary["train_seconds"] == pytest.approx(sum(steps_ms) / 1000, rel=1e-9)
    assert summary["images_per_s"] == pytest.approx(7 * 4 / summary["train_seconds"])


def test_the_arithmetic_is_named_as_the_device_does_it(monkeypatch):
    assert two_gpu.describe_arithmetic(TrainConfig()) == "float32, eager"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    assert two_gpu.describe_arithmetic(TrainConfig(), "cuda") == (
        "float32 (convolutions in TF32, cuDNN's default on a GPU), eager")
    assert two_gpu.describe_arithmetic(TrainConfig(precision="bf16"), "cuda") == "bf16 autocast, float32 weights, eager"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert two_gpu.describe_arithmetic(TrainConfig(), "cuda") == "float32, eager"
    assert convolution_math() == "fp32"  # the benchmark's peak is then fp32's, 7 times below TF32's on an H100
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert convolution_math() == "tf32"


def _delivery_worker(rank, data_root):
    """Batches 1 and 2 of epoch 0 as training receives them: uint8 crops broadcast by rank 0,
    augmented on each rank from the choices each rank draws itself."""
    group = torch.distributed.group.WORLD
    bundle = data_module.open_data(data_root)
    source = data_module.train_batches(bundle, 4, seed=1, epoch=0, start_batch=1) if rank == 0 else None
    counter, batches = InputBytes(), []
    for index, (crops, labels) in enumerate(shared_batches(source, 2, IMAGE_SHAPE, torch.device("cpu"), group, counter)):
        choices = data_module.train_augmentation(seed=1, epoch=0, first=(1 + index) * 4, count=len(labels))
        batches.append((data_module.augment(crops, choices, bundle.stats), labels))
    return batches, counter.per_batch


@pytest.mark.slow  # two ranks
def test_both_ranks_train_on_identical_batches_delivered_in_a_quarter_of_the_bytes(tiny_data):
    ranks = run_ranks(_delivery_worker, (str(tiny_data),), timeout_s=RUN_TIMEOUT_S)
    bundle = data_module.open_data(tiny_data)
    in_one_process = list(data_module.train_batches(bundle, 4, seed=1, epoch=0, start_batch=1))[:2]
    for index, ((mine, labels), (theirs, their_labels)) in enumerate(zip(*(r[0] for r in ranks))):
        assert torch.equal(mine, theirs) and torch.equal(labels, their_labels)  # bit for bit
        choices = data_module.train_augmentation(seed=1, epoch=0, first=(1 + index) * 4, count=4)
        assert torch.equal(mine, data_module.augment(in_one_process[index][0], choices, bundle.stats))
    # per batch of 4: the count, the uint8 crops and the labels; float32 images were 4 x 602,112 bytes
    assert ranks[0][1] == ranks[1][1] == 8 + 4 * 3 * 224 * 224 + 4 * 8


@pytest.mark.slow  # a run of the program
def test_a_milestone_divides_the_rate_of_the_epochs_after_it_from_their_first_step(tiny_data, tmp_path):
    """--schedule fixed --lr-milestones 1: the second epoch trains at a tenth of --lr from its
    first step (the run's 8th, of 7-step epochs), as the first epoch's evaluation says it will;
    a milestone counted against the epoch just ended would leave the second at the full rate."""
    launch("--data", tiny_data, "--out", tmp_path, "--run-name", "run", "--layout", "single", "--epochs", "2",
           "--max-steps", "8", "--schedule", "fixed", "--lr-milestones", "1", "--warmup-steps", "0",
           "--val-limit", "4", *NO_DROPOUT)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["event"] == "train"] == pytest.approx([1e-3] * 7 + [1e-4])
    assert [(r["epoch"], r["next_lr"]) for r in records if r["event"] == "eval"] == [(1, pytest.approx(1e-4))]


def _first_batch_worker(rank):
    """Two replicas of one rank each: whether each takes a step on its first batch, and what
    it found stopped, where a replica's second batch, then its first, cannot be loaded."""
    from launch.train import first_batch
    mesh = build_mesh(1, timeout_s=60)

    def source(lost_at):
        for index in range(3):
            if index == lost_at:
                raise data_module.DataError("no usable image in train/")
            yield torch.zeros((1, 3, 2, 2), dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)
    found = []
    for lost_at in ((1, None), (None, 0)):
        stopped = []
        batches = shared_batches(source(lost_at[rank]), 3, (3, 2, 2), torch.device("cpu"), mesh.tower_group,
                                 stopped=stopped)
        found.append((first_batch(batches, mesh, torch.device("cpu")) is not None, stopped))
    return found


@pytest.mark.slow  # two ranks
def test_a_replica_whose_first_batch_is_lost_stops_every_replica_before_a_step_but_a_lost_second_one_after_it():
    """Rank 0's second batch lost as its first was handed over: the step on the first was not
    taken (its loss then came to nothing, as if the first batch were lost too)."""
    lost = ["no usable image in train/"]
    assert run_ranks(_first_batch_worker, (), timeout_s=RUN_TIMEOUT_S) == [[(True, lost), (False, [])],
                                                                           [(True, []), (False, lost)]]


def _stopping_worker(rank, folder, disk_full):
    """save_before_stopping with a save that takes rank 0 a second (a large checkpoint on a slow
    disk), or fails there (``disk_full``): whether rank 0's file is there when each rank goes on
    to stop, as a run stopped for lost images then raises their error."""
    from launch import train

    def slow_save(*args):  # save_now: collective to the hand-over of the halves, then rank 0 alone writes
        if rank == 0:
            time.sleep(1.0)
            if disk_full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            (Path(folder) / "checkpoint.pt").write_text("saved")
    train.save_now = slow_save
    train.save_before_stopping(None, None, None, None, None, None, None)
    if disk_full:
        raise data_module.DataError("the images are gone")
    return (Path(folder) / "checkpoint.pt").exists()


@pytest.mark.slow  # two ranks
def test_ranks_that_stop_after_a_save_wait_for_rank_0_s_file(tmp_path):
    """A rank that ended first had its launcher end rank 0 in its write (5 s later, or at once
    under torchrun): the checkpoint promised by a stop for lost images was not written. Where
    the write fails, the other ranks still stop on the images' error, which the run reports
    beside the disk's (they waited for rank 0 until its connection closed, and said that)."""
    assert run_ranks(_stopping_worker, (str(tmp_path), False), timeout_s=RUN_TIMEOUT_S) == [True, True]
    with pytest.raises(RankFailure) as stopped:
        run_ranks(_stopping_worker, (str(tmp_path / "full"), True), timeout_s=RUN_TIMEOUT_S)
    assert stopped.value.failures == {0: "OSError: [Errno 28] No space left on device",
                                      1: "launch.images.DataError: the images are gone"}


def test_train_log_takes_a_file_name_that_is_not_utf8(tmp_path, capfd):
    """A warning naming such a file (an unreadable image in a folder of Latin-1 name) is
    written to train.log with its odd bytes escaped, as the console shows them, not dropped
    for a logging error's traceback."""
    import logging
    root = logging.getLogger()
    kept = root.handlers[:], root.level
    try:
        train.setup_logging(0, tmp_path)
        logging.getLogger("launch.data").warning("skipped image %s", os.fsdecode(b"/data/train/caf\xe9/bad.jpg"))
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = kept
    assert (tmp_path / "train.log").read_text().endswith(" skipped image /data/train/caf\\udce9/bad.jpg\n")
    err = capfd.readouterr().err
    assert err.startswith("skipped image /data/train/caf") and "Logging error" not in err, err


def test_the_done_line_gives_the_ten_patch_test_s_own_count_where_it_differs(caplog):
    """A validation image that became unusable between the centre-patch evaluation and the
    ten-patch test: each result says how many images it is of."""
    centre = {"test": "centre patch", "top1_error": 0.5, "top5_error": 0.0, "images": 8, "skipped": 0}
    with caplog.at_level("INFO", logger="launch.two_gpu"):
        two_gpu.report({"centre": centre, "ten_patch": dict(centre, test="ten-patch", images=8)})
        two_gpu.report({"centre": centre, "ten_patch": dict(centre, test="ten-patch", images=7, skipped=1)})
    same, fewer = [m for m in caplog.messages if m.startswith("done: ")]
    assert same.endswith("(centre patch, 8 images); ten-patch test: top-1 50.00%, top-5 0.00%"), same
    assert fewer.endswith("; ten-patch test: top-1 50.00%, top-5 0.00% (7 images, 1 unusable left out)"), fewer


def test_the_last_lines_give_each_score_and_what_this_run_trained(caplog):
    centre = {"test": "centre patch", "top1_error": 0.625, "top5_error": 0.125, "images": 8, "skipped": 0}
    summary = {"centre": centre, "ten_patch": dict(centre, test="ten-patch", top1_error=0.5, top5_error=0.25),
               "train_seconds": 40.4, "steps_this_run": 5, "steps": 12, "images_per_s": 3.96, "wall_seconds": 61.7,
               "run_dir": "runs/a"}
    with caplog.at_level("INFO", logger="launch.two_gpu"):
        two_gpu.report(summary)
        two_gpu.report(dict(summary, steps_this_run=1, steps=1, run_dir=None))
    assert caplog.messages == [
        "done: validation top-1 error 62.50%, top-5 error 12.50% (centre patch, 8 images); ten-patch test: top-1 "
        "50.00%, top-5 25.00%",
        "trained 5 steps, to step 12, in 40 s (4.0 images/s); wall time 62 s; results in runs/a",
        "done: validation top-1 error 62.50%, top-5 error 12.50% (centre patch, 8 images); ten-patch test: top-1 "
        "50.00%, top-5 25.00%",
        "trained 1 step, to step 1, in 40 s (4.0 images/s); wall time 62 s; its run folder is gone"]


def test_a_resumed_run_subtracts_the_mean_image_it_trained_with(tiny_data, tmp_path):
    """Not the mean of what --data holds now (the same set grown, or moved and changed): the net goes
    on seeing its inputs as it learnt them."""
    options = ["--data", str(tiny_data), "--out", str(tmp_path), "--run-name", "run", *TINY]
    config, run, bundle, locks = two_gpu.prepare_run(two_gpu.parse_config(options), None)
    locks.close()
    (run / "checkpoint.pt").touch()  # its file, not read again here: the dict below is its content
    saved = {"config": dataclasses.asdict(config), "arch": {"num_classes": 10}, "classes": bundle.classes,
             "progress": {"epoch": 0, "batch": 3, "global_step": 3}, "train_images": len(bundle.train),
             "data_mean": bundle.stats.mean + 0.25}
    resumed = dataclasses.replace(config, resume=str(run / "checkpoint.pt"))
    _, again, resumed_bundle, locks = two_gpu.prepare_run(resumed, saved)
    locks.close()
    assert again == run and torch.equal(resumed_bundle.stats.mean, saved["data_mean"])
    assert torch.equal(resumed_bundle.stats.eigvec, bundle.stats.eigvec)  # the colour shift's, of the data


def test_a_duration_reads_as_a_clock():
    """How the progress lines print an ETA or a wall time: minutes and seconds under an hour,
    beyond it hours and the minutes past the hour (the paper's 90 epochs take days)."""
    from launch.meter import duration
    assert [duration(s) for s in (-1, 0, 59, 61, 3599, 3600, 3661, 90061, 5 * 24 * 3600 + 59 * 60)] == [
        "0m00s", "0m00s", "0m59s", "1m01s", "59m59s", "1h00m", "1h01m", "25h01m", "120h59m"]


def test_the_step_line_s_rates_are_of_its_window_of_steps_and_leave_out_what_came_between_them(monkeypatch):
    """StepMeter: ms/step, images/s, loss and top-1 over the last ``window`` steps, each step's
    time from the end of the one before (restart_clock: the step line's printing, a checkpoint,
    an evaluation left out); ``seconds`` the time of every step."""
    from launch import meter as meter_module
    clock = [100.0]
    monkeypatch.setattr(meter_module.time, "perf_counter", lambda: clock[0])
    meter = meter_module.StepMeter(window=3)
    for seconds, loss, correct in ((1.0, 4.0, 0), (2.0, 3.0, 8), (3.0, 2.0, 16), (4.0, 1.0, 32)):
        clock[0] += seconds
        meter.update(loss, correct, 32)
        clock[0] += 50  # a checkpoint saved after the step
        meter.restart_clock()
    assert meter.ms_per_step == pytest.approx(3000)  # steps 2-4: 9 s in 3 steps
    assert meter.images_per_s == pytest.approx(96 / 9)
    assert (meter.loss, meter.top1) == (pytest.approx(2.0), pytest.approx(56 / 96))
    assert meter.seconds == pytest.approx(10)


def test_the_step_line_s_numbers_read_0_before_a_step_and_time_steps_taken_back_to_back(monkeypatch):
    """A meter of no step yet reads 0 throughout, not a division by zero; without restart_clock
    between them, each step's time runs from the end of the one before."""
    from launch import meter as meter_module
    clock = [100.0]
    monkeypatch.setattr(meter_module.time, "perf_counter", lambda: clock[0])
    meter = meter_module.StepMeter(window=3)
    assert (meter.ms_per_step, meter.images_per_s, meter.loss, meter.top1, meter.seconds) == (0, 0, 0, 0, 0)
    for seconds in (1.0, 2.0):
        clock[0] += seconds
        meter.update(2.0, 16, 32)
    assert meter.times == [1.0, 2.0] and meter.seconds == 3.0 and meter.images_per_s == 16.0  # the first left out


def test_the_step_rate_leaves_out_a_meter_s_first_step_once_others_are_measured(monkeypatch):
    """A compiled net's first step takes a minute, later ones 100 ms: the rate and ETA say 100 ms
    from the second step on, the first counted alone only until then; the loss and top-1 are
    every step's, and the first leaves the rates when the window moves past it."""
    from launch import meter as meter_module
    clock = iter([0.0, 60.0, 60.1, 60.2, 60.4, 60.7])
    monkeypatch.setattr(meter_module.time, "perf_counter", lambda: next(clock))
    meter = meter_module.StepMeter(window=3)
    meter.update(4.0, 1, 8)
    assert (meter.ms_per_step, meter.images_per_s) == (60_000.0, 8 / 60)
    meter.update(2.0, 3, 8)
    assert (meter.ms_per_step, meter.images_per_s, meter.loss, meter.top1) == (
        pytest.approx(100.0), pytest.approx(80.0), 3.0, 4 / 16)
    meter.update(2.0, 4, 8)
    assert meter.ms_per_step == pytest.approx(100.0) and meter.times == pytest.approx([60.0, 0.1, 0.1])
    for mean_ms in (400 / 3, 200.0):  # steps of 200 and 300 ms: the window of 3 past the first step, all of it
        meter.update(2.0, 4, 8)
        assert meter.ms_per_step == pytest.approx(mean_ms) and len(meter.times) == 3
    assert meter.seconds == pytest.approx(60.7)


def test_peak_memory_on_a_cpu_is_the_process_s_peak_resident_set_in_bytes():
    """On a CPU, this process's peak RSS in bytes (Linux's getrusage counts KiB): about what it
    holds now, or more."""
    from launch.meter import peak_memory
    measured, what = peak_memory(torch.device("cpu"))
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # Linux updates the peak lazily: it may lag what is held now by a few pages, never by a factor of 1024
    assert measured >= resident / 2 and what == "peak RSS of the rank process (getrusage)"


def test_a_file_written_whole_is_all_there_or_as_it_was_and_leaves_no_partial_file(tmp_path):
    """cli.write_whole (a new run's config.json): a write that fails part-way (a full disk) leaves
    the file as it was, or not there, and no partial file beside it; a name of 255 bytes, the
    most a folder takes, gets a partial file named to fit."""
    def half_written(partial):
        partial.write_text('{"layout": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    target = tmp_path / "config.json"
    with pytest.raises(OSError, match="No space left on device"):
        cli.write_whole(target, half_written)
    assert list(tmp_path.iterdir()) == []
    target.write_text("as it was\n")
    with pytest.raises(OSError, match="No space left on device"):
        cli.write_whole(target, half_written)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"] and target.read_text() == "as it was\n"
    longest = tmp_path / ("x" * 255)
    cli.write_whole(longest, lambda partial: partial.write_text("whole\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", longest.name]
    assert longest.read_text() == "whole\n"


def test_the_folders_made_for_a_run_are_removed_each_before_its_parent_and_one_holding_a_file_stays(tmp_path):
    """cli.make_folder and cli.remove_made: the folders made, parents first; removed deepest
    first, so that a parent is empty when its turn comes. A folder there before is not touched."""
    made = []
    cli.make_folder(tmp_path / "a" / "b" / "c", made)
    assert made == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    cli.remove_made(made)
    assert list(tmp_path.iterdir()) == []
    made = []
    cli.make_folder(tmp_path / "a" / "b", made)
    (tmp_path / "a" / "kept.txt").write_text("")
    cli.remove_made(made)
    assert [p.name for p in tmp_path.rglob("*")] == ["a", "kept.txt"]
    made = []
    cli.make_folder(tmp_path / "a" / "new", made)  # a/ was there
    assert made == [tmp_path / "a" / "new"]
    cli.remove_made(made)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "kept.txt"]


def _payload(net: str = "two-tower") -> dict:
    """A checkpoint as load_checkpoint returns it, less its tensors: the small recipe of a run on 360
    images, and the net it holds."""
    saved = resolve(resolve(TrainConfig(data="photos", recipe="small")), train_images=360)
    arch = {name: getattr(saved, name) for name in two_gpu.ARCHITECTURE_OPTIONS}
    return {"config": dataclasses.asdict(saved), "arch": {**arch, "net": net}}


def test_a_resumed_run_refuses_another_run_name_or_out_folder_and_takes_more_epochs(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").touch()  # its content: _payload()
    for option in (["--run-name", "branch"], ["--out", "elsewhere"]):
        argv = ["--resume", str(tmp_path / "run"), *option]
        with pytest.raises(ValueError, match="^" + re.escape(
                f"{' '.join(option)}: a resumed run goes on in its own folder, {tmp_path / 'run'}; drop the option (to "
                f"branch the run, copy that folder and resume the copy)") + "$"):
            two_gpu.resumed_config(parse_config(argv), _payload(), given_options(argv))
    argv = ["--resume", str(tmp_path / "run"), "--epochs", "40"]
    assert two_gpu.resumed_config(parse_config(argv), _payload(), given_options(argv)).epochs == 40


def _evaluated(net: Path, payload: dict, *options) -> TrainConfig:
    """--eval-only of weights alone (no training state: the single-device model's save, say)."""
    argv = ["--eval-only", str(net), *options]
    config = two_gpu.evaluated_config(parse_config(argv), {"arch": payload["arch"]}, given_options(argv))
    two_gpu.check_layout_holds(config, payload)
    return config


def test_an_evaluation_takes_the_one_tower_layout_of_its_net_and_refuses_a_layout_that_cannot_hold_it(tmp_path):
    net = tmp_path / "net.pt"
    assert _evaluated(net, _payload("one-tower")).layout == "one-tower"
    assert _evaluated(net, _payload("one-tower"), "--layout", "one-tower").layout == "one-tower"
    for layout in ("towers", "single"):
        with pytest.raises(ValueError, match=f"^{net} holds the one-tower net of section 3.2 \\(half the kernels in "
                                             f"conv1-conv4\\), which --layout {layout} cannot hold: use --layout "
                                             f"one-tower$"):
            _evaluated(net, _payload("one-tower"), "--layout", layout)
        assert _evaluated(net, _payload(), "--layout", layout).layout == layout
    with pytest.raises(ValueError, match=f"^{net} holds the paper's two-tower net, not the one-tower net that --layout "
                                         f"one-tower builds: use --layout towers or --layout single$"):
        _evaluated(net, _payload(), "--layout", "one-tower")


def test_an_evaluation_refuses_the_options_of_training_naming_each(tmp_path):
    net = tmp_path / "net.pt"
    for option in (["--max-steps", "5"], ["--epochs", "3"], ["--lr", "0.1"], ["--seed", "3"], ["--dropout", "0"],
                   ["--checkpoint-every", "2"], ["--log-every", "2"], ["--warmup-steps", "0"]):
        with pytest.raises(ValueError, match=f"^{option[0]}: --eval-only evaluates {net} and trains nothing, so this "
                                             f"option does nothing: drop it$"):
            _evaluated(net, _payload(), *option)
    with pytest.raises(ValueError, match=f"^--lr --max-steps: --eval-only evaluates {net} and trains nothing, so these "
                                         f"options do nothing: drop them$"):
        _evaluated(net, _payload(), "--max-steps", "5", "--lr", "0.1")
    assert _evaluated(net, _payload(), "--batch-size", "8", "--val-limit", "4").batch_size == 8  # the evaluation's


def test_a_resume_is_refused_where_its_run_has_trained_the_epochs_or_the_steps_asked_for(tiny_data, tmp_path):
    """Nothing left to train: its epochs done (--epochs no more than those), or --max-steps reached."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").touch()  # its content: the dict below
    bundle = data_module.open_data(tiny_data)  # 30 training images: 7 batches of 4
    saved = {"train_images": 30, "progress": {"epoch": 2, "batch": 0, "global_step": 14}}

    def check(*options):
        two_gpu.check_resumable(parse_config(["--resume", str(run), "--batch-size", "4", *options]), saved, bundle)
    check("--epochs", "3")
    check("--epochs", "3", "--max-steps", "15")
    advice = f"train it longer with --resume {run} --epochs N (N > 2), or evaluate it with --eval-only {run}"
    for epochs, more in (("2", ""), ("1", ", and --epochs 1 asks for no more")):
        with pytest.raises(ValueError, match="^" + re.escape(f"{run} has finished its 2 epochs{more}: {advice}") + "$"):
            check("--epochs", epochs)
    with pytest.raises(ValueError, match="^" + re.escape(f"{run} has taken 14 steps, --max-steps 14 no more than "
                                                         f"that: give a larger --max-steps, or none") + "$"):
        check("--epochs", "3", "--max-steps", "14")


def test_a_resumed_run_s_file_that_is_a_fifo_or_a_folder_is_refused_before_any_rank_starts(tmp_path):
    """A rank would wait for good on a FIFO's writer, and fail on a folder at its first line."""
    two_gpu.check_run_files(tmp_path)  # none there yet: each is made as the run goes
    for name in ("config.json", "metrics.jsonl", "train.log", "summary.json"):
        (tmp_path / name).write_text("")
    two_gpu.check_run_files(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"{tmp_path / 'metrics.jsonl'} is not a regular file (a FIFO, a socket or a device), where the run keeps "
            f"its metrics.jsonl: remove or rename it, and resume again") + "$"):
        two_gpu.check_run_files(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "summary.json").unlink()
    (tmp_path / "summary.json").mkdir()
    with pytest.raises(ValueError, match=f"^{tmp_path / 'summary.json'} is a folder, where the run keeps its "
                                         f"summary.json: "):
        two_gpu.check_run_files(tmp_path)


def _torchrun_variables(monkeypatch, **variables):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_torchrun_s_variables_are_taken_where_they_fit_and_the_ports_run_to_65535(monkeypatch):
    _torchrun_variables(monkeypatch, RANK="1")  # WORLD_SIZE not set: not torchrun's
    assert not two_gpu._torchrun_env()
    for port in ("1", "29500", "65535"):
        _torchrun_variables(monkeypatch, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        assert two_gpu._torchrun_env()
    for port in ("0", "65536"):
        monkeypatch.setenv("MASTER_PORT", port)
        with pytest.raises(ValueError, match=f"^MASTER_PORT={port} is not a port \\(1-65535\\): start the program "
                                             f"with torchrun, or without these variables"):
            two_gpu._torchrun_env()


@pytest.mark.parametrize("layout, ranks, compiled", [("towers", 2, "a tower's first four blocks between its exchanges; "
                                                                   "FC8 eager"),
                                                     ("single", 1, "the whole net"), ("one-tower", 1, "the whole net")])
def test_each_layout_starts_its_ranks_on_the_cpu_with_gloo_and_names_them_at_the_start(tmp_path, caplog, monkeypatch,
                                                                                       layout, ranks, compiled):
    """Two processes for the towers, one for a net without towers; no GPU: gloo, on the CPU, in
    bf16 too (no GPU to lack native bfloat16). The start-up lines name the placement, the net
    and the arithmetic, in that order."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    with caplog.at_level("INFO", logger="launch.two_gpu"):
        config, checkpoint, placement = two_gpu._configure(["--out", str(tmp_path), "--layout", layout, "--precision",
                                                            "bf16", "--compile", "eager"])
    assert checkpoint is None and (config.layout, config.replicas) == (layout, 1)
    assert (placement.ranks, placement.backend, placement.device) == (ranks, "gloo", "cpu")
    assert [message.split(": ", 1)[0] for message in caplog.messages] == ["placement", "architecture", "arithmetic"]
    assert ("the one-GPU net of section 3.2" in caplog.messages[1]) == (layout == "one-tower")
    assert caplog.messages[2] == f"arithmetic: bf16 autocast, float32 weights, torch.compile with eager ({compiled})"
    assert not list(tmp_path.iterdir())  # the run folder is prepare_run's to make


def test_gpus_enough_for_a_rank_each_take_nccl_and_inductor_there_needs_a_c_compiler(tmp_path, monkeypatch):
    """Two GPUs: a tower on each, over NCCL; one: the towers share it over gloo; the single net
    takes the first GPU, one process. --compile inductor on a GPU needs a C compiler for the
    launchers of Triton's kernels (not the C++ compiler of its CPU kernels)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpus, layout, placed in ((2, "towers", (2, "nccl", "cuda")), (1, "towers", (2, "gloo", "cuda")),
                                 (2, "single", (1, "gloo", "cuda"))):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        _, _, placement = two_gpu._configure(["--out", str(tmp_path), "--layout", layout])
        assert (placement.ranks, placement.backend, placement.device) == placed, (gpus, layout)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(ValueError, match="^--compile inductor: on a GPU it builds the launchers of its Triton kernels "
                                         "with a C compiler, and finds none here \\(no-such-cc is not on PATH\\)"):
        two_gpu._configure(["--out", str(tmp_path), "--compile", "inductor"])


def test_a_stop_at_the_end_of_the_training_is_told_to_evaluate_not_to_resume(tmp_path):
    """Its checkpoint at --epochs (the final evaluation was cut short): a resume would be refused."""
    torch.save({"progress": {"epoch": 2, "global_step": 14}}, tmp_path / "checkpoint.pt")
    assert two_gpu._after_interrupt(parse_config(["--epochs", "2"]), tmp_path) == (
        f"its checkpoint holds the end of its training (step 14); only the final evaluation is missing: evaluate it "
        f"with --eval-only {tmp_path} (or train it longer with --resume {tmp_path} --epochs N, N > 2)")
    assert two_gpu._after_interrupt(parse_config(["--epochs", "3"]), tmp_path) == f"resume with --resume {tmp_path}"


def test_a_rank_missing_from_a_meeting_is_another_rank_lost_whatever_the_store_said():
    said = "wait timeout after 600000ms, keys: /scan/1"
    assert two_gpu._lost_a_peer(MissingRank(said)) and not two_gpu._lost_a_peer(RuntimeError(said))


def test_ranks_may_find_their_files_at_other_paths_but_may_not_run_other_settings():
    """Each machine resolves --data, --out and --resume in its own folders; the rest must be rank 0's."""
    command = ["--data", "images", "--resume", "run"]
    mine = {"data": "/a/images", "out": "/a/runs", "resume": "/a/run", "eval_only": None, "lr": 0.01}
    theirs = dict(mine, data="/b/images", out="/b/runs", resume="/b/run")
    assert two_gpu._unlike_rank_0([(command, mine), (command, theirs)]) is None
    assert two_gpu._unlike_rank_0([(command, mine), (command, dict(theirs, lr=0.02))]) == (
        "rank 0 and rank 1 read other settings from the checkpoint at --resume's path on their machines (rank 0 from "
        "/a/run: --lr 0.01; rank 1 from /b/run: --lr 0.02): give every machine the same checkpoint at that path, or a "
        "path that every machine shares")


def test_a_resume_whose_images_are_not_there_is_told_to_name_their_new_place(tmp_path):
    gone, mistyped = str(tmp_path / "images"), str(tmp_path / "imagse")
    trained = {"config": {"data": gone}}
    config = parse_config(["--resume", str(tmp_path / "run"), "--data", gone])
    with pytest.raises(ValueError, match=f"^{config.resume} was trained on {gone}, which is not there now: give the "
                                         f"images' new place with --data$"):
        two_gpu.prepare_run(config, trained)
    config = parse_config(["--resume", str(tmp_path / "run"), "--data", mistyped])
    with pytest.raises(ValueError, match=f"^--data {mistyped} does not exist: give the folder of the images that "
                                         f"{config.resume} was trained on$"):
        two_gpu.prepare_run(config, trained)
    assert not list(tmp_path.iterdir())
