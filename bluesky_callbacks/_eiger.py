"""DECTRIS Eiger files as the CHX Eigers write them, and XPCS frames to put in them.

What a real series looks like on disk (SIMPLON file writer, NeXus layout):

``<prefix>_master.h5``
    ``/entry/instrument/detector/detectorSpecific/pixel_mask`` (uint32, nonzero
    = bad; bits as NeXus ``NXdetector/pixel_mask``: 1 gap, 2 dead, 4 under-,
    8 over-responsive, 16 noisy), the detector geometry and timing, and
    external links ``/entry/data/data_000001``, ``data_000002``, ... to
``<prefix>_data_000001.h5``, ...
    ``/entry/data/data``: ``frames_per_file`` frames each (the last file may
    hold fewer), bitshuffle+LZ4 (HDF5 filter 32008), one chunk per frame.

:class:`SeriesWriter` writes such a series frame by frame (files readable
while the series is written, SWMR); :class:`EigerSeriesHandler` reads one
back for Bluesky Resource/Datum documents of spec ``AD_EIGER2``;
:class:`XPCSPattern` makes photon-counting XPCS frames.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The chunk codec (._decode), importable from here too.
from ._decode import decodable as decodable
from ._decode import decode_chunk as decode_chunk
from ._decode import decode_pool as decode_pool
from ._decode import decode_threads as decode_threads
from ._decode import encode_chunk as encode_chunk
from ._decode import raw_chunks as raw_chunks
from ._decode import read_frames as read_frames
from ._decode import remask_chunk as remask_chunk

__all__ = [
    "DATA_PATH",
    "PIXEL_MASK_PATH",
    "EigerSeriesHandler",
    "SeriesWriter",
    "XPCSPattern",
    "data_file_name",
    "master_file_name",
]

#: The frames inside every data file.
DATA_PATH = "/entry/data/data"
#: The detector's own bad-pixel map inside the master file.
PIXEL_MASK_PATH = "/entry/instrument/detector/detectorSpecific/pixel_mask"

# NeXus NXdetector/pixel_mask bits.
GAP, DEAD, NOISY = 1, 2, 16

# Eiger module geometry: 514x1030 pixels per module, modules tiled with gaps of
# 37 rows and 10 columns (4M: 4x2 modules -> 2167x2070).
_MODULE = (514, 1030)
_GAP = (37, 10)


def master_file_name(prefix: str) -> str:
    """The master file of a series, as the DECTRIS file writer names it.

    Examples
    --------
    >>> master_file_name("scan_7f3a_1")
    'scan_7f3a_1_master.h5'
    """
    return f"{prefix}_master.h5"


def data_file_name(prefix: str, number: int) -> str:
    """Data file ``number`` (from 1) of a series.

    Examples
    --------
    >>> data_file_name("scan_7f3a_1", 2)
    'scan_7f3a_1_data_000002.h5'
    """
    return f"{prefix}_data_{number:06d}.h5"


def module_gaps(shape: tuple[int, int]) -> np.ndarray | None:
    """Boolean gap map if ``shape`` tiles as Eiger modules, else None.

    Examples
    --------
    >>> gaps = module_gaps((1065, 1030))
    >>> int(gaps.sum()), bool(gaps[514:551].all())
    (38110, True)
    >>> module_gaps((100, 100)) is None
    True
    """
    counts = []
    for size, module, gap in zip(shape, _MODULE, _GAP, strict=True):
        n, rest = divmod(size + gap, module + gap)
        if rest:
            return None
        counts.append(n)
    gaps = np.zeros(shape, dtype=bool)
    for n in range(1, counts[0]):
        start = n * (_MODULE[0] + _GAP[0]) - _GAP[0]
        gaps[start : start + _GAP[0], :] = True
    for n in range(1, counts[1]):
        start = n * (_MODULE[1] + _GAP[1]) - _GAP[1]
        gaps[:, start : start + _GAP[1]] = True
    return gaps


# ------------------------------------------------------------------ frames


def frame_spec(shape: Any, dtype: Any) -> tuple[tuple[int, int], np.dtype]:
    """``(shape, dtype)`` of Eiger frames, checked: two positive sizes, unsigned integers.

    Examples
    --------
    >>> frame_spec([514, 1030], "uint16")
    ((514, 1030), dtype('uint16'))
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "u":
        raise ValueError(
            f"Eiger frames are unsigned integers, got dtype={dtype.name!r}; "
            "use np.uint32 (the default) or np.uint16."
        )
    checked = tuple(int(n) for n in shape)
    if len(checked) != 2 or min(checked) <= 0:
        raise ValueError(f"shape must be two positive sizes (rows, cols), got {shape!r}")
    return checked, dtype


