"""The ophyd-async simulated Eiger behind :class:`bluesky_callbacks.sim.SimAsyncEiger`.

Kept apart so that importing :mod:`bluesky_callbacks.sim` does not import ophyd-async.
Modelled on ``ophyd_async.sim.SimBlobDetector`` (trigger, acquire and data logic).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.protocols import StreamAsset
from event_model import ComposeStreamResource, DataKey, StreamRange
from numpy.typing import DTypeLike
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathProvider,
    StandardDetector,
    StaticPathProvider,
    StreamableDataProvider,
    TriggerInfo,
    UUIDFilenameProvider,
    soft_signal_r_and_setter,
)

from ._eiger import DATA_PATH, SeriesWriter, XPCSPattern, data_file_name, detector_pixel_mask
from .sim import EigerPattern, _resolve_shape

__all__ = ["DATA_PATH", "SimAsyncEiger"]


class _EigerHDF5Writer:
    """Writes the frames of a pattern as one DECTRIS-layout series per run."""

    def __init__(self, pattern: EigerPattern | XPCSPattern, frames_per_file: int) -> None:
        self.pattern = pattern
        self.frames_per_file = frames_per_file
        self.frames_written, self._set_frames_written = soft_signal_r_and_setter(int)
        self.series: SeriesWriter | None = None
        #: The master file of the series written last.
        self.master: Path | None = None
        self.frames_per_trigger = 1
        self.period = 0.0

    def open(self, directory: Path, prefix: str) -> None:
        self.close()
        pixel_mask = detector_pixel_mask(self.pattern)
        self.series = SeriesWriter(
            directory,
            prefix,
            self.pattern.shape,
            self.pattern.dtype,
            frames_per_file=self.frames_per_file,
            pixel_mask=pixel_mask,
        )
        self.master = self.series.master
        self._set_frames_written(0)

    def write_next_frame(self) -> None:
        if self.series is None:
            raise RuntimeError("No series open: the detector must be prepared (or triggered).")
        i = self.series.count
        # Flushed before StreamDatum announces the frame, so readers can always see it.
        self.series.write(self.pattern.frame(i))
        self._set_frames_written(self.series.count)

    async def acquire(self) -> None:
        for _ in range(self.frames_per_trigger):
            # sleep(0) still yields, so the RunEngine stays responsive between frames.
            await asyncio.sleep(self.period)
            self.write_next_frame()

    def close(self) -> None:
        if self.series is not None:
            self.series.close()
        self.series = None


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


class _SeriesDataProvider(StreamableDataProvider):
    """StreamResource per data file, StreamDatum per batch of frames, as files fill up.

    Each data file of the series is its own StreamResource (``uri`` the data
    file, ``dataset`` ``/entry/data/data``), emitted with the first frames
    written into it; StreamDatum ``indices`` count events within that file.
    """

    def __init__(
        self, writer: _EigerHDF5Writer, data_key: str, directory_uri: str, prefix: str
    ) -> None:
        self.writer = writer
        self.data_key = data_key
        self.directory_uri = directory_uri
        self.prefix = prefix
        self.collections_written_signal = writer.frames_written
        self.last_emitted = 0
        self._bundles: dict[int, Any] = {}

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        per_file = self.writer.frames_per_file
        if per_file % collections_per_event:
            raise ValueError(
                f"frames_per_file={per_file} is not a multiple of the {collections_per_event} "
                "frames of each event: an event would straddle two data files."
            )
        pattern = self.writer.pattern
        return {
            self.data_key: DataKey(
                source=f"{self.directory_uri}{self.prefix}_master.h5",
                shape=[collections_per_event, *pattern.shape],
                dtype="array",
                dtype_numpy=pattern.dtype.str,
                external="STREAM:",
            )
        }

    async def make_stream_docs(
        self, collections_written: int, collections_per_event: int
    ) -> AsyncIterator[StreamAsset]:
        events_per_file = self.writer.frames_per_file // collections_per_event
        written = collections_written // collections_per_event
        while self.last_emitted < written:
            number, first = divmod(self.last_emitted, events_per_file)
            stop = min(written - self.last_emitted + first, events_per_file)
            bundle = self._bundles.get(number)
            if bundle is None:
                rows, cols = self.writer.pattern.shape
                bundle = self._bundles[number] = ComposeStreamResource()(
                    mimetype="application/x-hdf5",
                    uri=f"{self.directory_uri}{data_file_name(self.prefix, number + 1)}",
                    data_key=self.data_key,
                    parameters={
                        "dataset": DATA_PATH,
                        "chunk_shape": (collections_per_event, rows, cols),
                    },
                    uid=None,
                    validate=True,
                )
                yield "stream_resource", bundle.stream_resource_doc
            yield "stream_datum", bundle.compose_stream_datum(StreamRange(start=first, stop=stop))
            self.last_emitted += stop - first


class _EigerDataLogic(DetectorDataLogic):
    # The CHX data key is "<device name>_image", not ophyd-async's bare device name.
    datakey_suffix = "_image"

    def __init__(self, path_provider: PathProvider, writer: _EigerHDF5Writer) -> None:
        self.path_provider = path_provider
        self.writer = writer

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        path_info = self.path_provider(datakey_name)
        self.writer.open(Path(path_info.directory_path), path_info.filename)
        return _SeriesDataProvider(
            self.writer, datakey_name, path_info.directory_uri, path_info.filename
        )

    async def stop(self) -> None:
        self.writer.close()

    def get_hinted_fields(self, datakey_name: str) -> list[str]:
        return [datakey_name]


class SimAsyncEiger(StandardDetector):
    """A simulated CHX Eiger for ophyd-async: DECTRIS files, StreamResource/StreamDatum docs.

    Each run (each ``stage``) writes one Eiger series in ``path`` as the
    DECTRIS file writer does: ``<uuid>_master.h5`` (the detector's
    ``pixel_mask`` and external links ``/entry/data/data_000001``, ...) and
    data files ``<uuid>_data_000001.h5``, ... holding ``frames_per_file``
    frames each in ``/entry/data/data``, bitshuffle-LZ4, one chunk per frame,
    SWMR, flushed after each frame (see :mod:`bluesky_callbacks._eiger`).

    The data key is ``f"{name}_image"`` with ``external: "STREAM:"`` and, as
    for every ophyd-async detector, ``shape == [1, rows, cols]`` (frames per
    event first). Each data file is one StreamResource, emitted with its
    first frame: ``mimetype="application/x-hdf5"``, ``uri`` the data file's
    ``file://`` URI, ``parameters == {"dataset": "/entry/data/data",
    "chunk_shape": (1, rows, cols)}``; StreamDatum ``indices`` ``{"start": a,
    "stop": b}`` are the frames ``a:b`` of that file. Frame ``i`` of the run
    equals :meth:`expected_frame` ``(i)``.

    Parameters
    ----------
    name : str
        Device name (``"eiger4m_single"``, ``"eiger1m_single"``,
        ``"eiger500K_single"``, or any name with ``shape`` given).
    path : str, path or ophyd_async.core.PathProvider
        Directory for the files (created if missing), or a path provider
        deciding directory and file prefix per run.
    shape : tuple of int, optional
        ``(rows, cols)``; defaults from ``name``.
    dtype : numpy dtype, optional
        ``np.uint32`` (default) or ``np.uint16``.
    seed : int, optional
        Seed of the frames.
    frames_per_file : int, optional
        Frames per data file (the Eiger's ``nimages_per_file``; default 1000).
    mean : float, optional
        Mean photons per pixel per frame of the XPCS frames (default 0.05).
    pattern : EigerPattern or XPCSPattern, optional
        The frames to write instead of ``XPCSPattern(shape, dtype, seed, mean)``.

    Examples
    --------
    Connect it first (``RE(ensure_connected(det))`` in a RunEngine); here the
    ophyd-async protocol is driven by hand:

    >>> import asyncio, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> det = SimAsyncEiger("eiger500K_single", tmp.name, frames_per_file=2)
    >>> async def take(det, n):
    ...     await det.connect()
    ...     await det.stage()
    ...     for _ in range(n):
    ...         await det.trigger()
    ...     docs = [doc async for doc in det.collect_asset_docs()]
    ...     await det.unstage()
    ...     return docs
    >>> docs = asyncio.run(take(det, 3))
    >>> [(name, doc.get("indices")) for name, doc in docs]  # doctest: +NORMALIZE_WHITESPACE
    [('stream_resource', None), ('stream_datum', {'start': 0, 'stop': 2}),
     ('stream_resource', None), ('stream_datum', {'start': 0, 'stop': 1})]
    >>> resource = docs[2][1]
    >>> resource["uri"].endswith("_data_000002.h5"), resource["parameters"]["dataset"]
    (True, '/entry/data/data')
    >>> from chx_masks.io import h5py_with_filters
    >>> import urllib.parse
    >>> with h5py_with_filters().File(urllib.parse.urlparse(resource["uri"]).path) as f:
    ...     bool((f["/entry/data/data"][0] == det.expected_frame(2)).all())
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
        frames_per_file: int = 1000,
        mean: float = 0.05,
        pattern: EigerPattern | XPCSPattern | None = None,
    ) -> None:
        if pattern is None:
            pattern = XPCSPattern(_resolve_shape(name, shape), np.dtype(dtype), seed, mean)
        self.pattern = pattern
        if int(frames_per_file) < 1:
            raise ValueError(f"frames_per_file must be at least 1, got {frames_per_file}")
        if isinstance(path, (str, os.PathLike)):
            path_provider: PathProvider = StaticPathProvider(
                UUIDFilenameProvider(), Path(path).absolute()
            )
        else:
            path_provider = path
        self._writer = _EigerHDF5Writer(self.pattern, int(frames_per_file))
        self.add_detector_logics(
            _EigerTriggerLogic(self._writer),
            _EigerAcquireLogic(self._writer),
            _EigerDataLogic(path_provider, self._writer),
        )
        super().__init__(name=name)

    def expected_frame(self, i: int) -> np.ndarray:
        """Frame ``i`` of a run (0-based, counted over the series' data files)."""
        return self.pattern.frame(i)

    @property
    def master_file(self) -> Path | None:
        """The master file of the last series (run) written, or None before the first."""
        return self._writer.master
