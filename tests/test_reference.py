"""The single-device reference against the paper's numbers and formulas."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from launch.checkpoint import CheckpointError, checkpoint_payload, load_checkpoint, load_reference, save_reference
from towers import AlexNet, Architecture, LocalResponseNorm, Tower, build_reference
from towers.reference import POOLINGS, check_images

from conftest import reference_from_seed

# Sizes that follow from the layer shapes of section 3.5 and Figure 2 of the paper.
LAYER_PARAMS = {"conv1": 34_944, "conv2": 307_456, "conv3": 885_120, "conv4": 663_936, "conv5": 442_624,
                "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper():
    model = AlexNet()
    assert _count(model) == 60_965_224
    assert {name: _count(getattr(model, name)) for name in LAYER_PARAMS} == LAYER_PARAMS
    assert sum(_count(getattr(model, f"conv{i}")) for i in range(1, 6)) == 2_334_080
    assert sum(_count(getattr(model, f"fc{i}")) for i in range(6, 9)) == 58_631_144


def test_spatial_sizes_and_neurons_per_layer():
    model = AlexNet().eval()
    shapes = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape[1:]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert [shapes[f"conv{i}"][-1] for i in range(1, 6)] == [55, 27, 13, 13, 13]
    # 290,400 for conv1 (the paper prints 253,440, a known inconsistency), then the paper's figures.
    neurons = [torch.Size(s).numel() for s in shapes.values()]
    assert neurons == [290_400, 186_624, 64_896, 64_896, 43_264, 4096, 4096, 1000]
    pooled = {}
    model.fc6.register_forward_pre_hook(lambda m, args: pooled.__setitem__("pool5", args[0].shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert pooled["pool5"] == (1, 256 * 6 * 6)


def _paper_lrn(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
    """Section 3.3 written out: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(dim=1)) ** beta
    return out


def test_lrn_is_the_papers_formula():
    # Magnitudes like conv1's outputs on raw pixels (tens), where alpha * sum is of order 1:
    # a convention off by the factor n = 5 changes the result by far more than the tolerance.
    a = torch.randn(2, 48, 7, 7, dtype=torch.float64) * 30
    expected = _paper_lrn(a)
    torch.testing.assert_close(LocalResponseNorm(groups=1)(a), expected, rtol=1e-12, atol=0)
    wrong_alpha = F.local_response_norm(a, 5, alpha=1e-4, beta=0.75, k=2.0)  # torch's own convention, alpha/n
    assert (wrong_alpha - expected).abs().max() > 1e-2
    torch.testing.assert_close(F.local_response_norm(a, 5, alpha=5e-4, beta=0.75, k=2.0), expected, rtol=1e-12, atol=0)


def test_lrn_gradient():
    a = (torch.randn(2, 12, 3, 3, dtype=torch.float64) * 30).requires_grad_()
    assert torch.autograd.gradcheck(LocalResponseNorm(groups=2), (a,))


def test_lrn_never_crosses_the_halves():
    a = torch.randn(2, 96, 5, 5, dtype=torch.float64) * 30
    halves = torch.cat([_paper_lrn(a[:, :48]), _paper_lrn(a[:, 48:])], dim=1)
    torch.testing.assert_close(LocalResponseNorm(groups=2)(a), halves, rtol=1e-12, atol=0)
    # Across the boundary the whole-width LRN differs (maps 46-49 see the other half).
    assert (LocalResponseNorm(groups=1)(a) - halves).abs().max() > 1e-3


@pytest.mark.parametrize("size", [3, 4, 5, 6])
def test_lrn_window_of_any_size_is_torchs_with_alpha_times_size(size):
    """The window of ``size`` maps, odd or even, lies where torch's lies (size // 2 maps before
    channel i, (size - 1) // 2 after): only the alpha convention differs, by the factor size."""
    a = torch.randn(2, 12, 3, 3, dtype=torch.float64) * 30
    expected = F.local_response_norm(a, size, alpha=1e-4 * size, beta=0.75, k=2.0)
    torch.testing.assert_close(LocalResponseNorm(size=size)(a), expected, rtol=1e-12, atol=0)


def test_lrn_takes_keywords_only_where_torchs_takes_size_first():
    """torch.nn.LocalResponseNorm(5, ...) ported as it is would give 5 groups, and an alpha
    five times the intended one: refused, not run."""
    with pytest.raises(TypeError):
        LocalResponseNorm(5, 1e-4, 0.75, 2.0)


def test_allocate_refuses_a_model_that_holds_weights():
    """It would replace them with uninitialised memory, and the optimizer's with new tensors."""
    from towers import allocate
    model = AlexNet(10)
    before = model.conv1.weight.detach().clone()
    with pytest.raises(ValueError, match="this model holds weights already: use it as it is"):
        allocate(model)
    assert torch.equal(model.conv1.weight, before)


