"""The network of Krizhevsky, Sutskever and Hinton (2012) as one plain module.

This is the single-device control: it computes exactly the function of the two
towers in :mod:`towers.tower` and imports nothing from ``torch.distributed``.
The two GPUs of the paper survive here only as structure: ``groups=2`` on
conv2, conv4 and conv5, and a response normalisation that never crosses the
boundary between the two halves of the channels.

The same module builds the variants of the paper's experiments (sections 3.1-3.4),
chosen by an :class:`Architecture`: tanh for ReLU, no LRN, non-overlapping pooling,
and the one-GPU net with half the kernels of conv1-conv4 (conv5 and the FC layers whole).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The paper's two GPUs: every layer's kernels or neurons are split into this many
# towers. The one definition of the number; everything else derives from it.
TOWERS = 2

# Per-layer (out_channels or out_features) of the whole net; each tower holds half.
CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_FEATURES = (4096, 4096)
POOL5_SHAPE = (256, 6, 6)  # channels, height, width after the last max-pool
INPUT_SIZE = 224  # section 4.1: the net takes 224 x 224 crops of the 256 x 256 images

# Section 3.2's one-GPU net, by its footnote: half the kernels in conv1-conv4, but conv5
# (and so pool5's 256 x 6 x 6) and the FC layers as in the two-tower net; no groups.
ONE_TOWER_CONV_CHANNELS = (48, 128, 192, 192, 256)
# net -> (conv channels, groups of conv2/conv4/conv5 and of the LRN)
NETS = {"two-tower": (CONV_CHANNELS, TOWERS), "one-tower": (ONE_TOWER_CONV_CHANNELS, 1)}

# pooling -> (window z, stride s) of section 3.4. With this net's padding both give
# 55 -> 27 -> 13 -> 6 (floor mode): (55 - 3) // 2 + 1 = (55 - 2) // 2 + 1 = 27, and so on.
# The sizes are odd, so 2 x 2 windows leave the last row and column of each map unseen.
POOLINGS = {"overlapping": (3, 2), "non-overlapping": (2, 2)}
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}  # section 3.1: the nonlinearity after every layer but FC8

# Layers whose bias the paper sets to 1 (section 5); all other biases are 0.
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


class LocalResponseNorm(nn.Module):
    """The paper's LRN, b_i = a_i / (k + alpha * sum_j a_j^2)^beta, applied to
    each of ``groups`` channel blocks separately.

    The sum runs over the ``size`` maps centred on i (clipped at the edges of
    the block), exactly as in section 3.3. Convention: ``alpha`` is the paper's
    (1e-4), multiplying the plain sum. (``torch.nn.functional.local_response_norm``,
    like Caffe and the authors' cuda-convnet, divides its alpha by ``size``.)
    ``groups=2`` reproduces the two-GPU net, where the neighbourhood never reaches
    the other GPU's maps. Its arguments are keywords only: ``torch.nn.LocalResponseNorm``'s
    first one is ``size``, and its alpha is this one's times ``size``. The windowed sum is ``size`` shifted slices of the
    zero-padded squares: on the CPU, forward and backward take about 60 % of the
    time of ``local_response_norm``'s average pooling.
    """

    def __init__(self, *, groups: int = 1, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.groups, self.size, self.alpha, self.beta, self.k = groups, size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if c % self.groups:
            raise ValueError(f"LocalResponseNorm with groups={self.groups} got {c} channels, which do not split "
                             f"into {self.groups} equal blocks")
        per_group = c // self.groups
        squares = (x * x).view(n, self.groups, per_group, h, w)
        padded = F.pad(squares, (0, 0, 0, 0, self.size // 2, (self.size - 1) // 2))  # zeros beyond each block
        window_sum = padded[:, :, :per_group]
        for shift in range(1, self.size):
            window_sum = window_sum + padded[:, :, shift:shift + per_group]
        return x * (self.k + self.alpha * window_sum.view(n, c, h, w)).pow(-self.beta)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, size={self.size}, alpha={self.alpha} (paper convention), beta={self.beta}, k={self.k}"


@dataclass(frozen=True)
class Architecture:
    """The choices the paper's experiments vary; the defaults are the paper's net."""
    net: str = "two-tower"  # 'two-tower': the paper's; 'one-tower': section 3.2's one-GPU net (NETS)
    lrn: bool = True  # section 3.3: response normalisation after conv1 and conv2
    pooling: str = "overlapping"  # section 3.4: POOLINGS
    activation: str = "relu"  # section 3.1: ACTIVATIONS

    def __post_init__(self):
        for name, allowed in (("net", NETS), ("pooling", POOLINGS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.lrn, bool):
            raise ValueError(f"lrn must be True or False, got {self.lrn!r}")

    def describe(self) -> str:
        """The differences from the paper's net, in words ('the paper's net' if none)."""
        changes = []
        if self.net == "one-tower":
            changes.append("the one-GPU net of section 3.2 (48/128/192/192/256 kernels, no groups)")
        if not self.lrn:
            changes.append("no LRN")
        if self.pooling != "overlapping":
            changes.append(f"{self.pooling} pooling")
        if self.activation != "relu":
            changes.append(f"{self.activation} for ReLU")
        return ", ".join(changes) or "the paper's net"


def max_pool(pooling: str):
    """The max-pooling after LRN1, LRN2 and conv5 (section 3.4)."""
    window, stride = POOLINGS[pooling]
    return nn.MaxPool2d(kernel_size=window, stride=stride)


def check_images(x: torch.Tensor, conv1: nn.Conv2d, pool: nn.MaxPool2d) -> None:
    """Raises ValueError naming the fix for images that the net, of this ``conv1`` and
    ``pool``, cannot take: anything but a batch N x 3 x H x W, or a size whose conv5 maps
    pool to other than POOL5_SHAPE's (which FC6 takes); torch's own errors would say neither."""
    if x.dim() != 4 or x.shape[1] != conv1.in_channels:
        one = " (one image: give it as a batch of one, x[None])" if x.dim() == 3 else ""
        raise ValueError(f"the net takes a batch of images, N x {conv1.in_channels} x H x W; got a tensor of shape "
                         f"{tuple(x.shape)}{one}")
    pooled = []
    for axis, side in enumerate(x.shape[2:]):
        side = (side + 2 * conv1.padding[axis] - conv1.kernel_size[axis]) // conv1.stride[axis] + 1
        for _ in range(3):  # after LRN1, LRN2 and conv5; the other convolutions keep the size
            side = max(0, (side - _pair(pool.kernel_size)[axis]) // _pair(pool.stride)[axis] + 1)
        pooled.append(side)
    if min(pooled) == 0:
        raise ValueError(f"images of {x.shape[2]} x {x.shape[3]} pixels are too small for the net's layers: give "
                         f"{INPUT_SIZE} x {INPUT_SIZE} images, the paper's crops")
    if tuple(pooled) != POOL5_SHAPE[1:]:
        raise ValueError(f"images of {x.shape[2]} x {x.shape[3]} pixels pool to conv5 maps of "
                         f"{' x '.join(map(str, pooled))}, not the {POOL5_SHAPE[1]} x {POOL5_SHAPE[2]} that FC6 takes: "
                         f"give {INPUT_SIZE} x {INPUT_SIZE} images, the paper's crops")


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class AlexNet(nn.Module):
    """The paper's net on one device (or a variant: ``architecture``). Input:
    N x 3 x 224 x 224; output: N x num_classes logits.

    conv1 uses padding 2 so that 224 maps to 55 (torchvision's convention; the
    paper's 224 with an 11/4 kernel does not divide evenly).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, architecture: Architecture = Architecture()):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.architecture = architecture
        (c1, c2, c3, c4, c5), groups = NETS[architecture.net]
        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2)
        self.lrn1 = LocalResponseNorm(groups=groups) if architecture.lrn else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=groups)
        self.lrn2 = LocalResponseNorm(groups=groups) if architecture.lrn else nn.Identity()
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1)  # sees all maps of both halves
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=groups)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=groups)
        self.pool = max_pool(architecture.pooling)
        self.activation = ACTIVATIONS[architecture.activation]
        self.fc6 = nn.Linear(c5 * POOL5_SHAPE[1] * POOL5_SHAPE[2], FC_FEATURES[0])
        self.fc7 = nn.Linear(FC_FEATURES[0], FC_FEATURES[1])
        self.fc8 = nn.Linear(FC_FEATURES[1], num_classes)
        self.dropout = nn.Dropout(dropout)

    @property
    def num_classes(self) -> int:
        return self.fc8.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.conv1, self.pool)
        act = self.activation
        x = self.pool(self.lrn1(act(self.conv1(x))))  # N x 96 x 27 x 27
        x = self.pool(self.lrn2(act(self.conv2(x))))  # N x 256 x 13 x 13
        x = act(self.conv3(x))
        x = act(self.conv4(x))
        x = self.pool(act(self.conv5(x)))  # N x 256 x 6 x 6
        x = self.dropout(act(self.fc6(x.flatten(1))))
        x = self.dropout(act(self.fc7(x)))
        return self.fc8(x)


