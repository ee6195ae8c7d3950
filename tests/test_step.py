"""The training loop around each step, in one process (a process group of one rank): the loss and
top-1 a step reports, the positions its augmentation is drawn for, where a resumed epoch goes on,
what --max-steps ends with, the divergence checks, and the error rates an evaluation gives."""

import json
import math
import shutil

import pytest
import torch

from launch import data, train
from launch.config import TrainConfig
from launch.meter import Metrics
from launch.schedule import Progress
from launch.step import paper_optimizer

from conftest import Recorder, plan_of, train_epoch

CPU = torch.device("cpu")


def _train_one_epoch(model, bundle, config, progress, mesh, metrics=None) -> bool:
    """conftest.train_epoch at the progress's rate."""
    return train_epoch(model, paper_optimizer(model.parameters(), lr=progress.lr), bundle, config, progress, mesh,
                       metrics)


def _records(path) -> list:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]


def test_a_step_reports_the_batch_s_mean_loss_and_its_top1_hits(mesh_of_one, small_bundle, tmp_path):
    """Logits that are the same for every class (a rate of 0 keeps them so) have a cross-entropy
    of ln(classes) for every image, so each step's loss, the mean of the steps' losses and the
    progress's loss are ln(classes), whatever the batch size; the top-1 rate counts the images of
    the class the logits pick (the first of equal ones) among those the steps saw."""
    batch, seed, epoch = 6, 3, 0
    classes = len(small_bundle.classes)
    config = TrainConfig(batch_size=batch, seed=seed, epochs=2, lr=0.01, warmup_steps=0, log_every=1)
    progress = Progress(epoch=epoch, lr=0.0)
    assert _train_one_epoch(Recorder(classes), small_bundle, config, progress, mesh_of_one,
                            Metrics(tmp_path / "metrics.jsonl"))
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["step_loss"] == pytest.approx(math.log(classes)) and r["loss"] == pytest.approx(math.log(classes))
    assert progress.loss == pytest.approx(math.log(classes))
    labels = torch.cat([y for _, y in data.train_batches(small_bundle, batch, seed, epoch)])
    assert len(labels) == 3 * batch
    assert records[-1]["top1"] == pytest.approx((labels == 0).sum().item() / len(labels))


def test_the_augmentation_is_drawn_for_the_epoch_s_positions_after_earlier_epochs(mesh_of_one, small_bundle):
    """In an epoch after the first, and in one resumed at a later batch, a batch's crops get the
    choices drawn for their positions in that epoch, not for the run's step count; a resumed epoch
    goes on with its batches not yet taken, to its end."""
    batch, seed, epoch = 6, 3, 1
    crops = [c for c, _ in data.train_batches(small_bundle, batch, seed, epoch)]
    assert len(crops) == 3
    for progress in (Progress(epoch=epoch, global_step=3, lr=0.01), Progress(epoch=epoch, batch=1, global_step=4,
                                                                              lr=0.01)):
        first = progress.batch
        model = Recorder(len(small_bundle.classes))
        config = TrainConfig(batch_size=batch, seed=seed, epochs=3, lr=0.01, warmup_steps=0, log_every=100)
        assert _train_one_epoch(model, small_bundle, config, progress, mesh_of_one)
        assert (progress.batch, progress.global_step) == (3, 6) and len(model.seen) == 3 - first
        for b, given in enumerate(model.seen, start=first):
            choices = data.train_augmentation(seed, epoch, b * batch, batch)
            assert torch.equal(given, data.augment(crops[b], choices, small_bundle.stats)), (first, b)


