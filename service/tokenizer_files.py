"""`kvserve tokenizer`: write the served model's tokenizer files to a folder, for client tools.

guidellm and lm-evaluation-harness count and build prompts with a Hugging Face tokenizer they load
from a hub id or a folder; a served id like `smollm2-135m:native` is neither. This writes just the
tokenizer (tokenizer.json, tokenizer_config.json with the chat template, config.json,
generation_config.json) in milliseconds, without the weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, tiny, a .gguf file or a Hugging Face directory (default: smollm2-135m)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the folder to write (created if missing)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a chat template replacing the checkpoint's (as kvserve serve --chat-template)")


def run_tokenizer(args: argparse.Namespace) -> int:
    from model.chat_template import ChatTemplateError, compile_chat_template
    from model.hf_writer import save_tokenizer_files
    from model.loader import load_tokenizer

    try:
        tokenizer, cfg = load_tokenizer(args.model)
        if args.chat_template is not None:
            template = Path(args.chat_template).read_text(encoding="utf-8")
            compile_chat_template(template)
            tokenizer = tokenizer.with_chat_template(template)
        names = save_tokenizer_files(tokenizer, cfg, args.output)
    except (ValueError, OSError, ChatTemplateError) as exc:
        print(f"kvserve tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(names)} to {args.output}")
    return 0
