"""Sharding as data: pure functions between the reference's state_dict and the towers'.

Every layer's kernels or neurons (dim 0 of weight and bias) are split in half,
tower 0 holding the first half. Input dimensions never need slicing: conv2,
conv4 and conv5 are grouped in the reference, so each group's weight already
sees only its own tower's maps, and conv3 and the FC layers see everything.
FC8 is the one layer whose place is a choice (``FC8_PLACEMENTS``).

A tower's state_dict names the tower whose half it holds, in the metadata that
``state_dict()`` and ``torch.save`` keep (``HALF``): ``Tower.load_state_dict``
refuses another tower's half, and ``unshard_state_dicts`` halves out of order. The
two halves of split FC8 have the same shapes: without the name, tower 1's weights
loaded into tower 0 without a word.
"""

import operator
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch

from .reference import CONV_CHANNELS, FC_FEATURES, LAYERS, ONE_TOWER_CONV_CHANNELS, TOWERS

FC8_PLACEMENTS = ("tower0", "split")  # whole on tower 0 (the authors' 2012 layout) | 500 + 500
HALF = "tower"  # the key, in a tower state_dict's own metadata, of the tower whose half it holds
WHOLE_ROWS = dict(zip(LAYERS, (*CONV_CHANNELS, *FC_FEATURES)))  # kernels or neurons of each layer but FC8


def half_of(state: Mapping) -> Optional[int]:
    """The tower whose half a tower's state_dict holds, as it names it; None for a state_dict
    that does not (a plain dict, one rebuilt key by key)."""
    return getattr(state, "_metadata", {}).get("", {}).get(HALF)


def check_placement(fc8_placement: str) -> None:
    if fc8_placement not in FC8_PLACEMENTS:
        raise ValueError(f"fc8_placement must be one of {FC8_PLACEMENTS}, got {fc8_placement!r}")


def _layer(key: str) -> str:
    layer = key.split(".", 1)[0]
    if layer not in LAYERS:
        raise ValueError(f"unexpected parameter {key!r}: this package's nets name theirs {', '.join(LAYERS)} "
                         f"(.weight, .bias); map another net's names first (torch.compile's wrapper adds "
                         f"'_orig_mod.': pass the state_dict of the module it wraps)")
    return layer


def _is_halved(key: str, fc8_placement: str) -> bool:
    return _layer(key) != "fc8" or fc8_placement == "split"


def shard_state_dict(reference: Mapping[str, torch.Tensor], tower_rank: int, fc8_placement: str = "tower0") -> dict:
    """The state_dict of tower ``tower_rank`` cut out of a reference state_dict, naming that
    tower as a tower's own state_dict does (``HALF``)."""
    given = tower_rank
    check_placement(fc8_placement)
    try:  # an integer of numpy's or a tensor of one element stands for its value; True for no rank
        boolean = isinstance(tower_rank, bool) or (isinstance(tower_rank, torch.Tensor)
                                                   and tower_rank.dtype == torch.bool)
        tower_rank = None if boolean else operator.index(tower_rank)
    except TypeError:
        tower_rank = None
    if tower_rank not in range(TOWERS):
        raise ValueError(f"tower_rank must be an integer in range({TOWERS}), got {given!r}")
    tower = OrderedDict()
    tower._metadata = OrderedDict({"": {HALF: tower_rank}})
    for key, value in reference.items():
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            raise ValueError(f"{key} is a single number (a tensor of no dimensions), not a layer's weights or biases")
        rows = WHOLE_ROWS.get(_layer(key))
        if rows is not None and value.shape[0] != rows:
            one_tower = value.shape[0] == dict(zip(LAYERS, ONE_TOWER_CONV_CHANNELS)).get(_layer(key))
            raise ValueError(f"{key} has {value.shape[0]} rows, not the {rows} of the paper's two-tower net" + (
                ": it is section 3.2's one-tower net, which has no towers to shard into (towers.AlexNet with "
                "Architecture(net='one-tower') holds it whole)" if one_tower else ""))
        if _is_halved(key, fc8_placement):
            if value.shape[0] % TOWERS:
                raise ValueError(f"{key} has {value.shape[0]} rows, which do not split into two towers")
            tower[key] = value.chunk(TOWERS, dim=0)[tower_rank].clone()
        elif tower_rank == 0:  # FC8 whole on tower 0
            tower[key] = value.clone()
    return tower


def unshard_state_dicts(towers: Sequence[Mapping[str, torch.Tensor]], fc8_placement: str = "tower0") -> dict:
    """The reference state_dict rebuilt from both towers' state_dicts, in tower order (inverse
    of ``shard_state_dict``)."""
    check_placement(fc8_placement)
    if len(towers) != TOWERS:
        raise ValueError(f"expected {TOWERS} tower state_dicts, got {len(towers)}")
    halves = [half_of(tower) for tower in towers]
    if halves[0] is not None and halves[0] == halves[1]:
        raise ValueError(f"both state_dicts hold tower {halves[0]}'s half (saved to one file by both towers?): pass "
                         f"tower 0's, then tower 1's")
    for place, half in enumerate(halves):
        if half not in (None, place):
            raise ValueError(f"the state_dict passed as tower {place}'s holds tower {half}'s half: pass them in tower "
                             f"order, tower 0's first")
    has_fc8 = ["fc8" in [_layer(key) for key in tower] for tower in towers]  # every key checked
    if not any(has_fc8):
        raise ValueError("neither state_dict holds FC8, which tower 0's always does (whole, or its half with "
                         "fc8_placement='split'): pass tower 0's, then tower 1's")
    if has_fc8 == [False, True]:
        raise ValueError("tower 1's state_dict holds FC8 and tower 0's does not: pass them in tower order, tower 0's "
                         "first")
    if has_fc8 != [True, fc8_placement == "split"]:
        other = {"tower0": "split", "split": "tower0"}[fc8_placement]
        raise ValueError(f"{'both towers hold' if has_fc8[1] else 'only tower 0 holds'} FC8, as "
                         f"fc8_placement={other!r} shards it, not {fc8_placement!r}: pass the placement they were "
                         f"sharded with")
    halved = {key for key in towers[0] if _is_halved(key, fc8_placement)}
    if set(towers[1]) != halved:
        only = lambda a, b: ", ".join(sorted(set(a) - set(b))[:5]) or "none"
        raise ValueError(f"the two towers' state_dicts hold different layers (only tower 0's: "
                         f"{only(halved, towers[1])}; only tower 1's: {only(towers[1], halved)})")
    reference = {}
    for key, value in towers[0].items():
        if _is_halved(key, fc8_placement):
            if towers[1][key].shape != value.shape:
                raise ValueError(f"the towers' halves of {key} differ in shape ({tuple(value.shape)} and "
                                 f"{tuple(towers[1][key].shape)})")
            reference[key] = torch.cat([value, towers[1][key]], dim=0)
        else:
            reference[key] = value.clone()
    return reference
