"""Prompt sets for `kvserve bench serve`: random lengths, built-in natural prompts, JSONL, shared prefix.

Every dataset is a list of `SampleRequest`s built from a seed, so two runs send the same prompts.

Token counts are approximate: the load generator works against any OpenAI-compatible server and
does not have its tokenizer. Random text is made of common English words, each written with a
leading space (" the", " water", ...); in the GPT-2 / Llama family of BPE vocabularies such a word is
one token, so `n` words are about `n` tokens. A byte-level tokenizer (kvserve's `tiny` model) needs
about 5 tokens per word instead: `tokens_per_word` corrects for that, and `serve.py` measures it on
the server's `/tokenize` when the server offers one (vLLM and kvserve do), else assumes 1.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Short, frequent words: one BPE token each (with their leading space) in common vocabularies.
WORDS = tuple("""
the of and to in is was for on are with as be at by this had not but from or have an they which one
you were her all she there would their we him been has when who will more no if out so said what up
its about into than them can only other new some could time these two may then do first any my now
such like our over man me even most made after also did many before must through back years where
much your way well down should because each just those people how too little state good very make
world still own see men work long get here between both life being under never day same another know
while last might us great old year off come since against go came right used take three small large
next early young important few public bad able light voice table water city house night point field
book story fire stone river tree cold warm green blue red black white open close word line hand part
""".split())

NATURAL_PROMPTS = (
    "Explain in simple terms why the sky looks blue during the day and red at sunset.",
    "Write a short poem about a lighthouse keeper who talks to the sea.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarize the plot of a heist story set on a night train across the desert.",
    "Give me three ideas for a vegetarian dinner that takes under thirty minutes.",
    "How does a hash map handle two keys that land in the same bucket?",
    "Write a polite email asking a colleague to review a pull request by Friday.",
    "Describe the water cycle to a ten-year-old.",
    "What is the difference between latency and throughput in a web service?",
    "Translate into French: The library opens at nine and closes at six.",
    "List five tips for keeping houseplants alive in a dark apartment.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Why do cats purr? Give the leading scientific explanations.",
    "Draft a two-sentence product description for a waterproof hiking boot.",
    "Explain what a binary search does and when it can be used.",
    "Tell a short bedtime story about a fox who learns to share.",
    "What causes the seasons on Earth?",
    "Compare renting and buying a home in a few balanced bullet points.",
    "Write a haiku about autumn rain on a tin roof.",
    "How do vaccines train the immune system?",
    "Give a recipe for a simple loaf of bread with flour, water, salt and yeast.",
    "What is the purpose of an index in a relational database?",
    "Describe a busy market in Marrakesh using all five senses.",
    "Explain recursion with an example that is not factorial.",
    "What should I pack for a three-day hike in the mountains in spring?",
    "Write the opening paragraph of a mystery novel set in a snowed-in hotel.",
    "How does public-key cryptography let two strangers share a secret?",
    "Suggest a weekly workout plan for a beginner with no equipment.",
    "Why is the ocean salty but most rivers are not?",
    "Explain the difference between weather and climate.",
    "Write a limerick about a programmer who never sleeps.",
    "What are the pros and cons of working from home?",
    "How does a refrigerator keep food cold?",
    "Give an example of a SQL query that joins two tables and explain it.",
    "Describe the life cycle of a butterfly.",
    "What does it mean for an algorithm to run in O(n log n) time?",
    "Write a thank-you note to a teacher who changed your mind about math.",
    "How do bees communicate where flowers are?",
    "Outline a five-minute talk on why sleep matters.",
    "What is inflation, and why do central banks raise interest rates to fight it?",
    "Write a dialogue between a robot and a gardener about weeds.",
    "Explain how a bicycle stays upright when it moves.",
    "What are three common mistakes new chess players make?",
    "Describe how to make a cup of pour-over coffee step by step.",
    "Why do we have leap years?",
    "Write a short speech for the opening of a small town library.",
    "How does garbage collection work in a language like Java or Python?",
    "What is the tallest mountain in the solar system, and how was it formed?",
    "Give advice to someone starting their first job as a software engineer.",
    "Explain what a neural network learns when it is trained on images of cats.",
    "Write a friendly reminder that the team meeting moved to Thursday at noon.",
    "How do tides work, and why are there two high tides a day?",
)


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One request to send. `system` goes first: a chat system message, or glued before the prompt."""
    prompt: str
    prompt_len: int          # approximate prompt tokens (words * tokens_per_word; exact only with usage)
    max_tokens: int
    system: str | None = None

    def completion_prompt(self) -> str:
        return self.prompt if self.system is None else f"{self.system}\n\n{self.prompt}"


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} is out of range: must be >= 1")


