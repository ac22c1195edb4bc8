"""Distillation of a converted model from the original: minimise KL(teacher || student).

The teacher is the unconverted checkpoint, the student the converted one; both see the same
batch and the student's chosen parameters (`--train`, the K/V projections by default) follow Adam
on the mean KL of their next-token distributions at every position (`learning_rate`: a linear
warm-up, then a cosine to a tenth over `--steps` when given, else constant). The student's
attention is the flash attention, so its backward is `model.flash_backward`. The guards of
model.convert.recovery clip, skip non-finite steps and roll back spikes and validation regressions;
the best validated state is what `convert` writes. A step's batch is a function of (seed, step),
the optimizer and recovery state are checkpointed with the tensors, so a resumed run continues
exactly; the run stops at the step budget, at the wall-clock budget (counted across sessions), at
`--max-rollbacks` rollbacks, or between two steps when asked to (a signal), saving a checkpoint
each time.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from model.convert import recovery
from model.convert.checkpoint import TrainState, save_checkpoint
from model.convert.data import TrainingText
from model.convert.kl import kl_divergence
from model.convert.options import ConvertOptions
from model.convert.recovery import clip_gradients, restore_snapshot, spike_reason, take_snapshot
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


def learning_rate(step: int, opts: ConvertOptions) -> float:
    """A linear warm-up from --lr / warmup to --lr over --warmup-steps, then, with a step budget, a
    cosine down to a tenth of --lr at the last step; under a wall-clock budget alone, constant (a
    schedule over time would make runs unrepeatable)."""
    lr, steps, warmup = opts.lr, opts.steps, opts.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if not steps or steps <= warmup:
        return lr
    progress = min(step - warmup, steps - warmup) / (steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _json_number(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN or infinity


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
        for name in ("train_kl", "grad_norm", "skipped_steps", "rollbacks"):
            state.history.setdefault(name, [])
        self._stop_requested = False

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from `run` (safe from a signal handler)."""
        self._stop_requested = True

    def learning_rate(self, step: int) -> float:
        """The scheduled rate of `step`, before the rollbacks' cuts (`state.lr_scale`)."""
        return learning_rate(step, self.opts)

    def step(self) -> float:
        """One step on the batch of step `state.step`; returns its training KL.

        A normal step updates the parameters and advances; a non-finite KL or gradient skips the
        update and advances; a spike rolls back to the last good snapshot (no update)."""
        opts, state, history = self.opts, self.state, self.state.history
        lr = self.learning_rate(state.step) * state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = self.data.batch(state.step, opts.batch_size, opts.seed).to(self.student.device)
        loss = _kl(self.teacher, self.student, ids)
        kl = float(loss.detach())
        history["train_kl"].append([state.step, _json_number(kl)])
        if math.isfinite(kl) and (spike := spike_reason(kl, state.recent_kl, opts.spike_factor)):
            self._roll_back(state.good, spike)
            return kl
        norm = math.nan
        if math.isfinite(kl):
            loss.backward()
            norm = clip_gradients(list(self.params.values()), opts.clip_norm)
        history["grad_norm"].append([state.step, _json_number(norm)])
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            history["skipped_steps"].append(state.step)
            self.log(f"step {state.step}: skipped (training KL {kl}, gradient norm {norm})")
            state.skips_in_row += 1
            state.step += 1
            if state.skips_in_row >= recovery.MAX_SKIPS_IN_ROW:
                self._roll_back(state.good, f"{state.skips_in_row} steps in a row with non-finite numbers")
            return kl
        if state.step % opts.snapshot_every == 0:
            state.good = take_snapshot(state.step, self.params, self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.recent_kl = (state.recent_kl + [kl])[-recovery.SPIKE_WINDOW:]
        state.skips_in_row = 0
        state.step += 1
        return kl

    def _roll_back(self, snap: dict, reason: str) -> None:
        """Back to `snap` (tensors, optimizer, step) with the learning rate cut."""
        state = self.state
        at = state.step
        restore_snapshot(snap, self.params, self.optimizer)
        state.step, state.skips_in_row = snap["step"], 0
        state.lr_scale *= recovery.LR_CUT
        state.history["rollbacks"].append({"at_step": at, "to_step": snap["step"], "reason": reason,
                                           "lr_scale": state.lr_scale})
        self.log(f"step {at}: {reason}: rolled back to step {snap['step']}, learning rate x{state.lr_scale:g}")

    @property
    def gave_up(self) -> bool:
        """Whether the run has rolled back `--max-rollbacks` times (it then stops and writes its best)."""
        return len(self.state.history["rollbacks"]) >= self.opts.max_rollbacks

    def _budget_left(self) -> bool:
        opts, state = self.opts, self.state
        if opts.steps is not None and state.step >= opts.steps:
            return False
        if self.gave_up:
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
        """The validation KL of the current state: a new best is snapshotted, a regression rolls back."""
        state = self.state
        kl = validation_kl(self.teacher, self.student, self.data, self.opts.batch_size)
        state.history.setdefault("val_kl", []).append([state.step, kl])
        self.log(f"step {state.step}: validation KL {kl:.4f}")
        best = state.best
        if not best or kl < best["val_kl"]:
            state.best = take_snapshot(state.step, self.params, self.optimizer, kl)
            if not best:
                state.good = state.best
        elif not kl <= recovery.VALIDATION_TOLERANCE * best["val_kl"]:
            self._roll_back(best, f"validation KL {kl:.4g} > {recovery.VALIDATION_TOLERANCE:g} x the best "
                                  f"({best['val_kl']:.4g}, step {best['step']})")
            state.good = best

    def _start(self) -> None:
        """The starting point's snapshot: step 0 with its validation KL (measured by the initialisation
        when it did, else here)."""
        start = [kl for step, kl in self.state.history.get("val_kl", []) if step == self.state.step]
        if not start:
            self._evaluate()
            return
        self.state.best = take_snapshot(self.state.step, self.params, self.optimizer, start[-1])
        self.state.good = self.state.best

    def run(self, on_step: Callable[[Distiller, float], None] | None = None) -> bool:
        """Steps until a budget runs out, the run gives up, or a stop is requested; True when a budget ran
        out or the run gave up (the run is over), False when stopped first.

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
            if not state.best:
                self._start()
                account()
            while self._budget_left() and not self._stop_requested:
                start, before = time.monotonic(), state.step
                loss = self.step()
                took = time.monotonic() - start
                step_s = took if step_s is None else 0.9 * step_s + 0.1 * took
                account()
                bar.update(state.step - bar.n)
                bar.set_postfix_str(f"KL {loss:.3f}, {tokens_per_step / step_s:.0f} tok/s, "
                                    f"{self._time_left(step_s) / 60:.1f} min left")
                if state.step > before and (state.step % opts.eval_every == 0 or not self._budget_left()):
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
