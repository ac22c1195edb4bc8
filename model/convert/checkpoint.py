"""The training checkpoint of an unfinished `kvserve convert` run.

One file, `<output>.partial/checkpoint.pt`, written atomically (a temporary file renamed over the
old one), holding what a step depends on: the trained tensors, the optimizer state, the next step,
the wall time spent so far, the history of measurements, and the recovery state
(model.convert.recovery: the learning-rate scale, the recent training KLs, the last good snapshot
and the best validated one, each with its optimizer state). The batch of a step is a function of
(seed, step) (`TrainingText.batch`), so no random-number state is needed to continue exactly where
an uninterrupted run would have been.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model.convert.options import ConvertOptions

FORMAT = 2


@dataclass(slots=True)
class TrainState:
    step: int = 0                                    # the next distillation step
    elapsed_s: float = 0.0                           # fit + distillation wall time, all sessions together
    fit_s: float = 0.0                               # of which the calibrated initialisation
    tensors: dict[str, Tensor] = field(default_factory=dict)     # trained tensors (init included)
    optimizer: dict = field(default_factory=dict)    # torch.optim state_dict; empty before the first step
    history: dict = field(default_factory=dict)      # measurements (validation KL, fit errors, ...)
    lr_scale: float = 1.0                            # halved by each rollback
    recent_kl: list[float] = field(default_factory=list)  # the last accepted training KLs (spike detection)
    skips_in_row: int = 0                            # consecutive steps skipped for non-finite numbers
    good: dict = field(default_factory=dict)         # the snapshot a loss spike rolls back to
    best: dict = field(default_factory=dict)         # the best validated snapshot: what is written


_FIELDS = TrainState.__dataclass_fields__


def checkpoint_path(opts: ConvertOptions) -> Path:
    return opts.checkpoint_dir / "checkpoint.pt"


def save_checkpoint(opts: ConvertOptions, state: TrainState) -> None:
    path = checkpoint_path(opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, "run": opts.run_key(), **{name: getattr(state, name) for name in _FIELDS}}, tmp)
    os.replace(tmp, path)


def load_checkpoint(opts: ConvertOptions) -> TrainState | None:
    """The saved state of this run, or None when there is none; ValueError when the checkpoint
    belongs to a run with different options."""
    path = checkpoint_path(opts)
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        raise ValueError(f"{path} was written by another version of kvserve convert: delete {opts.checkpoint_dir}")
    differing = [f"--{name.replace('_', '-')} {saved['run'][name]} (now {value})"
                 for name, value in opts.run_key().items() if saved["run"].get(name) != value]
    if differing:
        raise ValueError(f"{opts.checkpoint_dir} holds an unfinished run with {', '.join(differing)}: rerun with "
                         f"its options to resume it, or delete that directory to start over")
    return TrainState(**{name: saved[name] for name in _FIELDS})