def spread(length: int, range_ratio: float, rng: random.Random) -> int:
    """A length drawn uniformly from [length * (1 - r), length * (1 + r)], at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio={range_ratio} is out of range: must be in [0, 1)")
    low = max(1, round(length * (1.0 - range_ratio)))
    high = max(low, round(length * (1.0 + range_ratio)))
    return rng.randint(low, high)


def random_text(n_tokens: int, rng: random.Random, tokens_per_word: float = 1.0) -> tuple[str, int]:
    """About `n_tokens` tokens of random words -> (text, approximate token count)."""
    n_words = max(1, round(n_tokens / tokens_per_word))
    text = "".join(" " + rng.choice(WORDS) for _ in range(n_words))
    return text, round(n_words * tokens_per_word)


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, *, seed: int,
                    tokens_per_word: float = 1.0) -> list[SampleRequest]:
    """`num` prompts of random words; input and output lengths spread by `range_ratio`."""
    _check_positive("--num-prompts", num)
    _check_positive("--random-input-len", input_len)
    _check_positive("--random-output-len", output_len)
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        text, n = random_text(spread(input_len, range_ratio, rng), rng, tokens_per_word)
        out.append(SampleRequest(text.lstrip(), n, spread(output_len, range_ratio, rng)))
    return out


def natural_requests(num: int, output_len: int, *, seed: int, tokens_per_word: float = 1.0) -> list[SampleRequest]:
    """`num` of the built-in prompts, shuffled by `seed`, cycling when `num` exceeds the set."""
    _check_positive("--num-prompts", num)
    _check_positive("--output-len", output_len)
    order = list(NATURAL_PROMPTS)
    random.Random(seed).shuffle(order)
    return [SampleRequest(p, round(len(p.split()) * tokens_per_word), output_len)
            for p in (order[i % len(order)] for i in range(num))]


def shared_prefix_requests(num: int, prefix_len: int, suffix_len: int, output_len: int, *, seed: int,
                           tokens_per_word: float = 1.0) -> list[SampleRequest]:
    """`num` requests that share one system prompt of ~`prefix_len` tokens, each with its own question.

    Every suffix starts with the request's index, so no two requests are the same text after the
    shared part: a prefix cache can reuse the prefix and nothing more.
    """
    _check_positive("--num-prompts", num)
    _check_positive("--shared-prefix-len", prefix_len)
    _check_positive("--shared-suffix-len", suffix_len)
    _check_positive("--output-len", output_len)
    rng = random.Random(seed)
    body, n_prefix = random_text(prefix_len, rng, tokens_per_word)
    system = "You are a helpful assistant. Reference notes follow." + body
    out = []
    for i in range(num):
        text, n_suffix = random_text(suffix_len, rng, tokens_per_word)
        out.append(SampleRequest(f"Question {i}:{text}", n_prefix + n_suffix, output_len, system=system))
    return out


def jsonl_requests(path: str | Path, num: int, output_len: int, *, tokens_per_word: float = 1.0) -> list[SampleRequest]:
    """Rows `{"prompt": str, "max_tokens"?: int}` from a JSONL file, in order, cycling up to `num`.

    Blank lines are skipped; any other bad line is a one-line error naming the file and line.
    """
    _check_positive("--num-prompts", num)
    _check_positive("--output-len", output_len)
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read dataset {str(path)!r}: {exc.strerror or exc}") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object with a \"prompt\"")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
        max_tokens = row.get("max_tokens", output_len)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{where}: \"max_tokens\"={max_tokens!r} must be an integer >= 1")
        rows.append(SampleRequest(prompt, max(1, round(len(prompt.split()) * tokens_per_word)), max_tokens))
    if not rows:
        raise ValueError(f"dataset {str(path)!r} has no prompts")
    return [rows[i % len(rows)] for i in range(num)]
