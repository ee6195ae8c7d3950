"""launch.config: the defaults the README gives, the ranges validate holds, and the fixes a
refused batch split names."""

import pytest

from launch.config import TrainConfig, parse_config, recipe_warnings, resolve


def test_the_defaults_are_those_the_readme_gives():
    """FC8 whole on tower 0 (the authors' 2012 layout, `--fc8-placement split` the alternative)
    and a per-exchange timeout of 300 s, as the README says, whether built or parsed."""
    for config in (TrainConfig(), parse_config([])):
        assert config.fc8_placement == "tower0"
        assert config.timeout == 300.0


@pytest.mark.parametrize("name, option", [("checkpoint_every", "--checkpoint-every"),
                                          ("max_reductions", "--max-reductions")])
def test_a_negative_count_of_steps_or_reductions_is_refused(name, option):
    """--checkpoint-every and --max-reductions count steps and divisions: 0 is a value of each
    (at the end of each epoch only; never divided), -1 is refused naming the option."""
    TrainConfig(**{name: 0}).validate()
    with pytest.raises(ValueError, match=f"^{option} must not be negative, got -1$"):
        TrainConfig(**{name: -1}).validate()


def test_a_batch_split_refused_with_two_fits_lists_them_joined_by_or():
    """Two numbers of replicas that divide the batch are listed as a sentence lists them, "3 or 1":
    the divisors of 3 up to twice the 2 replicas given."""
    fits = [n for n in range(4, 0, -1) if 3 % n == 0]
    assert fits == [3, 1]
    with pytest.raises(ValueError) as refused:
        TrainConfig(replicas=2, batch_size=3).check_batch_split()
    assert f"that divides 3 ({fits[0]} or {fits[1]}; each replica trains on an equal share)" in str(refused.value)


@pytest.mark.parametrize("name, option", [("lr", "--lr"), ("momentum", "--momentum"),
                                          ("weight_decay", "--weight-decay"), ("dropout", "--dropout")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_rate_that_is_not_a_finite_number_is_named_so(name, option, value):
    """NaN or infinity given to a rate or probability is refused as what it is, not a finite
    number, rather than as a value outside the option's range."""
    with pytest.raises(ValueError, match=f"^{option} must be a finite number, got {value}$"):
        TrainConfig(**{name: value}).validate()


@pytest.mark.parametrize("train_images, warned", [(1_281_167, False), (100_000, False), (99_999, True),
                                                  (50_000, True)])
def test_the_papers_recipe_warns_below_the_readmes_100000_images(train_images, warned):
    """The README: the program warns when the paper's recipe meets fewer than 100,000 training
    images (a twelfth of ImageNet's), and not at or above them."""
    config = resolve(TrainConfig(data="photos", recipe="paper"), train_images=train_images)
    warnings = [w for w in recipe_warnings(config, train_images) if "made for 1.2 million" in w]
    assert bool(warnings) == warned