def test_allocate_keeps_which_parameters_are_frozen():
    """A net built on the meta device with some layers frozen keeps them frozen through allocate,
    and the rest trainable: the optimizer and the towers' backward (which stops where nothing
    requires grad) see the net as it was built."""
    from towers import allocate
    with torch.device("meta"):
        model = AlexNet(10)
    model.conv1.requires_grad_(False)
    model = allocate(model)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == {"conv1.weight", "conv1.bias"}
    assert all(not p.is_meta for p in model.parameters())


def test_grouped_convolutions_see_only_their_half():
    model = build_reference(seed=0).eval()
    x = torch.randn(1, 96, 27, 27)
    y = model.conv2(x)
    x2 = x.clone()
    x2[:, 48:] += 1.0  # change only the second half's input maps
    y2 = model.conv2(x2)
    assert torch.equal(y[:, :128], y2[:, :128]) and not torch.equal(y[:, 128:], y2[:, 128:])
    assert model.conv2.groups == model.conv4.groups == model.conv5.groups == 2 and model.conv3.groups == 1


def test_paper_initialisation_from_a_seed():
    a, b, c = build_reference(seed=3), build_reference(seed=3), build_reference(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    for name in LAYER_PARAMS:
        layer = getattr(a, name)
        assert abs(layer.weight.std().item() - 0.01) < 0.01 * 0.05, name  # N(0, 0.01^2); many draws per layer
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected_bias), name
    # one stream of draws for the whole net: a generator seeded again for each layer would start
    # every layer with the same numbers (the layers' weights correlated, not independent draws)
    firsts = [getattr(a, name).weight.flatten()[:16] for name in LAYER_PARAMS]
    assert not any(torch.equal(x, y) for i, x in enumerate(firsts) for y in firsts[i + 1:])


def test_conv1_is_the_first_float64_draw_of_the_seeds_stream():
    """conv1's kernels are the first draws of the seeded stream, in float64 rounded to the weights'
    dtype: the same seed gives the same net on any machine and in any version of this package
    (a checkpoint's seed names its initial weights), not merely some net of the right spread."""
    model = build_reference(seed=3)
    g = torch.Generator().manual_seed(3)
    first = torch.randn(model.conv1.weight.shape, generator=g, dtype=torch.float64).mul_(0.01)
    assert torch.equal(model.conv1.weight, first.to(model.conv1.weight.dtype))


def test_caffe_initialisation_differs_where_documented():
    model = build_reference(seed=0, init="caffe")
    assert abs(model.fc6.weight.std().item() - 0.005) < 0.005 * 0.05
    assert torch.all(model.conv2.bias == 0.1) and torch.all(model.conv1.bias == 0)
    with pytest.raises(ValueError, match="init scheme"):
        build_reference(init="xavier")


def test_scaled_initialisation_follows_fan_in():
    model = build_reference(seed=0, init="scaled")
    fan_in = {"conv1": 3 * 11 * 11, "conv2": 48 * 5 * 5, "conv3": 256 * 3 * 3, "conv4": 192 * 3 * 3,
              "conv5": 192 * 3 * 3, "fc6": 9216, "fc7": 4096}  # per group: conv2/4/5 see half the maps
    for name, n in fan_in.items():
        expected = 0.6 * math.sqrt(2 / n)
        assert abs(getattr(model, name).weight.std().item() - expected) < expected * 0.05, name
    assert abs(model.fc8.weight.std().item() - 0.001) < 0.001 * 0.05
    assert all(torch.all(getattr(model, name).bias == 0) for name in LAYER_PARAMS)


def test_reference_has_no_distributed_code():
    source = Path(__file__).parents[1] / "towers" / "reference.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported and not any("distributed" in name for name in imported)


# ---------------------------------------------------------------- the variants of sections 3.1-3.4

VARIANTS = {
    "paper": Architecture(),
    "no-lrn": Architecture(lrn=False),
    "non-overlapping": Architecture(pooling="non-overlapping"),
    "tanh": Architecture(activation="tanh"),
    "one-tower": Architecture(net="one-tower"),
}


