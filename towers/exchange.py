"""The places where the two towers talk, as autograd-aware collectives.

Three layers, as in Megatron-LM's mappings: private collective helpers, one
``torch.autograd.Function`` per exchange (forward and backward collective
described in its docstring), and public snake_case wrappers. Each takes the
process group explicitly and works on NCCL and gloo alike. The backward passes run
their collectives outside autograd: a second derivative through an exchange is
refused (``once_differentiable``) rather than silently zero.

Shape legend: N images, C channels (or features) one tower holds, K classes.
Every wrapper records what it moved in an :class:`ExchangeLog`.
"""

from collections import defaultdict
from dataclasses import dataclass, field
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .reference import TOWERS


@dataclass
class TransferStats:
    calls: int = 0
    sent_elements: int = 0
    received_elements: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    seconds: float = 0.0  # wall time inside the collective (see ExchangeLog.synchronize)
    shapes: set = field(default_factory=set)  # per-call shape of what this tower sent


class ExchangeLog:
    """Counts one tower's traffic to the other, per exchange and direction.

    Keys are ``(name, direction)`` with direction "forward" or "backward".
    Only bytes that cross to the other tower count (never a tower's copy to itself).
    Time is measured around each collective; on a GPU it means something only with
    ``synchronize=True``, which waits for the device before and after (benchmarks only:
    it serialises the stream).
    """

    def __init__(self, synchronize: bool = False):
        self.stats = defaultdict(TransferStats)
        self.synchronize = synchronize

    def clock(self, like: torch.Tensor) -> float:
        if self.synchronize and like.is_cuda:
            torch.cuda.synchronize(like.device)
        return time.perf_counter()

    def record(self, name: str, direction: str, sent: Optional[torch.Tensor], received: Optional[torch.Tensor],
               started: float) -> None:
        like = sent if sent is not None else received
        s = self.stats[(name, direction)]
        s.seconds += self.clock(like) - started
        s.calls += 1
        if sent is not None:
            s.sent_elements += sent.numel()
            s.sent_bytes += sent.numel() * sent.element_size()
            s.shapes.add(tuple(sent.shape))
        if received is not None:
            s.received_elements += received.numel()
            s.received_bytes += received.numel() * received.element_size()

    def reset(self) -> None:
        self.stats.clear()

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stats.values())

    @property
    def sent_bytes(self) -> int:
        return sum(s.sent_bytes for s in self.stats.values())

    @property
    def received_bytes(self) -> int:
        return sum(s.received_bytes for s in self.stats.values())

    def as_dict(self) -> dict:
        return {
            f"{name}/{direction}": {
                "calls": s.calls,
                "sent_bytes": s.sent_bytes,
                "received_bytes": s.received_bytes,
                "sent_elements": s.sent_elements,
                "received_elements": s.received_elements,
                "seconds": s.seconds,
                "shapes": sorted(s.shapes),
            }
            for (name, direction), s in sorted(self.stats.items())
        }


# ---------------------------------------------------------------- collective helpers

def _all_gather_stacked(x: torch.Tensor, group) -> torch.Tensor:
    """2 x (shape of x): both towers' tensors, tower 0's first."""
    stacked = x.new_empty((TOWERS, *x.shape))
    if dist.get_backend(group) == dist.Backend.NCCL:
        dist.all_gather_into_tensor(stacked, x.contiguous(), group=group)
    else:  # gloo: the list form is supported by every release
        dist.all_gather(list(stacked.unbind(0)), x.contiguous(), group=group)
    return stacked


def _reduce_scatter_pair(halves: torch.Tensor, group) -> torch.Tensor:
    """``halves`` is 2 x (shard shape), this tower's contribution to both shards;
    returns the sum over both towers of the shard this tower owns.
    On two ranks a reduce-scatter is one all-to-all and an add; the all-to-all
    form runs on gloo releases that lack ``reduce_scatter_tensor``. Both buffers are
    contiguous: a collective reads and writes memory in order, whatever the strides
    (a gradient from a channels_last convolution has others)."""
    halves = halves.contiguous()
    received = torch.empty_like(halves)
    dist.all_to_all_single(received, halves, group=group)
    return received.sum(dim=0)


