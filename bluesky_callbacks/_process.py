"""End-of-run pre-processing: the masked frames of a stored run, written back.

A run is read from tiled by its uid; the masks its start document recorded
(or, for older runs, the names given resolved as of its start, and the
product says so) multiply its detector frames chunk by chunk; the masked
frames go to an HDF5 file in the Eiger's encoding (bitshuffle-LZ4, one chunk
per frame) registered in a ``processed`` container, keyed by the run's uid,
with the provenance in its metadata (or, where no file can be served, into a
sparse COO array inside tiled). Chunks are computed on a ``dask.distributed`` client when one is
given, on local threads otherwise; a bounded number of chunks is in flight
at any time, so memory stays bounded however long the run is.

Processing a run twice gives the same product: a finished product is
returned as it is. A product has one writer at a time, holding a lease in
the product's metadata: a second caller waits for it, and takes over (and
completes the product in place) only once the lease has run out.

This module does not need Prefect; :mod:`bluesky_callbacks.workflows` wraps
it in a Prefect flow.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from chx_masks import ChxMasksError, CompositeMask, MaskNotFoundError, MaskRegistry
from chx_masks.stores import http_status as _status

from ._frames import prepare_mask
from ._replay import _stream_node, run_composite

__all__ = [
    "LeaseLostError",
    "ProcessedRun",
    "ProcessingError",
    "RunStore",
    "StoreUnavailableError",
    "plan_processing",
    "process_run",
    "write_product",
]

logger = logging.getLogger(__name__)

#: Raw bytes of one chunk of frames, before masking (bounds worker memory).
CHUNK_BYTES = 64 << 20
#: The processing name recorded in every product.
PROCESSING = "chx_masks.process_run"
_SPEC = "chx-masks-processed"
_COMPLETE = "complete"
_WRITING = "writing"
#: Seconds a product's writer holds it without renewing (see write_product).
LEASE_S = 60.0


class ProcessingError(ChxMasksError, RuntimeError):
    """A stored run cannot be processed as it is (unfinished, frames missing, ...)."""


class StoreUnavailableError(ProcessingError, ConnectionError):
    """The tiled server holding runs or products did not answer (worth retrying)."""


# ------------------------------------------------------------------ stores


@dataclass(frozen=True)
class RunStore:
    """Where runs or products live: a tiled URI, or a local store directory.

    Picklable, so that Dask workers in other processes open it themselves.

    Parameters
    ----------
    location : str
        ``http(s)://...`` (a tiled container) or a directory (a local store,
        served in-process, as :func:`open_run_store` makes).
    api_key : str, optional
        For a tiled server; never shown.
    readable_storage : tuple of str
        Directories of detector files the runs refer to (local stores).

    Examples
    --------
    >>> RunStore("/data/chx/runs")
    RunStore(location='/data/chx/runs', readable_storage=())
    >>> RunStore("http://127.0.0.1:8000/api/v1/runs", api_key="s3cret")
    RunStore(location='http://127.0.0.1:8000/api/v1/runs', readable_storage=())
    >>> RunStore("http://127.0.0.1:8000/api/v1/runs?api_key=s3cret")
    RunStore(location='http://127.0.0.1:8000/api/v1/runs', readable_storage=())
    """

    location: str
    api_key: str | None = field(default=None, repr=False)
    readable_storage: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A key given in the URI (``?api_key=``, as $CHX_MASKS_RUNS_URI may hold it)
        # moves to api_key, so that no repr, message or log line shows it.
        if self.remote:
            from chx_masks.stores import split_api_key as _split_api_key

            location, api_key = _split_api_key(self.location, self.api_key)
            object.__setattr__(self, "location", location)
            object.__setattr__(self, "api_key", api_key)

    @property
    def remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))

    def open(self, *, runs: bool = True) -> Any:
        """The tiled client of this store (opened once per process)."""
        if not self.remote:
            return _open_store(self, runs)
        # tiled retries a server that does not answer for up to
        # $TILED_RETRY_TIMEOUT and, on the main thread only, prints a bare
        # "Retrying..." line meanwhile; StoreUnavailableError says it in one.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="chx-masks-connect") as pool:
            return pool.submit(_open_store, self, runs).result()

    def reading(self, directories: Sequence[str | Path] | None = None) -> RunStore:
        """This local run store, allowed to read the detector files in ``directories``.

        tiled serves a file a run refers to (HDF5, .npy) only from its
        readable storage. By default that is the store's parent directory and
        the store itself: detector files are usually written beside the run
        store (a store in ``/data/chx/runs`` reads the files under ``/data/chx``).

        Parameters
        ----------
        directories : paths, optional
            Replace the default (relative paths are taken from the current
            directory).

        Raises
        ------
        ProcessingError
            The store is a tiled server: what it reads is its own configuration's
            ``readable_storage``.

        Examples
        --------
        >>> RunStore("/data/chx/runs").reading().readable_storage
        ('/data/chx', '/data/chx/runs')
        >>> RunStore("/data/chx/runs").reading(["/mnt/frames"]).readable_storage
        ('/mnt/frames',)
        """
        import dataclasses

        if self.remote:
            raise ProcessingError(
                f"The run store {self.location} is a tiled server: it reads the detector "
                "files its own configuration's readable_storage lists; give "
                "readable_storage only for a local run store (a directory)."
            )
        if directories is None:
            here = Path(self.location).expanduser().absolute()
            directories = (here.parent, here)
        readable = tuple(str(Path(d).expanduser().absolute()) for d in directories)
        return dataclasses.replace(self, readable_storage=readable)


def located_store(location: str | None, kind: str, directory: Path | None = None) -> RunStore:
    """``location``, else ``$CHX_MASKS_<KIND>_URI`` (+ its key), else ``<directory>/<kind>``.

    ``directory`` defaults to the embedded registry's (``$CHX_MASKS_DIR`` or
    the user data directory); ``kind`` is ``"runs"`` or ``"processed"``.

    Examples
    --------
    >>> located_store("/data/runs", "runs").location
    '/data/runs'
    """
    from chx_masks.settings import settings

    configured = settings()
    where = location or getattr(configured, f"{kind}_uri")
    if where:
        return RunStore(where, api_key=configured.secret(f"{kind}_api_key"))
    if directory is None:
        from chx_masks.stores import default_directory

        directory = default_directory()
    return RunStore(str(Path(directory).expanduser() / kind))


# Not bounded: an evicted client would be dropped with its connections open
# (or closed under a caller still using it). A process uses a few stores.
@functools.cache
def _open_store(store: RunStore, runs: bool) -> Any:
    from tiled.client import from_uri

    from chx_masks.stores import open_embedded

    from ._replay import open_run_store

    if store.remote:
        import httpx

        try:
            return from_uri(store.location, api_key=store.api_key)
        except (httpx.TransportError, OSError) as err:
            raise StoreUnavailableError(
                f"Cannot reach the tiled server at {store.location} "
                f"({type(err).__name__}): check that it runs and the URI is right."
            ) from err
        except httpx.HTTPStatusError as err:
            raise ProcessingError(
                f"The tiled server at {store.location} refused the connection "
                f"(HTTP {err.response.status_code}): give an API key that may read "
                "(runs) or write (products) there."
            ) from None
    if runs:
        return open_run_store(store.location, readable_storage=store.readable_storage)
    return open_embedded(Path(store.location))


def _store(where: RunStore | str | Path | Any) -> RunStore | Any:
    if isinstance(where, RunStore) or hasattr(where, "context"):
        return where
    return RunStore(str(where))


def _client(where: RunStore | Any, *, runs: bool) -> Any:
    return where.open(runs=runs) if isinstance(where, RunStore) else where


# ------------------------------------------------------------------- plan


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


# ------------------------------------------------------------------ chunks


def _chunk_frames(
    source: RunStore | Any,
    run_uid: str,
    stream: str,
    data_key: str,
    start: int,
    stop: int,
) -> np.ndarray:
    """Frames [start, stop) of a stored run, read in a task."""
    import dask

    run = _client(source, runs=True)[run_uid]
    # tiled reads through dask: here, inside a task, that must not go back
    # to the cluster (on a distributed worker it would by default).
    with dask.config.set(scheduler="sync"):
        return np.asarray(_frames_node(run, stream, data_key)[start:stop])


def _masked_chunk(
    source: RunStore | Any,
    run_uid: str,
    stream: str,
    data_key: str,
    start: int,
    stop: int,
    mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """COO (coords, data) of frames [start, stop) times ``mask``, coords in the chunk."""
    frames = _chunk_frames(source, run_uid, stream, data_key, start, stop)
    masked = frames * mask  # mask: 0/1 in the frames' dtype, prepared once per detector
    coords = np.nonzero(masked)
    width = np.uint16 if max(masked.shape, default=0) <= np.iinfo(np.uint16).max else np.uint32
    return np.stack([c.astype(width) for c in coords]), masked[coords]


def _masked_encoded(
    source: RunStore | Any,
    run_uid: str,
    stream: str,
    data_key: str,
    start: int,
    stop: int,
    mask: np.ndarray,
) -> tuple[list[bytes], int]:
    """Rows [start, stop) times ``mask``, each frame a bitshuffle-LZ4 chunk; non-zero pixels."""
    from ._eiger import encode_chunk

    frames = _chunk_frames(source, run_uid, stream, data_key, start, stop)
    np.multiply(frames, mask, out=frames)
    flat = frames.reshape(-1, *frames.shape[-2:])
    return [encode_chunk(frame) for frame in flat], int(np.count_nonzero(frames))


def _direct_encoded(
    files: tuple[tuple[str, str, int], ...],
    start: int,
    stop: int,
    mask: np.ndarray,
    dtype: str,
) -> tuple[list[bytes], int]:
    """Frames [start, stop) of ``files`` (concatenated) times ``mask``, each a chunk.

    Read from the detector files themselves, one frame at a time: a
    bitshuffle-LZ4 chunk is decoded, masked and encoded again off HDF5's
    lock (so tasks run in parallel on threads), and only the encoded frames
    are kept, so a task holds one decoded frame however many it covers.
    """
    from chx_masks.io import h5py_with_filters

    from ._eiger import decodable, encode_chunk, raw_chunks, remask_chunk

    h5py = h5py_with_filters()
    out = np.empty(mask.shape, dtype)
    chunks: list[bytes] = []
    nonzero = 0
    first = 0
    for path, name, count in files:
        a, b = max(start, first) - first, min(stop, first + count) - first
        first += count
        if a >= b:
            continue
        with h5py.File(path, "r") as f:
            dataset = f[name]
            stored = raw_chunks(dataset, a, b) if decodable(dataset) else None
            for i in range(a, b):
                if stored is not None:
                    chunks.append(remask_chunk(stored[i - a], out, mask))
                else:
                    dataset.read_direct(out, np.s_[i])
                    chunks.append(encode_chunk(np.multiply(out, mask, out=out)))
                nonzero += int(np.count_nonzero(out))
    return chunks, nonzero


def _in_flight(
    tasks: Sequence[Callable[[], Any]] | Sequence[Any],
    client: Any,
    window: int,
) -> Iterator[tuple[int, Any]]:
    """Run ``tasks`` with at most ``window`` at once; yield (index, result) as each ends."""
    if client is None:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        with ThreadPoolExecutor(max_workers=max(1, window // 2)) as pool:
            pending: dict[Any, int] = {}
            todo = iter(enumerate(tasks))
            for index, task in todo:
                pending[pool.submit(task)] = index
                if len(pending) >= window:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending[pool.submit(nxt[1])] = nxt[0]
        return
    from distributed import as_completed

    todo = iter(enumerate(tasks))
    futures: dict[Any, int] = {}
    for index, (fn, args) in todo:
        futures[client.submit(fn, *args, pure=False)] = index
        if len(futures) >= window:
            break
    running = as_completed(list(futures), loop=client.loop)
    for future in running:
        index = futures.pop(future)
        result = future.result()
        future.release()
        yield index, result
        nxt = next(todo, None)
        if nxt is not None:
            fn, args = nxt[1]
            new = client.submit(fn, *args, pure=False)
            futures[new] = nxt[0]
            running.add(new)


# ----------------------------------------------------------------- product


@dataclass(frozen=True)
class ProcessedRun:
    """A product: the masked frames of one run, with provenance.

    Attributes
    ----------
    uid : str
        The product's own uid.
    parent_uid : str
        The raw run.
    created : bool
        False when an earlier, finished product was returned as it was.
    masks : dict
        The ``masks`` record used, per data key.
    frames, nonzero : dict
        Frames and stored (non-zero) pixels per data key.
    seconds : float
    """

    uid: str
    parent_uid: str
    created: bool
    masks: dict[str, Any]
    frames: dict[str, int]
    nonzero: dict[str, int]
    seconds: float

    def dense(self, processed: RunStore | str | Path | Any, data_key: str) -> np.ndarray:
        """The product of ``data_key`` as a dense array (may be large)."""
        node = _client(_store(processed), runs=False)[self.parent_uid][data_key]
        structure = node.structure()
        shape = tuple(structure.shape)
        itemsize = np.dtype(structure.data_type.to_numpy_dtype()).itemsize
        # In slices of about CHUNK_BYTES: tiled refuses responses past 300 MB.
        step = max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize))
        parts = []
        for start in range(0, shape[0], step):
            data = node[start : start + step]
            parts.append(data.todense() if hasattr(data, "todense") else np.asarray(data))
        return (
            np.concatenate(parts)
            if parts
            else np.zeros(shape, structure.data_type.to_numpy_dtype())
        )


def _existing(container: Any, run_uid: str) -> Any | None:
    try:
        return container[run_uid]
    except KeyError:
        return None


def _as_result(node: Any, created: bool, seconds: float) -> ProcessedRun:
    md = node.metadata
    return ProcessedRun(
        uid=md["uid"],
        parent_uid=md["parent_uid"],
        created=created,
        masks=dict(md["masks"]),
        frames=dict(md["frames"]),
        nonzero=dict(md.get("nonzero") or {}),
        seconds=seconds,
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LeaseLostError(ProcessingError):
    """Another caller took over a product this one was writing (its lease had expired)."""


@dataclass
class _Lease:
    """One writer's hold on a product: the product node, its term, when it runs out.

    Term 0 is the creation of the product node (tiled refuses a second
    creator with 409); term k > 0 is the creation of the product's child
    ``lease-<k>``, which only the first of several callers that found the
    lease expired gets. So a writer still holds the product exactly while
    ``lease-<term + 1>`` does not exist; the expiry in the product's
    metadata, renewed while writing, tells others when to take over.
    """

    product: Any
    term: int
    owner: str
    seconds: float
    renewed: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        from chx_masks.stores import local_user as _local_user

        return {
            "owner": self.owner,
            "by": f"{_local_user()} pid {os.getpid()}",
            "term": self.term,
            "expires": (_now() + timedelta(seconds=self.seconds)).isoformat(),
        }

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if another caller has taken the product over."""
        try:
            self.product[f"lease-{self.term + 1}"]
        except KeyError:
            return
        raise LeaseLostError(
            f"Another caller took over the product of run "
            f"{self.product.metadata['parent_uid']} after this one's lease ran out "
            f"({self.seconds:g} s without renewal): it completes the product; this one stops."
        )

    def release(self) -> None:
        """Let the next caller take over at once (this one failed); best effort."""
        try:
            self.check()
            record = {**self.record(), "expires": _now().isoformat()}
            self.product.update_metadata({"lease": record}, drop_revision=True)
        except Exception:
            logger.debug("Could not release the lease on %s", self.product, exc_info=True)

    def renew(self, *, force: bool = False) -> None:
        """Check the hold and push the expiry on, at most every third of the lease."""
        if not force and time.monotonic() - self.renewed < self.seconds / 3:
            return
        self.check()
        self.product.update_metadata({"lease": self.record()}, drop_revision=True)
        self.renewed = time.monotonic()


