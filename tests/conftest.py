"""Fixtures: real tiled everywhere, the environment isolated for every test."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from helpers import SUMMARY, server_node_uri

import chx_masks
from chx_masks import MaskRegistry


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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first: run on several workers (``-n``), they start at once
    and the quick ones fill in around them, instead of making the tail of the run."""
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session) -> None:
    """On an xdist worker: hand SUMMARY to the controller, which prints it."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["chx_masks_summary"] = json.dumps(SUMMARY, default=str)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """On the xdist controller: gather a finished worker's SUMMARY."""
    got = getattr(node, "workeroutput", {}).get("chx_masks_summary")
    for title, figures in json.loads(got or "{}").items():
        SUMMARY.setdefault(title, {}).update(figures)


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
