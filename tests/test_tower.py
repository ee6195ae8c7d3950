"""The Tower's own checks of its arguments, in one process (a process group of one rank)."""

import pytest
import torch

from towers import AlexNet, LocalResponseNorm, Tower


def test_a_tower_needs_a_group_of_two(group_of_one):
    with pytest.raises(ValueError, match="exactly 2 ranks, got 1"):
        Tower(group_of_one, 10)


def test_an_unknown_fc8_placement_is_refused(group_of_one):
    with pytest.raises(ValueError, match="fc8_placement must be one of"):
        Tower(group_of_one, 10, fc8_placement="middle")


def test_split_fc8_needs_an_even_class_count(group_of_one):
    with pytest.raises(ValueError, match="even number of classes, got 7; use 'tower0'"):
        Tower(group_of_one, 7, fc8_placement="split")


def test_a_tower_needs_two_classes_as_the_reference_does(group_of_one):
    """Both nets refuse one class in the same words (the reference's FC8 of one neuron trained to nothing)."""
    with pytest.raises(ValueError, match="num_classes must be at least 2, got 1"):
        Tower(group_of_one, 1)
    with pytest.raises(ValueError, match="^num_classes must be at least 2, got 1$"):
        AlexNet(1)


def test_lrn_refuses_channels_that_do_not_split_into_its_groups():
    with pytest.raises(ValueError, match="groups=5 got 96 channels"):
        LocalResponseNorm(groups=5)(torch.zeros(1, 96, 4, 4))
