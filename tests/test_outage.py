"""An unreachable registry costs a scan one timeout, then nothing, until it answers again.

The registry's port accepts connections and never answers: the worst case (a
hung server; a closed port at least refuses). A real RunEngine takes a scan of
three runs with ``MaskProvenance(on_unavailable="record")`` and a
``MaskingRouter`` given the same registry factory, as the IPython profile
wires them, and the same scan without them for comparison. Then
``chx-masks serve`` takes over the port; once the background check sees it
answer, the next run is masked again. The figures are printed at the end.

What must hold:

- the three runs together cost at most one timeout more than the plain scan
  (the preprocessor and the router share one wait, and the runs after the
  first do not wait at all);
- every run finishes, records why it has no masks, and its derived run
  withholds the frames and says why; one warning line per run, and no
  "Retrying..." from tiled;
- when the registry answers again, the next run is masked with the masks the
  registry holds.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time

import numpy as np
import pytest
import servers
from bluesky.plans import count
from helpers import EIGER500K, SUMMARY, Collector, random_mask

from bluesky_callbacks import MaskingRouter, MaskProvenance
from bluesky_callbacks._deadline import stop_probes
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskRegistry

pytestmark = [pytest.mark.server, pytest.mark.slow]

TIMEOUT = 2.0  # seconds: the run-start deadline, and the registry's connection bound
MARGIN = 1.0  # seconds the three runs may cost beyond the plain scan and one TIMEOUT
RUNS = 3


@pytest.fixture(autouse=True)
def _no_background_checks_left():
    yield
    stop_probes(timeout=1.0)  # a check stuck on a silent port ends by itself


class SilentPort:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        # The server that replaces it binds the same port while connections
        # to this one linger.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class Factory:
    """Opens the registry at the first attempt that succeeds and keeps it (as the profile)."""

    def __init__(self, uri: str, api_key: str) -> None:
        self.uri, self.api_key, self.location = uri, api_key, uri
        self.registry: MaskRegistry | None = None
        self.attempts = 0
        self._lock = threading.Lock()

    def __call__(self) -> MaskRegistry:
        with self._lock:
            if self.registry is None:
                self.attempts += 1
                self.registry = MaskRegistry.from_uri(
                    self.uri, api_key=self.api_key, timeout=TIMEOUT, disk_cache=False
                )
            return self.registry

    def close(self) -> None:
        if self.registry is not None:
            self.registry.close()


def _timed_runs(RE, det) -> list[float]:
    durations = []
    for _ in range(RUNS):
        began = time.monotonic()
        RE(count([det], num=2))
        durations.append(time.monotonic() - began)
    return durations


def test_outage_costs_a_scan_one_timeout_and_runs_are_masked_once_it_answers(
    RE, tmp_path, caplog, capfd, request
):
    figures = SUMMARY.setdefault("registry that never answers (timeout 2 s)", {})
    key = secrets.token_hex(16)
    registry_dir = tmp_path / "registry"
    mask = random_mask(seed=3)
    with MaskRegistry.embedded(registry_dir) as reg:  # what `chx-masks serve` will serve
        uid = reg.register_mask(EIGER500K, "hot", mask)
        reg.activate(EIGER500K, ["hot"], note="outage test")

    silent = SilentPort()
    request.addfinalizer(silent.close)
    uri = f"http://127.0.0.1:{silent.port}/api/v1"
    factory = Factory(uri, key)
    det = sim_eiger500k()
    raw, derived = Collector(), Collector()
    RE.subscribe(raw)
    RE(count([det], num=1))  # warm up: the first run of a process costs more
    plain = _timed_runs(RE, det)

    provenance = MaskProvenance(
        factory, masks={EIGER500K: ["hot"]}, on_unavailable="record", timeout=TIMEOUT
    )
    router = MaskingRouter(factory, derived, timeout=TIMEOUT)
    assert provenance.breaker is router.breaker  # one factory, one shared state
    RE.preprocessors.append(provenance)
    RE.subscribe(router)
    raw.docs.clear()
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="bluesky_callbacks"):
        down = _timed_runs(RE, det)
    extra = sum(down) - sum(plain)
    figures["plain scan of 3 runs (s)"] = round(sum(plain), 2)
    figures["same scan, registry unreachable (s)"] = round(sum(down), 2)
    figures["cost of the outage (s; one timeout = 2)"] = round(extra, 2)
    figures["each run, registry unreachable (s)"] = [round(d, 2) for d in down]
    assert extra < TIMEOUT + MARGIN, (plain, down)
    assert not provenance.breaker.available

    # Every run finished and says why it has no masks.
    starts = [doc for name, doc in raw.docs if name == "start"]
    assert [doc["exit_status"] for name, doc in raw.docs if name == "stop"] == ["success"] * RUNS
    assert len(starts) == RUNS
    errors = [start["masks"][EIGER500K]["error"] for start in starts]
    assert all(start["mask_uids"] == [] for start in starts)
    assert all("RegistryUnavailableError" in start["mask_error"] for start in starts)
    # The first run waited: its own deadline or the connection's, both TIMEOUT.
    assert "answer within 2 s" in errors[0], errors[0]
    for error in errors[1:]:  # later runs did not wait: they say since when it is down
        assert "has not answered since" in error and "checked again in the background" in error
        assert uri in error
    figures["what a later run records"] = errors[-1][:150]

    # The derived runs withhold every frame and say why.
    stops = [doc for name, doc in derived.docs if name == "stop"]
    assert [stop["exit_status"] for stop in stops] == ["fail"] * RUNS
    assert derived.frames(EIGER500K) == []
    for stop in stops:
        assert f"{EIGER500K} frames withheld" in stop["reason"], stop["reason"]
        assert "RegistryUnavailableError" in stop["reason"]

    # One warning line per run, about the run; tiled printed nothing.
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("bluesky_callbacks") and record.levelno >= logging.WARNING
    ]
    assert len(lines) == RUNS, lines
    assert all(
        line.startswith(f"A run opens without masks for {EIGER500K}: RegistryUnavailableError: ")
        for line in lines
    ), lines
    assert "Retrying" not in "".join(capfd.readouterr())

    # The registry comes back on the same port.
    silent.close()
    server = servers.ServeProcess(
        ["--dir", str(registry_dir)],
        directory=tmp_path,
        env=servers.clean_environment(TILED_SINGLE_USER_API_KEY=key),
        port=silent.port,
    )
    try:
        assert server.uri == uri
        began = time.monotonic()
        assert provenance.breaker.wait_available(60), provenance.breaker
        figures["the background check saw it answer after (s)"] = round(time.monotonic() - began, 1)
        raw.docs.clear()
        derived.docs.clear()
        (run_uid,) = RE(count([det], num=2))
        start = raw.start()
        assert start["masks"][EIGER500K]["uids"] == [uid] and "mask_error" not in start
        assert start["masks"][EIGER500K]["chosen_by"] == "active set v0"
        frames = derived.frames(EIGER500K)
        assert len(frames) == 2
        for i, frame in enumerate(frames):
            np.testing.assert_array_equal(frame, det.expected_frame(i) * mask.astype(frame.dtype))
        assert derived.stop()["exit_status"] == "success"
        assert derived.start()["parent_uid"] == run_uid
    finally:
        factory.close()
        server.stop()


def test_every_registry_call_on_a_frozen_server_fails_in_the_error_tree(tmp_path):
    """A server stopped mid-session (SIGSTOP): each public call gives up with a ChxMasksError.

    Within the registry's timeout, not tiled's own retry
    budget ($TILED_RETRY_TIMEOUT, 45 s). Only a uid this process has already
    read still answers, from memory: its bytes cannot change.
    """
    import os
    import signal

    from helpers import ServerProcess

    from chx_masks import ChxMasksError, RegistryUnavailableError

    server = ServerProcess(tmp_path / "server")
    try:
        from tiled.client import from_uri

        root = from_uri(server.uri, api_key=server.api_key)
        root.create_container(key="reg")
        root.context.close()
        reg = MaskRegistry.from_uri(
            f"{server.uri}/metadata/reg", api_key=server.api_key, timeout=TIMEOUT, disk_cache=False
        )
        mask = random_mask(seed=1)
        uid = reg.register_mask(EIGER500K, "a", mask)
        reg.activate(EIGER500K, ["a"])
        # A uid this process has not read yet (another client registered it).
        with MaskRegistry.from_uri(
            f"{server.uri}/metadata/reg", api_key=server.api_key, timeout=TIMEOUT, disk_cache=False
        ) as other:
            unseen = other.register_mask(EIGER500K, "c", random_mask(seed=2))
        os.kill(server.process.pid, signal.SIGSTOP)
        # A uid already read is immutable and verified: it is served from memory.
        assert np.array_equal(reg.get_mask_by_uid(uid).compute(), mask)
        ones = np.ones((514, 1030), bool)
        calls = {
            "get_mask": lambda: reg.get_mask(EIGER500K, "a"),
            "get_mask_uid": lambda: reg.get_mask_uid(EIGER500K, "a"),
            "get_mask_by_uid": lambda: reg.get_mask_by_uid(unseen).compute(),
            "describe": lambda: reg.describe(uid),
            "history": lambda: reg.history(EIGER500K, "a"),
            "search": lambda: reg.search(detector=EIGER500K),
            "get_masks": lambda: reg.get_masks(),
            "register_mask": lambda: reg.register_mask(EIGER500K, "b", ones),
            "update_mask": lambda: reg.update_mask(EIGER500K, "a", ones),
            "delete_mask": lambda: reg.delete_mask(EIGER500K, "a"),
            "activate": lambda: reg.activate(EIGER500K, ["a"]),
            "active_set": lambda: reg.active_set(EIGER500K),
            "resolve_composite": lambda: reg.resolve_composite(EIGER500K, ["a"]),
            "composite_from_uids": lambda: reg.composite_from_uids([uid]),
            "detectors": lambda: reg.detectors(),
            "register_detector": lambda: reg.register_detector("pilatus_x_image", (5, 6)),
            "from_uri": lambda: MaskRegistry.from_uri(
                f"{server.uri}/metadata/reg", api_key=server.api_key, timeout=TIMEOUT
            ),
        }
        wrong, slowest = [], 0.0
        for name, call in calls.items():
            began = time.monotonic()
            try:
                call()
            except ChxMasksError as err:
                if not isinstance(err, RegistryUnavailableError):
                    wrong.append(f"{name}: {type(err).__name__}: {err}")
            except Exception as err:  # noqa: BLE001 - the table reports what escaped
                wrong.append(f"{name}: outside the tree: {type(err).__name__}: {err}")
            else:
                wrong.append(f"{name}: returned")
            slowest = max(slowest, time.monotonic() - began)
        reg.close()
        assert not wrong, "\n".join(wrong)
        # The registry's timeout bounds the whole call (plus the time to raise).
        assert slowest < TIMEOUT + 1.0, slowest
        SUMMARY.setdefault("frozen server (SIGSTOP), every public call", {}).update(
            {"calls": len(calls), "slowest s": round(slowest, 2), "timeout s": TIMEOUT}
        )
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
