"""`kvserve` command line: options, their KVSERVE_* environment twins, one-line errors, dtype auto, delegation."""
from __future__ import annotations

import sys
import types

import pytest

from service import cli
from service.api.limits import Limits
from service.engine.config import EngineConfig


def parse(argv, env=None):
    return cli.build_parser(environ=env or {}).parse_args(["serve", *argv])


def test_defaults_are_the_documented_ones():
    args = parse([])
    assert (args.model, args.variants, args.attention, args.dtype, args.device) == (
        "smollm2-135m", ("native",), "auto", "auto", "cpu")
    assert (args.kv_cache_memory, args.block_size, args.max_model_len, args.max_queue) == (2**30, 16, None, 1024)
    assert (args.host, args.port, args.shutdown_timeout, args.api_key, args.no_prefix_caching) == (
        "127.0.0.1", 8000, 30.0, None, False)


# (option, command-line value, attribute, parsed value): every option of `serve`
OPTIONS = [
    ("--model", "tiny", "model", "tiny"),
    ("--variants", "mha,gqa-2,mqa", "variants", ("mha", "gqa-2", "mqa")),
    ("--attention", "naive", "attention", "naive"),
    ("--dtype", "bfloat16", "dtype", "bfloat16"),
    ("--device", "cuda", "device", "cuda"),
    ("--quantization", "q4", "quantization", "q4"),
    ("--quantization-crossover", "8", "quantization_crossover", 8),
    ("--single-thread-tokens", "4", "single_thread_tokens", 4),
    ("--sdpa-decode-seqs", "8", "sdpa_decode_seqs", 8),
    ("--kv-cache-memory", "512MiB", "kv_cache_memory", 512 * 2**20),
    ("--block-size", "8", "block_size", 8),
    ("--max-model-len", "300", "max_model_len", 300),
    ("--max-num-seqs", "3", "max_num_seqs", 3),
    ("--max-num-batched-tokens", "99", "max_num_batched_tokens", 99),
    ("--max-queue", "0", "max_queue", 0),
    ("--request-timeout", "2.5", "request_timeout", 2.5),
    ("--grammar-compile-timeout", "1.5", "grammar_compile_timeout", 1.5),
    ("--grammar-compile-memory", "1GiB", "grammar_compile_memory", 1 << 30),
    ("--grammar-compile-workers", "2", "grammar_compile_workers", 2),
    ("--api-key", "s3cret", "api_key", "s3cret"),
    ("--host", "0.0.0.0", "host", "0.0.0.0"),
    ("--port", "0", "port", 0),
    ("--shutdown-timeout", "0", "shutdown_timeout", 0.0),
    ("--log-level", "debug", "log_level", "debug"),
    ("--log-format", "json", "log_format", "json"),
    ("--log-stats-interval", "2.5", "log_stats_interval", 2.5),
    ("--threads", "3", "threads", 3),
    ("--served-model-name", "smol", "served_model_name", "smol"),
    ("--chat-template", "/tmp/t.jinja", "chat_template", "/tmp/t.jinja"),
    ("--tool-call-parser", "llama3_json", "tool_call_parser", "llama3_json"),
    ("--allowed-origins", "https://a.example,https://b.example", "allowed_origins",
     ("https://a.example", "https://b.example")),
    ("--max-body-bytes", "8MiB", "max_body_bytes", 8 << 20),
    ("--max-prompt-chars", "5000", "max_prompt_chars", 5000),
    ("--max-messages", "10", "max_messages", 10),
    ("--max-stop", "16", "max_stop", 16),
    ("--max-stop-chars", "40", "max_stop_chars", 40),
    ("--max-response-tokens", "1000", "max_response_tokens", 1000),
    ("--prefix-cache-scope", "api-key", "prefix_cache_scope", "api-key"),
    ("--read-timeout", "2.5", "read_timeout", 2.5),
    ("--keep-alive-timeout", "0.5", "keep_alive_timeout", 0.5),
]


def env_name(option: str) -> str:
    return "KVSERVE_" + option[2:].upper().replace("-", "_")


@pytest.mark.parametrize("option,value,attr,expected", OPTIONS)
def test_every_option_from_the_command_line_and_the_environment(option, value, attr, expected):
    assert getattr(parse([option, value]), attr) == expected
    assert getattr(parse([], {env_name(option): value}), attr) == expected


