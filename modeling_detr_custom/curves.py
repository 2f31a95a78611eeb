"""`training_curves.png`: the loss terms and the validation AP of a run against optimizer steps.

Not remote code. Reads the run's ``metrics.jsonl`` (one JSON object per line, written by the
training loop: ``train_loss_*`` rows every ``--logging_steps``, ``eval_*`` rows after each
evaluation), so the picture of a resumed run covers the whole run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")  # the final decoder layer's terms, unweighted
EVAL_TERMS = ("AP50", "AP")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a truncated last line (a run killed mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a resumed run's repeated steps keep the latest value."""
    points = {int(r["step"]): float(r[key]) for r in rows if isinstance(r.get(key), (int, float))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_training_curves(metrics_path: str | os.PathLike, output_path: str | os.PathLike,
                         title: str | None = None) -> Path:
    """Draw the loss terms (log scale, left) and eval AP / AP50 (right) against steps; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for term in LOSS_TERMS:
        steps, values = series(rows, f"train_{term}")
        if steps:
            loss_axis.plot(steps, values, label=term)
    loss_axis.set(xlabel="optimizer step", ylabel="training loss (final layer, unweighted)", yscale="log",
                  title="loss terms")
    for term in EVAL_TERMS:
        steps, values = series(rows, f"eval_{term}")
        if steps:
            eval_axis.plot(steps, values, marker="o", markersize=3, label=term)
    eval_axis.set(xlabel="optimizer step", ylabel="COCO box metric", ylim=(0, 1), title="validation")
    for axis in (loss_axis, eval_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return Path(output_path)


__all__ = ["read_metrics", "series", "plot_training_curves"]
