"""The training loop's parts in one process (a process group of one rank, as `--layout single`
has): the augmentation each step's crops get, the rate each step takes and when its line is
written, the evaluation's counts, the images it takes and its ten-patch average, and the
progress a checkpoint keeps for the schedule."""

import dataclasses
import errno
import io
import json
import logging
import os
import re
import shutil

import pytest
import torch

from launch import checkpoint, data
from launch.checkpoint import (CheckpointError, checkpoint_payload, finite, load_checkpoint, restore_training_state,
                               save_checkpoint, save_training_state)
from launch.config import TrainConfig
from launch.meter import Metrics
from launch.schedule import Progress
from launch.step import AUTOCAST, paper_optimizer
from launch import train
from towers import AlexNet, build_reference

from conftest import Recorder, plan_of, train_epoch

CPU = torch.device("cpu")


def test_each_step_gets_its_own_crops_augmented_where_they_were_cut(mesh_of_one, small_bundle):
    """The mean image, the reflection and the colour shift are those drawn for the crops' own
    positions in the epoch: a shift by a batch would still give images of the right shape and
    statistics, silently."""
    batch, seed, epoch = 6, 3, 1
    model = Recorder(len(small_bundle.classes))
    config = TrainConfig(batch_size=batch, seed=seed, epochs=2, lr=0.01, warmup_steps=0, log_every=100)
    plan = plan_of(small_bundle, batch)
    finished = train_epoch(model, paper_optimizer(model.parameters(), lr=0.01), small_bundle, config,
                                Progress(epoch=epoch, lr=0.01), mesh_of_one)
    crops = [c for c, _ in data.train_batches(small_bundle, batch, seed, epoch)]
    assert finished and len(model.seen) == len(crops) == plan.batches_per_epoch == 3
    for b, (given, cut) in enumerate(zip(model.seen, crops)):
        choices = data.train_augmentation(seed, epoch, b * batch, batch)
        assert torch.equal(given, data.augment(cut, choices, small_bundle.stats)), b
        # the same crops with another batch's choices differ: the comparison tells positions apart
        other = data.train_augmentation(seed, epoch, ((b + 1) % 3) * batch, batch)
        assert not torch.equal(given, data.augment(cut, other, small_bundle.stats)), b


def test_each_step_trains_at_the_schedule_s_rate(mesh_of_one, small_bundle):
    """The rate the schedule gives a step (here the warm-up's, of a rate divided once) is the one
    the step takes, not the optimizer's own nor --lr: the step lines and metrics would say the
    schedule's while the run took another."""
    batch = 6
    model = Recorder(len(small_bundle.classes))
    optimizer = paper_optimizer(model.parameters(), lr=1.0)  # a rate no step may take
    rates = []
    model.register_forward_pre_hook(lambda module, args: rates.append(optimizer.param_groups[0]["lr"]))
    config = TrainConfig(batch_size=batch, seed=3, epochs=2, lr=0.03, warmup_steps=3, log_every=100)
    finished = train_epoch(model, optimizer, small_bundle, config, Progress(epoch=0, lr=0.003), mesh_of_one)
    assert finished and rates == pytest.approx([0.001, 0.002, 0.003])


