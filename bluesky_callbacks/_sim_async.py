"""The ophyd-async simulated Eiger behind :class:`bluesky_callbacks.sim.SimAsyncEiger`.

Kept apart so that importing :mod:`bluesky_callbacks.sim` does not import ophyd-async.
Modelled on ``ophyd_async.sim.SimBlobDetector`` (trigger, acquire and data logic).
"""

from __future__ import annotations

import asyncio
import os
from contextlib import suppress
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import DTypeLike
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathProvider,
    StandardDetector,
    StaticPathProvider,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    UUIDFilenameProvider,
    soft_signal_r_and_setter,
)

from .sim import EigerPattern, _resolve_shape

#: Where the frames are in each HDF5 file, as in the Eiger/ophyd-async NeXus layout.
DATA_PATH = "/entry/data/data"


class _EigerHDF5Writer:
    """Writes frames of an :class:`EigerPattern` to one HDF5 file per run."""

    def __init__(self, pattern: EigerPattern) -> None:
        self.pattern = pattern
        self.frames_written, self._set_frames_written = soft_signal_r_and_setter(int)
        self._file: h5py.File | None = None
        self._data: h5py.Dataset | None = None
        self._count = 0
        self.frames_per_trigger = 1
        self.period = 0.0

    def open(self, path: Path) -> None:
        self.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        rows, cols = self.pattern.shape
        self._file = h5py.File(path, "w", libver="latest")
        self._data = self._file.create_dataset(
            DATA_PATH,
            shape=(0, rows, cols),
            maxshape=(None, rows, cols),
            chunks=(1, rows, cols),
            dtype=self.pattern.dtype,
        )
        # SWMR lets other processes read frames while the file is still open.
        self._file.swmr_mode = True
        self._count = 0
        self._set_frames_written(0)

    def write_next_frame(self) -> None:
        if self._data is None:
            raise RuntimeError("No HDF5 file open: the detector must be prepared (or triggered).")
        i = self._count
        self._data.resize(i + 1, axis=0)
        self._data[i] = self.pattern.frame(i)
        # Flushed before StreamDatum announces the frame, so readers can always see it.
        self._data.flush()
        self._count = i + 1
        self._set_frames_written(self._count)

    async def acquire(self) -> None:
        for _ in range(self.frames_per_trigger):
            # sleep(0) still yields, so the RunEngine stays responsive between frames.
            await asyncio.sleep(self.period)
            self.write_next_frame()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._data = None


