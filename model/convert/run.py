"""`convert(opts)`: one `kvserve convert` run from the checkpoint to the written directory.

1. Load the checkpoint (the teacher) and derive the student with fewer K/V heads by mean-pooling.
2. Initialise: keep the mean-pool (`--init mean`) or fit each layer's K/V projections on
   calibration text (`--init fit`, model.convert.fit); the validation KL of both is recorded.
   Both, and the original, are measured on the held-out texts (model.convert.heldout).
3. Distil (model.convert.distill) within the step and wall-clock budgets, checkpointing as it goes;
   a rerun of the same command resumes from `<output>.partial/`.
4. Write the best validated state (never worse than the initialisation) as a Hugging Face directory
   (model.hf_writer) with `kvserve_convert.json`, the record of the run (options, data, budget
   spent, measurements, the step kept and why, rollbacks, held-out perplexities, machine), and
   remove the checkpoint.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.convert.checkpoint import TrainState, load_checkpoint, save_checkpoint
from model.convert.data import TrainingText, stdlib_docstrings, token_stream
from model.convert.distill import Distiller, validation_kl
from model.convert.fit import fit_kv
from model.convert.heldout import first_tokens, heldout_texts, perplexity
from model.convert.options import ConvertOptions
from model.hf_loader import open_hf
from model.hf_writer import save_hf_checkpoint
from model.loader import load_base
from model.transformer import Transformer, build_transformer, checkpoint_weights
from model.variants import parse_variant, with_variant

RECORD_FILE = "kvserve_convert.json"


def check_output(opts: ConvertOptions) -> None:
    """ValueError when the output directory already exists (nothing is ever overwritten)."""
    if opts.output.exists():
        raise ValueError(f"output {opts.output} already exists: choose a new directory")


def student_of(teacher: Transformer, opts: ConvertOptions) -> Transformer:
    """The mean-pooled variant, owning (not sharing) every tensor it will train."""
    cfg = teacher.config
    n_kv = parse_variant(opts.variant, cfg.n_heads, cfg.n_kv_heads)
    if n_kv >= cfg.n_kv_heads:
        fewer = [f"gqa-{n}" if n > 1 else "mqa" for n in range(1, cfg.n_kv_heads) if cfg.n_heads % n == 0]
        raise ValueError(f"variant {opts.variant!r} has {n_kv} K/V heads: convert makes variants with fewer than "
                         f"the checkpoint's {cfg.n_kv_heads}; choose {' or '.join(fewer)}")
    # built afresh from the variant's tensors: modules of its own (shared modules would share their
    # parameters with the teacher), tensors shared until the loop below copies the trained ones
    variant = with_variant(teacher, opts.variant)
    student = build_transformer(variant.config, checkpoint_weights(variant), attention=teacher.attention,
                                dtype=teacher.dtype, device=teacher.device)
    teacher_ptrs = {t.data_ptr() for t in teacher.state_dict().values()}
    for name, p in student.named_parameters():
        if opts.trains(name) and p.data_ptr() in teacher_ptrs:
            p.data = p.data.clone()
    return student


def _load_tensors(model: Transformer, tensors: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def _initialise(teacher, student, tokenizer, data: TrainingText, opts: ConvertOptions, log) -> TrainState:
    state = TrainState()
    start = time.monotonic()
    kl = validation_kl(teacher, student, data, opts.batch_size)
    state.history["val_kl_mean_pool"] = kl
    log(f"mean-pooled {opts.variant}: validation KL {kl:.4f}")
    if opts.init == "fit":
        calibration = data.train[:opts.fit_sequences]
        errors = fit_kv(teacher, student, calibration, epochs=opts.fit_epochs, lr=opts.fit_lr,
                        batch_size=opts.batch_size, seed=opts.seed,
                        on_layer=lambda i, a, b: log(f"fit layer {i}: relative error {a:.3f} -> {b:.3f}"))
        state.history["fit_relative_error"] = errors
        kl = validation_kl(teacher, student, data, opts.batch_size)
        state.history["val_kl_fit"] = kl
        log(f"fitted {opts.variant}: validation KL {kl:.4f}")
    state.history["val_kl"] = [[0, kl]]  # the distillation's starting point
    state.fit_s = state.elapsed_s = time.monotonic() - start
    state.tensors = {name: p.detach().clone() for name, p in student.named_parameters() if opts.trains(name)}
    state.history["heldout"] = _heldout(teacher, student, tokenizer, opts, log, None)
    return state


def _heldout(teacher, student, tokenizer, opts: ConvertOptions, log, start: dict | None) -> dict:
    """Perplexities on each held-out text: the original's and the initialisation's when `start` is
    None, else `start` with the written model's added. Its time is not part of the budget."""
    began, result = time.monotonic(), {}
    if opts.heldout_tokens:
        for kind, text in heldout_texts().items():
            ids = first_tokens(tokenizer, text, opts.heldout_tokens)
            if start is None:
                row = {"tokens": len(ids), "native": perplexity(teacher, ids), "initialised": perplexity(student, ids)}
            else:
                row = {**start[kind], "written": perplexity(student, ids)}
            row["ratio"] = row.get("written", row["initialised"]) / row["native"]
            result[kind] = row
            log(f"held-out {kind}: perplexity {row.get('written', row['initialised']):.2f} = {row['ratio']:.2f}x "
                f"native ({row['native']:.2f}) over {len(ids):,} tokens")
    result["seconds"] = round(time.monotonic() - began + (start or {}).get("seconds", 0.0), 1)
    return result


