"""What tests share besides fixtures: detector names and shapes, masks, a document collector.

Tests import these from here (``from helpers import ...``), never from ``conftest``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

EIGER4M = "eiger4m_single_image"

EIGER500K = "eiger500K_single_image"

SHAPE_4M = (2167, 2070)

SHAPE_500K = (514, 1030)

#: Figures a test module reports at the end of the run: {section title: {name: value}}.
SUMMARY: dict[str, dict[str, Any]] = {}


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


def server_node_uri(server, key: str) -> str:
    """URI of the container ``key`` on ``server`` (without the api key)."""
    return f"http://127.0.0.1:{server.port}/api/v1/metadata/{key}"


def ones(shape=SHAPE_500K) -> np.ndarray:
    return np.ones(shape, dtype=bool)


def random_mask(shape=SHAPE_500K, fraction=0.05, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(shape) >= fraction


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
