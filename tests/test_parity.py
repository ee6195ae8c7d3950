"""The two towers compute the reference's function: logits, loss, every gradient,
the weights after SGD steps, and exactly the expected traffic between them; for the
paper's net and for each variant the towers hold (no LRN, non-overlapping pooling, tanh).

Two real processes over gloo run every case, one after the other. Inside each rank
the reference is built from the same seed, so both sides start from identical weights
and see identical inputs; the rank returns error magnitudes and the parent asserts.
"""

import ast
import contextlib
import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.ranks import run_ranks
from launch.step import paper_optimizer
from towers import (Architecture, ExchangeLog, FC8_PLACEMENTS, LocalResponseNorm, Tower, build_reference,
                    compile_blocks, init_weights, shard_state_dict)
from towers.exchange import broadcast_from_first, gather_channels, gather_replicated, gather_to_first, sum_gradients
from towers.sharding import half_of

from conftest import ROOT, reference_from_seed

pytestmark = pytest.mark.slow  # two real processes

SEED, BATCH, CLASSES = 7, 2, 1000
TIMEOUT_S = 240  # bound on one case in the two processes; a failure never hangs the suite


def _inputs(dtype):
    g = torch.Generator().manual_seed(SEED + 1)
    # Raw-pixel scale (0-255 minus a mean), as the network sees it in training.
    images = (torch.rand(BATCH, 3, 224, 224, generator=g, dtype=torch.float64) * 255 - 120).to(dtype)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return images, labels


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _parity_worker(rank, fc8_placement, dtype, sgd_steps, autocast=False, device="cpu", architecture=Architecture(),
                   compile_backend=None, memory_format=torch.contiguous_format):
    """``compile_backend``: the tower's blocks go through torch.compile with this backend
    (towers.compile_blocks); the reference stays eager. ``memory_format``: of the images and
    of both nets' convolution weights."""
    torch.manual_seed(SEED)
    if device == "cuda":  # the arithmetic of the CPU: no TF32, no bf16 partial sums (tests/test_gpu.py)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    group = torch.distributed.group.WORLD
    reference = reference_from_seed(CLASSES, SEED, dtype, device, architecture)
    tower = Tower(group, CLASSES, dropout=0.0, fc8_placement=fc8_placement, architecture=architecture).to(dtype)
    tower.load_state_dict(shard_state_dict(reference.state_dict(), rank, fc8_placement))
    tower.to(device, memory_format=memory_format)
    reference.to(memory_format=memory_format)
    if compile_backend:
        from torch._dynamo.utils import counters  # imported only here: the compiler takes a second to import
        graphs_before = counters["stats"]["unique_graphs"]
        compile_blocks(tower, backend=compile_backend)
    initial = {k: v.clone() for k, v in tower.state_dict().items()} if sgd_steps else None
    images, labels = (t.to(device) for t in _inputs(dtype))
    images = images.contiguous(memory_format=memory_format)

    if autocast:  # the reference in float32 first: bf16's own error, the scale of the split's on a GPU
        exact_logits = reference(images)
        (exact_loss := F.cross_entropy(exact_logits, labels)).backward()
        exact = {k: p.grad.clone() for k, p in reference.named_parameters()}
        reference.zero_grad(set_to_none=True)
    compute = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with compute:
        ref_logits = reference(images)
        ref_loss = F.cross_entropy(ref_logits.float(), labels)
        logits = tower(images)
        loss = F.cross_entropy(logits.float(), labels)
    ref_loss.backward()
    loss.backward()

    ref_grads = shard_state_dict({k: p.grad for k, p in reference.named_parameters()}, rank, fc8_placement)
    grad_errors = {k: _rel(p.grad, ref_grads[k]) for k, p in tower.named_parameters()}
    assert set(ref_grads) == set(grad_errors), "tower and shard of the reference hold different parameters"
    out = {
        "logits": _rel(logits, ref_logits), "loss": _rel(loss, ref_loss),
        "grads": grad_errors, "exchanges": tower.exchange_log.as_dict(),
        "grad_norm": min(p.grad.norm().item() for p in tower.parameters()),
    }
    if autocast:
        exact = shard_state_dict(exact, rank, fc8_placement)
        out["bf16_error"] = {"logits": _rel(ref_logits, exact_logits), "loss": _rel(ref_loss, exact_loss),
                             "grads": {k: _rel(g, exact[k]) for k, g in ref_grads.items()}}
    if sgd_steps:
        # the program's optimizer on both sides: torch.optim.SGD's arithmetic (tests/test_recipe.py)
        ref_opt, opt = (paper_optimizer(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                        for m in (reference, tower))
        for step in range(sgd_steps):
            if step:  # step 0 reuses the gradients computed above
                for model, optimizer in ((reference, ref_opt), (tower, opt)):
                    optimizer.zero_grad()
                    F.cross_entropy(model(images), labels).backward()
            ref_opt.step()
            opt.step()
        # each tower against its shard of the reference (tests/test_sharding.py: the shards make the whole)
        mine = shard_state_dict(reference.state_dict(), rank, fc8_placement)
        out["weights"] = {k: _rel(v, mine[k]) for k, v in tower.state_dict().items()}
        out["moved"] = min(_rel(v, initial[k]) for k, v in tower.state_dict().items())
    if compile_backend:  # one graph per block, none recompiled by the SGD steps, no break inside a block
        out["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs_before
        out["graph_breaks"] = sum(counters["graph_break"].values())
    return out


# Tolerances: float64 runs the same sums in a different order (the towers split
# conv2/4/5 per tower, concatenations reorder nothing else): 1e-10 relative is
# about 1e6 ulps, far above reordering noise. float32: 1e-5 relative.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


VARIANTS = {"no-lrn": Architecture(lrn=False), "non-overlapping": Architecture(pooling="non-overlapping"),
            "tanh": Architecture(activation="tanh")}


def _case(fc8_placement, dtype, autocast=False, architecture=Architecture(), compile_backend=None,
          memory_format=torch.contiguous_format, sgd_steps=None) -> tuple:
    """_parity_worker's arguments after the rank; float64 adds two SGD steps unless told (the
    second adds the momentum the first left)."""
    if sgd_steps is None:
        sgd_steps = 2 if dtype == torch.float64 else 0
    return (fc8_placement, dtype, sgd_steps, autocast, "cpu", architecture, compile_backend, memory_format)


CASES = [_case(placement, dtype) for placement in ("tower0", "split") for dtype in (torch.float64, torch.float32)]
CASES += [_case("tower0", torch.float32, autocast=True)]
# The variants: one SGD step, the update from the gradients compared (several steps: the paper's net above).
CASES += [_case("tower0", torch.float64, architecture=architecture, sgd_steps=1) for architecture in VARIANTS.values()]
# torch.compile's tracing and autograd without code generation (aot_eager): the kernels are eager's,
# so the float64 tolerance holds. tests/test_gpu.py compiles with the default backend, inductor.
COMPILED = _case("tower0", torch.float64, compile_backend="aot_eager")
CASES += [COMPILED]
# channels_last: the convolutions' gradients arrive at the backward exchanges in another memory layout
CHANNELS_LAST = _case("tower0", torch.float32, memory_format=torch.channels_last)
CASES += [CHANNELS_LAST]


def _cases_worker(rank, cases):
    return [_parity_worker(rank, *case) for case in cases]


@pytest.fixture(scope="module")
def parity():
    """Every case's results (per rank), from one start of the two processes: a start costs
    seconds of imports and set-up, more than most cases' arithmetic."""
    by_rank = run_ranks(_cases_worker, (CASES,), timeout_s=TIMEOUT_S * len(CASES))
    return {case: [ranks[i] for ranks in by_rank] for i, case in enumerate(CASES)}


def _assert_parity(results, tol, sgd_steps):
    for rank, r in enumerate(results):
        assert r["logits"] < tol, f"rank {rank} logits"
        assert r["loss"] < tol, f"rank {rank} loss"
        worst = max(r["grads"], key=r["grads"].get)
        # Gradients pass through more reordered sums than the logits: allow 10x.
        assert r["grads"][worst] < 10 * tol, f"rank {rank} gradient of {worst}: {r['grads'][worst]:.3g}"
        assert r["grad_norm"] > 0, "a parameter got no gradient: the comparison would be vacuous"
        if sgd_steps:
            worst = max(r["weights"], key=r["weights"].get)
            assert r["weights"][worst] < 10 * tol, f"weights of {worst} after {sgd_steps} SGD steps"
            assert r["moved"] > 1e-6, "SGD steps did not change the weights: the comparison would be vacuous"


@pytest.mark.parametrize("fc8_placement", ["tower0", "split"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_forward_backward_and_sgd_match_reference(parity, fc8_placement, dtype):
    case = _case(fc8_placement, dtype)
    results = parity[case]
    _assert_parity(results, TOLERANCES[dtype], sgd_steps=case[2])
    assert "fc8.weight" in results[0]["grads"]
    assert ("fc8.weight" in results[1]["grads"]) == (fc8_placement == "split")


def _expected_exchanges(rank, fc8_placement):
    """Per call, the shape this tower sends and receives, by exchange and direction
    (numbers written out from the paper's Figure 2 for BATCH images)."""
    n = BATCH
    both = {
        "conv3_input": (n, 128, 13, 13),  # each tower's pooled conv2 maps
        "fc6_input": (n, 128 * 6 * 6),  # each tower's pooled conv5 maps, flattened
        "fc7_input": (n, 2048),
    }
    sent = {(name, d): shape for name, shape in both.items() for d in ("forward", "backward")}
    received = dict(sent)
    if fc8_placement == "split":
        sent[("fc8_input", "forward")] = received[("fc8_input", "forward")] = (n, 2048)
        sent[("fc8_input", "backward")] = received[("fc8_input", "backward")] = (n, 2048)
        sent[("logits", "forward")] = received[("logits", "forward")] = (n, CLASSES // 2)
    elif rank == 0:  # FC8 whole on tower 0
        received[("fc8_input", "forward")] = (n, 2048)
        sent[("fc8_input", "backward")] = (n, 2048)
        sent[("logits", "forward")] = (n, CLASSES)
    else:
        sent[("fc8_input", "forward")] = (n, 2048)
        received[("fc8_input", "backward")] = (n, 2048)
        received[("logits", "forward")] = (n, CLASSES)
    return sent, received


@pytest.mark.parametrize("fc8_placement", ["tower0", "split"])
def test_exchanges_are_exactly_the_papers(parity, fc8_placement):
    results = parity[_case(fc8_placement, torch.float32)]  # one forward and one backward
    numel = lambda shape: torch.Size(shape).numel()
    for rank, r in enumerate(results):
        sent, received = _expected_exchanges(rank, fc8_placement)
        log = r["exchanges"]
        assert set(log) == {f"{n}/{d}" for n, d in set(sent) | set(received)}, f"rank {rank} exchanged elsewhere"
        for key in set(sent) | set(received):
            entry = log["/".join(key)]
            assert entry["calls"] == 1, f"{key} called {entry['calls']} times in one step"
            assert entry["sent_bytes"] == 4 * numel(sent.get(key, ())) * (key in sent), key
            assert entry["received_bytes"] == 4 * numel(received.get(key, ())) * (key in received), key
            assert entry["shapes"] == ([tuple(sent[key])] if key in sent else []), key


def test_towers_under_bf16_autocast_match_the_reference(parity):
    """float32 weights, bf16 autocast, as a GPU run with --precision bf16 computes."""
    results = parity[_case("tower0", torch.float32, autocast=True)]
    for rank, r in enumerate(results):
        # Both sides round every convolution and matmul input to bf16 (8 significant bits:
        # a relative step of 2^-8 = 0.4 %). Forward, the roundings fall in the same places
        # (measured: logits and loss equal); backward, the towers' gradients are summed in
        # another order (the reduce-scatter adds halves rounded separately), and the errors
        # grow along the chain: measured up to 1e-2 relative (conv1). Tolerances: 1e-3 for
        # logits and loss (one bf16 step would exceed it), 4e-2 for gradients.
        assert r["logits"] < 1e-3 and r["loss"] < 1e-3, f"rank {rank}: logits {r['logits']:.3g}, loss {r['loss']:.3g}"
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] < 4e-2, f"rank {rank} gradient of {worst}: {r['grads'][worst]:.3g}"
        # and less than bf16's own error, the reference's against float32 (measured: 5 to 50 times less)
        for key, error in r["grads"].items():
            assert error <= r["bf16_error"]["grads"][key], (rank, key, error, r["bf16_error"]["grads"][key])
        # conv3's input crosses in bf16: half the bytes of float32
        assert r["exchanges"]["conv3_input/forward"]["sent_bytes"] == 2 * BATCH * 128 * 13 * 13


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_of_the_towers_matches_its_reference(parity, variant):
    """Each tower honours the variant: float64, an SGD step, the tolerances above."""
    results = parity[_case("tower0", torch.float64, architecture=VARIANTS[variant], sgd_steps=1)]
    _assert_parity(results, TOLERANCES[torch.float64], sgd_steps=1)


def test_the_towers_compiled_block_by_block_match_the_reference(parity):
    """towers.compile_blocks: each run of layers between two exchanges one graph; the exchanges
    run as written between them, so the traffic is the eager towers'."""
    results, eager = parity[COMPILED], parity[_case("tower0", torch.float64)]
    _assert_parity(results, TOLERANCES[torch.float64], sgd_steps=2)
    traffic = lambda log: {k: (e["calls"], e["sent_bytes"], e["received_bytes"], e["shapes"]) for k, e in log.items()}
    for rank, r in enumerate(results):
        assert r["compiled_graphs"] == len(Tower.BLOCKS) and r["graph_breaks"] == 0, (rank, r["compiled_graphs"])
        assert traffic(r["exchanges"]) == traffic(eager[rank]["exchanges"]), rank


def test_the_towers_in_channels_last_match_the_reference(parity):
    """Images and convolution weights in channels_last (NHWC), as the benchmark's memory-format
    sweep runs them: conv3's input gradient then reaches the backward exchange in NHWC, and the
    reduce-scatter must hand the collective contiguous buffers whatever the layout."""
    _assert_parity(parity[CHANNELS_LAST], TOLERANCES[torch.float32], sgd_steps=0)


class _Recorded(torch.nn.Dropout):
    """A tower's dropout, keeping what it kept of each input (the output is 0 where the input
    is, kept or not), and the share it dropped of the units it had a value for."""

    def __init__(self, p: float):
        super().__init__(p)
        self.kept, self.dropped = [], []

    def forward(self, x):
        out = super().forward(x)
        self.kept.append((out != 0).to(x.dtype))
        self.dropped.append((out[x != 0] == 0).double().mean().item())
        return out


class _Replayed(torch.nn.Module):
    """The reference's dropout, keeping the units that ``masks`` keep, in turn (FC6's, then FC7's)."""

    def __init__(self, p: float, masks: list):
        super().__init__()
        self.p, self.masks = p, list(masks)

    def forward(self, x):
        return x * self.masks.pop(0) / (1 - self.p)


def _dropout_worker(rank, p, architecture):
    """The towers training with dropout ``p``, each drawing its masks from its own stream, and
    the reference given the units they kept: the same function, on the reference's whole layers."""
    torch.manual_seed(SEED + rank)
    reference = reference_from_seed(CLASSES, SEED, torch.float64, architecture=architecture)
    tower = Tower(torch.distributed.group.WORLD, CLASSES, dropout=p, architecture=architecture).to(torch.float64)
    tower.load_state_dict(shard_state_dict(reference.state_dict(), rank, "tower0"))
    built = type(tower.dropout) is torch.nn.Dropout and tower.dropout.p == p  # the module recorded in its place
    tower.dropout = _Recorded(p)
    images, labels = _inputs(torch.float64)
    logits = tower(images)
    F.cross_entropy(logits, labels).backward()
    masks, alike = [], []
    for layer, kept in zip(("fc6", "fc7"), tower.dropout.kept):  # each tower's units, at their places in the layer
        features = torch.arange(reference.get_parameter(f"{layer}.bias").numel(), dtype=torch.float64)
        units = [torch.empty(features.numel() // 2, dtype=torch.float64) for _ in range(2)]
        dist.all_gather(units, shard_state_dict({**reference.state_dict(), f"{layer}.bias": features}, rank,
                                                "tower0")[f"{layer}.bias"])
        halves = [torch.empty_like(kept) for _ in range(2)]
        dist.all_gather(halves, kept)
        alike.append(torch.equal(*halves))
        whole = torch.empty(kept.shape[0], features.numel(), dtype=torch.float64)
        for half, where in zip(halves, units):
            whole[:, where.long()] = half
        masks.append(whole)
    reference.dropout = _Replayed(p, masks)
    ref_logits = reference(images)
    ref_loss = F.cross_entropy(ref_logits, labels)
    ref_loss.backward()
    ref_grads = shard_state_dict({k: q.grad for k, q in reference.named_parameters()}, rank, "tower0")
    return {"logits": _rel(logits, ref_logits), "grads": {k: _rel(q.grad, ref_grads[k]) for k, q in
                                                          tower.named_parameters()},
            "built": built, "dropped": tower.dropout.dropped, "replayed": not reference.dropout.masks, "alike": alike}


def _dropout_cases(rank, p):
    return [_dropout_worker(rank, p, Architecture(activation=activation)) for activation in ("relu", "tanh")]


def test_the_towers_dropout_is_the_references_given_the_same_units():
    """Dropout after FC6 and FC7, as section 4.2 has it: each tower drops units of its own half of
    the layer, scales the rest by 1 / (1 - p), and the exchange carries what it kept. Given the
    units the towers kept, the reference computes the same logits and gradients (float64). With
    ReLU and with tanh, after which dropout placed before the nonlinearity would differ."""
    by_rank = run_ranks(_dropout_cases, (0.5,), timeout_s=2 * TIMEOUT_S)
    for rank, cases in enumerate(by_rank):
        for activation, r in zip(("relu", "tanh"), cases):
            where = f"rank {rank}, {activation}"
            assert r["logits"] < TOLERANCES[torch.float64], f"{where}: logits"
            worst = max(r["grads"], key=r["grads"].get)
            assert r["grads"][worst] < 10 * TOLERANCES[torch.float64], f"{where}: gradient of {worst}"
            assert r["built"] and r["replayed"], f"{where}: the tower's dropout is not nn.Dropout(0.5), or the " \
                                                 f"reference did not take both layers' masks"
            # half the units that have a value dropped by each layer on each tower (about 3,200 of the 2 x 2048
            # after ReLU, all of them after tanh): within 0.05 of 0.5, more than 5.5 sigma
            assert len(r["dropped"]) == 2 and all(abs(share - 0.5) < 0.05 for share in r["dropped"]), where
            if activation == "tanh":  # after ReLU, the units kept show each tower's own zeros too: not the masks
                assert r["alike"] == [False, False], f"{where}: both towers dropped the same units of their halves"


def _library_worker(rank, fc8_placement):
    """The towers as a user's own script uses them: built with the default group, loaded with
    the reference's halves, given images that require grad, an empty batch, a second derivative,
    FC8 trained alone (the layers before it frozen), activation checkpointing, copied by
    copy.deepcopy (as EMA and SWA copy); given the other tower's half, or a group it is not in."""
    torch.manual_seed(SEED)
    tower = Tower(None, 10, dropout=0.0, fc8_placement=fc8_placement).double()  # None: the default group
    drawn_after = torch.rand(4)  # the same on both ranks: building a tower leaves the stream as it was
    reference = build_reference(10, seed=SEED, dropout=0.0, init="scaled").double()
    before = copy.deepcopy(tower.state_dict())
    try:  # the files of the two towers' halves swapped: refused, and nothing of them copied
        tower.load_state_dict(shard_state_dict(reference.state_dict(), 1 - rank, fc8_placement), strict=False)
        other_half = "loaded"
    except RuntimeError as exc:
        other_half = str(exc) if all(torch.equal(v, before[k]) for k, v in tower.state_dict().items()) else "copied"
    refused = {}  # the whole net's state_dict, and a half sharded for the other FC8 placement: named, nothing copied
    other = "split" if fc8_placement == "tower0" else "tower0"
    for name, state in (("whole", reference.state_dict()), ("placement", shard_state_dict(reference.state_dict(), rank,
                                                                                         other))):
        try:
            tower.load_state_dict(state)
            refused[name] = "loaded"
        except RuntimeError as exc:
            refused[name] = str(exc) if all(torch.equal(v, before[k]) for k, v in tower.state_dict().items()) \
                else "copied"
    try:
        Tower(None, 10.0)  # on both towers alike, though tower 1 may build no FC8 of that many neurons
    except TypeError as exc:
        refused["classes"] = str(exc)
    # its own half unnamed (a plain dict, rebuilt key by key as a rank that receives it does): loaded as given
    tower.load_state_dict(dict(shard_state_dict(reference.state_dict(), rank, fc8_placement)))
    saved = io.BytesIO()
    torch.save(tower.state_dict(), saved)  # the tower's own state_dict, through a file, names its half
    own_half = half_of(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    rank_0_only = dist.new_group([0])  # called on both ranks; rank 1 is not in it
    try:
        Tower(rank_0_only, 10)
    except ValueError as exc:
        group_refused = str(exc)
    images, labels = _inputs(torch.float64)
    labels = labels % 10
    dropped = copy.deepcopy(tower)
    dropped.dropout = torch.nn.Identity()  # dropout taken out by hand: a setting the towers compare, as the others
    refused["settings"] = [dropped.settings(images)["dropout"], tower.settings(torch.tensor(1.0))["batch size"]]
    grads = []
    for net in (tower, reference):
        x = images.clone().requires_grad_()
        F.cross_entropy(net(x), labels).backward()
        grads.append(x.grad)
    x = images.clone().requires_grad_()
    (first,) = torch.autograd.grad(tower(x).square().sum(), x, create_graph=True)
    try:
        first.sum().backward()
        second = "computed"
    except RuntimeError as exc:
        second = str(exc)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # which leaves float64 as it is
        autocast_float64 = _rel(tower(images), reference(images))
    try:
        init_weights(tower, SEED)
        init = "drawn"
    except ValueError as exc:
        init = str(exc)
    input_exchange = tower.exchange_log.as_dict()["input/backward"]  # of the passes above
    fc8_grads = []
    for net in (tower, reference):  # a new classifier for frozen features: tower 1 holds none of it
        net.zero_grad()
        for name, parameter in net.named_parameters():
            parameter.requires_grad_(name.startswith("fc8"))
        F.cross_entropy(net(images), labels).backward()  # on both towers, as every step's
        fc8_grads.append(dict(net.named_parameters())["fc8.weight"].grad if hasattr(net, "fc8") and
                         hasattr(net.fc8, "weight") else None)
    tower.requires_grad_(True)
    reference.requires_grad_(True)
    fc8_only = "no FC8 here" if fc8_grads[0] is None else _rel(fc8_grads[0], reference.fc8.weight.grad[
        slice(None) if fc8_placement == "tower0" else slice(rank * 5, rank * 5 + 5)])
    # Activation checkpointing as the README says it works: reentrant (given images that require
    # grad, as torch's reentrant checkpoint needs), and non-reentrant with FC8 split
    checkpointed = {}
    for reentrant in (True, False) if fc8_placement == "split" else (True,):
        for net in (tower, reference):
            net.zero_grad()
        x = images.clone().requires_grad_()
        F.cross_entropy(torch.utils.checkpoint.checkpoint(tower, x, use_reentrant=reentrant), labels).backward()
        F.cross_entropy(reference(images), labels).backward()
        expected = shard_state_dict({k: p.grad for k, p in reference.named_parameters()}, rank, fc8_placement)
        checkpointed[reentrant] = max(_rel(p.grad, expected[k]) for k, p in tower.named_parameters())
    clone = copy.deepcopy(tower)  # the group shared, everything else copied
    same = torch.equal(clone(images), tower(images))
    with torch.no_grad():
        clone.fc6.weight.zero_()
    own_weights = not torch.equal(clone(images), tower(images)) and tower.fc6.weight.any().item()
    compile_blocks(tower, backend="eager")
    compiled_clone = copy.deepcopy(tower)  # runs uncompiled: compiled blocks would use the original's weights
    with torch.no_grad():
        compiled_clone.fc7.weight.zero_()
    compiled_own = not torch.equal(compiled_clone(images), tower(images))
    bad_images = []
    for x in (images[0], images[:, :, :256 - 60, :]):  # one image, not a batch; a size FC6 cannot take
        try:
            tower(x)
        except ValueError as exc:
            bad_images.append(str(exc))
    return {"bad_images": bad_images, "other_half": other_half, "own_half": own_half, "group_refused": group_refused,
            "refused": refused,
            "fc8_only": fc8_only, "checkpointed": checkpointed, "copy": (same, own_weights, compiled_own), "drawn_after": drawn_after, "autocast_float64": autocast_float64, "input_grad": _rel(*grads), "empty": tuple(tower(images[:0]).shape),
            "second": second, "init": init, "input_exchange": input_exchange}


def _library_cases(rank, placements):
    return [_library_worker(rank, placement) for placement in placements]


def test_a_users_own_script_gets_the_references_function():
    placements = ("tower0", "split")
    by_rank = run_ranks(_library_cases, (placements,), timeout_s=TIMEOUT_S)
    for placement, ranks in zip(placements, zip(*by_rank)):  # (rank 0's, rank 1's) per placement
        _assert_library_use(placement, ranks)


def _assert_library_use(placement, ranks):
    assert torch.equal(ranks[0]["drawn_after"], ranks[1]["drawn_after"]), placement
    assert "exactly 2 ranks, got 1" in ranks[0]["group_refused"]
    assert "this rank is not in the process group given" in ranks[1]["group_refused"]
    for rank, r in enumerate(ranks):
        assert (f"it holds tower {1 - rank}'s half of the net, and this is tower {rank}: load each tower its own half"
                in r["other_half"]), (placement, rank, r["other_half"])
        assert r["own_half"] == rank
        fix = "(shard_state_dict(state, tower.tower_rank, tower.fc8_placement), or the state_dict that tower saved)"
        assert r["refused"]["whole"].endswith(f"it holds the whole net (conv1's 96 kernels), and a tower holds half "
                                              f"of it: load each tower its own half {fix}"), r["refused"]
        rows = {"tower0": 10 if rank == 0 else 0, "split": 5}[placement]
        given = 5 if placement == "tower0" else 10 if rank == 0 else 0  # none in tower 1's half of FC8 on tower 0
        assert r["refused"]["placement"].endswith(
            f"it holds {given} of FC8's neurons, and this tower holds {rows} (fc8_placement={placement!r}, 10 "
            f"classes): load it a half sharded with its placement, of a net of its classes {fix}"
            f"{'; or, for its features alone, strict=False' if given == 0 else ''}"), r["refused"]
        assert r["refused"]["classes"] == "num_classes must be a whole number, got 10.0"
        assert r["refused"]["settings"] == ["Identity()", None]
        assert r["input_grad"] < 1e-12, f"{placement}, rank {rank}: the images' gradient is not the whole net's"
        assert r["empty"] == (0, 10)
        assert r["autocast_float64"] < 1e-12, placement  # float64 under bf16 autocast: float64, as the reference
        assert "marked with @once_differentiable" in r["second"], r["second"]  # refused, never silently zero
        assert "a Tower holds half of one" in r["init"]
        # two backward passes through the images (the second derivative's first): an all-reduce of them each
        assert r["input_exchange"]["calls"] == 2
        assert r["input_exchange"]["sent_bytes"] == 2 * BATCH * 3 * 224 * 224 * 8
        if placement == "tower0" and rank == 1:
            assert r["fc8_only"] == "no FC8 here"  # and its backward ran: it raised before, with no graph
        else:
            assert r["fc8_only"] < 1e-12, (placement, rank)
        assert r["copy"] == (True, True, True), (placement, rank)  # same function, own weights, compiled too
        assert list(r["checkpointed"]) == ([True, False] if placement == "split" else [True])
        assert r["bad_images"] == ["the net takes a batch of images, N x 3 x H x W; got a tensor of shape "
                                   "(3, 224, 224) (one image: give it as a batch of one, x[None])",
                                   "images of 196 x 224 pixels pool to conv5 maps of 5 x 6, not the 6 x 6 that FC6 "
                                   "takes: give 224 x 224 images, the paper's crops"], r["bad_images"]
        assert max(r["checkpointed"].values()) < 1e-12, (placement, rank, r["checkpointed"])


def _second_derivatives_through_each_exchange(rank):
    """Per exchange, on its own: a second derivative of its output's squares, refused or computed."""
    group, log, said = dist.group.WORLD, ExchangeLog(), {}
    exchanges = {through.__name__: through for through in (gather_channels, gather_to_first, gather_replicated,
                                                            sum_gradients)}
    # tower 0's N x K, tower 1's N x 0 placeholder
    exchanges["broadcast_from_first"] = lambda x, *named: broadcast_from_first(x if rank == 0 else x[:, :0], 3, *named)
    for name, through in exchanges.items():
        x = torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3).requires_grad_()
        (first,) = torch.autograd.grad(through(x, group, log, "x").square().sum(), x, create_graph=True)
        try:
            first.sum().backward()
            said[name] = "computed"
        except RuntimeError as exc:
            said[name] = "refused" if "marked with @once_differentiable" in str(exc) else str(exc)
    return said


def test_each_exchange_refuses_a_second_derivative_through_it_on_its_own():
    """Every exchange's backward is once_differentiable by itself, not only where another exchange
    of the net lies on the same path: a second derivative through the images' all-reduce alone
    came out without the other tower's term, silently."""
    refused = {name: "refused" for name in ("gather_channels", "gather_to_first", "gather_replicated", "sum_gradients",
                                            "broadcast_from_first")}
    assert run_ranks(_second_derivatives_through_each_exchange, timeout_s=TIMEOUT_S) == [refused, refused]


def _exchanges_in_a_log_put_in_place(rank):
    counted = {}
    for placement in FC8_PLACEMENTS:
        tower = Tower(None, num_classes=10, dropout=0.0, fc8_placement=placement)
        built_with = tower.exchange_log
        tower.exchange_log = ExchangeLog(synchronize=True)
        F.cross_entropy(tower(torch.zeros(2, 3, 224, 224)), torch.tensor([0, 1])).backward()
        counted[placement] = (len(built_with.stats), sorted({name for name, _ in tower.exchange_log.stats}))
    return counted


def test_an_exchange_log_put_in_a_towers_place_counts_every_exchange():
    """FC8's exchanges too, where a log held by a module of FC8's own would be the first one."""
    for counted in run_ranks(_exchanges_in_a_log_put_in_place, timeout_s=TIMEOUT_S):
        for placement in FC8_PLACEMENTS:
            assert counted[placement] == (0, ["conv3_input", "fc6_input", "fc7_input", "fc8_input", "logits"])


# Towers built or run unlike, rank 1 the odd one: (what to build with, how to run, the setting named).
UNLIKE = {
    "classes": ({"num_classes": 12}, {}, "num_classes (12 here)"),
    "placement": ({"fc8_placement": "split"}, {}, "fc8_placement (split here)"),
    "architecture": ({"architecture": Architecture(lrn=False)}, {}, "architecture (Architecture(net='two-tower', "
                                                                    "lrn=False"),
    "batch": ({}, {"batch": 3}, "batch size (3 here)"),
    "mode": ({}, {"eval": True}, "mode (eval here)"),
    "no_grad": ({}, {"no_grad": True}, "gradients (off here)"),
    # fine-tuning: the convolutions frozen on both, FC6 and FC7 on one only (its backward stopped short)
    "frozen": ({}, {"frozen": "conv1 conv2 conv3 conv4 conv5 fc6 fc7"}, "backward stops at (fc8 here)"),
    # the same under no_grad on both, as torch's reentrant checkpointing runs the first forward
    "frozen, no gradients": ({}, {"frozen": "conv1 conv2 conv3 conv4 conv5 fc6 fc7"}, "backward stops at (fc8 here)"),
    # FC8 split, trained on tower 0 alone (the layers before it frozen on both): tower 1 would skip FC8's backward
    "frozen, FC8 split": ({}, {"frozen": "conv1 conv2 conv3 conv4 conv5 fc6 fc7 fc8"},
                          "backward stops at (the logits here)"),
    "dtype": ({}, {"dtype": torch.float64}, "images' dtype (torch.float64 here)"),
    # other images, as where each rank draws its augmentation from its own stream
    "images": ({}, {"fill": 1.0}, "images (CRC-32 "),
    # dropout of another p on one tower: the same function nowhere, and no collective to fail
    "dropout": ({"dropout": 0.3}, {}, "dropout (0.3 here)"),
    # one tower's weights in float64 (a .double() on one rank only): its conv1 refused its images alone
    "weights": ({}, {"weights": torch.float64}, "weights' dtype (torch.float64 here)"),
    # one tower under autocast: it sent bf16 to a gather of float32
    "autocast": ({}, {"autocast": torch.bfloat16}, "autocast (torch.bfloat16 here)"),
    # images that one tower's layers cannot take (the other's can): refused on both, not on one while
    # the other waits in the check's collective
    "image size": ({}, {"height": 196}, "image shape ((3, 196, 224) here)"),
}
# rank 1's differ in type only
ALIKE = {"alike": ({}, {}), "alike, numpy's integer": ({"num_classes": np.int64(10)}, {})}


def _unlike_worker(rank):
    said = {}
    for case, (built, run, *_) in {**UNLIKE, **ALIKE}.items():
        built, run = (built, run) if rank == 1 else ({}, {})
        split = {"fc8_placement": "split"} if "FC8 split" in case else {}
        tower = Tower(None, **{"num_classes": 10, "dropout": 0.0, **split, **built})
        if run.get("eval"):
            tower.eval()
        tower.to(run.get("weights", torch.float32))
        frozen_on_0 = {"frozen": "conv1 conv2 conv3 conv4 conv5",
                       "frozen, FC8 split": "conv1 conv2 conv3 conv4 conv5 fc6 fc7"}
        for name in run.get("frozen", frozen_on_0.get(case, "")).split():
            getattr(tower, name).requires_grad_(False)
        images = torch.full((run.get("batch", 2), 3, run.get("height", 224), 224), run.get("fill", 0.0),
                            dtype=run.get("dtype", torch.float32))
        try:
            no_grad = run.get("no_grad") or case == "frozen, no gradients"
            compute = torch.autocast("cpu", dtype=run["autocast"]) if "autocast" in run else contextlib.nullcontext()
            with torch.no_grad() if no_grad else contextlib.nullcontext(), compute:
                said[case] = tuple(tower(images).shape)
        except ValueError as exc:
            said[case] = str(exc)
    return said


def _frozen_unlike_but_joining_the_same_backward(rank):
    """Layers frozen on one tower only, where the exchanges' backward runs on both all the same."""
    done = []
    for placement, frozen in (("tower0", "conv1"), ("split", "fc8"), ("split", "conv3 conv4"),
                              ("split", "conv1 conv2 conv3 conv4 conv5 images")):  # every exchange for the images
        tower = Tower(None, num_classes=10, dropout=0.0, fc8_placement=placement)
        for name in frozen.split()[:5] if rank == 1 else ():
            getattr(tower, name).requires_grad_(False)
        images = torch.zeros(2, 3, 224, 224, requires_grad=frozen.endswith("images"))
        F.cross_entropy(tower(images), torch.tensor([0, 1])).backward()
        done.append(tower.fc7.weight.grad is not None)
    return done


def _checks_of_the_peer(rank):
    """Three training steps, the last on a batch of another size: how many times the tower checked its peer."""
    tower = Tower(None, num_classes=10, dropout=0.0)
    checked, settings = [], tower.settings
    tower.settings = lambda x: checked.append(x.shape[0]) or settings(x)
    for batch in (2, 2, 3):
        F.cross_entropy(tower(torch.zeros(batch, 3, 224, 224)), torch.zeros(batch, dtype=torch.long)).backward()
    return checked


def test_the_towers_check_each_other_at_the_first_forward_only():
    """The check of the peer (a CRC-32 of the images and an all-gather) runs once, at the first
    forward, as documented: not again at every step of a run."""
    assert run_ranks(_checks_of_the_peer, timeout_s=TIMEOUT_S) == [[2], [2]]


def test_towers_frozen_unlike_where_their_backward_is_alike_run():
    assert run_ranks(_frozen_unlike_but_joining_the_same_backward, timeout_s=TIMEOUT_S) == [[True] * 4] * 2


def test_towers_built_or_run_unlike_are_refused_on_both_naming_the_difference():
    """Without the check: a SIGABRT inside gloo (batch, dtype, classes), a wait for the
    timeout (placement, one tower without gradients), or another function without a word."""
    by_rank = run_ranks(_unlike_worker, timeout_s=TIMEOUT_S)
    for rank, said in enumerate(by_rank):
        assert [said[case] for case in ALIKE] == [(2, 10)] * len(ALIKE)
        for case, (_, _, named) in UNLIKE.items():
            assert said[case].startswith(f"tower {rank}: the two towers differ in "), (case, said[case])
            assert said[case].endswith(": build both with the same arguments, and run both alike on the same images")
            if rank == 1:
                assert named in said[case], (case, said[case])


def test_the_readmes_script_runs_and_its_towers_compute_the_references_loss(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The towers in your own code", 1)[1]
    script = tmp_path / "towers_script.py"
    script.write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    per_rank = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert len(per_rank) == 2
    for towers_loss, reference_loss in per_rank:
        assert towers_loss == pytest.approx(reference_loss, rel=1e-5)  # float32: sums in another order


class _Float32LRN(torch.nn.Module):
    """The paper's LRN handing on float32 under autocast, as CUDA's autocast does (it computes the
    power in float32); the CPU's hands on bfloat16."""

    def __init__(self):
        super().__init__()
        self.lrn = LocalResponseNorm(groups=1)

    def forward(self, x):
        return self.lrn(x.float())


def _conv3_input_bytes_from_a_float32_lrn(rank):
    tower = Tower(None, 10, dropout=0.0)
    tower.lrn2 = _Float32LRN()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tower(torch.zeros(BATCH, 3, 224, 224))
    return tower.exchange_log.as_dict()["conv3_input/forward"]["sent_bytes"]


def test_conv3s_input_crosses_in_the_autocast_dtype_where_lrn_hands_on_float32():
    """Under autocast, conv3 computes in bfloat16 whatever LRN2 hands on: its input is cast before the
    exchange, which moves half the bytes of float32."""
    assert run_ranks(_conv3_input_bytes_from_a_float32_lrn, timeout_s=TIMEOUT_S) == [2 * BATCH * 128 * 13 * 13] * 2


def _features_loaded_without_fc8(rank):
    """Per placement: a tower given its half of the reference's conv1-FC7 alone (strict=False, as
    for a new classifier on pretrained features): (its features are the reference's, its FC8 is as
    built, the keys said missing)."""
    state = reference_from_seed(10, SEED).state_dict()
    loaded = {}
    for placement in FC8_PLACEMENTS:
        tower = Tower(None, 10, dropout=0.0, fc8_placement=placement)
        features = {k: v for k, v in shard_state_dict(state, rank, placement).items() if not k.startswith("fc8.")}
        built = {k: v.clone() for k, v in tower.state_dict().items() if k.startswith("fc8.")}
        missing = tower.load_state_dict(features, strict=False).missing_keys
        now = tower.state_dict()
        loaded[placement] = (all(torch.equal(now[k], v) for k, v in features.items()),
                             all(torch.equal(now[k], v) for k, v in built.items()), sorted(missing))
        # within a module of the user's, loaded not strict: the same
        wrapper = torch.nn.ModuleDict({"tower": Tower(None, 10, dropout=0.0, fc8_placement=placement)})
        missing = wrapper.load_state_dict({f"tower.{k}": v for k, v in features.items()}, strict=False).missing_keys
        assert sorted(missing) == [f"tower.{k}" for k in loaded[placement][2]], (placement, missing)
        assert all(torch.equal(wrapper["tower"].state_dict()[k], v) for k, v in features.items())
    return loaded


def test_a_tower_loads_its_half_of_the_features_alone_leaving_its_fc8_as_built():
    """Not strict, a half without FC8 loads into a tower that holds FC8 (whole or half): the
    features are copied and FC8 is left as it was, named missing, as torch's loading does."""
    for rank, loaded in enumerate(run_ranks(_features_loaded_without_fc8, timeout_s=TIMEOUT_S)):
        for placement in FC8_PLACEMENTS:
            holds_fc8 = placement == "split" or rank == 0
            assert loaded[placement] == (True, True, ["fc8.bias", "fc8.weight"] if holds_fc8 else []), \
                (rank, placement, loaded[placement])
