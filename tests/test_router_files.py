"""Live derived runs that carry masked frames as files, stored by TiledWriter as references.

A real RunEngine scans simulated Eigers (ophyd-async, DECTRIS files; and
ophyd with inline frames) with MaskProvenance; a MaskingRouter with
``frames="files"`` feeds a TiledWriter. The derived run in tiled holds no
inline frames, reads back as raw x mask bit for bit, and replays.
"""

from __future__ import annotations

import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter

from bluesky_callbacks import (
    MaskingRouter,
    MaskProvenance,
    masked_frames,
    open_run_store,
    replay_masked,
)
from bluesky_callbacks._eiger import XPCSPattern
from bluesky_callbacks._sim_async import SimAsyncEiger
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskRegistry

pytestmark = pytest.mark.slow

DET = "eiger500K_single_image"
SHAPE = (514, 1030)


@pytest.fixture
def site(tmp_path, RE):
    registry = MaskRegistry.embedded(tmp_path / "registry")
    mask = np.ones(SHAPE, bool)
    mask[200:260, :] = False
    mask[:, 500:520] = False
    registry.register_mask(DET, "stop", mask)
    derived_dir = tmp_path / "derived-frames"
    store = open_run_store(tmp_path / "runs", readable_storage=[tmp_path / "frames", derived_dir])
    RE.preprocessors.append(MaskProvenance(registry, masks={DET: ["stop"]}, active=False))
    RE.subscribe(TiledWriter(store))
    docs: list[tuple[str, dict]] = []
    router = MaskingRouter(
        registry,
        [TiledWriter(store), lambda n, d: docs.append((n, d))],
        frames="files",
        directory=derived_dir,
        strict=True,
    )
    RE.subscribe(router)
    yield {
        "registry": registry,
        "mask": mask,
        "store": store,
        "docs": docs,
        "derived_dir": derived_dir,
        "RE": RE,
        "tmp": tmp_path,
    }
    store.context.close()
    registry.close()


def derived_run(docs: list[tuple[str, dict]]) -> tuple[dict, list[tuple[str, dict]]]:
    (start,) = [d for n, d in docs if n == "start"]
    return start, docs


def check(site: dict, raw_uid: str, frames: int) -> str:
    start, docs = derived_run(site["docs"])
    assert start["parent_uid"] == raw_uid
    names = [n for n, _ in docs]
    assert names.count("stream_resource") == 1 and names.count("stream_datum") >= 1
    # No frame travels inline: the event pages carry no detector field.
    for name, doc in docs:
        if name == "event_page":
            assert DET not in doc["data"]
        if name == "descriptor":
            assert doc["data_keys"][DET]["external"] == "STREAM:"
    (resource,) = [d for n, d in docs if n == "stream_resource"]
    assert resource["uri"].startswith("file://localhost" + str(site["derived_dir"]))
    (stop,) = [d for n, d in docs if n == "stop"]
    assert stop["exit_status"] == "success", stop

    store = site["store"]
    raw = np.asarray(store[raw_uid]["primary"][DET].read())
    expected = raw * site["mask"].astype(raw.dtype)
    derived = store[start["uid"]]
    assert derived.metadata["start"]["masks"] == store[raw_uid].metadata["start"]["masks"]
    stored = np.asarray(derived["primary"][DET].read())
    assert stored.shape[0] == frames
    np.testing.assert_array_equal(stored, expected)
    return start["uid"]


def test_ophyd_async_eiger_scan_stores_masked_frames_as_files(site):
    det = SimAsyncEiger(
        "eiger500K_single",
        site["tmp"] / "frames",
        pattern=XPCSPattern(SHAPE, mean=0.05),
        frames_per_file=4,
    )
    from ophyd_async.plan_stubs import ensure_connected

    site["RE"](ensure_connected(det))
    (raw_uid,) = site["RE"](count([det], num=6))
    derived_uid = check(site, raw_uid, 6)

    # The derived run replays: lazily, and through the router again.
    store, registry = site["store"], site["registry"]
    lazy = masked_frames(store[derived_uid], DET, registry=registry).compute()
    np.testing.assert_array_equal(lazy, np.asarray(store[derived_uid]["primary"][DET].read()))
    replayed: list[tuple[str, dict]] = []
    replay_masked(store[derived_uid], lambda n, d: replayed.append((n, d)), registry=registry)
    frames = [f for n, d in replayed if n == "event_page" for f in d["data"].get(DET, [])]
    np.testing.assert_array_equal(np.asarray(frames).reshape(lazy.shape), lazy)


def test_inline_frames_are_written_to_files_too(site):
    (raw_uid,) = site["RE"](count([sim_eiger500k()], num=3))
    check(site, raw_uid, 3)


def test_files_need_a_directory(tmp_path):
    with (
        MaskRegistry.embedded(tmp_path / "r") as registry,
        pytest.raises(ValueError, match="frames='files' needs directory="),
    ):
        MaskingRouter(registry, [], frames="files")
