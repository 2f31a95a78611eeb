"""An exponential moving average of the model's weights (``--ema_decay``; off by default, the paper has none).

As RT-DETR and D-FINE: after optimizer update ``n`` (1-based) the average moves towards the weights with

    decay_n = ema_decay * (1 - exp(-n / ema_warmup_steps))
    ema     = decay_n * ema + (1 - decay_n) * weights

so early averages follow the fast-changing weights closely. Floating-point parameters are averaged; buffers
(frozen BatchNorm statistics, loss weights, integer counters) are copied, since averaging frozen values would
only add rounding. Every process applies the same update to the same (all-reduced) weights, so the averages
stay identical without communication. The state (average + update count) goes into every checkpoint through
`accelerator.register_for_checkpointing`, so a resume continues it bit for bit.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


class ModelEMA:
    """The moving average of ``model`` (an unwrapped module), kept as a frozen copy in eval mode."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup_steps: int) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1), e.g. 0.9999; got {decay!r}")
        if warmup_steps < 0:
            raise ValueError(f"--ema_warmup_steps must be >= 0; got {warmup_steps!r}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup_steps, self.updates = decay, warmup_steps, 0

    def current_decay(self) -> float:
        """The decay of the next update (host arithmetic: no device sync)."""
        if not self.warmup_steps:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s weights (call after every optimizer step)."""
        decay = self.current_decay()
        averaged, current = [], []
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            if ema_p.dtype.is_floating_point:
                averaged.append(ema_p)
                current.append(p.detach())
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
