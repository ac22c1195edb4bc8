"""Serving a converted checkpoint beside its base: `--variants native,mqa=DIR`.

DIR is the tiny model's MQA variant with its K/V projections changed (as `kvserve convert` leaves
them) written as a Hugging Face directory. The live server must route `tiny:mqa` to DIR's K/V
(greedy text equal to DIR's own no-cache forward), export MQA's footprint for it, and share every
other tensor; a directory that differs elsewhere, or whose name contradicts its head count, is a
one-line start-up error.
"""
from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import PRESETS
from model.hf_writer import save_hf_checkpoint
from model.loader import load_model
from model.tokenizer import byte_tokenizer
from model.transformer import checkpoint_weights, random_transformer
from model.variants import with_variant
from service import cli
from service.engine.config import EngineConfig
from service.server import ServeOptions, build_state
from tests.reference import greedy_no_cache
from tests.service.live_server import LiveServer

BUDGET = 1 << 20
BLOCK = 8


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """The tiny model's (seed 0, what `--model tiny` serves) MQA variant with perturbed K/V."""
    mqa = with_variant(random_transformer(PRESETS["tiny"], seed=0), "mqa")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in mqa.layers:
            proj = layer.attention.wkv  # K and V rows
            proj.weight.add_(0.3 * torch.randn(proj.weight.shape, generator=gen))
    path = tmp_path_factory.mktemp("converted") / "tiny-mqa"
    save_hf_checkpoint(mqa, byte_tokenizer(), path)
    return path


def test_live_server_serves_the_converted_kv_with_mqa_footprint(converted_dir):
    own, tokenizer = load_model(converted_dir, progress=False)
    prompt = tokenizer.encode("Shared weights, distilled keys.")
    expected = tokenizer.decode(greedy_no_cache(own, prompt, 8)[0])
    with LiveServer("--variants", f"native,mqa={converted_dir}", "--kv-cache-memory", "1MiB",
                    "--block-size", str(BLOCK)) as server:
        ids = [m["id"] for m in httpx.get(server.url("/v1/models")).json()["data"]]
        assert ids == ["tiny:native", "tiny:mqa"]
        body = {"model": "tiny:mqa", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        assert httpx.post(server.url("/v1/completions"), json=body, timeout=60).json()["choices"][0]["text"] == expected
        cfg = PRESETS["tiny"]
        for variant, n_kv in (("native", cfg.n_kv_heads), ("mqa", 1)):
            bytes_per_token = 2 * cfg.n_layers * n_kv * cfg.head_dim * 4
            assert server.metric("kvserve_kv_cache_bytes_per_token", variant=variant) == bytes_per_token
            assert server.metric("kvserve_kv_cache_capacity_tokens", variant=variant) == \
                BUDGET // (bytes_per_token * BLOCK) * BLOCK


def test_only_kv_comes_from_the_directory(converted_dir):
    state = build_state(ServeOptions(model="tiny", variants=("native", f"mqa={converted_dir}"), dtype="float32",
                                     engine=EngineConfig(kv_cache_memory=BUDGET)))
    native, mqa = (state.engines[v].model for v in ("native", "mqa"))
    own, _ = load_model(converted_dir, progress=False)
    theirs = checkpoint_weights(own)
    for name, tensor in checkpoint_weights(mqa).items():
        if ".wk." in name or ".wv." in name:
            assert torch.equal(tensor, theirs[name]), name
    for ours, served in zip(native.layers, mqa.layers):  # every module but the K/V projection is shared
        assert ours.attention.wq is served.attention.wq and ours.attention.wo is served.attention.wo
        assert ours.feed_forward is served.feed_forward and ours.attention_norm is served.attention_norm
        assert ours.attention.wkv is not served.attention.wkv
    assert native.tok_embeddings is mqa.tok_embeddings and native.output is mqa.output


def test_changed_q_and_o_projections_come_from_the_directory_where_they_differ(converted_dir, tmp_path):
    """A `--train attention` directory: layer 0's Q and layer 1's O changed too; each is taken
    from DIR in its own layer, the unchanged ones (and the MLPs) stay the base's objects."""
    mqa, tokenizer = load_model(converted_dir, progress=False)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for proj in (mqa.layers[0].attention.wq, mqa.layers[1].attention.wo):
            proj.weight.add_(0.3 * torch.randn(proj.weight.shape, generator=gen))
    path = tmp_path / "tiny-mqa-attention"
    save_hf_checkpoint(mqa, tokenizer, path)
    state = build_state(ServeOptions(model="tiny", variants=("native", f"mqa={path}"), dtype="float32",
                                     engine=EngineConfig(kv_cache_memory=BUDGET, sdpa_decode_seqs=0)))
    native, served = (state.engines[v].model for v in ("native", "mqa"))
    (n0, s0), (n1, s1) = zip(native.layers, served.layers)
    assert s0.attention.wq is not n0.attention.wq and s0.attention.wo is n0.attention.wo
    assert s1.attention.wq is n1.attention.wq and s1.attention.wo is not n1.attention.wo
    assert all(n.feed_forward is s.feed_forward for n, s in zip(native.layers, served.layers))
    own, _ = load_model(path, quantization="auto", attention="auto", progress=False)  # the weight forms the server runs
    ids = torch.tensor([tokenizer.encode("Queries and outputs trained too.")])
    torch.testing.assert_close(served(ids), own(ids), rtol=0, atol=0)
    for engine in state.engines.values():
        engine.shutdown()


def _serve_error(capsys, variants: str) -> str:
    try:
        code = cli.main(["serve", "--model", "tiny", "--dtype", "float32", "--kv-cache-memory", "1MiB",
                         "--variants", variants])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # start-up log lines, then the error
    errors = [line for line in lines if line.startswith("kvserve serve: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_a_directory_that_differs_beyond_kv_is_refused(converted_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in converted_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] += 1e-3
    save_file(tensors, str(bad / "model.safetensors"))
    err = _serve_error(capsys, f"native,mqa={bad}")
    assert "tensor 'model.layers.1.mlp.up_proj.weight' differs from the served model's" in err
    assert f"--model {bad}" in err


def test_a_name_that_contradicts_the_head_count_is_refused(converted_dir, capsys):
    err = _serve_error(capsys, f"native,mha={converted_dir}")
    assert "has 1 K/V heads, not what 'mha' means" in err
    assert "invalid variant 'native=" in _serve_error(capsys, f"native={converted_dir}")
