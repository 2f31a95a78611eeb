"""What the loop watches: the running loss (summed on the device, read once per interval), signals, divergence.

A training step reads nothing back from the device but the matcher's one transfer. The loss terms of every
micro-step stay on the device until `RunningLoss.read`, which the loop calls every ``--logging_steps`` optimizer
steps and before anything that uses the weights (a checkpoint, an evaluation, the final save). That read is one
collective plus one host transfer for the whole interval, and it is where a non-finite loss stops the run, a
blow-up is warned about and a SIGTERM/SIGINT on any process is seen.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..outputs import METRICS_FILE

logger = logging.getLogger(__name__)

LOSS_BLOWUP_FACTOR = 100.0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stopped without saving that state."""


@dataclass(frozen=True)
class IntervalReading:
    """The steps since the last log, over all processes.

    Attributes:
        terms: each loss term's mean over the interval's micro-steps and processes.
        step_losses: (global step, epoch, loss averaged over processes) of every micro-step, in order.
        micro_steps, samples: summed over processes.
        stop: a process received SIGTERM/SIGINT.
    """

    terms: dict[str, float]
    step_losses: list[tuple[int, int, float]]
    micro_steps: int
    samples: int
    stop: bool


class RunningLoss:
    """The loss terms of the micro-steps since the last log, kept on the device (no host sync to add one)."""

    def __init__(self) -> None:
        self.keys: list[str] | None = None  # fixed by the first step: the same on every process and step
        self.reset()

    def reset(self) -> None:
        self.terms: list[Tensor | None] = []  # (len(keys),) per micro-step; None: refused by the matcher
        self.losses: list[Tensor] = []  # () per micro-step
        self.steps: list[tuple[int, int]] = []  # (global step, epoch) per micro-step
        self.samples, self.start = 0, time.perf_counter()

    def add(self, loss: Tensor, loss_dict: Mapping[str, Tensor], samples: int, step: int, epoch: int) -> None:
        """``loss_dict`` empty: the matcher refused this micro-step's predictions (``loss`` is NaN)."""
        if loss_dict:
            self.keys = self.keys or sorted(loss_dict)
        self.terms.append(torch.stack([loss_dict[k].detach().float() for k in self.keys]) if loss_dict else None)
        self.losses.append(loss.detach().float().reshape(()))
        self.steps.append((step, epoch))
        self.samples += samples

    def read(self, accelerator: Any, stop_requested: bool) -> IntervalReading:
        """Sum over processes and read to the host: the interval's one collective and one transfer."""
        keys = self.keys or []
        device = accelerator.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # exact sums of float32 values
        kept = [t for t in self.terms if t is not None]
        sums = torch.stack(kept).to(dtype).sum(0) if kept else torch.zeros(len(keys), dtype=dtype, device=device)
        counts = torch.tensor([len(self.losses), self.samples, float(stop_requested)], dtype=dtype, device=device)
        losses = torch.stack(self.losses).to(dtype) if self.losses else torch.zeros(0, dtype=dtype, device=device)
        values = accelerator.reduce(torch.cat([sums.to(device), counts, losses.to(device)]), reduction="sum")
        host = values.tolist()  # the host sync of the interval
        micro_steps = int(host[len(keys)])
        per_step = host[len(keys) + 3:]
        return IntervalReading(
            terms={k: v / max(micro_steps, 1) for k, v in zip(keys, host[:len(keys)])},
            step_losses=[(s, e, v / accelerator.num_processes) for (s, e), v in zip(self.steps, per_step)],
            micro_steps=micro_steps, samples=int(host[len(keys) + 1]), stop=host[len(keys) + 2] > 0)

    def step_terms(self, step: int) -> dict[str, float] | None:
        """This process's loss terms of ``step`` (for an error message), None if the matcher refused it."""
        found = next((t for (s, _), t in zip(self.steps, self.terms) if s == step and t is not None), None)
        if found is None or self.keys is None:
            return None
        return {k: round(v, 5) for k, v in zip(self.keys, found.tolist()) if not k[-1].isdigit()}


class LossWatch:
    """Stops on a non-finite loss and warns (once) when the loss exceeds LOSS_BLOWUP_FACTOR x the first step's."""

    def __init__(self) -> None:
        self.first_loss: float | None = None
        self.warned = False

    def check(self, reading: IntervalReading, running: RunningLoss, last_checkpoint: Path | None) -> str | None:
        """Raise NonFiniteLossError at the first non-finite micro-step; return a blow-up warning to log, if any."""
        message = None
        for step, epoch, loss in reading.step_losses:
            if not math.isfinite(loss):
                raise NonFiniteLossError(non_finite_message(step, epoch, loss, running.step_terms(step),
                                                            last_checkpoint))
            if self.first_loss is None:
                self.first_loss = loss
            elif not self.warned and loss > LOSS_BLOWUP_FACTOR * self.first_loss > 0:
                self.warned = True
                message = (f"loss {loss:.4g} at step {step} is over {LOSS_BLOWUP_FACTOR:g}x the first step's loss "
                           f"({self.first_loss:.4g}): training is diverging; the last good checkpoint is "
                           f"{last_checkpoint or 'none yet'}. Try a lower --learning_rate or --max_grad_norm 0.1")
        return message


def non_finite_message(step: int, epoch: int, loss: float, terms: dict[str, float] | None,
                       last_checkpoint: Path | None) -> str:
    shown = terms if terms is not None else "none, its predictions are NaN or Inf (the Hungarian matcher refused them)"
    return (f"non-finite loss ({loss}) at step {step}, epoch {epoch}; loss terms of this process: {shown}. Training "
            f"stopped and this state was NOT saved; the last good checkpoint is {last_checkpoint or 'none yet'}. Try "
            "a lower --learning_rate, --max_grad_norm 0.1, --mixed_precision no, or check the data.")


class MetricsLogger:
    """Metrics to accelerate's trackers and, on the main process, to ``metrics.jsonl`` (appended,
    so a resumed run continues the same file)."""

    def __init__(self, accelerator: Any, output_dir: Path) -> None:
        self.accelerator, self.path = accelerator, output_dir / METRICS_FILE

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(numeric, step=step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop sees it at its next read (within ``--logging_steps`` steps, on every
    process at once), checkpoints and exits. A second signal restores the default behaviour (a second Ctrl-C kills
    at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning("received %s: writing a checkpoint within the next --logging_steps steps, then exiting",
                       signal.Signals(signum).name)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