def _one_way(x: torch.Tensor, group, receiver: int) -> torch.Tensor:
    """Moves the sender's N x ... ``x`` to tower ``receiver``, which passes a tensor of the
    same shape and gets it back filled; the sender gets an empty tensor.

    One all_to_all_single with uneven splits rather than send/recv: gloo runs the
    collectives on CUDA tensors (staging them through host memory) but not send/recv,
    and two towers sharing one GPU must talk over gloo."""
    rows, me = x.shape[0], dist.get_rank(group)
    nothing = [0] * TOWERS
    from_other = list(nothing)
    from_other[1 - me] = rows
    if me == receiver:
        received = torch.empty_like(x)
        dist.all_to_all_single(received, x.new_empty((0, *x.shape[1:])), from_other, nothing, group=group)
        return received
    dist.all_to_all_single(x.new_empty((0, *x.shape[1:])), x, nothing, from_other, group=group)
    return x.new_empty((0, *x.shape[1:]))


def _cat_stacked(stacked: torch.Tensor) -> torch.Tensor:
    """2 x N x C x ... -> N x 2C x ... (tower 0's channels first)."""
    return stacked.movedim(0, 1).reshape(stacked.shape[1], TOWERS * stacked.shape[2], *stacked.shape[3:])


def _gather_cat(x: torch.Tensor, group, exchange_log: "ExchangeLog", name: str) -> torch.Tensor:
    """N x C x ... on each tower -> N x 2C x ... on both, logged as a forward exchange."""
    started = exchange_log.clock(x)
    stacked = _all_gather_stacked(x, group)
    exchange_log.record(name, "forward", sent=x, received=x, started=started)
    return _cat_stacked(stacked)


def _split_channels(x: torch.Tensor) -> torch.Tensor:
    """N x 2C x ... -> 2 x N x C x ..."""
    return torch.stack(x.chunk(TOWERS, dim=1))


# ---------------------------------------------------------------- autograd functions

class _GatherChannels(torch.autograd.Function):
    """Forward: all-gather, N x C x ... from each tower -> N x 2C x ... on both.
    Backward: reduce-scatter, N x 2C x ... on each tower -> N x C x ..., the sum of both
    towers' gradients for this tower's C channels (both towers' next layers read them)."""

    @staticmethod
    def forward(ctx, x, group, exchange_log, name):
        ctx.group, ctx.exchange_log, ctx.name = group, exchange_log, name
        return _gather_cat(x, group, exchange_log, name)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        halves = _split_channels(grad)
        started = ctx.exchange_log.clock(grad)
        own = _reduce_scatter_pair(halves, ctx.group)
        theirs = halves[1 - dist.get_rank(ctx.group)]
        ctx.exchange_log.record(ctx.name, "backward", sent=theirs, received=own, started=started)
        return own, None, None, None