def test_step_lines_follow_the_run_s_steps_in_a_later_epoch(mesh_of_one, small_bundle, tmp_path, caplog):
    """--log-every counts the run's steps, not the epoch's batches: the metrics.jsonl records that
    the ablations and benchmarks read (written with the step lines) come every N steps after an
    epoch or a resume too, and at the epoch's end. The lines themselves count the epoch's batches."""
    caplog.set_level(logging.INFO, logger=train.log.name)
    batch = 6  # 3 steps an epoch: the second epoch's are the run's steps 4 to 6, of 9
    model = Recorder(len(small_bundle.classes))
    config = TrainConfig(batch_size=batch, seed=3, epochs=3, lr=0.01, warmup_steps=0, log_every=4)
    train_epoch(model, paper_optimizer(model.parameters(), lr=0.01), small_bundle, config,
                     Progress(epoch=1, global_step=3, lr=0.01), mesh_of_one, Metrics(tmp_path / "metrics.jsonl"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records if r["event"] == "train"] == [(2, 4), (2, 6)]
    lines = [r.getMessage() for r in caplog.records if r.name == train.log.name and " loss " in r.getMessage()]
    assert [line.split(" loss ")[0] for line in lines] == ["epoch 2/3 step 1/3", "epoch 2/3 step 3/3"], lines


def test_the_eta_counts_the_epoch_ends_and_the_ten_patch_test_ahead(mesh_of_one, small_bundle, caplog):
    """The step line's ETA adds to the steps left the time of each epoch end still ahead (the
    current epoch's from its first step to its last) and of the final ten-patch test, as last
    measured: the steps alone leave out minutes an epoch."""
    caplog.set_level(logging.INFO, logger=train.log.name)
    model = Recorder(len(small_bundle.classes))
    beyond = train.TimeBeyondSteps(epoch_end_s=600, evaluation_s=90)  # each step: far under a minute
    for ten_crop, expected in ((True, 2 * 600 + 10 * 90), (False, 2 * 600)):  # epochs 2 and 3 end ahead
        caplog.clear()
        config = TrainConfig(batch_size=6, seed=3, epochs=3, lr=0.01, warmup_steps=0, log_every=1, ten_crop=ten_crop)
        train_epoch(model, paper_optimizer(model.parameters(), lr=0.01), small_bundle, config,
                         Progress(epoch=1, global_step=3, lr=0.01), mesh_of_one, beyond=beyond)
        etas = [r.getMessage().split("| ETA ")[1] for r in caplog.records if "| ETA " in r.getMessage()]
        assert len(etas) == 3, etas
        for eta in etas:
            minutes, seconds = map(int, eta.rstrip("s").split("m"))
            assert expected <= 60 * minutes + seconds < expected + 60, (eta, ten_crop)


@pytest.mark.parametrize("step, last_step, ends", [
    (1, 9, 3), (3, 9, 3), (4, 9, 2), (9, 9, 1),  # 3 steps an epoch: ends after steps 3, 6 and 9
    (4, 7, 2),  # --max-steps 7: epoch 2's end, and the save and evaluation after step 7
    (7, 7, 1), (6, 6, 1)])
def test_the_time_beyond_the_steps_counts_each_end_ahead_once(step, last_step, ends):
    beyond = train.TimeBeyondSteps(epoch_end_s=10.0, evaluation_s=1.0)
    assert beyond.ahead(step, last_step, 3, ten_patch=False) == 10.0 * ends
    assert beyond.ahead(step, last_step, 3, ten_patch=True) == 10.0 * ends + 10.0
    assert train.TimeBeyondSteps().ahead(step, last_step, 3, ten_patch=True) == 0.0  # none measured yet


def test_an_evaluation_of_part_of_the_set_spreads_over_it_and_counts_the_images_left_out(mesh_of_one, small_bundle,
                                                                                        tmp_path):
    """--val-limit N evaluates N images spread over the set (sorted by class), not its first N; an
    image that cannot be used is left out and counted."""
    model = Recorder(len(small_bundle.classes))
    plan = dataclasses.replace(plan_of(small_bundle, 4), val_images=5)
    with data.Loader(small_bundle) as loader:
        result = train.evaluate(model, loader, plan, 4, CPU, mesh_of_one)
    chosen = data.eval_indices(len(small_bundle.val), 5)
    assert chosen == [0, 2, 4, 7, 9]
    expected = data.eval_views(torch.stack([data.center_crop(small_bundle.val[i][0]) for i in chosen]),
                               small_bundle.stats, ten_crop=False)
    assert torch.equal(torch.cat(model.seen), expected)
    assert (result["images"], result["skipped"]) == (5, 0)
    root = tmp_path / "shapes"
    shutil.copytree(small_bundle.root, root)
    broken = sorted((root / "val").rglob("*.*"))[3]
    broken.write_bytes(b"not a jpeg")
    damaged = data.open_data(root, cache_dir=tmp_path / "cache")
    with data.Loader(damaged) as loader:
        result = train.evaluate(Recorder(len(damaged.classes)), loader, plan_of(damaged, 4), 4, CPU, mesh_of_one)
    assert (result["images"], result["skipped"]) == (len(damaged.val) - 1, 1)


def test_max_steps_counts_the_run_s_steps_in_a_later_epoch_and_a_resumed_one(mesh_of_one, small_bundle):
    """--max-steps N stops at the run's step N, not at the epoch's batch N: in the second epoch
    (3 steps an epoch, 3 taken before it) and from a resumed batch within it, and says the
    epoch was not finished, so that its end is neither evaluated nor saved as an epoch's."""
    batch = 6
    for progress, steps in ((Progress(epoch=1, global_step=3, lr=0.01), 2),
                            (Progress(epoch=1, batch=1, global_step=4, lr=0.01), 1)):
        model = Recorder(len(small_bundle.classes))
        config = TrainConfig(batch_size=batch, seed=3, epochs=3, lr=0.01, warmup_steps=0, log_every=100, max_steps=5)
        started = progress.batch
        finished = train_epoch(model, paper_optimizer(model.parameters(), lr=0.01), small_bundle, config,
                                    progress, mesh_of_one)
        assert not finished and len(model.seen) == steps
        assert (progress.global_step, progress.batch) == (5, started + steps)


def test_checkpoints_come_every_n_steps_of_the_run_in_a_later_epoch(mesh_of_one, small_bundle, monkeypatch):
    """--checkpoint-every N saves at the run's steps N, 2N, ..., not at the epoch's batches: in the
    second epoch (3 steps an epoch) at step 4 of the run; the epoch's end (step 6) is left to the caller."""
    saved = []
    monkeypatch.setattr(train, "save_now", lambda run_dir, model, optimizer, progress, *rest:
                        saved.append((progress.global_step, progress.batch)))
    model = Recorder(len(small_bundle.classes))
    config = TrainConfig(batch_size=6, seed=3, epochs=3, lr=0.01, warmup_steps=0, log_every=100, checkpoint_every=2)
    assert train_epoch(model, paper_optimizer(model.parameters(), lr=0.01), small_bundle, config,
                            Progress(epoch=1, global_step=3, lr=0.01), mesh_of_one)
    assert saved == [(4, 1)]


class _FixedLogits(torch.nn.Module):
    """Gives the next rows of ``logits`` whatever the images (as many rows as it is given
    images), and keeps how many it was given at each forward pass."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.sizes = logits, []

    def forward(self, images):
        given = sum(self.sizes)
        self.sizes.append(len(images))
        assert given + len(images) <= len(self.logits)
        return self.logits[given:given + len(images)]


def test_evaluation_counts_top1_and_top5_hits_and_averages_the_ten_views_probabilities(mesh_of_one, small_bundle):
    labels = torch.tensor([label for _, label in small_bundle.val.samples])
    n, k = len(labels), len(small_bundle.classes)
    plan = plan_of(small_bundle, 4)
    # the true class ranked 1st for images 0-1, 5th for 2-4, 6th for the rest
    logits = torch.zeros(n, k)
    for i, y in enumerate(labels.tolist()):
        rank = 0 if i < 2 else 4 if i < 5 else 5
        others = [c for c in range(k) if c != y]
        logits[i, others[:rank] + [y] + others[rank:]] = torch.arange(k, 0, -1, dtype=torch.float32)
    with data.Loader(small_bundle) as loader:
        centre = train.evaluate(_FixedLogits(logits), loader, plan, n, CPU, mesh_of_one)
    assert centre == {"top1_error": pytest.approx(1 - 2 / n), "top5_error": pytest.approx(1 - 5 / n), "images": n,
                      "skipped": 0, "test": "centre patch"}
    # Ten views: one sure of the next class, nine leaning a little to the true one. The mean of the
    # softmax (section 4.1: "averaging the predictions") picks the true class; the mean logit would not.
    views = torch.zeros(n, 10, k)
    for i, y in enumerate(labels.tolist()):
        views[i, 0, (y + 1) % k] = 10.0
        views[i, 1:, y] = 1.0
    assert not torch.equal(views.mean(dim=1).argmax(dim=1), labels)
    model = _FixedLogits(views.view(n * 10, k))
    with data.Loader(small_bundle) as loader:  # the ten-patch test evaluates a quarter of the batch at a time
        ten = train.evaluate(model, loader, plan, 8, CPU, mesh_of_one, ten_crop=True)
    assert (ten["top1_error"], ten["images"], ten["test"]) == (0.0, n, "ten-patch")
    assert n == 10 and model.sizes == [20] * 5  # each pass: a quarter of the batch of 8, ten views each


class _Modes(Recorder):
    """A Recorder that keeps whether it was in training mode at each forward pass."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.modes = []

    def forward(self, images):
        self.modes.append(self.training)
        return super().forward(images)


def test_an_evaluation_runs_the_net_in_inference_mode_and_hands_back_the_mode_it_found(mesh_of_one, small_bundle):
    """Section 4.2: at test time dropout keeps every neuron (torch's eval mode), so that an evaluation
    is the net's and not a random draw of masks; the evaluation between epochs gives the training
    its mode back."""
    for training in (True, False):
        model = _Modes(len(small_bundle.classes)).train(training)
        with data.Loader(small_bundle) as loader:
            for ten_crop in (False, True):
                train.evaluate(model, loader, plan_of(small_bundle, 4), 4, CPU, mesh_of_one, ten_crop=ten_crop)
        assert model.modes and not any(model.modes) and model.training == training


class _MeanColour(torch.nn.Module):
    """Logits from each image's mean colour through one linear layer; keeps the type of each pass's logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)
        self.types = []

    def forward(self, images):
        logits = self.fc(images.mean(dim=(2, 3)))
        self.types.append(logits.dtype)
        return logits


def test_each_precision_trains_in_its_own_arithmetic_and_an_evaluation_computes_in_the_one_given(mesh_of_one,
                                                                                                   small_bundle):
    """--precision bf16 multiplies in bfloat16 (float16 would round otherwise and overflow past
    65504), fp32 in float32; the weights stay float32 either way."""
    for precision, computed in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _MeanColour(len(small_bundle.classes))
        config = TrainConfig(batch_size=6, seed=3, epochs=2, lr=0.01, warmup_steps=0, log_every=100,
                             precision=precision)
        assert train_epoch(model, paper_optimizer(model.parameters(), lr=0.01), small_bundle, config,
                                Progress(epoch=0, lr=0.01), mesh_of_one)
        with data.Loader(small_bundle) as loader:
            train.evaluate(model, loader, plan_of(small_bundle, 6), 6, CPU, mesh_of_one, False, AUTOCAST[precision])
        assert model.types == [computed] * (3 + 2) and model.fc.weight.dtype == torch.float32, precision


@pytest.mark.slow
def test_a_checkpoint_keeps_the_whole_progress_and_the_momentum(mesh_of_one, tmp_path, small_bundle):
    """Every field of the progress, the plateau rule's count of epochs without improvement
    among them: a resumed plateau run that lost it would divide its rate an epoch late."""
    model = build_reference(len(small_bundle.classes), seed=0, dropout=0.0)
    optimizer = paper_optimizer(model.parameters(), lr=0.01)
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    optimizer.step()
    progress = Progress(epoch=7, batch=2, global_step=23, lr=0.001, best_error=0.375, bad_epochs=1, reductions=1,
                        loss=1.25)
    assert all(getattr(progress, f.name) != f.default for f in dataclasses.fields(Progress))
    config = TrainConfig(layout="single", schedule="plateau")
    saved_rng = torch.get_rng_state()
    save_training_state(tmp_path / "checkpoint.pt", model, optimizer, progress, config, small_bundle.classes,
                        len(small_bundle.train), mesh_of_one)
    # what a resume checks its data against: the class folders and the training set's size
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (payload["classes"], payload["train_images"]) == (list(small_bundle.classes), len(small_bundle.train))
    fresh = build_reference(len(small_bundle.classes), seed=1, dropout=0.0)
    fresh_optimizer = paper_optimizer(fresh.parameters(), lr=0.01)
    torch.manual_seed(12345)  # elsewhere: the resumed rank's dropout goes on from where it was saved
    restored = restore_training_state(tmp_path / "checkpoint.pt", fresh, fresh_optimizer, small_bundle.classes,
                                      mesh_of_one, with_training=True)
    assert restored == progress and torch.equal(torch.get_rng_state(), saved_rng)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(optimizer.state[p]["momentum_buffer"], fresh_optimizer.state[q]["momentum_buffer"]), name
    # A checkpoint made smaller by hand, in float16: the momentum goes on in float32, as the weights, and the
    # checkpoints the resumed run saves hold float32 (its own resume refused float16 momentum beside them)
    for part in ("model", "momentum_buffer"):
        payload[part] = {k: v.half() for k, v in payload[part].items()}
    save_checkpoint(tmp_path / "half.pt", payload)
    restore_training_state(tmp_path / "half.pt", fresh, fresh_optimizer, small_bundle.classes, mesh_of_one,
                           with_training=True)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        momentum = fresh_optimizer.state[q]["momentum_buffer"]
        assert q.dtype == momentum.dtype == torch.float32, name
        assert torch.equal(momentum, optimizer.state[p]["momentum_buffer"].half().float()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e5m2])
def test_finite_finds_any_value_that_is_not_a_number(dtype):
    """checkpoint.finite, which checks every checkpoint's weights and momentum, against
    torch.isfinite: one NaN or infinity anywhere in a tensor, whatever its shape and layout."""
    for shape in [(), (1,), (7,), (3, 5), (64, 9, 11)]:
        assert finite(torch.randn(shape).to(dtype)), shape
        for at in {0, torch.Size(shape).numel() // 2, torch.Size(shape).numel() - 1}:
            for value in (float("nan"), float("inf"), float("-inf")):
                tensor = torch.randn(shape).to(dtype)
                tensor.view(-1)[at] = value
                assert not finite(tensor) and not finite(tensor.mT if tensor.dim() >= 2 else tensor), (shape, at, value)
    assert finite(torch.empty(0, 4, dtype=dtype))
    assert finite(torch.full((5,), torch.finfo(dtype).max, dtype=dtype))  # the largest finite value, not infinity


class _Filling(io.FileIO):
    """A file on a disk that takes the first write and then has no room: ``code`` is the error it raises."""
    code = errno.ENOSPC

    def write(self, data):
        if self.tell():
            raise OSError(self.code, os.strerror(self.code))
        return super().write(data)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["disk", "quota"])
def test_a_save_that_runs_out_of_room_as_it_writes_says_what_it_needs_and_what_it_kept(tmp_path, monkeypatch, code):
    """The disk filled by another writer after save_checkpoint measured it, or the user's quota
    reached (which the free space does not show): either is a disk too full, named with the room
    the checkpoint needs and whether the previous one is whole; no part of the new one is left."""
    path = tmp_path / "run" / "checkpoint.pt"
    monkeypatch.setattr(_Filling, "code", code)
    for previous, kept in ((None, "nothing was written"), (torch.ones(10), "the previous one is whole")):
        if previous is not None:
            save_checkpoint(path, {"weights": previous})
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint, "open", _Filling, raising=False)
            with pytest.raises(OSError) as refused:
                save_checkpoint(path, {"weights": torch.zeros(1 << 16)})
        assert refused.value.errno == errno.ENOSPC, refused.value
        assert f"no space left for {path}: it needs " in str(refused.value)
        assert f"({kept}); free some space there" in str(refused.value), refused.value
        assert sorted(p.name for p in path.parent.iterdir()) == ([] if previous is None else ["checkpoint.pt"])
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(10))


def _placeholder_weights(num_classes: int = 10) -> dict:
    """The net's weights in their shapes, each one zero expanded: a checkpoint of a few bytes."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AlexNet(num_classes).state_dict().items()}
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


def test_a_checkpoint_that_does_not_name_its_version_or_its_net_is_refused(tmp_path):
    """A file laid out as a checkpoint whose version or architecture's name is missing (written by
    another program, or edited by hand) is not read as one of this version's, of the 2012 net."""
    payload = checkpoint_payload(_placeholder_weights(), num_classes=10)
    save_checkpoint(tmp_path / "whole.pt", payload)
    assert load_checkpoint(tmp_path / "whole.pt")["version"] == payload["version"]
    arch = {k: v for k, v in payload["arch"].items() if k != "name"}
    for broken, said in (({k: v for k, v in payload.items() if k != "version"},
                          "has checkpoint version None; this program reads version"),
                         (dict(payload, arch=arch), "holds architecture None, not 'alexnet-2012'")):
        save_checkpoint(tmp_path / "broken.pt", broken)
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'broken.pt'} {said}")):
            load_checkpoint(tmp_path / "broken.pt")


