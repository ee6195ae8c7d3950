"""Sharding is data: pure functions between the reference's state_dict and the towers'."""

import re

import numpy as np
import pytest
import torch

from launch.checkpoint import save_reference
from towers import AlexNet, Architecture, build_reference, shard_state_dict, unshard_state_dicts
from towers.sharding import half_of

HALF_CONV1_TO_FC7 = 28_434_112  # each tower holds exactly half of conv1-FC7 (Figure 2)
FC8 = 4_097_000


@pytest.fixture(scope="module")
def reference_state():
    return build_reference(seed=11).state_dict()


def _numel(state):
    return sum(v.numel() for v in state.values())


@pytest.mark.parametrize("placement", ["tower0", "split"])
def test_shard_then_unshard_is_lossless(reference_state, placement):
    towers = [shard_state_dict(reference_state, r, placement) for r in (0, 1)]
    rebuilt = unshard_state_dicts(towers, placement)
    assert list(rebuilt) == list(reference_state)
    assert all(torch.equal(rebuilt[k], v) for k, v in reference_state.items())
    # from views into one buffer each (as received from another rank): every tensor of its own
    # storage, which torch.save writes whole (a view of the buffer would save all of it)
    views = []
    for tower in towers:
        flat = torch.cat([v.flatten() for v in tower.values()])
        views.append({k: part.view_as(v) for (k, v), part in zip(tower.items(),
                                                                 flat.split([v.numel() for v in tower.values()]))})
    for key, value in unshard_state_dicts(views, placement).items():
        owned, size = value.untyped_storage().nbytes(), value.numel() * value.element_size()
        assert owned == size, key


def test_tower_shares_match_the_paper(reference_state):
    t0, t1 = (shard_state_dict(reference_state, r, "tower0") for r in (0, 1))
    assert _numel(t0) == HALF_CONV1_TO_FC7 + FC8 and _numel(t1) == HALF_CONV1_TO_FC7
    assert "fc8.weight" not in t1
    s0, s1 = (shard_state_dict(reference_state, r, "split") for r in (0, 1))
    assert _numel(s0) == _numel(s1) == HALF_CONV1_TO_FC7 + FC8 // 2
    assert t0["conv1.weight"].shape == (48, 3, 11, 11) and t0["conv2.weight"].shape == (128, 48, 5, 5)
    assert t0["conv3.weight"].shape == (192, 256, 3, 3) and t0["fc6.weight"].shape == (2048, 9216)
    assert s1["fc8.weight"].shape == (500, 4096)


def test_tower_halves_are_the_reference_rows(reference_state):
    t1 = shard_state_dict(reference_state, 1, "split")
    assert torch.equal(t1["conv4.weight"], reference_state["conv4.weight"][192:])
    assert torch.equal(t1["fc8.bias"], reference_state["fc8.bias"][500:])


@pytest.mark.parametrize("placement", ["tower0", "split"])
def test_shards_are_copies(reference_state, placement):
    """Every tensor of either tower's shard is its own copy: writing to a shard (loading it, an
    optimizer step on it) leaves the reference's state_dict exactly as it was, in both halves."""
    reference = {k: v.clone() for k, v in reference_state.items()}  # the module's fixture left untouched
    for rank in range(2):
        for value in shard_state_dict(reference, rank, placement).values():
            value.fill_(7.0)
    assert all(torch.equal(v, reference_state[k]) for k, v in reference.items())


