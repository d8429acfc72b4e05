"""Simulated CHX Eiger detectors that emit real Bluesky documents, for tests and the demo.

Used by this package's tests and by anyone who wants a CHX-like run without hardware.

Which one to use
----------------
:class:`SimEiger` (ophyd v1, synchronous), ``mode="inline"``
    The event carries the frame itself. Simplest to consume: no files, no
    handlers. Use it to test callbacks that only look at ``event["data"]``.
:class:`SimEiger`, ``mode="files"``
    Each frame is written to one ``.npy`` file and the event carries a datum id
    (``external: "FILESTORE:"``), with Resource/Datum documents (spec
    ``"NPY_SEQ"``), as an ophyd area detector with a file plugin does. Consumers
    fill events with ``event_model.Filler(handler_registry, inplace=False)``.
:class:`SimEiger`, ``mode="eiger"``
    What the CHX Eigers write: each trigger is one Eiger series of
    ``frames_per_trigger`` XPCS frames in DECTRIS files (a master file with
    the detector's ``pixel_mask`` and external links to bitshuffle-LZ4 data
    files of ``frames_per_file`` frames), announced by Resource (spec
    ``"AD_EIGER2"``, ``resource_kwargs={"images_per_file": ...}``) and Datum
    (``{"seq_id": k}``) documents as NSLS-II's Eiger devices write them; the
    event's value is the series, ``(frames_per_trigger, rows, cols)``.
    :data:`handler_registry` reads it (area-detector-handlers' ``EigerHandler``
    reads it too while a series fits in one data file).
:class:`SimAsyncEiger` (ophyd-async)
    Each run is one Eiger series in DECTRIS files, as in ``mode="eiger"``
    (SWMR, flushed after every frame); the descriptor says ``external:
    "STREAM:"`` and each data file is announced by a StreamResource and its
    frames by StreamDatum documents, as ophyd-async detectors do. Use it for
    anything that must work with the CHX Eigers of the ophyd-async era.
    Imported lazily: ``ophyd_async`` loads on first use.

All name their data key ``f"{name}_image"`` (``eiger4m_single_image``, ...)
and produce deterministic frames: frame ``i`` of a run (counted from 0 at each
``stage``) equals ``det.expected_frame(i)`` bit for bit. Inline and
``"files"`` frames are dense (:class:`EigerPattern`: fixed speckle plus
``i``); the file-writing Eigers make sparse photon-counting XPCS frames
(:class:`XPCSPattern`: about 0.05 photons per pixel, speckle that
decorrelates with a q-dependent time), both with the Eiger's module gaps at
the dtype's maximum, as the real detector flags them.

A run with a real RunEngine::

    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd_async.plan_stubs import ensure_connected

    RE = RunEngine({})
    RE(count([sim_eiger500k(mode="files", save_path="/tmp/frames")], num=3))
    RE(count([sim_eiger4m(mode="eiger", save_path="/tmp/frames", frames_per_trigger=100)]))
    det = SimAsyncEiger("eiger4m_single", "/tmp/frames")
    RE(ensure_connected(det))
    RE(count([det], num=3))
"""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from numpy.typing import DTypeLike
from ophyd import Component, Device, Signal
from ophyd.sim import NumpySeqHandler
from ophyd.status import DeviceStatus

from chx_masks import BUILTIN_DETECTORS

from ._eiger import (
    EigerSeriesHandler,
    SeriesWriter,
    XPCSPattern,
    detector_pixel_mask,
    frame_spec,
    module_gaps,
)

if TYPE_CHECKING:
    from ._sim_async import SimAsyncEiger

__all__ = [
    "CHX_EIGER_SHAPES",
    "EigerPattern",
    "SimAsyncEiger",
    "SimEiger",
    "XPCSPattern",
    "handler_registry",
    "sim_eiger1m",
    "sim_eiger4m",
    "sim_eiger500k",
]

#: Frame shape (rows, cols) of each CHX Eiger, keyed by ophyd device name.
CHX_EIGER_SHAPES: MappingProxyType[str, tuple[int, int]] = MappingProxyType(
    {
        name: BUILTIN_DETECTORS[f"{name}_image"].shape
        for name in ("eiger4m_single", "eiger1m_single", "eiger500K_single")
    }
)

#: Handlers for the files :class:`SimEiger` writes: pass to ``event_model.Filler``
#: or ``event_model.RunRouter(..., handler_registry=handler_registry)``.
handler_registry: MappingProxyType[str, type] = MappingProxyType(
    {"NPY_SEQ": NumpySeqHandler, "AD_EIGER2": EigerSeriesHandler, "AD_EIGER": EigerSeriesHandler}
)