def test_a_checkpoint_s_mean_image_loads_in_float32_and_one_of_whole_numbers_is_refused(tmp_path):
    """The mean image that each image is centred with comes in float32 whatever type it was saved
    in (a checkpoint made smaller by hand: float16); one of whole numbers is refused, as weights of
    them are: it would centre the images on another mean without a word."""
    mean = torch.rand(3, 256, 256)
    save_checkpoint(tmp_path / "half.pt", checkpoint_payload(_placeholder_weights(), num_classes=10,
                                                             data_mean=mean.half()))
    loaded = load_checkpoint(tmp_path / "half.pt")["data_mean"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, mean.half().float())
    save_checkpoint(tmp_path / "integral.pt", checkpoint_payload(_placeholder_weights(), num_classes=10,
                                                                 data_mean=(mean * 255).to(torch.uint8)))
    with pytest.raises(CheckpointError, match=r"holds values that are not floating-point numbers \(data_mean as uint8"):
        load_checkpoint(tmp_path / "integral.pt")
    for packed in checkpoint.PACKED:  # two 4-bit numbers a byte, which the net cannot take
        weights = dict(_placeholder_weights(), **{"fc8.bias": torch.zeros(10, dtype=torch.uint8).view(packed)})
        save_checkpoint(tmp_path / "packed.pt", checkpoint_payload(weights, num_classes=10))
        with pytest.raises(CheckpointError, match=rf"not floating-point numbers \(fc8.bias as {str(packed)[6:]}\)"):
            load_checkpoint(tmp_path / "packed.pt")


