"""The baseline a user would otherwise write: transformers' `generate` behind FastAPI, one at a time.

    python -m benchmarks.naive_server --port 8001 [--dtype float32]

Serves SmolLM2-135M-Instruct (the same GGUF kvserve serves) on an OpenAI-shaped streaming
`/v1/completions` and `/v1/models`, so `kvserve bench serve` measures it exactly like kvserve.
A lock runs one `generate` at a time (no batching, no KV cache sharing), streaming tokens with
`TextIteratorStreamer`; concurrent clients queue. This exists only to be measured against.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from model.loader import smollm2_gguf_path

MODEL_NAME = "smollm2-135m"


def create_app(dtype: torch.dtype) -> FastAPI:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "naive"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        max_tokens = int(body.get("max_tokens", 16))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        min_tokens = max_tokens if body.get("ignore_eos") else 0

        generated = []

        def work():
            with lock, torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     min_new_tokens=min_tokens, do_sample=False, streamer=streamer)
                generated.append(out.shape[1] - ids.shape[1])

        worker = threading.Thread(target=work, daemon=True)
        worker.start()

        async def events():
            created = int(time.time())
            iterator = iter(streamer)
            while True:
                text = await asyncio.to_thread(next, iterator, None)
                if text is None:
                    break
                if text:
                    chunk = {"object": "text_completion", "created": created, "model": MODEL_NAME,
                             "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.to_thread(worker.join)
            n = generated[0] if generated else 0
            usage = {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}
            yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    uvicorn.run(create_app(getattr(torch, args.dtype)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
