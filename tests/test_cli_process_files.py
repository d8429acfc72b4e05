"""``chx-masks process`` on runs whose frames are detector files outside the run store.

A real RunEngine records a simulated ophyd-async Eiger (HDF5 files announced
by StreamResource documents) into a local run store with TiledWriter; the
files are written once far from the store and once beside it. The command
must refuse files it may not read in one line that names
``--readable-storage``, read them once given it (or by default when they lie
beside the store), and store products equal to raw x composite bit for bit.
Every other expected failure is one ``chx-masks:`` line with status 1 too.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter
from click.testing import CliRunner
from helpers import dense

from bluesky_callbacks import MaskProvenance, open_run_store
from bluesky_callbacks._process import RunStore
from chx_masks import MaskRegistry
from chx_masks._cli import main

pytestmark = pytest.mark.slow

DET = "eiger500K_single_image"
SHAPE = (514, 1030)
FRAMES = 3


def _mask(rows: slice, cols: slice) -> np.ndarray:
    mask = np.ones(SHAPE, bool)
    mask[rows, cols] = False
    return mask


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A registry; a run store in ``site/runs``; HDF5 runs far from it and beside it.

    ``far``: frames in ``elsewhere/frames`` (not under the store's parent).
    ``beside``: frames in ``site/frames`` (under the store's parent).
    ``unmasked``: a run that recorded no masks.
    """
    from bluesky import RunEngine
    from ophyd_async.plan_stubs import ensure_connected

    from bluesky_callbacks.sim import SimAsyncEiger

    root = tmp_path_factory.mktemp("files")
    far_frames, beside_frames = root / "elsewhere" / "frames", root / "site" / "frames"
    registry = MaskRegistry.embedded(root / "registry")
    registry.register_mask(DET, "gaps", _mask(slice(250, 262), slice(None)))
    registry.register_mask(DET, "beamstop", _mask(slice(180, 330), slice(450, 600)))
    runs = root / "site" / "runs"
    # The writing side may read both places (as the beamline's server would).
    store = open_run_store(runs, readable_storage=[far_frames, beside_frames])
    engine = RunEngine({})
    engine.subscribe(TiledWriter(store))
    uids = {}
    for name, where in (("unmasked", far_frames), ("far", far_frames), ("beside", beside_frames)):
        if name == "far":
            engine.preprocessors.append(MaskProvenance(registry, masks={DET: ["gaps", "beamstop"]}))
        det = SimAsyncEiger("eiger500K_single", where)
        engine(ensure_connected(det))
        (uids[name],) = engine(count([det], num=FRAMES))
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()
    registry.close()
    yield {
        "root": root,
        "registry": root / "registry",
        "runs": runs,
        "store": store,
        "far_frames": far_frames,
        **uids,
    }
    store.context.close()


def _process(site: dict, uid: str, processed: Path, *extra: str):
    args = [
        "--dir",
        str(site["registry"]),
        "process",
        uid,
        "--runs",
        str(site["runs"]),
        "--processed",
        str(processed),
        *extra,
    ]
    return CliRunner().invoke(main, args)