def _lease_product(
    container: Any,
    plan: ProcessingPlan,
    metadata: dict[str, Any],
    lease_s: float,
    wait: float | None,
) -> tuple[_Lease | None, Any]:
    """Hold the run's product for writing, or return the finished one.

    Returns ``(lease, product)``; ``lease`` is None when ``product`` is a
    finished product made earlier (or meanwhile, by the writer waited for).
    """
    from tiled.structures.core import Spec

    owner = str(uuid.uuid4())
    began = time.monotonic()
    announced = False
    while True:
        node = _existing(container, plan.run_uid)
        if node is None:
            lease = _Lease(None, 0, owner, lease_s)
            try:
                node = container.create_container(
                    key=plan.run_uid,
                    metadata={**metadata, "lease": lease.record()},
                    specs=[Spec(_SPEC)],
                )
            except Exception as err:
                if _status(err) != 409:
                    raise
                continue  # created by another caller a moment ago: look again
            lease.product = node
            return lease, node
        md = node.metadata
        if md.get("status") == _COMPLETE:
            return None, node
        held = md.get("lease") or {}
        expires = _parse_time(held.get("expires"))
        if expires is not None and _now() < expires:
            waited = time.monotonic() - began
            if wait is not None and waited >= wait:
                raise ProcessingError(
                    f"The product of run {plan.run_uid} is being written by "
                    f"{held.get('by', 'another caller')} (lease until {held['expires']}); "
                    f"waited {waited:.0f} s. Run again later to get its product, or wait "
                    "longer (wait=None waits for it).",
                    cli=f"The product of run {plan.run_uid} is being written by "
                    f"{held.get('by', 'another caller')} (lease until {held['expires']}). "
                    "Run the command again later to get its product.",
                )
            if not announced:
                announced = True
                logger.warning(
                    "Waiting for the product of run %s: %s is writing it (lease until %s).",
                    plan.run_uid,
                    held.get("by", "another caller"),
                    held["expires"],
                )
            pause = min(1.0, max(0.05, (expires - _now()).total_seconds()))
            if wait is not None:
                pause = min(pause, max(0.05, wait - waited))
            time.sleep(pause)
            continue
        # Written by a caller that stopped renewing (it crashed, or the
        # product predates leases): the first to claim the next term goes on
        # with it; the others wait for that one.
        term = int(held.get("term", 0)) + 1
        try:
            node.create_container(key=f"lease-{term}", metadata={"owner": owner})
        except Exception as err:
            if _status(err) != 409:
                raise
            time.sleep(0.2)
            continue
        lease = _Lease(node, term, owner, lease_s)
        node.update_metadata({**metadata, "lease": lease.record()})
        return lease, node


