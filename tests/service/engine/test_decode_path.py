"""Decode steps in the sdpa form up to a measured batch size: the line, and the engine using it."""
from __future__ import annotations

import pytest
import torch

from model import paged_attention
from model.loader import load_model
from model.sampling_params import SamplingParams
from service.engine import decode_path
from service.engine.step_threads import PROBE_TOKENS
from tests.service.engine.engine_helpers import make_engine, reference_greedy, run_all, tokens_of


def test_the_line_is_the_largest_batch_up_to_which_sdpa_always_won(tiny, monkeypatch):
    model, tok = tiny
    engine = make_engine(model, tok, sdpa_decode_seqs=0)
    seconds = {(1, "flash"): 2.0, (1, "sdpa"): 1.0, (2, "flash"): 2.0, (2, "sdpa"): 1.5, (4, "flash"): 1.0,
               (4, "sdpa"): 1.0, (8, "flash"): 9.0, (8, "sdpa"): 1.0}
    timed_on = []
    monkeypatch.setattr(decode_path, "_attention_seconds",
                        lambda m, kv, tokens, form, repeats: (timed_on.append((tokens, torch.get_num_threads())),
                                                              seconds[tokens, form])[1])
    before = torch.get_num_threads()
    # 8 sequences would win again, but 4 was a tie (not a win) first: the line is drawn at 2
    assert decode_path.measure_sdpa_decode_seqs(model, engine.kv_cache, lambda n: 1 if n <= 2 else 2) == 2
    assert timed_on == [(1, 1), (1, 1), (2, 1), (2, 1), (4, 2), (4, 2)]  # each size on the threads it will run on
    assert torch.get_num_threads() == before
    engine.shutdown()


def test_only_the_flash_attention_on_cpu_is_measured(tiny):
    model, tok = tiny
    engine = make_engine(model, tok, sdpa_decode_seqs=0)
    naive, _ = load_model("tiny", dtype=torch.float32, attention="naive", progress=False)
    assert decode_path.measure_sdpa_decode_seqs(naive, engine.kv_cache, lambda n: 1) == 0
    assert decode_path.measure_sdpa_decode_seqs(model, engine.kv_cache, lambda n: 1, repeats=1) in (0, *PROBE_TOKENS)
    engine.shutdown()


@pytest.mark.parametrize("sdpa_seqs", [0, 3])
def test_small_pure_decode_steps_run_in_the_sdpa_form_and_keep_their_tokens(tiny, monkeypatch, sdpa_seqs):
    model, tok = tiny
    calls: list[tuple[str, int, int]] = []  # (form, rows, prefills) per layer call
    for form in ("flash", "sdpa"):
        real = paged_attention.PAGED_ATTENTION_IMPLS[form]
        monkeypatch.setitem(paged_attention.PAGED_ATTENTION_IMPLS, form,
                            lambda q, k, v, plan, _form=form, _real=real: (
                                calls.append((_form, q.shape[0], len(plan.prefills))), _real(q, k, v, plan))[1])
    engine = make_engine(model, tok, sdpa_decode_seqs=sdpa_seqs)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = run_all(engine, [(p, params) for p in prompts])
    engine.shutdown()
    for prompt, out in zip(prompts, outs):
        assert tokens_of(out) == reference_greedy(model, prompt, 6)
    decode_forms = {form for form, rows, prefills in calls if rows == 3 and not prefills}
    assert decode_forms == ({"sdpa"} if sdpa_seqs >= 3 else {"flash"})
    assert all(form == "flash" for form, _, prefills in calls if prefills)  # prefill stays flash


def test_only_a_flash_plan_lists_the_value_rows_it_reads_in_place(tiny):
    """The V rows of the in-place value product are built once per step, and only for the form that
    reads them: a step run in the sdpa form does not pay for them."""
    from kvcache.metadata import PagedMetadata

    model, _ = tiny
    meta = PagedMetadata.build(query_lens=[1, 1], context_lens=[20, 7], block_tables=[[1, 2], [3]], block_size=16)
    flash, sdpa = model.plan(meta, "flash"), model.plan(meta, "sdpa")
    assert [t.rows is not None for t in flash.decode_tiles] == [True]
    assert [t.rows is None for t in sdpa.decode_tiles] == [True]
