"""`kvserve convert` cannot diverge into its output: planted explosions are rolled back, non-finite
steps never reach Adam, gradients reach Adam clipped, the written state is the best validated one
(never worse than the start), and the wall-clock budget counts across resumed sessions.

Each test plants the failure it guards against in a real tiny-model run (a huge learning rate for a
step, a NaN gradient, a scripted validation curve) and checks what the run did about it.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import model.convert.distill as distill
import model.convert.run as convert_run
from model.config import PRESETS
from model.convert.checkpoint import TrainState, load_checkpoint
from model.convert.data import TrainingText, token_stream
from model.convert.distill import Distiller, validation_kl
from model.convert.recovery import clip_gradients, spike_reason
from model.loader import load_model
from model.tokenizer import byte_tokenizer
from model.transformer import random_transformer
from tests.model.test_convert import SMALL_TEXT, run, tiny_opts


@pytest.fixture
def small_text(monkeypatch):
    monkeypatch.setattr(convert_run, "stdlib_docstrings", lambda: SMALL_TEXT)


def plant_lr(factor: float, steps, visits: set | None = None):
    """An `on_distiller` hook multiplying the learning rate of `steps` by `factor`: the first time each
    runs when `visits` is a set (a transient event), every time when it is None."""
    def hook(distiller):
        scheduled = distiller.learning_rate

        def planted(step):
            if step in steps and (visits is None or step not in visits):
                if visits is not None:
                    visits.add(step)
                return factor * scheduled(step)
            return scheduled(step)
        distiller.learning_rate = planted
    return hook


def written_val_kl(opts) -> float:
    """The validation KL of the written directory, measured afresh against the tiny teacher."""
    teacher, tokenizer = load_model("tiny", progress=False)
    written, _ = load_model(opts.output, progress=False)
    data = TrainingText(token_stream(tokenizer, SMALL_TEXT), opts.seq_len, opts.val_sequences)
    return validation_kl(teacher, written, data, opts.batch_size)


def test_an_exploding_step_is_rolled_back_and_the_run_recovers(tmp_path, small_text):
    opts = tiny_opts(tmp_path / "mqa", init="mean", steps=20, eval_every=4, snapshot_every=4, lr=1e-2)
    visits: set = set()
    record = run(opts, on_distiller=plant_lr(1e3, {8}, visits))
    first = record["rollbacks"][0]
    # step 8's update explodes; step 9's KL shows it; back to the snapshot taken at step 8, half rate
    assert (first["at_step"], first["to_step"], first["lr_scale"]) == (9, 8, 0.5), record["rollbacks"]
    assert first["reason"].startswith("training KL"), first
    val = dict(record["history"]["val_kl"])
    assert record["kept"]["step"] > 8 and record["kept"]["val_kl"] < val[8], (record["kept"], val)
    start = record["history"]["val_kl"][0][1]
    assert written_val_kl(opts) == pytest.approx(record["kept"]["val_kl"], rel=1e-4)
    assert record["kept"]["val_kl"] < start

    # the recovery state (snapshots, rate scale, recent KLs) survives a resume exactly
    stopped = replace(opts, output=tmp_path / "resumed")
    visits.clear()
    hook = plant_lr(1e3, {8}, visits)

    def stop_after_rollback(distiller, loss):
        if distiller.state.history["rollbacks"] and distiller.state.step == 11:
            distiller.request_stop()
    assert run(stopped, on_distiller=hook, on_step=stop_after_rollback) is None
    resumed = run(stopped, on_distiller=hook)
    assert resumed["rollbacks"] == record["rollbacks"] and resumed["kept"] == record["kept"]
    ours, theirs = load_file(opts.output / "model.safetensors"), load_file(stopped.output / "model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_run_that_keeps_diverging_gives_up_and_writes_its_start(tmp_path, small_text):
    opts = tiny_opts(tmp_path / "mqa", init="mean", steps=40, eval_every=2, lr=1e-2, max_rollbacks=3)
    record = run(opts, on_distiller=plant_lr(1e4, set(range(1, 40))))
    assert [r["to_step"] for r in record["rollbacks"]] == [0, 0, 0], record["rollbacks"]
    assert all(r["reason"].startswith("validation KL") for r in record["rollbacks"])
    assert [r["lr_scale"] for r in record["rollbacks"]] == [0.5, 0.25, 0.125]
    assert record["budget"]["stopped_by"] == "rollbacks" and record["budget"]["last_step"] < 40
    assert record["kept"]["step"] == 0 and "no later validation beat the initialisation" in record["kept"]["reason"]
    mean_pooled, _ = load_model("tiny", variant="mqa", progress=False)
    written, _ = load_model(opts.output, progress=False)
    for name, tensor in mean_pooled.state_dict().items():
        assert torch.equal(written.state_dict()[name], tensor), name


def test_the_written_state_is_the_best_validated_one(tmp_path, small_text, monkeypatch):
    script = iter([1.0, 0.8, 0.9, 0.85])  # steps 0, 2, 4, 6: the best is step 2, no regression past 1.2x
    monkeypatch.setattr(convert_run, "validation_kl", lambda *args: next(script))
    monkeypatch.setattr(distill, "validation_kl", lambda *args: next(script))
    opts = tiny_opts(tmp_path / "mqa", init="mean", steps=6, lr=1e-2)
    captured: dict[int, dict] = {}

    def capture(distiller, loss):
        captured[distiller.state.step] = {name: p.detach().clone() for name, p in distiller.params.items()}
    record = run(opts, on_step=capture)
    assert record["kept"]["step"] == 2 and record["kept"]["val_kl"] == 0.8 and not record["rollbacks"]
    assert record["budget"]["last_step"] == 6
    written, _ = load_model(opts.output, progress=False)
    state = written.state_dict()
    for name, tensor in captured[2].items():  # the trained tensors written are step 2's, not the last step's
        assert torch.equal(state[name], tensor) and not torch.equal(state[name], captured[6][name]), name


def _distiller(tmp_path, **kw) -> Distiller:
    teacher = random_transformer(PRESETS["tiny"], seed=0)
    opts = tiny_opts(tmp_path / "out", init="mean", lr=1e-2, **kw)
    data = TrainingText(token_stream(byte_tokenizer(), SMALL_TEXT), 32, 4)
    distiller = Distiller(teacher, convert_run.student_of(teacher, opts), data, opts, TrainState(), lambda line: None)
    distiller._start()
    return distiller


def _trained_state(distiller) -> tuple[dict, list]:
    """Copies of the trained tensors and of Adam's state tensors, in a fixed order."""
    tensors = {n: p.detach().clone() for n, p in distiller.params.items()}
    return tensors, [t.clone() for s in distiller.optimizer.state.values() for t in s.values()]


