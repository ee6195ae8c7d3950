"""The Tower's own checks of its arguments, in one process (a process group of one rank)."""

import pytest
import torch

from towers import AlexNet, LocalResponseNorm, Tower
from towers.reference import check_images, max_pool


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


def test_a_tower_refuses_a_bool_for_num_classes_as_not_a_whole_number(group_of_one):
    """True is an int to Python: refused as not a class count, as 10.0 is, not as a count of one class."""
    for flag in (True, False):
        with pytest.raises(TypeError, match=f"^num_classes must be a whole number, got {flag}$"):
            Tower(group_of_one, flag)


def test_lrn_refuses_channels_that_do_not_split_into_its_groups():
    with pytest.raises(ValueError, match="groups=5 got 96 channels"):
        LocalResponseNorm(groups=5)(torch.zeros(1, 96, 4, 4))


def test_images_too_small_on_one_side_only_are_refused_as_too_small():
    """The towers' check of their images (towers.reference.check_images, at every forward): a side
    whose maps come to nothing is too small, whatever the other side, not maps of 6 x 0 to pool."""
    conv1, pool = torch.nn.Conv2d(3, 48, kernel_size=11, stride=4, padding=2), max_pool("overlapping")
    for height, width in ((224, 30), (30, 224), (10, 256)):
        with pytest.raises(ValueError, match=f"^images of {height} x {width} pixels are too small for the net's "
                                             f"layers: give 224 x 224 images, the paper's crops$"):
            check_images(torch.zeros(1, 3, height, width), conv1, pool)
