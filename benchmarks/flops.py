"""Work per layer, from the layer shapes, and the peak throughput of known GPUs.

Convention: one multiply-add (MAC) is 2 FLOPs, and a training step costs 3x the
forward pass (the backward computes a gradient for the layer's input and one for
its weights, each as costly as the forward), so training FLOPs = 6 x forward MACs.
Only convolutions and fully connected layers are counted: ReLU, LRN, pooling, the
loss and the optimizer are well under 1 % of AlexNet's arithmetic. The 3x is kept
for conv1 although autograd takes no gradient for the images (conv1 is ~15 % of
the forward MACs, so the true training cost is ~5 % below the convention).
"""

from dataclasses import dataclass
import re
from typing import Callable, Dict, Optional

import torch
from torch import nn

from towers.reference import INPUT_SIZE, AlexNet
from towers import TOWERS, shard_state_dict

TRAINING_FLOPS_PER_MAC = 2 * 3  # 2 FLOPs per MAC; forward + backward = 3 x forward


@dataclass(frozen=True)
class Layer:
    in_shape: tuple  # per image, e.g. (256, 13, 13) for conv3 or (9216,) for FC6
    out_shape: tuple
    macs: int  # forward multiply-adds per image

    @property
    def in_elements(self) -> int:
        return torch.Size(self.in_shape).numel()


def layer_table(build: Callable[[], nn.Module]) -> Dict[str, Layer]:
    """Every conv and FC layer of the model ``build()`` makes, by module name, in forward order.

    The shapes come from one forward of a single 3 x 224 x 224 image on the meta device
    (no memory, no arithmetic); the MACs from those shapes and the layer's hyperparameters.
    """
    with torch.device("meta"):
        model = build().eval()
    table, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            in_shape, out_shape = tuple(inputs[0].shape[1:]), tuple(output.shape[1:])
            if isinstance(module, nn.Conv2d):
                # each output element sums (in_channels / groups) x kh x kw products
                kh, kw = module.kernel_size
                macs = torch.Size(out_shape).numel() * (module.in_channels // module.groups) * kh * kw
            else:
                macs = module.in_features * module.out_features
            table[name] = Layer(in_shape, out_shape, macs)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(record(name)))
    with torch.no_grad():
        model(torch.empty(1, 3, INPUT_SIZE, INPUT_SIZE, device="meta"))
    for h in hooks:
        h.remove()
    return table


def reference_layers(num_classes: int = 1000) -> Dict[str, Layer]:
    return layer_table(lambda: AlexNet(num_classes))


def torchvision_layers(num_classes: int = 1000) -> Dict[str, Layer]:
    import torchvision  # slow to import: only where needed, never in a rank that does not use it
    return layer_table(lambda: torchvision.models.alexnet(num_classes=num_classes))


def param_sizes(build: Callable[[], nn.Module]) -> list:
    """The net's parameters, as numbers of elements in its order, on the meta device."""
    with torch.device("meta"):
        return [p.numel() for p in build().parameters()]


def count_params(build: Callable[[], nn.Module]) -> int:
    return sum(param_sizes(build))


def tower_param_sizes(fc8_placement: str, num_classes: int = 1000) -> list:
    """Each tower's parameters, as numbers of elements in the tower's order: its shard of the
    reference (towers.sharding), on the meta device."""
    with torch.device("meta"):
        reference = AlexNet(num_classes).state_dict()
    return [[v.numel() for v in shard_state_dict(reference, r, fc8_placement).values()] for r in range(TOWERS)]


def tower_param_counts(fc8_placement: str, num_classes: int = 1000) -> list:
    """Parameters each tower holds."""
    return [sum(sizes) for sizes in tower_param_sizes(fc8_placement, num_classes)]


def tower_macs(reference: Dict[str, Layer], tower_rank: int, fc8_placement: str) -> int:
    """Forward MACs per image of one tower. Every layer's output neurons are split in
    half (towers.sharding) and each output costs the same, so a tower does half of
    each layer's MACs; FC8 whole on tower 0 is the exception."""
    total = 0
    for name, layer in reference.items():
        if name == "fc8" and fc8_placement == "tower0":
            total += layer.macs if tower_rank == 0 else 0
        else:
            assert layer.macs % TOWERS == 0, name
            total += layer.macs // TOWERS
    return total


def training_flops(macs_per_image: int, batch: int) -> int:
    return TRAINING_FLOPS_PER_MAC * macs_per_image * batch


# Peak dense throughput (no structured sparsity) in TFLOP/s, from NVIDIA's data sheets
# (their tensor-core figures are quoted "with sparsity": halved here). Matched against
# torch.cuda.get_device_name in this order, so the more specific names come first.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},  # SXM5
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},  # SXM; same chip as H100 SXM5
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def gpu_peak(device_name: str) -> Optional[tuple]:
    """(table key, {math: TFLOP/s}) for a known GPU, else None."""
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if all(re.search(rf"\b{re.escape(word)}\b", device_name, re.IGNORECASE) for word in key.split()):
            return key, peaks
    return None

