"""A product read the way pyCHX reads its compressed files: frame by frame, as (pixels, counts).

pyCHX's correlators (``lazy_one_time``, ``lazy_two_time``, ...) take a
``Multifile``: an object with ``beg``, ``end``, ``md`` and ``rdrawframe(n)``
returning the flat positions and the values of the non-zero pixels of frame
``n`` (``rdframe(n)`` gives the frame dense). :class:`ProductFrames` gives
that interface over a product of :func:`~bluesky_callbacks.process_run`, so a
masked run feeds the analysis CHX already runs, with no conversion file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

__all__ = ["ProductFrames"]

#: pyCHX's Multifile metadata keys (``md``), in its header's order.
MD_KEYS = (
    "beam_center_x",
    "beam_center_y",
    "count_time",
    "detector_distance",
    "frame_time",
    "incident_wavelength",
    "x_pixel_size",
    "y_pixel_size",
    "bytes",
    "nrows",
    "ncols",
    "rows_begin",
    "rows_end",
    "cols_begin",
    "cols_end",
)


class ProductFrames:
    """The frames of one detector of a product, with pyCHX's ``Multifile`` interface.

    Parameters
    ----------
    node : tiled client
        The product's node of one detector: ``processed[run_uid][data_key]``.
    beg, end : int
        The frames pyCHX's correlators go through: ``range(beg, end)``
        (default: all).
    md : dict, optional
        Values for pyCHX's header keys (``beam_center_x``, ``frame_time``,
        ...); ``bytes``, ``nrows``, ``ncols`` and the row and column ranges
        come from the frames. pyCHX's ``ncols`` is the number of rows of a
        frame and ``nrows`` the number of columns (a frame is
        ``(md["ncols"], md["nrows"])``), and so they are here.

    Notes
    -----
    A product stored as files is read from its HDF5 file where this process
    can open it (decoded here, one chunk per frame), through tiled otherwise.
    ``rdrawframe`` returns positions as int32 flat indices into the frame and
    the values in the frames' dtype, as pyCHX's files hold them.

    Examples
    --------
    >>> frames = ProductFrames(processed[run_uid]["eiger4m_single_image"])  # doctest: +SKIP
    >>> p, v = frames.rdrawframe(0)  # doctest: +SKIP
    >>> from pyCHX.chx_correlationc import lazy_one_time  # doctest: +SKIP
    >>> g2 = lazy_one_time(frames, num_levels, num_bufs, labels)  # doctest: +SKIP
    """

    def __init__(
        self, node: Any, beg: int = 0, end: int | None = None, md: dict[str, Any] | None = None
    ) -> None:
        structure = node.structure()
        shape = tuple(int(n) for n in structure.shape)
        if len(shape) < 3:
            raise ValueError(f"A product of frames is (events, [frames,] rows, cols), not {shape}.")
        self.node = node
        #: Events and frames per event, flattened in order into pyCHX's frame numbers.
        self._lead = shape[:-2]
        self._one_per_chunk = int(np.prod(shape[1:-2], dtype=np.int64)) == 1
        self.nimgs = int(np.prod(self._lead, dtype=np.int64))
        rows, cols = shape[-2:]
        self.valtype = np.dtype(structure.data_type.to_numpy_dtype()).type
        self.byts = np.dtype(self.valtype).itemsize
        self.beg = int(beg)
        self.end = self.nimgs if end is None else int(end)
        if not 0 <= self.beg <= self.end <= self.nimgs:
            raise ValueError(
                f"beg and end must satisfy 0 <= beg <= end <= {self.nimgs}, not {beg} and {end}."
            )
        self.md: dict[str, Any] = dict.fromkeys(MD_KEYS)
        self.md.update(md or {})
        self.md.update(
            bytes=self.byts,
            ncols=rows,
            nrows=cols,
            rows_begin=0,
            rows_end=rows,
            cols_begin=0,
            cols_end=cols,
        )
        self.filename = _local_file(node)
        self._dataset: Any = None
        self._buffer = np.empty((rows, cols), self.valtype)

    def __len__(self) -> int:
        return self.end - self.beg

    def _frame(self, n: int) -> np.ndarray:
        if not self.beg <= n < self.end:
            raise IndexError(f"Frame {n} is outside beg={self.beg}, end={self.end}.")
        index = tuple(int(i) for i in np.unravel_index(n, self._lead))
        if self.filename is None:
            return np.asarray(self.node[index])
        if self._dataset is None:
            from chx_masks.io import h5py_with_filters

            from ._decode import decodable

            h5 = h5py_with_filters().File(self.filename, "r")
            dataset = h5[self.node.data_sources()[0].parameters["dataset"]]
            # Products hold frames, (frames, rows, cols); older ones the run's shape.
            flat = dataset.ndim == 3
            self._dataset = (
                h5,
                dataset,
                flat,
                decodable(dataset) and (flat or self._one_per_chunk),
            )
        _, dataset, flat, fast = self._dataset
        where = (n,) if flat else index
        if fast:
            from ._decode import decode_chunk

            chunk = dataset.id.read_direct_chunk((where[0],) + (0,) * (dataset.ndim - 1))[1]
            return decode_chunk(chunk, self._buffer)
        dataset.read_direct(self._buffer, where)
        return self._buffer

    def rdrawframe(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The flat positions (int32) and values of frame ``n``'s non-zero pixels."""
        frame = self._frame(n).reshape(-1)
        positions = np.flatnonzero(frame)
        return positions.astype(np.int32), frame[positions].astype(self.valtype, copy=False)

    def rdframe(self, n: int) -> np.ndarray:
        """Frame ``n``, dense (float, as pyCHX's ``Multifile.rdframe``)."""
        return self._frame(n).astype(float)

    def close(self) -> None:
        """Close the product's file if it was opened."""
        if self._dataset is not None:
            self._dataset[0].close()
            self._dataset = None

    def __enter__(self) -> ProductFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _local_file(node: Any) -> str | None:
    """The product's HDF5 file if this process can open it, else None."""
    try:
        (source,) = node.data_sources()
    except (ValueError, TypeError, AttributeError):
        return None
    if source.mimetype != "application/x-hdf5" or len(source.assets) != 1:
        return None
    uri = urlparse(source.assets[0].data_uri)
    if uri.scheme != "file":
        return None
    path = Path(unquote(uri.path))
    return str(path) if path.is_file() else None