def _kept(state: TrainState) -> dict:
    """Which validated state is written, and why."""
    best, measured = state.best, state.history["val_kl"]
    start_kl = measured[0][1]
    if best["step"] == measured[0][0]:
        why = f"no later validation beat the initialisation's ({len(measured)} measured)"
    else:
        why = (f"the lowest of {len(measured)} validation KLs (the initialisation's: {start_kl:.4f}; "
               f"the last, step {measured[-1][0]}: {measured[-1][1]:.4f})")
    return {"step": best["step"], "val_kl": best["val_kl"], "reason": why}


def _record(opts: ConvertOptions, state: TrainState, data: TrainingText, n_docs: int, gave_up: bool) -> dict:
    steps_run = len(state.history["train_kl"])  # rolled-back and skipped steps included: the compute spent
    apart = ("rollbacks", "skipped_steps", "heldout")
    return {
        "variant": opts.variant, "source": opts.model, "options": {**opts.run_key(), "steps": opts.steps,
                                                                   "max_minutes": opts.max_minutes},
        "data": {"text": "Python standard library docstrings (pydoc_data excluded)", "documents": n_docs,
                 "train_tokens_available": data.train_tokens, "val_tokens": data.val.numel()},
        "budget": {"steps": steps_run, "tokens": steps_run * opts.batch_size * opts.seq_len, "last_step": state.step,
                   "stopped_by": "rollbacks" if gave_up else "steps" if state.step == opts.steps else "minutes",
                   "calibration_tokens": opts.fit_sequences * opts.seq_len if opts.init == "fit" else 0,
                   "minutes": round(state.elapsed_s / 60, 3), "fit_minutes": round(state.fit_s / 60, 3)},
        "kept": _kept(state),
        **{name: state.history[name] for name in apart},
        "history": {name: value for name, value in state.history.items() if name not in apart},
        "machine": {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads()},
    }


def convert(opts: ConvertOptions, log: Callable[[str], None],
            on_distiller: Callable[[Distiller], None] | None = None,
            on_step: Callable[[Distiller, float], None] | None = None) -> dict | None:
    """Run the conversion; the record written beside the model, or None when stopped before the end
    (a checkpoint is saved; rerunning resumes). `on_distiller` sees the distiller before it runs
    (the CLI connects signals to its `request_stop`)."""
    check_output(opts)
    state = load_checkpoint(opts)
    teacher, tokenizer = load_base(opts.model, dtype=torch.float32, attention="flash", progress=opts.progress)
    student = student_of(teacher, opts)
    docs = stdlib_docstrings()
    data = TrainingText(token_stream(tokenizer, docs), opts.seq_len, opts.val_sequences)
    log(f"training text: {len(docs)} standard-library docstrings, {data.train_tokens:,} training tokens, "
        f"{data.val.numel():,} held out")
    if state is None:
        state = _initialise(teacher, student, tokenizer, data, opts, log)
        save_checkpoint(opts, state)
    else:
        log(f"resuming from step {state.step} ({state.elapsed_s / 60:.1f} min spent) in {opts.checkpoint_dir}")
        _load_tensors(student, state.tensors)

    distiller = Distiller(teacher, student, data, opts, state, log)
    if on_distiller is not None:
        on_distiller(distiller)
    if not distiller.run(on_step):
        return None
    student.requires_grad_(False)
    _load_tensors(student, state.best["tensors"])
    if distiller.gave_up:
        log(f"gave up after {opts.max_rollbacks} rollbacks")
    log(f"writing step {state.best['step']}: validation KL {state.best['val_kl']:.4f}")
    state.history["heldout"] = _heldout(teacher, student, tokenizer, opts, log, state.history["heldout"])

    record = _record(opts, state, data, len(docs), distiller.gave_up)
    base_config = open_hf(opts.model).hf_config if Path(opts.model).is_dir() else None
    tmp = opts.output.with_name(opts.output.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(student, tokenizer, tmp, base_config=base_config,
                       extra_files={RECORD_FILE: json.dumps(record, indent=1) + "\n"})
    check_output(opts)
    os.replace(tmp, opts.output)
    shutil.rmtree(opts.checkpoint_dir)
    return record
