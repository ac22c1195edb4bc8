"""`kvserve`: the command line. `serve` runs the HTTP server, `generate` one prompt offline,
`convert` makes a distilled GQA/MQA variant (model.convert.cli), `bench` hands everything after it
to service.bench.cli.

Every `serve` option can also come from the environment as KVSERVE_<OPTION> (upper case, dashes
as underscores: --kv-cache-memory -> KVSERVE_KV_CACHE_MEMORY); the command line wins. A bad value,
from either, is one line on stderr and exit status 2.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: the engine thread shares the cores with the event loop (and other
# engines), and spin-waiting OpenMP workers slow every small op of a decode step several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_VARIANT = re.compile(r"native|mha|mqa|gqa-[0-9]+")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
TOOL_CALL_FORMATS = ("hermes", "llama3_json")  # service.api.tool_calls.FORMATS (not imported here: start-up stays light)


class _Parser(argparse.ArgumentParser):
    """Errors as one line: `kvserve serve: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _auto_or(parse):
    """`auto` -> None (measured at start-up); anything else through `parse`."""
    return lambda text: None if text == "auto" else parse(text)


def _int_at_least(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be in [{lo}, {hi}]" if hi is not None
                                             else f"{value} is out of range: must be >= {lo}")
        return value
    return parse


def _seconds(allow_zero: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {'>= 0' if allow_zero else '> 0'} seconds")
        return value
    return parse


def _size(text: str) -> int:
    from kvcache.kv_cache import parse_bytes
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _variants(text: str) -> tuple[str, ...]:
    specs = tuple(v.strip() for v in text.split(","))
    names = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and not (_LABEL.fullmatch(name) and name != "native" and path):
            raise argparse.ArgumentTypeError(f"invalid variant {spec!r}: NAME=DIR needs a name (letters, digits, "
                                             "'.', '_', '-'; not 'native') and a checkpoint directory")
        if not sep and not _VARIANT.fullmatch(spec):
            raise argparse.ArgumentTypeError(f"invalid variant {spec!r}: use native, mha, mqa, gqa-N or NAME=DIR "
                                             "(a converted checkpoint), comma-separated")
        names.append(name)
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a variant twice")
    return specs


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise argparse.ArgumentTypeError(f"invalid origin {origin!r}: use scheme://host[:port] or *")
    return origins


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny (random, for tests) or a path "
                   "to a .gguf file or a Hugging Face directory")
    p.add_argument("--variants", type=_variants, default=("native",),
                   help="comma list of attention variants served side by side: native, mha, gqa-N, mqa, or "
                   "NAME=DIR for a converted checkpoint (kvserve convert) sharing every tensor but K/V with --model")
    p.add_argument("--attention", choices=("auto", "kernel", "flash", "sdpa", "naive"), default="auto",
                   help="auto: kvserve's C++ paged kernel on CPU (batch-invariant; built by make install), else flash")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bfloat16 where the CPU (AVX-512/AMX with bf16) or GPU does it well, else float32")
    p.add_argument("--quantization", choices=("auto", "tuned", "none", "q4", "int8", "fp16"), default="auto",
                   help="weight forms: auto (CPU: kvserve's batch-invariant kernels on the checkpoint's own Q4_1/Q8_0 "
                   "codes, dense weights in one fixed order; CUDA: none), tuned (opt-in, not batch-invariant: ATen's "
                   "kernels chosen per batch size at load), none (dense), q4, int8, fp16; see README")
    p.add_argument("--quantization-crossover", type=_int_at_least(0), default=None, metavar="ROWS",
                   help="with tuned: batches of up to ROWS tokens use the quantized weights (default: measured at load)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--kv-cache-memory", type=_size, default=_size("1GiB"), help="KV pool per variant, e.g. 512MiB")
    p.add_argument("--block-size", type=_int_at_least(1), default=16)
    p.add_argument("--max-model-len", type=_int_at_least(1), default=None,
                   help="default: min(model context, KV capacity in tokens)")
    p.add_argument("--max-num-seqs", type=_int_at_least(1), default=64)
    p.add_argument("--max-num-batched-tokens", type=_int_at_least(1), default=1024)
    p.add_argument("--max-queue", type=_int_at_least(0), default=1024,
                   help="waiting requests per variant beyond which new ones get 503")
    p.add_argument("--request-timeout", type=_seconds(allow_zero=False), default=None,
                   help="seconds from arrival to the end of a request (finish_reason timeout; 503 before its first token)")
    p.add_argument("--grammar-compile-timeout", type=_seconds(allow_zero=False), default=5.0,
                   help="seconds one structured-output schema, regex, grammar or choice list may take to compile "
                   "(in a worker process killed at the deadline); beyond it the request gets a 400")
    p.add_argument("--grammar-compile-memory", type=_size, default=_size("512MiB"),
                   help="memory (address space) one grammar compile may take, e.g. 1GiB; beyond it a 400")
    p.add_argument("--grammar-compile-workers", type=_int_at_least(1, 64), default=4,
                   help="grammar compiles that run at once; as many more may wait (each at most one "
                   "--grammar-compile-timeout), beyond that 503")
    p.add_argument("--read-timeout", type=_seconds(allow_zero=False), default=30.0,
                   help="seconds a client gets to send a request's headers, and again its body (408 beyond)")
    p.add_argument("--keep-alive-timeout", type=_seconds(allow_zero=False), default=5.0,
                   help="seconds an idle kept-alive connection stays open")
    add_limit_args(p)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*, /generate, "
                   "/tokenize, /detokenize; several keys separated by commas. Prefer KVSERVE_API_KEY: a command "
                   "line is visible to every user of the machine (ps)")
    p.add_argument("--prefix-cache-scope", choices=("global", "api-key"), default="global",
                   help="api-key: requests share prefix-cache blocks only with requests of the same API key")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_int_at_least(0, 65535), default=8000, help="0 picks a free port (logged)")
    p.add_argument("--shutdown-timeout", type=_seconds(allow_zero=True), default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--no-prefix-caching", action="store_true", default=False)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and see (ids are NAME:variant); default: from --model")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file replacing the checkpoint's")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_FORMATS, default="hermes",
                   help="how tool calls are written in the model's text and parsed out of it: hermes "
                        "(<tool_call>{json}</tool_call>) or llama3_json ({\"name\", \"parameters\"})")
    p.add_argument("--allowed-origins", type=_origins, default=(),
                   help="comma list of origins browsers may call the API from (CORS), or '*'; default: none (CORS off)")
    p.add_argument("--reject-unknown-fields", action="store_true", default=False,
                   help="answer 400 to a request body with a field the API does not know (default: log it)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="text: one line per record; json: one JSON object per line (kvserve and uvicorn alike)")
    p.add_argument("--log-stats-interval", type=_seconds(allow_zero=True), default=10.0,
                   help="seconds between the per-variant stats lines (running, waiting, KV usage, tokens/s), "
                   "logged while there is activity; 0 turns them off")
    p.add_argument("--threads", type=_int_at_least(1, 1024), default=None,
                   help="torch threads for the whole process, split evenly between the variants' engines; "
                   "default: OMP_NUM_THREADS if set, else the CPUs this process may use (affinity and cgroup quota)")
    p.add_argument("--single-thread-tokens", type=_auto_or(_int_at_least(0)), default=None, metavar="N|auto",
                   help="steps of at most N tokens run on one thread (0: never); default auto: measured when "
                   "each engine starts (decode steps with 1 thread against all of them)")
    p.add_argument("--sdpa-decode-seqs", type=_auto_or(_int_at_least(0)), default=None, metavar="N|auto",
                   help="with --attention flash, decode steps of at most N sequences run in the gather + SDPA form "
                   "(0: never); default auto: measured when each engine starts (one layer's decode attention in "
                   "both forms)")


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """What one request may ask for (service.api.limits; the README's limits table)."""
    from service.api.limits import CHARS_PER_TOKEN_BOUND, Limits
    d = Limits()
    p.add_argument("--max-body-bytes", type=_size, default=d.max_body_bytes,
                   help="largest request body, e.g. 8MiB (413 beyond)")
    p.add_argument("--max-prompt-chars", type=_int_at_least(1), default=None,
                   help=f"prompt characters per request, checked before tokenizing "
                   f"(default {CHARS_PER_TOKEN_BOUND} x max_model_len)")
    p.add_argument("--max-messages", type=_int_at_least(1), default=d.max_messages, help="chat messages per request")
    p.add_argument("--max-stop", type=_int_at_least(1), default=d.max_stop, help="stop strings per request")
    p.add_argument("--max-stop-chars", type=_int_at_least(1), default=d.max_stop_chars,
                   help="characters per stop string")
    p.add_argument("--max-response-tokens", type=_int_at_least(1), default=d.max_response_tokens,
                   help="per-request budget: completions x max_tokens x (1 + logprobs)")


def env_defaults(parser: argparse.ArgumentParser, environ) -> dict:
    """Defaults from KVSERVE_* variables, converted and checked like the command line's values."""
    values = {}
    for action in parser._actions:
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is None or action.dest == "help":
            continue
        var = "KVSERVE_" + long[2:].upper().replace("-", "_")
        if var not in environ:
            continue
        text = environ[var]
        try:
            value: object
            if isinstance(action, argparse._StoreTrueAction):
                if text.strip().lower() not in _BOOL:
                    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (1/0, true/false, yes/no, on/off)")
                value = _BOOL[text.strip().lower()]
            else:
                value = action.type(text) if callable(action.type) else text
                if action.choices is not None and value not in action.choices:
                    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(action.choices)}")
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{var}: {exc}")
        values[action.dest] = value
    return values


def serve_options(args: argparse.Namespace):
    """The frozen ServeOptions a parsed `serve` command line means (ValueError on impossible combinations)."""
    import torch

    from model.dtypes import auto_dtype
    from service.api.limits import Limits
    from service.engine.config import EngineConfig
    from service.server import ServeOptions

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (this torch build or machine has none)")
    engine = EngineConfig(
        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_queue=args.max_queue, request_timeout=args.request_timeout,
        enable_prefix_caching=not args.no_prefix_caching, single_thread_tokens=args.single_thread_tokens,
        sdpa_decode_seqs=args.sdpa_decode_seqs, grammar_compile_timeout=args.grammar_compile_timeout,
        grammar_compile_memory=args.grammar_compile_memory, grammar_compile_workers=args.grammar_compile_workers)
    if args.api_key and not any(k.strip() for k in args.api_key.split(",")):
        raise ValueError(f"--api-key {args.api_key!r} holds no key")
    if args.prefix_cache_scope == "api-key" and not args.api_key:
        raise ValueError("--prefix-cache-scope api-key needs --api-key (or KVSERVE_API_KEY): without keys there is "
                         "one tenant")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                    max_messages=args.max_messages, max_stop=args.max_stop, max_stop_chars=args.max_stop_chars,
                    max_response_tokens=args.max_response_tokens)
    return ServeOptions(
        model=args.model, variants=tuple(args.variants), attention=args.attention,
        dtype=auto_dtype(args.device) if args.dtype == "auto" else args.dtype, device=args.device,
        quantization=args.quantization, quantization_crossover=args.quantization_crossover, engine=engine,
        limits=limits, prefix_cache_scope=args.prefix_cache_scope,
        read_timeout=args.read_timeout, keep_alive_timeout=args.keep_alive_timeout,
        api_key=args.api_key or None, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level, threads=args.threads, log_stats_interval=args.log_stats_interval,
        served_model_name=args.served_model_name, chat_template=args.chat_template,
        allowed_origins=tuple(args.allowed_origins), reject_unknown_fields=args.reject_unknown_fields,
        tool_call_parser=args.tool_call_parser)


def build_parser(environ=None) -> argparse.ArgumentParser:
    """`kvserve` with its `serve` subcommand; `generate`, `convert` and `bench` are listed here and parsed
    by their owners (service.offline, model.convert.cli, service.bench.cli), so serving never imports them."""
    parser = _Parser(prog="kvserve", description="LLM inference microservice with a paged KV cache")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the HTTP server (OpenAI-compatible API, /generate, /metrics)")
    add_serve_args(serve)
    serve.set_defaults(**env_defaults(serve, os.environ if environ is None else environ))
    sub.add_parser("generate", help="generate from one prompt without the server: kvserve generate --help",
                   add_help=False)
    sub.add_parser("convert", help="distil a variant with fewer K/V heads into a new checkpoint: "
                   "kvserve convert --help", add_help=False)
    sub.add_parser("bench", help="load tests and benchmarks: kvserve bench --help", add_help=False)
    sub.add_parser("tokenizer", help="write the model's tokenizer files to a folder (for guidellm, lm-eval): "
                   "kvserve tokenizer --help", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser owns every option after the word
        from service.bench.cli import main as bench_main
        return bench_main(argv[1:]) or 0
    if argv[:1] == ["generate"]:
        from service.offline import add_generate_args, run_generate
        parser = _Parser(prog="kvserve generate", description="generate from one prompt without the server")
        add_generate_args(parser)
        return run_generate(parser.parse_args(argv[1:])) or 0
    if argv[:1] == ["tokenizer"]:
        from service.tokenizer_files import add_tokenizer_args, run_tokenizer
        parser = _Parser(prog="kvserve tokenizer", description="write the model's tokenizer files to a folder")
        add_tokenizer_args(parser)
        return run_tokenizer(parser.parse_args(argv[1:]))
    if argv[:1] == ["convert"]:
        from model.convert.cli import add_convert_args, run_convert
        parser = _Parser(prog="kvserve convert", description="distil a GQA/MQA variant of a checkpoint from it")
        add_convert_args(parser)
        return run_convert(parser.parse_args(argv[1:]))

    args = build_parser().parse_args(argv)
    from service.logs import configure_logging
    configure_logging(args.log_level, args.log_format)
    from service.server import build_state, run
    try:
        opts = serve_options(args)
        state = build_state(opts)
    except (ValueError, FileNotFoundError) as exc:  # bad model, variant, KV budget or max_model_len
        print(f"kvserve serve: error: {exc}", file=sys.stderr)
        return 2
    return run(state, opts)


if __name__ == "__main__":
    sys.exit(main())
