"""Prompt logprobs on the real SmolLM2-135M behind the live server: `echo` + `logprobs` equal
transformers' log-softmax on the same checkpoint, and lm-evaluation-harness's `local-completions`
scoring a small multiple-choice task of this repository (tests/service/lm_eval_task, no download)
gets the same per-choice loglikelihoods and accuracy as scoring the same items with transformers."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from service.cli import main
from tests.service.live_server import REPO, LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TASK_DIR = Path(__file__).resolve().parents[1] / "lm_eval_task"


@pytest.fixture(scope="module")
def server(smollm2_gguf_path):
    # dense float32 weights (the GGUF dequantized), as transformers runs them
    with LiveServer("--model", str(smollm2_gguf_path), "--served-model-name", "smollm2", "--quantization", "none",
                    "--kv-cache-memory", "64MiB", "--max-model-len", "1024") as live:
        yield live


@torch.inference_mode()
def hf_log_softmax(hf_model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_logprobs_equal_transformers(server, hf_smollm2):
    hf_model, hf_tok = hf_smollm2
    text = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
    ids = hf_tok(text, add_special_tokens=False).input_ids
    lp = hf_log_softmax(hf_model, ids)
    body = {"model": "smollm2", "prompt": ids, "max_tokens": 0, "logprobs": 1, "echo": True}
    got = httpx.post(server.url("/v1/completions"), json=body, timeout=300).json()["choices"][0]["logprobs"]
    want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert got["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(want, abs=2e-3)


def hf_scores(hf_model, hf_tok, docs: list[dict]) -> list[list[float]]:
    """Per doc, each choice's loglikelihood as lm-eval defines it: encode context + continuation, the
    continuation's tokens are what follows the context's own encoding; sum their logprobs."""
    scores = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = hf_tok(context, add_special_tokens=False).input_ids
        row = []
        for choice in doc["choices"]:
            whole = hf_tok(context + " " + choice, add_special_tokens=False).input_ids
            lp = hf_log_softmax(hf_model, whole)
            row.append(sum(lp[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole))))
        scores.append(row)
    return scores


def test_lm_eval_local_completions_matches_transformers(server, hf_smollm2, smollm2_gguf_path, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    hf_model, hf_tok = hf_smollm2
    server_model = smollm2_gguf_path
    tokenizer_dir = tmp_path / "tokenizer"  # the served model's tokenizer, as the README tells users to write it
    assert main(["tokenizer", "--model", str(server_model), "--output", str(tokenizer_dir)]) == 0
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "smollm2", "base_url": server.url("/v1/completions"), "tokenizer_backend": "huggingface",
                    "tokenizer": str(tokenizer_dir), "num_concurrent": 1, "max_retries": 1},
        tasks=["kvserve_mc"], task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=True)
    docs = [json.loads(line) for line in (TASK_DIR / "kvserve_mc.jsonl").read_text().splitlines()]
    want = hf_scores(hf_model, hf_tok, docs)
    for sample in results["samples"]["kvserve_mc"]:
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(want[sample["doc_id"]], abs=5e-3)
    accuracy = sum(max(range(len(row)), key=row.__getitem__) == doc["answer"] for row, doc in zip(want, docs)) / len(docs)
    assert results["results"]["kvserve_mc"]["acc,none"] == pytest.approx(accuracy)
