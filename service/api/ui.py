"""The built-in web page and the JSON it reads.

`GET /` serves one self-contained HTML file (service/api/static/index.html: inline CSS and
JavaScript, no build step, no external assets, so it works offline): a chat playground that streams
from `/v1/chat/completions` and a live panel per variant. `GET /stats` is that panel's data, the
numbers /metrics exports in a shape JavaScript reads directly: each variant's KV footprint (bytes
per token and per block, capacity, blocks used / cached / free), running / waiting, preemptions and
running token totals (the page turns their differences into tokens/s), and the TTFT and ITL
histograms' cumulative buckets (the page's charts draw p50 / p99 over time from them).
`GET /favicon.ico` is the tab icon (an SVG). Like /health and /metrics,
both are open without the API key; the page asks for the key when the server wants one and sends it
on its API calls.

The page is served with a strict Content-Security-Policy: nothing but its own inline script and
style (allowed by their SHA-256, so an injected one never runs), fetches to this server only, no
frames, forms, plugins or base URL; and `X-Frame-Options: DENY` for browsers that predate
`frame-ancestors`.
"""
from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

if TYPE_CHECKING:
    from service.api.state import ServerState


# The tab icon: three stacked KV blocks (browsers ask for /favicon.ico whatever its type)
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
               '<rect x="1" y="1" width="14" height="4" rx="1" fill="#e0674b"/>'
               '<rect x="1" y="6" width="14" height="4" rx="1" fill="#e9b949"/>'
               '<rect x="1" y="11" width="14" height="4" rx="1" fill="#2f6fde"/></svg>')


@cache
def page_html() -> str:
    return resources.files("service.api").joinpath("static", "index.html").read_text(encoding="utf-8")


@cache
def page_headers() -> dict[str, str]:
    """The page's security headers; its CSP allows exactly its inline <script> and <style> blocks."""
    html = page_html()

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def stats_body(state: ServerState) -> dict:
    variants = []
    for (variant, engine), model_id in zip(state.engines.items(), state.model_ids()):
        s, cfg = engine.stats(), engine.model.config
        observer = state.metrics.observers[variant]
        variants.append({
            "variant": variant, "model_id": model_id, "alive": bool(s.alive and engine.is_alive),
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "dtype": str(engine.model.dtype).removeprefix("torch."), "max_model_len": engine.max_model_len,
            "running": s.num_running, "waiting": s.num_waiting, "preemptions": s.num_preemptions,
            "prompt_tokens_total": observer.prompt_tokens_total,
            "generation_tokens_total": observer.generation_tokens_total,
            "latency_buckets": state.metrics.latency_buckets(variant),
            "kv": {"bytes_per_token": s.bytes_per_token, "bytes_per_block": s.bytes_per_block,
                   "block_size": s.block_size, "num_blocks": s.kv.num_blocks, "capacity_tokens": s.capacity_tokens,
                   "memory_bytes": s.kv_memory_bytes, "stored_tokens": s.kv.stored_tokens,
                   "blocks_used": s.kv.used_blocks, "blocks_cached": s.kv.cached_blocks,
                   "blocks_free": s.kv.free_blocks - s.kv.cached_blocks, "usage": s.kv.usage_ratio},
        })
    return {"model": state.model_name, "api_key_required": state.api_key is not None, "draining": state.draining,
            "variants": variants}


def add_ui_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/")
    async def page():
        return HTMLResponse(page_html(), headers=page_headers())

    @app.get("/favicon.ico")
    async def favicon():
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/stats")
    async def stats():
        return JSONResponse(stats_body(state), headers={"Cache-Control": "no-store"})
