"""Distillation of a converted model from the original: minimise KL(teacher || student).

The teacher is the unconverted checkpoint, the student the converted one; both see the same
batch and the student's chosen parameters (`--train`, the K/V projections by default) follow Adam
on the mean KL of their next-token distributions at every position (learning rate: a cosine to a
tenth over `--steps` when given, else constant). The student's attention is
the flash attention, so its backward is `model.flash_backward`. A step's batch is a function of
(seed, step), the optimizer state is checkpointed with the tensors, so a resumed run continues
exactly; the run stops at the step budget, at the wall-clock budget (counted across sessions), or
between two steps when asked to (a signal), saving a checkpoint each time.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from model.convert.checkpoint import TrainState, save_checkpoint
from model.convert.data import TrainingText
from model.convert.kl import kl_divergence
from model.convert.options import ConvertOptions
from model.transformer import Transformer


def _kl(teacher: Transformer, student: Transformer, ids: Tensor) -> Tensor:
    """Mean KL(teacher || student) over every position of ids (B, T); differentiable in the student."""
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(ids).float(), dim=-1).flatten(0, 1)  # (B*T, V)
    return kl_divergence(student(ids).flatten(0, 1), teacher_logp)


@torch.no_grad()
def validation_kl(teacher: Transformer, student: Transformer, data: TrainingText, batch_size: int) -> float:
    """Mean KL on the held-out sequences."""
    total = 0.0
    for rows in data.val.split(batch_size):
        total += float(_kl(teacher, student, rows)) * len(rows)
    return total / len(data.val)


class Distiller:
    """Runs distillation steps on `student` (its trained parameters must not be shared with `teacher`)."""

    def __init__(self, teacher: Transformer, student: Transformer, data: TrainingText, opts: ConvertOptions,
                 state: TrainState, log: Callable[[str], None]):
        self.teacher, self.student, self.data, self.opts, self.state, self.log = teacher, student, data, opts, state, log
        self.params = {name: p for name, p in student.named_parameters() if opts.trains(name)}
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=opts.lr)
        if state.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
        self._stop_requested = False

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from `run` (safe from a signal handler)."""
        self._stop_requested = True

    def learning_rate(self, step: int) -> float:
        """With a step budget, a cosine from --lr down to a tenth of it at the last step; under a
        wall-clock budget alone, constant (a schedule over time would make runs unrepeatable)."""
        lr, steps = self.opts.lr, self.opts.steps
        if not steps:
            return lr
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, steps) / steps)))

    def step(self) -> float:
        """One optimizer step on the batch of step `state.step`; returns its KL."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.state.step)
        ids = self.data.batch(self.state.step, self.opts.batch_size, self.opts.seed).to(self.student.device)
        loss = _kl(self.teacher, self.student, ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return float(loss.detach())

    def _budget_left(self) -> bool:
        opts, state = self.opts, self.state
        if opts.steps is not None and state.step >= opts.steps:
            return False
        return opts.max_minutes is None or state.elapsed_s < opts.max_minutes * 60

    def _time_left(self, step_s: float) -> float:
        """Seconds until the first budget runs out, at the recent step time."""
        opts, state = self.opts, self.state
        left = float("inf")
        if opts.steps is not None:
            left = (opts.steps - state.step) * step_s
        if opts.max_minutes is not None:
            left = min(left, opts.max_minutes * 60 - state.elapsed_s)
        return max(0.0, left)

    def _save(self) -> None:
        self.state.tensors = {name: p.detach().clone() for name, p in self.params.items()}
        self.state.optimizer = self.optimizer.state_dict()
        save_checkpoint(self.opts, self.state)

    def _evaluate(self) -> None:
        kl = validation_kl(self.teacher, self.student, self.data, self.opts.batch_size)
        self.state.history.setdefault("val_kl", []).append([self.state.step, kl])
        self.log(f"step {self.state.step}: validation KL {kl:.4f}")

    def run(self, on_step: Callable[[Distiller, float], None] | None = None) -> bool:
        """Steps until a budget runs out or a stop is requested; True when a budget ran out.

        The wall-clock budget counts everything here: steps, validations and checkpoints."""
        opts, state = self.opts, self.state
        tokens_per_step = opts.batch_size * opts.seq_len
        bar = tqdm(total=opts.steps, initial=state.step, desc="distilling", unit="step", file=sys.stderr,
                   disable=not opts.progress, dynamic_ncols=True)
        clock = last_save = time.monotonic()
        step_s = None

        def account() -> None:
            nonlocal clock
            now = time.monotonic()
            state.elapsed_s += now - clock
            clock = now

        with bar:
            if not state.history.get("val_kl"):
                self._evaluate()
                account()
            while self._budget_left() and not self._stop_requested:
                start = time.monotonic()
                loss = self.step()
                took = time.monotonic() - start
                step_s = took if step_s is None else 0.9 * step_s + 0.1 * took
                account()
                state.history.setdefault("train_kl", []).append([state.step, loss])
                bar.update()
                bar.set_postfix_str(f"KL {loss:.3f}, {tokens_per_step / step_s:.0f} tok/s, "
                                    f"{self._time_left(step_s) / 60:.1f} min left")
                if state.step % opts.eval_every == 0 or not self._budget_left():
                    self._evaluate()
                    account()
                if on_step is not None:
                    on_step(self, loss)
                if time.monotonic() - last_save >= opts.checkpoint_minutes * 60:
                    self._save()
                    account()
                    last_save = clock
        self._save()
        return not self._budget_left()