def _same_state(distiller, saved: tuple[dict, list]) -> bool:
    tensors, moments = _trained_state(distiller)
    return (all(torch.equal(t, saved[0][n]) for n, t in tensors.items()) and len(moments) == len(saved[1])
            and all(torch.equal(a, b) for a, b in zip(moments, saved[1])))


def test_a_non_finite_gradient_is_skipped_and_never_reaches_adam(tmp_path):
    distiller = _distiller(tmp_path, steps=10, snapshot_every=2)
    for _ in range(2):
        distiller.step()
    at_step_2 = _trained_state(distiller)
    distiller.step()
    param = next(iter(distiller.params.values()))
    handle = param.register_hook(lambda grad: grad * math.nan)
    at_step_3 = _trained_state(distiller)
    distiller.step()
    assert distiller.state.step == 4 and distiller.state.history["skipped_steps"] == [3]
    assert _same_state(distiller, at_step_3)  # neither the tensors nor Adam's moments saw the NaNs
    distiller.step()
    distiller.step()  # a third non-finite step in a row rolls back to the last good snapshot (step 2)
    assert distiller.state.history["rollbacks"][0]["to_step"] == 2 and distiller.state.step == 2
    assert _same_state(distiller, at_step_2)  # tensors and Adam's state as they were before step 2
    handle.remove()
    distiller.step()
    assert distiller.state.step == 3 and all(bool(p.isfinite().all()) for p in distiller.params.values())


def test_adam_sees_gradients_clipped_to_the_norm(tmp_path):
    distiller = _distiller(tmp_path, steps=4, clip_norm=1e-3)
    seen = []
    adam_step = distiller.optimizer.step

    def recording_step():
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in distiller.params.values()]))))
        adam_step()
    distiller.optimizer.step = recording_step  # type: ignore[method-assign]
    for _ in range(3):
        distiller.step()
    before_clipping = [norm for _, norm in distiller.state.history["grad_norm"]]
    assert min(before_clipping) > 1e-2, before_clipping  # so clipping had work to do
    assert seen == pytest.approx([1e-3] * 3, rel=1e-4)


def test_clip_gradients_scales_only_norms_above_the_limit():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients([a, b], 1.0) == pytest.approx(5.0)
    assert a.grad.tolist() == pytest.approx([0.6, 0.0]) and b.grad.tolist() == pytest.approx([0.8])
    assert clip_gradients([a, b], 2.0) == pytest.approx(1.0)
    assert b.grad.tolist() == pytest.approx([0.8])
    b.grad = torch.tensor([math.inf])
    assert clip_gradients([a, b], 1.0) == math.inf and a.grad.tolist() == pytest.approx([0.6, 0.0])


def test_a_spike_is_a_training_kl_far_above_its_recent_mean():
    recent = [1.0, 2.0, 1.0, 2.0, 1.5]
    assert spike_reason(3.1, recent, 2.0) is not None and spike_reason(2.9, recent, 2.0) is None
    assert spike_reason(100.0, recent[:4], 2.0) is None  # too little history to judge


def test_max_minutes_counts_the_sessions_before_a_resume(tmp_path, small_text):
    opts = tiny_opts(tmp_path / "mqa", steps=None, max_minutes=60.0)

    def stop_at_2(distiller, loss):
        if distiller.state.step == 2:
            distiller.request_stop()
    assert run(opts, on_step=stop_at_2) is None
    spent = load_checkpoint(opts).elapsed_s
    # a budget the first session already used up: the resumed run takes no step and writes
    record = run(replace(opts, max_minutes=spent / 60))
    assert record["budget"]["steps"] == 2 and record["budget"]["stopped_by"] == "minutes"
    assert record["budget"]["minutes"] == pytest.approx(spent / 60, abs=2e-3)
