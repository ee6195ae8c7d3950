"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) split into the paper's two towers."""

from .exchange import ExchangeLog
from .reference import TOWERS, AlexNet, Architecture, LocalResponseNorm, allocate, build_reference, init_weights
from .sharding import FC8_PLACEMENTS, shard_state_dict, unshard_state_dicts
from .tower import Tower, compile_blocks

__all__ = [
    "AlexNet", "Architecture", "ExchangeLog", "FC8_PLACEMENTS", "LocalResponseNorm", "TOWERS", "Tower",
    "allocate", "build_reference", "compile_blocks", "init_weights", "shard_state_dict", "unshard_state_dicts",
]
