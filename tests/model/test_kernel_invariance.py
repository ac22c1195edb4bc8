"""Batch invariance of the q4q8 / q8q8 kernels: a row's output, bit for bit, whatever else is computed.

Each row alone against the same row inside batches of 1-64 random other rows, at 1 and 2 threads,
on odd N (not whole blocks of 8; N=1001 is split between threads even for one row) and several K; shuffled batches give the same rows shuffled; the
real SmolLM2 layer 0 and LM head (slow). torch.equal throughout: any M-dependent tiling, thread-
dependent split of K or SIMD/scalar disagreement shows up as a changed bit.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.kernel_forms import Q4Q8Form, Q8Q8Form, q4q8_reference, q8q8_reference
from tests.model.kernel_support import activations, random_q4, random_q8, require_kernels


@pytest.fixture(autouse=True)
def _kernels():
    require_kernels()


def forms(n: int, k: int, seed: int):
    return [Q4Q8Form(random_q4(n, k, seed)), Q8Q8Form(random_q8(n, k, seed))]


@pytest.mark.parametrize("shape", [(45, 64), (203, 96), (37, 576), (1001, 64)], ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_a_row_alone_equals_the_row_in_any_batch_at_any_thread_count(shape, threads):
    n, k = shape
    probe = activations(3, k, seed=7)
    for form in forms(n, k, seed=n):
        threads(1)
        alone = [form(probe[i:i + 1]) for i in range(3)]
        for num_threads in (1, 2):
            threads(num_threads)
            for m in range(1, 65):
                others = activations(m, k, seed=m) * (m % 5 + 0.5)
                position = (m * 7) % (m + 1)  # anywhere from first to last
                batch = torch.cat((others[:position], probe, others[position:]))
                out = form(batch)
                for i in range(3):
                    assert torch.equal(out[position + i:position + i + 1], alone[i]), (form.name, num_threads, m, i)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), seed=st.integers(0, 2 ** 16), data=st.data())
def test_shuffled_rows_give_the_same_rows_shuffled(rows, seed, data):
    x = activations(rows, 96, seed=seed)
    order = torch.tensor(data.draw(st.permutations(range(rows))), dtype=torch.long)
    for form in forms(21, 96, seed=seed):
        assert torch.equal(form(x[order]), form(x)[order])


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_portable_path_is_batch_invariant_too(rows):
    x = activations(rows + 5, 64, seed=rows)
    for form in forms(45, 64, seed=1):
        op = torch.ops.kvserve.q4_1_mm if form.name == "q4q8" else torch.ops.kvserve.q8_0_mm
        batch = op(x, form.packed, 45, True)
        assert torch.equal(batch[:rows], op(x[:rows], form.packed, 45, True))
        assert torch.equal(batch, form(x))


@pytest.fixture(scope="module")
def smollm2_weights(smollm2_gguf_path):
    from model.gguf_loader import open_gguf
    weights = open_gguf(smollm2_gguf_path).weights(progress=False)
    return {name: w for name, w in weights.items() if name.startswith("layers.0.") or name == "tok_embeddings.weight"}


@pytest.mark.slow
def test_real_smollm2_layer_and_head(smollm2_weights, threads):
    """Layer 0's Q4_1 matrices and the Q8_0 token embedding (the tied LM head), fed real embedding rows."""
    from model.quantized import Q4Weight, Q8Weight
    embed = smollm2_weights["tok_embeddings.weight"]
    assert isinstance(embed, Q8Weight)
    tokens = torch.tensor([1, 504, 3458, 314, 4649, 28, 1330, 2, 19, 100, 2000, 30000, 49151])
    x576 = embed.lookup(tokens, torch.float32) * 40
    x1536 = torch.cat((x576, x576, x576[:, :384]), dim=1)
    matrices = {name: w for name, w in smollm2_weights.items() if isinstance(w, Q4Weight)}
    assert len(matrices) == 7
    cases = [(Q4Q8Form(w), q4q8_reference, w) for w in matrices.values()] + [(Q8Q8Form(embed), q8q8_reference, embed)]
    for form, reference, weight in cases:
        x = x576 if form.shape[1] == 576 else x1536
        threads(2)
        out = form(x)
        ref = reference(x, weight)
        assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5, form.name
        threads(1)
        for i in (0, 5, len(tokens) - 1):
            assert torch.equal(form(x[i:i + 1]), out[i:i + 1])
