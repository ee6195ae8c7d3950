"""The network of Krizhevsky, Sutskever and Hinton (2012) as one plain module.

This is the single-device control: it computes exactly the function of the two
towers in :mod:`towers.tower` and imports nothing from ``torch.distributed``.
The two GPUs of the paper survive here only as structure: ``groups=2`` on
conv2, conv4 and conv5, and a response normalisation that never crosses the
boundary between the two halves of the channels.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Per-layer (out_channels or out_features) of the whole net; each tower holds half.
CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_FEATURES = (4096, 4096)
POOL5_SHAPE = (256, 6, 6)  # channels, height, width after the last max-pool
INPUT_SIZE = 224

# Layers whose bias the paper sets to 1 (section 5); all other biases are 0.
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


class LocalResponseNorm(nn.Module):
    """The paper's LRN, b_i = a_i / (k + alpha * sum_j a_j^2)^beta, applied to
    each of ``groups`` channel blocks separately.

    The sum runs over the ``size`` maps centred on i (clipped at the edges of
    the block), exactly as in section 3.3. Convention: ``alpha`` is the paper's
    (1e-4). ``torch.nn.functional.local_response_norm`` (like Caffe and the
    authors' cuda-convnet) divides its alpha by ``size``, so it is handed
    ``alpha * size`` below. ``groups=2`` reproduces the two-GPU net, where the
    neighbourhood never reaches the other GPU's maps.
    """

    def __init__(self, groups: int = 1, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.groups, self.size, self.alpha, self.beta, self.k = groups, size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.chunk(self.groups, dim=1)
        normed = [F.local_response_norm(b, self.size, alpha=self.alpha * self.size, beta=self.beta, k=self.k) for b in blocks]
        return normed[0] if self.groups == 1 else torch.cat(normed, dim=1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, size={self.size}, alpha={self.alpha} (paper convention), beta={self.beta}, k={self.k}"


def overlapping_pool(x: torch.Tensor) -> torch.Tensor:
    """Section 3.4: 3x3 windows with stride 2."""
    return F.max_pool2d(x, kernel_size=3, stride=2)


class AlexNet(nn.Module):
    """The paper's net on one device. Input: N x 3 x 224 x 224; output: N x num_classes logits.

    conv1 uses padding 2 so that 224 maps to 55 (torchvision's convention; the
    paper's 224 with an 11/4 kernel does not divide evenly).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        c1, c2, c3, c4, c5 = CONV_CHANNELS
        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2)
        self.lrn1 = LocalResponseNorm(groups=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=2)
        self.lrn2 = LocalResponseNorm(groups=2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1)  # sees all maps of both halves
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=2)
        self.fc6 = nn.Linear(c5 * 6 * 6, FC_FEATURES[0])
        self.fc7 = nn.Linear(FC_FEATURES[0], FC_FEATURES[1])
        self.fc8 = nn.Linear(FC_FEATURES[1], num_classes)
        self.dropout = nn.Dropout(dropout)

    @property
    def num_classes(self) -> int:
        return self.fc8.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = overlapping_pool(self.lrn1(F.relu(self.conv1(x))))  # N x 96 x 27 x 27
        x = overlapping_pool(self.lrn2(F.relu(self.conv2(x))))  # N x 256 x 13 x 13
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = overlapping_pool(F.relu(self.conv5(x)))  # N x 256 x 6 x 6
        x = self.dropout(F.relu(self.fc6(x.flatten(1))))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)


# Initialisation schemes, as (weight std per layer, bias per layer).
#   paper: section 5, N(0, 0.01^2) everywhere; biases 1 in conv2, conv4, conv5, FC6, FC7.
#   caffe: the BVLC Caffe reference: biases 0.1 instead of 1, FC6/FC7 std 0.005. The paper's
#          biases of 1 saturate nothing but make the output nearly independent of the input at
#          the start, so small generated datasets learn far sooner with this one.
INIT_SCHEMES = {
    "paper": ({}, 1.0),
    "caffe": ({"fc6": 0.005, "fc7": 0.005}, 0.1),
}


def init_weights(model: nn.Module, seed: int, scheme: str = "paper") -> nn.Module:
    """Draw every weight from N(0, std^2) with a generator seeded by ``seed``, in
    layer order, so that the same seed gives the same net on any machine."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {sorted(INIT_SCHEMES)}")
    std_overrides, bias_one = INIT_SCHEMES[scheme]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(model, name)
            std = std_overrides.get(name, 0.01)
            weight = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64) * std
            layer.weight.copy_(weight)
            layer.bias.fill_(bias_one if name in BIAS_ONE_LAYERS else 0.0)
    return model


def build_reference(num_classes: int = 1000, seed: int = 0, dropout: float = 0.5, init: str = "paper") -> AlexNet:
    return init_weights(AlexNet(num_classes, dropout), seed, init)
