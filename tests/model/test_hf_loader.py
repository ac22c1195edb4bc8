"""Hugging Face directories: tiny random Llama / Mistral / Qwen2 checkpoints written by
transformers' `save_pretrained`, loaded by our loader, must give transformers' logits; their
tokenizer files must tokenize and chat-format as transformers does; and each way a directory can
be wrong fails with a one-line message naming the problem."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.chat_template import ChatTemplateError, render_chat_template
from model.loader import load_model
from model.tokenizer import CHATML_TEMPLATE, byte_tokenizer

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CASES = {  # name -> (config class, extra config, save kwargs)
    "llama-mha-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                           rope_theta=10000.0), {}),
    "llama-gqa-sharded": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                              rope_theta=500.0), dict(max_shard_size="40KB")),
    "mistral-mqa": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=64), {}),
    "qwen2-gqa-bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6), {}),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with real spread (norms near 1, biases non-zero) so every tensor shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise)


def save_tokenizer(path) -> None:
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer().backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, the transformers model saved there)."""
    out = {}
    for i, (name, (config_class, extra, save_kwargs)) in enumerate(CASES.items()):
        path = tmp_path_factory.mktemp(name)
        config = getattr(transformers, config_class)(**COMMON, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config)
        randomize(model, seed=i)
        model.save_pretrained(path, **save_kwargs)
        save_tokenizer(path)
        out[name] = (path, model.float().eval())
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 259, (2, 33), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, ids, name):
    path, hf_model = checkpoints[name]
    model, _ = load_model(path, progress=False)
    hf_config = hf_model.config
    assert model.config.n_kv_heads == hf_config.num_key_value_heads
    assert model.config.tie_embeddings == hf_config.tie_word_embeddings
    assert model.config.qkv_bias == name.startswith("qwen2")
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_logits_match_with_other_attention(checkpoints, ids, attention):
    path, hf_model = checkpoints["qwen2-gqa-bias"]
    model, _ = load_model(path, attention=attention, progress=False)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_really_is_sharded(checkpoints):
    path, _ = checkpoints["llama-gqa-sharded"]
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 3


def test_mistral_sliding_window_caps_context(checkpoints):
    path, _ = checkpoints["mistral-mqa"]
    model, _ = load_model(path, progress=False)
    assert model.config.max_seq_len == 64


def test_mha_variant_of_gqa_checkpoint_matches_transformers(checkpoints, ids):
    path, hf_model = checkpoints["llama-gqa-sharded"]
    model, _ = load_model(path, variant="mha", progress=False)
    assert model.config.n_kv_heads == 4
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_load_casts_every_tensor(checkpoints, ids):
    path, hf_model = checkpoints["qwen2-gqa-bias"]
    model, _ = load_model(path, dtype="bfloat16", progress=False)
    assert model.dtype == torch.bfloat16
    hf_state = hf_model.state_dict()
    attn, hf_attn = model.layers[1].attention, hf_model.model.layers[1].self_attn
    k_bias = attn.wkv.bias.split([2 * attn.head_dim, 2 * attn.head_dim])[0]
    for ours, ref in [(model.tok_embeddings.weight, hf_state["model.embed_tokens.weight"]),
                      (k_bias, hf_attn.k_proj.bias), (attn.wo.small.weight, hf_attn.o_proj.weight),
                      (model.output.small.weight, hf_state["lm_head.weight"])]:
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref.to(torch.bfloat16))
    with torch.inference_mode():
        assert torch.isfinite(model(ids)).all()