@dataclass(frozen=True)
class XPCSPattern:
    """Photon-counting XPCS frames: speckle that decorrelates, sparse Poisson counts.

    Frame ``i`` is drawn from Poisson counts of mean ``envelope * |E_i|**2``,
    where ``E_i`` is a complex Gaussian speckle field (speckles about
    ``speckle`` pixels wide) that evolves as an AR(1) process: between
    frames it keeps a fraction ``exp(-dt / tau(q))`` of itself, with
    ``tau(q) = tau * (q_ref / q)**2`` (diffusion), ``q`` the distance from
    the beam centre in pixels. The intensity correlation ``g2`` of a pixel
    thus decays from about 2 towards 1, faster at larger ``q``. The envelope
    is a SAXS-like falloff scaled so that a pixel holds ``mean`` photons per
    frame on average. The Eiger's module gaps and a few dead pixels read the
    dtype's maximum (the detector's flag value) and are in
    :attr:`pixel_mask`; a few hot pixels count hundreds of photons in every
    frame and are *not* in the detector's pixel mask (that is what beamline
    masks are for).

    Deterministic: frame ``i`` depends only on ``(shape, dtype, seed,
    mean, tau, speckle)``. Frames are cheapest made in order (each step
    evolves the field once); going back restarts from frame 0.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)``.
    dtype : numpy dtype
        ``np.uint32`` (default, as the CHX Eigers) or ``np.uint16``.
    seed : int
    mean : float
        Mean photons per pixel per frame (default 0.05).
    tau : float
        Correlation time in frames at ``q_ref`` = 100 pixels from the centre.
    speckle : int
        Speckle size in pixels.

    Examples
    --------
    >>> import numpy as np
    >>> pattern = XPCSPattern((514, 1030), mean=0.05)
    >>> frame = pattern.frame(0)
    >>> frame.shape, frame.dtype.name
    ((514, 1030), 'uint32')
    >>> good = ~pattern.flagged
    >>> 0.03 < frame[good].mean() < 0.08 and float((frame[good] == 0).mean()) > 0.9
    True
    >>> bool((pattern.frame(0) == frame).all())
    True
    >>> int(pattern.pixel_mask.max()) <= 16 and bool(pattern.bad_pixels[pattern.flagged].all())
    True
    """

    shape: tuple[int, int]
    dtype: np.dtype = np.dtype(np.uint32)
    seed: int = 0
    mean: float = 0.05
    tau: float = 20.0
    speckle: int = 2

    def __post_init__(self) -> None:
        shape, dtype = frame_spec(self.shape, self.dtype)
        if not self.mean > 0 or not self.tau > 0 or int(self.speckle) < 1:
            raise ValueError(
                f"mean and tau must be positive and speckle at least 1, got mean={self.mean}, "
                f"tau={self.tau}, speckle={self.speckle}."
            )
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "speckle", int(self.speckle))

    # -------------------------------------------------------------- maps

    @property
    def pixel_mask(self) -> np.ndarray:
        """The detector's ``pixel_mask`` (uint32, NeXus bits): gaps (1) and dead pixels (2)."""
        return _static(self).pixel_mask.copy()

    @property
    def flagged(self) -> np.ndarray:
        """True where the detector flags a pixel (its frames hold the dtype's maximum)."""
        return _static(self).pixel_mask != 0

    @property
    def hot_pixels(self) -> np.ndarray:
        """True on the hot pixels (high counts, not flagged by the detector)."""
        mask = np.zeros(self.shape, dtype=bool)
        mask.reshape(-1)[_static(self).hot] = True
        return mask

    @property
    def bad_pixels(self) -> np.ndarray:
        """True where a mask must cut: flagged pixels and hot pixels."""
        return self.flagged | self.hot_pixels

    @property
    def beam_center(self) -> tuple[float, float]:
        """``(row, col)`` of the direct beam (off the module gaps)."""
        return _static(self).center

    def correlation_time(self, q: float | np.ndarray) -> float | np.ndarray:
        """Intensity correlation time, in frames, at ``q`` pixels from the centre.

        ``g2(lag) - 1`` is about ``exp(-2 * lag / correlation_time(q))``.

        Examples
        --------
        >>> float(XPCSPattern((514, 1030), tau=20).correlation_time(200.0))
        5.0
        """
        return self.tau * (_Q_REF / np.maximum(q, 1.0)) ** 2

    # ------------------------------------------------------------ frames

    def frame(self, i: int) -> np.ndarray:
        """Return frame ``i`` (a new, writable array)."""
        i = int(i)
        if i < 0:
            raise ValueError(f"frame numbers start at 0, got {i}")
        field = _field(self, i)
        static = _static(self)
        rng = np.random.default_rng([self.seed, 1, i])
        intensity = (field.real**2 + field.imag**2) * static.weight
        if self.speckle > 1:
            intensity = np.repeat(np.repeat(intensity, self.speckle, 0), self.speckle, 1)
        rows, cols = self.shape
        lam = intensity[:rows, :cols].reshape(-1)
        # Independent Poisson counts = a Poisson total spread over the pixels
        # in proportion to their means: far cheaper than one draw per pixel
        # when most pixels see no photon.
        cumulative = np.cumsum(lam, dtype=np.float64)
        total = rng.poisson(cumulative[-1])
        hits = np.searchsorted(cumulative, rng.random(total) * cumulative[-1], side="right")
        counts = np.bincount(np.minimum(hits, lam.size - 1), minlength=lam.size)
        out = counts.astype(self.dtype).reshape(self.shape)
        flat = out.reshape(-1)
        flat[static.hot] = rng.poisson(300.0, static.hot.size).astype(self.dtype)
        flat[static.flagged] = np.iinfo(self.dtype).max
        return out


