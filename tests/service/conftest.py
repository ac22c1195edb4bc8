"""Fixtures of the service tests: live tiny-model servers and the tiny model's reference."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from service.api import ServerState
from service.server import ServeOptions, build_state
from tests.service.live_server import API_KEY, SHARED_MAX_MODEL_LEN, InProcessServer, LiveServer, TinyReference


@pytest.fixture(scope="session")
def tiny_ref(tiny) -> TinyReference:
    return TinyReference(*tiny)


@pytest.fixture(scope="session")
def shared_server() -> Iterator[LiveServer]:
    """One tiny server (API key on, max_model_len 160) shared by the OpenAI, native and error tests."""
    with LiveServer("--api-key", API_KEY, "--kv-cache-memory", "2MiB",
                    "--max-model-len", str(SHARED_MAX_MODEL_LEN)) as server:
        yield server


@pytest.fixture
def start_server() -> Iterator[Callable[..., LiveServer]]:
    """`start_server(*args, env=None)`: a started LiveServer of its own, stopped when the test ends."""
    servers: list[LiveServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> LiveServer:
        servers.append(LiveServer(*args, env=env).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def serve_in_process() -> Iterator[Callable[[ServeOptions], tuple[ServerState, str]]]:
    """`serve_in_process(opts)`: engines and uvicorn in this process (so a test can reach into them),
    returning (state, base URL); stopped when the test ends."""
    servers: list[InProcessServer] = []

    def start(opts: ServeOptions) -> tuple[ServerState, str]:
        servers.append(InProcessServer(build_state(opts)).start())
        return servers[-1].state, servers[-1].base_url

    yield start
    for server in servers:
        server.stop()
