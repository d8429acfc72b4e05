"""Bitshuffle-LZ4 frame chunks, coded off HDF5's lock on the process's decode threads.

Used by the Eiger reader (:mod:`._eiger`), the router, pyCHX frames and end-of-run processing.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: HDF5 filter id of bitshuffle, and its cd_values[4] for LZ4 compression.
BITSHUFFLE = 32008
_LZ4 = 2

_decode_pools: dict[int, ThreadPoolExecutor] = {}
_decode_lock = threading.Lock()


def decode_threads() -> int:
    """Threads that decode frames in this process: ``$CHX_MASKS_DECODE_THREADS``, else
    the cores up to 8 (decoding scales to about 8 threads; see benchmarks/RESULTS.md).

    Examples
    --------
    >>> decode_threads() >= 1
    True
    """
    from chx_masks.settings import settings

    given = settings().decode_threads
    if given is not None:
        return given
    return max(
        1,
        min(
            8,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        ),
    )


_default_threads: int | None = None


def _process_threads() -> int:
    """:func:`decode_threads`, read once per process: the default pool's size."""
    global _default_threads
    if _default_threads is None:
        _default_threads = decode_threads()
    return _default_threads


def decode_pool(threads: int | None = None) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` decoding threads.

    The default is :func:`decode_threads`, read when the process first asks.
    """
    threads = threads or _process_threads()
    with _decode_lock:
        pool = _decode_pools.get(threads)
        if pool is None:
            pool = _decode_pools[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix="chx-masks-decode"
            )
        return pool


def decodable(dataset: Any) -> bool:
    """True if ``dataset``'s frames can be decoded off HDF5's lock: one chunk per frame,
    bitshuffle-LZ4 its only filter, and the ``bitshuffle`` package installed.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from chx_masks.io import h5py_with_filters
    >>> from bluesky_callbacks._eiger import DATA_PATH, SeriesWriter
    >>> with SeriesWriter(tempfile.mkdtemp(), "s", (4, 6), np.uint32) as w:
    ...     w.write(np.ones((4, 6), np.uint32))
    ...     path = w.data_files[0]
    >>> with h5py_with_filters().File(path) as f:
    ...     decodable(f[DATA_PATH])
    True
    """
    chunks = dataset.chunks
    if chunks is None or chunks[0] != 1 or tuple(chunks[1:]) != tuple(dataset.shape[1:]):
        return False
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return False
    filter_id, _, values, _ = plist.get_filter(0)
    if filter_id != BITSHUFFLE or len(values) < 5 or values[4] != _LZ4:
        return False
    try:
        import bitshuffle  # noqa: F401
    except ImportError:
        return False
    return True


def decode_chunk(chunk: bytes, out: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Decode one bitshuffle-LZ4 HDF5 chunk (one frame) into ``out``, times ``mask`` if given.

    The chunk is what ``dataset.id.read_direct_chunk`` returns: an 8-byte
    big-endian size, a 4-byte big-endian block size in bytes, then the LZ4
    blocks. The GIL is released while decoding and multiplying, so frames
    decode in parallel on threads.
    """
    import bitshuffle

    block = int.from_bytes(chunk[8:12], "big") // out.dtype.itemsize
    frame = bitshuffle.decompress_lz4(
        np.frombuffer(chunk, np.uint8)[12:], out.shape, out.dtype, block
    )
    if mask is None:
        out[...] = frame
        return out
    return np.multiply(frame, mask, out=out)


def encode_chunk(frame: np.ndarray) -> bytes:
    """One frame as a bitshuffle-LZ4 HDF5 chunk, for ``dataset.id.write_direct_chunk``.

    The inverse of :func:`decode_chunk`; what the HDF5 filter 32008 writes
    (with the default block of 8 kB), so h5py with hdf5plugin reads it back.
    The GIL is released while encoding, so frames encode in parallel.

    Examples
    --------
    >>> import numpy as np
    >>> frame = np.arange(12, dtype=np.uint32).reshape(3, 4)
    >>> bool((decode_chunk(encode_chunk(frame), np.empty_like(frame)) == frame).all())
    True
    """
    import bitshuffle

    frame = np.ascontiguousarray(frame)
    block = max(8, 8192 // frame.dtype.itemsize // 8 * 8)
    body = bitshuffle.compress_lz4(frame.reshape(-1), block)
    header = frame.nbytes.to_bytes(8, "big") + (block * frame.dtype.itemsize).to_bytes(4, "big")
    return header + body.tobytes()


def remask_chunk(chunk: bytes, out: np.ndarray, mask: np.ndarray) -> bytes:
    """Decode a raw chunk into ``out`` times ``mask``; that frame as a chunk again.

    The GIL is released in each step, so frames are re-encoded in parallel.

    Examples
    --------
    >>> frame = np.arange(12, dtype=np.uint32).reshape(3, 4)
    >>> mask = np.ones_like(frame); mask[0] = 0
    >>> out = np.empty_like(frame)
    >>> again = remask_chunk(encode_chunk(frame), out, mask)
    >>> int(out.sum()), bool((decode_chunk(again, np.empty_like(frame)) == out).all())
    (60, True)
    """
    return encode_chunk(decode_chunk(chunk, out, mask))


def raw_chunks(dataset: Any, start: int, stop: int) -> list[bytes]:
    """The stored chunks of frames ``start:stop`` (read in order, not decoded)."""
    tail = (0,) * (len(dataset.shape) - 1)
    return [dataset.id.read_direct_chunk((i, *tail))[1] for i in range(start, stop)]


def read_frames(dataset: Any, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Frames ``start:stop`` of a dataset, decoded on threads where its layout allows.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from chx_masks.io import h5py_with_filters
    >>> from bluesky_callbacks._eiger import DATA_PATH, SeriesWriter
    >>> with SeriesWriter(tempfile.mkdtemp(), "s", (4, 6), np.uint32) as w:
    ...     for i in range(3):
    ...         w.write(np.full((4, 6), i, np.uint32))
    ...     path = w.data_files[0]
    >>> with h5py_with_filters().File(path) as f:
    ...     read_frames(f[DATA_PATH], 1)[:, 0, 0].tolist()
    [1, 2]
    """
    stop = dataset.shape[0] if stop is None else stop
    threads = _process_threads()
    if stop - start < 2 or threads < 2 or not decodable(dataset):
        return dataset[start:stop]
    out = np.empty((stop - start, *dataset.shape[1:]), dataset.dtype)
    pool = decode_pool(threads)
    futures = [
        pool.submit(decode_chunk, chunk, out[i])
        for i, chunk in enumerate(raw_chunks(dataset, start, stop))
    ]
    for future in futures:
        future.result()
    return out
