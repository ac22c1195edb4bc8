"""What keeps a distillation run from diverging, and from writing a diverged model.

Four guards, each cheap next to a step:
- gradient clipping: the trained parameters' gradients are scaled down to a total norm of
  `--clip-norm` before Adam sees them (`clip_gradients`);
- numerics: a step whose KL or gradient norm is not finite is skipped (Adam never sees it) and
  counted; `MAX_SKIPS_IN_ROW` of them in a row roll back like a spike;
- loss spikes: a training KL above `--spike-factor` times the mean of the last `SPIKE_WINDOW`
  accepted ones (`spike_reason`) rolls back to the last good snapshot (taken every
  `--snapshot-every` steps, before the update of a step whose KL was normal) and halves the rate;
- validation: a validation KL above `VALIDATION_TOLERANCE` times the best one rolls back to the best
  validated snapshot and halves the rate (a slow drift that no single batch shows).
A snapshot holds the step, the trained tensors and Adam's state; what is written is the best
validated snapshot, so never a state worse than the initialisation (step 0's validation).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor

SPIKE_WINDOW = 20          # accepted training KLs the spike test averages
SPIKE_MIN_HISTORY = 5      # fewer than this: no spike test yet (validation still guards)
VALIDATION_TOLERANCE = 1.2
MAX_SKIPS_IN_ROW = 3
LR_CUT = 0.5               # each rollback multiplies the learning rate by this


@torch.no_grad()
def clip_gradients(params: list[Tensor], max_norm: float) -> float:
    """Scale the gradients in place to a total L2 norm of at most `max_norm`; returns the norm before
    clipping. A non-finite norm leaves the gradients untouched (the caller skips the step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                       for g in grads])))
    if math.isfinite(norm) and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / norm)
    return norm


def spike_reason(kl: float, recent: list[float], factor: float) -> str | None:
    """Why training KL `kl` is a spike against the `recent` accepted ones, or None when it is not."""
    if len(recent) < SPIKE_MIN_HISTORY:
        return None
    mean = sum(recent) / len(recent)
    if kl > factor * mean:
        return f"training KL {kl:.4g} > {factor:g} x the mean of the last {len(recent)} ({mean:.4g})"
    return None


def take_snapshot(step: int, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                  val_kl: float | None = None) -> dict:
    """A copy of the trained tensors and the optimizer state at `step` (the next step to run)."""
    snap = {"step": step, "tensors": {name: p.detach().clone() for name, p in params.items()},
            "optimizer": copy.deepcopy(optimizer.state_dict())}
    if val_kl is not None:
        snap["val_kl"] = val_kl
    return snap


@torch.no_grad()
def restore_snapshot(snap: dict, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Put a snapshot's tensors and optimizer state back (copies: the snapshot stays as it was)."""
    for name, tensor in snap["tensors"].items():
        params[name].copy_(tensor)
    optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    for p in params.values():
        p.grad = None