_Mode = Literal["inline", "files", "eiger"]

_N_HOT_PIXELS = 12


def _resolve_shape(name: str, shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is not None:
        return cast(tuple[int, int], tuple(shape))  # checked by EigerPattern
    try:
        return CHX_EIGER_SHAPES[name]
    except KeyError:
        raise ValueError(
            f"No frame shape known for detector name {name!r}; known CHX Eigers are "
            f"{sorted(CHX_EIGER_SHAPES)}. Pass shape=(rows, cols) for any other name."
        ) from None


@dataclass(frozen=True)
class EigerPattern:
    """Deterministic, cheap Eiger-like frames: fixed speckle plus the frame number.

    The base pattern (Poisson speckle around a beam centre, drawn from ``seed``)
    is computed once per ``(shape, dtype, seed)`` and cached; frame ``i`` is
    ``base + i`` (wrapping modulo the dtype range) with the flagged pixels
    (:attr:`bad_pixels`: inter-module gaps when the shape tiles as Eiger
    modules, and a few hot pixels) at the dtype's maximum, so making a 4M
    frame costs one array addition.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` of a frame.
    dtype : numpy dtype, optional
        An unsigned integer type; ``np.uint32`` (default) or ``np.uint16``.
    seed : int, optional
        Seed of the speckle pattern and of the hot pixel positions.

    Examples
    --------
    >>> import numpy as np
    >>> pattern = EigerPattern((514, 1030), np.uint16)
    >>> frame = pattern.frame(3)
    >>> frame.shape, frame.dtype.name
    ((514, 1030), 'uint16')
    >>> bool((pattern.frame(4)[~pattern.bad_pixels] == frame[~pattern.bad_pixels] + 1).all())
    True
    >>> int(frame[pattern.bad_pixels].min()) == np.iinfo(np.uint16).max
    True
    """

    shape: tuple[int, int]
    dtype: np.dtype = np.dtype(np.uint32)
    seed: int = 0

    def __post_init__(self) -> None:
        shape, dtype = frame_spec(self.shape, self.dtype)
        # Normalised so that equal patterns hash equal and share the cache.
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", shape)

    def frame(self, i: int) -> np.ndarray:
        """Return frame ``i`` (a new, writable array)."""
        base, flagged = _base_pattern(self)
        info = np.iinfo(self.dtype)
        out = base + self.dtype.type(i % (int(info.max) + 1))
        out.reshape(-1)[flagged] = info.max
        return out

    @property
    def bad_pixels(self) -> np.ndarray:
        """Boolean array, True where the detector flags a pixel (gaps, hot pixels)."""
        mask = np.zeros(self.shape, dtype=bool)
        mask.reshape(-1)[_base_pattern(self)[1]] = True
        return mask


# A few patterns at most are alive in a session; a 4M base is 18 MB.
@functools.lru_cache(maxsize=4)
def _base_pattern(pattern: EigerPattern) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(pattern.seed)
    rows, cols = pattern.shape
    # Beam centre on a module, clear of the gaps, with a SAXS-like falloff.
    r, c = np.ogrid[:rows, :cols]
    radius = np.hypot(r - 0.55 * rows, c - 0.45 * cols)
    intensity = 1.0 + 400.0 / (1.0 + (radius / 40.0) ** 2)
    base = rng.poisson(intensity).astype(pattern.dtype)
    flagged = module_gaps(pattern.shape)
    if flagged is None:
        flagged = np.zeros(pattern.shape, dtype=bool)
    hot = rng.choice(rows * cols, size=min(_N_HOT_PIXELS, rows * cols), replace=False)
    flagged.reshape(-1)[hot] = True
    flat = np.flatnonzero(flagged)
    base.reshape(-1)[flat] = np.iinfo(pattern.dtype).max
    # Shared by every frame: must never be written to.
    base.flags.writeable = False
    flat.flags.writeable = False
    return base, flat


class _FrameSignal(Signal):
    """The ``image`` component: a frame (inline) or a datum id (files)."""

    def describe(self) -> dict[str, dict[str, Any]]:
        eiger = self.parent
        shape = list(eiger.pattern.shape)
        if eiger.mode == "eiger":
            shape = [eiger.frames_per_trigger, *shape]
        key: dict[str, Any] = {
            "source": f"SIM:{self.name}",
            "dtype": "array",
            "shape": shape,
            "dtype_numpy": eiger.pattern.dtype.str,
        }
        if eiger.mode != "inline":
            key["external"] = "FILESTORE:"
        return {self.name: key}


class SimEiger(Device):
    """A simulated CHX Eiger for ophyd v1 / ``bluesky.plans.count``.

    Parameters
    ----------
    name : str, optional
        ophyd device name; the data key is ``f"{name}_image"``. One of
        :data:`CHX_EIGER_SHAPES` unless ``shape`` is given.
    shape : tuple of int, optional
        ``(rows, cols)``; defaults from ``name``.
    dtype : numpy dtype, optional
        ``np.uint32`` (default, as the CHX Eigers) or ``np.uint16``.
    mode : {"inline", "files", "eiger"}, optional
        ``"inline"`` puts the frame in the event; ``"files"`` writes one
        ``.npy`` per frame under ``save_path`` and emits Resource/Datum
        documents (spec ``"NPY_SEQ"``); ``"eiger"`` writes one DECTRIS series
        per trigger (spec ``"AD_EIGER2"``). Both file modes are read with
        :data:`handler_registry`.
    save_path : str or path, optional
        Directory for the file modes; a new temporary directory (not removed)
        if not given.
    seed : int, optional
        Seed of the frame pattern.
    frames_per_trigger : int, optional
        ``mode="eiger"``: frames in each series (default 1).
    frames_per_file : int, optional
        ``mode="eiger"``: frames per data file (default 1000).
    mean : float, optional
        ``mode="eiger"``: mean photons per pixel per frame (default 0.05).
    pattern : EigerPattern or XPCSPattern, optional
        The frames to make instead of the mode's default.
    **kwargs
        Passed to :class:`ophyd.Device`.

    Examples
    --------
    >>> det = SimEiger("eiger500K_single")
    >>> det.describe()["eiger500K_single_image"]["shape"]
    [514, 1030]
    >>> _ = det.stage()
    >>> _ = det.trigger()
    >>> frame = det.read()["eiger500K_single_image"]["value"]
    >>> _ = det.unstage()
    >>> bool((frame == det.expected_frame(0)).all()), frame.dtype.name
    (True, 'uint32')
    """

    # Not hinted, like an ophyd area detector image: keeps 2-D data out of LiveTable.
    image = Component(_FrameSignal, kind="normal")

    def __init__(
        self,
        name: str = "eiger4m_single",
        *,
        shape: tuple[int, int] | None = None,
        dtype: DTypeLike = np.uint32,
        mode: _Mode = "inline",
        save_path: str | os.PathLike[str] | None = None,
        seed: int = 0,
        frames_per_trigger: int = 1,
        frames_per_file: int = 1000,
        mean: float = 0.05,
        pattern: EigerPattern | XPCSPattern | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in ("inline", "files", "eiger"):
            raise ValueError(f"mode must be 'inline', 'files' or 'eiger', got {mode!r}")
        if int(frames_per_trigger) < 1 or int(frames_per_file) < 1:
            raise ValueError(
                "frames_per_trigger and frames_per_file must be at least 1, got "
                f"{frames_per_trigger} and {frames_per_file}."
            )
        if pattern is None:
            shape = _resolve_shape(name, shape)
            pattern = (
                XPCSPattern(shape, np.dtype(dtype), seed, mean)
                if mode == "eiger"
                else EigerPattern(shape, np.dtype(dtype), seed)
            )
        super().__init__(name=name, **kwargs)
        self.pattern = pattern
        self.mode: _Mode = mode
        self.frames_per_trigger = int(frames_per_trigger)
        self.frames_per_file = int(frames_per_file)
        # Absolute, so the Resource's root still resolves for a consumer elsewhere.
        self.save_path = Path(save_path).absolute() if save_path is not None else None
        self._frame_index = 0
        self._resource: dict[str, Any] | None = None
        self._asset_docs: deque[tuple[str, dict[str, Any]]] = deque()

    def expected_frame(self, i: int) -> np.ndarray:
        """Frame ``i`` of a run (0-based since the last ``stage``), as this device makes it."""
        return self.pattern.frame(i)

    def stage(self) -> list[Any]:
        # Each run starts at frame 0 and, in files mode, a new resource.
        self._frame_index = 0
        self._resource = None
        self._asset_docs.clear()
        return super().stage()

    def unstage(self) -> list[Any]:
        self._resource = None
        self._asset_docs.clear()
        return super().unstage()

    def trigger(self) -> DeviceStatus:
        i = self._frame_index
        if self.mode == "eiger":
            self.image.put(self._write_series(i))
            self._frame_index += self.frames_per_trigger
        else:
            frame = self.pattern.frame(i)
            self.image.put(frame if self.mode == "inline" else self._write_frame(i, frame))
            self._frame_index += 1
        status = DeviceStatus(self)
        status.set_finished()
        return status

    def _new_resource(self, spec: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._resource is None:
            # Created on first use, not at stage, so an unstaged trigger works too.
            if self.save_path is None:
                self.save_path = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            self.save_path.mkdir(parents=True, exist_ok=True)
            self._resource = {
                "spec": spec,
                "root": str(self.save_path),
                "resource_path": f"{self.name}_{uuid.uuid4().hex[:12]}",
                "resource_kwargs": kwargs,
                "path_semantics": "windows" if os.name == "nt" else "posix",
                "uid": str(uuid.uuid4()),
            }
            self._asset_docs.append(("resource", self._resource))
        return self._resource

    def _save_dir(self) -> Path:
        """``save_path``, set by the run's first :meth:`_new_resource` if it was None."""
        if self.save_path is None:
            raise RuntimeError(f"{self.name}: save_path was set to None during a run.")
        return self.save_path

    def _write_series(self, first: int) -> str:
        """One Eiger series from frame ``first``: DECTRIS files, one Datum (its seq_id)."""
        resource = self._new_resource("AD_EIGER2", {"images_per_file": self.frames_per_file})
        seq_id = first // self.frames_per_trigger + 1
        pixel_mask = detector_pixel_mask(self.pattern)
        with SeriesWriter(
            self._save_dir(),
            f"{resource['resource_path']}_{seq_id}",
            self.pattern.shape,
            self.pattern.dtype,
            frames_per_file=self.frames_per_file,
            pixel_mask=pixel_mask,
        ) as series:
            for i in range(first, first + self.frames_per_trigger):
                series.write(self.pattern.frame(i))
        datum_id = f"{resource['uid']}/{seq_id}"
        self._asset_docs.append(
            (
                "datum",
                {
                    "resource": resource["uid"],
                    "datum_id": datum_id,
                    "datum_kwargs": {"seq_id": seq_id},
                },
            )
        )
        return datum_id

    def _write_frame(self, i: int, frame: np.ndarray) -> str:
        resource = self._new_resource("NPY_SEQ", {})
        # The file name is the NumpySeqHandler convention: {root}/{resource_path}_{index}.npy
        path = self._save_dir() / f"{resource['resource_path']}_{i}.npy"
        np.save(path, frame, allow_pickle=False)
        datum_id = f"{resource['uid']}/{i}"
        self._asset_docs.append(
            (
                "datum",
                {
                    "resource": resource["uid"],
                    "datum_id": datum_id,
                    "datum_kwargs": {"index": i},
                },
            )
        )
        return datum_id

    def collect_asset_docs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while self._asset_docs:
            yield self._asset_docs.popleft()


def sim_eiger4m(**kwargs: Any) -> SimEiger:
    """A simulated Eiger 4M, ``eiger4m_single`` (2167x2070); kwargs as :class:`SimEiger`.

    Examples
    --------
    >>> sim_eiger4m().describe()["eiger4m_single_image"]["shape"]
    [2167, 2070]
    """
    return SimEiger("eiger4m_single", **kwargs)


def sim_eiger1m(**kwargs: Any) -> SimEiger:
    """A simulated Eiger 1M, ``eiger1m_single`` (1065x1030); kwargs as :class:`SimEiger`.

    Examples
    --------
    >>> sim_eiger1m(dtype="uint16").describe()["eiger1m_single_image"]["dtype_numpy"]
    '<u2'
    """
    return SimEiger("eiger1m_single", **kwargs)


def sim_eiger500k(**kwargs: Any) -> SimEiger:
    """A simulated Eiger 500K, ``eiger500K_single`` (514x1030); kwargs as :class:`SimEiger`.

    Examples
    --------
    >>> sim_eiger500k(mode="files").describe()["eiger500K_single_image"]["external"]
    'FILESTORE:'
    """
    return SimEiger("eiger500K_single", **kwargs)


def __getattr__(name: str) -> Any:
    # ophyd-async costs ~0.25 s to import; only its users should pay it.
    if name == "SimAsyncEiger":
        from ._sim_async import SimAsyncEiger

        return SimAsyncEiger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
