"""A product feeds XPCS correlation through pyCHX's compressed-file interface.

A real RunEngine scans a simulated Eiger 500K writing DECTRIS files of XPCS
frames (0.05 photons per pixel, speckle decorrelating faster at larger q);
``process_run`` stores the masked product. :class:`ProductFrames` hands it
out frame by frame as (positions, values), as pyCHX's ``Multifile`` does.
Two independent computations of the one-time correlation g2 per q ring must
agree: one accumulated from those (positions, values) pairs, as pyCHX's
``lazy_one_time`` does, and one from the dense raw frames times the mask.
pyCHX's own correlator is used too where pyCHX imports.
"""

from __future__ import annotations

import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter

from bluesky_callbacks import MaskProvenance, ProductFrames, RunStore, open_run_store
from bluesky_callbacks._eiger import XPCSPattern
from bluesky_callbacks._sim_async import SimAsyncEiger
from chx_masks import MaskRegistry

pytestmark = pytest.mark.slow

DET = "eiger500K_single_image"
SHAPE = (514, 1030)
FRAMES = 60
LAGS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from bluesky import RunEngine
    from ophyd_async.plan_stubs import ensure_connected

    root = tmp_path_factory.mktemp("pychx")
    registry = MaskRegistry.embedded(root / "registry")
    pattern = XPCSPattern(SHAPE, mean=0.05, tau=6.0)
    mask = ~(pattern.flagged | pattern.hot_pixels)  # what a beamline mask removes
    mask[270:300, :500] = False  # a beamstop arm
    registry.register_mask(DET, "xpcs", mask)
    store = open_run_store(root / "runs", readable_storage=[root / "frames"])
    engine = RunEngine({}, context_managers=[])
    engine.subscribe(TiledWriter(store))
    engine.preprocessors.append(MaskProvenance(registry, masks={DET: ["xpcs"]}, active=False))
    det = SimAsyncEiger("eiger500K_single", root / "frames", pattern=pattern, frames_per_file=25)
    engine(ensure_connected(det))
    (uid,) = engine(count([det], num=FRAMES))
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()
    from bluesky_callbacks import process_run

    process_run(
        uid,
        runs=RunStore(str(root / "runs")).reading([root / "frames"]),
        processed=root / "processed",
        registry=registry,
    )
    raw = np.asarray(store[uid]["primary"][DET].read())
    node = RunStore(str(root / "processed")).open(runs=False)[uid][DET]
    yield {"node": node, "raw": raw, "mask": mask, "pattern": pattern}
    store.context.close()
    registry.close()


def rings(shape: tuple[int, int], mask: np.ndarray, n: int = 4) -> np.ndarray:
    """q rings around the beam centre (labels 1..n; 0 outside or masked), as pyCHX's labels."""
    rows, cols = shape
    r, c = np.ogrid[:rows, :cols]
    q = np.hypot(r - 0.55 * rows, c - 0.45 * cols)
    edges = np.linspace(40, 240, n + 1)
    labels = np.digitize(q, edges)
    labels[(q < edges[0]) | (q >= edges[-1]) | ~mask] = 0
    return labels


def g2_from_pairs(frames: ProductFrames, labels: np.ndarray) -> np.ndarray:
    """g2 per ring and lag, accumulated from rdrawframe pairs as pyCHX does (sparse)."""
    flat = labels.reshape(-1)
    pixels = np.flatnonzero(flat)
    index = np.zeros(flat.size, np.int64)
    index[pixels] = np.arange(1, pixels.size + 1)
    ring = flat[pixels]
    series = np.zeros((frames.end - frames.beg, pixels.size))
    for i in range(frames.beg, frames.end):
        p, v = frames.rdrawframe(i)
        inside = index[p] > 0
        series[i - frames.beg, index[p[inside]] - 1] = v[inside]
    return _g2(series, ring)


