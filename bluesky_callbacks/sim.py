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
:class:`SimAsyncEiger` (ophyd-async)
    Frames go into one HDF5 file per run (``/entry/data/data``, SWMR, flushed
    after every frame); the descriptor says ``external: "STREAM:"`` and the
    frames are announced by StreamResource/StreamDatum documents, as ophyd-async
    detectors do. Use it for anything that must work with the CHX Eigers of the
    ophyd-async era. Imported lazily: ``ophyd_async`` loads on first use.

All three name their data key ``f"{name}_image"`` (``eiger4m_single_image``,
...) and produce the same deterministic frames: frame ``i`` of a run (counted
from 0 at each ``stage``) equals ``det.expected_frame(i)`` bit for bit. A frame
is a Poisson speckle pattern fixed by ``seed``, plus ``i``, with the Eiger
inter-module gaps and a few hot pixels held at the dtype's maximum, as the
real detector flags them (see :class:`EigerPattern`).

A run with a real RunEngine::

    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd_async.plan_stubs import ensure_connected

    RE = RunEngine({})
    RE(count([sim_eiger500k(mode="files", save_path="/tmp/frames")], num=3))
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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import DTypeLike
from ophyd import Component, Device, Signal
from ophyd.sim import NumpySeqHandler
from ophyd.status import DeviceStatus

from chx_masks import BUILTIN_DETECTORS

if TYPE_CHECKING:
    from ._sim_async import SimAsyncEiger

__all__ = [
    "CHX_EIGER_SHAPES",
    "EigerPattern",
    "SimAsyncEiger",
    "SimEiger",
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
handler_registry: MappingProxyType[str, type] = MappingProxyType({"NPY_SEQ": NumpySeqHandler})

_Mode = Literal["inline", "files"]

# Eiger module geometry: 514x1030 pixels per module, modules tiled with gaps of
# 37 rows and 10 columns (4M: 4x2 modules -> 2167x2070).
_MODULE = (514, 1030)
_GAP = (37, 10)
_N_HOT_PIXELS = 12


def _resolve_shape(name: str, shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is not None:
        return tuple(shape)  # checked by EigerPattern
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
        dtype = np.dtype(self.dtype)
        if dtype.kind != "u":
            raise ValueError(
                f"Eiger frames are unsigned integers, got dtype={dtype.name!r}; "
                "use np.uint32 (the default) or np.uint16."
            )
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape must be two positive sizes (rows, cols), got {self.shape!r}")
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


def _module_gaps(shape: tuple[int, int]) -> np.ndarray | None:
    """Gap mask if ``shape`` tiles as Eiger modules, else None."""
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
    flagged = _module_gaps(pattern.shape)
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
        key: dict[str, Any] = {
            "source": f"SIM:{self.name}",
            "dtype": "array",
            "shape": list(eiger.pattern.shape),
            "dtype_numpy": eiger.pattern.dtype.str,
        }
        if eiger.mode == "files":
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
    mode : {"inline", "files"}, optional
        ``"inline"`` puts the frame in the event; ``"files"`` writes one
        ``.npy`` per frame under ``save_path`` and emits Resource/Datum
        documents (spec ``"NPY_SEQ"``, read with :data:`handler_registry`).
    save_path : str or path, optional
        Directory for ``mode="files"``; a new temporary directory (not removed)
        if not given.
    seed : int, optional
        Seed of the frame pattern.
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
        **kwargs: Any,
    ) -> None:
        if mode not in ("inline", "files"):
            raise ValueError(f"mode must be 'inline' or 'files', got {mode!r}")
        pattern = EigerPattern(_resolve_shape(name, shape), np.dtype(dtype), seed)
        super().__init__(name=name, **kwargs)
        self.pattern = pattern
        self.mode: _Mode = mode
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
        frame = self.pattern.frame(i)
        if self.mode == "inline":
            self.image.put(frame)
        else:
            self.image.put(self._write_frame(i, frame))
        self._frame_index += 1
        status = DeviceStatus(self)
        status.set_finished()
        return status

    def _write_frame(self, i: int, frame: np.ndarray) -> str:
        if self._resource is None:
            # Created on first use, not at stage, so an unstaged trigger works too.
            if self.save_path is None:
                self.save_path = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            self.save_path.mkdir(parents=True, exist_ok=True)
            self._resource = {
                "spec": "NPY_SEQ",
                "root": str(self.save_path),
                "resource_path": f"{self.name}_{uuid.uuid4().hex[:12]}",
                "resource_kwargs": {},
                "path_semantics": "windows" if os.name == "nt" else "posix",
                "uid": str(uuid.uuid4()),
            }
            self._asset_docs.append(("resource", self._resource))
        # The file name is the NumpySeqHandler convention: {root}/{resource_path}_{index}.npy
        path = self.save_path / f"{self._resource['resource_path']}_{i}.npy"
        np.save(path, frame, allow_pickle=False)
        datum_id = f"{self._resource['uid']}/{i}"
        self._asset_docs.append(
            (
                "datum",
                {
                    "resource": self._resource["uid"],
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
