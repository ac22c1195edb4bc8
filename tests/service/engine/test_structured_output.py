"""Structured output on the real engine with the tiny model: every output matches its grammar (regex,
choice, JSON schema, any JSON object, EBNF), greedy constrained decoding equals the masked no-cache
reference, it survives preemption, and a request aborted mid-grammar gives back its blocks and its
matcher. min_tokens keeps stop tokens away. The random tiny model makes the grammar do all the work.
"""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from model.sampler import TokenMasks, apply_token_masks
from model.sampling_params import SamplingParams, StructuredOutput
from service.engine import RequestError
from service.engine.structured_output import GrammarCompiler
from tests.service.engine.engine_helpers import collect, make_engine, run_all, text_of, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "maxLength": 6},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "inner": {"type": "object", "properties": {"kind": {"enum": ["a", "b", "c"]}, "score": {"type": "number"}},
                  "required": ["kind"], "additionalProperties": False},
    },
    "required": ["id", "name", "flags", "inner"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,4}-[0-9]{3}(\.[0-9])?"
CHOICES = ["red", "green", "blue sky", "say \"hi\""]


@pytest.fixture(scope="module")
def engine(tiny):
    engine = make_engine(*tiny)
    yield engine
    engine.shutdown()


def prompts(tok, n: int) -> list[list[int]]:
    return [tok.encode(f"prompt number {i}: ") for i in range(n)]


def sampled(spec: StructuredOutput, seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 120), temperature=1.0, seed=seed, structured_output=spec, **kw)


def test_regex_and_choice_outputs_always_match(tiny, engine):
    _, tok = tiny
    regex, choice = StructuredOutput("regex", REGEX), StructuredOutput.choice(CHOICES)
    requests = [(p, sampled(regex, i)) for i, p in enumerate(prompts(tok, 8))]
    requests += [(p, sampled(choice, i)) for i, p in enumerate(prompts(tok, 8))]
    requests += [(p, SamplingParams(max_tokens=20, temperature=0, structured_output=regex)) for p in prompts(tok, 2)]
    outs = run_all(engine, requests)
    for outputs in outs[:8] + outs[16:]:
        assert re.fullmatch(REGEX, text_of(outputs)), text_of(outputs)
        assert outputs[-1].finish_reason == "stop"
    assert {text_of(o) for o in outs[8:16]} <= set(CHOICES)
    assert all(o[-1].finish_reason == "stop" and o[-1].new_token_ids[-1] in tok.eos_token_ids for o in outs[8:16])


def test_json_schema_outputs_validate(tiny, engine):
    _, tok = tiny
    spec = StructuredOutput("json", json.dumps(SCHEMA), strict=True)
    outs = run_all(engine, [(p, sampled(spec, i, max_tokens=150)) for i, p in enumerate(prompts(tok, 10))])
    for outputs in outs:
        assert outputs[-1].finish_reason == "stop", text_of(outputs)
        jsonschema.validate(json.loads(text_of(outputs)), SCHEMA)


def test_json_object_and_ebnf(tiny, engine):
    _, tok = tiny
    obj = StructuredOutput("json_object")
    ebnf = StructuredOutput("grammar", 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9]+ | "x"')
    outs = run_all(engine, [(p, SamplingParams(max_tokens=60, temperature=0, structured_output=obj)) for p in prompts(tok, 2)]
                   + [(p, sampled(ebnf, i, max_tokens=60)) for i, p in enumerate(prompts(tok, 4))])
    for outputs in outs[:2]:
        assert isinstance(json.loads(text_of(outputs)), dict)
    for outputs in outs[2:]:
        if outputs[-1].finish_reason == "stop":
            assert re.fullmatch(r"\((\d+|x)(,(\d+|x))*\)", text_of(outputs))
        else:  # a random model may keep adding items: still a prefix of the language
            assert re.fullmatch(r"\((\d+|x)(,(\d+|x))*,?\d*", text_of(outputs))