def g2_dense(frames: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """g2 per ring and lag from dense frames."""
    flat = labels.reshape(-1)
    pixels = np.flatnonzero(flat)
    series = frames.reshape(frames.shape[0], -1)[:, pixels].astype(float)
    return _g2(series, flat[pixels])


def _g2(series: np.ndarray, ring: np.ndarray) -> np.ndarray:
    out = np.zeros((len(LAGS), ring.max()))
    for k in range(1, ring.max() + 1):
        s = series[:, ring == k]
        for j, lag in enumerate(LAGS):
            num = (s[:-lag] * s[lag:]).mean(axis=0)
            den = s[:-lag].mean(axis=0) * s[lag:].mean(axis=0)
            keep = den > 0
            out[j, k - 1] = num[keep].mean() / den[keep].mean()
    return out


def test_rdrawframe_pairs_are_the_masked_frames(product):
    with ProductFrames(product["node"]) as frames:
        assert (frames.beg, frames.end, len(frames)) == (0, FRAMES, FRAMES)
        assert frames.filename is not None and frames.filename.endswith(".h5")
        assert frames.md["ncols"] == SHAPE[0] and frames.md["nrows"] == SHAPE[1]
        assert frames.md["bytes"] == 4
        for i in (0, 17, FRAMES - 1):
            expected = (product["raw"][i] * product["mask"]).reshape(-1)
            p, v = frames.rdrawframe(i)
            assert p.dtype == np.int32 and v.dtype == np.uint32
            np.testing.assert_array_equal(p, np.flatnonzero(expected))
            np.testing.assert_array_equal(v, expected[p])
            np.testing.assert_array_equal(frames.rdframe(i), expected.reshape(SHAPE))
        # Sparse: a few percent of the pixels, as XPCS frames are.
        assert 0.005 < p.size / expected.size < 0.1
        with pytest.raises(IndexError):
            frames.rdrawframe(FRAMES)


def test_read_through_tiled_when_the_file_is_not_at_hand(product):
    frames = ProductFrames(product["node"], beg=10, end=14)
    frames.filename = None  # as on a machine that cannot open the file
    p, v = frames.rdrawframe(12)
    expected = (product["raw"][12] * product["mask"]).reshape(-1)
    np.testing.assert_array_equal(p, np.flatnonzero(expected))
    np.testing.assert_array_equal(v, expected[p])


def test_g2_from_the_reader_equals_g2_of_raw_times_mask(product):
    labels = rings(SHAPE, product["mask"])
    with ProductFrames(product["node"]) as frames:
        from_pairs = g2_from_pairs(frames, labels)
    dense = g2_dense(product["raw"] * product["mask"], labels)
    np.testing.assert_allclose(from_pairs, dense, rtol=1e-12)
    # XPCS: the inner rings (most photons) are correlated at short lags and
    # decorrelate with lag (the outer ones hold too few photons to say).
    assert (from_pairs[0, :2] > 1.2).all()
    assert (from_pairs[0, :2] > from_pairs[-1, :2] + 0.1).all()
    # Without the mask, the masked pixels would count: the mask matters here.
    unmasked = g2_dense(product["raw"], rings(SHAPE, np.ones(SHAPE, bool)))
    assert not np.allclose(unmasked, dense, rtol=1e-3)


class DenseFrames:
    """pyCHX's Multifile interface over frames in memory (here raw x mask)."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames.reshape(-1, *frames.shape[-2:])
        self.beg, self.end = 0, len(self.frames)
        rows, cols = self.frames.shape[1:]
        self.md = {"ncols": rows, "nrows": cols, "bytes": self.frames.dtype.itemsize}

    def rdrawframe(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        flat = self.frames[n].reshape(-1)
        p = np.flatnonzero(flat)
        return p.astype(np.int32), flat[p]

    def rdframe(self, n: int) -> np.ndarray:
        return self.frames[n].astype(float)


def test_pychx_lazy_one_time_gives_the_same_g2_on_the_reader_as_on_raw_times_mask(product):
    chx = pytest.importorskip(
        "pyCHX.chx_correlationc", reason="pyCHX is not installed (not on PyPI)"
    )
    labels = rings(SHAPE, product["mask"])

    def final(source) -> tuple[np.ndarray, np.ndarray]:
        *_, result = chx.lazy_one_time(source, 4, 8, labels)  # the last yielded is final
        return np.asarray(result.g2), np.asarray(result.lag_steps)

    with ProductFrames(product["node"]) as frames:
        g2, lags = final(frames)
    g2_raw, lags_raw = final(DenseFrames(product["raw"] * product["mask"]))
    np.testing.assert_array_equal(lags, lags_raw)
    np.testing.assert_allclose(g2, g2_raw, rtol=1e-12)
    assert (g2[1, :2] > 1.2).all()
