"""Planning end-of-run processing: a stored run checked, its masks resolved, its chunks sized.

:func:`plan_processing` makes the :class:`ProcessingPlan` that :mod:`._products` carries out.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from chx_masks import CompositeMask, MaskNotFoundError, MaskRegistry

from ._replay import _stream_node, run_composite
from ._stores import ProcessingError, RunStore, _client, _store

#: Raw bytes of one chunk of frames, before masking (bounds worker memory).
CHUNK_BYTES = 64 << 20
#: The processing name recorded in every product.
PROCESSING = "chx_masks.process_run"


@dataclass(frozen=True)
class _Detector:
    data_key: str
    composite: CompositeMask
    record: dict[str, Any]
    frames: int
    event_shape: tuple[int, ...]
    dtype: str
    frames_per_chunk: int
    resolved_as_of: str | None = None
    #: The detector files (path, dataset, frames) in order, where this process
    #: may read them itself (the store serves them: see _direct_files).
    files: tuple[tuple[str, str, int], ...] | None = None

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.event_shape[-2:])

    @property
    def per_event(self) -> int:
        """Frames in one stored row: 1, or an Eiger series' frames."""
        return int(np.prod(self.event_shape[:-2], dtype=np.int64))

    @property
    def chunks(self) -> list[tuple[int, int]]:
        step = self.frames_per_chunk
        return [(i, min(i + step, self.frames)) for i in range(0, self.frames, step)]


@dataclass(frozen=True)
class ProcessingPlan:
    """What processing a run will do: its detectors, their masks, the chunking."""

    run_uid: str
    stream: str
    detectors: tuple[_Detector, ...]
    start_time: float

    def provenance(self) -> dict[str, Any]:
        """The product's metadata about the raw run and its masks."""
        records = {d.data_key: d.record for d in self.detectors}
        uids = [u for d in self.detectors for u in d.composite.uids]
        md: dict[str, Any] = {
            "parent_uid": self.run_uid,
            "stream": self.stream,
            "masks": records,
            "mask_uids": list(dict.fromkeys(uids)),
            "processing": PROCESSING,
            "frames": {d.data_key: d.frames for d in self.detectors},
        }
        as_of = {d.data_key: d.resolved_as_of for d in self.detectors if d.resolved_as_of}
        if as_of:
            md["masks_resolved_as_of"] = as_of
        return md


def _frames_node(run: Any, stream: str, data_key: str) -> Any:
    """The stored frames of ``data_key``, whichever layout the client hands out."""
    try:
        return _stream_node(run, stream, data_key)
    except KeyError:
        missing = f"Run {run.metadata['start']['uid']} has no {data_key!r} in its {stream!r} stream"
        raise ProcessingError(
            f"{missing}: check data_keys (or the keys of masks) and stream.",
            cli=f"{missing}: check the detector named in --masks and --stream.",
        ) from None