def test_the_last_step_of_a_run_stopped_by_max_steps_is_logged_and_left_to_the_caller_to_save(mesh_of_one,
                                                                                              small_bundle, tmp_path,
                                                                                              monkeypatch):
    """--max-steps 4 in the second epoch (3 steps an epoch): the run's last step, step 4, writes its
    step line and metrics record whatever --log-every says, and --checkpoint-every 2 does not save it
    within the epoch (the caller saves the run's end once)."""
    saved = []
    monkeypatch.setattr(train, "save_now", lambda run_dir, model, optimizer, progress, *rest:
                        saved.append(progress.global_step))
    config = TrainConfig(batch_size=6, seed=3, epochs=3, lr=0.01, warmup_steps=0, log_every=100, max_steps=4,
                         checkpoint_every=2)
    progress = Progress(epoch=1, global_step=3, lr=0.01)
    assert not _train_one_epoch(Recorder(len(small_bundle.classes)), small_bundle, config, progress, mesh_of_one,
                                Metrics(tmp_path / "metrics.jsonl"))
    assert progress.global_step == 4 and saved == []
    assert [(r["epoch"], r["step"]) for r in _records(tmp_path / "metrics.jsonl")] == [(2, 4)]


class _NotANumber(Recorder):
    """A Recorder whose logits are NaN: weights that ran away."""

    def forward(self, images):
        return super().forward(images) * math.nan


def test_a_loss_that_is_not_a_number_stops_the_training_at_its_step(mesh_of_one, small_bundle):
    """A step whose loss is NaN stops the run there, naming the epoch and the run's step, rather
    than training on with weights that ran away."""
    config = TrainConfig(batch_size=6, seed=3, epochs=3, lr=0.01, warmup_steps=0, log_every=100)
    progress = Progress(epoch=1, global_step=3, lr=0.01)
    with pytest.raises(train.NonFiniteLoss, match=r"the loss became nan at epoch 2, step 4; the run stops"):
        _train_one_epoch(_NotANumber(len(small_bundle.classes)), small_bundle, config, progress, mesh_of_one)
    assert progress.global_step == 4


class _Ranking(torch.nn.Module):
    """The same logits for every image, ranking the classes in the order ``order``; each row is
    NaN where its image is among the first ``broken`` of the set."""

    def __init__(self, order: list, broken: int = 0):
        super().__init__()
        self.logits = torch.zeros(len(order))
        self.logits[order] = torch.arange(len(order), 0, -1, dtype=torch.float32)
        self.broken, self.given = broken, 0

    def forward(self, images):
        rows = self.logits.expand(len(images), -1).clone()
        first = self.given
        self.given += len(images)
        rows[:max(0, self.broken - first)] = math.nan
        return rows


def test_an_evaluation_s_error_rates_are_of_the_images_it_could_use(mesh_of_one, small_bundle, tmp_path):
    """With an unusable validation image left out, the top-1 and top-5 error rates are those of the
    images evaluated (one image a class: one right in top-1, five in top-5), not of the whole set."""
    root = tmp_path / "shapes"
    shutil.copytree(small_bundle.root, root)
    broken = sorted((root / "val").rglob("*.*"))[3]
    broken.write_bytes(b"not a jpeg")
    damaged = data.open_data(root, cache_dir=tmp_path / "cache")
    lost = damaged.classes.index(broken.parent.name)
    labels = sorted(label for _, label in damaged.val.samples)
    assert labels == list(range(10))  # one image a class
    order = [c for c in range(10) if c != lost] + [lost]  # the lost image's class ranked last
    with data.Loader(damaged) as loader:
        result = train.evaluate(_Ranking(order), loader, plan_of(damaged, 4), 4, CPU, mesh_of_one)
    assert (result["images"], result["skipped"]) == (9, 1)
    assert result["top1_error"] == pytest.approx(1 - 1 / 9) and result["top5_error"] == pytest.approx(1 - 5 / 9)


def test_an_evaluation_of_outputs_that_are_not_numbers_names_how_many_images_had_them(mesh_of_one, small_bundle):
    """Outputs that are NaN for some validation images are never scored as guesses: the evaluation
    stops, saying for how many of the images evaluated."""
    with data.Loader(small_bundle) as loader:
        with pytest.raises(train.NonFiniteOutputs, match=r"the net's outputs for 3 of the 10 validation images"):
            train.evaluate(_Ranking(list(range(10)), broken=3), loader, plan_of(small_bundle, 4), 4, CPU, mesh_of_one)
        assert train.evaluate(_Ranking(list(range(10))), loader, plan_of(small_bundle, 4), 4, CPU,
                              mesh_of_one)["top1_error"] == pytest.approx(0.9)
