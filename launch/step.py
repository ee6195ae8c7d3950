"""The training step: one home for it, used by the launcher and the benchmarks alike.

Every model the project trains (the reference, a tower, the reference under DDP)
returns full N x K logits on the rank that calls it, so the step is the same
code for every mode: the parallelism lives in the model it is handed.
"""

from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class StepResult(NamedTuple):
    loss: torch.Tensor  # scalar, detached
    correct: torch.Tensor  # number of top-1 hits in the batch, detached


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None) -> StepResult:
    autocast = (torch.autocast(images.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else nullcontext())
    with autocast:
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return StepResult(loss.detach(), (logits.argmax(dim=1) == labels).sum().detach())


def paper_optimizer(params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """Section 5: SGD, momentum 0.9, weight decay 0.0005. Each tower has its own."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
