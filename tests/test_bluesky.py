"""Mask provenance at run start and masked frames live and on replay: real RunEngine, real tiled."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter
from event_model import pack_event_page
from helpers import Collector, ServerProcess
from tiled.queries import Key

from bluesky_callbacks import (
    MaskingRouter,
    MaskProvenance,
    mask_provenance_decorator,
    mask_provenance_wrapper,
    masked_frames,
    open_run_store,
    replay_masked,
)
from bluesky_callbacks._deadline import stop_probes
from bluesky_callbacks.sim import SimAsyncEiger, handler_registry, sim_eiger4m, sim_eiger500k
from chx_masks import (
    MaskNotFoundError,
    MaskRegistry,
    MaskValidationError,
    RegistryUnavailableError,
)

K4M = "eiger4m_single_image"
K500 = "eiger500K_single_image"


def _masks(shape, seed):
    rng = np.random.default_rng(seed)
    gaps = np.ones(shape, bool)
    gaps[shape[0] // 2 : shape[0] // 2 + 5, :] = False
    hot = rng.random(shape) > 0.001
    stop = np.ones(shape, bool)
    stop[10:40, 100:160] = False
    return {"gaps": gaps, "hot": hot, "beamstop": stop}


@pytest.fixture(autouse=True)
def _no_background_checks_left():
    yield
    stop_probes(timeout=1.0)


@pytest.fixture
def reg(embedded_dir):
    registry = MaskRegistry.embedded(embedded_dir)
    for key, shape in ((K4M, (2167, 2070)), (K500, (514, 1030))):
        for name, mask in _masks(shape, seed=len(key)).items():
            registry.register_mask(key, name, mask)
    yield registry
    registry.close()


@pytest.fixture
def store(tmp_path):
    client = open_run_store(tmp_path / "runs", readable_storage=[tmp_path / "frames"])
    yield client
    client.context.close()


def _expected(det, composite, n):
    return [
        det.expected_frame(i) * composite.mask.astype(det.expected_frame(0).dtype) for i in range(n)
    ]


def _assert_frames_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_count_4m_records_provenance_masks_frames_and_stores_both_runs(RE, reg, store):
    det = sim_eiger4m()
    names = ["gaps", "hot", "beamstop"]
    RE.preprocessors.append(MaskProvenance(reg, masks={K4M: names}))
    raw = Collector()
    derived = Collector()
    RE.subscribe(raw)
    RE.subscribe(TiledWriter(store))
    RE.subscribe(MaskingRouter(reg, [derived, TiledWriter(store)]))

    (uid,) = RE(count([det], num=4))

    composite = reg.resolve_composite(K4M, names)
    start = raw.start()
    assert start["masks"] == {K4M: {**composite.provenance(), "chosen_by": "configuration"}}
    assert start["mask_uids"] == list(composite.uids)
    assert derived.start()["parent_uid"] == uid
    assert derived.start()["masks"] == start["masks"]
    assert derived.start()["mask_uids"] == start["mask_uids"]
    frames = derived.frames(K4M)
    _assert_frames_equal(frames, _expected(det, composite, 4))
    assert all((f[~composite.mask] == 0).all() for f in frames)
    assert derived.stop()["exit_status"] == "success"
    assert derived.stop()["num_events"] == {"primary": 4}

    # Both runs are in tiled; the derived one is found from the raw uid.
    assert store[uid].metadata["start"]["mask_uids"] == list(composite.uids)
    found = store.search(Key("parent_uid") == uid)
    assert len(found) == 1
    stored = found.values().first()
    np.testing.assert_array_equal(stored["primary"][K4M].read(), np.stack(frames))
    assert stored.metadata["start"]["masks"] == start["masks"]


def test_replay_uses_recorded_uids_not_latest(RE, reg, store):
    det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["gaps", "beamstop"]}))
    live = Collector()
    RE.subscribe(TiledWriter(store))
    RE.subscribe(MaskingRouter(reg, live))
    (uid,) = RE(count([det], num=3))

    newer = np.ones((514, 1030), bool)
    newer[:, :300] = False
    reg.update_mask(K500, "beamstop", newer)

    replayed = Collector()
    derived_uid = replay_masked(store[uid], replayed, registry=reg)
    assert derived_uid == replayed.start()["uid"] != live.start()["uid"]
    assert replayed.start()["masks"] == live.start()["masks"]
    assert replayed.start()["mask_uids"] == live.start()["mask_uids"]
    assert replayed.start()["parent_uid"] == uid
    _assert_frames_equal(replayed.frames(K500), live.frames(K500))
    assert replayed.stop()["exit_status"] == "success"

    lazy = masked_frames(store[uid], K500, registry=reg)
    assert lazy.dtype == np.uint32 and lazy.shape == (3, 514, 1030)
    np.testing.assert_array_equal(lazy.compute(), np.stack(live.frames(K500)))


def test_run_without_recorded_masks_resolves_as_of_its_start(RE, reg, store):
    det = sim_eiger500k()
    RE.subscribe(TiledWriter(store))
    before = reg.resolve_composite(K500, ["gaps", "hot"])
    (uid,) = RE(count([det], num=2))  # no preprocessor: an older run
    time.sleep(0.01)
    reg.update_mask(K500, "gaps", np.ones((514, 1030), bool))

    replayed = Collector()
    replay_masked(store[uid], replayed, registry=reg, masks={K500: ["gaps", "hot"]})
    start = replayed.start()
    assert start["mask_uids"] == list(before.uids)
    assert K500 in start["masks_resolved_as_of"]
    _assert_frames_equal(replayed.frames(K500), _expected(det, before, 2))

    with pytest.raises(MaskNotFoundError, match="recorded no masks"):
        masked_frames(store[uid], K500, registry=reg)
    lazy = masked_frames(store[uid], K500, registry=reg, masks={K500: ["gaps", "hot"]})
    np.testing.assert_array_equal(lazy.compute(), np.stack(replayed.frames(K500)))


def test_files_mode_through_resource_and_datum(RE, reg, tmp_path, store):
    det = sim_eiger500k(mode="files", save_path=tmp_path / "frames")
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["hot"]}))
    derived = Collector()
    RE.subscribe(TiledWriter(store))
    RE.subscribe(MaskingRouter(reg, derived, handler_registry=handler_registry))
    (uid,) = RE(count([det], num=3))
    composite = reg.resolve_composite(K500, ["hot"])
    _assert_frames_equal(derived.frames(K500), _expected(det, composite, 3))
    descriptor = next(doc for name, doc in derived.docs if name == "descriptor")
    assert "external" not in descriptor["data_keys"][K500]

    # TiledWriter stores the .npy sequence as a StreamResource; replay reads
    # the frames through tiled and gives the same masked frames.
    replayed = Collector()
    replay_masked(store[uid], replayed, registry=reg)
    _assert_frames_equal(replayed.frames(K500), derived.frames(K500))


def test_hdf5_stream_resource_frames(RE, reg, tmp_path, store):
    from ophyd_async.plan_stubs import ensure_connected

    det = SimAsyncEiger("eiger500K_single", tmp_path / "frames")
    RE(ensure_connected(det))
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["gaps", "beamstop"]}))
    live = Collector()
    RE.subscribe(TiledWriter(store))
    RE.subscribe(MaskingRouter(reg, live))
    (uid,) = RE(count([det], num=3))
    composite = reg.resolve_composite(K500, ["gaps", "beamstop"])
    got = live.frames(K500)
    assert [g.shape for g in got] == [(1, 514, 1030)] * 3
    want = [f[np.newaxis] for f in _expected(det, composite, 3)]
    _assert_frames_equal(got, want)
    assert live.stop()["exit_status"] == "success"

    replayed = Collector()
    replay_masked(store[uid], replayed, registry=reg)
    _assert_frames_equal(replayed.frames(K500), got)
    assert replayed.start()["mask_uids"] == live.start()["mask_uids"]


def test_event_pages_are_masked_like_events(RE, reg):
    det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["gaps"]}))
    raw = Collector()
    RE.subscribe(raw)
    RE(count([det], num=3))
    events = [doc for name, doc in raw.docs if name == "event"]
    paged = [(n, d) for n, d in raw.docs if n != "event"]
    paged.insert(2, ("event_page", pack_event_page(*events)))
    from_events, from_page = Collector(), Collector()
    router_events = MaskingRouter(reg, from_events)
    router_page = MaskingRouter(reg, from_page)
    for name, doc in raw.docs:
        router_events(name, doc)
    for name, doc in paged:
        router_page(name, doc)
    _assert_frames_equal(from_page.frames(K500), from_events.frames(K500))
    assert len(from_page.frames(K500)) == 3


def test_multi_detector_run_and_detector_without_masks(RE, reg):
    d4m, d500 = sim_eiger4m(), sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["hot"]}))
    derived = Collector()
    RE.subscribe(MaskingRouter(reg, derived))
    RE(count([d4m, d500], num=2))
    start = derived.start()
    assert set(start["masks"]) == {K500}
    composite = reg.resolve_composite(K500, ["hot"])
    _assert_frames_equal(derived.frames(K500), _expected(d500, composite, 2))
    # The 4M has no masks configured: its frames pass through untouched.
    _assert_frames_equal(derived.frames(K4M), [d4m.expected_frame(i) for i in range(2)])

    both = MaskProvenance(reg, masks={K500: ["hot"], K4M: ["gaps"]})
    RE.preprocessors[:] = [both]
    derived2 = Collector()
    RE.subscribe(MaskingRouter(reg, derived2))
    RE(count([d4m, d500], num=1))
    assert set(derived2.start()["masks"]) == {K500, K4M}
    gaps = reg.resolve_composite(K4M, ["gaps"])
    _assert_frames_equal(derived2.frames(K4M), _expected(d4m, gaps, 1))


def test_streams_without_masked_detector_pass_or_drop(RE, reg):
    det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K4M: ["gaps"]}))
    passed, dropped = Collector(), Collector()
    RE.subscribe(MaskingRouter(reg, passed))
    RE.subscribe(MaskingRouter(reg, dropped, unmasked_streams="drop"))
    RE(count([det], num=2))
    assert passed.names() == ["start", "descriptor", "event_page", "event_page", "stop"]
    assert dropped.names() == ["start", "stop"]


def test_run_metadata_chooses_other_mask_names(RE, reg):
    det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["gaps", "hot"]}))
    raw = Collector()
    RE.subscribe(raw)
    RE(count([det], num=1, md={"mask_names": {K500: ["beamstop"]}}))
    assert raw.start()["masks"][K500]["names"] == ["beamstop"]
    assert raw.start()["mask_uids"] == [reg.get_mask_uid(K500, "beamstop")]


def test_missing_masks_are_named_with_where_they_come_from_and_the_fix(RE, reg):
    det = sim_eiger500k()
    reg.register_mask(K500, "gone", np.ones((514, 1030), bool))
    reg.delete_mask(K500, "gone")
    raw = Collector()
    RE.subscribe(raw)
    RE.preprocessors.append(
        MaskProvenance(reg, masks={K500: ["gaps", "nope", "gone"]}, on_unavailable="record")
    )
    RE(count([det], num=1))
    error = raw.start()["masks"][K500]["error"]
    assert error.startswith("MaskNotFoundError: ")
    assert "'nope', 'gone' named by the configured masks" in error, error
    assert "never registered, or retired" in error
    assert f"masks_activate('{K500}', ['gaps'])" in error

    # Chosen by the run itself: the fix is the run's own mask_names.
    raw.docs.clear()
    RE(count([det], num=1, md={"mask_names": {K500: ["hot", "nope"]}}))
    error = raw.start()["masks"][K500]["error"]
    assert "'nope' named by the run's mask_names is not a current mask" in error, error
    assert f"md={{'mask_names': {{'{K500}': ['hot']}}}}" in error

    # Under "raise" the run is refused with the same words.
    RE.preprocessors[:] = [MaskProvenance(reg, masks={K500: ["gaps", "nope"]})]
    with pytest.raises(MaskNotFoundError, match="not opened.*'nope' named by the configured"):
        RE(count([det], num=1))


def test_mask_names_given_to_the_run_engine_call_warn_once(RE, reg, caplog):
    det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["gaps"]}))
    raw = Collector()
    RE.subscribe(raw)
    RE.subscribe(MaskingRouter(reg, Collector()))
    with caplog.at_level(logging.WARNING, logger="bluesky_callbacks"):
        RE(count([det], num=1), mask_names={K500: ["beamstop"]})
    assert raw.start()["masks"][K500]["names"] == ["gaps"]  # it could not choose
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert "mask_names given to RE(...) cannot choose masks; put it in the plan's md=" in warned[0]
    assert f"{K500} used gaps (configuration)" in warned[0]

    # In the plan's metadata it chooses, and nothing is said.
    caplog.clear()
    raw.docs.clear()
    with caplog.at_level(logging.WARNING, logger="bluesky_callbacks"):
        RE(count([det], num=1, md={"mask_names": {K500: ["beamstop"]}}))
    assert raw.start()["masks"][K500]["names"] == ["beamstop"]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_staged_devices_count_even_without_detectors_metadata(RE, reg):
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["gaps"]}))
    raw = Collector()
    RE.subscribe(raw)

    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def plan():
        yield from bps.trigger_and_read([det])

    RE(plan())
    assert raw.start()["mask_uids"] == [reg.get_mask_uid(K500, "gaps")]


def test_wrapper_and_decorator(RE, reg):
    det = sim_eiger500k()
    raw = Collector()
    RE.subscribe(raw)
    RE(mask_provenance_wrapper(count([det]), reg, {K500: ["hot"]}))
    assert raw.start()["masks"][K500]["names"] == ["hot"]

    @mask_provenance_decorator(reg, {K500: ["gaps"]})
    def plan():
        yield from count([det])

    raw.docs.clear()
    RE(plan())
    assert raw.start()["masks"][K500]["names"] == ["gaps"]


def test_cached_lookups_read_each_array_once(RE, reg):
    det = sim_eiger500k()
    fresh = MaskRegistry(reg._root)
    RE.preprocessors.append(MaskProvenance(fresh, masks={K500: ["gaps", "hot", "beamstop"]}))
    RE(count([det], num=1))
    reads = []
    original = fresh._read

    def counting(uid):
        if uid not in fresh._arrays:  # a read that goes to tiled
            reads.append(uid)
        return original(uid)

    fresh._read = counting
    RE(count([det], num=1))
    RE(count([det], num=1))
    assert reads == []  # later runs only ask which uids are current
    reg.update_mask(K500, "hot", np.ones((514, 1030), bool))
    raw = Collector()
    RE.subscribe(raw)
    RE(count([det], num=1))
    assert reads == [reg.get_mask_uid(K500, "hot")]
    assert raw.start()["masks"][K500]["versions"] == [0, 1, 0]


@pytest.fixture
def doomed_server(tmp_path):
    """A real tiled server, in its own process, that a test stops."""
    server = ServerProcess(tmp_path / "doomed")
    yield server
    server.stop()


def test_registry_down_policy_raise_opens_no_run(RE, doomed_server):
    registry = MaskRegistry.from_uri(doomed_server.uri, api_key=doomed_server.api_key, timeout=2)
    registry.register_mask(K500, "gaps", np.ones((514, 1030), bool))
    RE.preprocessors.append(MaskProvenance(registry, masks={K500: ["gaps"]}))
    seen = Collector()
    RE.subscribe(seen)
    doomed_server.stop()
    with pytest.raises(RegistryUnavailableError, match="run was not opened"):
        RE(count([sim_eiger500k()], num=1))
    assert seen.docs == []


def test_registry_down_active_sets_only_policy_raise_opens_no_run(RE, doomed_server):
    # No masks configured: the choice lives only in the active sets, which
    # cannot be read. The run must not open as if no masks were wanted.
    registry = MaskRegistry.from_uri(doomed_server.uri, api_key=doomed_server.api_key, timeout=2)
    registry.register_mask(K500, "gaps", np.ones((514, 1030), bool))
    registry.activate(K500, ["gaps"])
    RE.preprocessors.append(MaskProvenance(registry))
    seen = Collector()
    RE.subscribe(seen)
    doomed_server.stop()
    with pytest.raises(
        RegistryUnavailableError,
        match=r"not opened: the active masks of its detectors \(eiger500K_single\)",
    ):
        RE(count([sim_eiger500k()], num=1))
    assert seen.docs == []


def test_registry_down_policy_record_opens_and_says_why(RE, doomed_server):
    registry = MaskRegistry.from_uri(doomed_server.uri, api_key=doomed_server.api_key, timeout=2)
    registry.register_mask(K500, "gaps", np.ones((514, 1030), bool))
    RE.preprocessors.append(
        MaskProvenance(registry, masks={K500: ["gaps"]}, on_unavailable="record")
    )
    raw, derived = Collector(), Collector()
    RE.subscribe(raw)
    RE.subscribe(MaskingRouter(registry, derived))
    doomed_server.stop()
    (uid,) = RE(count([sim_eiger500k()], num=2))
    record = raw.start()["masks"][K500]
    assert record["uids"] == [] and "RegistryUnavailableError" in record["error"]
    assert raw.start()["mask_uids"] == []
    assert raw.names().count("event") == 2 and raw.stop()["exit_status"] == "success"
    # No unmasked frame is passed on as masked; the derived run says why.
    assert derived.frames(K500) == []
    assert derived.stop()["exit_status"] == "fail"


def test_masking_failure_mid_run_does_not_stop_the_scan(RE, reg, tmp_path, caplog):
    det = sim_eiger500k(mode="files", save_path=tmp_path / "frames")
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["hot"]}))
    raw, derived = Collector(), Collector()

    def lose_frame_1(name, doc):
        # The frame file of event 2 disappears before the router fills it.
        if name == "event" and doc["seq_num"] == 2:
            resource = next(d for n, d in raw.docs if n == "resource")
            os.remove(os.path.join(resource["root"], f"{resource['resource_path']}_1.npy"))

    RE.subscribe(raw)
    RE.subscribe(lose_frame_1)
    RE.subscribe(MaskingRouter(reg, derived, handler_registry=handler_registry))
    with caplog.at_level(logging.ERROR, logger="bluesky_callbacks"):
        RE(count([det], num=3))
    assert raw.names().count("event") == 3 and raw.stop()["exit_status"] == "success"
    composite = reg.resolve_composite(K500, ["hot"])
    want = _expected(det, composite, 3)
    _assert_frames_equal(derived.frames(K500), [want[0], want[2]])
    stop = derived.stop()
    assert stop["exit_status"] == "fail" and len(stop["masking_errors"]) == 1
    assert "seq_num [2]" in stop["masking_errors"][0]
    assert any("Masking" in r.message for r in caplog.records)


def test_strict_mode_raises_into_the_run_engine(RE, reg, tmp_path):
    det = sim_eiger500k(mode="files", save_path=tmp_path / "frames")
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["hot"]}))
    # No handler for NPY_SEQ: filling fails, and strict mode says so loudly.
    RE.subscribe(MaskingRouter(reg, Collector(), strict=True, handler_registry={"OTHER": object}))
    with pytest.raises(Exception, match="NPY_SEQ"):
        RE(count([det], num=1))


def test_router_options_are_checked(reg):
    # In the error tree (and ValueErrors, as Python's own checks of arguments are).
    with pytest.raises(MaskValidationError, match="downstream"):
        MaskingRouter(reg, [])
    with pytest.raises(MaskValidationError, match="unmasked_streams"):
        MaskingRouter(reg, print, unmasked_streams="keep")
    with pytest.raises(MaskValidationError, match="frames must be 'inline' or 'files'"):
        MaskingRouter(reg, print, frames="dense")
    with pytest.raises(MaskValidationError, match="needs directory="):
        MaskingRouter(reg, print, frames="files")
    with pytest.raises(ValueError, match="on_unavailable"):
        MaskProvenance(reg, {K500: ["gaps"]}, on_unavailable="ignore")
    with pytest.raises(ValueError, match="list of mask names"):
        MaskProvenance(reg, {K500: "gaps"})


FRAMES_4M = 20


@pytest.mark.slow
def test_scan_of_20_eiger4m_frames_with_tiled_writer(RE, reg, store):
    """Full-size frames through both TiledWriters (20: each raw and masked frame is 18 MB)."""
    det = sim_eiger4m()
    names = ["gaps", "hot", "beamstop"]
    RE.preprocessors.append(MaskProvenance(reg, masks={K4M: names}))
    counted = {"frames": 0}

    def count_frames(name, doc):
        if name == "event_page":
            counted["frames"] += len(doc["seq_num"])

    RE.subscribe(TiledWriter(store))
    RE.subscribe(MaskingRouter(reg, [count_frames, TiledWriter(store)]))
    (uid,) = RE(count([det], num=FRAMES_4M))
    assert counted["frames"] == FRAMES_4M
    derived = store.search(Key("parent_uid") == uid).values().first()
    stored = derived["primary"][K4M]
    assert stored.shape == (FRAMES_4M, 2167, 2070)
    composite = reg.resolve_composite(K4M, names)
    np.testing.assert_array_equal(
        stored[FRAMES_4M - 1], det.expected_frame(FRAMES_4M - 1) * composite.mask.astype(np.uint32)
    )


def test_replay_from_databroker_v1_header_and_progress(RE, reg, store):
    from databroker.v1 import Broker

    det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(reg, masks={K500: ["hot", "gaps"]}))
    live = Collector()
    RE.subscribe(TiledWriter(store))
    RE.subscribe(MaskingRouter(reg, live))
    (uid,) = RE(count([det], num=3))

    header = Broker(store)[uid]
    replayed = Collector()
    replay_masked(header, replayed, registry=reg)
    _assert_frames_equal(replayed.frames(K500), live.frames(K500))
    assert replayed.start()["mask_uids"] == live.start()["mask_uids"]

    seen = []
    replay_masked(
        store[uid],
        Collector(),
        registry=reg,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1] == (3, 3) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # A databroker v1 Header switched every client of this process to the v2
    # run layout; asking for v3 switches it back for the tests that follow.
    _ = store[uid].v3
