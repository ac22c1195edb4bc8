"""Text generation with the no-cache forward: a quick look at a model, not the serving path.

Every step runs the whole sequence through `model(ids[None])` (no KV cache), so a token costs a
full prefill; fine for `kvserve generate` and for tests, which is all this is for. The engine
generates with the paged KV cache instead.
"""
from __future__ import annotations

import argparse
import sys

import torch

from model.attention import ATTENTION_IMPLS
from model.tokenizer import Tokenizer
from model.transformer import Transformer


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: list[int], *, max_tokens: int, eos_token_ids: frozenset[int],
                 temperature: float = 0.0, seed: int | None = None) -> list[int]:
    """New token ids after `prompt_ids`, up to the first end-of-generation token (excluded).

    Greedy at temperature 0, else sampled from softmax(logits / temperature) with a generator
    seeded by `seed` (same seed, same tokens). Stops early at the model's max_seq_len.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is out of range: must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is out of range: must be >= 0")
    if not prompt_ids:
        raise ValueError("the prompt is empty: it must have at least one token")
    max_len = model.config.max_seq_len
    if len(prompt_ids) >= max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens: it must be shorter than max_seq_len={max_len}")
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=model.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=model.device)
    new: list[int] = []
    while len(new) < max_tokens and ids.numel() < max_len:
        logits = model(ids[None])[0, -1].float()  # (vocab,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token in eos_token_ids:
            break
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([token])])
    return new


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, *, chat: bool = False,
                  max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None) -> str:
    """The continuation of `prompt`; with `chat`, the reply to it as one user message."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)  # the template wrote the specials
    else:
        prompt_ids = tokenizer.encode(prompt)
    new = generate_ids(model, prompt_ids, max_tokens=max_tokens, eos_token_ids=tokenizer.eos_token_ids,
                       temperature=temperature, seed=seed)
    return tokenizer.decode(new, skip_special_tokens=True)


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """The options of `kvserve generate`."""
    from model.dtypes import DTYPES

    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, tiny, a .gguf file or a Hugging Face directory (default: smollm2-135m)")
    parser.add_argument("--variant", default="native", help="native, mha, gqa-N or mqa (default: native)")
    parser.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, to answer)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64, help="most new tokens (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    parser.add_argument("--attention", default="flash", choices=list(ATTENTION_IMPLS), help="(default: flash)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="(default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while loading")


def run_generate(args: argparse.Namespace) -> int:
    """`kvserve generate`: load, generate, print the continuation. Returns the exit status."""
    from model.loader import load_model

    try:
        model, tokenizer = load_model(args.model, variant=args.variant, dtype=args.dtype, device=args.device,
                                      attention=args.attention, progress=not args.no_progress)
        text = generate_text(model, tokenizer, args.prompt, chat=args.chat, max_tokens=args.max_tokens,
                             temperature=args.temperature, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvserve generate: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0