def _parse_time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except (TypeError, ValueError):
        return None


def write_product(
    plan: ProcessingPlan,
    *,
    runs: RunStore | str | Path | Any,
    processed: RunStore | str | Path | Any,
    client: Any = None,
    flow_run_id: str | None = None,
    window: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    lease_s: float = LEASE_S,
    wait: float | None = None,
    files: str | Path | None | Literal[False] = None,
) -> ProcessedRun:
    """Mask every chunk of the planned run and store it as a product.

    Idempotent and safe to call from several processes at once: a finished
    product of the run is returned unchanged (``created=False``). A product
    has one writer at a time, which holds a lease on it (in its metadata,
    renewed while writing): another caller waits for that writer and returns
    its product, and takes over only a lease that has run out (a writer
    that crashed), completing the product in place.

    Parameters
    ----------
    plan : ProcessingPlan
        From :func:`plan_processing`.
    runs, processed : RunStore, str, Path or tiled client
        Where the raw run is, and the container products are written to. A
        ``dask.distributed`` client needs ``runs`` as a RunStore or a path
        (its workers open it themselves).
    client : distributed.Client, optional
        Compute chunks on this cluster; local threads otherwise.
    flow_run_id : str, optional
        Recorded in the product (the Prefect flow run that made it).
    window : int, optional
        Chunks in flight at once (bounds memory); by default twice the
        cluster's threads, or 4 locally.
    progress : callable, optional
        Called with (chunks written, chunks in all).
    lease_s : float
        Seconds the lease lasts without renewal (it is renewed every third
        of that while chunks are written): how long others wait before
        taking over from a writer that stopped. Longer than any one chunk
        takes.
    wait : float or None
        Seconds to wait for another caller writing the same product before
        raising :class:`ProcessingError`; None waits until it finishes or
        its lease runs out.
    files : str or Path, optional
        Directory for the product's files: the masked frames, one
        bitshuffle-LZ4 chunk per frame (the raw Eiger encoding, so the
        product is smaller than the raw run), which the processed store
        serves as external data; it must be in that store's readable
        storage. A local processed store (a directory) keeps them in its own
        storage by default. Without files (False, or a tiled server with no
        ``files`` given) the product is stored inside tiled, sparse (COO),
        which costs several times the raw run.

    Examples
    --------
    >>> plan = plan_processing(uid, runs="/data/runs", registry=reg)  # doctest: +SKIP
    >>> write_product(plan, runs="/data/runs", processed="/data/processed")  # doctest: +SKIP
    """
    began = time.perf_counter()
    runs = _store(runs)
    if client is not None and not isinstance(runs, RunStore):
        raise ProcessingError(
            "A dask.distributed client needs the run store as a RunStore or path (its "
            "workers open it themselves), not an open tiled client."
        )
    if not lease_s > 0:
        raise ProcessingError(f"lease_s must be a positive number of seconds, not {lease_s!r}.")
    processed = _store(processed)
    container = _client(processed, runs=False)
    if files is False:
        files = None
    elif files is None and isinstance(processed, RunStore) and not processed.remote:
        # The store's own writable storage, which it serves.
        files = Path(processed.location).expanduser().absolute() / "data" / "products"
    metadata = {
        **plan.provenance(),
        "uid": str(uuid.uuid4()),
        "flow_run_id": flow_run_id,
        "status": _WRITING,
        "started": _now().isoformat(),
    }
    lease, product = _lease_product(container, plan, metadata, lease_s, wait)
    if lease is None:
        return _as_result(product, False, time.perf_counter() - began)
    if window is None:
        threads = sum(client.nthreads().values()) if client is not None else 2
        window = max(2, 2 * threads)
    total = sum(len(d.chunks) for d in plan.detectors)
    written = [0]

    def on_block() -> None:
        written[0] += 1
        lease.renew()
        if progress is not None:
            progress(written[0], total)

    try:
        if files is None:
            nonzero = {
                detector.data_key: _write_detector(
                    plan, detector, runs, product, client, window, on_block
                )
                for detector in plan.detectors
            }
        else:
            where = Path(files).expanduser().absolute() / plan.run_uid / f"term-{lease.term}"
            nonzero = {
                detector.data_key: _write_detector_file(
                    plan, detector, runs, product, client, window, on_block, where
                )
                for detector in plan.detectors
            }
    except LeaseLostError:
        raise
    except BaseException:
        lease.release()
        raise
    lease.check()
    product.update_metadata(
        {
            **metadata,
            "status": _COMPLETE,
            "nonzero": nonzero,
            "finished": _now().isoformat(),
            "lease": None,
        }
    )
    return _as_result(container[plan.run_uid], True, time.perf_counter() - began)