class _EigerTriggerLogic(DetectorTriggerLogic):
    def __init__(self, writer: _EigerHDF5Writer) -> None:
        self.writer = writer

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        self.writer.frames_per_trigger = num
        self.writer.period = livetime + deadtime

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class _EigerAcquireLogic(DetectorAcquireLogic):
    def __init__(self, writer: _EigerHDF5Writer) -> None:
        self.writer = writer
        self.task: asyncio.Task[None] | None = None

    async def start_acquiring(self) -> None:
        self.task = asyncio.create_task(self.writer.acquire())

    async def wait_for_idle(self) -> None:
        if self.task is not None:
            await self.task

    async def ensure_stopped(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
            self.task = None


class _EigerDataLogic(DetectorDataLogic):
    # The CHX data key is "<device name>_image", not ophyd-async's bare device name.
    datakey_suffix = "_image"

    def __init__(self, path_provider: PathProvider, writer: _EigerHDF5Writer) -> None:
        self.path_provider = path_provider
        self.writer = writer

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        path_info = self.path_provider(datakey_name)
        self.writer.open(Path(path_info.directory_path) / f"{path_info.filename}.h5")
        rows, cols = self.writer.pattern.shape
        return StreamResourceDataProvider(
            uri=f"{path_info.directory_uri}{path_info.filename}.h5",
            resources=[
                StreamResourceInfo(
                    data_key=datakey_name,
                    shape=(rows, cols),
                    chunk_shape=(1, rows, cols),
                    dtype_numpy=self.writer.pattern.dtype.str,
                    parameters={"dataset": DATA_PATH},
                )
            ],
            mimetype="application/x-hdf5",
            collections_written_signal=self.writer.frames_written,
        )

    async def stop(self) -> None:
        self.writer.close()

    def get_hinted_fields(self, datakey_name: str) -> list[str]:
        return [datakey_name]


class SimAsyncEiger(StandardDetector):
    """A simulated CHX Eiger for ophyd-async: frames in HDF5, StreamResource/StreamDatum docs.

    Each run (each ``stage``) writes a new file ``<uuid>.h5`` in ``path`` with
    the frames in ``/entry/data/data`` (``(n, rows, cols)``, chunked per frame,
    SWMR, flushed after each frame). The data key is ``f"{name}_image"`` with
    ``external: "STREAM:"`` and, as for every ophyd-async detector,
    ``shape == [1, rows, cols]`` (frames per event first). The StreamResource
    has ``mimetype="application/x-hdf5"``, ``uri`` the file's ``file://`` URI
    and ``parameters == {"dataset": "/entry/data/data", "chunk_shape": (1, rows,
    cols)}``; StreamDatum ``indices`` ``{"start": a, "stop": b}`` are the
    frames ``a:b`` of that dataset, and frame ``i`` equals
    :meth:`expected_frame` ``(i)``.

    Parameters
    ----------
    name : str
        Device name (``"eiger4m_single"``, ``"eiger1m_single"``,
        ``"eiger500K_single"``, or any name with ``shape`` given).
    path : str, path or ophyd_async.core.PathProvider
        Directory for the HDF5 files (created if missing), or a path provider
        deciding directory and file name per run.
    shape : tuple of int, optional
        ``(rows, cols)``; defaults from ``name``.
    dtype : numpy dtype, optional
        ``np.uint32`` (default) or ``np.uint16``.
    seed : int, optional
        Seed of the frame pattern (see :class:`~bluesky_callbacks.sim.EigerPattern`).

    Examples
    --------
    Connect it first (``RE(ensure_connected(det))`` in a RunEngine); here the
    ophyd-async protocol is driven by hand:

    >>> import asyncio, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> det = SimAsyncEiger("eiger500K_single", tmp.name)
    >>> async def take(det, n):
    ...     await det.connect()
    ...     await det.stage()
    ...     for _ in range(n):
    ...         await det.trigger()
    ...     docs = [doc async for doc in det.collect_asset_docs()]
    ...     await det.unstage()
    ...     return docs
    >>> (_, resource), (_, datum) = asyncio.run(take(det, 2))
    >>> resource["data_key"], resource["mimetype"], resource["parameters"]["dataset"]
    ('eiger500K_single_image', 'application/x-hdf5', '/entry/data/data')
    >>> datum["indices"]
    {'start': 0, 'stop': 2}
    >>> import h5py, urllib.parse
    >>> with h5py.File(urllib.parse.urlparse(resource["uri"]).path, "r") as f:
    ...     bool((f["/entry/data/data"][1] == det.expected_frame(1)).all())
    True
    >>> tmp.cleanup()
    """

    def __init__(
        self,
        name: str,
        path: str | os.PathLike[str] | PathProvider,
        *,
        shape: tuple[int, int] | None = None,
        dtype: DTypeLike = np.uint32,
        seed: int = 0,
    ) -> None:
        self.pattern = EigerPattern(_resolve_shape(name, shape), np.dtype(dtype), seed)
        if isinstance(path, (str, os.PathLike)):
            path_provider: PathProvider = StaticPathProvider(
                UUIDFilenameProvider(), Path(path).absolute()
            )
        else:
            path_provider = path
        self._writer = _EigerHDF5Writer(self.pattern)
        self.add_detector_logics(
            _EigerTriggerLogic(self._writer),
            _EigerAcquireLogic(self._writer),
            _EigerDataLogic(path_provider, self._writer),
        )
        super().__init__(name=name)

    def expected_frame(self, i: int) -> np.ndarray:
        """Frame ``i`` of a run's HDF5 dataset, as this device writes it."""
        return self.pattern.frame(i)
