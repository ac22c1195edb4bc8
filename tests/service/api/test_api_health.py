"""/health and model routing with a uvicorn server running in this process (so a test can stop one
engine under it): /health is 503 as soon as any engine loop is dead, requests to that variant get
503, the other variants keep serving."""
from __future__ import annotations

import httpx
import pytest

from service.api import ServerState
from service.engine.config import EngineConfig
from service.server import ServeOptions


@pytest.fixture
def live(serve_in_process):
    return serve_in_process(ServeOptions(model="tiny", variants=("native", "mqa"), dtype="float32",
                                         engine=EngineConfig(kv_cache_memory=1 << 20)))


def test_route_names():
    # route() reads only the model name and the order of the engines
    s = ServerState(model_name="m", engines={"gqa-2": None, "mqa": None}, tokenizer=None, metrics=None)
    assert [s.route(x) for x in (None, "m", "m:gqa-2", "m:mqa")] == ["gqa-2", "gqa-2", "gqa-2", "mqa"]
    for bad in ("mqa", "m:", "m:mha", "other:mqa", "M", ""):
        with pytest.raises(LookupError, match="m:gqa-2, m:mqa"):
            s.route(bad)


def test_one_dead_engine_makes_health_503_and_only_its_variant_unavailable(live):
    state, url = live
    assert httpx.get(url + "/health").json() == {"status": "ok", "variants": ["native", "mqa"]}
    state.engines["mqa"].shutdown(timeout=30)
    r = httpx.get(url + "/health")
    assert r.status_code == 503 and r.json() == {"status": "unhealthy", "dead_variants": ["mqa"]}
    dead = httpx.post(url + "/v1/completions", json={"model": "tiny:mqa", "prompt": "x", "max_tokens": 2})
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_unavailable"
    assert dead.headers["retry-after"] == "1"
    alive = httpx.post(url + "/v1/completions", json={"model": "tiny:native", "prompt": "x", "max_tokens": 2})
    assert alive.status_code == 200
    metrics = httpx.get(url + "/metrics").text
    assert 'kvserve_engine_alive{model_name="tiny",variant="mqa"} 0.0' in metrics
    assert 'kvserve_engine_alive{model_name="tiny",variant="native"} 1.0' in metrics
