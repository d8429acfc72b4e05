"""Where a run's masks and frames come from: one resolver, one mask preparation, the readers.

Every masking path (the live :class:`~bluesky_callbacks.MaskingRouter`,
:func:`~bluesky_callbacks.replay_masked`, :func:`~bluesky_callbacks.masked_frames`
and :func:`~bluesky_callbacks.process_run`) takes a run's composite masks from
:func:`resolve_run_masks` (the uids its start document recorded, checked
against the recorded sha256; or names resolved as of its start), prepares
each in the frames' dtype with :func:`prepare_mask`, and reads frames with
the readers here:

- Resource/Datum documents: ``event_model.Filler`` with :func:`handlers`
  (``AD_EIGER2``/``AD_EIGER`` DECTRIS series by default, plus any given);
- StreamResource/StreamDatum from files: :class:`HDF5StreamReader`;
- StreamResource/StreamDatum of a run served by tiled (replay):
  :class:`TiledStreamReader`, which reads the rows tiled serves, whatever
  the file format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from chx_masks import (
    CompositeMask,
    MaskIntegrityError,
    MaskNotFoundError,
    MaskRegistry,
    RegistryUnavailableError,
)

from ._decode import decodable
from ._eiger import EigerSeriesHandler

__all__ = [
    "HDF5StreamReader",
    "TiledStreamReader",
    "handlers",
    "prepare_mask",
    "resolve_run_masks",
    "run_start_time",
]

logger = logging.getLogger(__name__)

#: Asset handlers every masking path knows without being told: the CHX Eigers' files.
DEFAULT_HANDLERS: Mapping[str, Any] = {
    "AD_EIGER2": EigerSeriesHandler,
    "AD_EIGER": EigerSeriesHandler,
}


def handlers(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The handler registry for Resource/Datum frames: the defaults, then ``extra``.

    Examples
    --------
    >>> sorted(handlers())
    ['AD_EIGER', 'AD_EIGER2']
    >>> handlers({"AD_EIGER2": dict})["AD_EIGER2"] is dict
    True
    """
    return {**DEFAULT_HANDLERS, **(extra or {})}


# ------------------------------------------------------------------ masks


def run_start_time(start: Mapping[str, Any]) -> datetime:
    """The run's start as an aware datetime (what names are resolved "as of").

    Examples
    --------
    >>> run_start_time({"time": 0.0}).isoformat()
    '1970-01-01T00:00:00+00:00'
    """
    return datetime.fromtimestamp(float(start["time"]), timezone.utc)


def resolve_run_masks(
    registry: MaskRegistry,
    start: Mapping[str, Any],
    data_keys: Sequence[str],
    masks: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, CompositeMask | Exception]:
    """The composite mask of each of a run's detectors, or why there is none.

    A detector whose start document recorded mask uids gets exactly those
    masks, and the composite's sha256 must equal the recorded one (a
    :class:`~chx_masks.MaskIntegrityError` otherwise). A detector without
    recorded uids gets ``masks[data_key]`` resolved as of the run's start;
    without those, a :class:`~chx_masks.MaskNotFoundError` that says how to
    give them. Errors are returned per detector, except
    :class:`~chx_masks.RegistryUnavailableError`, which is raised: then no
    detector can be resolved.

    Parameters
    ----------
    registry : MaskRegistry
    start : dict
        The run's start document.
    data_keys : list of str
        The detectors wanted.
    masks : dict, optional
        ``{data_key: [names]}`` for detectors recorded without masks.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from chx_masks import MaskRegistry
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> key = "eiger500K_single_image"
    >>> uid = reg.register_mask(key, "gaps", np.ones((514, 1030), bool))
    >>> record = reg.composite_from_uids([uid]).provenance()
    >>> start = {"uid": "r", "time": 4e9, "masks": {key: record}}
    >>> resolve_run_masks(reg, start, [key])[key].uids == (uid,)
    True
    >>> bad = {**start, "masks": {key: {**record, "sha256": "0" * 64}}}
    >>> type(resolve_run_masks(reg, bad, [key])[key]).__name__
    'MaskIntegrityError'
    >>> type(resolve_run_masks(reg, {"uid": "r", "time": 4e9}, [key])[key]).__name__
    'MaskNotFoundError'
    >>> reg.close()
    """
    recorded = start.get("masks") or {}
    found: dict[str, CompositeMask | Exception] = {}
    for key in data_keys:
        record = recorded.get(key)
        if not isinstance(record, Mapping):
            record = {}
        try:
            if record.get("uids"):
                composite = registry.composite_from_uids(record["uids"])
                if record.get("sha256") and composite.sha256 != record["sha256"]:
                    raise MaskIntegrityError(
                        f"The composite of {key} recorded sha256 {record['sha256']} "
                        f"but its uids now give {composite.sha256}."
                    )
            elif masks and masks.get(key):
                composite = registry.resolve_composite(
                    key, list(masks[key]), as_of=run_start_time(start)
                )
            else:
                why = (
                    f" (the registry was unavailable when it opened: {start['mask_error']})"
                    if start.get("mask_error")
                    else ""
                )
                raise MaskNotFoundError(
                    f"Run {start.get('uid')} recorded no masks for {key}{why}; pass "
                    f"masks={{{key!r}: [mask names]}} to resolve them as of its start."
                )
            found[key] = composite
        except RegistryUnavailableError:
            raise
        except Exception as err:  # reported per detector, by the caller
            found[key] = err
    return found