_Q_REF = 100.0
_N_HOT = 12
_N_DEAD = 8


@dataclass(frozen=True)
class _Static:
    pixel_mask: np.ndarray
    flagged: np.ndarray  # flat indices
    hot: np.ndarray  # flat indices
    weight: np.ndarray  # mean photons per speckle cell, at field resolution
    keep: np.ndarray  # fraction of the field kept per frame, at field resolution
    fresh: np.ndarray  # weight of the new field drawn per frame: sqrt(1 - keep**2)
    center: tuple[float, float]


@functools.lru_cache(maxsize=4)
def _static(pattern: XPCSPattern) -> _Static:
    rng = np.random.default_rng([pattern.seed, 0])
    rows, cols = pattern.shape
    pixel_mask = np.zeros(pattern.shape, dtype=np.uint32)
    gaps = module_gaps(pattern.shape)
    if gaps is not None:
        pixel_mask[gaps] = GAP
    free = np.flatnonzero(pixel_mask.reshape(-1) == 0)
    chosen = rng.choice(free, size=min(_N_DEAD + _N_HOT, free.size), replace=False)
    dead, hot = chosen[:_N_DEAD], chosen[_N_DEAD:]
    pixel_mask.reshape(-1)[dead] = DEAD
    center = (0.55 * rows, 0.45 * cols)
    s = pattern.speckle
    fr, fc = -(-rows // s), -(-cols // s)
    r, c = np.ogrid[:fr, :fc]
    q = np.hypot((r + 0.5) * s - center[0], (c + 0.5) * s - center[1])
    envelope = 1.0 / (1.0 + (q / 150.0) ** 2) ** 1.5
    # Scale so that a pixel receives `mean` photons per frame on average.
    weight = envelope * (pattern.mean / envelope.mean())
    tau = pattern.correlation_time(q)
    # |E|^2 decorrelates as keep**(2 lag): keep = exp(-1/tau) gives g2-1 = exp(-2 lag/tau).
    keep = np.exp(-1.0 / tau)
    flagged = np.flatnonzero(pixel_mask)
    keep = keep.astype(np.float32)
    fresh = np.sqrt(1.0 - keep**2).astype(np.float32)
    for array in (pixel_mask, flagged, hot, weight, keep, fresh):
        array.flags.writeable = False
    return _Static(
        pixel_mask, flagged, np.sort(hot), weight.astype(np.float32), keep, fresh, center
    )


class _FieldState:
    """The speckle field of the last frame made, per pattern (frames come in order)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.index = -1
        self.field: np.ndarray | None = None


@functools.lru_cache(maxsize=4)
def _state(pattern: XPCSPattern) -> _FieldState:
    return _FieldState()


def _draw(pattern: XPCSPattern, shape: tuple[int, ...], i: int) -> np.ndarray:
    rng = np.random.default_rng([pattern.seed, 2, i])
    z = rng.standard_normal((2, *shape), dtype=np.float32)
    return (z[0] + 1j * z[1]).astype(np.complex64) * np.float32(np.sqrt(0.5))


def _field(pattern: XPCSPattern, i: int) -> np.ndarray:
    static = _static(pattern)
    state = _state(pattern)
    with state.lock:
        if state.field is None or state.index > i:
            state.field, state.index = _draw(pattern, static.keep.shape, 0), 0
        while state.index < i:
            state.index += 1
            state.field = static.keep * state.field + static.fresh * _draw(
                pattern, static.keep.shape, state.index
            )
        return state.field


def detector_pixel_mask(pattern: Any) -> np.ndarray:
    """The ``pixel_mask`` a detector making ``pattern``'s frames writes in its master file.

    An :class:`XPCSPattern` has its own (gaps and dead pixels); for other
    patterns every bad pixel is flagged (bit 1).

    Examples
    --------
    >>> int(detector_pixel_mask(XPCSPattern((514, 1030))).max())
    2
    """
    pixel_mask = getattr(pattern, "pixel_mask", None)
    return pattern.bad_pixels.astype(np.uint32) if pixel_mask is None else pixel_mask


# ------------------------------------------------------------------ writing


def _h5py() -> Any:
    from chx_masks.io import h5py_with_filters

    return h5py_with_filters()


def _bitshuffle_lz4() -> dict[str, Any]:
    import hdf5plugin

    return dict(hdf5plugin.Bitshuffle(cname="lz4"))


class SeriesWriter:
    """Write one Eiger series in the DECTRIS layout, frame by frame.

    The master file is written when the series opens (with the pixel mask
    and detector metadata); each data file is created when its first frame
    arrives and linked from the master at once, so a reader sees every
    frame written so far (files are flushed after every frame, SWMR).

    Parameters
    ----------
    directory : str or Path
    prefix : str
        File name prefix: ``<prefix>_master.h5``, ``<prefix>_data_000001.h5``.
    shape, dtype :
        Frame shape and dtype.
    frames_per_file : int
        Frames in each data file (the DECTRIS ``nimages_per_file``).
    pixel_mask : ndarray, optional
        The detector's pixel mask (uint32); zeros if not given.
    metadata : dict, optional
        Numbers written under ``/entry/instrument/detector`` (``frame_time``,
        ``count_time``, ``beam_center_x``, ...); sensible values otherwise.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> tmp = tempfile.mkdtemp()
    >>> with SeriesWriter(tmp, "s_1", (4, 6), np.uint32, frames_per_file=2) as w:
    ...     for i in range(3):
    ...         w.write(np.full((4, 6), i, np.uint32))
    >>> sorted(p.name for p in Path(tmp).iterdir())
    ['s_1_data_000001.h5', 's_1_data_000002.h5', 's_1_master.h5']
    >>> handler = EigerSeriesHandler(f"{tmp}/s", images_per_file=2)
    >>> handler(seq_id=1)[:, 0, 0].tolist()
    [0, 1, 2]
    >>> handler.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        prefix: str,
        shape: tuple[int, int],
        dtype: Any,
        *,
        frames_per_file: int = 1000,
        pixel_mask: np.ndarray | None = None,
        metadata: dict[str, float] | None = None,
    ) -> None:
        if int(frames_per_file) < 1:
            raise ValueError(f"frames_per_file must be at least 1, got {frames_per_file}")
        self.directory = Path(directory).absolute()
        self.prefix = prefix
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.frames_per_file = int(frames_per_file)
        self.count = 0
        self.data_files: list[Path] = []
        self._data: Any = None
        h5py = _h5py()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.master = self.directory / master_file_name(prefix)
        rows, cols = self.shape
        md = {
            "x_pixel_size": 75e-6,
            "y_pixel_size": 75e-6,
            "detector_distance": 16.0,
            "frame_time": 0.00134,
            "count_time": 0.00133,
            "beam_center_x": 0.45 * cols,
            "beam_center_y": 0.55 * rows,
            **(metadata or {}),
        }
        mask = (
            np.zeros(self.shape, np.uint32)
            if pixel_mask is None
            else np.asarray(pixel_mask, dtype=np.uint32)
        )
        self._master = h5py.File(self.master, "w", libver="latest")
        detector = self._master.require_group("/entry/instrument/detector")
        for name, value in md.items():
            detector.create_dataset(name, data=value)
        self._master.create_dataset("/entry/instrument/beam/incident_wavelength", data=1.2848)
        specific = detector.require_group("detectorSpecific")
        specific.create_dataset("nimages_per_file", data=self.frames_per_file)
        specific.create_dataset("x_pixels_in_detector", data=cols)
        specific.create_dataset("y_pixels_in_detector", data=rows)
        specific.create_dataset("pixel_mask", data=mask, chunks=mask.shape, **_bitshuffle_lz4())
        self._master.require_group("/entry/data")
        self._master.flush()

    def write(self, frame: np.ndarray) -> None:
        """Append one frame (``shape``, ``dtype``) to the series."""
        if self._master is None:
            raise RuntimeError(f"The series {self.prefix} is closed; open a new SeriesWriter.")
        if self._data is None or self._data.shape[0] == self.frames_per_file:
            self._next_file()
        n = self._data.shape[0]
        self._data.resize(n + 1, axis=0)
        self._data[n] = frame
        self.count += 1
        self._data.attrs["image_nr_high"] = self.count
        self._data.flush()

    def _next_file(self) -> None:
        h5py = _h5py()
        self._close_data()
        number = len(self.data_files) + 1
        path = self.directory / data_file_name(self.prefix, number)
        handle = h5py.File(path, "w", libver="latest")
        rows, cols = self.shape
        self._data = handle.create_dataset(
            DATA_PATH,
            shape=(0, rows, cols),
            maxshape=(self.frames_per_file, rows, cols),
            chunks=(1, rows, cols),
            dtype=self.dtype,
            **_bitshuffle_lz4(),
        )
        self._data.attrs["image_nr_low"] = self.count + 1
        self._data.attrs["image_nr_high"] = self.count
        handle.swmr_mode = True
        self.data_files.append(path)
        # Relative, as the DECTRIS writer links: the series can be moved as a whole.
        self._master[f"/entry/data/data_{number:06d}"] = h5py.ExternalLink(path.name, DATA_PATH)
        self._master.flush()

    def _close_data(self) -> None:
        if self._data is not None:
            self._data.file.close()
            self._data = None

    def close(self) -> None:
        """Close the data file being written and the master file."""
        self._close_data()
        if self._master is not None:
            self._master.close()
            self._master = None

    def __enter__(self) -> SeriesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_stem(name: str) -> str:
    """``name`` (a data key) with only letters, digits, ``-``, ``_`` and ``.``, for a file name.

    Examples
    --------
    >>> file_stem("eiger4m_single_image")
    'eiger4m_single_image'
    >>> file_stem("a/b c")
    'a_b_c'
    """
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def frames_dataset(
    file: Any, frame_shape: tuple[int, ...], dtype: Any, frames: int | None = None
) -> Any:
    """``DATA_PATH`` in an open HDF5 file: bitshuffle-LZ4, one chunk per frame.

    ``frames`` frames, or none yet and growing along the first axis if None.
    Chunks are written with ``write_direct_chunk`` and :func:`encode_chunk`.
    """
    frame_shape = tuple(int(n) for n in frame_shape)
    grows = frames is None
    return file.create_dataset(
        DATA_PATH,
        shape=(0 if grows else frames, *frame_shape),
        maxshape=(None, *frame_shape) if grows else None,
        dtype=np.dtype(dtype),
        chunks=(1, *frame_shape),
        **_bitshuffle_lz4(),
    )


