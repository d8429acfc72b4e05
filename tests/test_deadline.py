"""A registry that does not answer never holds up a run: the run-start deadline."""

from __future__ import annotations

import socket

import pytest
from bluesky.plans import count

from bluesky_callbacks import MaskingRouter, MaskProvenance
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskRegistry, RegistryUnavailableError
from conftest import EIGER500K, random_mask


@pytest.fixture
def silent_server():
    """A loopback port that accepts connections and never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1"
    sock.close()


def _silent_registry(uri):
    return lambda: MaskRegistry.from_uri(uri, timeout=30.0)


def test_record_policy_opens_the_run_when_the_registry_hangs(RE, silent_server):
    starts = []
    RE.subscribe(lambda name, doc: starts.append(doc), "start")
    RE.preprocessors.append(MaskProvenance(
        _silent_registry(silent_server), masks={EIGER500K: ["m"]},
        on_unavailable="record", timeout=1.0,
    ))
    (uid,) = RE(count([sim_eiger500k()]))
    record = starts[0]["masks"][EIGER500K]
    assert record["uids"] == [] and record["names"] == ["m"]
    assert "did not answer within 1 s" in record["error"]


def test_raise_policy_refuses_the_run_when_the_registry_hangs(RE, silent_server):
    starts = []
    RE.subscribe(lambda name, doc: starts.append(doc), "start")
    RE.preprocessors.append(MaskProvenance(
        _silent_registry(silent_server), masks={EIGER500K: ["m"]},
        on_unavailable="raise", timeout=1.0,
    ))
    with pytest.raises(RegistryUnavailableError, match="did not answer within 1 s"):
        RE(count([sim_eiger500k()]))
    assert starts == []


def test_router_withholds_frames_and_reports_when_the_registry_hangs(
    RE, embedded_dir, silent_server
):
    with MaskRegistry.embedded(embedded_dir) as reg:
        reg.register_mask(EIGER500K, "m", random_mask(seed=1))
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["m"]}))
        raw, derived = [], []
        RE.subscribe(lambda name, doc: raw.append(name))
        RE.subscribe(MaskingRouter(_silent_registry(silent_server),
                                   lambda name, doc: derived.append((name, doc)), timeout=1.0))
        RE(count([sim_eiger500k()], num=2))
    assert raw.count("event") == 2  # acquisition went on
    names = [name for name, _ in derived]
    assert "event_page" not in names  # never passed on unmasked
    stop = derived[-1][1]
    assert stop["exit_status"] == "fail"
    assert any("did not answer within 1 s" in e for e in stop["masking_errors"])