def test_bad_arguments_are_refused(reference_state):
    with pytest.raises(ValueError, match="fc8_placement"):
        shard_state_dict(reference_state, 0, "gpu1")
    with pytest.raises(ValueError, match="tower_rank"):
        shard_state_dict(reference_state, 2)
    with pytest.raises(ValueError, match="expected 2"):
        unshard_state_dicts([shard_state_dict(reference_state, 0)])
    # an unknown placement is refused by unsharding as by sharding (not read as FC8 whole on tower 0)
    towers = [shard_state_dict(reference_state, rank) for rank in range(2)]
    with pytest.raises(ValueError, match=r"^fc8_placement must be one of \('tower0', 'split'\), got 'gpu1'$"):
        unshard_state_dicts(towers, "gpu1")
    for rank in (1.0, True, torch.tensor(True), "1", torch.tensor([0, 1])):
        with pytest.raises(ValueError, match=f"tower_rank must be an integer in range\\(2\\), got {re.escape(repr(rank))}$"):
            shard_state_dict(reference_state, rank)
    # a rank as numpy or torch give it (a loop's index, dist.get_rank's tensor): its value
    expected = shard_state_dict(reference_state, 1)
    for rank in (np.int64(1), torch.tensor(1)):
        shard = shard_state_dict(reference_state, rank)
        assert shard.keys() == expected.keys() and all(torch.equal(shard[k], expected[k]) for k in shard)
    with pytest.raises(ValueError, match="unexpected parameter 'features.0.weight'"):  # torchvision's names
        shard_state_dict({"features.0.weight": torch.zeros(64, 3, 11, 11)}, 0)
    with pytest.raises(ValueError, match="'_orig_mod.'"):
        shard_state_dict({"_orig_mod.conv1.weight": torch.zeros(96, 3, 11, 11)}, 0)
    # section 3.2's one-tower net: its halves fitted no tower, which refused them as torch's size mismatch
    with torch.device("meta"):
        one_tower = AlexNet(10, architecture=Architecture(net="one-tower")).state_dict()
    with pytest.raises(ValueError, match=r"^conv1.weight has 48 rows, not the 96 of the paper's two-tower net: it is "
                                         r"section 3.2's one-tower net, which has no towers to shard into"):
        shard_state_dict(one_tower, 0)
    with pytest.raises(ValueError, match=r"^fc7.bias has 4095 rows, not the 4096 of the paper's two-tower net$"):
        shard_state_dict({"fc7.bias": torch.zeros(4095)}, 1)
    for placement in ("tower0", "split"):  # FC8's, whose rows no layer fixes, too
        with pytest.raises(ValueError, match=r"^fc8.bias is a single number \(a tensor of no dimensions\), not a "
                                             r"layer's weights or biases$"):
            shard_state_dict({**reference_state, "fc8.bias": torch.tensor(1.0)}, 0, placement)


def test_split_fc8_of_an_odd_class_count_is_refused_not_cut_unevenly():
    """FC8 of 7 classes split between the towers would be chunked into halves of 4 and 3 rows,
    neither of which a tower (of 7 // 2 classes) holds: refused; whole on tower 0 it is fine."""
    fc8 = {"fc8.weight": torch.zeros(7, 4096), "fc8.bias": torch.zeros(7)}
    for rank in range(2):
        with pytest.raises(ValueError, match=r"^fc8.weight has 7 rows, which do not split into two towers$"):
            shard_state_dict(fc8, rank, "split")
    assert shard_state_dict(fc8, 0, "tower0")["fc8.weight"].shape == (7, 4096)
    assert shard_state_dict(fc8, 1, "tower0") == {}


