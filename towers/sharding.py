"""Sharding as data: pure functions between the reference's state_dict and the towers'.

Every layer's kernels or neurons (dim 0 of weight and bias) are split in half,
tower 0 holding the first half. Input dimensions never need slicing: conv2,
conv4 and conv5 are grouped in the reference, so each group's weight already
sees only its own tower's maps, and conv3 and the FC layers see everything.
FC8 is the one layer whose place is a choice (``FC8_PLACEMENTS``).
"""

from typing import Mapping, Sequence

import torch

from .reference import LAYERS, TOWERS

FC8_PLACEMENTS = ("tower0", "split")  # whole on tower 0 (the authors' 2012 layout) | 500 + 500


def check_placement(fc8_placement: str) -> None:
    if fc8_placement not in FC8_PLACEMENTS:
        raise ValueError(f"fc8_placement must be one of {FC8_PLACEMENTS}, got {fc8_placement!r}")


def _layer(key: str) -> str:
    layer = key.split(".", 1)[0]
    assert layer in LAYERS, f"unexpected parameter {key!r}"
    return layer


def _is_halved(key: str, fc8_placement: str) -> bool:
    return _layer(key) != "fc8" or fc8_placement == "split"


def shard_state_dict(reference: Mapping[str, torch.Tensor], tower_rank: int, fc8_placement: str = "tower0") -> dict:
    """The state_dict of tower ``tower_rank`` cut out of a reference state_dict."""
    check_placement(fc8_placement)
    if tower_rank not in range(TOWERS):
        raise ValueError(f"tower_rank must lie in range({TOWERS}), got {tower_rank}")
    tower = {}
    for key, value in reference.items():
        if _is_halved(key, fc8_placement):
            if value.shape[0] % TOWERS:
                raise ValueError(f"{key} has {value.shape[0]} rows, which do not split into two towers")
            tower[key] = value.chunk(TOWERS, dim=0)[tower_rank].clone()
        elif tower_rank == 0:  # FC8 whole on tower 0
            tower[key] = value.clone()
    return tower


def unshard_state_dicts(towers: Sequence[Mapping[str, torch.Tensor]], fc8_placement: str = "tower0") -> dict:
    """The reference state_dict rebuilt from both towers' state_dicts (inverse of ``shard_state_dict``)."""
    check_placement(fc8_placement)
    if len(towers) != TOWERS:
        raise ValueError(f"expected {TOWERS} tower state_dicts, got {len(towers)}")
    reference = {}
    for key, value in towers[0].items():
        if _is_halved(key, fc8_placement):
            reference[key] = torch.cat([value, towers[1][key]], dim=0)
        else:
            reference[key] = value.clone()
    return reference
