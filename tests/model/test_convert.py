"""`kvserve convert` on the tiny model: the fit and distillation lower what they minimise, a resumed
run equals an uninterrupted one, the written directory is a checkpoint transformers and kvserve
read alike, and bad options are one-line errors.

Training text is the docstrings of the standard library's `json` package (a few thousand tokens
with the byte-level tokenizer) instead of the whole library, so each run takes seconds.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import model.convert.run as convert_run
from model.config import PRESETS
from model.convert.checkpoint import TrainState
from model.convert.data import TrainingText, stdlib_docstrings, stdlib_root, token_stream
from model.convert.distill import Distiller, learning_rate, validation_kl
from model.convert.fit import fit_kv
from model.convert.kl import kl_divergence, kl_reference
from model.convert.options import ConvertOptions
from model.loader import load_model
from model.tokenizer import byte_tokenizer
from model.transformer import random_transformer
from service import cli

SMALL_TEXT = stdlib_docstrings(stdlib_root() / "json")


def tiny_opts(output, **kw) -> ConvertOptions:
    base = dict(model="tiny", variant="mqa", output=output, steps=4, seq_len=32, batch_size=2, fit_sequences=8,
                fit_epochs=2, val_sequences=4, eval_every=2, lr=3e-3, seed=5, warmup_steps=2, heldout_tokens=1024)
    return ConvertOptions(**{**base, **kw})


@pytest.fixture
def small_text(monkeypatch):
    monkeypatch.setattr(convert_run, "stdlib_docstrings", lambda: SMALL_TEXT)


def run(opts, **kw):
    return convert_run.convert(opts, log=lambda line: None, **kw)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A directory written by an uninterrupted 4-step run, and its record."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert_run, "stdlib_docstrings", lambda: SMALL_TEXT)
        opts = tiny_opts(tmp_path_factory.mktemp("convert") / "mqa")
        record = run(opts)
    return opts.output, record


def test_calibrated_fit_lowers_every_layer_error_and_the_kl():
    teacher = random_transformer(PRESETS["tiny"], seed=0)
    opts = tiny_opts(None)
    data = TrainingText(token_stream(byte_tokenizer(), SMALL_TEXT), 32, 4)
    student = convert_run.student_of(teacher, opts)
    mean_pool_kl = validation_kl(teacher, student, data, 2)
    starts = []
    errors = fit_kv(teacher, student, data.train[:8], epochs=3, lr=3e-3, batch_size=2, seed=0,
                    on_layer=lambda i, before, after: starts.append(before))
    assert all(after < 0.9 * before for before, after in zip(starts, errors)), (starts, errors)
    assert validation_kl(teacher, student, data, 2) < mean_pool_kl
    assert teacher.layers[0].attention.wkv.weight.shape == (2 * 2 * 16, 64)  # the teacher is untouched


@pytest.mark.parametrize("train", ["kv", "attention"])
def test_distillation_lowers_the_held_out_kl_and_trains_only_what_it_should(train, tmp_path):
    teacher = random_transformer(PRESETS["tiny"], seed=0)
    frozen = {n: t.clone() for n, t in teacher.state_dict().items()}
    opts = tiny_opts(tmp_path / "out", init="mean", train=train, steps=8, lr=1e-2)
    data = TrainingText(token_stream(byte_tokenizer(), SMALL_TEXT), 32, 4)
    student = convert_run.student_of(teacher, opts)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    distiller = Distiller(teacher, student, data, opts, TrainState(), log=lambda line: None)
    assert distiller.run()
    kls = [kl for _, kl in distiller.state.history["val_kl"]]
    assert kls[-1] < 0.8 * kls[0], kls
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, before[name]) != opts.trains(name), name
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name


def test_learning_rate_warms_up_then_is_a_cosine_over_the_step_budget_else_constant(tmp_path):
    def rates(steps_at, **kw):
        opts = tiny_opts(tmp_path / "out", **kw)
        return [learning_rate(step, opts) for step in steps_at]

    assert rates(range(0, 101, 25), steps=100, lr=1e-3, warmup_steps=0) == pytest.approx(
        [1e-3, 0.8682e-3, 0.55e-3, 0.2318e-3, 1e-4], rel=1e-3)
    # linear from lr / 20 to lr over 20 steps, then the same cosine over the 80 steps left
    assert rates([0, 9, 19, 20, 40, 60, 100], steps=100, lr=1e-3, warmup_steps=20) == pytest.approx(
        [0.05e-3, 0.5e-3, 1e-3, 1e-3, 0.8682e-3, 0.55e-3, 1e-4], rel=1e-3)
    assert rates([0, 4, 5, 50], steps=None, max_minutes=5.0, lr=1e-3, warmup_steps=5) == pytest.approx(
        [0.2e-3, 1e-3, 1e-3, 1e-3])


def test_kl_matches_autograd_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(150, 300, generator=gen)).requires_grad_()
    teacher_logp = torch.log_softmax(3 * torch.randn(150, 300, generator=gen), dim=-1)
    ours = kl_divergence(student, teacher_logp)
    (grad,) = torch.autograd.grad(2.0 * ours, student)
    ref = kl_reference(student, teacher_logp)
    (ref_grad,) = torch.autograd.grad(2.0 * ref, student)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
    assert float(kl_divergence(teacher_logp, teacher_logp)) == pytest.approx(0.0, abs=1e-5)


def test_written_directory_loads_in_transformers_with_kvserve_logits(converted):
    transformers = pytest.importorskip("transformers")
    path, record = converted
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "kvserve_convert.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert not path.with_name(path.name + ".partial").exists()
    assert json.loads((path / "config.json").read_text())["num_key_value_heads"] == 1
    ours, tokenizer = load_model(path, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = 'Decode a JSON document: {"a": [1, 2.5]}'
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text).input_ids == ids
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages)
    with torch.inference_mode():
        torch.testing.assert_close(ours(torch.tensor([ids])), hf(torch.tensor([ids])).logits, rtol=1e-5, atol=1e-5)
    assert record["budget"]["steps"] == 4 and record["budget"]["tokens"] == 4 * 2 * 32
    assert record["history"]["val_kl_fit"] < record["history"]["val_kl_mean_pool"]


def test_interrupted_run_resumes_to_the_uninterrupted_result(converted, tmp_path, small_text):
    path, _ = converted
    opts = tiny_opts(tmp_path / "mqa")

    def stop_at_2(distiller, loss):
        if distiller.state.step == 2:
            distiller.request_stop()

    assert run(opts, on_step=stop_at_2) is None
    assert not opts.output.exists() and (opts.checkpoint_dir / "checkpoint.pt").is_file()
    with pytest.raises(ValueError, match=r"--lr 0.003 \(now 0.001\).*rerun with its options"):
        run(replace(opts, lr=1e-3))
    record = run(opts)  # resumes at step 2
    assert record["budget"]["steps"] == 4
    uninterrupted, resumed = load_file(path / "model.safetensors"), load_file(opts.output / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def test_steps_zero_writes_the_initialised_model(tmp_path, small_text):
    record = run(tiny_opts(tmp_path / "mean", init="mean", steps=0))
    mean_pooled, _ = load_model("tiny", variant="mqa", progress=False)
    written, _ = load_model(tmp_path / "mean", progress=False)
    for name, tensor in mean_pooled.state_dict().items():
        assert torch.equal(written.state_dict()[name], tensor), name
    assert record["budget"]["steps"] == 0 and "val_kl_fit" not in record["history"]


@pytest.mark.parametrize("argv, message", [
    (["--variant", "gqa", "--steps", "1"], "invalid variant 'gqa'"),
    (["--variant", "mqa"], "no budget: give --steps N and/or --max-minutes M"),
    (["--variant", "mqa", "--max-minutes", "0"], "--max-minutes=0.0 is out of range"),
    (["--variant", "gqa-2", "--steps", "1"], "fewer than the checkpoint's 2; choose mqa"),
    (["--variant", "gqa-3", "--steps", "1"], "invalid variant 'gqa-3'"),
    (["--variant", "mqa", "--steps", "1", "--init", "svd"], "invalid choice: 'svd'"),
    (["--variant", "mqa", "--steps", "1", "--spike-factor", "1"], "--spike-factor=1.0 is out of range: must be > 1"),
    (["--variant", "mqa", "--steps", "1", "--warmup-steps", "-1"], "--warmup-steps=-1 is out of range: must be >= 0"),
    (["--variant", "mqa", "--steps", "1", "--clip-norm", "0"], "--clip-norm=0.0 is out of range: must be > 0"),
    (["--variant", "mqa", "--steps", "1", "--max-rollbacks", "0"], "--max-rollbacks=0 is out of range: must be >= 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, small_text, argv, message):
    try:
        code = cli.main(["convert", "--model", "tiny", "--output", str(tmp_path / "out"), *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert_run, "stdlib_docstrings", lambda: pytest.fail("loaded data for a refused run"))
    (tmp_path / "out").mkdir()
    assert cli.main(["convert", "--model", "tiny", "--variant", "mqa", "--steps", "1", "--output",
                     str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"kvserve convert: error: output {tmp_path / 'out'} already exists: choose a new directory\n"