def plan_processing(
    run_uid: str,
    *,
    runs: RunStore | str | Path | Any,
    registry: MaskRegistry,
    data_keys: Sequence[str] | None = None,
    masks: Mapping[str, Sequence[str]] | None = None,
    stream: str = "primary",
    frames_per_chunk: int | None = None,
) -> ProcessingPlan:
    """Check a stored run and resolve its masks; nothing is read but metadata.

    Parameters
    ----------
    run_uid : str
        The raw run (the stop document's ``run_start``).
    runs : RunStore, str, Path or tiled client
        Where the raw run is stored.
    registry : MaskRegistry
    data_keys : list of str, optional
        The detectors to process; by default those the run recorded masks
        for, else the keys of ``masks``.
    masks : dict, optional
        ``{data_key: [names]}`` for runs recorded without masks: resolved as
        of the run's start, and the product says so.
    stream : str
    frames_per_chunk : int, optional
        Frames per chunk (and per block of the product); by default about
        64 MiB of raw frames.

    Raises
    ------
    ProcessingError
        The run is not in ``runs``, has not finished, or lacks frames.
    MaskNotFoundError
        A detector has no recorded masks and none are given.
    """
    where = _store(runs)
    client = _client(where, runs=True)
    try:
        run = client[run_uid]
    except KeyError:
        raise ProcessingError(
            f"No run {run_uid} in {getattr(where, 'location', 'the run store')}: check "
            "the uid (the stop document's run_start) and where runs are written."
        ) from None
    start = run.metadata["start"]
    stop = run.metadata.get("stop")
    if not stop:
        raise ProcessingError(
            f"Run {run_uid} has no stop document: it has not finished (or its stop was "
            "lost). Process it after it ends."
        )
    recorded = {k: r for k, r in (start.get("masks") or {}).items() if r.get("uids")}
    keys = (
        list(data_keys)
        if data_keys
        else [*recorded, *(k for k in masks or {} if k not in recorded)]
    )
    if not keys:
        why = (
            f" (the registry was unavailable when it opened: {start['mask_error']})"
            if start.get("mask_error")
            else ""
        )
        raise MaskNotFoundError(
            f"Run {run_uid} recorded no masks{why}; pass masks={{data_key: [names]}} "
            "(or --masks DET=NAME,...) to resolve them as of its start."
        )
    expected = (stop.get("num_events") or {}).get(stream)
    detectors = []
    nodes = {}
    for key in keys:
        composite = run_composite(start, key, registry=registry, masks=masks)
        node = nodes[key] = _frames_node(run, stream, key)
        shape = tuple(int(n) for n in node.shape)
        if expected is not None and shape[0] != expected:
            raise ProcessingError(
                f"Run {run_uid} is missing frames: its stop document counts {expected} "
                f"{stream!r} events but {shape[0]} {key} frames are stored."
            )
        composite.check_frames(shape, f"The {key} frames of run {run_uid}")
        dtype = np.dtype(node.dtype)
        per_frame = dtype.itemsize * int(np.prod(shape[1:]))
        step = frames_per_chunk or max(1, CHUNK_BYTES // max(1, per_frame))
        resolved = (
            None
            if key in recorded
            else datetime.fromtimestamp(start["time"], timezone.utc).isoformat()
        )
        record = recorded.get(key) or composite.provenance()
        detectors.append(
            _Detector(key, composite, dict(record), shape[0], shape[1:], dtype.str, step, resolved)
        )
    plan = ProcessingPlan(run_uid, stream, tuple(detectors), float(start["time"]))
    # Before a product is begun: a file refused halfway would leave it unfinished.
    _check_readable(where, plan, nodes)
    return dataclasses.replace(
        plan,
        detectors=tuple(
            dataclasses.replace(d, files=_direct_files(nodes[d.data_key], d))
            for d in plan.detectors
        ),
    )


def _check_readable(where: RunStore | Any, plan: ProcessingPlan, nodes: Mapping[str, Any]) -> None:
    """Read one pixel of each detector: tiled checks every file of its frames then.

    A local store refuses a detector file outside its readable storage with
    a ``RuntimeError``; that becomes a ProcessingError that says the fix in
    Python's and the command line's words.
    """
    import re
    import urllib.parse

    for detector in plan.detectors:
        if not detector.frames:
            continue
        node = nodes[detector.data_key]
        try:
            node[(0,) * len(node.shape)]
        except RuntimeError as err:
            refused = re.search(
                r"Refusing to serve (\S+) because it is outside the readable "
                r"storage",
                str(err),
            )
            if refused is None:
                raise
            path = Path(urllib.parse.unquote(urllib.parse.urlparse(refused[1]).path))
            allowed = ", ".join(getattr(where, "readable_storage", ())) or "none given"
            said = (
                f"Run {plan.run_uid} refers to {path}, outside the directories the run "
                f"store may read ({allowed})"
            )
            location = getattr(where, "location", "DIR")
            raise ProcessingError(
                f"{said}: give runs=RunStore({location!r}).reading([{str(path.parent)!r}]) "
                "(or open_run_store(..., readable_storage=[...])) with the directory of the "
                "detector files.",
                cli=f"{said}: pass --readable-storage DIR with the directory of the detector "
                f"files (here --readable-storage {path.parent}).",
            ) from err


def _direct_files(node: Any, detector: _Detector) -> tuple[tuple[str, str, int], ...] | None:
    """The HDF5 files behind ``node`` if this process can read them as the store does.

    Only once the store has agreed to serve them (``_check_readable``), so
    reading them here grants nothing the store would refuse. None (read
    through tiled) for anything but plain HDF5 datasets of whole frames
    whose frame counts add up to the stored rows.
    """
    from urllib.parse import unquote, urlsplit

    try:
        (source,) = node.data_sources()
    except Exception:  # no data sources (an older server), or several
        return None
    parameters = dict(source.parameters or {})
    if (
        source.mimetype != "application/x-hdf5"
        or not parameters.get("dataset")
        or parameters.get("slice")
        or parameters.get("squeeze")
    ):
        return None
    assets = sorted(
        (a for a in source.assets if a.parameter == "data_uris"), key=lambda a: a.num or 0
    )
    paths = []
    for asset in assets:
        uri = urlsplit(asset.data_uri)
        path = unquote(uri.path)
        if (
            uri.scheme != "file"
            or uri.netloc not in ("", "localhost")
            or not os.access(path, os.R_OK)
        ):
            return None
        paths.append(path)
    from chx_masks.io import h5py_with_filters

    h5py = h5py_with_filters()
    files = []
    try:
        for path in paths:
            with h5py.File(path, "r") as f:
                dataset = f[parameters["dataset"]]
                if tuple(dataset.shape[1:]) != detector.frame_shape or dataset.dtype != np.dtype(
                    detector.dtype
                ):
                    return None
                files.append((path, parameters["dataset"], int(dataset.shape[0])))
    except (OSError, KeyError):
        return None
    if not files or sum(n for *_, n in files) != detector.frames * detector.per_event:
        return None
    return tuple(files)
