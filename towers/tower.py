"""One tower: one rank's half of the paper's net, with the exchanges explicit.

A tower holds 48/128/192/192/128 kernels and 2048/2048 FC neurons. It talks to
the other tower only where the paper's Figure 2 draws a crossing: the input of
conv3, FC6, FC7 and FC8, and the logits for the loss. Each crossing is a call
in ``forward``; everything else is the reference's arithmetic on half the maps.
(Two more calls serve a user's code, not the paper: where the images require grad,
their gradient is summed over both towers; and the first forward checks, in one
small collective, that both towers were built and run alike.)
Every tower returns the full N x K logits, so the loss and everything after it
(accuracy, the optimizer step) are written once for every mode.
"""

import copy
import numbers
import zlib

import torch
import torch.distributed as dist
from torch import nn

from .exchange import (ExchangeLog, broadcast_from_first, gather_channels, gather_replicated, gather_to_first,
                       sum_gradients)
from .reference import (ACTIVATIONS, CONV_CHANNELS, FC_FEATURES, POOL5_SHAPE, TOWERS, Architecture, LocalResponseNorm,
                        check_images, max_pool)
from .sharding import HALF, check_placement


# The layers between one exchange and the next (conv3's input, FC6's, FC7's, FC8's, the logits).
STRETCHES = (("conv1", "conv2"), ("conv3", "conv4", "conv5"), ("fc6",), ("fc7",), ("fc8",))


