"""Structured output on the real SmolLM2-135M: 20 varied chat prompts under one nested JSON schema
(objects in objects, an array of objects, enums, bounded integers, bounded strings and arrays,
required fields) all end with a document that parses and validates with jsonschema; and greedy
requests without a constraint produce the same tokens whether or not constrained requests share
their batch (a grammar's mask touches its own row only).

One engine, every request submitted at once: the 20 unconstrained requests alone, then the same 20
beside the 20 constrained ones. SCHEMA bounds every string (maxLength) and array (maxItems), so
each document is finite and MAX_TOKENS is far above the longest one SmolLM2 writes for these prompts.
"""
from __future__ import annotations

import json

import jsonschema
import pytest

from model.sampling_params import SamplingParams, StructuredOutput
from service.engine.config import EngineConfig
from service.engine.llm import LLM

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["engineer", "teacher", "artist", "doctor", "other"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 16},
                           "floor": {"type": "integer", "minimum": 0, "maximum": 50}},
            "required": ["city", "floor"], "additionalProperties": False,
        },
        "skills": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"skill": {"type": "string", "minLength": 1, "maxLength": 12},
                           "level": {"enum": ["novice", "skilled", "expert"]}},
            "required": ["skill", "level"], "additionalProperties": False}},
    },
    "required": ["name", "age", "role", "address", "skills"],
    "additionalProperties": False,
}
SUBJECTS = ["a librarian in Oslo", "a retired pilot", "a chess coach", "a baker in Lyon", "a marine biologist",
            "a taxi driver in Lima", "a violin maker", "a nurse in Nairobi", "a software tester", "a beekeeper",
            "a museum guard", "a ski instructor", "a florist in Kyoto", "a tram driver", "a glass blower",
            "a park ranger", "a sushi chef", "a wind farm engineer", "a choir director", "a lighthouse keeper"]
MAX_TOKENS = 200    # the longest document SmolLM2 writes here is about 110 tokens
FREE_TOKENS = 16


def test_twenty_prompts_under_a_nested_schema_validate_and_leave_unconstrained_neighbours_unchanged(smollm2):
    model, tokenizer = smollm2
    conversations = [[{"role": "user", "content": f"Describe {subject} as a JSON record."}] for subject in SUBJECTS]
    schema = SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                            structured_output=StructuredOutput("json", json.dumps(SCHEMA), strict=True))
    free = SamplingParams(max_tokens=FREE_TOKENS, temperature=0, ignore_eos=True)
    with LLM(model, tokenizer, EngineConfig(kv_cache_memory=256 << 20, max_num_batched_tokens=2048)) as llm:
        alone = llm.chat(conversations, free)
        mixed = llm.chat(conversations * 2, [schema] * len(conversations) + [free] * len(conversations))
    constrained, neighbours = mixed[:len(conversations)], mixed[len(conversations):]
    for out in constrained:
        assert out.finish_reason == "stop" and out.token_ids[-1] in tokenizer.eos_token_ids, out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({out.text for out in constrained}) > len(conversations) // 2  # the prompts shape the records
    assert [out.token_ids for out in neighbours] == [out.token_ids for out in alone]
