"""A registry that does not answer never holds up a run: the run-start deadline and breaker."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from bluesky.plans import count
from helpers import EIGER500K, random_mask

from bluesky_callbacks import MaskingRouter, MaskProvenance
from bluesky_callbacks._deadline import RegistryBreaker, breaker_for, stop_probes
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskRegistry, RegistryUnavailableError


@pytest.fixture(autouse=True)
def _no_background_checks_left():
    yield
    stop_probes(timeout=1.0)  # a check stuck on a silent port ends by itself


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
    RE.preprocessors.append(
        MaskProvenance(
            _silent_registry(silent_server),
            masks={EIGER500K: ["m"]},
            on_unavailable="record",
            timeout=1.0,
        )
    )
    (uid,) = RE(count([sim_eiger500k()]))
    record = starts[0]["masks"][EIGER500K]
    assert record["uids"] == [] and record["names"] == ["m"]
    assert "did not answer within 1 s" in record["error"]


def test_raise_policy_refuses_the_run_when_the_registry_hangs(RE, silent_server):
    starts = []
    RE.subscribe(lambda name, doc: starts.append(doc), "start")
    RE.preprocessors.append(
        MaskProvenance(
            _silent_registry(silent_server),
            masks={EIGER500K: ["m"]},
            on_unavailable="raise",
            timeout=1.0,
        )
    )
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
        RE.subscribe(
            MaskingRouter(
                _silent_registry(silent_server),
                lambda name, doc: derived.append((name, doc)),
                timeout=1.0,
            )
        )
        RE(count([sim_eiger500k()], num=2))
    assert raw.count("event") == 2  # acquisition went on
    names = [name for name, _ in derived]
    assert "event_page" not in names  # never passed on unmasked
    stop = derived[-1][1]
    assert stop["exit_status"] == "fail"
    assert any("did not answer within 1 s" in e for e in stop["masking_errors"])
    # Said once, with why, where the frames are withheld.
    assert any(f"{EIGER500K} frames withheld" in e for e in stop["masking_errors"])


class Switch:
    """A registry factory whose registry is down until switched on; counts who asks."""

    def __init__(self, registry: MaskRegistry) -> None:
        self.registry = registry
        self.down = True
        self.asked: list[str] = []  # the thread of each call
        self._lock = threading.Lock()

    def __call__(self) -> MaskRegistry:
        with self._lock:
            self.asked.append(threading.current_thread().name)
        if self.down:
            raise RegistryUnavailableError("Down for the test.")
        return self.registry

    def asked_by(self, prefix: str) -> int:
        with self._lock:
            return sum(name.startswith(prefix) for name in self.asked)


def test_breaker_fails_fast_while_down_checks_in_the_background_and_closes(embedded_dir):
    with MaskRegistry.embedded(embedded_dir) as reg:
        switch = Switch(reg)
        breaker = RegistryBreaker(switch, interval=0.05, max_interval=0.2)
        with pytest.raises(RegistryUnavailableError, match="Down for the test"):
            breaker.call(lambda r: r.get_masks(), 5.0, "listing masks")
        assert not breaker.available and breaker.down_since is not None

        # While down, a call never reaches the registry: it says since when, at once.
        callers = switch.asked_by("chx-masks-registry-call")
        for _ in range(50):
            with pytest.raises(
                RegistryUnavailableError,
                match="has not answered since .* checked again in the background",
            ):
                breaker.call(lambda r: r.get_masks(), 5.0, "listing masks")
        assert switch.asked_by("chx-masks-registry-call") == callers

        # The background check is paced (the pause doubles up to 0.2 s), never a busy loop.
        probes = switch.asked_by("chx-masks-registry-probe")
        time.sleep(1.0)
        assert 1 <= switch.asked_by("chx-masks-registry-probe") - probes <= 10

        switch.down = False
        assert breaker.wait_available(5.0)
        assert breaker.call(lambda r: r.get_masks(), 5.0, "listing masks") == []
        # Closed again: the background check has ended.
        probes = switch.asked_by("chx-masks-registry-probe")
        time.sleep(0.5)
        assert switch.asked_by("chx-masks-registry-probe") == probes


def test_breaker_stops_its_background_check_and_starts_one_per_outage(embedded_dir):
    with MaskRegistry.embedded(embedded_dir) as reg:
        switch = Switch(reg)
        breaker = RegistryBreaker(switch, interval=0.05, max_interval=0.1)
        with pytest.raises(RegistryUnavailableError):
            breaker.call(lambda r: r, 5.0, "opening it")
        breaker.stop()
        probes = switch.asked_by("chx-masks-registry-probe")
        time.sleep(0.5)
        assert switch.asked_by("chx-masks-registry-probe") == probes  # stopped
        assert not breaker.available  # the state is kept: nothing saw it answer

        # retry=True asks now, whatever the state; an answer closes the breaker.
        switch.down = False
        assert breaker.call(lambda r: r, 5.0, "opening it", retry=True) is reg
        assert breaker.available

        # A second outage gets a check of its own.
        switch.down = True
        with pytest.raises(RegistryUnavailableError):
            breaker.call(lambda r: r, 5.0, "opening it")
        switch.down = False
        assert breaker.wait_available(5.0)


def test_breaker_is_thread_safe(embedded_dir):
    with MaskRegistry.embedded(embedded_dir) as reg:
        switch = Switch(reg)
        breaker = RegistryBreaker(switch, interval=0.05, max_interval=0.1)
        results: list[object] = []

        def many_calls():
            for _ in range(20):
                try:
                    results.append(breaker.call(lambda r: r, 5.0, "opening it"))
                except RegistryUnavailableError as err:
                    results.append(err)

        threads = [threading.Thread(target=many_calls) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(results) == 160
        assert all(isinstance(r, RegistryUnavailableError) for r in results)
        # However many callers failed at once, one check runs in the background.
        probes = [t for t in threading.enumerate() if t.name == "chx-masks-registry-probe"]
        assert len(probes) <= 1
        switch.down = False
        assert breaker.wait_available(5.0)
        results.clear()
        threads = [threading.Thread(target=many_calls) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == [reg] * 160


def test_callbacks_given_one_registry_share_its_breaker(embedded_dir):
    with MaskRegistry.embedded(embedded_dir) as reg:
        factory = lambda: reg  # noqa: E731
        assert MaskProvenance(reg).breaker is MaskingRouter(reg, print).breaker
        assert MaskProvenance(factory).breaker is MaskingRouter(factory, print).breaker
        assert breaker_for(factory) is not breaker_for(reg)


def test_router_does_not_wait_again_for_a_run_that_found_the_registry_unreachable(
    RE, silent_server
):
    # Two factories, so two breakers: only the start document tells the
    # router that the run start already spent its wait.
    provenance_factory = _silent_registry(silent_server)
    router_factory = _silent_registry(silent_server)
    RE.preprocessors.append(
        MaskProvenance(
            provenance_factory, masks={EIGER500K: ["m"]}, on_unavailable="record", timeout=1.0
        )
    )
    derived = []
    router = MaskingRouter(
        router_factory,
        lambda name, doc: derived.append((name, doc)),
        masks={EIGER500K: ["m"]},
        timeout=1.0,
    )
    RE.subscribe(router)
    RE(count([sim_eiger500k()], num=1))
    assert not breaker_for(provenance_factory).available
    assert router.breaker.available  # never asked: nothing timed out there
    stop = derived[-1][1]
    assert stop["exit_status"] == "fail"
    assert any(
        "frames withheld" in e and "did not answer within 1 s" in e for e in stop["masking_errors"]
    ), stop["masking_errors"]


def test_only_a_live_run_that_found_the_registry_down_spares_the_router_its_wait(
    embedded_dir, monkeypatch
):
    from bluesky_callbacks import _router

    with MaskRegistry.embedded(embedded_dir) as reg:
        uid = reg.register_mask(EIGER500K, "m", random_mask(seed=1))
        start = {
            "uid": "raw",
            "time": time.time(),
            "mask_uids": [],
            "masks": {
                EIGER500K: {
                    "names": ["m"],
                    "uids": [],
                    "versions": [],
                    "sha256": None,
                    "error": "RegistryUnavailableError: down at open",
                }
            },
        }

        def derived_start():
            out = []
            router = MaskingRouter(reg, lambda name, doc: out.append(doc), masks={EIGER500K: ["m"]})
            router("start", start)
            return out[0]

        # Live: the outage is news; the router does not ask the registry.
        assert derived_start()["mask_uids"] == []
        # Replayed later: the registry is asked, as of the run's start.
        monkeypatch.setattr(_router, "OUTAGE_NEWS_SECONDS", 0.0)
        replayed = derived_start()
        assert replayed["mask_uids"] == [uid] and EIGER500K in replayed["masks_resolved_as_of"]
