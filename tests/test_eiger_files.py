"""Real Eiger data end to end: DECTRIS-layout bitshuffle-LZ4 files and sparse XPCS frames.

Both file-writing simulated Eigers (ophyd ``mode="eiger"``: Resource/Datum
``AD_EIGER2``; ophyd-async: StreamResource/StreamDatum) write series of
several data files; every masking path must give frames bit-identical to
raw x mask, reading them through the project's one frame-reading layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter
from event_model import Filler
from helpers import EIGER500K, SHAPE_500K, Collector, random_mask

from bluesky_callbacks import (
    EigerSeriesToStream,
    MaskingRouter,
    MaskProvenance,
    masked_frames,
    open_run_store,
    plan_processing,
    process_run,
    replay_masked,
)
from bluesky_callbacks._eiger import (
    DATA_PATH,
    PIXEL_MASK_PATH,
    EigerSeriesHandler,
    SeriesWriter,
    XPCSPattern,
)
from bluesky_callbacks._frames import TiledStreamReader
from bluesky_callbacks.sim import SimAsyncEiger, SimEiger, handler_registry
from chx_masks import MaskIntegrityError, MaskRegistry

BITSHUFFLE_LZ4 = 32008


@pytest.fixture
def reg(embedded_dir):
    registry = MaskRegistry.embedded(embedded_dir)
    registry.register_mask(EIGER500K, "gaps", random_mask(seed=3, fraction=0.02))
    registry.register_mask(EIGER500K, "hot", random_mask(seed=4, fraction=0.01))
    yield registry
    registry.close()


def _composite(reg):
    return reg.resolve_composite(EIGER500K, ["gaps", "hot"])


def _expected(det, composite, n):
    mask = composite.mask.astype(det.pattern.dtype)
    return np.stack([det.expected_frame(i) * mask for i in range(n)])


def _async_eiger(RE, path, **kwargs):
    from ophyd_async.plan_stubs import ensure_connected

    det = SimAsyncEiger("eiger500K_single", path, **kwargs)
    RE(ensure_connected(det))
    return det


# ---------------------------------------------------------------- the files


def test_a_series_is_laid_out_as_the_dectris_file_writer_does(tmp_path):
    pattern = XPCSPattern(SHAPE_500K)
    with SeriesWriter(
        tmp_path, "scan_1", SHAPE_500K, np.uint32, frames_per_file=2, pixel_mask=pattern.pixel_mask
    ) as series:
        for i in range(5):
            series.write(pattern.frame(i))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "scan_1_data_000001.h5",
        "scan_1_data_000002.h5",
        "scan_1_data_000003.h5",
        "scan_1_master.h5",
    ]
    with h5py.File(tmp_path / "scan_1_master.h5", "r") as master:
        links = {k: master["/entry/data"].get(k, getlink=True) for k in master["/entry/data"]}
        assert {k: (v.filename, v.path) for k, v in links.items()} == {
            f"data_00000{n}": (f"scan_1_data_00000{n}.h5", DATA_PATH) for n in (1, 2, 3)
        }
        stored_mask = master[PIXEL_MASK_PATH]
        assert stored_mask.dtype == np.uint32
        assert stored_mask.id.get_create_plist().get_filter(0)[0] == BITSHUFFLE_LZ4
        np.testing.assert_array_equal(stored_mask[()], pattern.pixel_mask)
        rows = [master[f"/entry/data/data_00000{n}"] for n in (1, 2, 3)]
        assert [d.shape[0] for d in rows] == [2, 2, 1]
        for dataset in rows:
            assert dataset.chunks == (1, *SHAPE_500K)  # one chunk per frame
            assert dataset.id.get_create_plist().get_filter(0)[0] == BITSHUFFLE_LZ4
        frames = np.concatenate([d[()] for d in rows])
    np.testing.assert_array_equal(frames, np.stack([pattern.frame(i) for i in range(5)]))
    # Sparse frames compress: bitshuffle-LZ4 shrinks them many times.
    raw_bytes = frames.nbytes / 5
    data_bytes = os.path.getsize(tmp_path / "scan_1_data_000001.h5") / 2
    assert raw_bytes / data_bytes > 10


def test_xpcs_frames_are_sparse_photon_counts_whose_speckle_decorrelates_faster_at_high_q():
    pattern = XPCSPattern(SHAPE_500K, mean=0.05, tau=10)
    frame = pattern.frame(0)
    good = ~pattern.bad_pixels
    assert 0.035 < frame[good].mean() < 0.065
    assert (frame[good] == 0).mean() > 0.93
    assert (frame[pattern.flagged] == np.iinfo(np.uint32).max).all()
    assert frame[pattern.hot_pixels].min() > 100
    assert not (pattern.pixel_mask[pattern.hot_pixels]).any()  # only beamline masks cut them
    # g2 at lag 1 and 8, near and far from the beam: photons enough at mean 2.
    bright = XPCSPattern(SHAPE_500K, mean=2.0, tau=10)
    stack = np.stack([bright.frame(i) for i in range(120)]).astype(float)
    rows, cols = np.ogrid[: SHAPE_500K[0], : SHAPE_500K[1]]
    q = np.hypot(rows - bright.beam_center[0], cols - bright.beam_center[1])
    g2 = {}
    for ring, (lo, hi) in {"low": (40, 80), "high": (150, 250)}.items():
        pixels = stack[:, ~bright.bad_pixels & (q >= lo) & (q < hi)]
        norm = (pixels.mean(0) ** 2).mean()
        g2[ring] = [(pixels[:-lag] * pixels[lag:]).mean(0).mean() / norm for lag in (1, 8)]
    assert g2["low"][0] > 1.3 and g2["low"][0] > g2["low"][1] + 0.1  # decays
    assert g2["high"][0] < g2["low"][0] and g2["high"][1] < 1.1  # faster at high q


def test_series_of_several_files_read_back_in_order_through_the_eiger_handler(tmp_path):
    pattern = XPCSPattern(SHAPE_500K, seed=5)
    with SeriesWriter(tmp_path, "p_3", SHAPE_500K, np.uint32, frames_per_file=3) as series:
        for i in range(7):
            series.write(pattern.frame(i))
    handler = EigerSeriesHandler(str(tmp_path / "p"), images_per_file=3)
    try:
        np.testing.assert_array_equal(
            handler(seq_id=3), np.stack([pattern.frame(i) for i in range(7)])
        )
        np.testing.assert_array_equal(handler(seq_id=3, frame_num=4), pattern.frame(4))
        assert len(handler.get_file_list([{"seq_id": 3}])) == 4
    finally:
        handler.close()


# ----------------------------------------------------------- the detectors


def test_ophyd_eiger_writes_ad_eiger2_resources_read_by_nsls2_handlers(RE, tmp_path):
    det = SimEiger(
        "eiger500K_single",
        mode="eiger",
        save_path=tmp_path,
        frames_per_trigger=3,
        frames_per_file=3,
    )
    docs = Collector()
    RE.subscribe(docs)
    RE(count([det], num=2))
    (resource,) = [doc for name, doc in docs.docs if name == "resource"]
    assert resource["spec"] == "AD_EIGER2"
    assert resource["resource_kwargs"] == {"images_per_file": 3}
    datums = [doc for name, doc in docs.docs if name == "datum"]
    assert [d["datum_kwargs"] for d in datums] == [{"seq_id": 1}, {"seq_id": 2}]
    key = next(doc for name, doc in docs.docs if name == "descriptor")["data_keys"][EIGER500K]
    assert key["shape"] == [3, *SHAPE_500K] and key["external"] == "FILESTORE:"
    filler = Filler(dict(handler_registry), inplace=False)
    series = []
    for name, doc in docs.docs:
        _, filled = filler(name, doc)
        if name == "event":
            series.append(filled["data"][EIGER500K])
    np.testing.assert_array_equal(
        np.concatenate(series), np.stack([det.expected_frame(i) for i in range(6)])
    )
    # NSLS-II's own handler (area-detector-handlers) reads the same files.
    from area_detector_handlers.eiger import EigerHandler

    theirs = EigerHandler(
        os.path.join(resource["root"], resource["resource_path"]), **resource["resource_kwargs"]
    )
    try:
        np.testing.assert_array_equal(
            np.asarray(theirs(seq_id=2)), np.stack([det.expected_frame(i) for i in range(3, 6)])
        )
    finally:
        theirs.close()


# ------------------------------------------------------ every masking path


def test_live_masking_of_both_file_writing_eigers_equals_raw_times_mask(RE, reg, tmp_path):
    composite = _composite(reg)
    RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps", "hot"]}))
    # Resource/Datum (AD_EIGER2): no handler_registry given; the router knows Eiger files.
    ophyd_det = SimEiger(
        "eiger500K_single",
        mode="eiger",
        save_path=tmp_path / "v1",
        frames_per_trigger=4,
        frames_per_file=3,
    )
    derived = Collector()
    token = RE.subscribe(MaskingRouter(reg, derived, strict=True))
    RE(count([ophyd_det], num=2))
    RE.unsubscribe(token)
    assert derived.stop()["exit_status"] == "success"
    np.testing.assert_array_equal(
        np.concatenate(derived.frames(EIGER500K)), _expected(ophyd_det, composite, 8)
    )
    # StreamResource/StreamDatum, one resource per data file.
    async_det = _async_eiger(RE, tmp_path / "async", frames_per_file=2)
    derived = Collector()
    raw = Collector()
    RE.subscribe(raw)
    RE.subscribe(MaskingRouter(reg, derived, strict=True))
    RE(count([async_det], num=5))
    assert len([1 for name, _ in raw.docs if name == "stream_resource"]) == 3
    assert derived.stop()["exit_status"] == "success"
    got = np.stack([f.reshape(SHAPE_500K) for f in derived.frames(EIGER500K)])
    np.testing.assert_array_equal(got, _expected(async_det, composite, 5))


def test_stored_stream_resource_run_replays_processes_and_reads_lazily_as_raw_times_mask(
    RE, reg, tmp_path
):
    composite = _composite(reg)
    store = open_run_store(tmp_path / "runs", readable_storage=[tmp_path / "frames"])
    try:
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps", "hot"]}))
        det = _async_eiger(RE, tmp_path / "frames", frames_per_file=2)
        live = Collector()
        RE.subscribe(TiledWriter(store))
        RE.subscribe(MaskingRouter(reg, live, strict=True))
        (uid,) = RE(count([det], num=5))
        expected = _expected(det, composite, 5)

        replayed = Collector()
        replay_masked(store[uid], replayed, registry=reg)
        got = np.stack([f.reshape(SHAPE_500K) for f in replayed.frames(EIGER500K)])
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(
            np.stack([f.reshape(SHAPE_500K) for f in live.frames(EIGER500K)]), got
        )

        lazy = masked_frames(store[uid], EIGER500K, registry=reg, frames_per_chunk=2)
        np.testing.assert_array_equal(np.asarray(lazy.compute()).reshape(expected.shape), expected)

        product = process_run(
            uid, runs=store, processed=tmp_path / "processed", registry=reg, frames_per_chunk=2
        )
        dense = product.dense(tmp_path / "processed", EIGER500K)
        np.testing.assert_array_equal(dense.reshape(expected.shape), expected)
        assert product.masks[EIGER500K]["sha256"] == composite.sha256
    finally:
        store.context.close()


@pytest.mark.parametrize(("per_trigger", "per_file"), [(5, 2), (4, 4), (3, 100)])
def test_stored_ad_eiger2_run_replays_processes_and_reads_lazily_as_raw_times_mask(
    RE, reg, tmp_path, per_trigger, per_file
):
    # NSLS-II's ophyd Eiger (Resource/Datum, one series per trigger) stored through
    # EigerSeriesToStream: every reading path serves it, bit-identical to raw x mask.
    composite = _composite(reg)
    store = open_run_store(tmp_path / "runs", readable_storage=[tmp_path / "frames"])
    try:
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps", "hot"]}))
        det = SimEiger(
            "eiger500K_single",
            mode="eiger",
            save_path=tmp_path / "frames",
            frames_per_trigger=per_trigger,
            frames_per_file=per_file,
        )
        live = Collector()
        RE.subscribe(EigerSeriesToStream(TiledWriter(store)))
        RE.subscribe(MaskingRouter(reg, live, strict=True))
        (uid,) = RE(count([det], num=3))
        n = 3 * per_trigger
        expected = _expected(det, composite, n)
        np.testing.assert_array_equal(np.concatenate(live.frames(EIGER500K)), expected)

        run = store[uid]
        stored = run["primary"][EIGER500K]
        assert stored.shape == (3, per_trigger, *SHAPE_500K)  # events of one series each
        np.testing.assert_array_equal(
            stored.read().reshape(n, *SHAPE_500K),
            np.stack([det.expected_frame(i) for i in range(n)]),
        )
        assert run.metadata["start"]["masks"][EIGER500K]["sha256"] == composite.sha256

        replayed = Collector()
        replay_masked(run, replayed, registry=reg)
        assert replayed.stop()["exit_status"] == "success"
        np.testing.assert_array_equal(
            np.concatenate([f.reshape(-1, *SHAPE_500K) for f in replayed.frames(EIGER500K)]),
            expected,
        )

        lazy = masked_frames(run, EIGER500K, registry=reg, frames_per_chunk=2)
        np.testing.assert_array_equal(np.asarray(lazy.compute()).reshape(expected.shape), expected)

        # Processing in this process reads the data files themselves, in series order.
        (planned,) = plan_processing(uid, runs=store, registry=reg).detectors
        names = [Path(path).name.split("_", 3)[-1] for path, _, _ in planned.files]
        assert names == [
            f"{seq}_data_{k:06d}.h5"
            for seq in (1, 2, 3)
            for k in range(1, -(-per_trigger // per_file) + 1)
        ]
        assert sum(count for *_, count in planned.files) == n
        product = process_run(
            uid, runs=store, processed=tmp_path / "processed", registry=reg, frames_per_chunk=2
        )
        dense = product.dense(tmp_path / "processed", EIGER500K)
        np.testing.assert_array_equal(dense.reshape(expected.shape), expected)
        assert product.masks[EIGER500K]["sha256"] == composite.sha256
        with h5py.File(product_file(tmp_path / "processed", uid), "r") as f:
            assert f[DATA_PATH].shape == (n, *SHAPE_500K)  # frames, one chunk each
            assert f[DATA_PATH].chunks == (1, *SHAPE_500K)
    finally:
        store.context.close()


def product_file(processed, uid):
    (path,) = Path(processed, "data", "products", uid).rglob("*.h5")
    return path


def test_eiger_series_documents_become_one_stream_resource_per_data_file(RE, tmp_path):
    det = SimEiger(
        "eiger500K_single",
        mode="eiger",
        save_path=tmp_path,
        frames_per_trigger=5,
        frames_per_file=2,
    )
    out = Collector()
    RE.subscribe(EigerSeriesToStream(out))
    RE(count([det], num=2))
    names = [name for name, _ in out.docs]
    assert "resource" not in names and "datum" not in names
    assert names.count("stream_resource") == 6  # 3 data files per series
    (descriptor,) = [doc for name, doc in out.docs if name == "descriptor"]
    assert descriptor["data_keys"][EIGER500K]["external"] == "STREAM:"
    assert all(EIGER500K not in doc["data"] for name, doc in out.docs if name == "event")
    files = [
        Path(doc["uri"].removeprefix("file://"))
        for name, doc in out.docs
        if name == "stream_resource"
    ]
    assert all(path.exists() for path in files)
    assert [path.name.rsplit("_", 3)[1:] for path in files[:3]] == [
        ["1", "data", "000001.h5"],
        ["1", "data", "000002.h5"],
        ["1", "data", "000003.h5"],
    ]
    ranges = [
        (doc["indices"]["start"], doc["indices"]["stop"])
        for name, doc in out.docs
        if name == "stream_datum"
    ]
    assert ranges == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 2)]
    # Any other detector's documents pass through unchanged.
    other = Collector()
    files_det = SimEiger("eiger500K_single", mode="files", save_path=tmp_path / "npy")
    RE.subscribe(EigerSeriesToStream(other))
    RE(count([files_det], num=2))
    assert [name for name, _ in other.docs].count("datum") == 2


def test_ad_eiger2_documents_replay_as_they_were_masked_live(RE, reg, tmp_path):
    composite = _composite(reg)
    RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps", "hot"]}))
    det = SimEiger(
        "eiger500K_single",
        mode="eiger",
        save_path=tmp_path,
        frames_per_trigger=5,
        frames_per_file=2,
    )
    raw = Collector()
    RE.subscribe(raw)
    RE(count([det], num=1))
    replayed = Collector()
    replay_masked(raw.docs, replayed, registry=reg)
    np.testing.assert_array_equal(
        np.concatenate(replayed.frames(EIGER500K)), _expected(det, composite, 5)
    )


def test_a_changed_recorded_composite_is_refused_on_every_path(RE, reg, tmp_path):
    store = open_run_store(tmp_path / "runs", readable_storage=[tmp_path / "frames"])
    try:
        det = _async_eiger(RE, tmp_path / "frames", frames_per_file=2)
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps", "hot"]}))

        def tamper(name, doc):  # a start whose recorded sha256 does not match its uids
            if name == "start":
                doc = {
                    **doc,
                    "masks": {k: {**r, "sha256": "0" * 64} for k, r in doc["masks"].items()},
                }
            return doc

        writer = TiledWriter(store)
        RE.subscribe(lambda name, doc: writer(name, tamper(name, doc)))
        (uid,) = RE(count([det], num=2))
        run = store[uid]
        with pytest.raises(MaskIntegrityError, match="recorded sha256"):
            masked_frames(run, EIGER500K, registry=reg)
        with pytest.raises(MaskIntegrityError, match="recorded sha256"):
            process_run(uid, runs=store, processed=tmp_path / "processed", registry=reg)
        derived = Collector()
        replay_masked(run, derived, registry=reg, strict=False)
        assert derived.stop()["exit_status"] == "fail"
        assert derived.frames(EIGER500K) == []
        assert "recorded sha256" in json.dumps(derived.stop()["masking_errors"])
    finally:
        store.context.close()


def test_tiled_reader_maps_per_file_indices_onto_the_concatenated_array():
    rows = np.arange(10)
    reader = TiledStreamReader(lambda stream, key: rows)
    first = {"uid": "a", "data_key": "k"}
    second = {"uid": "b", "data_key": "k"}
    assert reader(first, "primary", 0, 2).tolist() == [0, 1]
    assert reader(first, "primary", 2, 4).tolist() == [2, 3]
    assert reader(second, "primary", 0, 3).tolist() == [4, 5, 6]
    assert reader(first, "primary", 1, 2).tolist() == [1]  # a resource keeps its offset


# ------------------------------------------------------------ fresh process


def test_a_fresh_process_that_imports_only_the_project_reads_every_eiger_file(RE, tmp_path):
    det = SimEiger(
        "eiger500K_single",
        mode="eiger",
        save_path=tmp_path / "frames",
        frames_per_trigger=3,
        frames_per_file=2,
    )
    with MaskRegistry.embedded(tmp_path / "reg") as reg:
        reg.register_mask(EIGER500K, "pixel_mask", det.pattern.pixel_mask == 0)
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["pixel_mask"]}))
        docs = Collector()
        RE.subscribe(docs)
        RE(count([det], num=1))
    (tmp_path / "docs.json").write_text(json.dumps(docs.docs))
    np.save(tmp_path / "expected.npy", np.stack([det.expected_frame(i) for i in range(3)]))
    (master,) = (tmp_path / "frames").glob("*_master.h5")
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        from chx_masks import MaskRegistry, io
        from bluesky_callbacks import MaskingRouter
        d, master = sys.argv[1], sys.argv[2]
        mask, _ = io.read_mask(master)  # the master's compressed pixel_mask
        out = []
        with MaskRegistry.embedded(d + "/reg") as reg:
            router = MaskingRouter(reg, lambda name, doc: out.append((name, doc)),
                                   strict=True)
            for name, doc in json.load(open(d + "/docs.json")):
                router(name, doc)  # the data files, through the AD_EIGER2 reader
        frames = [np.asarray(f) for name, doc in out if name == "event_page"
                  for f in doc["data"]["eiger500K_single_image"]]
        expected = np.load(d + "/expected.npy") * mask.astype(np.uint32)
        print(int((~mask).sum()), np.array_equal(np.concatenate(frames), expected))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(master)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    flagged, same = proc.stdout.split()
    assert int(flagged) == int(det.pattern.flagged.sum()) > 0
    assert same == "True"


def test_bad_eiger_options_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="frames_per_trigger and frames_per_file must be"):
        SimEiger("eiger500K_single", mode="eiger", frames_per_file=0)
    with pytest.raises(ValueError, match="frames_per_file must be at least 1"):
        SimAsyncEiger("eiger500K_single", tmp_path, frames_per_file=0)
    with pytest.raises(ValueError, match="mean and tau must be positive"):
        XPCSPattern(SHAPE_500K, mean=0)
    with pytest.raises(ValueError, match="unsigned integers"):
        XPCSPattern(SHAPE_500K, dtype=np.float32)
    with SeriesWriter(tmp_path, "s", SHAPE_500K, np.uint32) as series:
        pass
    with pytest.raises(RuntimeError, match="is closed; open a new SeriesWriter"):
        series.write(np.zeros(SHAPE_500K, np.uint32))


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_frames_decoded_on_threads_leave_in_order_equal_and_unchanged(
    RE, reg, tmp_path, monkeypatch, threads
):
    """Raw chunks read in order, decoded and masked on 1, 2 or 3 threads, pages in order."""
    monkeypatch.setenv("CHX_MASKS_DECODE_THREADS", threads)
    composite = _composite(reg)
    RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps", "hot"]}))
    det = _async_eiger(RE, tmp_path / "frames", frames_per_file=4)
    derived = Collector()
    RE.subscribe(MaskingRouter(reg, derived, strict=True))
    RE(count([det], num=11))
    pages = [doc for name, doc in derived.docs if name == "event_page"]
    assert [n for page in pages for n in page["seq_num"]] == list(range(1, 12))
    names = derived.names()
    assert names[0] == "start" and names[1] == "descriptor" and names[-1] == "stop"
    # Every frame kept by the downstream is still what it was when it left.
    got = np.stack([f.reshape(SHAPE_500K) for f in derived.frames(EIGER500K)])
    np.testing.assert_array_equal(got, _expected(det, composite, 11))
    assert derived.stop()["num_events"] == {"primary": 11}


def test_frames_of_other_layouts_are_read_through_h5py(RE, reg, tmp_path, monkeypatch):
    """Not one bitshuffle-LZ4 chunk per frame (here: uncompressed): read as before."""
    from bluesky_callbacks._eiger import decodable

    composite = _composite(reg)
    RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps", "hot"]}))
    det = _async_eiger(RE, tmp_path / "frames", frames_per_file=10)
    raw = Collector()
    RE.subscribe(raw)
    RE(count([det], num=3))
    (resource,) = [doc for name, doc in raw.docs if name == "stream_resource"]
    path = Path(resource["uri"].removeprefix("file://localhost"))
    with h5py.File(path, "r") as f:
        frames = f[DATA_PATH][()]
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset(DATA_PATH, data=frames, chunks=(1, *SHAPE_500K))
        assert not decodable(f[DATA_PATH])
    derived = Collector()
    replay_masked(raw.docs, derived, registry=reg)
    got = np.stack([f.reshape(SHAPE_500K) for f in derived.frames(EIGER500K)])
    np.testing.assert_array_equal(got, _expected(det, composite, 3))
