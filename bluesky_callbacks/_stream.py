"""DECTRIS Eiger series of Resource/Datum runs re-announced as StreamResource/StreamDatum.

Used between the RunEngine and a writer that stores references to files
(bluesky-tiled-plugins' ``TiledWriter``), so that an ``AD_EIGER2`` run (NSLS-II's
ophyd Eigers) is stored as tiled arrays that every reading path serves:
``masked_frames``, ``process_run``, replay and plain ``run[...].read()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, cast

from event_model import DocumentRouter, unpack_datum_page, unpack_event_page

from ._eiger import DATA_PATH

if TYPE_CHECKING:
    from event_model import (
        Datum,
        DatumPage,
        Event,
        EventDescriptor,
        EventPage,
        Resource,
        RunStart,
        RunStop,
    )

__all__ = ["EIGER_SPECS", "EigerSeriesToStream", "eiger_data_files"]

#: Resource specs of DECTRIS Eiger series (area-detector-handlers' ``EigerHandler``).
EIGER_SPECS = frozenset({"AD_EIGER2", "AD_EIGER"})


def eiger_data_files(
    prefix: str, seq_id: int, frames: int, images_per_file: int
) -> list[tuple[str, int]]:
    """The data files of one DECTRIS series and the frames each holds, in order.

    The Eiger's file writer names them ``<prefix>_<seq_id>_data_000001.h5``,
    ``..._data_000002.h5``, ... with ``images_per_file`` frames each, the last
    holding the rest; no file is opened (the RunEngine's thread stays free
    and a series still being downloaded is named all the same).

    Parameters
    ----------
    prefix : str
        The Resource's ``root`` and ``resource_path`` joined.
    seq_id : int
        The Datum's ``seq_id``.
    frames : int
        Frames in the series (the event's leading dimension).
    images_per_file : int
        The Resource's ``images_per_file`` (``frame_per_point`` in older ones).

    Examples
    --------
    >>> eiger_data_files("/data/eiger_ab12", 3, 5, 2)  # doctest: +NORMALIZE_WHITESPACE
    [('/data/eiger_ab12_3_data_000001.h5', 2), ('/data/eiger_ab12_3_data_000002.h5', 2),
     ('/data/eiger_ab12_3_data_000003.h5', 1)]
    """
    if frames < 1 or images_per_file < 1:
        raise ValueError(
            f"A series needs frames >= 1 and images_per_file >= 1, got {frames} and "
            f"{images_per_file}."
        )
    count = math.ceil(frames / images_per_file)
    return [
        (
            f"{prefix}_{seq_id}_data_{k + 1:06d}.h5",
            min(images_per_file, frames - k * images_per_file),
        )
        for k in range(count)
    ]


class EigerSeriesToStream(DocumentRouter):
    """Pass a run's documents on, with ``AD_EIGER2`` series as StreamResource/StreamDatum.

    An ophyd Eiger (NSLS-II's devices, :class:`~bluesky_callbacks.sim.SimEiger`
    with ``mode="eiger"``) announces one Resource per run and one Datum per
    trigger naming a whole series: a master file and several data files.
    ``TiledWriter`` turns a Resource into one StreamResource of an unknown
    format, which no reader can serve. This router turns each series into
    one StreamResource per data file (HDF5, ``/entry/data/data``, one chunk
    per frame), in order, and one StreamDatum per data file: the last one
    of a series carries its event (``indices`` ``{i, i + 1}``), the others
    are empty (``{i, i}``) and only announce their file. The event shape
    stays ``[frames, rows, cols]``, so the stored array is
    ``(events, frames, rows, cols)`` with the files' bytes unchanged. The
    event keeps its other data; the data key becomes ``external: "STREAM:"``.

    Every other document, Resource and Datum passes through unchanged.
    Nothing is read from the files: their names follow the DECTRIS
    convention (:func:`eiger_data_files`).

    Parameters
    ----------
    downstream : callable ``(name, doc)``
        Where the documents go, e.g. ``TiledWriter(client)``; kept alive by
        this router.

    Examples
    --------
    >>> from bluesky_tiled_plugins import TiledWriter  # doctest: +SKIP
    >>> RE.subscribe(EigerSeriesToStream(TiledWriter(runs)))  # doctest: +SKIP
    """

    def __init__(self, downstream: Callable[[str, dict[str, Any]], Any]) -> None:
        super().__init__(emit=downstream)
        # DocumentRouter holds emit weakly; a writer made inline must outlive the call.
        self._downstream = downstream
        self._reset()

    def _reset(self) -> None:
        self._resources: dict[str, Resource] = {}
        self._datums: dict[str, Datum] = {}
        self._pending: dict[str, dict[str, Any]] = {}  # descriptors held until their first event
        self._descriptors: dict[str, dict[str, Any]] = {}
        self._rows: dict[tuple[str, str], int] = {}

    def __call__(
        self, name: str, doc: dict[str, Any], validate: bool = False
    ) -> tuple[str, dict[str, Any]]:
        # Handlers emit what they pass on (a series becomes several documents).
        getattr(self, name)(doc)
        return name, doc

    # The documents emitted are plain dicts at runtime (event_model's TypedDicts too).
    # ``datum``, ``event`` and ``event_page`` return their document as the supertype's
    # do; ``__call__`` above passes every document on as it came all the same.

    def start(self, doc: RunStart) -> None:
        self._reset()
        self.emit("start", cast(dict[str, Any], doc))

    def descriptor(self, doc: EventDescriptor) -> None:
        # Which keys are Eiger series is known at the first event (from its datums).
        self._pending[doc["uid"]] = cast(dict[str, Any], doc)

    def resource(self, doc: Resource) -> None:
        if str(doc.get("spec", "")).upper() in EIGER_SPECS:
            self._resources[doc["uid"]] = doc
        else:
            self.emit("resource", cast(dict[str, Any], doc))

    def datum(self, doc: Datum) -> Datum:
        kwargs = doc.get("datum_kwargs", {})
        # A datum for one frame of a series (frame_num) is left to the writer as it is.
        if doc["resource"] in self._resources and kwargs.get("frame_num") is None:
            self._datums[doc["datum_id"]] = doc
        else:
            self.emit("datum", cast(dict[str, Any], doc))
        return doc

    def datum_page(self, doc: DatumPage) -> None:
        for datum in unpack_datum_page(doc):
            self.datum(datum)

    def event(self, doc: Event) -> Event:
        filled = doc.get("filled", {})
        series = {
            key: self._datums.pop(value)
            for key, value in doc["data"].items()
            if not filled.get(key) and isinstance(value, str) and value in self._datums
        }
        descriptor = self._descriptor(doc["descriptor"], series)
        if not series:
            self.emit("event", cast(dict[str, Any], doc))
            return doc
        keep = [key for key in doc["data"] if key not in series]
        self.emit(
            "event",
            {
                **doc,
                "data": {key: doc["data"][key] for key in keep},
                "timestamps": {
                    key: doc["timestamps"][key] for key in keep if key in doc["timestamps"]
                },
                "filled": {key: value for key, value in filled.items() if key in keep},
            },
        )
        for key, datum in series.items():
            self._announce(descriptor, key, datum, doc["seq_num"])
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        for event in unpack_event_page(doc):
            self.event(event)
        return doc

    def stop(self, doc: RunStop) -> None:
        for uid in list(self._pending):
            self._descriptor(uid, {})
        self.emit("stop", cast(dict[str, Any], doc))
        self._reset()

    def _descriptor(self, uid: str, series: dict[str, Any]) -> dict[str, Any]:
        pending = self._pending.pop(uid, None)
        if pending is None:
            return self._descriptors[uid]
        if series:
            data_keys = {
                key: ({**value, "external": "STREAM:"} if key in series else value)
                for key, value in pending["data_keys"].items()
            }
            pending = {**pending, "data_keys": data_keys}
        self._descriptors[uid] = pending
        self.emit("descriptor", pending)
        return pending

    def _announce(self, descriptor: dict[str, Any], key: str, datum: Datum, seq_num: int) -> None:
        resource = self._resources[datum["resource"]]
        shape = list(descriptor["data_keys"][key]["shape"])
        frames = shape[0] if len(shape) == 3 else 1
        kwargs = resource.get("resource_kwargs", {})
        per_file = kwargs.get("images_per_file") or kwargs.get("frame_per_point") or frames
        pure = PureWindowsPath if resource.get("path_semantics") == "windows" else PurePosixPath
        prefix = str(pure(resource.get("root") or "", resource["resource_path"]))
        files = eiger_data_files(prefix, datum["datum_kwargs"]["seq_id"], frames, int(per_file))
        row = self._rows.get((descriptor["uid"], key), 0)
        # One chunk per frame, as the file writer stores them: (event, frame) or (event).
        chunks = [1, 1] if len(shape) == 3 else [1]
        run_start = {"run_start": resource["run_start"]} if resource.get("run_start") else {}
        for k, (path, _) in enumerate(files):
            last = k == len(files) - 1
            stream_resource = {
                "uid": f"{datum['datum_id']}/{k + 1}",  # datum ids are unique in a run
                **run_start,
                "data_key": key,
                "mimetype": "application/x-hdf5",
                "uri": pure(path).as_uri(),
                "parameters": {"dataset": DATA_PATH, "chunk_shape": chunks, "swmr": True},
            }
            self.emit("stream_resource", stream_resource)
            stop = row + 1 if last else row
            self.emit(
                "stream_datum",
                {
                    "uid": f"{stream_resource['uid']}/0",
                    "stream_resource": stream_resource["uid"],
                    "descriptor": descriptor["uid"],
                    "indices": {"start": row, "stop": stop},
                    "seq_nums": {"start": seq_num, "stop": seq_num + 1 if last else seq_num},
                },
            )
        self._rows[(descriptor["uid"], key)] = row + 1