def test_every_serve_option_is_covered_here():
    parser = cli.build_parser(environ={})
    serve = parser._subparsers._group_actions[0].choices["serve"]
    options = {o for a in serve._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert options == {o for o, *_ in OPTIONS} | {"--no-prefix-caching", "--reject-unknown-fields"}


@pytest.mark.parametrize("text,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)])
def test_flag_from_the_environment(text, expected):
    assert parse([], {"KVSERVE_NO_PREFIX_CACHING": text}).no_prefix_caching is expected


def test_command_line_beats_environment():
    args = parse(["--port", "9001", "--variants", "mqa"], {"KVSERVE_PORT": "9000", "KVSERVE_VARIANTS": "mha"})
    assert (args.port, args.variants) == (9001, ("mqa",))


@pytest.mark.parametrize("argv,needle", [
    (["--port", "70000"], "70000"),
    (["--port", "http"], "'http'"),
    (["--block-size", "0"], "must be >= 1"),
    (["--max-queue", "-1"], "must be >= 0"),
    (["--sdpa-decode-seqs", "-1"], "-1 is out of range: must be >= 0"),
    (["--kv-cache-memory", "lots"], "'lots'"),
    (["--request-timeout", "0"], "> 0"),
    (["--grammar-compile-timeout", "0"], "> 0"),
    (["--grammar-compile-workers", "0"], "must be in [1, 64]"),
    (["--shutdown-timeout", "-3"], ">= 0"),
    (["--variants", "mha,gqa"], "'gqa'"),
    (["--variants", "mqa,mqa"], "twice"),
    (["--dtype", "float64"], "float64"),
    (["--attention", "fast"], "fast"),
    (["--threads", "0"], "0 is out of range: must be in [1, 1024]"),
    (["--threads", "two"], "'two'"),
    (["--log-format", "xml"], "xml"),
    (["--log-stats-interval", "-1"], ">= 0"),
    (["--bogus"], "--bogus"),
])
def test_bad_command_line_values_are_one_line_and_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and err.startswith(("kvserve serve: error:", "kvserve: error:")) and needle in err


@pytest.mark.parametrize("var,value", [("KVSERVE_PORT", "x"), ("KVSERVE_DTYPE", "fp8"),
                                       ("KVSERVE_NO_PREFIX_CACHING", "maybe"), ("KVSERVE_KV_CACHE_MEMORY", "-1GiB")])
def test_bad_environment_values_name_the_variable(var, value, capsys, monkeypatch):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"kvserve serve: error: {var}:") and value in err


def test_serve_options_builds_the_engine_config():
    args = parse(["--model", "tiny", "--dtype", "float32", "--kv-cache-memory", "4MiB", "--block-size", "8",
                  "--max-model-len", "256", "--max-num-seqs", "3", "--max-num-batched-tokens", "64",
                  "--max-queue", "5", "--request-timeout", "9", "--no-prefix-caching", "--api-key", "k",
                  "--single-thread-tokens", "4", "--sdpa-decode-seqs", "2", "--grammar-compile-timeout", "3",
                  "--grammar-compile-memory", "64MiB", "--grammar-compile-workers", "2"])
    opts = cli.serve_options(args)
    assert opts.engine == EngineConfig(kv_cache_memory=4 << 20, block_size=8, max_model_len=256, max_num_seqs=3,
                                       max_num_batched_tokens=64, max_queue=5, request_timeout=9.0,
                                       enable_prefix_caching=False, single_thread_tokens=4, sdpa_decode_seqs=2,
                                       grammar_compile_timeout=3.0, grammar_compile_memory=64 << 20,
                                       grammar_compile_workers=2)
    assert (opts.model, opts.dtype, opts.api_key) == ("tiny", "float32", "k")
    assert (opts.threads, opts.log_stats_interval) == (None, 10.0)  # None: sized from the CPUs at start-up
    assert opts.limits == Limits()


def test_serve_options_builds_the_limits():
    args = parse(["--max-body-bytes", "1MiB", "--max-prompt-chars", "900", "--max-messages", "3", "--max-stop", "9",
                  "--max-stop-chars", "7", "--max-response-tokens", "500"])
    assert cli.serve_options(args).limits == Limits(max_body_bytes=1 << 20, max_prompt_chars=900, max_messages=3,
                                                    max_stop=9, max_stop_chars=7, max_response_tokens=500)


@pytest.mark.parametrize("argv,needle", [
    (["--prefix-cache-scope", "api-key"], "needs --api-key"),
    (["--api-key", " , "], "holds no key"),
])
def test_impossible_key_settings_are_refused(argv, needle):
    with pytest.raises(ValueError, match=needle):
        cli.serve_options(parse(argv))


def test_several_api_keys_and_the_cache_scope():
    opts = cli.serve_options(parse(["--api-key", "k1, k2", "--prefix-cache-scope", "api-key"]))
    assert (opts.api_key, opts.prefix_cache_scope) == ("k1, k2", "api-key")


def test_model_errors_found_at_start_up_are_one_line_exit_2(capsys):
    assert cli.main(["serve", "--model", "no-such-model", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kvserve serve: error:") and "no-such-model" in err[-1]
    # tiny has 4 query heads: gqa-3 cannot divide them
    assert cli.main(["serve", "--model", "tiny", "--variants", "gqa-3", "--dtype", "float32",
                     "--kv-cache-memory", "1MiB"]) == 2
    assert "gqa-3" in capsys.readouterr().err.strip().splitlines()[-1]
    # an explicit max_model_len beyond the KV capacity is refused, naming the capacity
    assert cli.main(["serve", "--model", "tiny", "--dtype", "float32", "--kv-cache-memory", "64KiB",
                     "--max-model-len", "500"]) == 2
    assert "capacity" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_gets_every_argument_after_the_word(monkeypatch):
    seen = []
    fake = types.ModuleType("service.bench.cli")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "service.bench.cli", fake)
    assert cli.main(["bench", "serve", "--port", "1", "--help"]) == 3
    assert seen == [["serve", "--port", "1", "--help"]]


def test_generate_is_parsed_and_run_by_service_offline(monkeypatch):
    seen = []
    fake = types.ModuleType("service.offline")
    fake.add_generate_args = lambda p: p.add_argument("--prompt", required=True)
    fake.run_generate = lambda args: seen.append(args.prompt) or 0
    monkeypatch.setitem(sys.modules, "service.offline", fake)
    assert cli.main(["generate", "--prompt", "hi"]) == 0
    assert seen == ["hi"]
