"""The simulated CHX Eigers under a real RunEngine: inline, files (Resource/Datum), HDF5."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky.plans import count
from event_model import DocumentNames, Filler, schema_validators

from bluesky_callbacks import sim
from bluesky_callbacks.sim import (
    EigerPattern,
    SimEiger,
    handler_registry,
    sim_eiger1m,
    sim_eiger4m,
    sim_eiger500k,
)

KEY_500K = "eiger500K_single_image"
SHAPE_500K = [514, 1030]


def run(RE, plan, on_doc=None) -> list[tuple[str, dict]]:
    """Run ``plan``; return every document emitted, in order, each checked against its schema."""
    docs: list[tuple[str, dict]] = []

    def collect(name, doc):
        docs.append((name, doc))
        if on_doc is not None:
            on_doc(name, doc)

    token = RE.subscribe(collect)
    try:
        RE(plan)
    finally:
        RE.unsubscribe(token)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    return docs


def only(docs, name) -> dict:
    (doc,) = [d for n, d in docs if n == name]
    return doc


def of(docs, name) -> list[dict]:
    return [d for n, d in docs if n == name]


def assert_distinct(frames) -> None:
    digests = {hashlib.sha256(np.ascontiguousarray(f).tobytes()).hexdigest() for f in frames}
    assert len(digests) == len(frames)


def h5_path(uri: str) -> str:
    parsed = urllib.parse.urlparse(uri)
    assert parsed.scheme == "file"
    return urllib.parse.unquote(parsed.path)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16])
def test_inline_events_carry_the_expected_frames(RE, dtype):
    det = sim_eiger500k(dtype=dtype)
    docs = run(RE, count([det], num=3))

    key = only(docs, "descriptor")["data_keys"][KEY_500K]
    assert key["shape"] == SHAPE_500K
    assert key["dtype"] == "array"
    assert key["dtype_numpy"] == np.dtype(dtype).str
    assert "external" not in key
    assert not of(docs, "resource") and not of(docs, "stream_resource")

    events = of(docs, "event")
    assert [e["seq_num"] for e in events] == [1, 2, 3]
    frames = [e["data"][KEY_500K] for e in events]
    for i, frame in enumerate(frames):
        assert frame.dtype == dtype
        assert frame.shape == tuple(SHAPE_500K)
        np.testing.assert_array_equal(frame, det.expected_frame(i))
    assert_distinct(frames)


def test_eiger4m_shape_and_data_key(RE):
    det = sim_eiger4m()
    docs = run(RE, count([det], num=1))
    key = only(docs, "descriptor")["data_keys"]["eiger4m_single_image"]
    assert key["shape"] == [2167, 2070]
    assert key["dtype_numpy"] == "<u4"
    frame = only(docs, "event")["data"]["eiger4m_single_image"]
    assert frame.shape == (2167, 2070)
    assert frame.dtype == np.uint32


def test_files_mode_is_filled_by_handler_registry(RE, tmp_path):
    det = sim_eiger500k(mode="files", save_path=tmp_path)
    docs = run(RE, count([det], num=3))

    key = only(docs, "descriptor")["data_keys"][KEY_500K]
    assert key["external"] == "FILESTORE:"
    assert key["shape"] == SHAPE_500K
    assert key["dtype_numpy"] == "<u4"
    resource = only(docs, "resource")
    assert resource["spec"] == "NPY_SEQ"
    assert resource["spec"] in handler_registry
    assert Path(resource["root"]) == tmp_path
    assert resource["run_start"] == only(docs, "start")["uid"]
    datums = of(docs, "datum")
    assert [d["datum_kwargs"] for d in datums] == [{"index": i} for i in range(3)]
    assert len(list(tmp_path.glob(f"{resource['resource_path']}_*.npy"))) == 3

    events = of(docs, "event")
    assert [e["data"][KEY_500K] for e in events] == [d["datum_id"] for d in datums]
    assert all(e["filled"] == {KEY_500K: False} for e in events)

    filled = []
    with Filler(handler_registry, inplace=False) as filler:
        for name, doc in docs:
            name, doc = filler(name, doc)
            if name == "event":
                filled.append(doc)
    frames = [e["data"][KEY_500K] for e in filled]
    for i, frame in enumerate(frames):
        assert frame.dtype == np.uint32
        np.testing.assert_array_equal(frame, det.expected_frame(i))
    assert_distinct(frames)


def test_each_run_restarts_at_frame_zero_with_a_new_resource(RE, tmp_path):
    det = sim_eiger500k(mode="files", save_path=tmp_path)
    first = run(RE, count([det], num=2))
    second = run(RE, count([det], num=1))
    assert only(first, "resource")["uid"] != only(second, "resource")["uid"]
    assert only(second, "datum")["datum_kwargs"] == {"index": 0}


def test_shapes_come_from_the_name_or_must_be_given():
    assert sim_eiger1m().describe()["eiger1m_single_image"]["shape"] == [1065, 1030]
    with pytest.raises(ValueError, match="shape=") as excinfo:
        SimEiger("pilatus_single")
    assert "eiger4m_single" in str(excinfo.value)
    det = SimEiger("pilatus_single", shape=(12, 34))
    assert det.describe()["pilatus_single_image"]["shape"] == [12, 34]
    assert det.expected_frame(0).shape == (12, 34)


def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="mode must be 'inline', 'files' or 'eiger'"):
        sim_eiger500k(mode="hdf5")
    with pytest.raises(ValueError, match="np.uint32"):
        sim_eiger500k(dtype=np.float32)


def test_pattern_flags_module_gaps_and_hot_pixels_at_dtype_max():
    pattern = EigerPattern((1065, 1030), np.uint16, seed=3)
    bad = pattern.bad_pixels
    # 1M: two 514-row modules with a 37-row gap between them.
    assert bad[514:551].all()
    assert not bad[513].all() and not bad[551].all()
    assert 0 < bad[:514].sum() < 20  # a few hot pixels, not a gap
    frame = pattern.frame(5)
    assert (frame[bad] == np.iinfo(np.uint16).max).all()
    np.testing.assert_array_equal(frame[~bad], pattern.frame(0)[~bad] + 5)
    np.testing.assert_array_equal(frame, EigerPattern((1065, 1030), np.uint16, seed=3).frame(5))
    assert not np.array_equal(frame, EigerPattern((1065, 1030), np.uint16, seed=4).frame(5))


# A consumer in another process, as a real analysis pipeline would be.
_READER = textwrap.dedent(
    """
    import hashlib, sys
    from chx_masks._hdf5 import h5py_with_filters  # the data files are bitshuffle-LZ4
    h5py = h5py_with_filters()
    path, dataset, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with h5py.File(path, "r", swmr=True) as f:
        frames = f[dataset][start:stop]
        print(f[dataset].shape[0], hashlib.sha256(frames.tobytes()).hexdigest())
    """
)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16])
def test_async_eiger_writes_hdf5_announced_by_stream_documents(RE, tmp_path, dtype):
    from ophyd_async.plan_stubs import ensure_connected

    det = sim.SimAsyncEiger("eiger500K_single", tmp_path, dtype=dtype)
    RE(ensure_connected(det))
    docs = run(RE, count([det], num=3))

    key = only(docs, "descriptor")["data_keys"][KEY_500K]
    assert key["external"] == "STREAM:"
    assert key["shape"] == [1, *SHAPE_500K]  # ophyd-async: frames per event first
    assert key["dtype_numpy"] == np.dtype(dtype).str
    resource = only(docs, "stream_resource")
    assert resource["data_key"] == KEY_500K
    assert resource["mimetype"] == "application/x-hdf5"
    assert resource["parameters"]["dataset"] == "/entry/data/data"
    path = h5_path(resource["uri"])
    assert Path(path).parent == tmp_path
    datums = of(docs, "stream_datum")
    assert all(d["stream_resource"] == resource["uid"] for d in datums)
    assert [d["indices"] for d in datums] == [{"start": i, "stop": i + 1} for i in range(3)]
    assert len(of(docs, "event")) == 3

    with h5py.File(path, "r") as f:
        data = f[resource["parameters"]["dataset"]]
        assert data.shape == (3, *SHAPE_500K)
        assert data.dtype == dtype
        frames = [data[d["indices"]["start"] : d["indices"]["stop"]] for d in datums]
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, det.expected_frame(i)[np.newaxis])
    assert_distinct(frames)


def test_async_frames_are_readable_while_the_run_is_writing(RE, tmp_path):
    from ophyd_async.plan_stubs import ensure_connected

    det = sim.SimAsyncEiger("eiger500K_single", tmp_path)
    RE(ensure_connected(det))
    resources: dict[str, dict] = {}
    live: dict[str, h5py.Dataset] = {}
    seen: list[tuple[int, int, str, bool]] = []

    def read_on_stream_datum(name, doc):
        if name == "stream_resource":
            resources[doc["uid"]] = doc
            # A live callback in this process keeps the file open and refreshes it.
            handle = h5py.File(h5_path(doc["uri"]), "r", swmr=True, libver="latest")
            live[doc["uid"]] = handle[doc["parameters"]["dataset"]]
        elif name == "stream_datum":
            resource = resources[doc["stream_resource"]]
            path, dataset = h5_path(resource["uri"]), resource["parameters"]["dataset"]
            start, stop = doc["indices"]["start"], doc["indices"]["stop"]
            out = subprocess.run(
                [sys.executable, "-c", _READER, path, dataset, str(start), str(stop)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            cached = live[doc["stream_resource"]]
            cached.refresh()
            same = np.array_equal(cached[start:stop], det.expected_frame(start)[None])
            seen.append((stop, int(out[0]), out[1], same))

    try:
        run(RE, count([det], num=3), on_doc=read_on_stream_datum)
    finally:
        for dataset in live.values():
            dataset.file.close()
    assert len(seen) == 3
    for i, (stop, rows_seen, digest, same) in enumerate(seen):
        # The other process saw exactly the frames written so far: the file was mid-run.
        assert rows_seen == stop == i + 1
        assert digest == hashlib.sha256(det.expected_frame(i)[None].tobytes()).hexdigest()
        assert same


def test_public_names_and_lazy_ophyd_async():
    assert set(sim.__all__) == {
        "CHX_EIGER_SHAPES",
        "EigerPattern",
        "SimAsyncEiger",
        "SimEiger",
        "XPCSPattern",
        "handler_registry",
        "sim_eiger1m",
        "sim_eiger4m",
        "sim_eiger500k",
    }
    for name in sim.__all__:
        assert getattr(sim, name) is not None
    assert dict(sim.CHX_EIGER_SHAPES) == {
        "eiger4m_single": (2167, 2070),
        "eiger1m_single": (1065, 1030),
        "eiger500K_single": (514, 1030),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, bluesky_callbacks.sim; print('ophyd_async' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