#: How a file-backed product's frames are stored (recorded in its metadata).
FILE_ENCODING = "hdf5 bitshuffle-lz4, one chunk per frame"


def _write_detector_file(
    plan: ProcessingPlan,
    detector: _Detector,
    runs: Any,
    product: Any,
    client: Any,
    window: int,
    on_block: Callable[[], None],
    directory: Path,
) -> int:
    """Write one detector's masked frames to an HDF5 file, then register it in the product.

    The node is added only once the file is complete and closed, so a
    product that has the node has the whole file; a writer that finds it
    (having taken over from one that stopped after it) leaves it as it is.
    """
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import Asset, DataSource, Management

    from chx_masks.io import h5py_with_filters

    from ._eiger import DATA_PATH, file_stem, frames_dataset

    try:
        done = product[detector.data_key]
    except KeyError:
        done = None
    if done is not None:
        for _ in detector.chunks:
            on_block()
        return int(done.metadata["nonzero"])
    h5py = h5py_with_filters()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{file_stem(detector.data_key)}.h5"
    shape = (detector.frames, *detector.event_shape)
    per_event = detector.per_event
    direct = detector.files is not None and client is None
    mask = prepare_mask(
        detector.composite, detector.dtype, detector.frame_shape if direct else detector.event_shape
    )
    if client is not None:
        [mask] = client.scatter([mask], broadcast=True)
    # Either task, with its arguments (detector.files is not None where direct).
    args: list[tuple[Callable[..., tuple[list[bytes], int]], tuple[Any, ...]]]
    if direct:
        args = [
            (_direct_encoded, (detector.files, a * per_event, b * per_event, mask, detector.dtype))
            for a, b in detector.chunks
        ]
    else:
        args = [
            (_masked_encoded, (runs, plan.run_uid, plan.stream, detector.data_key, a, b, mask))
            for a, b in detector.chunks
        ]
    tasks: Sequence[Any] = (
        args if client is not None else [functools.partial(fn, *a) for fn, a in args]
    )
    nonzero = 0
    # The file holds frames, (rows x frames per row, rows, cols), one chunk each,
    # as the Eiger writes them; tiled serves it in the run's shape.
    with h5py.File(path, "w") as f:
        dataset = frames_dataset(
            f, detector.frame_shape, detector.dtype, detector.frames * per_event
        )
        dataset.attrs["parent_uid"] = plan.run_uid
        for index, (encoded, count) in _in_flight(tasks, client, window):
            first = detector.chunks[index][0] * per_event
            for i, chunk in enumerate(encoded):
                dataset.id.write_direct_chunk((first + i, 0, 0), chunk)
            nonzero += count
            on_block()
    structure = ArrayStructure(
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype(detector.dtype)),
        shape=shape,
        chunks=(
            (1,) * detector.frames,
            *((1,) * n for n in detector.event_shape[:-2]),
            *((n,) for n in detector.frame_shape),
        ),
    )
    source = DataSource(
        structure_family=StructureFamily.array,
        mimetype="application/x-hdf5",
        structure=structure,
        parameters={"dataset": DATA_PATH},
        assets=[
            Asset(
                data_uri=path.as_uri().replace("file:///", "file://localhost/", 1),
                is_directory=False,
                parameter="data_uris",
                num=0,
            )
        ],
        management=Management.external,
    )
    try:
        node = product.new(
            StructureFamily.array,
            [source],
            key=detector.data_key,
            metadata={
                "parent_uid": plan.run_uid,
                "masks": detector.record,
                "sha256": detector.composite.sha256,
                "nonzero": nonzero,
                "encoding": FILE_ENCODING,
            },
        )
    except Exception as err:
        if _status(err) != 409:
            raise
        return nonzero  # registered meanwhile by a writer this one took over from
    try:
        node[0]
    except Exception as err:
        if "readable storage" not in str(err):
            raise
        product.delete_contents(detector.data_key, external_only=True)
        raise ProcessingError(
            f"The processed store does not serve {path}: it is outside its readable "
            "storage. Give files= a directory that store reads (its configuration's "
            "readable_storage).",
            cli=f"The processed store does not serve {path}: it is outside its readable "
            "storage. Give --product-files a directory that store reads.",
        ) from err
    return nonzero


