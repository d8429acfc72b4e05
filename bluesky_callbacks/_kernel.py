"""The per-frame work of masking: one multiply, on both cores, into reused buffers.

Used by :class:`~bluesky_callbacks.MaskingRouter` for every frame it emits; the
hot path of live processing, so it allocates nothing a frame does not need.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["FrameBuffers", "Multiplier", "multiply_into"]

#: Frames at least this large are split over worker threads (NumPy releases
#: the GIL in multiply); smaller ones are not worth the hand-off.
PARALLEL_BYTES = 4 << 20

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_workers(), thread_name_prefix="chx-masks-multiply")
        return _pool


def _unshared_count() -> int:
    """``sys.getrefcount`` of a pooled buffer that nothing outside the pool holds."""
    # Measured, not assumed: the count differs between Python versions. The
    # loop has the shape of the one in FrameBuffers.take.
    buffers = [np.empty(0)]
    for buffer in buffers:
        return sys.getrefcount(buffer)
    raise AssertionError("unreachable")


class FrameBuffers:
    """Output arrays handed out again once every consumer has let go of them.

    A buffer is reused only when nothing outside this pool references it: a
    downstream that keeps a frame (or a view of it, which references its
    base) keeps that buffer out of reuse, so a kept frame never changes. At
    most ``size`` buffers are tracked; beyond that, new arrays are allocated
    and left to their consumers.

    Examples
    --------
    >>> buffers = FrameBuffers(size=2)
    >>> a = buffers.take((2, 3), np.uint16)
    >>> buffers.take((2, 3), np.uint16) is a  # a is still held
    False
    >>> first = id(a)
    >>> del a
    >>> id(buffers.take((2, 3), np.uint16)) == first  # nobody holds it now
    True
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._buffers: list[np.ndarray] = []

    def reserve(self, n: int) -> None:
        """Track at least ``n`` buffers: a page of ``n`` frames needs ``n`` at once."""
        self.size = max(self.size, n)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable array of ``shape`` and ``dtype`` that nobody else holds."""
        for buffer in self._buffers:
            if (
                buffer.shape == shape
                and buffer.dtype == dtype
                and sys.getrefcount(buffer) <= _UNSHARED
            ):
                return buffer
        fresh = np.empty(shape, dtype)
        if len(self._buffers) < self.size:
            self._buffers.append(fresh)
        return fresh


_UNSHARED = _unshared_count()


def multiply_into(
    frame: np.ndarray, mask: np.ndarray, out: np.ndarray, *, threads: bool = True
) -> np.ndarray:
    """``out[...] = frame * mask`` (mask broadcast over leading axes), on all cores.

    Large frames are split by rows over a few threads unless ``threads`` is False.

    Examples
    --------
    >>> frame = np.arange(12, dtype=np.uint32).reshape(3, 4)
    >>> mask = np.ones((3, 4), np.uint32); mask[1] = 0
    >>> multiply_into(frame, mask, np.empty_like(frame))[1].tolist()
    [0, 0, 0, 0]
    """
    workers = _workers()
    rows = frame.shape[-2] if frame.ndim >= 2 else 0
    if not threads or workers == 1 or frame.nbytes < PARALLEL_BYTES or rows < 2 * workers:
        return np.multiply(frame, mask, out=out)
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    pool = _executor()
    futures = [
        pool.submit(np.multiply, frame[..., a:b, :], mask[a:b, :], out=out[..., a:b, :])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for future in futures:
        future.result()
    return out


#: Whether splitting large frames over threads paid in this process, once learned.
_learned: dict[str, bool] = {}


class Multiplier:
    """:func:`multiply_into` that learns, once per process, whether threads pay here.

    Splitting a frame over cores pays on an idle machine and costs on one
    whose other cores are busy (two threads then queue for one core). The
    first ``trials`` large frames of the process alternate between one
    thread and several; the faster median is kept for every later
    multiplier (every later run) of the process.

    Examples
    --------
    >>> multiply = Multiplier()
    >>> frame = np.ones((4, 4), np.uint16); mask = np.eye(4, dtype=np.uint16)
    >>> int(multiply(frame, mask, np.empty_like(frame)).sum())
    4
    """

    def __init__(self, trials: int = 6) -> None:
        self.trials = trials
        self._times: dict[bool, list[float]] = {True: [], False: []}
        self.threads: bool | None = _learned.get("threads") if _workers() > 1 else False

    def __call__(self, frame: np.ndarray, mask: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self.threads is not None or frame.nbytes < PARALLEL_BYTES:
            return multiply_into(frame, mask, out, threads=bool(self.threads))
        threads = len(self._times[True]) <= len(self._times[False])
        start = time.perf_counter()
        multiply_into(frame, mask, out, threads=threads)
        self._times[threads].append(time.perf_counter() - start)
        if min(len(t) for t in self._times.values()) * 2 >= self.trials:
            threaded, single = (
                sorted(self._times[k])[len(self._times[k]) // 2] for k in (True, False)
            )
            self.threads = _learned["threads"] = threaded < single
        return out
