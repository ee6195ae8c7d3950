"""The ranks of a run as a D x T mesh: D replicas of the net, T ranks per replica.

T is 2 for the paper's towers and 1 for a single-device net. Rank r is tower
``r % T`` of replica ``r // T``, so the towers of one replica are neighbouring
ranks (on one machine under ``torchrun --nproc-per-node`` with an even count).

Two kinds of process group, built with ``torch.distributed.new_group``:

  tower group    the T ranks of one replica. The towers' exchanges (conv3's input,
                 FC6-FC8, the logits) and the batch a replica's first tower loads
                 and hands to the other go here, exactly as in a run of one replica.
  replica group  the D ranks holding the same tower index, one per replica. Each
                 tower's gradients are averaged here (DistributedDataParallel over
                 this group), and the step's loss and accuracy and the evaluation's
                 counts are summed. With D = 1 there is none: nothing to average.

For D = 2, T = 2:

    rank  replica  tower  tower group  replica group
       0        0      0       {0, 1}         {0, 2}
       1        0      1       {0, 1}         {1, 3}
       2        1      0       {2, 3}         {0, 2}
       3        1      1       {2, 3}         {1, 3}
"""

import datetime
import os
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist


class Mesh(NamedTuple):
    replicas: int  # D
    towers: int  # T: ranks per replica
    replica: int  # this rank's replica, 0 .. D-1
    tower: int  # this rank's index in its replica, 0 .. T-1
    tower_group: object  # the T ranks of this replica (the default group when D = 1)
    replica_group: Optional[object]  # the D ranks of this tower index; None when D = 1

    @property
    def loads_data(self) -> bool:
        """Each replica's first tower reads and decodes its share of every batch."""
        return self.tower == 0

    def replica_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the replicas (in place; unchanged with one replica)."""
        if self.replica_group is not None:
            dist.all_reduce(values, group=self.replica_group)
        return values


def coordinates(rank: int, towers: int) -> tuple:
    """(replica, tower) of ``rank``."""
    return divmod(rank, towers)


def machine_ranks(rank: int) -> range:
    """The ranks on ``rank``'s machine, as its launcher says: torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE (``launch.two_gpu`` sets both for the ranks it starts). A launcher that
    does not say (one process per container, say): this rank, as far as it knows."""
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return range(rank, rank + 1)
    first = rank - int(os.environ.get("LOCAL_RANK", rank))
    return range(first, first + int(os.environ["LOCAL_WORLD_SIZE"]))


def loading_ranks(ranks: range, towers: int) -> int:
    """How many of one machine's ``ranks`` load data: those that are their replica's first
    tower (ranks 0 and 2 of a machine's 0, 1, 2, with T = 2); at least one."""
    return max(1, len(range(ranks.start + (-ranks.start) % towers, ranks.stop, towers)))


def build_mesh(towers: int, timeout_s: float) -> Mesh:
    """The mesh of the default process group, whose size must be a multiple of ``towers``.
    Collective: every rank calls it, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world % towers == 0, f"{world} ranks do not make replicas of {towers}"
    replicas = world // towers
    replica, tower = coordinates(rank, towers)
    if replicas == 1:
        return Mesh(1, towers, 0, tower, dist.group.WORLD, None)
    timeout = datetime.timedelta(seconds=timeout_s)
    tower_group = replica_group = None
    # Every rank creates every group, in the same order, as new_group requires.
    for r in range(replicas):
        group = dist.new_group([r * towers + t for t in range(towers)], timeout=timeout)
        tower_group = group if r == replica else tower_group
    for t in range(towers):
        group = dist.new_group([r * towers + t for r in range(replicas)], timeout=timeout)
        replica_group = group if t == tower else replica_group
    return Mesh(replicas, towers, replica, tower, tower_group, replica_group)
