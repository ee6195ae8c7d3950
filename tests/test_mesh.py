"""Replicas of the two towers on a D x 2 mesh compute the reference's step on the
whole global batch; runs with D = 2 train, log and checkpoint as runs with D = 1."""

import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from launch import data, train, two_gpu
from launch.checkpoint import load_checkpoint
from launch.config import TrainConfig
from launch.mesh import build_mesh, coordinates
from launch.meter import Metrics, ProgressBar
from launch.ranks import run_ranks
from launch.schedule import Progress
from launch.step import paper_optimizer
from towers import FC8_PLACEMENTS, TOWERS, Tower, build_reference, shard_state_dict

from conftest import NO_DROPOUT, TINY, Recorder, Run, launch, plan_of, reference_from_seed

SEED, CLASSES, REPLICAS = 11, 10, 2
GLOBAL_BATCH = 4  # 2 images per replica
TIMEOUT_S = 600  # the bound on a hang: four float64 ranks on two busy cores once took more than 240 s


def test_rank_coordinates_put_a_replicas_towers_side_by_side():
    assert [coordinates(r, TOWERS) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [coordinates(r, 1) for r in range(3)] == [(0, 0), (1, 0), (2, 0)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _fingerprint(state: dict) -> dict:
    return {k: v.double().abs().sum().item() for k, v in state.items()}


def _hybrid_worker(rank, fc8_placement, sgd_steps):
    """Four ranks, two replicas of the towers. Replica 0's ranks also train the float64
    reference on the whole global batch and compare (the reference on every rank would
    need more memory than a small machine has); replica 1's ranks must end with the
    weights of replica 0's."""
    mesh = build_mesh(TOWERS, timeout_s=TIMEOUT_S)
    tower_ranks = [dist.get_global_rank(mesh.tower_group, r) for r in range(TOWERS)]
    replica_ranks = [dist.get_global_rank(mesh.replica_group, r) for r in range(REPLICAS)]
    g = torch.Generator().manual_seed(SEED)
    images = torch.rand(GLOBAL_BATCH, 3, 224, 224, generator=g, dtype=torch.float64) * 255 - 120
    labels = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    share = slice(mesh.replica * GLOBAL_BATCH // REPLICAS, (mesh.replica + 1) * GLOBAL_BATCH // REPLICAS)

    reference = reference_from_seed(CLASSES, SEED, torch.float64)  # drawn once for both placements
    tower = Tower(mesh.tower_group, CLASSES, dropout=0.0, fc8_placement=fc8_placement).double()
    tower.load_state_dict(shard_state_dict(reference.state_dict(), mesh.tower, fc8_placement))
    reference = reference if mesh.replica == 0 else None
    initial = {k: v.clone() for k, v in tower.state_dict().items()}
    trainer = DistributedDataParallel(tower, process_group=mesh.replica_group)
    # the program's optimizer: torch.optim.SGD's arithmetic (tests/test_recipe.py)
    sgd = lambda params: paper_optimizer(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt = sgd(tower.parameters())
    ref_opt = sgd(reference.parameters()) if reference is not None else None
    out = {"tower_ranks": tower_ranks, "replica_ranks": replica_ranks}
    for step in range(sgd_steps):
        logits = trainer(images[share])
        loss = F.cross_entropy(logits, labels[share])  # the mean over this replica's share
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over the replicas holding this half
        if step == 0:
            shares = [torch.empty_like(logits) for _ in range(REPLICAS)]
            dist.all_gather(shares, logits.detach().contiguous(), group=mesh.replica_group)
            whole_loss = loss.detach().clone()
            dist.all_reduce(whole_loss, group=mesh.replica_group)
        if reference is not None:
            ref_logits = reference(images)
            ref_loss = F.cross_entropy(ref_logits, labels)  # the mean over the whole global batch
            ref_opt.zero_grad()
            ref_loss.backward()
            if step == 0:
                ref_grads = shard_state_dict({k: p.grad for k, p in reference.named_parameters()}, mesh.tower,
                                             fc8_placement)
                out.update(logits=_rel(torch.cat(shares), ref_logits), loss=_rel(whole_loss / REPLICAS, ref_loss),
                           grads={k: _rel(p.grad, ref_grads[k]) for k, p in tower.named_parameters()})
            ref_opt.step()
        opt.step()
    out["fingerprint"] = _fingerprint(tower.state_dict())
    if reference is not None:  # each tower against its shard of the reference (tests/test_sharding.py)
        mine = shard_state_dict(reference.state_dict(), mesh.tower, fc8_placement)
        out["weights"] = {k: _rel(v, mine[k]) for k, v in tower.state_dict().items()}
        out["moved"] = min(_rel(v, initial[k]) for k, v in tower.state_dict().items())
    return out


def _both_placements_worker(rank, sgd_steps):
    """Both FC8 placements in one start of the four ranks."""
    return {placement: _hybrid_worker(rank, placement, sgd_steps) for placement in FC8_PLACEMENTS}


@pytest.fixture(scope="module")
def hybrid_results():
    by_rank = run_ranks(_both_placements_worker, (2,), world_size=2 * REPLICAS, timeout_s=TIMEOUT_S)
    return {placement: [r[placement] for r in by_rank] for placement in FC8_PLACEMENTS}


@pytest.mark.slow
@pytest.mark.parametrize("fc8_placement", FC8_PLACEMENTS)
def test_two_replicas_of_the_towers_match_the_reference_on_the_global_batch(hybrid_results, fc8_placement):
    results = hybrid_results[fc8_placement]
    for rank, r in enumerate(results):
        assert r["tower_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1] and r["replica_ranks"] == [rank % 2, rank % 2 + 2]
    for rank, r in enumerate(results[:TOWERS]):  # replica 0, which trained the reference beside its towers
        # float64; the replicas' halves of the batch are summed in another order than the
        # reference's one pass over it, and the towers split conv2/4/5 (tests/test_parity.py):
        # 1e-10 relative for logits and loss is about 1e6 ulps, far above that noise.
        assert r["logits"] < 1e-10 and r["loss"] < 1e-10, f"rank {rank}: {r['logits']:.3g}, {r['loss']:.3g}"
        worst = max(r["grads"], key=r["grads"].get)
        # Gradients: the average of two replicas' means, and more reordered sums: 10x.
        assert r["grads"][worst] < 1e-9, f"rank {rank} gradient of {worst}: {r['grads'][worst]:.3g}"
        names = shard_state_dict(reference_from_seed(CLASSES, SEED).state_dict(), rank, fc8_placement)
        assert set(r["grads"]) == set(names)
        worst = max(r["weights"], key=r["weights"].get)
        assert r["weights"][worst] < 1e-9, f"rank {rank}: weights of {worst} after 2 SGD steps"
        assert r["moved"] > 1e-6, "SGD did not change the weights: the comparison would be vacuous"
        # Replica 1's tower of the same index took exactly the same steps: the averaged gradients are the same.
        assert results[rank + TOWERS]["fingerprint"] == r["fingerprint"]


def _images_lost_worker(rank, root, lost_after):
    """Two replicas, of one rank each, each loading its share of every batch (as machines do from
    their own copies of the data), train an epoch, once for each of ``lost_after``: replica 1's
    images are gone after that many of its batches. (steps taken, the error, the steps saved)
    of each epoch."""
    mesh = build_mesh(1, timeout_s=60)
    bundle = data.open_data(root, cache_dir=root.parent / "cache")
    config = TrainConfig(batch_size=4, epochs=1, lr=0.01, warmup_steps=0, log_every=100)
    plan = plan_of(bundle, 4)
    model = Recorder(len(bundle.classes))
    trainer = DistributedDataParallel(model, process_group=mesh.replica_group)
    optimizer = paper_optimizer(model.parameters(), lr=0.01)
    saved = []  # a checkpoint of this stand-in for the net is not what is tested
    train.save_before_stopping = lambda run_dir, model, optimizer, progress, *rest: saved.append(progress.global_step)
    results = []
    for count in lost_after:
        progress, saved[:], error = Progress(lr=0.01), [], None
        with data.Loader(bundle) as loader:
            if mesh.replica == 1:
                whole = loader.train

                def then_lost(*args, **kwargs):
                    batches = whole(*args, **kwargs)
                    for _ in range(count):
                        yield next(batches)
                    raise data.DataError("no usable image in train/: it is gone")
                loader.train = then_lost
            try:
                train.train_one_epoch(model, optimizer, loader, plan, config, progress, torch.device("cpu"), mesh,
                                      None, Metrics(None), ProgressBar(False), train.InputBytes(), trainer)
            except data.DataError as exc:
                error = str(exc)
        results.append((progress.global_step, error, list(saved)))
    return results


@pytest.mark.slow
def test_a_replica_whose_images_are_lost_stops_every_replica_after_the_same_step(small_bundle):
    """Each replica loads its own share: where only one's images are gone, every replica stops
    after the same step (none of them waits out the timeout for the others' next step, which
    never comes), saves it, and names the replica. Lost at its first batch, no step is taken."""
    assert data.batches_per_epoch(small_bundle, 4) == 5
    by_rank = run_ranks(_images_lost_worker, (small_bundle.root, (0, 2)), world_size=2, timeout_s=TIMEOUT_S)
    error = "no usable image in train/: it is gone (on rank 1, which loads replica 1's images)"
    # Lost after two batches: the second step is taken as its share of the third fails to load.
    assert by_rank == [[(0, error, [0]), (2, error, [2])]] * 2


# ---------------------------------------------------------------- the program with --replicas

def _losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step_loss"] for r in records if r["event"] == "train"], [r for r in records if r["event"] == "eval"]


@pytest.mark.slow
def test_two_replicas_log_the_losses_of_one_and_resume_across_replica_counts(tiny_data, no_dropout_run, tmp_path):
    """One run that changes its replicas twice, against a run with one replica all along: a
    checkpoint holds one net whatever the replicas. Steps 1-3 with two, 4-5 with one, 6-7 with two."""
    one, run = no_dropout_run, tmp_path / "run"
    result = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "run", "--epochs", "1", "--max-steps", "3",
                    "--replicas", "2", *NO_DROPOUT)
    assert "2 replicas of the two towers on 4 ranks (the CPU)" in result.stderr
    launch("--resume", run, "--replicas", "1", "--max-steps", "5", *NO_DROPOUT)
    assert json.loads((run / "summary.json").read_text())["replicas"] == 1
    result = launch("--resume", run, "--replicas", "2", *NO_DROPOUT)
    assert "2 replicas of the two towers on 4 ranks (the CPU)" in result.stderr
    losses_one, evals_one = _losses(one)
    losses, evals = _losses(run)
    # The same 7 batches of 4 in the same order; each replica trains on 2 of each and the
    # towers' gradients are averaged: the whole batch's loss, float32 rounding apart.
    assert len(losses_one) == len(losses) == 7
    assert losses == pytest.approx(losses_one, rel=1e-4)
    assert losses_one[0] != losses_one[-1]  # it trained: the comparison is not of constants
    # The end of the epoch was evaluated by two replicas, each on half of the validation set.
    assert evals[0]["images"] == evals_one[0]["images"] == 10
    assert evals[0]["top1_error"] == evals_one[0]["top1_error"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["centre"]["images"] == 10
    assert summary["input_bytes_per_step"] == 8 + 2 * 3 * 224 * 224 + 2 * 8  # each replica loads 2 of the 4
    # the rate of the run, all replicas' images (the global batch of 4), not one replica's
    assert summary["images_per_s"] == pytest.approx(summary["steps_this_run"] * 4 / summary["train_seconds"], rel=1e-2)
    assert set(load_checkpoint(run)["rng"]) == {"rank0", "rank1", "rank2", "rank3"}
    weights, initial = load_checkpoint(run)["model"], build_reference(CLASSES, seed=0).state_dict()
    for key, value in load_checkpoint(one)["model"].items():
        # Measured against how far training moved each tensor: float32 rounding, amplified by
        # 7 steps of a loss that climbs from 2.3 to 12 (lr 0.001 on raw pixels), left up to
        # 0.75 % of the move (torch 2.14, 2-core CPU), as much as a run with two replicas all
        # along differs from "one". Momentum lost on resume, or a half in the wrong place,
        # moves a tensor by a large part of its whole move.
        moved = (value - initial[key]).double().norm()
        assert moved > 0, key
        assert (weights[key] - value).double().norm() / moved < 0.03, key


@pytest.mark.parametrize("args, message", [
    (["--replicas", "3", "--batch-size", "4"], "--batch-size 4 does not split evenly over 3 replicas: give a batch "
     "size divisible by 3, or give a number of replicas that divides 4 (4, 2 or 1;"),
    (["--replicas", str(10 ** 12), "--batch-size", "128"], f"--replicas {10 ** 12} would start {2 * 10 ** 12} "
     "processes on the "),
    (["--replicas", "0"], "--replicas must be positive, got 0"),
    (["--replicas", "100000"], "--replicas 100000 would start 200000 processes on the "),
])
def test_bad_replica_options_are_refused(tiny_data, tmp_path, caplog, args, message):
    assert two_gpu.main([str(a) for a in ("--data", tiny_data, "--out", tmp_path, "--run-name", "bad", *args)]) == 2
    assert message in caplog.text, caplog.text
    assert not (tmp_path / "bad").exists()


def test_replicas_are_limited_by_the_cores_this_program_may_use(tiny_data, tmp_path, caplog, monkeypatch):
    """On one core of the machine's (taskset, a container's CPU set), not its all: 4 replicas
    of the towers would start 8 processes there."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    args = ("--data", tiny_data, "--out", tmp_path, "--run-name", "bad", "--replicas", "4", "--batch-size", "4")
    assert two_gpu.main([str(a) for a in args]) == 2
    assert "--replicas 4 would start 8 processes on the 1 cores this program may use: use at most 2 here" in caplog.text


@pytest.mark.parametrize("torchrun, args", [
    (None, ["--replicas", "2"]), (None, ["--replicas", "2", "--layout", "single"]),
    (dict(RANK=0, WORLD_SIZE=8, LOCAL_RANK=0, LOCAL_WORLD_SIZE=4), []),  # machine 0 of two: ranks 0 and 2 load
    (dict(RANK=0, WORLD_SIZE=4, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2), ["--layout", "single"]),
    (dict(RANK=0, WORLD_SIZE=6, LOCAL_RANK=0, LOCAL_WORLD_SIZE=3), []),  # ranks 0, 1, 2 here: 0 and 2 load
    (dict(RANK=4, WORLD_SIZE=6, LOCAL_RANK=1, LOCAL_WORLD_SIZE=3), [])])  # ranks 3, 4, 5 here: 4 loads, and...
def test_workers_are_limited_by_the_cores_for_all_ranks_that_load_together(tiny_data, tmp_path, monkeypatch,
                                                                           torchrun, args):
    """Two ranks that load here (the replicas' first towers, or two one-rank replicas), each
    with --workers 3, would start 6 loading processes on one core, where 4 is the most."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    if torchrun:
        for name, value in dict(torchrun, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500).items():
            monkeypatch.setenv(name, str(value))
    batch = ["--batch-size", "6"] if torchrun and torchrun["WORLD_SIZE"] == 6 else []
    options = [str(a) for a in ("--data", tiny_data, "--out", tmp_path, *TINY, *batch, *args)]
    if torchrun and torchrun["RANK"] == 4:  # ... one loader: 3 workers fit, 5 do not
        two_gpu._configure([*options, "--workers", "3"])
        with pytest.raises(ValueError, match="--workers 5 would start that many loading processes for each loading "
                                             "rank on the 1 cores this program may use: give at most 4,"):
            two_gpu._configure([*options, "--workers", "5"])
        return
    with pytest.raises(ValueError) as refused:
        two_gpu._configure([*options, "--workers", "3"])
    assert str(refused.value) == ("--workers 3 would start that many loading processes for each of the 2 ranks that "
                                  "load on this machine, 6 in all, on the 1 cores this program may use: give at most "
                                  "2, or leave --workers out for this machine's default")
    two_gpu._configure([*options, "--workers", "2"])


@pytest.mark.parametrize("workers", ["2", "9"])
def test_too_many_replicas_are_named_before_their_workers(tiny_data, tmp_path, monkeypatch, workers):
    """Fewer workers would not be the fix: 5 replicas of the towers are 10 processes on 2 cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with pytest.raises(ValueError, match="--replicas 5 would start 10 processes on the 2 cores this program may use"):
        two_gpu._configure([str(a) for a in ("--data", tiny_data, "--out", tmp_path, *TINY, "--batch-size", "10",
                                             "--replicas", "5", "--workers", workers)])


def test_too_many_workers_are_told_the_most_for_all_the_ranks_that_load_at_once(tiny_data, tmp_path, monkeypatch):
    """Not first the most for one rank (8 on 2 cores), then, given that, the most for two."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with pytest.raises(ValueError, match="give at most 4, or leave --workers out"):
        two_gpu._configure([str(a) for a in ("--data", tiny_data, "--out", tmp_path, *TINY, "--replicas", "2",
                                             "--workers", "100")])


def test_a_launcher_that_does_not_say_how_many_ranks_a_machine_holds_counts_one_that_loads(tiny_data, tmp_path,
                                                                                           monkeypatch):
    """RANK and WORLD_SIZE without LOCAL_WORLD_SIZE (one process per container, say): not all 8
    replicas' first towers on this machine."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in dict(RANK=3, WORLD_SIZE=16, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500).items():
        monkeypatch.setenv(name, str(value))
    options = [str(a) for a in ("--data", tiny_data, "--out", tmp_path, *TINY, "--batch-size", "8")]
    two_gpu._configure([*options, "--workers", "4"])
    with pytest.raises(ValueError, match="--workers 5 would start that many loading processes for each loading rank"):
        two_gpu._configure([*options, "--workers", "5"])


def test_the_ranks_that_load_are_each_replicas_first_tower():
    from launch.mesh import loading_ranks
    assert [loading_ranks(range(first, first + 3), 2) for first in (0, 3)] == [2, 1]  # ranks 0, 2 | 4
    assert loading_ranks(range(8), 2) == 4 and loading_ranks(range(4, 8), 2) == 2 and loading_ranks(range(5), 1) == 5
    assert loading_ranks(range(3, 4), 2) == 1  # a machine of second towers alone: its rank counts one, as if it loaded


@pytest.mark.parametrize("env, rank, ranks", [
    (dict(LOCAL_RANK=1, LOCAL_WORLD_SIZE=3), 4, range(3, 6)),  # torchrun's second machine of three ranks
    (dict(LOCAL_WORLD_SIZE=2), 0, range(0, 2)),
    (dict(LOCAL_RANK=3), 3, range(3, 4)),  # no count: this rank alone
    ({}, 5, range(5, 6))])
def test_a_machines_ranks_are_those_its_launcher_names(monkeypatch, env, rank, ranks):
    from launch.mesh import machine_ranks
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    assert machine_ranks(rank) == ranks

def test_a_batch_that_does_not_split_is_told_the_fix_that_applies():
    """A resumed run keeps its batch size: only the number of replicas is its to change. An
    evaluation shares out the images, not a training batch: any number of replicas does."""
    from launch.config import TrainConfig
    with pytest.raises(ValueError) as refused:
        TrainConfig(replicas=3, batch_size=4, resume="run").check_batch_split()
    assert str(refused.value) == ("--batch-size 4 does not split evenly over 3 replicas: give a number of replicas "
                                  "that divides 4 (4, 2 or 1; each replica trains on an equal share)")
    TrainConfig(replicas=3, batch_size=128, eval_only="run").check_batch_split()
    with pytest.raises(ValueError, match=r"that divides 128 \(128, 64 or 32;"):  # found without counting to 10 ** 12
        TrainConfig(replicas=10 ** 12, batch_size=128).check_batch_split()
    with pytest.raises(ValueError, match=r"that divides 1 \(1; each replica"):  # the one number that fits, alone
        TrainConfig(replicas=2, batch_size=1).check_batch_split()


def test_a_resumed_run_keeps_its_replicas_unless_given_others(monkeypatch):
    """A plain --resume goes on as the run went: two replicas resumed as one would halve the
    cores used and double each replica's share of the batch, without a word."""
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(two_gpu, "usable_cores", lambda: 2)
    towers = TrainConfig(resume="run")
    assert [two_gpu._replicas(towers, TOWERS, resumed) for resumed in (None, 1, 2)] == [1, 1, 2]
    assert two_gpu._replicas(TrainConfig(), TOWERS) == 1
    assert [two_gpu._replicas(TrainConfig(resume="run", replicas=given), TOWERS, 2) for given in (1, 3)] == [1, 3]
    with pytest.raises(ValueError, match="^--replicas 5 would start 10 processes on the 2 cores this program may use: "
                                         "use at most 4 here, or torchrun across machines$"):
        two_gpu._replicas(towers, TOWERS, 5)  # the resumed run's, on a smaller machine


@pytest.mark.parametrize("world_size, args, message", [
    (6, [], "--batch-size 4 does not split evenly over the 3 replicas of torchrun's 6 ranks: give a batch size "
     "divisible by 3, or start torchrun with ranks for a number of replicas that divides 4 (8, 4 or 2 ranks: "
     "--nproc-per-node times --nnodes, 2 per replica; each replica trains on an equal share)"),
    (3, ["--layout", "single"], "over the 3 replicas of torchrun's 3 ranks: give a batch size divisible by 3, or "
     "start torchrun with ranks for a number of replicas that divides 4 (4, 2 or 1 ranks: --nproc-per-node times "
     "--nnodes, 1 per replica;"),
    # --replicas disagreeing with torchrun's ranks is named before a batch split over it
    (4, ["--replicas", "3"], "--replicas 3 needs 6 ranks and torchrun gave 4 ranks: drop --replicas under torchrun"),
    (4, ["--replicas", "0"], "--replicas must be positive, got 0"),
    # ranks that make no whole replicas of the towers, named before a batch split over them
    (3, [], "torchrun gave 3 ranks and --layout towers needs 2 per replica: use an even --nproc-per-node (and "
     "--nnodes)"),
    # where no torchrun agent set TORCHELASTIC_RUN_ID, the variables may be another program's
    (1, [], "torchrun gave 1 rank and --layout towers needs 2 per replica: use an even --nproc-per-node (and "
     "--nnodes) (if no launcher started this one, RANK and WORLD_SIZE=1 are left over from another program: unset "
     "them, and this program starts its own ranks)"),
])
def test_a_batch_that_does_not_split_under_torchrun_is_told_torchruns_fix(tiny_data, tmp_path, monkeypatch,
                                                                        world_size, args, message):
    """Under torchrun the ranks make the replicas: --replicas is refused there, so it is not the fix."""
    for name, value in dict(RANK=0, WORLD_SIZE=world_size, LOCAL_RANK=0, LOCAL_WORLD_SIZE=world_size,
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=29500).items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(ValueError) as refused:
        two_gpu._configure([str(a) for a in ("--data", tiny_data, "--out", tmp_path, *TINY, *args)])
    assert message in str(refused.value)


@pytest.mark.slow
def test_a_killed_rank_of_another_replica_ends_the_run_naming_it(tiny_data, tmp_path):
    """A hung rank is found as with one replica (tests/test_faults.py): every group has the timeout."""
    run = Run("--data", tiny_data, "--out", tmp_path, "--run-name", "run", "--epochs", "50", "--replicas", "2",
              "--timeout", "10", *TINY, "--log-every", "1", run_dir=tmp_path / "run")
    run.wait_for_step(1)
    os.kill(run.ranks(count=4)[3], signal.SIGKILL)  # tower 1 of replica 1, away from rank 0 that writes
    assert run.wait(timeout_s=90) == 1
    assert "rank 3 failed: killed by SIGKILL" in run.stderr(), run.stderr()[-3000:]
    deadline = time.monotonic() + 10
    while run.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not run.leftovers(), f"processes left behind: {run.leftovers()}"


def _an_epoch_and_its_evaluation(bundle, mesh, metrics, replicated: bool):
    """An epoch of a Recorder trained and evaluated, as train_one_epoch and evaluate do in the
    program (through DDP over the replicas where ``replicated``): its training images, its
    evaluation's images, its step records, the evaluation and the weights it ends with."""
    config = TrainConfig(batch_size=4, seed=5, epochs=2, lr=0.5, warmup_steps=0, log_every=1)
    model = Recorder(len(bundle.classes))
    trainer = DistributedDataParallel(model, process_group=mesh.replica_group) if replicated else model
    optimizer = paper_optimizer(model.parameters(), lr=config.lr, weight_decay=0.0)
    with data.Loader(bundle) as loader:
        train.train_one_epoch(model, optimizer, loader, plan_of(bundle, 4), config, Progress(epoch=1, lr=config.lr),
                              torch.device("cpu"), mesh, None, Metrics(metrics), ProgressBar(False),
                              train.InputBytes(), trainer)
        trained, model.seen = model.seen, []
        result = train.evaluate(model, loader, plan_of(bundle, 4), 4, torch.device("cpu"), mesh)
    return trained, model.seen, _train_records(metrics), result, model.bias.detach()


def _replica_of_one_rank_worker(rank, root, metrics_dir):
    """One of two replicas of one rank each (the towers apart, a replica's share as it is given out)."""
    bundle = data.open_data(root, cache_dir=root.parent / "cache")
    return _an_epoch_and_its_evaluation(bundle, build_mesh(1, timeout_s=60), metrics_dir / f"rank{rank}.jsonl",
                                        replicated=True)


def _train_records(metrics) -> list:
    return [{k: r[k] for k in ("step", "loss", "step_loss", "top1", "lr")}
            for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "train"]


@pytest.mark.slow
def test_two_replicas_train_and_evaluate_the_images_of_one_and_log_its_numbers(small_bundle, mesh_of_one, tmp_path):
    """Each replica gets its own half of every batch, cut and augmented where the single run cuts
    and augments it (not the first half twice, nor another position's augmentation), and every
    second validation image; their step lines carry the whole batch's loss and top-1 (summed over
    the replicas, divided by the whole batch), the evaluation the whole set's counts, and the
    averaged gradients take the single run's steps."""
    by_rank = run_ranks(_replica_of_one_rank_worker, (small_bundle.root, tmp_path), world_size=2, timeout_s=TIMEOUT_S)
    trained, seen, records, result, bias = _an_epoch_and_its_evaluation(small_bundle, mesh_of_one,
                                                                        tmp_path / "one.jsonl", replicated=False)
    assert len(trained) == 5
    for step, whole in enumerate(trained):
        assert torch.equal(torch.cat([r[0][step] for r in by_rank]), whole), step
    evaluated = torch.cat(seen)
    assert len(evaluated) == 10
    for replica, r in enumerate(by_rank):  # every second image, from the replica's own
        assert torch.equal(torch.cat(r[1]), evaluated[replica::2]), replica
    assert len(records) == 5 and any(r["top1"] > 0 for r in records)  # some hits: the top-1 is compared
    for r in by_rank:
        assert [rec["step"] for rec in r[2]] == [rec["step"] for rec in records]
        for mine, single in zip(r[2], records):
            assert mine == pytest.approx(single, rel=1e-5), mine["step"]
        assert r[3] == result
        torch.testing.assert_close(r[4], bias, rtol=1e-5, atol=1e-6)