def prepare_mask(composite: CompositeMask, dtype: Any, frame_shape: Sequence[int]) -> np.ndarray:
    """The composite to multiply frames of ``dtype`` by, checked against their shape.

    With NumPy 2, ``frame * mask`` costs the same with the boolean composite
    as with a 0/1 copy in the frames' dtype (4M frames, uint32: 2.31 against
    2.27 ms; uint16 1.08 against 1.11 ms), so the composite itself is
    returned and a run holds no copy of it (17 MiB for an Eiger 4M in
    uint32). NumPy 1 casts the boolean for every pixel of every frame: there
    a read-only copy in ``dtype`` is made once. Either way the product keeps
    the frames' dtype.

    Raises
    ------
    FrameShapeError
        The frames' last two axes differ from the mask's shape.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from chx_masks import MaskRegistry
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> uid = reg.register_mask("eiger500K_single_image", "m", np.ones((514, 1030), bool))
    >>> composite = reg.composite_from_uids([uid])
    >>> mask = prepare_mask(composite, np.uint32, (1, 514, 1030))
    >>> (np.ones((514, 1030), np.uint32) * mask).dtype.name, mask.flags.writeable
    ('uint32', False)
    >>> prepare_mask(composite, np.uint32, (512, 1024))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    chx_masks._errors.FrameShapeError: frames are 512x1024 but the mask of ... is 514x1030: ...
    >>> reg.close()
    """
    composite.check_frames(frame_shape)
    if _NUMPY_2:
        return composite.mask  # read-only, shared with the registry's composite
    prepared = composite.mask.astype(np.dtype(dtype))
    prepared.flags.writeable = False
    return prepared


_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


# ------------------------------------------------------------------ frames


def file_path(uri: str, root_map: Mapping[str, str] | None = None) -> str:
    """The local path of a StreamResource ``file://`` URI, after ``root_map``.

    Examples
    --------
    >>> file_path("file://localhost/data/a%20b/x.h5")
    '/data/a b/x.h5'
    >>> file_path("file:///data/x.h5", {"/data": "/mnt/data"})
    '/mnt/data/x.h5'
    """
    path = unquote(urlsplit(uri).path)
    for old, new in (root_map or {}).items():
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def rows_per_index(shape: Sequence[int]) -> int:
    """Dataset rows behind one StreamDatum index of a data key of ``shape``."""
    return int(shape[0]) if len(shape) == 3 else 1


