"""The training step: one home for it, used by the launcher and the benchmarks alike.

Every model the project trains (the reference, a tower, the reference under DDP)
returns full N x K logits on the rank that calls it, so the step is the same
code for every mode: the parallelism lives in the model it is handed.
"""

from collections import defaultdict
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


# Precision -> train_step's autocast_dtype: the program's --precision and the benchmark's sweep.
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


# Said of a GPU for which native_bf16() is False.
NO_NATIVE_BF16 = "no bfloat16 arithmetic of its own (an emulation, slower than fp32)"


def native_bf16() -> bool:
    """Whether the GPU computes in bfloat16 itself (torch.cuda.is_bf16_supported() alone also says
    so of one that emulates it, more slowly than float32)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def convolution_math() -> str:
    """What a float32 convolution runs as on a GPU, "tf32" or "fp32": cuDNN uses TF32 tensor
    cores unless told not to (torch's setting since 2.9, which allow_tf32 sets too)."""
    return "tf32" if torch.backends.cudnn.conv.fp32_precision == "tf32" else "fp32"


class StepResult(NamedTuple):
    loss: torch.Tensor  # scalar, detached
    correct: torch.Tensor  # number of top-1 hits in the batch, detached


def train_step(model: torch.nn.Module, optimizer: "PaperSGD", images: torch.Tensor,
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


class PaperSGD:
    """Section 5's update: SGD with momentum and weight decay, in the arithmetic of
    ``torch.optim.SGD(params, lr, momentum, weight_decay=...)`` bit for bit (its momentum
    buffer, its order of operations), so that checkpoints and results are those of torch's
    optimizer. The paper writes the velocity in units of the weights (v = -lr * buffer):
    the two agree while the rate is constant; at a rate drop the buffer keeps its size and
    the velocity shrinks with the rate.

    Written out for two reasons: torch's optimizers import the compiler (torch._dynamo) on
    first use, more than a second at the start of every rank; and the weight decay is added
    to the gradients in place, where torch's SGD allocates a copy of every gradient each
    step (on a CPU, fresh memory costs more than the arithmetic). So after ``step`` a
    parameter's ``.grad`` holds its gradient plus the decay. The multi-tensor
    ``torch._foreach`` kernels are those torch's SGD uses on a GPU."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float):
        self.param_groups = [{"params": list(params), "lr": lr, "momentum": momentum, "weight_decay": weight_decay}]
        self.state = defaultdict(dict)  # parameter -> {"momentum_buffer": tensor}, as torch.optim keeps it

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            steps = [p.grad for p in params]
            if group["weight_decay"]:
                torch._foreach_add_(steps, params, alpha=group["weight_decay"])
            if group["momentum"]:
                buffers = [self.state[p].get("momentum_buffer") for p in params]
                old = [i for i, b in enumerate(buffers) if b is not None]
                if old:
                    torch._foreach_mul_([buffers[i] for i in old], group["momentum"])
                    torch._foreach_add_([buffers[i] for i in old], [steps[i] for i in old])
                for i, b in enumerate(buffers):
                    if b is None:  # the first step: the buffer starts as the gradient
                        buffers[i] = self.state[params[i]]["momentum_buffer"] = steps[i].clone()
                steps = buffers
            torch._foreach_add_(params, steps, alpha=-group["lr"])


PAPER_MOMENTUM, PAPER_WEIGHT_DECAY = 0.9, 5e-4  # section 5


def paper_optimizer(params, lr: float, momentum: float = PAPER_MOMENTUM,
                    weight_decay: float = PAPER_WEIGHT_DECAY) -> PaperSGD:
    """Section 5: SGD with momentum and weight decay (0.9 and 0.0005). Each tower has its own."""
    return PaperSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