def _write_detector(
    plan: ProcessingPlan,
    detector: _Detector,
    runs: Any,
    product: Any,
    client: Any,
    window: int,
    on_block: Callable[[], None],
) -> int:
    from tiled.structures.array import BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import DataSource
    from tiled.structures.sparse import COOStructure

    shape = (detector.frames, *detector.event_shape)
    chunks = detector.chunks
    width = (
        np.uint16 if max(detector.frames_per_chunk, *detector.event_shape) <= 65535 else np.uint32
    )
    structure = COOStructure(
        shape=shape,
        chunks=(tuple(b - a for a, b in chunks), *((n,) for n in detector.event_shape)),
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype(detector.dtype)),
        coord_data_type=BuiltinDtype.from_numpy_dtype(np.dtype(width)),
    )
    try:
        node = product.new(
            StructureFamily.sparse,
            [DataSource(structure=structure, structure_family=StructureFamily.sparse)],
            key=detector.data_key,
            metadata={
                "parent_uid": plan.run_uid,
                "masks": detector.record,
                "sha256": detector.composite.sha256,
            },
        )
    except Exception as err:
        if _status(err) != 409:
            raise
        # Taken over from a writer that stopped: every block is written
        # again, in the chunking that writer chose.
        node = product[detector.data_key]
        existing = node.structure()
        if tuple(existing.shape) != shape or existing.data_type.to_numpy_dtype() != np.dtype(
            detector.dtype
        ):
            raise ProcessingError(
                f"The unfinished product of run {plan.run_uid} holds {detector.data_key} "
                f"as {existing.data_type.to_numpy_dtype()} {tuple(existing.shape)}, not "
                f"{np.dtype(detector.dtype)} {shape}; it cannot be completed. Delete it "
                "from the processed store and run again."
            ) from err
        bounds = np.cumsum((0, *existing.chunks[0]))
        chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        width = existing.coord_data_type.to_numpy_dtype().type
    # Prepared once in the frames' dtype: frame * bool would cast it in every chunk.
    mask = prepare_mask(detector.composite, detector.dtype, detector.event_shape)
    if client is not None:
        [mask] = client.scatter([mask], broadcast=True)
    args = [
        (_masked_chunk, (runs, plan.run_uid, plan.stream, detector.data_key, a, b, mask))
        for a, b in chunks
    ]
    tasks: Sequence[Any] = (
        args if client is not None else [functools.partial(fn, *a) for fn, a in args]
    )
    nonzero = 0
    tail = (0,) * len(detector.event_shape)
    for index, (coords, data) in _in_flight(tasks, client, window):
        node.write_block(coords.astype(width, copy=False), data, (index, *tail))
        nonzero += int(data.size)
        on_block()
    return nonzero


