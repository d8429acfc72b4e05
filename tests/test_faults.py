"""The registry's server goes away in the middle of a scan, and comes back.

One `chx-masks serve --dir DIR` process on loopback holds the registry (its
catalog in SQLite, and again in PostgreSQL where a server answers); the
RunEngine runs in this process with `MaskProvenance` (policy "record") and a
`MaskingRouter`, the way the IPython profile sets them up. The server is
killed (SIGKILL: no clean shutdown) while a scan is taking frames, a second
scan runs while it is down, and a third after it has been started again on
the same directory and port. The figures are printed at the end.

What must hold:

- the RunEngine finishes every scan; every raw document reaches the other
  subscribers;
- the scan under way keeps being masked with the masks its start recorded
  (they were resolved when the run opened; the registry is not needed again);
- the scan opened while the server is down records why in its start
  document, is delayed by one timeout at most (the preprocessor and the
  router share it), and its derived run withholds the frames and says why
  (exit status "fail");
- after the restart, once the background check sees the server answer, the
  next scan records the same uids and is masked again; nothing registered
  before the crash is lost or changed.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pytest
import servers
from bluesky.plans import count
from helpers import SUMMARY, Collector

from bluesky_callbacks import MaskingRouter, MaskProvenance
from bluesky_callbacks._deadline import stop_probes
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskRegistry, mask_sha256

pytestmark = [pytest.mark.server, pytest.mark.slow]

DET = "eiger500K_single_image"
FRAMES = 8
KILL_AFTER = 3  # frames taken before the server is killed
TIMEOUT = 5.0  # seconds: the preprocessor's and router's registry deadline


@pytest.fixture(autouse=True)
def _no_background_checks_left():
    yield
    stop_probes(timeout=1.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lifeline:
    """Start, kill and restart one `chx-masks serve --dir DIR` on a fixed port."""

    def __init__(self, tmp_path, catalog: str | None) -> None:
        self.directory = tmp_path
        self.port = _free_port()
        self.key = secrets.token_hex(16)
        self.env = servers.clean_environment(TILED_SINGLE_USER_API_KEY=self.key)
        self.args = ["--dir", str(self.directory / "registry")]
        self.backend = "sqlite" if catalog is None else "postgresql"
        if catalog is not None:
            self.args += ["--catalog", catalog]
        self.server: servers.ServeProcess | None = None
        self.start()

    def start(self) -> None:
        self.server = servers.ServeProcess(
            self.args, directory=self.directory, env=self.env, port=self.port
        )

    def kill(self) -> None:
        assert self.server is not None
        self.server.stop(signal.SIGKILL)

    @property
    def uri(self) -> str:
        assert self.server is not None
        return self.server.uri


@pytest.fixture
def lifeline(backend, request, tmp_path, monkeypatch):
    """The server on this backend's catalog (PostgreSQL: a fresh database)."""
    monkeypatch.setenv("CHX_MASKS_CACHE_DIR", str(tmp_path / "mask-cache"))
    catalog = None
    if backend == "postgresql":
        catalog = request.getfixturevalue("postgres").create("faults_catalog")
    line = Lifeline(tmp_path, catalog)
    yield line
    if line.server is not None:
        line.server.stop()


def _masks() -> dict[str, np.ndarray]:
    gaps = np.ones(servers.SHAPE, bool)
    gaps[250:260, :] = False
    hot = np.random.default_rng(7).random(servers.SHAPE) >= 0.001
    return {"gaps": gaps, "hot": hot}


def _state(registry: MaskRegistry) -> dict[str, Any]:
    """What must survive the crash: every lineage, uid and the bytes behind it."""
    uids = {name: [r.uid for r in registry.history(DET, name)] for name in _masks()}
    return {
        "listing": registry.get_masks(include_retired=True),
        "uids": uids,
        "sha256": {
            uid: mask_sha256(registry.get_mask_by_uid(uid).compute())
            for lineage in uids.values()
            for uid in lineage
        },
        "active": registry.active_set(DET).names,
    }


def _expected(det, mask: np.ndarray, seq_nums: list[int]) -> list[np.ndarray]:
    return [det.expected_frame(i - 1) * mask.astype(det.expected_frame(0).dtype) for i in seq_nums]