def as_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, the dtype the next layer computes in. LRN may hand on fp32 (CUDA's autocast
    computes its power in fp32, the CPU's does not), but conv3 would cast its input anyway:
    casting before the exchange moves half the bytes.
    As autocast itself, it leaves float64 as it is (a float64 net computes in float64)."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class Tower(nn.Module):
    """This rank's tower. ``group`` is the two-rank process group (None: the default
    group); the tower's index in it (``dist.get_rank(group)``) decides which half it holds.

    Parameter names match the reference's (``conv1.weight``, ..., ``fc8.weight``; tower 1
    holds no ``fc8`` where FC8 is whole on tower 0), so :mod:`towers.sharding` maps between
    them by name alone. ``architecture``'s LRN,
    pooling and activation are the reference's; its net must be the two-tower one.

    A new tower's weights are torch's default ones, placeholders: load this tower's half
    of a reference, ``tower.load_state_dict(shard_state_dict(reference.state_dict(),
    tower.tower_rank, tower.fc8_placement))``; its state_dict names its half, and another
    tower's is refused (``towers.sharding.HALF``). Building it leaves the random stream as it
    was, so that the two ranks' streams stay in step (FC8 may be on one tower only). Both
    towers must be given the same images, requiring grad on both or on neither: where they
    do, their gradient is the whole net's on both towers, summed in backward by a
    collective that both must join. The first forward checks that the two towers are
    built alike and run alike (see ``check_peer``), once: one small collective.

    Dropout draws from each rank's own random stream: seed the ranks differently
    (``torch.manual_seed(seed + rank)``; the training program uses ``seed + 1 + rank``), or both towers
    drop the same neurons of their halves together, which is not the paper's dropout. The images'
    randomness (augmentation, shuffling) must then come from a stream seeded alike on both.
    """

    def __init__(self, group, num_classes: int = 1000, dropout: float = 0.5, fc8_placement: str = "tower0",
                 architecture: Architecture = Architecture()):
        super().__init__()
        check_placement(fc8_placement)
        if architecture.net != "two-tower":
            raise ValueError(f"the towers hold the two-tower net only, not the {architecture.net} net: build that one "
                             f"as the reference AlexNet on one device")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):  # on both towers alike
            raise TypeError(f"num_classes must be a whole number, got {num_classes!r}")  # (tower 1 may build no FC8)
        if num_classes < 2:  # as the reference
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if fc8_placement == "split" and num_classes % TOWERS:
            raise ValueError(f"fc8_placement='split' needs an even number of classes, got {num_classes}; use 'tower0'")
        if dist.get_world_size(group) < 0:  # what torch says of a group this rank is not in
            raise ValueError("this rank is not in the process group given: build each rank's tower on a group it is in "
                             "(dist.new_group, called on every rank, returns one that a rank outside it cannot use)")
        if dist.get_world_size(group) != TOWERS:
            raise ValueError(f"a tower needs a process group of exactly {TOWERS} ranks, got {dist.get_world_size(group)}")
        group = dist.group.WORLD if group is None else group
        self.group, self.tower_rank = group, dist.get_rank(group)
        self.fc8_placement, self.num_classes, self.architecture = fc8_placement, num_classes, architecture
        # This tower's traffic to the other, per exchange; another ExchangeLog put in its place
        # (one that synchronizes, say) counts every exchange from then on.
        self.exchange_log = ExchangeLog()
        self.peer_checked = False
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            self._build_layers(num_classes, dropout, fc8_placement, architecture)
        self.register_state_dict_post_hook(_name_half)
        self.register_load_state_dict_pre_hook(_refuse_what_is_not_its_half)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's; a half without FC8 (the features, under a new classifier) is loaded with
        ``strict=False``, FC8 left as it was and named missing, and refused before anything is
        copied where strict. (torch tells the hooks of a load ``strict=True`` either way: within
        another module loaded, the tower leaves a missing FC8 to torch's own strict check.)"""
        self._strict_load = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            del self._strict_load

    def _build_layers(self, num_classes, dropout, fc8_placement, architecture):
        c1, c2, c3, c4, c5 = (c // TOWERS for c in CONV_CHANNELS)
        f6, f7 = (f // TOWERS for f in FC_FEATURES)
        pool5_features = POOL5_SHAPE[0] * POOL5_SHAPE[1] * POOL5_SHAPE[2]
        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2)
        self.lrn1 = LocalResponseNorm(groups=1) if architecture.lrn else nn.Identity()  # this tower's 48 maps only
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.lrn2 = LocalResponseNorm(groups=1) if architecture.lrn else nn.Identity()
        self.conv3 = nn.Conv2d(TOWERS * c2, c3, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1)
        self.pool = max_pool(architecture.pooling)
        self.activation = ACTIVATIONS[architecture.activation]
        self.fc6 = nn.Linear(pool5_features, f6)
        self.fc7 = nn.Linear(TOWERS * f6, f7)
        if fc8_placement == "split":
            self.fc8 = nn.Linear(TOWERS * f7, num_classes // TOWERS)  # half of FC8's neurons, fed by both towers
        elif self.tower_rank == 0:
            self.fc8 = nn.Linear(TOWERS * f7, num_classes)  # the whole layer (the authors' 2012 layout)
        # else tower 1 holds none of FC8
        self.dropout = nn.Dropout(dropout)

    # The runs of layers between two exchanges, in the order forward calls them: what
    # compile_blocks hands to torch.compile, one graph each, the exchanges left outside.
    BLOCKS = ("conv1_to_pool2", "conv3_to_pool5", "fc6_block", "fc7_block")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.peer_checked:
            self.check_peer(x)
            self.peer_checked = True
        check_images(x, self.conv1, self.pool)  # after the check of the peer's: on both towers, or neither
        exchange_log, group = self.exchange_log, self.group
        if x.requires_grad:  # an image's gradient sums both towers' (never so in training)
            x = sum_gradients(x, group, exchange_log, "input")
        x = self.conv1_to_pool2(x)  # N x 128 x 13 x 13
        x = gather_channels(as_autocast_dtype(x), group, exchange_log, "conv3_input")  # exchange: N x 256 x 13 x 13
        x = self.conv3_to_pool5(x)  # N x 4608
        x = gather_channels(x, group, exchange_log, "fc6_input")  # exchange: N x 9216, channel-major as in the reference
        x = self.fc6_block(x)  # N x 2048
        x = gather_channels(x, group, exchange_log, "fc7_input")  # exchange: N x 4096
        x = self.fc7_block(x)  # N x 2048
        if self.fc8_placement == "split":
            x = gather_channels(x, group, exchange_log, "fc8_input")  # exchange: N x 4096
            return gather_replicated(self.fc8(x), group, exchange_log, "logits")  # exchange: N x K/2 from each
        x = gather_to_first(x, group, exchange_log, "fc8_input")  # exchange: N x 2048 to tower 0, which gets N x 4096
        if self.tower_rank == 0:
            x = self.fc8(x)
        elif torch.is_grad_enabled() and not x.requires_grad:  # x: a placeholder for the logits
            # FC8 trained alone (the layers before it frozen): the logits' gradient is tower 0's
            # business, but this tower's loss.backward() must run, as a no-op, as tower 0's does.
            # This tower cannot see whether tower 0's FC8 trains: its logits require grad whenever
            # gradients are on (detach them to read them, as one would on tower 0 when it trains).
            x.requires_grad_()
        return broadcast_from_first(x, self.num_classes, group, exchange_log, "logits")  # exchange: N x K to tower 1

    def __deepcopy__(self, memo):
        """``copy.deepcopy`` (as ``AveragedModel``'s EMA and SWA do) shares the process group,
        which cannot be copied, and copies everything else: the copy exchanges over the group
        with the other tower's copy. A copy of a tower compiled by ``compile_blocks`` runs
        uncompiled, as torch's copy of a module compiled by ``Module.compile`` does: its compiled
        blocks would compute with the original's weights."""
        memo.setdefault(id(self.group), self.group)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = {k: v for k, v in self.__getstate__().items() if k not in self.BLOCKS}
        clone.__setstate__(copy.deepcopy(state, memo))
        return clone

    def settings(self, x: torch.Tensor) -> dict:
        """What the two towers must share for a forward with images ``x`` to compute the
        net's function: how they were built, their mode, the images (their form, and their
        bytes' CRC-32), autocast, whether gradients are on, and where a backward pass stops (each
        backward is collectives both must join). Checked at the first forward only: a later
        forward run unlike on the two towers is not caught."""
        device = x.device.type
        data = x.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()  # a copy once, for the CRC
        return {"num_classes": self.num_classes, "fc8_placement": self.fc8_placement,
                "architecture": self.architecture,
                "dropout": getattr(self.dropout, "p", repr(self.dropout)),  # or the module put in its place
                "mode": "train" if self.training else "eval", "batch size": x.shape[0] if x.dim() else None,
                "image shape": tuple(x.shape[1:]),
                "images' dtype": x.dtype, "weights' dtype": self.conv1.weight.dtype,
                "autocast": torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else "off",
                "gradients": "on" if torch.is_grad_enabled() else "off", "backward stops at": self._stops_at(x),
                "images require grad": x.requires_grad, "images": f"CRC-32 {zlib.crc32(data):08x}"}

    def _stops_at(self, x: torch.Tensor) -> str:
        """Where a backward pass would stop, whether or not gradients are on now (torch's reentrant
        checkpointing runs the first forward without them): a tower joins the backward of each
        exchange whose input requires grad, which it does from the images, where they require
        grad, or else from the first stretch between exchanges holding a parameter that requires
        grad (``STRETCHES``). FC8 whole on tower 0 is left out: tower 1 holds none of it, and
        joins the logits' backward whenever gradients are on."""
        if x.requires_grad:
            return "the images"
        stretches = STRETCHES if self.fc8_placement == "split" else STRETCHES[:-1]
        for layers in stretches:
            if any(p.requires_grad for name in layers for p in getattr(self, name).parameters()):
                return layers[0]
        return "fc8" if len(stretches) < len(STRETCHES) else "the logits"

    def check_peer(self, x: torch.Tensor) -> None:
        """Raises ValueError, on both towers, naming what differs between them (``settings``):
        two towers built or run unlike would fail deep inside a collective, wait for one
        until the timeout, or compute another function without a word (other class counts
        read memory the other tower never wrote). One all-gather of a few numbers."""
        mine = self.settings(x)
        coded = [float(v) if isinstance(v, numbers.Real) else float(zlib.crc32(repr(v).encode()))
                 for v in mine.values()]
        gathered = [torch.empty(len(coded), dtype=torch.float64, device=x.device) for _ in range(TOWERS)]
        dist.all_gather(gathered, torch.tensor(coded, dtype=torch.float64, device=x.device), group=self.group)
        other = gathered[1 - self.tower_rank].tolist()
        differ = [f"{name} ({value} here)" for (name, value), a, b in zip(mine.items(), coded, other) if a != b]
        if differ:
            raise ValueError(f"tower {self.tower_rank}: the two towers differ in {', '.join(differ)}: build both "
                             f"with the same arguments, and run both alike on the same images")

    def conv1_to_pool2(self, x: torch.Tensor) -> torch.Tensor:
        act = self.activation
        x = self.pool(self.lrn1(act(self.conv1(x))))  # N x 48 x 27 x 27
        return self.pool(self.lrn2(act(self.conv2(x))))  # N x 128 x 13 x 13

    def conv3_to_pool5(self, x: torch.Tensor) -> torch.Tensor:
        act = self.activation
        x = act(self.conv4(act(self.conv3(x))))
        return self.pool(act(self.conv5(x))).flatten(1)  # N x 128 x 6 x 6, flattened channel-major

    def fc6_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.fc6(x)))

    def fc7_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.fc7(x)))


