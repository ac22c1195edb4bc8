"""The command line of `kvserve convert` (service/cli.py hands it everything after the word).

    kvserve convert --model smollm2-135m --variant mqa --output DIR --max-minutes 60 [--steps N] [...]

A bad option is one line on stderr and exit status 2. The first SIGINT / SIGTERM stops after the
current step with a checkpoint saved (exit 130; the same command resumes); a second one stops at once.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

from model.convert.options import INITS, TRAIN_SETS, ConvertOptions

_VARIANT = re.compile(r"mha|mqa|gqa-[0-9]+")


def _variant(text: str) -> str:
    if not _VARIANT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid variant {text!r}: use mqa or gqa-N (N K/V heads, fewer than "
                                         "the checkpoint's)")
    return text


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="the checkpoint to convert (the teacher): smollm2-135m, "
                   "tiny, a .gguf file or a Hugging Face directory (default: smollm2-135m)")
    p.add_argument("--variant", type=_variant, required=True, help="mqa or gqa-N, fewer K/V heads than the checkpoint")
    p.add_argument("--output", type=Path, required=True, help="the new Hugging Face directory (must not exist)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (0: write the initialised model)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of initialisation + distillation, resumed sessions included")
    p.add_argument("--init", choices=INITS, default="fit",
                   help="fit: per-layer least-squares fit of the merged K/V on calibration text; mean: mean-pool")
    p.add_argument("--train", choices=list(TRAIN_SETS), default="kv",
                   help="what distillation trains: kv (K/V projections; the rest stays shared with the base), "
                   "attention (all four attention projections; the MLPs stay shared) or all (default: kv)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate after the warm-up; with --steps, a cosine "
                   "from it down to a tenth of it (default: 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=25, help="steps of linear learning-rate warm-up (default: 25)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="gradient-norm clipping of the trained parameters "
                   "(default: 1.0)")
    p.add_argument("--spike-factor", type=float, default=2.0, help="a training KL above this times its recent mean "
                   "rolls back to the last good snapshot and halves the learning rate (default: 2.0)")
    p.add_argument("--snapshot-every", type=int, default=10, help="steps between the snapshots (tensors + Adam "
                   "state) a spike rolls back to (default: 10)")
    p.add_argument("--max-rollbacks", type=int, default=8, help="stop at this many rollbacks and write the best "
                   "validated state (default: 8)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="fixes the data order: the same seed, the same run")
    p.add_argument("--fit-sequences", type=int, default=32, help="calibration sequences for --init fit (default: 32)")
    p.add_argument("--fit-epochs", type=int, default=8, help="passes over them per layer (default: 8)")
    p.add_argument("--fit-lr", type=float, default=3e-3, help="Adam learning rate of the fit (default: 3e-3)")
    p.add_argument("--val-sequences", type=int, default=8, help="held-out sequences for the validation KL (default: 8)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation KLs (default: 50)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="minutes between checkpoints (default: 5)")
    p.add_argument("--heldout-tokens", type=int, default=8192, help="tokens of each held-out text (Python docs, English "
                   "prose) whose perplexity the record reports; 0: none (default: 8192)")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None, help="a progress bar (default: on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """ConvertOptions from parsed arguments (ValueError on a bad value)."""
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return ConvertOptions(
        model=args.model, variant=args.variant, output=args.output, steps=args.steps, max_minutes=args.max_minutes,
        init=args.init, train=args.train, lr=args.lr, warmup_steps=args.warmup_steps, clip_norm=args.clip_norm,
        spike_factor=args.spike_factor, snapshot_every=args.snapshot_every, max_rollbacks=args.max_rollbacks,
        heldout_tokens=args.heldout_tokens, batch_size=args.batch_size, seq_len=args.seq_len,
        seed=args.seed, fit_sequences=args.fit_sequences, fit_epochs=args.fit_epochs, fit_lr=args.fit_lr,
        val_sequences=args.val_sequences, eval_every=args.eval_every, checkpoint_minutes=args.checkpoint_minutes,
        progress=progress)


def _log(line: str) -> None:
    from tqdm import tqdm
    tqdm.write(f"kvserve convert: {line}", file=sys.stderr)  # above the progress bar when there is one


def run_convert(args: argparse.Namespace) -> int:
    """`kvserve convert`: returns the exit status."""
    from model.convert.run import check_output, convert

    def stop_on_signals(distiller) -> None:
        def handler(signum, frame):
            _log(f"signal {signum}: stopping after this step (a second signal stops at once)")
            distiller.request_stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.default_int_handler)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    try:
        opts = options_from_args(args)
        check_output(opts)
        record = convert(opts, _log, on_distiller=stop_on_signals)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvserve convert: error: {exc}", file=sys.stderr)
        return 2
    if record is None:
        _log(f"stopped; checkpoint in {opts.checkpoint_dir}: rerun the same command to resume")
        return 130
    budget, kept = record["budget"], record["kept"]
    _log(f"wrote {opts.output}: step {kept['step']} kept, validation KL {record['history']['val_kl'][0][1]:.4f} -> "
         f"{kept['val_kl']:.4f}; {budget['steps']} steps run, {len(record['rollbacks'])} rollbacks, "
         f"{len(record['skipped_steps'])} skipped, {budget['minutes']:.1f} min")
    return 0