@torch.inference_mode()
def test_greedy_constrained_equals_the_masked_reference(tiny, engine):
    """The engine's tokens equal the no-cache forward's argmax under the same grammar's masks."""
    model, tok = tiny
    spec = StructuredOutput("regex", REGEX)
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    matcher = compiler.new_matcher(compiler.compile(spec), spec)
    ids = tok.encode("The paged KV cache")
    ref: list[int] = []
    while not matcher.is_terminated():
        logits = model(torch.tensor([ids + ref]))[0, -1:].float()
        bitmask = torch.empty((1, compiler.bitmask_width), dtype=torch.int32)
        matcher.fill_next_token_bitmask(bitmask, 0)
        apply_token_masks(logits, TokenMasks(bitmask, [0]))
        ref.append(int(logits.argmax()))
        assert matcher.accept_token(ref[-1])
    compiler.close()
    [outs] = run_all(engine, [(ids, SamplingParams(max_tokens=40, temperature=0, structured_output=spec))])
    assert tokens_of(outs) == ref


def test_grammar_state_survives_preemption(tiny):
    model, tok = tiny
    cfg = model.config
    bytes_per_block = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * 16
    engine = make_engine(model, tok, kv_cache_memory=10 * bytes_per_block, max_model_len=160)
    spec = StructuredOutput("json", json.dumps(SCHEMA), strict=True)
    requests = [([5 + i] * 40, sampled(spec, i, max_tokens=110)) for i in range(12)]
    outs = run_all(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for outputs in outs:
        if outputs[-1].finish_reason == "stop":
            jsonschema.validate(json.loads(text_of(outputs)), SCHEMA)
        else:  # max_tokens before the grammar ended: the text so far is still a prefix the grammar allows
            assert outputs[-1].finish_reason == "length" and text_of(outputs).startswith('{"id": ')
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


def test_abort_mid_grammar_frees_blocks_and_matcher(tiny, engine):
    _, tok = tiny
    spec = StructuredOutput("json_object")

    async def main():
        outputs = engine.generate(tok.encode("abort me"), SamplingParams(max_tokens=100, temperature=1.0, seed=0,
                                                                          structured_output=spec), "abort-1")
        first = await outputs.__anext__()
        live = engine._requests.get("abort-1")
        await outputs.aclose()  # the caller leaves: the engine aborts the request
        return first, live

    first, live = asyncio.run(main())
    assert first.finish_reason is None and live is not None
    for _ in range(200):
        if live.is_finished and engine.stats().kv.used_blocks == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert live.finish_reason == "abort" and live.grammar is None and engine.stats().kv.used_blocks == 0


def test_min_tokens_holds_back_stop_tokens(tiny, engine):
    _, tok = tiny
    ids = tok.encode("Stop early")
    [free] = run_all(engine, [(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])
    stop = tokens_of(free)[1]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=(stop,), min_tokens=8)
    [held] = run_all(engine, [(ids, params)])
    tokens = tokens_of(held)
    assert len(tokens) > 8 and stop not in tokens[:8]
    assert held[-1].finish_reason == "length" or tokens[-1] == stop
    with pytest.raises(ValueError, match="min_tokens=9 is out of range"):
        SamplingParams(max_tokens=8, min_tokens=9)


@pytest.mark.parametrize("spec,message", [
    (StructuredOutput("json", '{"type": "objekt"}'), "invalid JSON schema at type"),
    (StructuredOutput("json", '{"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}'), "nope"),
    (StructuredOutput("regex", "([a-z"), "invalid regex"),
    (StructuredOutput("grammar", 'root ::= "a" |'), "invalid grammar"),
    (StructuredOutput.choice([]), "at least one option"),
])
def test_an_invalid_spec_is_a_request_error_naming_the_problem(tiny, engine, spec, message):
    _, tok = tiny
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        asyncio.run(collect(engine, tok.encode("x"), SamplingParams(structured_output=spec), "bad-spec"))
    assert info.value.param == "structured_output"