def process_run(
    run_uid: str,
    *,
    runs: RunStore | str | Path | Any,
    processed: RunStore | str | Path | Any,
    registry: MaskRegistry,
    data_keys: Sequence[str] | None = None,
    masks: Mapping[str, Sequence[str]] | None = None,
    stream: str = "primary",
    client: Any = None,
    frames_per_chunk: int | None = None,
    flow_run_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    lease_s: float = LEASE_S,
    wait: float | None = None,
    files: str | Path | None | Literal[False] = None,
) -> ProcessedRun:
    """Mask a stored run's frames with its recorded masks and store them as a product.

    :func:`plan_processing` then :func:`write_product`; see those for the
    parameters. Running it again for the same run returns the same product.

    Examples
    --------
    >>> product = process_run(uid, runs="/data/runs", processed="/data/processed",
    ...                       registry=reg)  # doctest: +SKIP
    >>> product.masks["eiger4m_single_image"]["uids"]  # doctest: +SKIP
    """
    plan = plan_processing(
        run_uid,
        runs=runs,
        registry=registry,
        data_keys=data_keys,
        masks=masks,
        stream=stream,
        frames_per_chunk=frames_per_chunk,
    )
    return write_product(
        plan,
        runs=runs,
        processed=processed,
        client=client,
        flow_run_id=flow_run_id,
        progress=progress,
        lease_s=lease_s,
        wait=wait,
        files=files,
    )