def _paper_init(name: str, layer: nn.Module):
    """Section 5: N(0, 0.01^2) everywhere; biases 1 in conv2, conv4, conv5, FC6, FC7, else 0."""
    return 0.01, 1.0 if name in BIAS_ONE_LAYERS else 0.0


def _caffe_init(name: str, layer: nn.Module):
    """The BVLC Caffe reference: FC6/FC7 std 0.005 and biases 0.1 where the paper has 1."""
    return 0.005 if name in ("fc6", "fc7") else 0.01, 0.1 if name in BIAS_ONE_LAYERS else 0.0


def _scaled_init(name: str, layer: nn.Module):
    """0.6 x He et al.'s std, sqrt(2 / fan_in) (fan_in per group), FC8 std 0.001, biases 0:
    every layer starts with activations of about the same size, so the output depends on
    the input from the first step (with the paper's scheme, on raw 0-255 pixels, the
    spread of each logit over images starts near 0.01)."""
    if name == "fc8":
        return 0.001, 0.0
    return 0.6 * math.sqrt(2.0 / layer.weight[0].numel()), 0.0


# Initialisation schemes: layer name, layer -> (weight std, bias). The paper's and the
# Caffe reference's leave the output nearly independent of the input at the start, so
# small generated datasets learn far sooner with 'scaled'.
INIT_SCHEMES = {"paper": _paper_init, "caffe": _caffe_init, "scaled": _scaled_init}