@pytest.mark.parametrize("layout, replicas, ranks", [("single", 1, 1), ("single", 3, 3), ("one-tower", 2, 2),
                                                     ("towers", 1, 2), ("towers", 2, 4)])
def test_a_training_state_holds_one_random_state_for_each_rank_of_its_run(layout, replicas, ranks):
    """The single and one-tower layouts run one rank per replica, the towers two: a checkpoint
    with a random state for each is resumed, and one with a state more or less is refused (a rank
    without its own would go on from its seed)."""
    config = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(TrainConfig(layout=layout, replicas=replicas)).items()}
    payload = checkpoint_payload({"fc8.bias": torch.zeros(10)}, num_classes=10, config=config,
                                 progress=dataclasses.asdict(Progress()), momentum_buffer={})
    state = {"cpu": torch.get_rng_state(), "cuda": torch.zeros(16, dtype=torch.uint8)}  # a GPU's: checked as it is set
    for count in [n for n in (ranks - 1, ranks, ranks + 1) if n]:  # none at all: not checked
        states = dict(payload, rng={f"rank{r}": state for r in range(count)})
        if count == ranks:
            checkpoint.check_training_state("run", states)
            continue
        with pytest.raises(CheckpointError, match=f"holds the random states of {count} ranks, and its run \\({layout}, "
                                                  f"{replicas} replicas?\\) had {ranks}:"):
            checkpoint.check_training_state("run", states)


