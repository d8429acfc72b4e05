"""Masked frames of stored runs in a process where databroker's v1 API has been used.

Looking at a run through databroker v1 (``Broker(catalog)[-1]``, a
``Header``) or ``catalog.v2`` switches *every* tiled client of the process to
the v2 run layout (``run["primary"]["data"][key]``): bluesky-tiled-plugins
sets the ``BlueskyRun`` client on a shallow copy of the structure clients that
all clients share. The switch cannot be undone through any public interface,
so each scenario runs in a fresh Python process (this file run as a script);
the test process then checks its output against the raw frames read back in
the default layout, times the composite mask, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bluesky_callbacks import open_run_store
from bluesky_callbacks._replay import _stream_node
from chx_masks import MaskRegistry

pytestmark = pytest.mark.slow

DET = "eiger500K_single_image"
SHAPE = (514, 1030)
FRAMES = 3
NAMES = ["gaps", "beamstop"]


def _masks() -> dict[str, np.ndarray]:
    gaps = np.ones(SHAPE, bool)
    gaps[255:260, :] = False
    gaps[:, 513:518] = False
    stop = np.ones(SHAPE, bool)
    stop[200:320, 400:600] = False
    return {"gaps": gaps, "beamstop": stop}


def _scenario(kind: str, root: Path) -> None:
    """In a fresh process: databroker v1 first, then a scan stored by TiledWriter.

    Writes ``result.json`` (the run, the layout seen, whether the v3 path
    failed) and ``frames.npz`` (``masked_frames`` and ``replay_masked``).
    """
    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter
    from databroker.v1 import Broker

    from bluesky_callbacks import MaskProvenance, masked_frames, replay_masked
    from bluesky_callbacks.sim import SimAsyncEiger, sim_eiger500k

    registry = MaskRegistry.embedded(root / "registry")
    store = open_run_store(root / "runs", readable_storage=[root / "frames"])
    db = Broker(store)  # as a beamline profile does, before any scan
    RE = RunEngine({})
    RE.subscribe(TiledWriter(store))
    RE(count([sim_eiger500k()], num=1))
    db[-1]  # looking at the last scan the v1 way: from here on, every client is v2

    if kind == "hdf5":
        from ophyd_async.plan_stubs import ensure_connected

        det = SimAsyncEiger("eiger500K_single", root / "frames")
        RE(ensure_connected(det))
    else:
        det = sim_eiger500k()
    RE.preprocessors.append(MaskProvenance(registry, masks={DET: NAMES}))
    (uid,) = RE(count([det], num=FRAMES))
    RE.loop.call_soon_threadsafe(RE.loop.stop)
    RE._th.join(timeout=5)

    fresh = open_run_store(root / "runs", readable_storage=[root / "frames"])
    run = fresh[uid]
    try:
        run["primary"][DET]
        v3_path_fails = False
    except KeyError:
        v3_path_fails = True
    lazy = masked_frames(run, DET, registry=registry).compute()
    replayed: list[np.ndarray] = []

    def keep(name: str, doc: dict) -> None:
        if name == "event":
            replayed.append(np.asarray(doc["data"][DET]))
        elif name == "event_page":
            replayed.extend(np.asarray(f) for f in doc["data"][DET])

    replay_masked(run, keep, registry=registry)
    np.savez(root / "frames.npz", lazy=lazy, replayed=np.stack(replayed))
    (root / "result.json").write_text(
        json.dumps({"uid": uid, "layout": type(run).__name__, "v3_path_fails": v3_path_fails})
    )
    for client in (fresh, store):
        client.context.close()
    registry.close()


def _run_scenario(kind: str, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    registry = MaskRegistry.embedded(root / "registry")
    for name, mask in _masks().items():
        registry.register_mask(DET, name, mask)
    registry.close()
    proc = subprocess.run(
        [sys.executable, __file__, kind, str(root)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((root / "result.json").read_text())
    with np.load(root / "frames.npz") as npz:
        return result, {k: npz[k] for k in npz.files}


def _raw_times_mask(root: Path, uid: str) -> np.ndarray:
    """Raw frames read back in this process's own (v3) layout, times the recorded composite."""
    store = open_run_store(root / "runs", readable_storage=[root / "frames"])
    registry = MaskRegistry.embedded(root / "registry")
    try:
        run = store[uid]
        raw = run["primary"][DET].read()
        uids = run.metadata["start"]["masks"][DET]["uids"]
        composite = registry.composite_from_uids(uids)
        assert composite.uids == registry.resolve_composite(DET, NAMES).uids
        assert not composite.mask.all()
        return raw * composite.mask.astype(raw.dtype)
    finally:
        store.context.close()
        registry.close()


@pytest.mark.parametrize("kind", ["inline", "hdf5"])
def test_masked_frames_and_replay_after_databroker_v1(kind, tmp_path):
    result, got = _run_scenario(kind, tmp_path)
    # The scenario really ran under the v2 layout: the plain v3 path failed there.
    assert result["layout"] == "BlueskyRunV2SQL"
    assert result["v3_path_fails"] is True

    expected = _raw_times_mask(tmp_path, result["uid"])
    frame_shape = (1, *SHAPE) if kind == "hdf5" else SHAPE  # ophyd-async: frames per event
    assert expected.shape == (FRAMES, *frame_shape) and expected.dtype == np.uint32
    assert np.count_nonzero(expected) > 0
    for name in ("lazy", "replayed"):
        assert got[name].dtype == expected.dtype, name
        assert np.array_equal(got[name], expected), name


def test_a_missing_data_key_says_which_and_where(tmp_path):
    from bluesky_tiled_plugins import TiledWriter
    from event_model import compose_run

    store = open_run_store(tmp_path / "runs")
    try:
        bundle = compose_run()
        writer = TiledWriter(store)
        writer("start", bundle.start_doc)
        desc = bundle.compose_descriptor(
            name="primary", data_keys={"x": {"source": "sim", "dtype": "number", "shape": []}}
        )
        writer("descriptor", desc.descriptor_doc)
        writer("event", desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}))
        writer("stop", bundle.compose_stop())
        run = store[bundle.start_doc["uid"]]
        assert float(np.asarray(_stream_node(run, "primary", "x")[0])) == 1.0
        with pytest.raises(
            KeyError, match=f"{bundle.start_doc['uid']} has no 'y' in its 'primary' stream"
        ):
            _stream_node(run, "primary", "y")
    finally:
        store.context.close()


if __name__ == "__main__":
    _scenario(sys.argv[1], Path(sys.argv[2]))