def test_server_killed_mid_scan_then_back(RE, lifeline):
    figures = SUMMARY.setdefault(f"registry server lost mid-scan ({lifeline.backend} catalog)", {})
    registry = MaskRegistry.from_uri(lifeline.uri, api_key=lifeline.key, timeout=TIMEOUT)
    for name, mask in _masks().items():
        registry.register_mask(DET, name, mask)
    registry.activate(DET, list(_masks()), note="before the crash")
    before = _state(registry)
    registry.close()

    # A fresh client, as a beamline session has: it knows nothing yet.
    registry = MaskRegistry.from_uri(
        lifeline.uri, api_key=lifeline.key, timeout=TIMEOUT, disk_cache=False
    )
    provenance = MaskProvenance(registry, on_unavailable="record", timeout=TIMEOUT)
    RE.preprocessors.append(provenance)
    raw, derived = Collector(), Collector()
    RE.subscribe(raw)

    kills: list[str] = []

    def kill_mid_scan(name: str, doc: dict) -> None:  # once, in the first scan
        if name == "event" and doc["seq_num"] == KILL_AFTER and not kills:
            kills.append(doc["descriptor"])
            lifeline.kill()

    RE.subscribe(kill_mid_scan)
    RE.subscribe(MaskingRouter(registry, derived, timeout=TIMEOUT))
    det = sim_eiger500k()

    # 1. Killed while the scan takes frames.
    (uid1,) = RE(count([det], num=FRAMES))
    assert kills and lifeline.server.returncode == -signal.SIGKILL
    start1, stop1 = raw.start(), raw.stop()
    assert start1["uid"] == uid1 and stop1["exit_status"] == "success"
    assert raw.names().count("event") == FRAMES
    record = start1["masks"][DET]
    assert record["uids"] == [before["uids"]["gaps"][0], before["uids"]["hot"][0]]
    composite = _masks()["gaps"] & _masks()["hot"]
    frames1 = derived.frames(DET)
    assert len(frames1) == FRAMES
    for got, want in zip(
        frames1, _expected(det, composite, list(range(1, FRAMES + 1))), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert derived.stop()["exit_status"] == "success"
    figures["frames taken / masked in the scan that lost the server"] = (
        f"{raw.names().count('event')} / {len(frames1)} (killed after frame {KILL_AFTER})"
    )

    # 2. A scan opened while the server is down.
    raw.docs.clear()
    derived.docs.clear()
    began = time.monotonic()
    (uid2,) = RE(count([det], num=2))
    down_seconds = time.monotonic() - began
    start2 = raw.start()
    assert start2["uid"] == uid2 and raw.stop()["exit_status"] == "success"
    assert raw.names().count("event") == 2
    # Its detectors' active sets could not be read: the start says so.
    assert start2["masks"] == {} and start2["mask_uids"] == []
    assert "RegistryUnavailableError" in start2["mask_error"], start2["mask_error"]
    assert derived.frames(DET) == []  # never an unmasked frame passed on as masked
    assert derived.start()["mask_error"] == start2["mask_error"]
    assert derived.stop()["exit_status"] == "fail"
    assert "masks are unknown" in derived.stop()["reason"]
    # Bounded: one wait of at most TIMEOUT, the preprocessor's; the router,
    # sharing the registry's breaker, does not wait again.
    assert down_seconds < TIMEOUT + 5, down_seconds
    assert not provenance.breaker.available
    figures["scan while down: seconds (one deadline of 5 s)"] = round(down_seconds, 1)
    figures["scan while down: recorded error"] = start2["mask_error"][:100]

    # 3. The server comes back on the same directory and port. Runs do not
    # wait for a registry known to be down: a background check sees it back.
    lifeline.start()
    back = time.monotonic()
    assert provenance.breaker.wait_available(60), provenance.breaker
    figures["restarted server seen answering after: seconds"] = round(time.monotonic() - back, 1)
    raw.docs.clear()
    derived.docs.clear()
    (uid3,) = RE(count([det], num=3))
    start3 = raw.start()
    assert start3["masks"][DET]["uids"] == record["uids"]
    assert start3["masks"][DET]["sha256"] == record["sha256"]
    for got, want in zip(derived.frames(DET), _expected(det, composite, [1, 2, 3]), strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(derived.frames(DET)) == 3
    assert derived.stop()["exit_status"] == "success"
    registry.close()

    with MaskRegistry.from_uri(
        lifeline.uri, api_key=lifeline.key, disk_cache=False
    ) as after_restart:
        after = _state(after_restart)
    assert after == before, "the crash lost or changed a registered mask"
    figures["masks lost or changed"] = sum(
        1 for uid, digest in before["sha256"].items() if after["sha256"].get(uid) != digest
    )
    figures["runs that finished / started"] = "3 / 3"


# A process that registers new masks as fast as it can, printing each uid it
# was handed, until the server goes away under it.
_REGISTER_LOOP = """
import sys, uuid
import numpy as np
from chx_masks import MaskRegistry
reg = MaskRegistry.from_uri(sys.argv[1], api_key=sys.argv[2], timeout=5, disk_cache=False)
rng = np.random.default_rng(int(sys.argv[3]))
while True:
    mask = rng.random((514, 1030)) >= 0.01
    uid = reg.register_mask("eiger500K_single_image", "crash-" + uuid.uuid4().hex[:8], mask)
    print(uid, flush=True)
"""


def _verify(lifeline: Lifeline, *args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "chx_masks", "--uri", lifeline.uri, "verify", "--json", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
        env={**lifeline.env, "CHX_MASKS_API_KEY": lifeline.key},
    )
    return proc.returncode, json.loads(proc.stdout)


def test_server_killed_during_registrations_leaves_only_orphans_that_repair_removes(lifeline):
    """kill -9 of the server while masks are registered, three times; then the scrub."""
    figures = SUMMARY.setdefault(
        f"registry server killed during registrations ({lifeline.backend} catalog)", {}
    )
    handed_out: list[str] = []
    for round_ in range(3):
        loop = subprocess.Popen(
            [sys.executable, "-c", _REGISTER_LOOP, lifeline.uri, lifeline.key, str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env=lifeline.env,
        )
        assert loop.stdout is not None
        got = [loop.stdout.readline().strip() for _ in range(2)]
        assert all(got), "the registering process did not start"
        time.sleep(0.05 * round_)  # a different step of a registration each time
        lifeline.kill()
        rest, _ = loop.communicate(timeout=120)
        handed_out += got + rest.split()
        lifeline.start()

    # An interrupted registration made on purpose too (steps 1-2 of
    # MaskRegistry._write_version, no claim), so an orphan is always there.
    registry = MaskRegistry.from_uri(lifeline.uri, api_key=lifeline.key, disk_cache=False)
    masks = registry._ensure_container("masks")
    orphan = str(uuid.uuid4())
    registry._store_mask(
        masks,
        orphan,
        np.ones(servers.SHAPE, bool),
        {
            "uid": orphan,
            "detector": DET,
            "name": "never-claimed",
            "sha256": "0" * 64,
            "shape": list(servers.SHAPE),
            "masked_pixels": 0,
            "created_at": "2026-12-01",
        },
        "an interrupted registration",
    )
    claimed = {r.uid for det, name in registry.get_masks() for r in registry.history(det, name)}
    assert set(handed_out) <= claimed
    registry.close()

    code, report = _verify(lifeline)
    kinds = Counter(p["kind"] for p in report["problems"])
    figures["registrations handed out before three kills"] = len(handed_out)
    figures["verify after the kills (problems by kind)"] = dict(kinds)
    assert code == 1 and set(kinds) <= {"orphan", "unsealed"}, report
    assert f"masks/{orphan}" in {p["where"] for p in report["problems"]}

    code, repaired = _verify(lifeline, "--repair")
    assert code == 0 and repaired["clean"], repaired
    assert Counter(p["kind"] for p in repaired["repaired"]) == kinds
    code, again = _verify(lifeline)
    assert code == 0 and again["problems"] == [] and again["repaired"] == []

    # Nothing handed out was touched: every uid still resolves to its record.
    registry = MaskRegistry.from_uri(lifeline.uri, api_key=lifeline.key, disk_cache=False)
    after = {r.uid for det, name in registry.get_masks() for r in registry.history(det, name)}
    assert after == claimed
    for uid in handed_out:
        assert registry.get_mask_by_uid(uid).compute().shape == servers.SHAPE
    assert orphan not in set(registry._root["masks"])
    registry.close()