def test_an_evaluation_takes_the_weights_alone_and_a_resume_the_training_state_too(mesh_of_one, tmp_path):
    """restore_training_state without the training (--eval-only) loads the checkpoint's weights and
    nothing else: no momentum, no progress, and the process's random state left as it was; with it
    (--resume), all of them as saved."""
    classes = [f"c{i}" for i in range(10)]
    weights, momentum = _placeholder_weights(), {k: v + 0.25 for k, v in _placeholder_weights().items()}
    progress = Progress(epoch=3, batch=1, global_step=10, lr=0.001, best_error=0.5, bad_epochs=1, loss=2.5)
    saved_rng = torch.manual_seed(1).get_state()
    save_checkpoint(tmp_path / "checkpoint.pt", checkpoint_payload(
        {k: v + 0.5 for k, v in weights.items()}, num_classes=10, classes=classes, momentum_buffer=momentum,
        progress=dataclasses.asdict(progress), rng={"rank0": {"cpu": saved_rng}}))
    for with_training in (False, True):
        with torch.device("meta"):
            model = AlexNet(10)
        model.to_empty(device=CPU)
        optimizer = paper_optimizer(model.parameters(), lr=0.01)
        own_rng = torch.manual_seed(2).get_state()
        restored = restore_training_state(tmp_path / "checkpoint.pt", model, optimizer, classes, mesh_of_one,
                                          with_training=with_training)
        assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in model.parameters())
        buffers = [optimizer.state[p].get("momentum_buffer") for p in model.parameters()]
        if with_training:
            assert restored == progress and torch.equal(torch.get_rng_state(), saved_rng)
            assert all(torch.equal(b, torch.full_like(b, 0.25)) for b in buffers)
        else:
            assert restored is None and torch.equal(torch.get_rng_state(), own_rng) and buffers == [None] * 16