def test_both_poolings_give_the_papers_sizes():
    # Section 3.4: s = z = 2 gives outputs of the same size as s = 2, z = 3. With this net's padding
    # it holds in floor mode, (n - z) // s + 1: pool1 55 -> 27, pool2 27 -> 13, pool5 13 -> 6 for both
    # (ceil mode would give 2 x 2 windows 28, 14 and 7).
    for window, stride in POOLINGS.values():
        assert [(n - window) // stride + 1 for n in (55, 27, 13)] == [27, 13, 6], (window, stride)


@pytest.mark.parametrize("variant", VARIANTS)
def test_spatial_sizes_of_every_variant(variant):
    model = AlexNet(10, architecture=VARIANTS[variant]).eval()
    shapes = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape[1:]))
    model.fc6.register_forward_pre_hook(lambda m, args: shapes.__setitem__("pool5", args[0].shape[1:]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    channels = (48, 128, 192, 192, 256) if variant == "one-tower" else (96, 256, 384, 384, 256)
    assert [tuple(shapes[f"conv{i + 1}"]) for i in range(5)] == [
        (channels[0], 55, 55), (channels[1], 27, 27), (channels[2], 13, 13), (channels[3], 13, 13), (channels[4], 13, 13)]
    assert tuple(shapes["pool5"]) == (256 * 6 * 6,)  # conv5 keeps 256 kernels in the one-tower net too


@pytest.mark.parametrize("pooling", ["overlapping", "non-overlapping"])
def test_images_are_refused_in_one_line_where_the_layers_cannot_take_them(pooling):
    """The sizes check_images lets through are those whose pool5 maps the layers make 6 x 6
    (FC6's input), found here by running the layers; others, and a tensor that is not a batch
    of 3-channel images, are refused naming what the net takes, not by a matmul's shapes."""
    model = AlexNet(10, architecture=Architecture(pooling=pooling)).eval()
    for height, width in [(side, side) for side in range(190, 260, 3)] + [(224, 256), (256, 224), (227, 200)]:
        x = torch.zeros(1, 3, height, width)
        with torch.no_grad():
            for name in ("conv1", "pool", "conv2", "pool", "conv3", "conv4", "conv5", "pool"):
                x = getattr(model, name)(x)
        try:
            check_images(torch.zeros(1, 3, height, width), model.conv1, model.pool)
        except ValueError as refused:
            assert tuple(x.shape[2:]) != (6, 6), (height, width)
            assert str(refused) == (f"images of {height} x {width} pixels pool to conv5 maps of {x.shape[2]} x "
                                    f"{x.shape[3]}, not the 6 x 6 that FC6 takes: give 224 x 224 images, the "
                                    f"paper's crops")
        else:
            assert tuple(x.shape[2:]) == (6, 6), (height, width)
            assert model(torch.zeros(1, 3, height, width)).shape == (1, 10)
    for side in (1, 10, 30):  # where the layers' maps come to nothing
        with pytest.raises(ValueError, match=f"^images of {side} x {side} pixels are too small for the net's layers: "
                                             f"give 224 x 224 images"):
            model(torch.zeros(1, 3, side, side))
    for shape in [(3, 224, 224), (2, 1, 224, 224), (224, 224), (1, 1, 3, 224, 224)]:
        with pytest.raises(ValueError, match=r"^the net takes a batch of images, N x 3 x H x W; got a tensor of "
                                             rf"shape \({', '.join(map(str, shape))},?\)"):
            model(torch.zeros(shape))


def test_non_overlapping_pooling_leaves_the_last_row_and_column_unseen():
    # 55, 27 and 13 are odd: 2 x 2 windows with stride 2 end one row and column short.
    x = torch.randn(1, 4, 55, 55)
    changed = x.clone()
    changed[:, :, -1, :] += 100
    changed[:, :, :, -1] += 100
    non_overlapping, overlapping = AlexNet(architecture=VARIANTS["non-overlapping"]).pool, AlexNet().pool
    assert torch.equal(non_overlapping(x), non_overlapping(changed))
    assert not torch.equal(overlapping(x), overlapping(changed))
    assert non_overlapping(x).shape == overlapping(x).shape == (1, 4, 27, 27)


def test_one_tower_net_has_the_footnotes_shape():
    model = AlexNet(architecture=VARIANTS["one-tower"])
    # Weights + biases, by hand: conv1 48*3*11*11 + 48 = 17,472; conv2 128*48*5*5 + 128 = 153,728;
    # conv3 192*128*3*3 + 192 = 221,376; conv4 192*192*3*3 + 192 = 331,968; conv5 256*192*3*3 + 256
    # = 442,624 (as in the two-tower net); FC6-FC8 as in the two-tower net.
    expected = {"conv1": 17_472, "conv2": 153_728, "conv3": 221_376, "conv4": 331_968, "conv5": 442_624,
                "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000}
    assert {name: _count(getattr(model, name)) for name in expected} == expected
    # 1,167,168 in the convolutions + 58,631,144 in the FC layers: "about the same number of
    # parameters" as the two-tower net's 60,965,224 (section 3.2's footnote)
    assert _count(model) == 59_798_312
    assert all(layer.groups == 1 for layer in model.modules() if isinstance(layer, torch.nn.Conv2d))
    assert model.lrn1.groups == model.lrn2.groups == 1  # one device: the neighbourhood spans all 48 / 128 maps
    with pytest.raises(ValueError, match="two-tower net only"):
        Tower(None, 1000, architecture=VARIANTS["one-tower"])  # refused before any process group is needed


class _Calls(TorchFunctionMode):
    """Counts the torch functions a forward pass calls, by name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["paper", "tanh"])
def test_tanh_replaces_every_relu(variant):
    model = AlexNet(10, architecture=VARIANTS[variant]).eval()
    with torch.no_grad(), _Calls() as calls:
        model(torch.randn(1, 3, 224, 224))
    nonlinearities = {name: calls.counts.get(name, 0) for name in ("relu", "tanh")}
    # after conv1-conv5, FC6 and FC7: seven, never after FC8
    assert nonlinearities == ({"relu": 0, "tanh": 7} if variant == "tanh" else {"relu": 7, "tanh": 0})


def test_no_lrn_is_the_reference_with_identity_for_lrn():
    without = reference_from_seed(10, 2, architecture=VARIANTS["no-lrn"]).eval()
    reference = reference_from_seed(10, 2).eval()
    x = torch.randn(2, 3, 224, 224) * 60
    with torch.no_grad():
        with_lrn = reference(x)
        reference.lrn1 = reference.lrn2 = torch.nn.Identity()
        assert torch.equal(without(x), reference(x))  # the same weights from the seed, the same arithmetic
    assert not torch.equal(with_lrn, reference(x))  # LRN changes the output at raw-pixel scale


def test_unknown_choices_are_refused():
    for wrong in (dict(pooling="average"), dict(activation="sigmoid"), dict(net="three-tower"), dict(lrn="no")):
        with pytest.raises(ValueError):
            Architecture(**wrong)


@pytest.mark.parametrize("architecture", [Architecture(net="one-tower"),
                                          Architecture(lrn=False, pooling="non-overlapping", activation="tanh")],
                         ids=["one-tower", "no-lrn-non-overlapping-tanh"])
def test_checkpoints_rebuild_the_architecture_they_hold(architecture, tmp_path):
    model = reference_from_seed(10, 4, architecture=architecture).eval()
    save_reference(tmp_path / "model.pt", model)
    payload = load_checkpoint(tmp_path / "model.pt")
    assert {k: payload["arch"][k] for k in ("net", "lrn", "pooling", "activation")} == vars(architecture)
    loaded = load_reference(tmp_path / "model.pt").eval()
    assert loaded.architecture == architecture
    x = torch.randn(1, 3, 224, 224) * 60
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_model_that_torch_compile_wrapped_is_saved_as_the_model_it_wraps(tmp_path):
    model = reference_from_seed(10, 4).eval()
    save_reference(tmp_path / "compiled.pt", torch.compile(model, backend="eager"))  # names _orig_mod.conv1...
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224) * 60
        assert torch.equal(load_reference(tmp_path / "compiled.pt").eval()(x), model(x))


def _placeholder_weights(architecture=Architecture()):
    """Weights of the right shapes that take a few bytes on disk: one zero, expanded."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AlexNet(10, architecture=architecture).state_dict().items()}
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


def test_a_checkpoint_without_the_architecture_holds_the_papers_net(tmp_path):
    """Saved before the architecture was recorded: only name and classes in its arch."""
    payload = checkpoint_payload(_placeholder_weights(), num_classes=10)
    payload["arch"] = {"name": payload["arch"]["name"], "num_classes": 10}
    torch.save(payload, tmp_path / "old.pt")
    assert load_reference(tmp_path / "old.pt").architecture == Architecture()
    payload["arch"]["pooling"] = "average"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="architecture this program cannot build"):
        load_checkpoint(tmp_path / "unknown.pt")
    payload["arch"].update(pooling="overlapping", net="one-tower")  # the record disagrees with the weights
    torch.save(payload, tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="conv1.weight"):
        load_checkpoint(tmp_path / "mislabelled.pt")


@pytest.mark.parametrize("names", ["abcdefghij", [f"c{i}" for i in range(9)], ["same"] * 10, [b"c"] * 10],
                         ids=["text", "nine", "repeated", "bytes"])
def test_a_checkpoint_names_its_classes_as_distinct_folder_names(tmp_path, names):
    """The class names, as a hand-made file may hold them otherwise: one string, too few, one
    name twice, or bytes; predict would print them letter by letter, or as b'...'."""
    payload = checkpoint_payload(_placeholder_weights(), num_classes=10, classes=[f"c{i}" for i in range(10)])
    for kept in (list, tuple):
        torch.save(dict(payload, classes=kept(payload["classes"])), tmp_path / "named.pt")
        assert list(load_checkpoint(tmp_path / "named.pt")["classes"]) == [f"c{i}" for i in range(10)]
    torch.save(dict(payload, classes=names), tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="names its classes otherwise than as 10 distinct class folder names"):
        load_checkpoint(tmp_path / "odd.pt")
