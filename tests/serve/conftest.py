"""A real server (uvicorn on a free loopback port) on a tiny model with two adapters."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

from elmtune.serve import build_state, create_app
from tests.helpers import train_tiny_adapter


class RunningServer:
    def __init__(self, state):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.state = state
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.engine.close()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    base, first = train_tiny_adapter(tmp_path_factory.mktemp("serve-a"))
    _, second = train_tiny_adapter(tmp_path_factory.mktemp("serve-b"), lr=1e-1, seed=3)
    return base, {"alpha": str(first), "beta": str(second)}


def start(adapters, **kwargs) -> RunningServer:
    base, named = adapters
    return RunningServer(build_state(str(base), named, **kwargs))


@pytest.fixture(scope="session")
def server(adapters):
    running = start(adapters, max_tokens_limit=64, default_max_tokens=16)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def keyed_server(adapters):
    running = start(adapters, api_key="s3cret", max_tokens_limit=64)
    yield running
    running.stop()


@contextmanager
def submitted_prompts(server: RunningServer):
    """The prompt ids of every request the server hands its engine, in order."""
    engine, seen = server.state.engine, []
    submit = engine.submit
    engine.submit = lambda request: (seen.append(request.prompt_ids), submit(request))[-1]
    try:
        yield seen
    finally:
        del engine.submit