def test_a_training_checkpoint_keeps_each_split_s_digest_and_the_mean_image_as_a_resume_reads_them(mesh_of_one,
                                                                                                   tmp_path):
    """The digests of the data a run trained on are saved under the names a resume (and launch.show)
    reads them by, train_digest and val_digest, so that a resume on other images is refused; the
    mean image in float32, whatever type the statistics were computed in."""
    with torch.device("meta"):
        model = AlexNet(10)
    model.to_empty(device=CPU)
    mean = torch.rand(3, 256, 256, dtype=torch.float64)
    save_training_state(tmp_path / "checkpoint.pt", model, paper_optimizer(model.parameters(), lr=0.01),
                        Progress(), TrainConfig(layout="single"), [f"c{i}" for i in range(10)], 20, mesh_of_one,
                        data_mean=mean, digests={"train": "digest of train", "val": "digest of val"})
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True, mmap=True)
    assert (payload["train_digest"], payload["val_digest"]) == ("digest of train", "digest of val")
    assert payload["data_mean"].dtype == torch.float32 and torch.equal(payload["data_mean"], mean.float())


def test_a_checkpoint_of_other_class_names_names_three_of_them_and_says_when_there_are_more():
    """The refusal of a checkpoint trained on other class names lists the first three that differ,
    and says that more do only where there are more than three."""
    saved = [f"n{i:08d}" for i in range(5)]
    for changed, listed in ((3, "n00000000 -> a0, n00000001 -> a1, n00000002 -> a2)"),
                            (4, "n00000000 -> a0, n00000001 -> a1, n00000002 -> a2 ...)")):
        now = [f"a{i}" for i in range(changed)] + saved[changed:]
        with pytest.raises(CheckpointError) as refused:
            checkpoint.check_classes({"arch": {"num_classes": 5}, "classes": saved}, "run", now)
        assert f"on other classes than the data's ({changed} differ: {listed}: use the dataset" in str(refused.value)


def test_a_save_counts_the_tensors_held_in_tuples_as_in_lists():
    """What a save measures before it writes takes every tensor of the payload, in a tuple as in a list."""
    vector = torch.zeros(1000)
    assert checkpoint._saved_bytes({"a": (vector,)}) == checkpoint._saved_bytes({"a": [vector]}) > (1 << 20) + 4000


def test_a_run_folder_whose_checkpoint_is_a_folder_is_named_as_no_file(tmp_path):
    """A run folder whose checkpoint.pt is itself a folder (a copy gone wrong): it is named as not a
    file, with what else it may be, not as a checkpoint missing."""
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.resolve_path(tmp_path / "run")
    assert str(refused.value).startswith(f"{tmp_path / 'run' / 'checkpoint.pt'} is not a file (a folder, a named pipe, "
                                         f"a device): give a checkpoint file or a run folder"), refused.value
