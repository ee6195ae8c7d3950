"""The single-device reference against the paper's numbers and formulas."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from towers import AlexNet, LocalResponseNorm, build_reference

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
