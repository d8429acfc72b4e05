"""The tasks that mask one chunk of a stored run's frames, and the bounded scheduler that runs them.

Used by :mod:`._products` to write a product, on local threads or a ``dask.distributed`` client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ._plan import _frames_node
from ._stores import RunStore, _client


def _chunk_frames(
    source: RunStore | Any,
    run_uid: str,
    stream: str,
    data_key: str,
    start: int,
    stop: int,
) -> np.ndarray:
    """Frames [start, stop) of a stored run, read in a task."""
    import dask

    run = _client(source, runs=True)[run_uid]
    # tiled reads through dask: here, inside a task, that must not go back
    # to the cluster (on a distributed worker it would by default).
    with dask.config.set(scheduler="sync"):
        return np.asarray(_frames_node(run, stream, data_key)[start:stop])


def _masked_chunk(
    source: RunStore | Any,
    run_uid: str,
    stream: str,
    data_key: str,
    start: int,
    stop: int,
    mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """COO (coords, data) of frames [start, stop) times ``mask``, coords in the chunk."""
    frames = _chunk_frames(source, run_uid, stream, data_key, start, stop)
    masked = frames * mask  # mask: 0/1 in the frames' dtype, prepared once per detector
    coords = np.nonzero(masked)
    width = np.uint16 if max(masked.shape, default=0) <= np.iinfo(np.uint16).max else np.uint32
    return np.stack([c.astype(width) for c in coords]), masked[coords]


def _masked_encoded(
    source: RunStore | Any,
    run_uid: str,
    stream: str,
    data_key: str,
    start: int,
    stop: int,
    mask: np.ndarray,
) -> tuple[list[bytes], int]:
    """Rows [start, stop) times ``mask``, each frame a bitshuffle-LZ4 chunk; non-zero pixels."""
    from ._decode import encode_chunk

    frames = _chunk_frames(source, run_uid, stream, data_key, start, stop)
    np.multiply(frames, mask, out=frames)
    flat = frames.reshape(-1, *frames.shape[-2:])
    return [encode_chunk(frame) for frame in flat], int(np.count_nonzero(frames))


def _direct_encoded(
    files: tuple[tuple[str, str, int], ...],
    start: int,
    stop: int,
    mask: np.ndarray,
    dtype: str,
) -> tuple[list[bytes], int]:
    """Frames [start, stop) of ``files`` (concatenated) times ``mask``, each a chunk.

    Read from the detector files themselves, one frame at a time: a
    bitshuffle-LZ4 chunk is decoded, masked and encoded again off HDF5's
    lock (so tasks run in parallel on threads), and only the encoded frames
    are kept, so a task holds one decoded frame however many it covers.
    """
    from chx_masks.io import h5py_with_filters

    from ._decode import decodable, encode_chunk, raw_chunks, remask_chunk

    h5py = h5py_with_filters()
    out = np.empty(mask.shape, dtype)
    chunks: list[bytes] = []
    nonzero = 0
    first = 0
    for path, name, count in files:
        a, b = max(start, first) - first, min(stop, first + count) - first
        first += count
        if a >= b:
            continue
        with h5py.File(path, "r") as f:
            dataset = f[name]
            stored = raw_chunks(dataset, a, b) if decodable(dataset) else None
            for i in range(a, b):
                if stored is not None:
                    chunks.append(remask_chunk(stored[i - a], out, mask))
                else:
                    dataset.read_direct(out, np.s_[i])
                    chunks.append(encode_chunk(np.multiply(out, mask, out=out)))
                nonzero += int(np.count_nonzero(out))
    return chunks, nonzero


def _in_flight(
    tasks: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
    client: Any,
    window: int,
) -> Iterator[tuple[int, Any]]:
    """Run each ``(fn, args)`` of ``tasks``, at most ``window`` at once; yield (index, result).

    Results come as tasks end, in any order. One ``concurrent.futures``
    executor runs them: local threads (half of ``window``) when ``client`` is
    None, else the ``dask.distributed`` client's (``Client.get_executor``).
    A task that raises ends the loop; tasks not yet started are cancelled.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    executor = (
        ThreadPoolExecutor(max_workers=max(1, window // 2))
        if client is None
        else client.get_executor(pure=False)
    )
    todo = iter(enumerate(tasks))
    pending: dict[Any, int] = {}

    def submit_next() -> bool:
        nxt = next(todo, None)
        if nxt is not None:
            index, (fn, args) = nxt
            pending[executor.submit(fn, *args)] = index
        return nxt is not None

    with executor:
        try:
            while len(pending) < max(1, window) and submit_next():
                pass
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    yield index, future.result()
                    submit_next()
        finally:
            for future in pending:
                future.cancel()