# ------------------------------------------------------------------ reading


class EigerSeriesHandler:
    """Read Eiger series for Resource/Datum documents of spec ``AD_EIGER2`` (and ``AD_EIGER``).

    The same Resource and Datum as NSLS-II's Eiger ophyd devices write and
    area-detector-handlers' ``EigerHandler`` reads: the Resource's path is
    the series prefix without its sequence number, ``resource_kwargs``
    ``{"images_per_file": N}`` (or the older ``frame_per_point``), each
    Datum ``{"seq_id": k}`` (optionally ``"frame_num"``) names the series
    ``<path>_<k>_master.h5``. A datum reads the whole series, every data
    file in order (or one frame of it with ``frame_num``), as a NumPy array.

    Pass it to ``event_model.Filler`` or :class:`~bluesky_callbacks.MaskingRouter`
    as ``handler_registry={"AD_EIGER2": EigerSeriesHandler}``.

    Examples
    --------
    See :class:`SeriesWriter`.
    """

    specs = frozenset({"AD_EIGER2", "AD_EIGER"})

    def __init__(
        self, fpath: str, images_per_file: int | None = None, frame_per_point: int | None = None
    ) -> None:
        if images_per_file is None and frame_per_point is None:
            raise ValueError("An AD_EIGER2 resource needs images_per_file (or frame_per_point).")
        self._prefix = fpath
        self._files: dict[Path, Any] = {}

    def _master(self, seq_id: int) -> Any:
        path = Path(f"{self._prefix}_{seq_id}_master.h5").absolute()
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = _h5py().File(path, "r")
        return handle

    def datasets(self, seq_id: int) -> list[Any]:
        """The data files' frame datasets of series ``seq_id``, in order."""
        entry = self._master(seq_id)["/entry/data"]
        names = sorted(k for k in entry if k.startswith("data_"))
        return [entry[name] for name in names]

    def __call__(self, seq_id: int, frame_num: int | None = None) -> np.ndarray:
        datasets = self.datasets(seq_id)
        if frame_num is not None:
            for dataset in datasets:
                if frame_num < dataset.shape[0]:
                    return dataset[frame_num]
                frame_num -= dataset.shape[0]
            raise IndexError(f"series {seq_id} has fewer frames than asked for")
        # A series is hundreds of frames: decoded on threads (read_frames).
        parts = [read_frames(dataset) for dataset in datasets]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def get_file_list(self, datum_kwargs: Any) -> list[str]:
        """The files of the series that these datums name (master and data files)."""
        out: list[str] = []
        for kwargs in datum_kwargs:
            master = self._master(kwargs["seq_id"])
            out.append(master.filename)
            entry, folder = master["/entry/data"], Path(master.filename).parent
            out.extend(
                str(folder / entry.get(k, getlink=True).filename)
                for k in sorted(entry)
                if k.startswith("data_")
            )
        return out

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