@pytest.mark.parametrize("sharded, told", [("split", "tower0"), ("tower0", "split")])
def test_unsharding_with_another_placement_than_the_sharding_is_refused(reference_state, sharded, told):
    towers = [shard_state_dict(reference_state, rank, sharded) for rank in range(2)]
    with pytest.raises(ValueError, match=f"FC8, as fc8_placement='{sharded}' shards it, not '{told}'"):
        unshard_state_dicts(towers, told)
    for placement in ("tower0", "split"):
        with pytest.raises(ValueError, match="pass them in tower order, tower 0's first"):
            unshard_state_dicts(towers[::-1], placement)
    towers[1]["junk"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected parameter 'junk'"):
        unshard_state_dicts(towers, sharded)
    del towers[1]["junk"], towers[1]["conv1.bias"]
    with pytest.raises(ValueError, match=r"only tower 0's: conv1.bias; only tower 1's: none"):
        unshard_state_dicts(towers, sharded)
    towers[1]["conv1.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"halves of conv1.bias differ in shape \(\(48,\) and \(3,\)\)"):
        unshard_state_dicts(towers, sharded)


@pytest.mark.parametrize("placement", ["tower0", "split"])
def test_a_shard_names_its_tower_through_a_file_and_unsharding_refuses_halves_out_of_place(
        reference_state, placement, tmp_path):
    """Split FC8's two halves have the same shapes: both towers' state_dicts saved to one file,
    or the files swapped, gave a net of one tower's half twice, or halves swapped, without a word."""
    shards = []
    for rank in range(2):
        torch.save(shard_state_dict(reference_state, rank, placement), tmp_path / f"tower{rank}.pt")
        shards.append(torch.load(tmp_path / f"tower{rank}.pt", weights_only=True))
    assert [half_of(shard) for shard in shards] == [0, 1]
    assert all(torch.equal(v, reference_state[k]) for k, v in unshard_state_dicts(shards, placement).items())
    for rank in range(2):
        with pytest.raises(ValueError, match=rf"^both state_dicts hold tower {rank}'s half \(saved to one file by "
                                             rf"both towers\?\): pass tower 0's, then tower 1's$"):
            unshard_state_dicts([shards[rank]] * 2, placement)
    with pytest.raises(ValueError, match="passed as tower 0's holds tower 1's half: pass them in tower order"):
        unshard_state_dicts([shards[1], dict(shards[0])], placement)  # one named, one a plain dict
    plain = [dict(shard) for shard in shards]  # no name: put together as given
    assert half_of(plain[0]) is None and unshard_state_dicts(plain, placement).keys() == reference_state.keys()
    if placement == "tower0":  # tower 1's twice, unnamed: neither holds FC8
        for told in ("tower0", "split"):
            with pytest.raises(ValueError, match=r"^neither state_dict holds FC8, which tower 0's always does"):
                unshard_state_dicts([plain[1]] * 2, told)
            # unnamed and swapped: FC8 whole on the one passed second tells the order, whatever the placement told
            with pytest.raises(ValueError, match=r"^tower 1's state_dict holds FC8 and tower 0's does not: pass them "
                                                 r"in tower order, tower 0's first$"):
                unshard_state_dicts(plain[::-1], told)


def test_save_reference_refuses_anything_but_the_single_device_net(tmp_path):
    """One tower saved so (half the net, in a script of one's own) made a checkpoint that every
    loader refused as holding other weights, without saying it was half a net."""
    class Tower(torch.nn.Module):  # as towers.Tower is named, which needs a process group to be built
        pass

    with pytest.raises(TypeError, match=r"^save_reference saves the single-device AlexNet, not a Tower: put the "
                                        r"towers' halves together first \(towers.unshard_state_dicts"):
        save_reference(tmp_path / "half.pt", Tower())
    assert not (tmp_path / "half.pt").exists()
    save_reference(tmp_path / "whole.pt", build_reference(10))
    assert (tmp_path / "whole.pt").is_file()


def test_each_towers_half_of_a_caffe_initialised_net_holds_the_schemes_weights():
    """Both towers' halves of every layer, FC8's split too, are drawn as the Caffe reference draws
    them: FC6 and FC7 of std 0.005, the others 0.01; biases 0.1 where the paper's are 1, else 0."""
    reference = build_reference(10, seed=0, init="caffe").state_dict()
    schemes = {"conv1": (0.01, 0.0), "conv2": (0.01, 0.1), "conv3": (0.01, 0.0), "conv4": (0.01, 0.1),
               "conv5": (0.01, 0.1), "fc6": (0.005, 0.1), "fc7": (0.005, 0.1), "fc8": (0.01, 0.0)}
    for rank in range(2):
        half = shard_state_dict(reference, rank, "split")
        for name, (std, bias) in schemes.items():
            assert abs(half[f"{name}.weight"].std().item() - std) < std * 0.05, (rank, name)
            assert torch.all(half[f"{name}.bias"] == bias), (rank, name)