def _one_line_failure(result) -> str:
    """The failure's one stderr line (asserting that there is exactly one and no more)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chx-masks: ") and "Traceback" not in result.output
    return lines[0]


def _raw_times_mask(site: dict, uid: str) -> np.ndarray:
    run = site["store"][uid]
    raw = run["primary"][DET].read()
    with MaskRegistry.embedded(site["registry"]) as registry:
        composite = registry.composite_from_uids(run.metadata["start"]["masks"][DET]["uids"])
    assert not composite.mask.all()
    return raw * composite.mask.astype(raw.dtype)


def _product(processed: Path, uid: str) -> np.ndarray:
    return dense(RunStore(str(processed)).open(runs=False)[uid][DET])


def test_files_outside_are_refused_in_one_line_then_read_with_readable_storage(site, tmp_path):
    processed = tmp_path / "processed"
    refused = _one_line_failure(_process(site, site["far"], processed))
    frames = str(site["far_frames"])
    assert f"refers to {frames}/" in refused and ".h5" in refused
    assert "pass --readable-storage DIR" in refused
    assert f"--readable-storage {frames})" in refused
    assert str(site["runs"].parent) in refused  # what it may read now
    # Refused before a product was begun, so the next try starts clean.
    assert site["far"] not in list(RunStore(str(processed)).open(runs=False))

    done = _process(site, site["far"], processed, "--readable-storage", frames, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["parent_uid"] == site["far"] and report["created"] is True
    assert report["frames"] == {DET: FRAMES}
    expected = _raw_times_mask(site, site["far"])
    assert expected.shape == (FRAMES, 1, *SHAPE)  # ophyd-async: frames per event first
    product = _product(processed, site["far"])
    assert product.dtype == expected.dtype == np.uint32
    assert np.array_equal(product, expected)
    assert report["nonzero"] == {DET: int(np.count_nonzero(expected))}


def test_readable_storage_replaces_the_default(site, tmp_path):
    # The files beside the store are not under a directory given instead.
    elsewhere = tmp_path / "unrelated"
    elsewhere.mkdir()
    line = _one_line_failure(
        _process(
            site,
            site["beside"],
            tmp_path / "processed",
            "--masks",
            f"{DET}=gaps",
            "--readable-storage",
            str(elsewhere),
        )
    )
    assert f"({elsewhere})" in line and "--readable-storage" in line


def test_files_beside_the_run_store_are_read_by_default(site, tmp_path):
    processed = tmp_path / "processed"
    result = _process(site, site["beside"], processed, "--masks", f"{DET}=gaps,beamstop")
    assert result.exit_code == 0, result.output
    assert "processed: product" in result.stdout
    run = site["store"][site["beside"]]
    raw = run["primary"][DET].read()
    with MaskRegistry.embedded(site["registry"]) as registry:
        composite = registry.resolve_composite(
            DET, ["gaps", "beamstop"], as_of=run.metadata["start"]["time"]
        )
    assert np.array_equal(
        _product(processed, site["beside"]), raw * composite.mask.astype(raw.dtype)
    )


def test_readable_storage_with_a_tiled_server_is_a_usage_error(site, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "--dir",
            str(site["registry"]),
            "process",
            site["far"],
            "--runs",
            "http://127.0.0.1:9/api/v1/runs",
            "--readable-storage",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--readable-storage is for a local run store" in result.stderr
    assert "readable_storage" in result.stderr and "Traceback" not in result.output


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown run", "no masks", "unreachable store", "no run store"])
def test_expected_failures_are_one_line(site, tmp_path, monkeypatch, case):
    runs = str(site["runs"])
    uid = site["far"]
    if case == "unknown run":
        uid, fragment = "0" * 8 + "-0000-0000-0000-" + "0" * 12, "No run 00000000-"
    elif case == "no masks":
        uid, fragment = site["unmasked"], "recorded no masks"
    elif case == "unreachable store":
        # A few quick retries: tiled prints "Retrying..." for them on the main thread.
        monkeypatch.setattr("tiled.client.utils.TILED_RETRY_ATTEMPTS", 3)
        runs = f"http://127.0.0.1:{_closed_port()}/api/v1/runs"
        fragment = "Cannot reach the tiled server"
    else:
        runs, fragment = str(tmp_path / "nowhere"), "No run store at"
    result = CliRunner().invoke(
        main,
        [
            "--dir",
            str(site["registry"]),
            "process",
            uid,
            "--runs",
            runs,
            "--processed",
            str(tmp_path / "processed"),
        ],
    )
    assert fragment in _one_line_failure(result)


def test_python_callers_get_the_fix_in_python_words_and_nothing_is_written(site, tmp_path):
    from bluesky_callbacks import ProcessingError, process_run

    processed = tmp_path / "processed"
    store = RunStore(str(site["runs"])).reading()
    with MaskRegistry.embedded(site["registry"]) as registry:
        with pytest.raises(ProcessingError) as refused:
            process_run(site["far"], runs=store, processed=processed, registry=registry)
        frames = str(site["far_frames"])
        assert f"refers to {frames}/" in str(refused.value)
        assert f".reading([{frames!r}])" in str(refused.value)
        assert "--readable-storage" not in str(refused.value)
        assert f"--readable-storage {frames})" in refused.value.cli_message
        assert not processed.exists() or site["far"] not in list(
            RunStore(str(processed)).open(runs=False)
        )
        product = process_run(
            site["far"], runs=store.reading([frames]), processed=processed, registry=registry
        )
    assert np.array_equal(_product(processed, site["far"]), _raw_times_mask(site, site["far"]))
    assert product.created