class HDF5StreamReader:
    """Frames of StreamResource/StreamDatum documents read from the HDF5 files themselves.

    One per run: files are opened once (SWMR, so frames still being
    written are seen) and closed by :meth:`close`. StreamDatum indices are
    events; a data key of shape ``[n, rows, cols]`` (ophyd-async) has ``n``
    dataset rows per index.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from bluesky_callbacks._eiger import SeriesWriter
    >>> tmp = tempfile.mkdtemp()
    >>> with SeriesWriter(tmp, "s", (2, 3), np.uint32, frames_per_file=4) as w:
    ...     for i in range(3):
    ...         w.write(np.full((2, 3), i, np.uint32))
    >>> resource = {"uid": "r", "uri": f"file://localhost{tmp}/s_data_000001.h5",
    ...             "mimetype": "application/x-hdf5",
    ...             "parameters": {"dataset": "/entry/data/data"}}
    >>> reader = HDF5StreamReader()
    >>> reader(resource, 1, 3, (1, 2, 3))[:, 0, 0, 0].tolist()
    [1, 2]
    >>> reader.close()
    """

    def __init__(self, root_map: Mapping[str, str] | None = None) -> None:
        self.root_map = dict(root_map or {})
        self._datasets: dict[str, Any] = {}
        self._decodable: dict[str, bool] = {}

    def __call__(
        self, resource: Mapping[str, Any], start: int, stop: int, shape: Sequence[int]
    ) -> np.ndarray:
        per_index = rows_per_index(shape)
        dataset = self.dataset(resource, stop * per_index)
        block = dataset[start * per_index : stop * per_index]
        if len(shape) == 3:
            block = block.reshape(stop - start, *shape)
        return block

    def dataset(self, resource: Mapping[str, Any], rows: int) -> Any:
        """The h5py dataset of a StreamResource, showing at least ``rows`` rows if written."""
        dataset = self._datasets.get(resource["uid"])
        if dataset is None:
            mimetype = resource.get("mimetype", "application/x-hdf5")
            if mimetype != "application/x-hdf5":
                raise ValueError(
                    f"StreamResource {resource['uid']} has mimetype {mimetype!r}; frames "
                    "are read from application/x-hdf5 files (or through tiled on replay)."
                )
            from chx_masks.io import h5py_with_filters

            path = file_path(resource["uri"], self.root_map)
            handle = h5py_with_filters().File(path, "r", swmr=True, libver="latest")
            dataset = self._datasets[resource["uid"]] = handle[resource["parameters"]["dataset"]]
        if dataset.shape[0] < rows:
            # Written after the file was opened: SWMR readers see it once refreshed
            # (a refresh reads the file's metadata again: only when needed).
            dataset.refresh()
        return dataset

    def decodable(self, resource: Mapping[str, Any], dataset: Any) -> bool:
        """Whether a StreamResource's frames decode off HDF5's lock (checked once per file)."""
        found = self._decodable.get(resource["uid"])
        if found is None:
            found = self._decodable[resource["uid"]] = decodable(dataset)
        return found

    def close(self) -> None:
        """Close every file this reader opened."""
        for dataset in self._datasets.values():
            try:
                dataset.file.close()
            except Exception:  # a closed or vanished file needs no closing
                logger.debug("closing an HDF5 file failed", exc_info=True)
        self._datasets.clear()
        self._decodable.clear()


class TiledStreamReader:
    """Frames of StreamResource/StreamDatum documents read from a run served by tiled.

    tiled serves each (stream, data key) as one array, the StreamResources'
    files concatenated in the order they were announced (a DECTRIS series
    of several data files is one StreamResource per file, each with indices
    from 0). This reader turns a StreamDatum's per-resource indices into
    rows of that array, and looks each array up once per run.

    Parameters
    ----------
    node : callable ``(stream, data_key) -> array client``
        How to reach a (stream, data key) of the run in either layout.
    """

    def __init__(self, node: Callable[[str, str], Any]) -> None:
        self._node = node
        self._arrays: dict[tuple[str, str], Any] = {}
        self._offsets: dict[str, int] = {}
        self._rows: dict[tuple[str, str], int] = {}

    def __call__(self, resource: Mapping[str, Any], stream: str, start: int, stop: int) -> Any:
        where = (stream, resource["data_key"])
        array = self._arrays.get(where)
        if array is None:
            array = self._arrays[where] = self._node(*where)
        offset = self._offsets.get(resource["uid"])
        if offset is None:
            offset = self._offsets[resource["uid"]] = self._rows.get(where, 0)
        self._rows[where] = max(self._rows.get(where, 0), offset + stop)
        return array[offset + start : offset + stop]