def init_weights(model: nn.Module, seed: int, scheme: str = "paper") -> nn.Module:
    """Draw every weight from N(0, std^2) with a generator seeded by ``seed``, in
    layer order, so that the same seed gives the same net on any machine."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {sorted(INIT_SCHEMES)}")
    from .tower import Tower  # imported here: the tower module imports this one
    if isinstance(model, Tower):  # it would draw both towers the same kernels, none of them the reference's
        raise ValueError("init_weights draws a whole net; a Tower holds half of one: draw the reference and load "
                         "this tower's half, tower.load_state_dict(shard_state_dict(build_reference(num_classes, "
                         "seed).state_dict(), tower.tower_rank, tower.fc8_placement))")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(model, name)
            std, bias = INIT_SCHEMES[scheme](name, layer)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64).mul_(std))
            layer.bias.fill_(bias)
    return model


def build_reference(num_classes: int = 1000, seed: int = 0, dropout: float = 0.5, init: str = "paper",
                    architecture: Architecture = Architecture()) -> AlexNet:
    with torch.device("meta"):  # no default initialisation: init_weights draws every parameter
        model = AlexNet(num_classes, dropout, architecture)
    return init_weights(allocate(model), seed, init)


def allocate(model: nn.Module) -> nn.Module:
    """Storage on the CPU, left as it is, for every parameter of a model built on the meta
    device: for weights about to be drawn or loaded. (``Module.to_empty`` does the same,
    but imports sympy on the way: 0.4 s.)"""
    if not all(p.is_meta for p in model.parameters()):  # it would replace weights with whatever memory held
        raise ValueError("allocate gives storage to the parameters of a model built on the meta device (in a "
                         "'with torch.device(\"meta\"):' block); this model holds weights already: use it as it is")
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
    assert not any(t.is_meta for t in model.state_dict().values()), "a buffer: give it storage here"
    return model
