"""The masking hot path: reused buffers never change a frame someone kept."""

from __future__ import annotations

import numpy as np
import pytest
from event_model import compose_run
from helpers import EIGER4M, SHAPE_4M, random_mask

from bluesky_callbacks import MaskingRouter
from bluesky_callbacks._kernel import PARALLEL_BYTES, FrameBuffers, multiply_into
from chx_masks import MaskRegistry


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    registry = MaskRegistry.embedded(tmp_path_factory.mktemp("kernel"))
    registry.register_mask(EIGER4M, "m", random_mask(SHAPE_4M, seed=1))
    yield registry
    registry.close()


def _run(reg, n_pages: int, per_page: int, dtype=np.uint32):
    """A raw run's documents: inline 4M frames, pages of ``per_page``."""
    composite = reg.resolve_composite(EIGER4M, ["m"])
    bundle = compose_run(
        metadata={"masks": {EIGER4M: composite.provenance()}, "mask_uids": list(composite.uids)}
    )
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            EIGER4M: {
                "source": "sim",
                "dtype": "array",
                "shape": list(SHAPE_4M),
                "dtype_numpy": np.dtype(dtype).str,
            }
        },
    )
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 50, SHAPE_4M, dtype=dtype) for _ in range(n_pages * per_page)]
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for p in range(n_pages):
        chunk = frames[p * per_page : (p + 1) * per_page]
        docs.append(
            (
                "event_page",
                desc.compose_event_page(
                    data={EIGER4M: chunk},
                    timestamps={EIGER4M: [0.0] * per_page},
                    seq_num=list(range(p * per_page + 1, (p + 1) * per_page + 1)),
                ),
            )
        )
    docs.append(("stop", bundle.compose_stop()))
    return docs, frames, composite.mask


@pytest.mark.parametrize("per_page", [1, 3])
def test_frames_a_downstream_keeps_never_change(reg, per_page):
    docs, frames, mask = _run(reg, n_pages=4, per_page=per_page)
    kept, views = [], []

    def keep_some(name, doc):
        if name == "event_page":
            for i, frame in enumerate(doc["data"][EIGER4M]):
                if doc["seq_num"][i] % 2:
                    kept.append(frame)  # the whole frame
                else:
                    views.append(frame[100:110, 200:210])  # only a view of it

    router = MaskingRouter(reg, keep_some, strict=True)
    for name, doc in docs:
        router(name, doc)
    expected = [f * mask for f in frames]
    assert len(kept) + len(views) == len(frames)
    for frame in kept:
        i = next(j for j, e in enumerate(expected) if np.array_equal(e, frame))
        assert i % 2 == 0  # odd seq_num = even index
    for j, view in enumerate(views):
        np.testing.assert_array_equal(view, expected[2 * j + 1][100:110, 200:210])


def test_buffers_are_reused_when_nobody_keeps_the_frames(reg):
    docs, frames, mask = _run(reg, n_pages=5, per_page=1)
    seen_ids, checked = [], []

    def look_and_drop(name, doc):
        if name == "event_page":
            (frame,) = doc["data"][EIGER4M]
            seen_ids.append(id(frame))
            checked.append(np.array_equal(frame, frames[doc["seq_num"][0] - 1] * mask))

    router = MaskingRouter(reg, look_and_drop, strict=True)
    for name, doc in docs:
        router(name, doc)
    assert checked == [True] * 5
    assert len(set(seen_ids)) == 1, "a buffer nobody held was not reused"


def test_multiply_into_splits_large_frames_and_keeps_small_ones_whole():
    rng = np.random.default_rng(2)
    for shape in [(4, 5), SHAPE_4M, (1, *SHAPE_4M)]:
        frame = rng.integers(0, 1000, shape, dtype=np.uint32)
        mask = (rng.random(shape[-2:]) > 0.1).astype(np.uint32)
        out = np.empty_like(frame)
        assert multiply_into(frame, mask, out) is out
        np.testing.assert_array_equal(out, frame * mask)
    assert np.prod(SHAPE_4M) * 4 >= PARALLEL_BYTES


def test_frame_buffers_track_at_most_size():
    buffers = FrameBuffers(size=2)
    held = [buffers.take((3, 3), np.uint16) for _ in range(4)]
    assert len({id(b) for b in held}) == 4
    assert len(buffers._buffers) == 2
    del held
    again = buffers.take((3, 3), np.uint16)
    assert any(again is b for b in buffers._buffers)
    assert buffers.take((3, 4), np.uint16).shape == (3, 4)  # another shape: fresh


def test_multiplier_tries_both_ways_then_keeps_one_for_the_process(monkeypatch):
    from bluesky_callbacks import _kernel
    from bluesky_callbacks._kernel import Multiplier, _workers

    monkeypatch.setattr(_kernel, "_learned", {})  # as in a fresh process
    multiply = Multiplier(trials=4)
    rng = np.random.default_rng(3)
    mask = (rng.random(SHAPE_4M) > 0.1).astype(np.uint32)
    for _ in range(6):
        frame = rng.integers(0, 9, SHAPE_4M, dtype=np.uint32)
        np.testing.assert_array_equal(multiply(frame, mask, np.empty_like(frame)), frame * mask)
    if _workers() > 1:
        assert multiply.threads in (True, False)
        assert len(multiply._times[True]) == len(multiply._times[False]) == 2
        # A later run of the process does not learn again.
        assert Multiplier(trials=4).threads is multiply.threads
    else:
        assert multiply.threads is False
