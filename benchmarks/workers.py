"""The ranks' side of a benchmark: build one mode's model, time ``train_step``, count traffic.

Each worker is a module-level function for :func:`launch.ranks.run_ranks`: it gets a
plain dict (the run's spec, see ``benchmarks.run.run_spec``) and returns a plain dict.
Every mode builds its model up front and hands it to the same timing loop around
:func:`launch.step.train_step`. Single-device modes run as one rank, so that every
run is a fresh process and its peak memory is its own.

Weights come from files the parent wrote once per run (the reference built from the
seed, and each tower's shard of it via ``towers.shard_state_dict``), loaded into a
model made on the meta device: a rank's peak memory is then what training needs, not
what building the whole reference in float64 once needed.
"""

from contextlib import nullcontext
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from launch.mesh import build_mesh
from launch.meter import peak_memory
from launch.step import AUTOCAST, paper_optimizer, train_step
from towers import TOWERS, AlexNet, Tower, build_reference, compile_blocks, shard_state_dict
from towers.reference import INPUT_SIZE

NUM_CLASSES = 1000
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


# The paper's optimizer at a rate that keeps the loss finite while the same batch of
# random labels is trained on again and again (at 0.01 the raw-pixel inputs make
# torchvision's AlexNet diverge within five steps); the arithmetic timed is the same.
LR = 1e-4


