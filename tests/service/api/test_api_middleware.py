"""The request-context middleware in process (Starlette's TestClient, no engine running): a handler
that raises still answers with the request id, is counted as a 500 under its route template and
gets an access line."""
from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.engine.config import EngineConfig
from service.server import ServeOptions, build_state
from tests.service.live_server import only_match


@pytest.fixture(scope="module")
def app_and_state():
    state = build_state(ServeOptions(model="tiny", dtype="float32", engine=EngineConfig(kv_cache_memory=1 << 20)))
    app = create_app(state)

    async def boom(item: int):
        raise RuntimeError(f"item {item} broke")

    app.add_api_route("/boom/{item}", boom)  # a handler with a bug, on a templated route
    return app, state


def test_an_exception_is_a_500_with_the_request_id_counted_and_logged(app_and_state, caplog):
    app, state = app_and_state
    with caplog.at_level(logging.INFO, logger="kvserve.access"), TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom/7", headers={"X-Request-Id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"]["message"] == "internal server error: RuntimeError"
    (line,) = [rec for rec in caplog.records if rec.name == "kvserve.access"]
    assert (line.status, line.route, line.path, line.request_id) == (500, "/boom/{item}", "/boom/7", "bug-1")
    scrape = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(state.metrics.render().decode()) for s in f.samples}
    assert only_match(scrape, "kvserve_http_requests_total", route="/boom/{item}", status="500") == 1
