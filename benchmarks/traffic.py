"""Bytes each parallel layout moves per training step, from the layer shapes, and a
model of the step time on a link the harness cannot see.

towers (model parallel, Figure 2): per image, each tower sends its share of the
inputs of conv3, FC6 and FC7 forward (all-gather) and the other tower's share of
their gradients backward (reduce-scatter); FC8's input and the logits cross as the
FC8 placement dictates. Traffic grows with the batch, not with the weights.

ddp (data parallel): every step each rank all-reduces the gradient of every
parameter. A ring all-reduce of B bytes over n ranks sends 2(n-1)/n x B bytes from
each rank (reduce-scatter then all-gather), whatever the batch.
"""

from typing import Dict, List

from towers import TOWERS

from .flops import Layer

GATHERED_INPUTS = ("conv3", "fc6", "fc7")  # layers whose input is both towers' maps (Figure 2)


def ring_factor(world_size: int) -> float:
    return 2 * (world_size - 1) / world_size


def tower_sent_elements(reference: Dict[str, Layer], fc8_placement: str) -> List[Dict[str, int]]:
    """Per tower: elements it sends per image, by "exchange/direction" (the keys of
    ``ExchangeLog.as_dict``). ``reference`` is :func:`benchmarks.flops.reference_layers`."""
    def share(layer):  # one tower's half of that layer's input
        elements = reference[layer].in_elements
        assert elements % TOWERS == 0, layer
        return elements // TOWERS

    classes = reference["fc8"].out_shape[0]
    sent = [{}, {}]
    for tower in sent:
        for layer in GATHERED_INPUTS:
            tower[f"{layer}_input/forward"] = share(layer)  # all-gather: its own maps
            tower[f"{layer}_input/backward"] = share(layer)  # reduce-scatter: the other's maps' gradient
    if fc8_placement == "split":
        for tower in sent:
            tower["fc8_input/forward"] = tower["fc8_input/backward"] = share("fc8")
            tower["logits/forward"] = classes // TOWERS  # all-gather of its 500 logits
    else:  # FC8 whole on tower 0
        sent[1]["fc8_input/forward"] = share("fc8")
        sent[0]["fc8_input/backward"] = share("fc8")  # gradient of tower 1's FC7 output
        sent[0]["logits/forward"] = classes  # broadcast for tower 1's copy of the loss
    return sent


def exchange_calls(reference: Dict[str, Layer], fc8_placement: str) -> int:
    """Collectives per step (each exchange and direction is one call on both towers)."""
    return len(set().union(*tower_sent_elements(reference, fc8_placement)))


def towers_bytes_per_rank(reference: Dict[str, Layer], fc8_placement: str, batch: int, element_size: int) -> List[int]:
    """Bytes each tower sends per step, both towers seeing the whole ``batch``."""
    return [sum(tower.values()) * batch * element_size for tower in tower_sent_elements(reference, fc8_placement)]


def ddp_payload_bytes(num_params: int, grad_element_size: int = 4) -> int:
    """The gradient bytes one rank hands to all-reduce per step (gradients keep the
    parameters' dtype, fp32, under autocast too)."""
    return num_params * grad_element_size


DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_CAP_BYTES = 2**20, 25 * 2**20  # DistributedDataParallel's defaults


def ddp_buckets(param_sizes: list, element_size: int = 4) -> int:
    """How many all-reduces DistributedDataParallel makes of a step's gradients, after its first
    (one bucket), of parameters of ``param_sizes`` elements in the module's order: it rebuilds
    its buckets in the order the gradients became ready (about the reverse of the module's; a
    layer's weight and bias in either order give these counts), each closed once it holds its
    limit (the first 1 MiB, with the default bucket_cap_mb; the others 25 MiB), a layer too
    large for one filling one of its own (AlexNet's FC6 and FC7: four buckets in all, not ten)."""
    buckets, filled, limit = 0, 0, DDP_FIRST_BUCKET_BYTES
    for size in reversed(param_sizes):
        filled += size * element_size
        if filled >= limit:
            buckets, filled, limit = buckets + 1, 0, DDP_BUCKET_CAP_BYTES
    return buckets + (filled > 0)


def ddp_bytes_per_rank(num_params: int, world_size: int = TOWERS, grad_element_size: int = 4) -> float:
    """Bytes one rank sends per step in a ring all-reduce of all gradients."""
    return ring_factor(world_size) * ddp_payload_bytes(num_params, grad_element_size)


def crossover_batch(reference: Dict[str, Layer], fc8_placement: str, num_params: int, activation_size: int,
                    grad_element_size: int = 4, world_size: int = TOWERS) -> float:
    """The global batch at which the towers' activation traffic (both towers together)
    equals data parallel's gradient traffic (all ranks together)."""
    towers_per_image = sum(towers_bytes_per_rank(reference, fc8_placement, 1, activation_size))
    return world_size * ddp_bytes_per_rank(num_params, world_size, grad_element_size) / towers_per_image


def link_time_s(bytes_per_direction: float, calls: int, bandwidth_gb_s: float, latency_us: float) -> float:
    """Seconds to move ``bytes_per_direction`` over a full-duplex link of ``bandwidth_gb_s``
    (10^9 bytes/s each way) in ``calls`` transfers of ``latency_us`` start-up each."""
    return bytes_per_direction / (bandwidth_gb_s * 1e9) + calls * latency_us * 1e-6


def hybrid_bytes_per_rank(reference: Dict[str, Layer], fc8_placement: str, batch: int, replicas: int,
                          element_size: int, tower_params: List[int], grad_element_size: int = 4) -> Dict[str, list]:
    """Per tower index, the bytes one rank of ``replicas`` replicas of the towers sends per
    step: its exchanges with the other tower on its replica's ``batch / replicas`` images,
    and its ring all-reduce of its tower's gradients over the replicas."""
    return {"exchange": towers_bytes_per_rank(reference, fc8_placement, batch // replicas, element_size),
            "gradients": [ddp_bytes_per_rank(params, replicas, grad_element_size) for params in tower_params]}