def synthetic_batch(batch: int, seed: int, device: torch.device, memory_format: str):
    """N x 3 x 224 x 224 float32 images at raw-pixel scale (0..255 less a mean of 120)
    and random labels, drawn on the CPU so every rank gets the identical batch."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=generator) * 255 - 120
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return images.to(device, memory_format=MEMORY_FORMATS[memory_format]), labels.to(device)


def _device(spec: dict, rank: int) -> torch.device:
    if spec["device"] != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", rank if spec["backend"] == "nccl" else 0)  # over gloo, the ranks share GPU 0


def _share(images: torch.Tensor, labels: torch.Tensor, index: int, shares: int, memory_format: str) -> tuple:
    """Share ``index`` of ``shares`` equal parts of the global batch, as a rank of a data-parallel mode gets it."""
    size = len(labels) // shares
    mine = slice(index * size, (index + 1) * size)
    return images[mine].clone(memory_format=MEMORY_FORMATS[memory_format]), labels[mine].clone()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start(spec: dict, rank: int) -> tuple:
    torch.manual_seed(spec["seed"])  # same dropout stream on every rank
    device = _device(spec, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # starts CUDA: a gloo rank has not yet, and its allocator has no statistics before
        torch.cuda.reset_peak_memory_stats(device)
    return device, peak_memory(torch.device("cpu"))[0]


def _load(build, state_path: str, device: torch.device, memory_format: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = build()
    model.load_state_dict(torch.load(state_path, map_location=device, weights_only=True), assign=True)
    return model.to(memory_format=MEMORY_FORMATS[memory_format])


def _run_steps(model, optimizer, images, labels, spec: dict, steps: int, counter=None, context=nullcontext):
    """``steps`` calls of train_step. Returns each step's wall seconds and, if ``counter``
    (a running total of seconds) is given, how much of each step it accrued."""
    autocast_dtype = AUTOCAST[spec["precision"]]
    step_s, counted_s, loss = [], [], None
    for _ in range(steps):
        before = counter() if counter else 0.0
        _synchronize(images.device)
        started = time.perf_counter()
        with context():
            loss = train_step(model, optimizer, images, labels, autocast_dtype=autocast_dtype).loss
        _synchronize(images.device)
        step_s.append(time.perf_counter() - started)
        counted_s.append(counter() - before if counter else 0.0)
    return step_s, counted_s, None if loss is None else loss.item()


def _exchange_steps(model, optimizer, images, labels, spec: dict, exchange_log, context=nullcontext) -> tuple:
    """(step seconds, exchange seconds) of ``spec["steps"]`` steps of their own that time the
    exchanges where they need the device waited for before and after each collective
    (``spec["exchange_steps"]``, a GPU's; ExchangeLog.synchronize): in the steps whose time is
    reported, those waits would stall the queue of kernels (NCCL's collectives are queued on
    the device; gloo's on a GPU wait for it anyway), which no other mode has. Else (None,
    None): the CPU's collectives block, and the timed steps time them as they are."""
    if not spec["exchange_steps"]:
        return None, None
    exchange_log.synchronize = True
    try:
        step_s, exchange_s, _ = _run_steps(model, optimizer, images, labels, spec, spec["steps"],
                                           counter=lambda: exchange_log.seconds, context=context)
    finally:
        exchange_log.synchronize = False
    return step_s, exchange_s


def _finish(model, device: torch.device, rss_at_start: int, loss: float) -> dict:
    peak, kind = peak_memory(device)
    return {
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "threads": torch.get_num_threads(),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_memory_bytes": peak, "memory_kind": kind, "rss_at_start_bytes": rss_at_start,
        "final_loss": loss,
    }


class WeightsNotWritten(OSError):
    """The weights could not be written (a full disk); the message names the fix."""


def weights_worker(rank: int, seed: int, fc8_placement: str, folder: str) -> dict:
    """Builds the reference from ``seed`` and saves it and both towers' shards of it.
    Runs in a process of its own so that the harness's process stays small."""
    reference = build_reference(seed=seed).state_dict()
    paths = {"reference_path": f"{folder}/reference.pt", "shard_paths": [f"{folder}/tower{r}.pt" for r in range(TOWERS)]}
    _save(reference, paths["reference_path"], reference, folder)
    for tower_rank, path in enumerate(paths["shard_paths"]):  # one shard at a time in memory
        _save(shard_state_dict(reference, tower_rank, fc8_placement), path, reference, folder)
    return paths


def _save(tensors: dict, path: str, reference: dict, folder: str) -> None:
    """torch.save, whose failure to write (a full disk) raises WeightsNotWritten naming the fix."""
    try:
        torch.save(tensors, path)
    except (OSError, RuntimeError) as exc:  # torch's writer does not say why a write failed
        size = 2 * sum(t.numel() * t.element_size() for t in reference.values())
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the write failed"
        raise WeightsNotWritten(f"cannot write the reference's weights and its towers' shards ({size / 1e6:.0f} MB) "
                                f"in the temporary folder {folder} ({cause}): free space on that disk, or set TMPDIR "
                                f"to a folder with room") from None


def single_worker(rank: int, spec: dict) -> dict:
    """``single``: the reference on one device; ``torchvision``: torchvision's AlexNet (its own init)."""
    device, rss_at_start = _start(spec, rank)
    if spec["mode"] == "torchvision":
        import torchvision  # slow to import: only in the rank that needs it
        model = torchvision.models.alexnet(num_classes=NUM_CLASSES).to(device, memory_format=MEMORY_FORMATS[spec["memory_format"]])
    else:
        model = _load(lambda: AlexNet(NUM_CLASSES), spec["reference_path"], device, spec["memory_format"])
    if spec["compiled"]:
        compile_blocks(model, backend=spec["compile_backend"])
    optimizer = paper_optimizer(model.parameters(), lr=LR)
    images, labels = synthetic_batch(spec["batch"], spec["seed"], device, spec["memory_format"])
    _run_steps(model, optimizer, images, labels, spec, spec["warmup"])
    step_s, _, loss = _run_steps(model, optimizer, images, labels, spec, spec["steps"])
    return {"step_s": step_s, **_finish(model, device, rss_at_start, loss)}


def towers_worker(rank: int, spec: dict) -> dict:
    """One tower; both towers get the whole global batch. Exchange time and bytes come
    from the tower's ExchangeLog, reset after the warm-up (and, on a GPU, the time from
    steps of their own: _exchange_steps)."""
    device, rss_at_start = _start(spec, rank)
    group = dist.group.WORLD
    tower = _load(lambda: Tower(group, NUM_CLASSES, fc8_placement=spec["fc8_placement"]),
                  spec["shard_paths"][rank], device, spec["memory_format"])
    exchange_log = tower.exchange_log
    if spec["compiled"]:  # block by block: the exchanges stay between the graphs, timed and counted as ever
        compile_blocks(tower, backend=spec["compile_backend"])
    optimizer = paper_optimizer(tower.parameters(), lr=LR)
    images, labels = synthetic_batch(spec["batch"], spec["seed"], device, spec["memory_format"])
    _run_steps(tower, optimizer, images, labels, spec, spec["warmup"])
    exchange_log.reset()
    step_s, exchange_s, loss = _run_steps(tower, optimizer, images, labels, spec, spec["steps"],
                                          counter=lambda: exchange_log.seconds)
    exchanges, sent_bytes, received_bytes = exchange_log.as_dict(), exchange_log.sent_bytes, exchange_log.received_bytes
    # on a GPU, compute is a waited-for step less its exchanges, both from the steps that time them
    waited_s, waited_exchange_s = _exchange_steps(tower, optimizer, images, labels, spec, exchange_log)
    return {
        "step_s": step_s, "comm_s": waited_exchange_s or exchange_s, "comm_step_s": waited_s or step_s,
        "sent_bytes": sent_bytes, "received_bytes": received_bytes,
        "calls": sum(e["calls"] for e in exchanges.values()), "exchanges": exchanges,
        **_finish(tower, device, rss_at_start, loss),
    }


class AllReduceCounter:
    """State of :func:`counting_allreduce_hook`: the bytes this rank handed to all-reduce over
    ``group``, and how many buckets its latest step had (its first step's are DDP's first
    guess, which it rebuilds after that step in the order the gradients became ready)."""

    def __init__(self, group=None):
        self.payload_bytes, self.buckets, self.group = 0, 0, group


def counting_allreduce_hook(counter: AllReduceCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce, counting each bucket's bytes on the way."""
    buffer = bucket.buffer()
    counter.payload_bytes += buffer.numel() * buffer.element_size()
    if bucket.is_last():
        counter.buckets = bucket.index() + 1
    return default_hooks.allreduce_hook(counter.group, bucket)


def ddp_worker(rank: int, spec: dict) -> dict:
    """The reference under DistributedDataParallel, each rank on its half of the global batch.

    Timed twice: normal steps (gradients all-reduced, bytes counted by the hook), then
    the same number of steps under ``no_sync()`` (compute only, nothing all-reduced).
    """
    device, rss_at_start = _start(spec, rank)
    reference = _load(lambda: AlexNet(NUM_CLASSES), spec["reference_path"], device, spec["memory_format"])
    model = DistributedDataParallel(reference, device_ids=[device.index] if device.type == "cuda" else None)
    counter = AllReduceCounter()
    model.register_comm_hook(counter, counting_allreduce_hook)
    optimizer = paper_optimizer(model.parameters(), lr=LR)
    images, labels = synthetic_batch(spec["batch"], spec["seed"], device, spec["memory_format"])
    images, labels = _share(images, labels, rank, dist.get_world_size(), spec["memory_format"])
    _run_steps(model, optimizer, images, labels, spec, spec["warmup"])
    counter.payload_bytes = counter.buckets = 0
    step_s, _, loss = _run_steps(model, optimizer, images, labels, spec, spec["steps"])
    payload_bytes, buckets = counter.payload_bytes, counter.buckets
    _run_steps(model, optimizer, images, labels, spec, min(spec["warmup"], 1), context=model.no_sync)
    compute_s, _, _ = _run_steps(model, optimizer, images, labels, spec, spec["steps"], context=model.no_sync)
    finished = _finish(reference, device, rss_at_start, loss)  # before the buffer below adds to the peak
    return {
        "step_s": step_s, "compute_only_s": compute_s, "allreduce_alone_s": _time_allreduce(reference, spec["steps"]),
        "payload_bytes": payload_bytes, "buckets": buckets, **finished,
    }


def hybrid_worker(rank: int, spec: dict) -> dict:
    """One tower of D replicas of the towers (a D x 2 mesh, ``launch.mesh``), as the
    training program runs them: the tower's exchanges on its replica's tower group, its
    gradients averaged over the replica group by DistributedDataParallel, each replica
    on its D-th of the global batch. Timed like ``ddp``: normal steps (exchange time
    from the ExchangeLog, all-reduce bytes from the hook), then steps under ``no_sync()``
    (compute and exchanges, nothing all-reduced), then, on a GPU, steps under ``no_sync()``
    that time the exchanges (_exchange_steps), then the all-reduce alone."""
    device, rss_at_start = _start(spec, rank)
    mesh = build_mesh(TOWERS, timeout_s=spec["collective_timeout_s"])
    tower = _load(lambda: Tower(mesh.tower_group, NUM_CLASSES, fc8_placement=spec["fc8_placement"]),
                  spec["shard_paths"][mesh.tower], device, spec["memory_format"])
    exchange_log = tower.exchange_log
    model = DistributedDataParallel(tower, device_ids=[device.index] if device.type == "cuda" else None,
                                    process_group=mesh.replica_group)
    counter = AllReduceCounter(mesh.replica_group)
    model.register_comm_hook(counter, counting_allreduce_hook)
    optimizer = paper_optimizer(model.parameters(), lr=LR)
    images, labels = synthetic_batch(spec["batch"], spec["seed"], device, spec["memory_format"])
    images, labels = _share(images, labels, mesh.replica, mesh.replicas, spec["memory_format"])
    _run_steps(model, optimizer, images, labels, spec, spec["warmup"])
    exchange_log.reset()
    counter.payload_bytes = counter.buckets = 0
    step_s, exchange_s, loss = _run_steps(model, optimizer, images, labels, spec, spec["steps"],
                                          counter=lambda: exchange_log.seconds)
    payload_bytes, buckets, sent_bytes = counter.payload_bytes, counter.buckets, exchange_log.sent_bytes
    _run_steps(model, optimizer, images, labels, spec, min(spec["warmup"], 1), context=model.no_sync)
    compute_s, _, _ = _run_steps(model, optimizer, images, labels, spec, spec["steps"], context=model.no_sync)
    _, waited_exchange_s = _exchange_steps(model, optimizer, images, labels, spec, exchange_log, model.no_sync)
    finished = _finish(tower, device, rss_at_start, loss)
    return {
        "step_s": step_s, "comm_s": waited_exchange_s or exchange_s, "compute_only_s": compute_s,
        "allreduce_alone_s": _time_allreduce(tower, spec["steps"], mesh.replica_group),
        "payload_bytes": payload_bytes, "buckets": buckets, "sent_bytes": sent_bytes, "replicas": mesh.replicas,
        "tower": mesh.tower, **finished,
    }


def _time_allreduce(model: torch.nn.Module, repeats: int, group=None) -> list:
    """Seconds of one all-reduce over ``group`` of a buffer as large as all the gradients, with nothing else running."""
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=next(model.parameters()).device)
    dist.all_reduce(flat, group=group)  # warm-up: the first call sets up the transport
    seconds = []
    for _ in range(repeats):
        _synchronize(flat.device)
        started = time.perf_counter()
        dist.all_reduce(flat, group=group)
        _synchronize(flat.device)
        seconds.append(time.perf_counter() - started)
    return seconds


WORKERS = {"single": single_worker, "torchvision": single_worker, "towers": towers_worker, "ddp": ddp_worker,
           "hybrid": hybrid_worker}
