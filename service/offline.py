"""`kvserve generate`: one prompt, without the server, on the real engine (`service.engine.llm.LLM`).

The same scheduler, paged KV cache, sampler (temperature, top_p, top_k, min_p, penalties, seed) and
stop handling as `kvserve serve`; prints the continuation (or, with --chat, the reply).
"""
from __future__ import annotations

import argparse
import sys

from model.attention import ATTENTION_CHOICES
from model.dtypes import DTYPES
from model.quantization import QUANTIZATIONS


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """The options of `kvserve generate`."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, tiny, a .gguf file or a Hugging Face directory (default: smollm2-135m)")
    parser.add_argument("--variant", default="native", help="native, mha, gqa-N or mqa (default: native)")
    parser.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, to answer)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64, help="most new tokens (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default: 0)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off (default: 1)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES, help="(default: auto)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="(default: float32)")
    parser.add_argument("--quantization", default="auto", choices=list(QUANTIZATIONS),
                        help="weight forms, as kvserve serve's (default: auto)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while loading")


def run_generate(args: argparse.Namespace) -> int:
    """Load, generate, print. Returns the exit status (2 with a one-line message for a mistake)."""
    from model.loader import load_model
    from model.sampling_params import SamplingParams
    from service.engine.llm import LLM

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
        model, tokenizer = load_model(args.model, variant=args.variant, dtype=args.dtype, device=args.device,
                                      quantization=args.quantization,
                                      attention=args.attention, progress=not args.no_progress)
        with LLM(model, tokenizer) as llm:
            if args.chat:
                [done] = llm.chat([[{"role": "user", "content": args.prompt}]], params)
            else:
                [done] = llm.generate([args.prompt], params)
    except (ValueError, FileNotFoundError) as exc:  # RequestError is a ValueError
        print(f"kvserve generate: error: {exc}", file=sys.stderr)
        return 2
    print(done.text)
    return 0