def _name_half(tower: Tower, state_dict, prefix, local_metadata) -> None:
    """``state_dict``'s hook: the tower's metadata names its half (``towers.sharding.HALF``)."""
    local_metadata[HALF] = tower.tower_rank


def _refuse_what_is_not_its_half(tower: Tower, state_dict, prefix, local_metadata, strict, missing, unexpected,
                                 error_msgs) -> None:
    """``load_state_dict``'s hook: a state_dict that names the other tower's half, holds the whole
    net, or an FC8 of another placement or class count, is refused before any of it is copied
    (raised here: torch raises ``error_msgs`` after the copies)."""
    half = local_metadata.get(HALF)
    fix = "(shard_state_dict(state, tower.tower_rank, tower.fc8_placement), or the state_dict that tower saved)"
    said = f"Error(s) in loading state_dict for {type(tower).__name__}: it holds"
    if half is not None and half != tower.tower_rank:
        raise RuntimeError(f"{said} tower {half}'s half of the net, and this is tower {tower.tower_rank}: load each "
                           f"tower its own half {fix}")
    conv1 = state_dict.get(prefix + "conv1.weight")
    if isinstance(conv1, torch.Tensor) and conv1.dim() and conv1.shape[0] == CONV_CHANNELS[0]:
        raise RuntimeError(f"{said} the whole net (conv1's {CONV_CHANNELS[0]} kernels), and a tower holds half of "
                           f"it: load each tower its own half {fix}")
    fc8, here = state_dict.get(prefix + "fc8.weight"), getattr(tower, "fc8", None)
    rows = here.weight.shape[0] if isinstance(here, nn.Linear) else 0
    if isinstance(fc8, torch.Tensor) and fc8.dim():
        given = fc8.shape[0]
    else:  # none in a whole half (tower 1's, of FC8 whole on tower 0): torch's strict loading would copy the rest first
        # as this tower was asked; within another module, whose strictness no hook sees: torch's own check
        strict = getattr(tower, "_strict_load", False)
        given = 0 if strict and fc8 is None and prefix + "conv1.weight" in state_dict else rows
    if given != rows:
        alone = "; or, for its features alone, strict=False" if given == 0 else ""
        raise RuntimeError(f"{said} {given} of FC8's neurons, and this tower holds {rows} "
                           f"(fc8_placement={tower.fc8_placement!r}, {tower.num_classes} classes): load it a half "
                           f"sharded with its placement, of a net of its classes {fix}{alone}")


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """``torch.compile`` for this package's models, in place: a Tower's ``BLOCKS`` one by one
    (the exchanges run as written, between the compiled graphs, as torchtitan compiles a
    model block by block around its communication), any other module whole. ``options``
    go to ``torch.compile`` (``backend``, ``mode``, ...). Returns ``model``."""
    if isinstance(model, Tower):
        for name in Tower.BLOCKS:
            setattr(model, name, torch.compile(getattr(model, name), **options))
    else:
        model.compile(**options)
    return model