TEXTS = ["hello world", "héllo 世界 😀", "<|im_start|>user\nhi<|im_end|>", "  \t\n x"]
MESSAGES = [[{"role": "user", "content": "hi"}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more?"}]]


def test_tokenizer_matches_transformers(checkpoints):
    path, _ = checkpoints["llama-mha-tied"]
    _, tokenizer = load_model(path, progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token_id == ref.eos_token_id == 2 and tokenizer.bos_token_id == ref.bos_token_id == 1
    for text in TEXTS:
        assert tokenizer.encode(text) == ref.encode(text)
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == ref.decode(
            ref.encode(text), skip_special_tokens=True)
    for messages in MESSAGES:
        for gen in (True, False):
            assert tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False)


# A template in the style real checkpoints ship: namespace, loop controls, tojson, the special
# token variables, raise_exception, whitespace control under trim_blocks/lstrip_blocks.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='') %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}
    {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role: ' + m['role']) }}{% endif %}
    {%- if loop.first and ns.system %}[SYS]{{ ns.system }}[/SYS]
{% endif %}
    <{{ m['role'] }}>{{ m['content'] | trim }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}

    {% if m.meta is defined %}{{ m.meta | tojson }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def write_v4_style_tokenizer(path, template) -> None:
    """tokenizer_config.json as transformers 4.x wrote it: AddedToken dicts, flags, inline template."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    byte_tokenizer().backend.save(str(path / "tokenizer.json"))
    added = {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False, "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": added, "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}],
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3 + ord("!")]}))


def test_v4_style_tokenizer_config_and_rich_template(checkpoints, tmp_path):
    src, _ = checkpoints["llama-mha-tied"]
    path = tmp_path / "ckpt"
    write_v4_style_tokenizer(path, RICH_TEMPLATE)
    for file in src.glob("*.safetensors"):
        shutil.copy(file, path)
    shutil.copy(src / "config.json", path)
    _, tokenizer = load_model(path, progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.encode("hi") == ref.encode("hi") == [3 + ord("h"), 3 + ord("i")]
    assert tokenizer.bos_token_id == ref.bos_token_id == 1
    assert tokenizer.eos_token_ids == {0, 2, 3 + ord("!")}
    messages = [{"role": "system", "content": "S <&>"}, {"role": "user", "content": "  q1 ", "meta": {"k": "<é>"}},
                {"role": "assistant", "content": "a1", "tool_calls": None}, {"role": "user", "content": "q2"}]
    for gen in (True, False):
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
            messages, add_generation_prompt=gen, tokenize=False)
    with pytest.raises(ChatTemplateError, match="chat template failed to render: bad role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m.content }", "invalid chat template"),
    ("{{ ''.__class__.__mro__ }}", "failed to render: access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ messages.pop() }}", "failed to render: access to attribute 'pop' of 'list' object is unsafe"),
    ("{{ 1 / 0 }}", "failed to render: ZeroDivisionError"),
    ("{{ raise_exception('no system role') }}", "chat template failed to render: no system role"),
])
def test_chat_template_errors(template, match):
    with pytest.raises(ChatTemplateError, match=match) as info:
        render_chat_template(template, [{"role": "user", "content": "x"}])
    assert "\n" not in str(info.value)
    with pytest.raises(ChatTemplateError, match="empty list of messages"):
        render_chat_template(CHATML_TEMPLATE, [])


def break_checkpoint(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(checkpoints, tmp_path):
    src, _ = checkpoints["qwen2-gqa-bias"]
    break_checkpoint(src, tmp_path / "c", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.bias' in .* \(expected shape \(32,\)\)"):
        load_model(tmp_path / "c", progress=False)


def test_wrong_tensor_shape(checkpoints, tmp_path):
    src, _ = checkpoints["qwen2-gqa-bias"]

    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:95].contiguous()
    break_checkpoint(src, tmp_path / "c", shrink)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.up_proj.weight' .* has shape \(95, 64\), expected \(96, 64\)"):
        load_model(tmp_path / "c", progress=False)


def edit_config(src, dst, **changes) -> None:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(architectures=["GPT2LMHeadModel"]), r"unsupported architecture 'GPT2LMHeadModel' .* supported: "
                                              r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "unsupported rope type 'llama3'"),
    (dict(attention_bias=True), "unsupported attention_bias"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "n_kv_heads=3 must divide n_heads=4"),
])
def test_unsupported_configs(checkpoints, tmp_path, changes, match):
    src, _ = checkpoints["llama-mha-tied"]
    edit_config(src, tmp_path / "c", **changes)
    with pytest.raises(ValueError, match=match) as info:
        load_model(tmp_path / "c", progress=False)
    assert "\n" not in str(info.value)


def test_missing_files(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"unknown model '.*nowhere': use one of smollm2-135m, tiny"):
        load_model(tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_model(tmp_path / "empty", progress=False)
    src, _ = checkpoints["mistral-mqa"]
    shutil.copytree(src, tmp_path / "no-tok")
    (tmp_path / "no-tok" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_model(tmp_path / "no-tok", progress=False)
    shutil.copytree(src, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files"):
        load_model(tmp_path / "no-weights", progress=False)


def test_bad_variant_and_dtype(checkpoints):
    path, _ = checkpoints["llama-gqa-sharded"]
    with pytest.raises(ValueError, match=r"invalid variant 'gqa-3'.*valid N: 1, 2, 4"):
        load_model(path, variant="gqa-3", progress=False)
    with pytest.raises(ValueError, match=r"invalid dtype 'int8': use one of float32, bfloat16, float16"):
        load_model(path, dtype="int8", progress=False)
    with pytest.raises(ValueError, match=r"unknown attention 'fast'"):
        load_model(path, attention="fast", progress=False)
