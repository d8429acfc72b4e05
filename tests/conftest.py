"""Fixtures: real tiled everywhere, the environment isolated for every test."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import chx_masks
from chx_masks import MaskRegistry

EIGER4M = "eiger4m_single_image"
EIGER500K = "eiger500K_single_image"
SHAPE_4M = (2167, 2070)
SHAPE_500K = (514, 1030)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path, monkeypatch):
    """No user profile, server or data directory leaks into a test, or out of it."""
    for name in ("CHX_MASKS_URI", "CHX_MASKS_API_KEY", "CHX_MASKS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHX_MASKS_DIR", str(tmp_path / "default-registry"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    chx_masks.set_default_registry(None)
    yield
    chx_masks.set_default_registry(None)


#: Figures a test module reports at the end of the run: {section title: {name: value}}.
SUMMARY: dict[str, dict[str, Any]] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    """Print SUMMARY after the tests (pytest no longer captures output then)."""
    for title, figures in SUMMARY.items():
        terminalreporter.write_sep("-", title)
        for name, value in figures.items():
            terminalreporter.write_line(f"  {name}: {value}")


@pytest.fixture
def embedded_dir(tmp_path) -> Path:
    """A directory for a fresh, empty embedded registry."""
    return tmp_path / "registry"


@pytest.fixture(scope="session")
def tiled_server(tmp_path_factory):
    """A real tiled server on loopback, shared by the session's tests."""
    from tiled.server import SimpleTiledServer

    server = SimpleTiledServer(tmp_path_factory.mktemp("server"))
    yield server
    server.close()


class ServerProcess:
    """A tiled server in its own process on loopback, which a test may stop.

    tiled keeps one server's settings (its API key) per process, so a second
    server in the test process would replace the session server's key.
    """

    def __init__(self, directory: Path) -> None:
        import secrets
        import subprocess
        import sys

        self.api_key = secrets.token_hex(16)
        code = (
            "import sys, time\n"
            "from tiled.server import SimpleTiledServer\n"
            "server = SimpleTiledServer(sys.argv[1], api_key=sys.argv[2])\n"
            "print(server.port, flush=True)\n"
            "time.sleep(3600)\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(directory), self.api_key],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"tiled server process did not start: {line!r}")
        self.port = int(line)
        self.uri = f"http://127.0.0.1:{self.port}/api/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process.stdout.close()


@pytest.fixture(scope="session")
def postgres():
    """Fresh PostgreSQL databases for this session; skip if there is no server."""
    import servers

    try:
        pg = servers.Postgres.connect()
    except servers.Unavailable as err:
        pytest.skip(str(err))
    yield pg
    pg.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request) -> str:
    """The catalog of a real server under test: SQLite, or PostgreSQL where it answers."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres")  # skips here when unreachable
    return request.param


def server_node_uri(server, key: str) -> str:
    """URI of the container ``key`` on ``server`` (without the api key)."""
    return f"http://127.0.0.1:{server.port}/api/v1/metadata/{key}"


@pytest.fixture
def server_registry_uri(tiled_server) -> str:
    """A fresh, empty container on the loopback server for one test."""
    from tiled.client import from_uri

    key = f"test-{uuid.uuid4().hex[:12]}"
    root = from_uri(tiled_server.uri)
    root.create_container(key=key)
    root.context.close()
    return server_node_uri(tiled_server, key)


@pytest.fixture(params=["embedded", "server"])
def registry(request, embedded_dir):
    """The registry under test: embedded (in-process) or over HTTP on loopback."""
    if request.param == "embedded":
        reg = MaskRegistry.embedded(embedded_dir)
    else:
        server = request.getfixturevalue("tiled_server")
        uri = request.getfixturevalue("server_registry_uri")
        reg = MaskRegistry.from_uri(uri, api_key=server.api_key)
    yield reg
    reg.close()


def ones(shape=SHAPE_500K) -> np.ndarray:
    return np.ones(shape, dtype=bool)


def random_mask(shape=SHAPE_500K, fraction=0.05, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(shape) >= fraction


@pytest.fixture
def RE():
    """A real RunEngine, its event loop stopped and closed afterwards."""
    from bluesky import RunEngine

    engine = RunEngine({})
    yield engine
    if engine.state != "idle":
        engine.halt()
    # The RunEngine runs its loop forever on a daemon thread; stop and close
    # it so no "unclosed event loop" ResourceWarning surfaces in a later test.
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()


class Collector:
    """A downstream that keeps what it gets and checks every document's schema."""

    def __init__(self):
        self.docs: list[tuple[str, dict]] = []

    def __call__(self, name, doc):
        from event_model import DocumentNames, schema_validators

        schema_validators[DocumentNames(name)].validate(doc)
        self.docs.append((name, doc))

    def names(self):
        return [name for name, _ in self.docs]

    def start(self):
        return next(doc for name, doc in self.docs if name == "start")

    def stop(self):
        return next(doc for name, doc in self.docs if name == "stop")

    def frames(self, key):
        return [
            np.asarray(frame)
            for name, doc in self.docs
            if name == "event_page" and key in doc["data"]
            for frame in doc["data"][key]
        ]


def dense(node) -> np.ndarray:
    """A product node's frames as a dense array, whichever way it is stored."""
    data = node.read()
    return data.todense() if hasattr(data, "todense") else np.asarray(data)