class _GatherToFirst(torch.autograd.Function):
    """Forward: tower 1 sends N x C to tower 0, which returns N x 2C; tower 1 returns N x 0,
    a placeholder that keeps its backward in the graph.
    Backward: tower 0 sends the gradient of tower 1's C columns back; only tower 0 read them."""

    @staticmethod
    def forward(ctx, x, group, exchange_log, name):
        ctx.group, ctx.exchange_log, ctx.name = group, exchange_log, name
        x = x.contiguous()
        ctx.shard_shape = x.shape
        started = exchange_log.clock(x)
        if dist.get_rank(group) == 0:
            theirs = _one_way(x, group, receiver=0)
            exchange_log.record(name, "forward", sent=None, received=theirs, started=started)
            return torch.cat([x, theirs], dim=1)
        _one_way(x, group, receiver=0)
        exchange_log.record(name, "forward", sent=x, received=None, started=started)
        return x.new_empty((x.shape[0], 0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        started = ctx.exchange_log.clock(grad)
        if dist.get_rank(ctx.group) == 0:
            own, theirs = grad.chunk(TOWERS, dim=1)
            theirs = theirs.contiguous()
            _one_way(theirs, ctx.group, receiver=1)
            ctx.exchange_log.record(ctx.name, "backward", sent=theirs, received=None, started=started)
            return own, None, None, None
        own = _one_way(grad.new_empty(ctx.shard_shape), ctx.group, receiver=1)
        ctx.exchange_log.record(ctx.name, "backward", sent=None, received=own, started=started)
        return own, None, None, None


class _BroadcastFromFirst(torch.autograd.Function):
    """Forward: tower 0's N x K logits are sent to tower 1, which passes the N x 0
    placeholder of ``_GatherToFirst`` as ``y``. Both return N x K.
    Backward: nothing moves. The loss is computed identically on both towers, so
    tower 0's gradient is already complete and tower 1's copy is dropped."""

    @staticmethod
    def forward(ctx, y, num_classes, group, exchange_log, name):
        ctx.is_first, ctx.placeholder_shape = dist.get_rank(group) == 0, y.shape
        out = y.contiguous().clone() if ctx.is_first else y.new_empty((y.shape[0], num_classes))
        started = exchange_log.clock(out)
        dist.broadcast(out, src=dist.get_global_rank(group, 0), group=group)
        exchange_log.record(name, "forward", sent=out if ctx.is_first else None, received=None if ctx.is_first else out,
                   started=started)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.is_first:
            return grad, None, None, None, None
        return grad.new_zeros(ctx.placeholder_shape), None, None, None, None


class _GatherReplicated(torch.autograd.Function):
    """Forward: all-gather, N x K/2 from each tower -> N x K on both.
    Backward: nothing moves; each tower keeps the gradient of its own K/2 columns.
    For outputs that feed a computation replicated on both towers (the loss), where
    each tower's own gradient is already the whole gradient."""

    @staticmethod
    def forward(ctx, x, group, exchange_log, name):
        ctx.rank = dist.get_rank(group)
        return _gather_cat(x, group, exchange_log, name)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return grad.chunk(TOWERS, dim=1)[ctx.rank].contiguous(), None, None, None


class _SumGradients(torch.autograd.Function):
    """Forward: nothing moves; ``x`` is a tensor both towers hold the same copy of (the images).
    Backward: all-reduce, the sum of both towers' gradients of ``x``: each tower's own covers
    only the half of the net it holds."""

    @staticmethod
    def forward(ctx, x, group, exchange_log, name):
        ctx.group, ctx.exchange_log, ctx.name = group, exchange_log, name
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        started = ctx.exchange_log.clock(grad)
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        ctx.exchange_log.record(ctx.name, "backward", sent=total, received=total, started=started)
        return total, None, None, None


# ---------------------------------------------------------------- public wrappers

def gather_channels(x: torch.Tensor, group, exchange_log: ExchangeLog, name: str) -> torch.Tensor:
    """N x C x ... on each tower -> N x 2C x ... on both; gradients summed back (see _GatherChannels)."""
    return _GatherChannels.apply(x, group, exchange_log, name)


def gather_to_first(x: torch.Tensor, group, exchange_log: ExchangeLog, name: str) -> torch.Tensor:
    """N x C on each tower -> N x 2C on tower 0, an N x 0 placeholder on tower 1."""
    return _GatherToFirst.apply(x, group, exchange_log, name)


def broadcast_from_first(y: torch.Tensor, num_classes: int, group, exchange_log: ExchangeLog, name: str) -> torch.Tensor:
    """Tower 0's N x K (tower 1 passes its placeholder) -> N x K on both."""
    return _BroadcastFromFirst.apply(y, num_classes, group, exchange_log, name)


def gather_replicated(x: torch.Tensor, group, exchange_log: ExchangeLog, name: str) -> torch.Tensor:
    """N x K/2 on each tower -> N x K on both, for a replicated consumer such as the loss."""
    return _GatherReplicated.apply(x, group, exchange_log, name)


def sum_gradients(x: torch.Tensor, group, exchange_log: ExchangeLog, name: str) -> torch.Tensor:
    """``x`` as it is, both towers holding the same copy; its gradient is the sum of both towers'."""
    return _SumGradients.apply(x, group, exchange_log, name)
