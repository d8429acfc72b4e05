"""A derived run's masked frames in HDF5 files, in the Eiger's encoding.

Written for MaskingRouter(frames="files") by its per-run masking (:mod:`._masked_run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._eiger import file_stem, frames_dataset


@dataclass(frozen=True)
class _Encoded:
    """A masked frame already encoded as its file chunk (on a decode thread)."""

    future: Any
    shape: tuple[int, ...]
    dtype: np.dtype


class _FramesFile:
    """One masked data key's frames of a derived run, in an HDF5 file (SWMR).

    The Eiger's layout and encoding: ``/entry/data/data``, bitshuffle-LZ4,
    one chunk per frame; flushed after every page, so a reader (tiled) sees
    every frame written so far.
    """

    def __init__(
        self, directory: Path, key: str, frame_shape: tuple[int, ...], dtype: np.dtype
    ) -> None:
        from chx_masks.io import h5py_with_filters

        h5py = h5py_with_filters()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{file_stem(key)}.h5"
        self.uri = "file://localhost" + str(self.path)
        self.frame_shape = tuple(int(n) for n in frame_shape)
        self.count = 0
        self.resource: Any = None
        self._file = h5py.File(self.path, "w", libver="latest")
        self._dataset = frames_dataset(self._file, self.frame_shape, dtype)
        self._file.swmr_mode = True

    def write(self, frames: Sequence[Any], pool: Any) -> None:
        """Append frames (arrays, encoded here on ``pool``, or :class:`_Encoded` chunks)."""
        from ._decode import encode_chunk

        if frames and isinstance(frames[0], _Encoded):
            chunks = [frame.future.result() for frame in frames]
        else:
            chunks = list(pool.map(encode_chunk, frames))
        self._dataset.resize(self.count + len(chunks), axis=0)
        tail = (0,) * len(self.frame_shape)
        for i, chunk in enumerate(chunks):
            self._dataset.id.write_direct_chunk((self.count + i, *tail), chunk)
        self.count += len(chunks)
        self._dataset.flush()

    def close(self) -> None:
        self._file.close()
